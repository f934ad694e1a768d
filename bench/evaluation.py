"""Benchmark at Market-1501 scale (synthetic features): evaluate_rank vs a per-query numpy loop,
re-ranking vs the numpy implementation it replaced (bench/re_ranking_numpy.py, commit a0b4112)
and the dense loop implementation (time, peak memory), query x gallery local distance.

    python bench/evaluation.py                 # Market-1501 scale, all three comparisons
    python bench/evaluation.py --msmt17 --dim 128
                                               # re-ranking from features at MSMT17 scale
    python bench/evaluation.py --parts re_rank --features clustered --dim 128
                                               # tight identity clusters (751 ids), 128-d
Every re-ranking runs in its own spawned child, one after the other. Peak memory: VmHWM from
/proc/self/status after the inputs are loaded and the high-water mark reset
(/proc/self/clear_refs), minus VmRSS at that moment; user and system CPU seconds and minor page
faults: resource.getrusage of the child; the torch implementation's stages (wall, user, system
seconds, page faults): aligned_reid.re_ranking.STAGES."""
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time

import numpy as np
import torch

from aligned_reid import cli
import aligned_reid.re_ranking as rr
import re_ranking_numpy
from aligned_reid.evaluation import compute_dist, evaluate_rank
from aligned_reid.loss import local_dist
from aligned_reid.re_ranking import re_ranking, re_ranking_features


# ----------------------------------------------------------------------------- synthetic data

def market_like(num_query=3368, num_gallery=15913, num_ids=750, num_cams=6,
                num_distractors=2793, dim=256, noise=1.25, seed=0):
    """Identity-clustered features with camera shifts: query/gallery features, ids, cameras.
    Every identity is seen by 2-6 cameras; distractors (id 0) are unrelated points."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_ids + 1, dim))
    cam_shift = 0.5 * rng.standard_normal((num_cams + 1, dim))
    id_cams = [rng.choice(np.arange(1, num_cams + 1), rng.integers(2, num_cams + 1),
                          replace=False) for _ in range(num_ids + 1)]

    def draw(n, distractors=0):
        ids = rng.integers(1, num_ids + 1, n)
        cams = np.array([rng.choice(id_cams[i]) for i in ids])
        f = centres[ids] + cam_shift[cams] + noise * rng.standard_normal((n, dim))
        if distractors:
            ids[:distractors] = 0
            cams[:distractors] = rng.integers(1, num_cams + 1, distractors)
            f[:distractors] = 1.3 * rng.standard_normal((distractors, dim))
        return f.astype(np.float32), ids, cams

    qf, q_ids, q_cams = draw(num_query)
    gf, g_ids, g_cams = draw(num_gallery, num_distractors)
    return qf, gf, q_ids, g_ids, q_cams, g_cams


def clustered_like(num_query=3368, num_gallery=15913, num_ids=751, num_cams=6, dim=128,
                   spread=0.6, seed=0):
    """Tight identity clusters (centres N(0, 1), images centre + spread * N(0, 1)), so that
    every k-reciprocal set is full and many expansions are accepted: the heavy case for
    re-ranking. Same return values as market_like."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_ids, dim))
    ids = rng.integers(0, num_ids, num_query + num_gallery)
    f = (centres[ids] + spread * rng.standard_normal((len(ids), dim))).astype(np.float32)
    cams = rng.integers(1, num_cams + 1, len(ids))
    ids = ids + 1
    return (f[:num_query], f[num_query:], ids[:num_query], ids[num_query:], cams[:num_query],
            cams[num_query:])


# ----------------------------------------------------------------------------- baselines

def loop_evaluate(distmat, q_ids, g_ids, q_cams, g_cams, max_rank=50, python_ap=True,
                  stable=False):
    """The per-query numpy loop most toolkits ship (Market-1501 protocol, standard AP).
    python_ap=True keeps their per-position Python precision step; False vectorises it.
    stable=True sorts stably (our documented tie order) instead of numpy's default sort."""
    indices = np.argsort(distmat, axis=1, kind='stable' if stable else None)
    matches = (g_ids[indices] == q_ids[:, None]).astype(np.int32)
    all_cmc, all_ap = [], []
    for i in range(len(q_ids)):
        order = indices[i]
        keep = ~((g_ids[order] == q_ids[i]) & (g_cams[order] == q_cams[i]))
        raw = matches[i][keep]
        if not raw.any():
            continue
        cmc = raw.cumsum()
        cmc[cmc > 1] = 1
        all_cmc.append(cmc[:max_rank])
        if python_ap:
            precision = np.asarray([x / (k + 1.) for k, x in enumerate(raw.cumsum())])
        else:
            precision = raw.cumsum() / np.arange(1., len(raw) + 1)
        all_ap.append((precision * raw).sum() / raw.sum())
    return np.asarray(all_cmc).astype(np.float64).mean(0), float(np.mean(all_ap))


def dense_re_ranking(q_g, q_q, g_g, k1=20, k2=6, lambda_value=0.3):
    """The published k-reciprocal re-ranking as public code runs it: dense (Q+G)^2 matrices,
    a full argsort, one Python loop per image, dense V and an inverted index."""
    Q = q_g.shape[0]
    D = np.concatenate([np.concatenate([q_q, q_g], 1), np.concatenate([q_g.T, g_g], 1)], 0)
    D = np.power(D, 2).astype(np.float32)
    D = np.transpose(1. * D / np.max(D, axis=0))
    N = D.shape[0]
    V = np.zeros_like(D)
    rank = np.argsort(D, axis=1).astype(np.int32)
    half = int(np.around(k1 / 2.))

    def recip(i, k):
        fwd = rank[i, :k + 1]
        back = rank[fwd, :k + 1]
        return fwd[np.where(back == i)[0]]

    for i in range(N):
        R = recip(i, k1)
        expanded = R
        for c in R:
            Hc = recip(c, half)
            if len(np.intersect1d(Hc, R)) > 2. / 3 * len(Hc):
                expanded = np.append(expanded, Hc)
        expanded = np.unique(expanded)
        w = np.exp(-D[i, expanded])
        V[i, expanded] = w / np.sum(w)
    D = D[:Q]
    if k2 != 1:
        V_qe = np.zeros_like(V)
        for i in range(N):
            V_qe[i] = np.mean(V[rank[i, :k2]], axis=0)
        V = V_qe
        del V_qe
    del rank
    inv = [np.where(V[:, j] != 0)[0] for j in range(N)]
    jac = np.zeros_like(D)
    for i in range(Q):
        tmin = np.zeros(N, dtype=np.float32)
        nz = np.where(V[i] != 0)[0]
        for j in nz:
            tmin[inv[j]] += np.minimum(V[i, j], V[inv[j], j])
        jac[i] = 1 - tmin / (2 - tmin)
    return (jac * (1 - lambda_value) + D * lambda_value)[:, Q:]


def per_cell_local_dist(x, y):
    """Numpy aligned local distance as the older reproduction computes it: stripe distances
    for all pairs, then a Python loop over the m x n cells, vectorised over pairs."""
    M, m, d = x.shape
    N, n, _ = y.shape
    a, b = x.reshape(M * m, d), y.reshape(N * n, d)
    d2 = (a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2. * a @ b.T
    dist = np.sqrt(np.maximum(d2, 0.))
    dist = (np.exp(dist) - 1.) / (np.exp(dist) + 1.)
    grid = dist.reshape(M, m, N, n).transpose(1, 3, 0, 2)       # [m, n, M, N]
    acc = np.zeros((m, n, M, N), dtype=dist.dtype)
    for i in range(m):
        for j in range(n):
            if i == 0 and j == 0:
                acc[i, j] = grid[i, j]
            elif i == 0:
                acc[i, j] = acc[i, j - 1] + grid[i, j]
            elif j == 0:
                acc[i, j] = acc[i - 1, j] + grid[i, j]
            else:
                acc[i, j] = np.minimum(acc[i - 1, j], acc[i, j - 1]) + grid[i, j]
    return acc[-1, -1]


# ----------------------------------------------------------------------------- measuring

def _status_kb(key):
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(key + ':'):
                return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status")


SAMPLE_ROWS = 97        # with keep_result=False, every SAMPLE_ROWS-th result row comes back


def _child(conn, job, paths, out_path, threads):
    torch.set_num_threads(threads or torch.get_num_threads())
    arrays = [np.load(p) for p in paths]
    rr.STAGES = {}
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')                                            # reset VmHWM to VmRSS
    base = _status_kb('VmRSS')
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    out = job(*arrays)
    seconds = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    peak = _status_kb('VmHWM') - base
    usage = {'user': r1.ru_utime - r0.ru_utime, 'sys': r1.ru_stime - r0.ru_stime,
             'minflt': r1.ru_minflt - r0.ru_minflt, 'stages': rr.STAGES,
             'load': os.getloadavg()[0]}
    if out_path is None:
        info = {'shape': out.shape, 'dtype': out.dtype.str, 'nbytes': out.nbytes,
                'sample': out[::SAMPLE_ROWS].copy()}
        conn.send((seconds, peak / 1024. ** 2, info, usage))
    else:
        np.save(out_path, out)
        conn.send((seconds, peak / 1024. ** 2, None, usage))
    conn.close()


def measured(job, paths, tmp, name, keep_result=True, threads=None):
    """Run job(*np.load(paths)) in a spawned child -> (seconds, peak GB above inputs, result);
    with keep_result=False the result is a dict of its shape, dtype, nbytes and every
    SAMPLE_ROWS-th row ('sample'). The child's CPU usage (user / sys seconds, minor page
    faults) and the torch re-ranking's stages (nothing for other jobs) are kept in LAST_USAGE.
    threads: torch CPU threads of the child (default: torch's choice)."""
    out_path = os.path.join(tmp, name + '.npy') if keep_result else None
    ctx = mp.get_context('spawn')          # a forked child can hang in torch's thread pool
    recv, send = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(send, job, paths, out_path, threads))
    p.start()
    seconds, peak, info, usage = recv.recv()
    LAST_USAGE.clear()
    LAST_USAGE.update(usage)
    p.join()
    if p.exitcode != 0:
        raise RuntimeError(f"{name}: child exited with {p.exitcode}")
    return seconds, peak, np.load(out_path) if keep_result else info


LAST_USAGE = {}


def usage_str():
    u = LAST_USAGE
    return (f"(user {u['user']:.1f} s, sys {u['sys']:.2f} s, {u['minflt'] / 1e3:.0f}k page faults; "
            f"1-min load {u['load']:.1f} at the end)")


def print_stages(indent='    '):
    """The stages of the last measured torch re-ranking: wall, user, system seconds, faults."""
    stages = LAST_USAGE.get('stages') or {}
    if not stages:
        return
    print(f"{indent}{'stage':18s} {'wall s':>7s} {'user s':>7s} {'sys s':>6s} {'faults':>8s}")
    for name, (wall, user, system, faults) in stages.items():
        print(f"{indent}{name:18s} {wall:7.2f} {user:7.2f} {system:6.2f} {faults / 1e3:7.0f}k")


def _rr_matrix(q_g, q_q, g_g):
    return re_ranking(q_g, q_q, g_g)


def _rr_features(qf, gf):
    return re_ranking_features(qf, gf)


def _numpy_matrix(q_g, q_q, g_g):
    return re_ranking_numpy.re_ranking(q_g, q_q, g_g)


def _numpy_features(qf, gf):
    return re_ranking_numpy.re_ranking_features(qf, gf)


def timed(fn, *a, **kw):
    t0 = time.perf_counter()
    out = fn(*a, **kw)
    return time.perf_counter() - t0, out


# ----------------------------------------------------------------------------- benches

def bench_rank(q_g, q_ids, g_ids, q_cams, g_cams):
    print("\n== evaluate_rank, Market-1501 scale %d x %d ==" % q_g.shape)
    t_loop, (cmc_loop, map_loop) = timed(loop_evaluate, q_g, q_ids, g_ids, q_cams, g_cams)
    t_vec, (cmc_vec, map_vec) = timed(loop_evaluate, q_g, q_ids, g_ids, q_cams, g_cams,
                                      python_ap=False, stable=True)
    t_ours, ours = timed(evaluate_rank, q_g, q_ids, g_ids, q_cams, g_cams)
    t_off, off = timed(evaluate_rank, q_g, q_ids, g_ids, q_cams, g_cams, ap_mode='market_official')
    print(f"per-query numpy loop (toolkit form)   : {t_loop:7.2f} s  Rank-1 {100 * cmc_loop[0]:.4f}"
          f"  mAP {100 * map_loop:.6f}")
    print(f"same loop, stable sort, vectorised AP : {t_vec:7.2f} s  Rank-1 {100 * cmc_vec[0]:.4f}"
          f"  mAP {100 * map_vec:.6f}")
    print(f"evaluate_rank                         : {t_ours:7.2f} s  Rank-1 {100 * ours['cmc'][0]:.4f}  mAP "
          f"{100 * ours['mAP']:.6f}  mINP {100 * ours['mINP']:.4f}  skipped {ours['num_skipped']}")
    print(f"  (market_official AP: {t_off:.2f} s, mAP {100 * off['mAP']:.6f})")
    print(f"speed-up {t_loop / t_ours:.1f}x (toolkit loop), {t_vec / t_ours:.1f}x (stable, "
          f"vectorised-AP loop)")
    print(f"vs stable loop: max |cmc diff| {np.abs(cmc_vec - ours['cmc']).max():.1e}, |mAP diff| "
          f"{abs(map_vec - ours['mAP']):.1e};  vs toolkit loop: max |cmc diff| "
          f"{np.abs(cmc_loop - ours['cmc']).max():.1e}, |mAP diff| {abs(map_loop - ours['mAP']):.1e}"
          f" (its unstable sort orders float32 ties arbitrarily)")


def bench_re_ranking(qf, gf, q_ids, g_ids, q_cams, g_cams, tmp, dense, threads=None):
    print(f"\n== re-ranking, {len(qf)} + {len(gf)} = {len(qf) + len(gf)} images, dim {qf.shape[1]}, "
          f"torch threads {threads or torch.get_num_threads()} ==")
    mats = [compute_dist(a, b) for a, b in ((qf, gf), (qf, qf), (gf, gf))]
    paths = []
    for name, m in zip(('q_g', 'q_q', 'g_g'), mats):
        paths.append(os.path.join(tmp, name + '_in.npy'))
        np.save(paths[-1], m)
    fpaths = [os.path.join(tmp, 'qf.npy'), os.path.join(tmp, 'gf.npy')]
    np.save(fpaths[0], qf)
    np.save(fpaths[1], gf)
    dim = qf.shape[1]

    def run(label, job, inputs, name, reference=None):
        t, peak, out = measured(job, inputs, tmp, name, threads=threads)
        res = evaluate_rank(out, q_ids, g_ids, q_cams, g_cams)
        diff = '' if reference is None else f"  max |diff| vs ours {np.abs(out - reference).max():.1e}"
        print(f"{label:34s}: {t:7.2f} s  peak above inputs {peak:5.2f} GB  Rank-1 "
              f"{100 * res['cmc'][0]:.4f}  mAP {100 * res['mAP']:.6f}{diff}  {usage_str()}")
        print_stages()
        return t, peak, out, res

    t_m, peak_m, rr_m, res_m = run("re_ranking (matrices)", _rr_matrix, paths, 'ours_matrix')
    t_f, peak_f, rr_f, _ = run(f"re_ranking_features (dim {dim})", _rr_features, fpaths,
                               'ours_features', rr_m)
    t_nm, peak_nm, _, _ = run("numpy a0b4112 re_ranking", _numpy_matrix, paths, 'numpy_matrix', rr_m)
    t_nf, peak_nf, _, _ = run(f"numpy a0b4112 features (dim {dim})", _numpy_features, fpaths,
                              'numpy_features', rr_f)
    print(f"vs the numpy implementation: matrices {t_nm / t_m:.2f}x as fast, memory "
          f"{peak_m:.2f} / {peak_nm:.2f} GB; features {t_nf / t_f:.2f}x as fast, memory "
          f"{peak_f:.2f} / {peak_nf:.2f} GB (the [Q, G] float32 result is "
          f"{rr_m.nbytes / 1024 ** 3:.2f} GB)")
    out = {'matrices': (t_m, peak_m), 'features': (t_f, peak_f),
           'numpy matrices': (t_nm, peak_nm), 'numpy features': (t_nf, peak_nf)}
    if dense:
        t_d, peak_d, rr_d, res_d = run("dense loop implementation", dense_re_ranking, paths,
                                       'dense', rr_m)
        print(f"speed-up {t_d / t_m:.1f}x (matrices), memory {peak_d / max(peak_m, 1e-9):.1f}x less;"
              f" |mAP diff| {abs(res_d['mAP'] - res_m['mAP']):.1e}")
        out['dense'] = (t_d, peak_d)
    return out


def bench_local(num_query, num_gallery, stripes=8, dim=128, seed=0):
    print(f"\n== query x gallery local distance, {stripes} x {dim} stripes ==")
    rng = np.random.default_rng(seed)
    x = rng.random((num_query, stripes, dim)).astype(np.float32)
    y = rng.random((num_gallery, stripes, dim)).astype(np.float32)
    t_loop, ref = timed(per_cell_local_dist, x, y)
    pairs = num_query * num_gallery
    print(f"{num_query} x {num_gallery} pairs: per-cell numpy loop {t_loop:.2f} s "
          f"(Market-1501 3368 x 15913 extrapolated: ~{t_loop / pairs * 3368 * 15913:.0f} s)")
    threads = torch.get_num_threads()
    for n in sorted({threads, 1}, reverse=True):
        torch.set_num_threads(n)
        with torch.no_grad():
            t_ours, ours = timed(local_dist, torch.from_numpy(x), torch.from_numpy(y))
        print(f"  loss.local_dist, {n} torch thread(s): {t_ours:.2f} s, speed-up "
              f"{t_loop / t_ours:.1f}x, max |diff| {np.abs(ours.numpy() - ref).max():.1e} "
              f"(Market-1501 extrapolated: ~{t_ours / pairs * 3368 * 15913:.0f} s)")
    torch.set_num_threads(threads)


def bench_msmt17(dim, tmp, threads=None):
    print(f"\n== re_ranking_features at MSMT17 scale: 11659 x 82161, dim {dim}, torch threads "
          f"{threads or torch.get_num_threads()} ==")
    qf, gf, q_ids, g_ids, q_cams, g_cams = market_like(11659, 82161, num_ids=3060, num_cams=15,
                                                       num_distractors=0, dim=dim, seed=1)
    fpaths = [os.path.join(tmp, 'mqf.npy'), os.path.join(tmp, 'mgf.npy')]
    np.save(fpaths[0], qf)
    np.save(fpaths[1], gf)
    del qf, gf
    sampled = slice(None, None, SAMPLE_ROWS)

    def quality(sample):
        res = evaluate_rank(sample, q_ids[sampled], g_ids, q_cams[sampled], g_cams)
        return f"Rank-1 {100 * res['cmc'][0]:.4f}  mAP {100 * res['mAP']:.6f}"

    t, peak, info = measured(_rr_features, fpaths, tmp, 'msmt', keep_result=False,
                             threads=threads)
    nbytes = info['nbytes'] / 1024 ** 3
    print(f"re_ranking_features          : {t:6.1f} s, peak above inputs {peak:.2f} GB = the "
          f"{info['shape']} {info['dtype']} output ({nbytes:.2f} GB) + {peak - nbytes:.2f} GB  "
          f"{usage_str()}")
    print_stages()
    t_n, peak_n, info_n = measured(_numpy_features, fpaths, tmp, 'msmt_numpy', keep_result=False,
                                   threads=threads)
    print(f"numpy a0b4112 (the baseline) : {t_n:6.1f} s, peak above inputs {peak_n:.2f} GB = "
          f"output + {peak_n - nbytes:.2f} GB  {usage_str()}")
    print(f"torch vs numpy: {t_n / t:.2f}x as fast, {peak:.2f} / {peak_n:.2f} GB; a dense "
          f"(Q+G)^2 float32 matrix would be {(11659 + 82161) ** 2 * 4 / 1024 ** 3:.0f} GB")
    diff = np.abs(info['sample'] - info_n['sample'])
    print(f"every {SAMPLE_ROWS}th query row ({len(diff)}): max |diff| {diff.max():.1e}, cells over "
          f"1e-5 {(diff > 1e-5).mean():.1e}, rows with one {(diff > 1e-5).any(1).sum()}; torch "
          f"{quality(info['sample'])}, numpy {quality(info_n['sample'])} (the features' distances "
          f"are rounded differently: neighbours within float32 rounding of each other may swap)")


def build_parser():
    p = cli.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--dim', type=int, default=256, help='synthetic feature size (default 256)')
    p.add_argument('--skip_dense', action='store_true',
                   help='skip the dense re-ranking baseline (needs ~6-9 GB; default: run it)')
    p.add_argument('--local_pairs', type=int, nargs=2, default=(500, 1000),
                   help='query and gallery count for the local distance timing (default 500 1000)')
    p.add_argument('--parts', nargs='+', default=['rank', 're_rank', 'local'],
                   choices=['rank', 're_rank', 'local'],
                   help='which Market-1501-scale comparisons to run (default: all three)')
    p.add_argument('--features', choices=('market_like', 'clustered'), default='market_like',
                   help='synthetic features: market_like (750 ids, camera shifts, distractors) or '
                        'clustered (751 tight identity clusters). Default: market_like')
    p.add_argument('--threads', type=int, default=None,
                   help="torch CPU threads of the re-ranking runs. Default: torch's choice")
    p.add_argument('--msmt17', action='store_true',
                   help='only run re-ranking from features at MSMT17 scale (default: off)')
    return p


def main(args):
    sys.stdout.reconfigure(line_buffering=True)
    print(f"torch threads {torch.get_num_threads()}, cpus {os.cpu_count()}, 1-min load "
          f"{os.getloadavg()[0]:.1f} (timings vary with the load: with more runnable threads "
          f"than cores every parallel region can wait for a descheduled thread)")
    with tempfile.TemporaryDirectory() as tmp:
        if args.msmt17:
            bench_msmt17(args.dim, tmp, args.threads)
            return
        make = market_like if args.features == 'market_like' else clustered_like
        qf, gf, q_ids, g_ids, q_cams, g_cams = make(dim=args.dim)
        if 'rank' in args.parts:
            bench_rank(compute_dist(qf, gf), q_ids, g_ids, q_cams, g_cams)
        if 're_rank' in args.parts:
            bench_re_ranking(qf, gf, q_ids, g_ids, q_cams, g_cams, tmp, not args.skip_dense,
                             args.threads)
        if 'local' in args.parts:
            bench_local(*args.local_pairs)


if __name__ == '__main__':
    main(build_parser().parse_args())
