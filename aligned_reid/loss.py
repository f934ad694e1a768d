"""Distances and losses of AlignedReID (Zhang et al., arXiv 1711.08184): pairwise and
shortest-path local distances, batch-hard mining, triplet / ID / mutual-learning losses."""
import torch
import torch.nn.functional as F

# Element count (pairs x m x n) of one block of stripe distances in `local_dist`: about 8 MB
# of float32, small enough to stay in cache while the shortest-path sweep runs over it.
_BLOCK_ELEMENTS = 1 << 21


def normalize(x, dim=-1, eps=1e-12):
    """L2-normalise `x` along `dim` (any shape). Zero vectors stay zero."""
    return x / x.norm(p=2, dim=dim, keepdim=True).clamp_min(eps)


def euclidean_dist(x, y):
    """Euclidean distances between the rows of x [M, d] and y [N, d] -> [M, N].

    Uses |x|^2 + |y|^2 - 2 x.y, clamped at 1e-12 before the square root so that the gradient
    stays finite for identical vectors."""
    if x.dim() != 2 or y.dim() != 2 or x.size(1) != y.size(1):
        raise ValueError(f"euclidean_dist expects x [M, d] and y [N, d], got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    xx = x.pow(2).sum(1, keepdim=True)          # [M, 1]
    yy = y.pow(2).sum(1, keepdim=True).t()      # [1, N]
    d2 = torch.addmm(xx + yy, x, y.t(), alpha=-2.)  # [M, N]
    return d2.clamp_min(1e-12).sqrt()


def _stripe_map(d2):
    """Squared stripe distances -> (e^d - 1) / (e^d + 1) of the distance d.

    (e^d - 1) / (e^d + 1) equals tanh(d / 2); tanh does not overflow for large d."""
    return torch.tanh(d2.clamp_min(1e-12).sqrt() * 0.5)


def _shortest_path_cells_first(dist):
    """Shortest monotone path sum for dist [m, n, P] (cells first, P paths last) -> [P].

    The dynamic programme D[i, j] = dist[i, j] + min(D[i-1, j], D[i, j-1]) is swept along the
    m + n - 1 anti-diagonals i + j = k; every cell of a diagonal, for all P paths at once, is one
    tensor operation. The cells of diagonal k sit at flat indices k + i (n - 1) of the [m * n, P]
    view, so each diagonal is a strided slice (no gather). Out-of-place, hence differentiable."""
    m, n = dist.shape[:2]
    if m == 1 or n == 1:
        return dist.reshape(m * n, -1).sum(0)
    flat = dist.reshape(m * n, -1)                  # [m * n, P]
    step = n - 1
    prev = flat[0:1]                                # diagonal 0: cell (0, 0)
    prev_lo, prev_hi = 0, 0                         # row range of the previous diagonal
    for k in range(1, m + n - 1):
        lo, hi = max(0, k - n + 1), min(k, m - 1)
        start = k + lo * step
        cells = flat[start:start + (hi - lo) * step + 1:step]   # [hi - lo + 1, P]
        # Rows i in [a, b] have both predecessors: up (i-1, j) and left (i, j-1).
        a, b = max(lo, prev_lo + 1), min(hi, prev_hi)
        up = prev[a - 1 - prev_lo:b - prev_lo]
        left = prev[a - prev_lo:b + 1 - prev_lo]
        parts = []
        if lo < a:      # cell (0, k): reached only from the left
            parts.append(cells[:1] + prev[:1])
        parts.append(cells[a - lo:b + 1 - lo] + torch.minimum(up, left))
        if hi > b:      # cell (k, 0): reached only from above
            parts.append(cells[-1:] + prev[-1:])
        prev = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
        prev_lo, prev_hi = lo, hi
    return prev[0]


def shortest_path(dist):
    """Shortest path through a distance grid, as in AlignedReID's aligned local distance.

    dist [..., m, n] -> [...]: the minimum, over all paths from cell (0, 0) to (m-1, n-1)
    that step right or down, of the sum of the cells visited. Exact, differentiable, on any
    device; vectorised over the leading dims and along anti-diagonals."""
    if dist.dim() < 2:
        raise ValueError(f"shortest_path expects dist [..., m, n], got {tuple(dist.shape)}")
    lead = dist.shape[:-2]
    m, n = dist.shape[-2:]
    cells_first = dist.reshape(-1, m, n).permute(1, 2, 0).contiguous()   # [m, n, P]
    return _shortest_path_cells_first(cells_first).reshape(lead)


def _check_stripes(x, y, aligned, name):
    if x.dim() != 3 or y.dim() != 3 or x.size(-1) != y.size(-1):
        raise ValueError(f"{name} expects x [*, m, d] and y [*, n, d], got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    if not aligned and x.size(1) != y.size(1):
        raise ValueError(f"{name}(aligned=False) sums the diagonal and needs the same number of "
                         f"stripes, got m={x.size(1)} and n={y.size(1)}")


def local_dist(x, y, block_size=None, aligned=True):
    """Local distance between every pair of x [M, m, d] and y [N, n, d] -> [M, N].

    Stripe-to-stripe Euclidean distances d [m, n] are mapped by (e^d - 1) / (e^d + 1); the
    aligned distance is the shortest right/down path through that grid (`shortest_path`),
    the unaligned one (aligned=False, needs m == n) the sum of its diagonal. Rows of x are
    processed `block_size` at a time (default: about 2M grid cells per block), so memory
    stays bounded for query x gallery matrices. Differentiable."""
    _check_stripes(x, y, aligned, "local_dist")
    M, m, _ = x.shape
    N, n, _ = y.shape
    if block_size is None:
        block_size = max(1, _BLOCK_ELEMENTS // max(1, N * m * n))
    if block_size < 1:
        raise ValueError(f"local_dist: block_size must be >= 1, got {block_size}")
    ys = y.transpose(0, 1)                           # [n, N, d]
    yy = ys.pow(2).sum(-1)                           # [n, N]
    out = []
    for start in range(0, M, block_size):
        xs = x[start:start + block_size].transpose(0, 1)   # [m, B, d]
        xx = xs.pow(2).sum(-1)                       # [m, B]
        if aligned:
            # Cells-first layout [m, n, B, N]: every grid cell is a contiguous B x N block.
            prod = torch.matmul(xs.unsqueeze(1), ys.transpose(1, 2).unsqueeze(0))
            d2 = xx[:, None, :, None] + yy[None, :, None, :] - 2. * prod
            grid = _stripe_map(d2)
            out.append(_shortest_path_cells_first(grid).reshape(xs.size(1), N))
        else:
            prod = torch.matmul(xs, ys.transpose(1, 2))     # [m, B, N]
            d2 = xx[:, :, None] + yy[:, None, :] - 2. * prod
            out.append(_stripe_map(d2).sum(0))
    if not out:
        return x.new_zeros(0, N)
    return torch.cat(out, 0)


def batch_local_dist(x, y, aligned=True):
    """Local distance between paired rows of x [N, m, d] and y [N, n, d] -> [N].

    Same distance as `local_dist` (element map, then shortest path or diagonal sum), for
    the N pairs (x[i], y[i]) only, as the triplet loss needs during training."""
    _check_stripes(x, y, aligned, "batch_local_dist")
    if x.size(0) != y.size(0):
        raise ValueError(f"batch_local_dist needs as many rows in x as in y, got "
                         f"{x.size(0)} and {y.size(0)}")
    if not aligned:
        return _stripe_map((x - y).pow(2).sum(-1)).sum(-1)
    xx = x.pow(2).sum(-1)                            # [N, m]
    yy = y.pow(2).sum(-1)                            # [N, n]
    d2 = xx[:, :, None] + yy[:, None, :] - 2. * torch.bmm(x, y.transpose(1, 2))  # [N, m, n]
    grid = _stripe_map(d2).permute(1, 2, 0).contiguous()                        # [m, n, N]
    return _shortest_path_cells_first(grid)
