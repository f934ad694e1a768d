"""Searches a gallery (a folder or list of images, or a features file of extract.py) for query images with a
trained model: exact top-k in bounded memory (or a faiss shortlist re-scored exactly), optional re-ranking,
results as CSV or JSON and ranked-list pictures."""
import csv
import json
import os
import time

import numpy as np

from aligned_reid import distance as dist_lib
from aligned_reid import cli, features_file, inference
from aligned_reid.cli import boolean
from aligned_reid.files import atomic_write

MAX_RERANK_GALLERY = 30000    # re-ranking holds dense gallery x gallery matrices (3.6 GB at this size)


def build_parser():
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument('--query', required=True,
                   help='query images: a folder (recursive), a text file of paths, or a features file (.h5) of '
                        'extract.py. Default: none (required)')
    p.add_argument('--gallery', required=True,
                   help='gallery: a folder (recursive), a text file of paths, or a features file (.h5) of '
                        'extract.py (read in blocks). Default: none (required)')
    p.add_argument('--model', default=None,
                   help='checkpoint file or experiment folder; needed unless query and gallery are both '
                        'features files. Default: none')
    p.add_argument('--output', required=True, help='results file: .csv or .json (by its extension). Default: none (required)')
    p.add_argument('--top_k', type=int, default=10, help='gallery items listed per query. Default: 10')
    p.add_argument('--distance', choices=dist_lib.DISTANCES, default='global',
                   help='global, local (aligned) or global_local (their sum); local ones need local features '
                        '(extract.py --local). Default: global')
    p.add_argument('--normalize_feature', type=boolean, default=None,
                   help='L2-normalise features before distances. Default: as the model was trained')
    p.add_argument('--re_rank', type=boolean, nargs='?', const=True, default=False,
                   help='k-reciprocal re-ranking (needs dense gallery x gallery distances: galleries up to '
                        '{:,}). Default: false'.format(MAX_RERANK_GALLERY))
    p.add_argument('--k1', type=int, default=20, help='re-ranking k1. Default: 20')
    p.add_argument('--k2', type=int, default=6, help='re-ranking k2. Default: 6')
    p.add_argument('--lambda_value', type=float, default=0.3, help='re-ranking lambda. Default: 0.3')
    p.add_argument('--faiss_index', default=None,
                   help="approximate first stage on global features: a faiss index_factory string such as "
                        "'IVF1024,Flat' or 'HNSW32' (needs faiss-cpu); the --shortlist candidates are then "
                        'ranked with the exact --distance. Default: none (exact search)')
    p.add_argument('--faiss_nprobe', type=int, default=16,
                   help='IVF lists visited per query (HNSW: efSearch = 4 x this). Default: 16')
    p.add_argument('--shortlist', type=int, default=100,
                   help='candidates per query from the faiss stage. Default: 100')
    p.add_argument('--gallery_block', type=int, default=65536,
                   help='gallery rows per block of the exact search (memory: queries x block distances). '
                        'Default: 65536')
    p.add_argument('--num_vis_queries', type=int, default=0,
                   help='draw the ranked lists of the first N queries. Default: 0 (none)')
    p.add_argument('--vis_dir', default=None, help='folder of the pictures. Default: <output>_ranks')
    p.add_argument('--flip', type=boolean, nargs='?', const=True, default=False,
                   help='average the features of each image and its mirror (images only). Default: false')
    p.add_argument('--amp', type=boolean, nargs='?', const=True, default=False,
                   help='mixed precision on CUDA. Default: false')
    cli.add_device_argument(p)
    p.add_argument('--allow_other_settings', type=boolean, nargs='?', const=True, default=False,
                   help='rank even when the query and gallery features were extracted at different input sizes '
                        '(their distances then mean little). Default: false (refuse)')
    p.add_argument('--batch_size', type=int, default=64, help='images per forward pass. Default: 64')
    p.add_argument('--workers', type=int, default=cli.default_workers(),
                   help='image decoding worker processes. ' + cli.WORKERS_HELP)
    return p


def _is_features(path):
    return os.path.isfile(path) and path.lower().endswith(('.h5', '.hdf5'))


def check_args(parser, args):
    for flag in ('query', 'gallery'):
        if not os.path.exists(getattr(args, flag)):
            parser.error('--{}: no such folder or file: {}'.format(flag, getattr(args, flag)))
    if args.model is None and not (_is_features(args.query) and _is_features(args.gallery)):
        parser.error('--model is needed to extract features of images (--query / --gallery are not both .h5)')
    if args.model is not None and not os.path.exists(args.model):
        parser.error('--model: no such file or folder: {}'.format(args.model))
    if not args.output.lower().endswith(('.csv', '.json')):
        parser.error('--output must end in .csv or .json, got {}'.format(args.output))
    if args.top_k < 1 or args.shortlist < 1 or args.gallery_block < 1 or args.batch_size < 1:
        parser.error('--top_k, --shortlist, --gallery_block and --batch_size must be >= 1')
    if args.num_vis_queries < 0 or args.workers < 0:
        parser.error('--num_vis_queries and --workers must be >= 0')
    if args.faiss_index is not None and args.re_rank:
        parser.error('--re_rank needs the exact distances to the whole gallery; drop --faiss_index')
    if args.faiss_index is not None and args.shortlist < args.top_k:
        parser.error('--shortlist {} is below --top_k {}: the top-k are chosen from the shortlist, so the lists '
                     'would be shorter; raise --shortlist to at least {}'.format(args.shortlist, args.top_k,
                                                                                  args.top_k))
    if os.path.isdir(args.output):
        parser.error('--output {} is a folder; give the .csv or .json file to write'.format(args.output))
    outputs = [('--output', os.path.dirname(os.path.abspath(args.output)))]
    if args.num_vis_queries:
        outputs.append(('--vis_dir', vis_dir(args)))
    for flag, folder in outputs:
        problem = cli.writable_folder_problem(folder)
        if problem:
            parser.error('{} {}: {}'.format(flag, getattr(args, flag[2:]) or folder, problem))
    cli.check_device(parser, args)
    return args


def vis_dir(args):
    return args.vis_dir or os.path.splitext(args.output)[0] + '_ranks'


def parse_args(argv=None):
    parser = build_parser()
    return check_args(parser, parser.parse_args(argv))


# ----------------------------------------------------------------------------- features

def load_side(source, extractor, local, args, logger, files):
    """Features of one side -> (paths, dict of arrays or h5py datasets, settings of the model that made them).
    A features file stays on disk (kept open in `files`) and is read in blocks."""
    if _is_features(source):
        f = features_file.open_features(source)
        files.append(f)
        if local and 'local' not in f:
            raise ValueError('{}: has no local features, needed by a local distance (extract with --local)'
                             .format(source))
        feats = {'global': f['global']}
        if local:
            feats['local'] = f['local']
        return features_file.decode_text(f['paths'][:]), feats, json.loads(f.attrs['settings'])
    paths = inference.list_images(source)
    kept, feats, skipped = extractor.extract_files(paths, local=local, workers=args.workers)
    for _, error in skipped:
        logger.warning('skipped: %s', error)
    if skipped:
        logger.warning('%s: %d of %d files skipped (unreadable or not images)', source, len(skipped), len(paths))
    if not kept:
        raise ValueError('{}: no readable image'.format(source))
    return kept, feats, extractor.settings(local)


def check_same_model(q, g, logger):
    """q, g: (flag, source, settings, feats) of each side. Stops with one line naming both sides when their
    features come from different models (other shapes, other weights or model settings)."""
    described = []
    for flag, source, settings, feats in (q, g):
        dims = {k: tuple(v.shape[1:]) for k, v in feats.items()}
        name = '{} {} ({})'.format(flag, source, features_file.describe_model(settings, dims))
        described.append((dims, settings, name))
    (qd, qs, qn), (gd, gs, gn) = described
    problem = features_file.model_difference(qs, qd, gs, gd)
    if problem:
        raise ValueError('{} and {} hold features of different models ({}): their distances mean nothing; extract '
                         'both with the same --model'.format(qn, gn, problem))
    if qs.get('model') != gs.get('model') and not (qs.get('weights') and gs.get('weights')):
        logger.warning('query and gallery features come from different checkpoint files (%s, %s) of the same '
                       'settings: their distances mean nothing unless the files were only moved',
                       qs.get('model'), gs.get('model'))


def faiss_shortlist(q_global, g_global, index_string, shortlist, nprobe, normalize):
    """Candidates per query from a faiss index over the gallery's global features (L2; on
    L2-normalised features with normalize) -> np.int64 [Q, shortlist] (-1 where fewer)."""
    try:
        import faiss
    except ImportError as e:
        raise ValueError('--faiss_index needs faiss (pip install faiss-cpu): {}'.format(e))
    g = np.ascontiguousarray(np.asarray(g_global, dtype=np.float32))
    q = np.ascontiguousarray(np.asarray(q_global, dtype=np.float32))
    if normalize:
        faiss.normalize_L2(g)
        faiss.normalize_L2(q)
    index = faiss.index_factory(g.shape[1], index_string, faiss.METRIC_L2)
    if not index.is_trained:
        index.train(g)
    index.add(g)
    try:
        faiss.extract_index_ivf(index).nprobe = nprobe     # also under a pre-transform such as PCA
    except RuntimeError:                                # not an IVF index
        try:
            faiss.ParameterSpace().set_index_parameter(index, 'efSearch', 4 * nprobe)
        except RuntimeError:
            pass                        # index without search-time parameters (Flat)
    return index.search(q, min(shortlist, g.shape[0]))[1].astype(np.int64)


def rank(q_feats, g_feats, args, normalize):
    """(indices [Q, k], distances [Q, k]) by the chosen route: re-ranking, faiss + exact, or exact."""
    if args.re_rank:
        from aligned_reid.re_ranking import re_ranking
        g = {k: np.asarray(v[:]) for k, v in g_feats.items()}
        if len(g['global']) > MAX_RERANK_GALLERY:
            raise ValueError('--re_rank: a gallery of {:,} needs dense {:,}^2 distances; at most {:,}'.format(
                len(g['global']), len(g['global']), MAX_RERANK_GALLERY))
        kw = dict(distance=args.distance, normalize=normalize, device=args.device)
        dist = re_ranking(dist_lib.compute_dist(q_feats, g, **kw), dist_lib.compute_dist(q_feats, q_feats, **kw),
                          dist_lib.compute_dist(g, g, **kw), k1=args.k1, k2=args.k2, lambda_value=args.lambda_value)
        order = np.argsort(dist, axis=1, kind='stable')[:, :args.top_k]
        return order, np.take_along_axis(dist, order, 1)
    if args.faiss_index:
        short = faiss_shortlist(q_feats['global'], g_feats['global'], args.faiss_index, args.shortlist,
                                args.faiss_nprobe, normalize)
        return dist_lib.rerank_shortlist(q_feats, g_feats, short, k=args.top_k, distance=args.distance,
                                          normalize=normalize, device=args.device)
    return dist_lib.topk_search(q_feats, g_feats, k=args.top_k, distance=args.distance, normalize=normalize,
                                 device=args.device, gallery_block=args.gallery_block)


def write_results(path, q_paths, g_paths, index, dist):
    """CSV rows (query, rank, gallery, distance) or JSON [{query, results: [{rank, gallery, distance}]}]."""
    with atomic_write(path, 'w', newline='', encoding='utf-8') as f:
        if path.lower().endswith('.csv'):
            w = csv.writer(f)
            w.writerow(['query', 'rank', 'gallery', 'distance'])
            for qi, q in enumerate(q_paths):
                for r, (gi, d) in enumerate(zip(index[qi], dist[qi]), start=1):
                    if gi >= 0:
                        w.writerow([q, r, g_paths[gi], '{:.6g}'.format(d)])
        else:
            json.dump([{'query': q, 'results': [{'rank': r, 'gallery': g_paths[gi], 'distance': float(d)}
                                                for r, (gi, d) in enumerate(zip(index[qi], dist[qi]), start=1)
                                                if gi >= 0]}
                       for qi, q in enumerate(q_paths)], f, indent=1)


def draw(q_paths, g_paths, index, dist, n, vis_dir, size, distance=None):
    """Ranked lists of the first n queries, grey frames (no identity labels), titled with `distance`."""
    from aligned_reid import visualize
    n = min(n, len(q_paths))
    cols = np.unique(index[:n][index[:n] >= 0])                  # gallery items shown, in index order
    mat = np.full((n, len(cols)), np.inf, dtype=np.float32)
    for qi in range(n):
        ok = index[qi] >= 0
        mat[qi, np.searchsorted(cols, index[qi][ok])] = dist[qi][ok]
    return visualize.save_ranked_lists(mat, None, None, None, None, q_paths[:n], [g_paths[c] for c in cols],
                                       vis_dir, top_k=index.shape[1], size=size, distance=distance)


def main(args):
    logger = cli.setup_logging(None, name='aligned_reid.search')
    local = args.distance != 'global'
    extractor = None
    if args.model is not None and not (_is_features(args.query) and _is_features(args.gallery)):
        extractor = inference.FeatureExtractor(args.model, device=args.device, batch_size=args.batch_size,
                                               flip=args.flip, amp=args.amp)
    files = []
    try:
        t0 = time.time()
        q_paths, q_feats, q_set = load_side(args.query, extractor, local, args, logger, files)
        g_paths, g_feats, g_set = load_side(args.gallery, extractor, local, args, logger, files)
        sizes = [tuple(s['cfg']['resize_h_w']) for s in (q_set, g_set)]
        if sizes[0] != sizes[1] and not args.allow_other_settings:
            raise ValueError('query features are of {} x {} inputs, gallery features of {} x {}: their distances '
                             'mean little; extract both at one size (or pass --allow_other_settings true)'.format(
                                 *sizes[0], *sizes[1]))
        check_same_model(('--query', args.query, q_set, q_feats), ('--gallery', args.gallery, g_set, g_feats),
                         logger)
        q_feats = {k: np.asarray(v[:]) for k, v in q_feats.items()}
        cfg = q_set['cfg']
        normalize = cfg['normalize_feature'] if args.normalize_feature is None else args.normalize_feature
        logger.info('%d queries, %d gallery items: features in %.1f s', len(q_paths), len(g_paths), time.time() - t0)
        t0 = time.time()
        index, dist = rank(q_feats, g_feats, args, normalize)
        logger.info('ranked with the %s distance%s%s in %.1f s', args.distance, ' + re-ranking' if args.re_rank else '',
                    ', faiss {} shortlist of {}'.format(args.faiss_index, args.shortlist) if args.faiss_index else '',
                    time.time() - t0)
    finally:
        for f in files:
            f.close()
    write_results(args.output, q_paths, g_paths, index, dist)
    logger.info('top-%d per query written to %s', index.shape[1], args.output)
    if args.num_vis_queries:
        h, w = cfg['resize_h_w']
        draw(q_paths, g_paths, index, dist, args.num_vis_queries, vis_dir(args), (max(h, 128), max(w, 64)),
             distance=args.distance + (', re-ranked' if args.re_rank else ''))
        logger.info('pictures written to %s', vis_dir(args))
    return q_paths, g_paths, index, dist


if __name__ == '__main__':
    cli.run_cli(main, parse_args, 'search.py', errors=(ValueError, FileNotFoundError),
                interrupted='interrupted; --output is written whole once the search completes, or not at all')
