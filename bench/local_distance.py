"""Benchmark: query x gallery aligned local distance, our blocked anti-diagonal `local_dist`
against the straightforward per-cell dynamic programme, in the same process.

On a CPU crowded by other jobs, intra-op threads spend their time waiting for each other;
`--threads 1` then gives the steadier comparison. Example: python bench/local_distance.py"""
import time

import torch

from aligned_reid import cli
from aligned_reid.loss import local_dist


def per_cell_baseline(x, y):
    """x [M, m, d], y [N, n, d] -> [M, N]: one dense stripe-distance matrix, then a Python loop
    over the m x n cells of the dynamic programme, each cell vectorised over all M x N pairs."""
    M, m, d = x.shape
    N, n, _ = y.shape
    a, b = x.reshape(M * m, d), y.reshape(N * n, d)
    d2 = (a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1)[None] - 2. * a @ b.t())
    dist = d2.clamp_min(1e-12).sqrt()
    dist = (torch.exp(dist) - 1.) / (torch.exp(dist) + 1.)
    # [M, m, N, n] -> [m, n, M, N] so that every cell is one contiguous M x N matrix.
    grid = dist.reshape(M, m, N, n).permute(1, 3, 0, 2).contiguous()
    acc = [[None] * n for _ in range(m)]
    for i in range(m):
        for j in range(n):
            if i == 0 and j == 0:
                acc[i][j] = grid[0, 0]
            elif i == 0:
                acc[i][j] = acc[i][j - 1] + grid[i, j]
            elif j == 0:
                acc[i][j] = acc[i - 1][j] + grid[i, j]
            else:
                acc[i][j] = torch.minimum(acc[i - 1][j], acc[i][j - 1]) + grid[i, j]
    return acc[-1][-1]


def best_time(fn, repeats):
    """Best wall-clock and best process CPU time over `repeats` runs, and the last result.
    CPU time is the steadier figure on a machine shared with other jobs."""
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return min(wall), min(cpu), out


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.num_query, args.stripes, args.dim)
    y = torch.randn(args.num_gallery, args.stripes, args.dim)
    with torch.no_grad():
        w_base, c_base, base = best_time(lambda: per_cell_baseline(x, y), args.repeats)
        w_ours, c_ours, ours = best_time(lambda: local_dist(x, y, block_size=args.block_size),
                                         args.repeats)
    print(f"{args.num_query} x {args.num_gallery} pairs of {args.stripes} x {args.dim} stripes, "
          f"{torch.get_num_threads()} threads, best of {args.repeats}")
    print("                    wall s   CPU s")
    print(f"per-cell baseline : {w_base:7.3f} {c_base:7.3f}")
    print(f"local_dist (ours) : {w_ours:7.3f} {c_ours:7.3f}")
    print(f"speed-up          : {w_base / w_ours:6.2f}x {c_base / c_ours:6.2f}x")
    print(f"max |ours - base| : {(ours - base).abs().max().item():.2e} "
          f"(distances up to {base.max().item():.1f})")
    # Both against the baseline run in float64 on the first queries: which one is closer.
    k = min(50, args.num_query)
    with torch.no_grad():
        ref = per_cell_baseline(x[:k].double(), y.double())
    print(f"max error vs float64, first {k} queries: ours {(ours[:k] - ref).abs().max().item():.2e}"
          f", baseline {(base[:k] - ref).abs().max().item():.2e}")


def build_parser():
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--num_query", type=int, default=1000, help="query images (default 1000)")
    p.add_argument("--num_gallery", type=int, default=1000, help="gallery images (default 1000)")
    p.add_argument("--stripes", type=int, default=8, help="stripes per image (default 8)")
    p.add_argument("--dim", type=int, default=128, help="stripe feature size (default 128)")
    p.add_argument("--block_size", type=int, default=None,
                   help="query rows per block (default: local_dist's automatic choice)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads, 0 keeps torch's default (default 0)")
    p.add_argument("--repeats", type=int, default=3, help="runs per method, best kept (default 3)")
    return p


if __name__ == "__main__":
    main(build_parser().parse_args())
