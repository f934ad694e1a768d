"""Fixtures and helpers shared by the test files (pytest puts tests/ on sys.path, so plain helpers are
imported with `from conftest import ...`)."""
import itertools
import math

import numpy as np
import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """Runs a module's tests with one torch thread, restoring the count afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- brute-force distances

def brute_shortest_path(grid):
    """Minimum over every right/down path of the cell sum, by enumeration ([m, n] -> float)."""
    m, n = grid.shape
    best = math.inf
    for downs in itertools.combinations(range(m + n - 2), m - 1):
        i = j = 0
        total = grid[0, 0].item()
        for step in range(m + n - 2):
            if step in downs:
                i += 1
            else:
                j += 1
            total += grid[i, j].item()
        best = min(best, total)
    return best


def brute_local_dist(a, b, aligned=True):
    """Local distance of one pair of stripe sets a [m, d], b [n, d] (tensors or arrays) by plain loops in
    float64: stripe distances d mapped by (e^d - 1) / (e^d + 1), then the cheapest right/down path through
    them (aligned) or the sum of the diagonal (not aligned)."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    m, n = a.shape[0], b.shape[0]
    grid = torch.empty(m, n, dtype=torch.float64)
    for i in range(m):
        for j in range(n):
            d = (a[i] - b[j]).pow(2).sum().sqrt().item()
            grid[i, j] = (math.exp(d) - 1) / (math.exp(d) + 1)
    if not aligned:
        return sum(grid[i, i].item() for i in range(m))
    return brute_shortest_path(grid)


def brute_global_dist(q, g, normalize=False):
    """Euclidean distances of arrays q [Q, d] and g [G, d] in float64 -> [Q, G]; rows made unit length
    first when `normalize`."""
    if normalize:
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        g = g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
    return np.sqrt(((q[:, None, :].astype(np.float64) - g[None]) ** 2).sum(-1))


def brute_dist(q, g, distance):
    """Query x gallery distances [Q, G] of feature dicts ('global' [N, d], 'local' [N, m, d]) for
    distance 'global', 'local' or 'global_local' (their sum)."""
    out = 0.
    if distance in ('global', 'global_local'):
        out = out + brute_global_dist(q['global'], g['global'])
    if distance in ('local', 'global_local'):
        out = out + np.array([[brute_local_dist(a, b) for b in g['local']] for a in q['local']])
    return out
