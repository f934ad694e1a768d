"""Benchmark of using a trained model: extraction images/s (extract.py's route, inference.extract_to_file
into a features file, and FeatureExtractor on files) against the bare model forward on ready tensors, in
the same process; and query x gallery search time, exact (blocked top-k) against the dense matrix +
argsort route of evaluation, and with a faiss first stage, with the recall of its shortlist against the
exact top-k.

Features for the search are synthetic (identity centres plus noise), generated in blocks.
Examples:
  python bench/inference.py --part extract
  python bench/inference.py --part search --sizes 3368x15913
  python bench/inference.py --part search --sizes 10000x1000000 --exact_queries 200"""
import argparse
import os
import tempfile
import time

import numpy as np
import torch

from aligned_reid import cli, distance, features_file, inference
from aligned_reid.model import Model
from aligned_reid.synthetic import make_camera, make_identity, render_image

def build_parser():
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--part', choices=('extract', 'search', 'all'), default='all', help='what to time. Default: all')
    p.add_argument('--base_model', default='resnet50', help='backbone for extraction. Default: resnet50')
    p.add_argument('--resize_h_w', type=int, nargs=2, default=(256, 128), help='input size. Default: 256 128')
    p.add_argument('--num_images', type=int, default=256, help='images extracted. Default: 256')
    p.add_argument('--batch_size', type=int, default=64, help='extraction batch size. Default: 64')
    p.add_argument('--workers', type=int, default=0, help='decoding processes of the extraction. Default: 0')
    p.add_argument('--repeats', type=int, default=3, help='interleaved runs of each extraction route. Default: 3')
    p.add_argument('--sizes', nargs='+', default=['3368x15913', '10000x1000000'],
                   help='query x gallery sizes to search. Default: 3368x15913 10000x1000000')
    p.add_argument('--dim', type=int, default=2048, help='global feature size (resnet50: 2048). Default: 2048')
    p.add_argument('--exact_queries', type=int, default=None,
                   help='time the exact search on only this many queries when the gallery exceeds 100,000 '
                        '(its time is linear in the queries; the full figure is then extrapolated and marked '
                        'so). Default: all queries')
    p.add_argument('--top_k', type=int, default=10, help='k of the top-k. Default: 10')
    p.add_argument('--faiss_index', default='IVF1024,SQ8',
                   help="faiss index_factory string ('none' to skip faiss). Default: IVF1024,SQ8")
    p.add_argument('--faiss_nprobe', type=int, default=32, help='IVF lists visited per query. Default: 32')
    p.add_argument('--faiss_train', type=int, default=100000, help='gallery rows the IVF is trained on. Default: 100000')
    p.add_argument('--faiss_niter', type=int, default=10, help='k-means iterations of the IVF training. Default: 10')
    p.add_argument('--shortlist', type=int, default=100, help='faiss candidates per query. Default: 100')
    p.add_argument('--threads', type=int, default=None, help='torch threads. Default: torch default')
    return p


# ----------------------------------------------------------------------------- extraction

def bench_extract(args):
    h, w = args.resize_h_w
    torch.manual_seed(0)
    model = Model(base=args.base_model).eval()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, 'ckpt.pth')
        torch.save({'model': model.state_dict(), 'args': {'base_model': args.base_model,
                                                          'resize_h_w': [h, w]}}, ckpt)
        rng = np.random.default_rng(0)
        paths = []
        for i in range(args.num_images):
            p = os.path.join(tmp, 'im', f'{i:06d}.jpg')
            os.makedirs(os.path.dirname(p), exist_ok=True)
            render_image(make_identity(0, 1 + i % 50), make_camera(0, 1 + i % 6), rng, im_size=(128, 64)).save(p)
            paths.append(p)
        ext = inference.FeatureExtractor(ckpt, device='cpu', batch_size=args.batch_size)
        batch = torch.randn(args.batch_size, 3, h, w)
        ext.embed(batch[:2])                                          # warm-up

        def bare():
            with torch.inference_mode():
                for s in range(0, args.num_images, args.batch_size):
                    model(batch[:min(args.batch_size, args.num_images - s)])

        def files():
            ext.extract_files(paths, local=True, workers=args.workers)

        def to_hdf5():
            out = os.path.join(tmp, 'f.h5')
            with features_file.FeaturesWriter(out, paths, ext.settings(True), ext.dims(True), overwrite=True) as w:
                inference.extract_to_file(ext, paths, w, True, args.workers, 1024, progress=False)

        rates = {}
        for _ in range(args.repeats):         # interleaved, best of each: other jobs' load comes and goes
            for name, fn in (('bare forward', bare), ('FeatureExtractor.extract_files', files),
                             ('extract.py chunks -> HDF5', to_hdf5)):
                t = time.perf_counter()
                fn()
                rates[name] = max(rates.get(name, 0.), args.num_images / (time.perf_counter() - t))
        print(f'extraction, {args.base_model} at {h}x{w}, {args.num_images} JPEG images, batch {args.batch_size}, '
              f'{args.workers} workers, {torch.get_num_threads()} torch threads, best of {args.repeats}:')
        for name, r in rates.items():
            print(f'  {name:32s} {r:8.1f} images/s   ({r / rates["bare forward"]:.2f} x bare forward)')


# ----------------------------------------------------------------------------- search

def features(n, dim, num_ids, seed, noise=0.6, block=1 << 16):
    """n synthetic global features [n, dim] float32: identity centres (unit normal, shared across calls
    via the seed 0) plus Gaussian noise, ReLU'd like pooled CNN activations; generated in blocks."""
    centres = torch.randn(num_ids, dim, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, block):
        e = min(n, s + block)
        ids = torch.randint(0, num_ids, (e - s,), generator=gen)
        out[s:e] = (centres[ids] + noise * torch.randn(e - s, dim, generator=gen)).relu_().numpy()
    return out


def bench_search(args, Q, G):
    num_ids = max(2, G // 20)
    t = time.perf_counter()
    g = features(G, args.dim, num_ids, seed=2)
    q = features(Q, args.dim, num_ids, seed=1)
    print(f'\nsearch {Q:,} x {G:,} global features of {args.dim} (gallery {g.nbytes / 2**30:.1f} GiB, made in '
          f'{time.perf_counter() - t:.0f} s), top-{args.top_k}, {torch.get_num_threads()} torch threads:')
    Qe = Q if args.exact_queries is None or G <= 100000 else min(Q, args.exact_queries)
    t = time.perf_counter()
    index, _ = distance.topk_search({'global': q[:Qe]}, {'global': g}, k=args.top_k)
    exact_s = (time.perf_counter() - t) * Q / Qe
    note = '' if Qe == Q else f' (measured on {Qe:,} queries, x {Q / Qe:.0f} extrapolated)'
    print(f'  exact blocked top-k            {exact_s:9.1f} s{note}')
    if Qe == Q and Q * G <= 1 << 27:    # the dense route holds a Q x G matrix: only where it fits easily
        t = time.perf_counter()
        d = distance.compute_dist({'global': q}, {'global': g})
        dense = np.argsort(d, axis=1, kind='stable')[:, :args.top_k]
        dense_s = time.perf_counter() - t
        print(f'  dense matrix + argsort         {dense_s:9.1f} s   (exact top-k: {dense_s / exact_s:.2f} x faster, '
              f'matrix {d.nbytes / 2**30:.2f} GiB; same top-{args.top_k} lists: {(dense == index).mean():.4f})')
    if args.faiss_index == 'none':
        return
    try:
        import faiss
    except ImportError:
        print('  faiss not installed (pip install faiss-cpu): approximate search skipped')
        return
    t = time.perf_counter()
    idx = faiss.index_factory(args.dim, args.faiss_index, faiss.METRIC_L2)
    try:
        faiss.extract_index_ivf(idx).cp.niter = args.faiss_niter
    except RuntimeError:
        pass                                                         # not an IVF index
    if not idx.is_trained:
        rows = np.random.default_rng(0).choice(G, min(G, args.faiss_train), replace=False)
        idx.train(g[np.sort(rows)])
    idx.add(g)
    build_s = time.perf_counter() - t
    try:
        faiss.extract_index_ivf(idx).nprobe = args.faiss_nprobe     # also under a PCA pre-transform
    except RuntimeError:
        pass
    t = time.perf_counter()
    short = idx.search(q[:Qe], args.shortlist)[1].astype(np.int64)
    rescored, _ = distance.rerank_shortlist({'global': q[:Qe]}, {'global': g}, short, k=args.top_k)
    search_s = (time.perf_counter() - t) * Q / Qe
    recall_short = np.mean([len(set(index[i]) & set(short[i])) / args.top_k for i in range(Qe)])
    recall_top = np.mean([len(set(index[i]) & set(rescored[i])) / args.top_k for i in range(Qe)])
    print(f'  faiss {args.faiss_index} build       {build_s:9.1f} s   (train on {min(G, args.faiss_train):,}, add {G:,})')
    print(f'  faiss search + exact re-score  {search_s:9.1f} s   ({exact_s / search_s:.1f} x faster than exact; '
          f'nprobe {args.faiss_nprobe}, shortlist {args.shortlist}){note}')
    print(f'  recall of the exact top-{args.top_k}: in the shortlist {recall_short:.4f}, '
          f'after re-scoring {recall_top:.4f} (over {Qe:,} queries)')


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.part in ('extract', 'all'):
        bench_extract(args)
    if args.part in ('search', 'all'):
        for size in args.sizes:
            Q, G = (int(v) for v in size.lower().split('x'))
            bench_search(args, Q, G)


if __name__ == '__main__':
    main(build_parser().parse_args())
