"""Extracts the features of a folder of images (recursively), a list of image paths, or a split of a
prepared partitions.pkl with a trained model into an HDF5 file; an interrupted run resumes when rerun."""
import hashlib
import json
import os
import time

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from aligned_reid import cli
from aligned_reid.checkpoint import MODEL_FLAGS
from aligned_reid.inference import FEATURES_FORMAT as FORMAT, FeatureExtractor, ImageFiles, decode_text, list_images
from aligned_reid.cli import boolean

SPLITS = ('trainval', 'train', 'val', 'test')


def build_parser():
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument('--model', required=True,
                   help='trained model: a checkpoint file (train.py ckpt.pth or a bare state_dict) or an '
                        'experiment folder holding ckpt.pth. Default: none (required)')
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument('--images', help='a folder of images (searched recursively; every file is tried, '
                                      'unreadable ones are skipped and listed) or a text file with one image '
                                      'path per line (relative paths are relative to the text file). '
                                      'Default: none; give it or --partitions')
    src.add_argument('--partitions', help='a prepared partitions.pkl: extract the images of --split. '
                                          'Default: none; give it or --images')
    p.add_argument('--split', choices=SPLITS, default='test',
                   help='split of --partitions to extract. Default: test')
    p.add_argument('--output', required=True,
                   help='HDF5 file to write; if it holds an unfinished extraction of the same images and '
                        'settings, the run continues it. Default: none (required)')
    p.add_argument('--overwrite', type=boolean, nargs='?', const=True, default=False,
                   help='start --output afresh instead of continuing or refusing it. Default: false')
    p.add_argument('--local', type=boolean, nargs='?', const=True, default=False,
                   help='also store the local (stripe) features, needed for local distances. Default: false')
    p.add_argument('--flip', type=boolean, nargs='?', const=True, default=False,
                   help='average the features of each image and its mirror. Default: false')
    p.add_argument('--amp', type=boolean, nargs='?', const=True, default=False,
                   help='mixed precision on CUDA (ignored on the CPU). Default: false')
    cli.add_device_argument(p)
    p.add_argument('--batch_size', type=int, default=64, help='images per forward pass. Default: 64')
    p.add_argument('--workers', type=int, default=cli.default_workers(),
                   help='image decoding worker processes. ' + cli.WORKERS_HELP)
    p.add_argument('--chunk_size', type=int, default=1024,
                   help='images per HDF5 write; at most this much work is redone after an interruption. '
                        'Default: 1024')
    p.add_argument('--max_images', type=int, default=None,
                   help='stop after this many more images (the file stays resumable). Default: no limit')
    p.add_argument('--model_index', type=int, default=1,
                   help='which model of a train_ml.py checkpoint (1 or 2). Default: 1')
    p.add_argument('--progress', type=boolean, default=True, help='show a progress bar. Default: true')
    cli.add_model_arguments(p, normalize_feature=False)
    return p


def check_args(parser, args):
    cli.check_model_arguments(parser, args)
    cli.check_device(parser, args)
    if args.batch_size < 1 or args.chunk_size < 1 or args.workers < 0:
        parser.error('--batch_size and --chunk_size must be >= 1, --workers >= 0')
    if args.max_images is not None and args.max_images < 0:
        parser.error('--max_images must be >= 0')
    if not os.path.exists(args.model):
        parser.error('--model: no such file or folder: {}'.format(args.model))
    if args.images is not None and not os.path.exists(args.images):
        parser.error('--images: no such folder or file: {}'.format(args.images))
    if args.partitions is not None and not os.path.isfile(args.partitions):
        parser.error('--partitions: file not found: {}'.format(args.partitions))
    return args


def parse_args(argv=None):
    parser = build_parser()
    return check_args(parser, parser.parse_args(argv))


# ----------------------------------------------------------------------------- HDF5 output

def input_digest(paths):
    """sha256 of the ordered input list: a resumed run must see the same images in the same order."""
    h = hashlib.sha256()
    for p in paths:
        h.update(p.encode('utf-8', 'surrogateescape') + b'\0')
    return h.hexdigest()


def open_output(path, paths, settings, dims, overwrite):
    """Opens (or creates) the HDF5 file: datasets 'paths' [N] (str), 'global' [N, C], optional
    'local' [N, h, c] (float32, one row per extracted image), 'skipped' and 'skipped_errors' [S] (str);
    attributes 'format', 'settings' (JSON), 'input_digest', 'num_inputs', 'position' (inputs
    consumed), 'complete'. An unfinished file of the same inputs and settings is continued; rows past
    the last committed chunk (an interrupted write) are cut off."""
    digest = input_digest(paths)
    if os.path.exists(path) and not overwrite:
        f = h5py.File(path, 'a')
        attrs = f.attrs
        if attrs.get('format') != FORMAT:
            f.close()
            raise ValueError('{}: not a features file of extract.py; pass --overwrite to replace it'.format(path))
        old = json.loads(attrs['settings'])
        if attrs['input_digest'] != digest or old != settings:
            f.close()
            changed = [k for k in settings if old.get(k) != settings[k]]
            raise ValueError('{}: holds an extraction of other {}; pass --overwrite to start again'.format(
                path, 'settings ({})'.format(', '.join(changed)) if changed else 'images'))
        rows, skipped = int(attrs['rows']), int(attrs['num_skipped'])
        for name in ('paths', 'global', 'local'):
            if name in f:
                f[name].resize(rows, axis=0)
        for name in ('skipped', 'skipped_errors'):
            f[name].resize(skipped, axis=0)
        return f
    os.makedirs(os.path.dirname(os.path.abspath(path)) or '.', exist_ok=True)
    f = h5py.File(path, 'w')
    text = h5py.string_dtype('utf-8')
    f.create_dataset('paths', (0,), maxshape=(None,), dtype=text, chunks=(4096,))
    for name, shape in dims.items():
        f.create_dataset(name, (0,) + shape, maxshape=(None,) + shape, dtype='float32',
                         chunks=(max(1, min(1024, (1 << 20) // max(1, 4 * int(np.prod(shape))))),) + shape)
    f.create_dataset('skipped', (0,), maxshape=(None,), dtype=text, chunks=(1024,))
    f.create_dataset('skipped_errors', (0,), maxshape=(None,), dtype=text, chunks=(1024,))
    f.attrs.update({'format': FORMAT, 'settings': json.dumps(settings), 'input_digest': digest,
                    'num_inputs': len(paths), 'position': 0, 'rows': 0, 'num_skipped': 0, 'complete': False})
    f.flush()
    return f


def _append(dset, values):
    n = dset.shape[0]
    dset.resize(n + len(values), axis=0)
    dset[n:] = values


def commit_chunk(f, buffer, position):
    """Appends a chunk's rows and skipped files, then moves the resume point; the attributes are
    written last, so an interruption mid-write leaves rows that the next run cuts off."""
    rows = int(f.attrs['rows'])
    ok = [r for r in buffer if r[2] is None]
    bad = [r for r in buffer if r[2] is not None]
    if ok:
        _append(f['paths'], [r[0] for r in ok])
        for name in ('global', 'local'):
            if name in f:
                _append(f[name], np.stack([r[1][name] for r in ok]))
    if bad:
        _append(f['skipped'], [r[0] for r in bad])
        _append(f['skipped_errors'], [r[2] for r in bad])
    f.attrs['rows'] = rows + len(ok)
    f.attrs['num_skipped'] = int(f.attrs['num_skipped']) + len(bad)
    f.attrs['position'] = position
    f.flush()


def extract(extractor, paths, f, local, batch_size, workers, chunk_size, max_images=None, progress=True,
            logger=None):
    """Runs the extractor over paths[position:] (position read from f) and commits every chunk_size
    inputs. Returns the number of inputs handled in this call."""
    start = int(f.attrs['position'])
    stop = len(paths) if max_images is None else min(len(paths), start + max_images)
    h, w = extractor.cfg['resize_h_w']
    dataset = ImageFiles(paths[start:stop], extractor.transform, (h, w))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=extractor.device.type == 'cuda')
    buffer, position = [], start
    bar = tqdm(total=len(paths), initial=start, desc='extract', unit='img', disable=not progress)
    for images, indices, errors in loader:
        good = [j for j, e in enumerate(errors) if not e]
        feats = {}
        if good:
            out = extractor.embed(images[good], local=local)
            feats = {k: v.cpu().numpy() for k, v in out.items()}
        g = 0
        for i, e in zip(indices.tolist(), errors):
            path = paths[start + i]
            if e:
                if logger:
                    logger.warning('skipped %s: %s', path, e)
                buffer.append((path, None, e))
            else:
                buffer.append((path, {k: v[g] for k, v in feats.items()}, None))
                g += 1
        position += len(errors)
        bar.update(len(errors))
        if len(buffer) >= chunk_size:
            commit_chunk(f, buffer, position)
            buffer = []
    if buffer:
        commit_chunk(f, buffer, position)
    bar.close()
    if position == len(paths):
        f.attrs['complete'] = True
        f.flush()
    return position - start


def main(args):
    logger = cli.setup_logging(None, name='aligned_reid.extract')
    overrides = {k: getattr(args, k, None) for k in MODEL_FLAGS}
    extractor = FeatureExtractor(args.model, device=args.device, batch_size=args.batch_size, flip=args.flip,
                                 amp=args.amp, overrides=overrides, model_index=args.model_index)
    paths = list_images(args.images, args.partitions, args.split)
    if not paths:
        raise ValueError('no input files in {}'.format(args.images or args.partitions))
    h, w = extractor.cfg['resize_h_w']
    probe = extractor.embed(torch.zeros(1, 3, h, w), local=args.local)
    dims = {k: tuple(v.shape[1:]) for k, v in probe.items()}
    settings = {'model': os.path.abspath(extractor.path), 'model_index': args.model_index,
                'flip': args.flip, 'local': args.local, 'amp': extractor.amp,
                'cfg': {k: v for k, v in extractor.cfg.items()}}
    f = open_output(args.output, paths, settings, dims, args.overwrite)
    try:
        if f.attrs['complete']:
            logger.info('%s is complete (%d images, %d skipped); nothing to do (--overwrite to redo)',
                        args.output, f.attrs['rows'], f.attrs['num_skipped'])
            return f.attrs['rows']
        if f.attrs['position']:
            logger.info('continuing %s at input %d of %d', args.output, f.attrs['position'], len(paths))
        t0 = time.time()
        done = extract(extractor, paths, f, args.local, args.batch_size, args.workers, args.chunk_size,
                       args.max_images, args.progress, logger)
        rows, skipped = int(f.attrs['rows']), int(f.attrs['num_skipped'])
        if f.attrs['complete'] and not rows:  # a features file of nothing would pass for a result
            first = ['{}: {}'.format(*e) for e in zip(decode_text(f['skipped'][:1]),
                                                      decode_text(f['skipped_errors'][:1]))]
            f.close()
            os.remove(args.output)
            raise ValueError('none of the {} inputs of {} is a readable image{}; no features file written'.format(
                len(paths), args.images or args.partitions, ' (the first: {})'.format(first[0]) if first else ''))
        logger.info('%d inputs in %.1f s; %s holds %d feature rows%s, %d of %d inputs done', done,
                    time.time() - t0, args.output, rows, ' (global + local)' if args.local else '',
                    int(f.attrs['position']), len(paths))
        if skipped:
            logger.warning('%d files skipped (unreadable or not images), listed in the log above and in the '
                           "file's 'skipped' dataset", skipped)
        if not f.attrs['complete']:
            logger.info('stopped before the end: rerun the same command to continue')
        return rows
    finally:
        f.close()


if __name__ == '__main__':
    cli.run_cli(main, parse_args, 'extract.py', errors=(ValueError, FileNotFoundError),
                interrupted='interrupted; the chunks written so far are kept: rerun the same command to continue')
