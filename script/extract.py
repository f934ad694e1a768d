"""Extracts the features of a folder of images (recursively), a list of image paths, or a split of a
prepared partitions.pkl with a trained model into an HDF5 file; an interrupted run resumes when rerun."""
import os
import time

from aligned_reid import cli
from aligned_reid.checkpoint import MODEL_FLAGS
from aligned_reid.cli import boolean
from aligned_reid.features_file import (FeaturesWriteError, FeaturesWriter, decode_text, open_features,
                                        unfinished_dir)
from aligned_reid.inference import FeatureExtractor, extract_to_file, list_images

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
                   help='HDF5 file to write, once every image is done (until then the chunks are kept in the '
                        'folder <output>.unfinished); a rerun of an unfinished extraction of the same images and '
                        'settings continues it. Default: none (required)')
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
                   help='images per chunk written to <output>.unfinished; at most this much work is redone after '
                        'an interruption. '
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
    if os.path.isdir(args.output):
        parser.error('--output {} is a folder; give the HDF5 file to write'.format(args.output))
    problem = cli.writable_folder_problem(os.path.dirname(os.path.abspath(unfinished_dir(args.output))))
    if problem:
        parser.error('--output {}: {}'.format(args.output, problem))
    return args


def parse_args(argv=None):
    parser = build_parser()
    return check_args(parser, parser.parse_args(argv))


def main(args):
    logger = cli.setup_logging(None, name='aligned_reid.extract')
    paths = list_images(args.images, args.partitions, args.split)
    if not paths:
        raise ValueError('no input files in {}'.format(args.images or args.partitions))
    overrides = {k: getattr(args, k, None) for k in MODEL_FLAGS}
    extractor = FeatureExtractor(args.model, device=args.device, batch_size=args.batch_size, flip=args.flip,
                                 amp=args.amp, overrides=overrides, model_index=args.model_index)
    dims = extractor.dims(args.local)
    with FeaturesWriter(args.output, paths, extractor.settings(args.local), dims, args.overwrite) as writer:
        if writer.complete:
            logger.info('%s is complete (%d inputs); nothing to do (--overwrite to redo)', args.output, len(paths))
            return
        if writer.position:
            logger.info('continuing %s at input %d of %d', args.output, writer.position, len(paths))
        t0 = time.time()
        done = extract_to_file(extractor, paths, writer, args.local, args.workers, args.chunk_size,
                               args.max_images, args.progress, logger)
        logger.info('%d inputs in %.1f s, %d of %d done', done, time.time() - t0, writer.position, len(paths))
        if not writer.complete:
            logger.info('stopped before the end (the chunks are in %s): rerun the same command to continue',
                        writer.dir)
            return
    if not writer.rows:  # a features file of nothing would pass for a result
        with open_features(args.output) as f:
            first = ['{}: {}'.format(*e) for e in zip(decode_text(f['skipped'][:1]), decode_text(f['skipped_errors'][:1]))]
        os.remove(args.output)
        raise ValueError('none of the {} inputs of {} is a readable image{}; no features file written'.format(
            len(paths), args.images or args.partitions, ' (the first: {})'.format(first[0]) if first else ''))
    logger.info('%s holds %d feature rows%s', args.output, writer.rows, ' (global + local)' if args.local else '')
    if writer.num_skipped:
        logger.warning('%d files skipped (unreadable or not images), listed in the log above and in the '
                       "file's 'skipped' dataset", writer.num_skipped)
    return writer.rows


if __name__ == '__main__':
    cli.run_cli(main, parse_args, 'extract.py', errors=(ValueError, FileNotFoundError, FeaturesWriteError),
                interrupted='interrupted; the chunks written so far are kept: rerun the same command to continue')
