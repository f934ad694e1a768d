"""Distances of AlignedReID (Zhang et al., arXiv 1711.08184) in one place: Euclidean, the aligned
local distance with its shortest path, blocked query x gallery / paired distances, and the exact
top-k search of a gallery in bounded memory."""
import numpy as np
import torch

DISTANCES = ('global', 'local', 'global_local')
METRICS = ('euclidean', 'cosine')
_ROW_BLOCK_ELEMENTS = 1 << 22     # ~4M matrix cells per row block of compute_dist

# Default grid cells (pairs x m x n) per block of `local_dist`: 32 MB of float32, the one
# large buffer a block needs (the map and, without autograd, the path sweep reuse the matmul
# output). Large enough that per-operation overheads vanish even on a crowded CPU.
_LOCAL_BLOCK_ELEMENTS = 1 << 23


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


def _sigmoid_of_dist(d2, inplace=False):
    """Squared stripe distances d^2 -> sigmoid(d), clamped at 1e-12 before the square root.

    The element map of the paper, (e^d - 1) / (e^d + 1) = tanh(d / 2), equals 2 sigmoid(d) - 1.
    Every monotone path through an m x n grid visits m + n - 1 cells, so the path sum of the
    map is 2 (path sum of sigmoid(d)) - (m + n - 1), and the same path is shortest for both:
    the callers run on sigmoid(d) and apply the affine map to the sums, which saves two full
    passes over the grid (and sigmoid is several times cheaper than tanh on CPUs)."""
    if inplace:
        return d2.clamp_min_(1e-12).sqrt_().sigmoid_()
    return torch.sigmoid(d2.clamp_min(1e-12).sqrt())


def _shortest_path_cells_first(dist, schedule=None):
    """Shortest monotone path sum for dist [m, n, *P] (grid first, path dims after) -> [*P].

    One dynamic programme, D[i, j] = dist[i, j] + min(D[i-1, j], D[i, j-1]), in two schedules
    that give the same sums (up to float rounding) and are differentiable: 'diagonals' sweeps
    the m + n - 1 anti-diagonals with element-wise operations (the fastest on a CPU, whose scans
    are scalar loops), 'rows' takes the m - 1 row steps with one prefix minimum each (`cummin`,
    a single kernel on a GPU: about a fifth of the kernels of the diagonal sweep, forward and
    backward together, which is what a training step of small grids pays for). `schedule`
    None picks 'rows' on CUDA and 'diagonals' elsewhere."""
    if schedule is None:
        schedule = "rows" if dist.is_cuda else "diagonals"
    if schedule == "diagonals":
        return _sweep_diagonals(dist)
    if schedule == "rows":
        return _sweep_rows(dist)
    raise ValueError(f"shortest path schedule must be 'rows' or 'diagonals', got {schedule!r}")


def _sweep_rows(dist):
    """The row schedule of `_shortest_path_cells_first`. A path enters row i from above at some
    column l and then moves right, so with S_i the prefix sums of row i,
    D[i, j] = S_i[j] + min_{l <= j} (D[i-1, l] - S_i[l-1]) = S_i[j] + cummin(D_{i-1} + dist_i - S_i)[j]."""
    S = dist.cumsum(1)                                  # [m, n, *P]
    A = dist - S                                        # -S_i[l-1]
    row = S[0]
    for i in range(1, dist.shape[0]):
        row = S[i] + (A[i] + row).cummin(0).values      # [n, *P]
    return row[-1]


def _sweep_diagonals(dist):
    """The anti-diagonal schedule of `_shortest_path_cells_first`.

    The dynamic programme D[i, j] = dist[i, j] + min(D[i-1, j], D[i, j-1]) is swept along the
    m + n - 1 anti-diagonals i + j = k; every cell of a diagonal, for all paths at once, is one
    tensor operation. Whatever the strides of `dist`, the cells (i, k - i) of a diagonal are
    equally spaced in memory (step stride_i - stride_j), so each diagonal is a strided view,
    not a gather or a copy. Out-of-place, hence differentiable."""
    m, n = dist.shape[:2]
    if m == 1 or n == 1:
        return dist.sum(dim=(0, 1))
    s_i, s_j = dist.stride(0), dist.stride(1)
    tail_size, tail_stride = list(dist.shape[2:]), list(dist.stride()[2:])
    offset = dist.storage_offset()

    def diagonal(k, lo, hi):            # cells (lo, k - lo) ... (hi, k - hi): [hi - lo + 1, *P]
        return dist.as_strided([hi - lo + 1] + tail_size, [s_i - s_j] + tail_stride,
                               offset + lo * s_i + (k - lo) * s_j)

    prev = dist[0:1, 0]                             # diagonal 0: cell (0, 0)
    prev_lo, prev_hi = 0, 0                         # row range of the previous diagonal
    for k in range(1, m + n - 1):
        lo, hi = max(0, k - n + 1), min(k, m - 1)
        cells = diagonal(k, lo, hi)
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
    processed `block_size` at a time (default: about 8M grid cells per block), so memory
    stays bounded for query x gallery matrices. Half-precision inputs are computed in float32.
    Differentiable."""
    _check_stripes(x, y, aligned, "local_dist")
    if x.dtype in (torch.float16, torch.bfloat16) or y.dtype in (torch.float16, torch.bfloat16):
        x, y = x.float(), y.float()
    M, m, _ = x.shape
    N, n, _ = y.shape
    if block_size is None:
        block_size = max(1, _LOCAL_BLOCK_ELEMENTS // max(1, N * m * n))
    if block_size < 1:
        raise ValueError(f"local_dist: block_size must be >= 1, got {block_size}")
    need_grad = torch.is_grad_enabled() and (x.requires_grad or y.requires_grad)
    # One matmul gives d^2 = |x|^2 + |y|^2 - 2 x.y for every stripe pair, with the norms
    # folded in as two extra columns: [x, |x|^2, 1] . [-2 y, 1, |y|^2].
    y_aug = torch.cat([-2. * y, y.new_ones(N, n, 1), y.pow(2).sum(-1, keepdim=True)], -1)
    y_aug = y_aug.transpose(0, 1).reshape(n * N, -1)  # [n * N, d + 2]
    out = []
    for start in range(0, M, block_size):
        xb = x[start:start + block_size]              # [B, m, d]
        B = xb.size(0)
        x_aug = torch.cat([xb, xb.pow(2).sum(-1, keepdim=True), xb.new_ones(B, m, 1)], -1)
        if aligned:
            grid = x_aug.transpose(0, 1).reshape(m * B, -1) @ y_aug.t()        # [m * B, n * N]
        else:
            x_aug = x_aug.transpose(0, 1)                                       # [m, B, d + 2]
            grid = torch.bmm(x_aug, y_aug.view(n, N, -1).transpose(1, 2))      # [m, B, N]
        grid = _sigmoid_of_dist(grid, inplace=not need_grad)
        if aligned:
            # [m, n, B, N] view of the [m, B, n, N] matrix: each grid cell is B rows of N
            # contiguous pairs, and the shortest-path sweep reads the diagonals in place.
            grid = grid.view(m, B, n, N).transpose(1, 2)
            out.append(2. * _shortest_path_cells_first(grid) - (m + n - 1))
        else:
            out.append(2. * grid.sum(0) - m)
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
    m, n = x.size(1), y.size(1)
    if not aligned:
        return 2. * _sigmoid_of_dist((x - y).pow(2).sum(-1)).sum(-1) - m
    xx = x.pow(2).sum(-1)                            # [N, m]
    yy = y.pow(2).sum(-1)                            # [N, n]
    d2 = xx[:, :, None] + yy[:, None, :] - 2. * torch.bmm(x, y.transpose(1, 2))  # [N, m, n]
    grid = _sigmoid_of_dist(d2).permute(1, 2, 0)                                # [m, n, N]
    return 2. * _shortest_path_cells_first(grid) - (m + n - 1)


# ----------------------------------------------------------------------------- query x gallery

def _as_tensor(x, device=None):
    t = torch.as_tensor(x)
    if device is not None:
        t = t.to(device)
    return t if t.is_floating_point() else t.float()


def _get(feats, key, distance):
    if isinstance(feats, dict):
        if key not in feats:
            raise ValueError(f"distance {distance!r} needs {key!r} features; the dict has "
                             f"{sorted(feats)}")
        return feats[key]
    return feats


def _normalize(x):
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _check_distance(distance, metric):
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if metric == 'cosine' and distance != 'global':
        raise ValueError(f"metric='cosine' applies to the global distance only, got "
                         f"distance={distance!r}")


# The expanded form |x|^2 + |y|^2 - 2 x.y of a squared distance loses the digits that x and y share: its
# rounding error is a few float32 ulps of |x|^2 + |y|^2 (two identical features of norm 34 came out
# 0.0135 apart). Entries below this share of |x|^2 + |y|^2 are recomputed as |x - y|^2.
_CANCELLATION = 2. ** -18


def exact_near(d2, xx, yy, pair_sq, mins=None, width=0):
    """d2 [B, N] squared distances in the expanded form (xx [B], yy [N]: the squared norms of the
    features of its rows and columns), with the entries that lie within its rounding error,
    d2 <= _CANCELLATION (xx + yy) (near-duplicates, where it is wrong by more than the distance
    itself), recomputed as pair_sq(i, j) = |x_i - y_j|^2 (i, j: int64 [P] rows and columns of d2):
    identical features get exactly 0. Such entries are rare: a comparison against a per-row bound
    finds the candidates, and only they are looked at again.
    mins [B, c] (optional): the minima of d2's first c chunks of `width` columns, for a caller
    that has them anyway; then only the chunks whose minimum lies under the bound and the columns
    after the chunks are looked at, and the minima of the chunks changed are brought up to date."""
    if not len(yy) or not len(xx):
        return d2
    bound = (xx + yy.max()).mul_(_CANCELLATION)                 # [B]: no [B, N] temporary
    head = 0 if mins is None else mins.shape[1] * width         # columns covered by mins
    i, j = (d2[:, head:] <= bound[:, None]).nonzero(as_tuple=True)
    j = j + head
    if head:
        r, k = (mins <= bound[:, None]).nonzero(as_tuple=True)
        rows = r.repeat_interleave(width)
        cols = (k[:, None] * width + torch.arange(width, device=d2.device)).view(-1)
        hit = d2[rows, cols] <= bound.index_select(0, rows)
        i, j = torch.cat([rows[hit], i]), torch.cat([cols[hit], j])
    near = d2[i, j] <= _CANCELLATION * (xx[i] + yy[j])
    i, j = i[near], j[near]
    if len(i):
        d2[i, j] = pair_sq(i, j).to(d2.dtype)
        if head:
            in_chunk = j < head
            r, k = i[in_chunk], torch.div(j[in_chunk], width, rounding_mode='floor')
            mins[r, k] = d2[:, :head].view(len(d2), -1, width)[r, k].amin(1)
    return d2


def exact_near_pairs(d2, sq, pair_sq):
    """The same for P explicit pairs: d2 [P] in the expanded form, sq [P] = |x|^2 + |y|^2 of each
    pair; the entries within the rounding error are recomputed as pair_sq(p) (p: int64 [M])."""
    near = (d2 <= _CANCELLATION * sq).nonzero().flatten()
    if len(near):
        d2[near] = pair_sq(near).to(d2.dtype)
    return d2


def sq_euclidean_factors(x, y):
    """x [M, C], y [N, C] -> a [M, C + 2], b [N, C + 2] with a @ b.T = |x|^2 + |y|^2 - 2 x.y, the
    squared Euclidean distances before their clamp at 0 ([x, |x|^2, 1] . [-2 y, 1, |y|^2]): a
    caller sweeping row blocks does one matmul per block into a reused buffer and nothing
    else, no pass over the block to add the norms and no norms recomputed per block."""
    a = torch.cat([x, (x * x).sum(1, keepdim=True), x.new_ones(len(x), 1)], 1)
    b = torch.cat([-2. * y, y.new_ones(len(y), 1), (y * y).sum(1, keepdim=True)], 1)
    return a, b


def _global_block(x, y, normalize, metric, out=None):
    """x [B, C], y [N, C] (tensors) -> [B, N], written into `out` [B, N] when given (float32, on x's
    device): a caller that reuses one buffer for every block allocates nothing of that size."""
    if normalize or metric == 'cosine':
        x, y = _normalize(x), _normalize(y)
    d2 = torch.matmul(x, y.t(), out=out)
    if metric == 'cosine':
        return d2.neg_().add_(1.)
    # in place: fresh [B, N] temporaries for every block of a large matrix cost page faults
    xx, yy = (x * x).sum(1), (y * y).sum(1)
    d2.mul_(-2.).add_(xx[:, None]).add_(yy[None])
    exact_near(d2, xx, yy, lambda i, j: (x[i] - y[j]).pow(2).sum(1))
    return d2.clamp_min_(0.).sqrt_()


def compute_dist(q_feats, g_feats, distance='global', normalize=False, metric='euclidean',
                 device=None, block_size=None):
    """Query x gallery distance matrix -> np.float32 [Q, G].

    q_feats, g_feats: dicts with 'global' [N, C] and/or 'local' [N, h, c] (numpy or torch),
    or the feature array itself.
    distance: 'global' (Euclidean between global features, on raw features or, with
    normalize=True, L2-normalised ones; metric='cosine' gives 1 - cosine similarity),
    'local' (AlignedReID aligned local distance, local_dist; normalize=True
    L2-normalises each stripe first), or 'global_local' (their sum).
    Rows are computed `block_size` queries at a time on `device` (default: the features')."""
    _check_distance(distance, metric)
    out = None
    if distance in ('global', 'global_local'):
        x = _as_tensor(_get(q_feats, 'global', distance), device)
        y = _as_tensor(_get(g_feats, 'global', distance), device)
        bs = block_size or max(1, _ROW_BLOCK_ELEMENTS // max(1, y.shape[0]))
        out = np.empty((x.shape[0], y.shape[0]), dtype=np.float32)
        for s in range(0, x.shape[0], bs):
            out[s:s + bs] = _global_block(x[s:s + bs], y, normalize, metric).float().cpu().numpy()
    if distance in ('local', 'global_local'):
        x = _as_tensor(_get(q_feats, 'local', distance), device)
        y = _as_tensor(_get(g_feats, 'local', distance), device)
        if normalize:
            x, y = _normalize(x), _normalize(y)
        with torch.no_grad():
            loc = local_dist(x, y, aligned=True).float().cpu().numpy()
        out = loc if out is None else out + loc
    return out


def pair_dist(x_feats, y_feats, distance='global', normalize=False, metric='euclidean'):
    """Distances between paired rows: x_feats[i] vs y_feats[i] -> torch.float32 [P].

    The same definitions and formulas as compute_dist (near-duplicates recomputed as |x - y|^2 alike), for
    P explicit pairs."""
    _check_distance(distance, metric)
    out = None
    if distance in ('global', 'global_local'):
        x = _as_tensor(_get(x_feats, 'global', distance))
        y = _as_tensor(_get(y_feats, 'global', distance)).to(x.device)
        if normalize or metric == 'cosine':
            x, y = _normalize(x), _normalize(y)
        if metric == 'cosine':
            out = 1. - (x * y).sum(1)
        else:
            xx, yy = (x * x).sum(1), (y * y).sum(1)
            d2 = xx + yy - 2. * (x * y).sum(1)
            exact_near_pairs(d2, xx + yy, lambda p: (x[p] - y[p]).pow(2).sum(1))
            out = d2.clamp_min(0.).sqrt()
    if distance in ('local', 'global_local'):
        x = _as_tensor(_get(x_feats, 'local', distance))
        y = _as_tensor(_get(y_feats, 'local', distance)).to(x.device)
        if normalize:
            x, y = _normalize(x), _normalize(y)
        with torch.no_grad():
            loc = batch_local_dist(x, y, aligned=True)
        out = loc if out is None else out + loc
    return out.float()


def dist_block(x_feats, y_feats, distance='global', normalize=False, metric='euclidean', out=None):
    """One block of compute_dist kept as a tensor: x_feats [B, ...] x y_feats [N, ...] ->
    torch.float32 [B, N] on the features' device (the same definitions and formulas; no
    autograd). For callers that reduce each block on the device, such as a top-k search.
    `out` (float32 [B, N], same device): the block is written there when the global
    distance is part of it."""
    _check_distance(distance, metric)
    with torch.no_grad():
        if distance in ('global', 'global_local'):
            x = _as_tensor(_get(x_feats, 'global', distance))
            y = _as_tensor(_get(y_feats, 'global', distance)).to(x.device)
            if out is not None and x.dtype != torch.float32:
                out = None
            out = _global_block(x, y, normalize, metric, out=out).float()
        else:
            out = None
        if distance in ('local', 'global_local'):
            x = _as_tensor(_get(x_feats, 'local', distance))
            y = _as_tensor(_get(y_feats, 'local', distance)).to(x.device)
            if normalize:
                x, y = _normalize(x), _normalize(y)
            loc = local_dist(x, y, aligned=True).float()
            out = loc if out is None else out.add_(loc)
    return out


# ----------------------------------------------------------------------------- top-k search

def _sort_keys(dist, index):
    """Distances [B, K] (float32 tensor) and gallery indices [B, K] -> int64 keys whose order
    is (distance, index): the float's bits mapped to a monotone int32 in the high half, the
    index (< 2^32) in the low half. torch.topk on them gives exactly the stable ranking."""
    bits = (dist.float() + 0.).view(torch.int32)       # + 0. turns -0. into +0.
    mono = bits ^ ((bits >> 31) & 0x7FFFFFFF)           # negative floats: reverse their order
    return (mono.to(torch.int64) << 32) | index.to(torch.int64)


def _unpack_keys(keys):
    mono = (keys >> 32).to(torch.int32)
    bits = mono ^ ((mono >> 31) & 0x7FFFFFFF)
    return bits.view(torch.float32), keys & 0xFFFFFFFF


def _block_topk_keys(d, k, offset):
    """Sort keys of the k smallest entries of each row of d [b, g] (gallery indices offset +
    column), ties by index. A float top-(k+1) finds them; only rows whose k-th and (k+1)-th
    values are equal (a tie across the cut, where topk may pick any of the tied columns) are
    redone on the keys of the whole row, which is exact but several times slower."""
    kk = min(k, d.size(1))
    vals, cols = torch.topk(d, min(kk + 1, d.size(1)), dim=1, largest=False, sorted=True)
    keys = _sort_keys(vals[:, :kk], cols[:, :kk] + offset)
    if vals.size(1) > kk:
        tied = (vals[:, kk] == vals[:, kk - 1]).nonzero().flatten()
        if len(tied):
            idx = torch.arange(offset, offset + d.size(1), device=d.device).expand(len(tied), -1)
            keys[tied] = torch.topk(_sort_keys(d[tied], idx), kk, dim=1, largest=False).values
    return keys


def topk_search(q_feats, g_feats, k=10, distance='global', normalize=False, device=None,
                query_block=None, gallery_block=None):
    """Exact top-k of a gallery for every query, in bounded memory.

    q_feats, g_feats: dicts with 'global' [N, C] and/or 'local' [N, h, c] as compute_dist
    takes them; the gallery's arrays may be h5py datasets (read gallery_block rows at a time).
    distance: 'global' | 'local' | 'global_local' (as aligned_reid.distance.compute_dist, with
    normalize), computed on `device` (default: the CPU). The gallery is swept in blocks of gallery_block rows and the queries in blocks
    of query_block rows (defaults keep a block near 4M distances); a running top-k is merged
    per block. Ties are ranked by gallery index, as a stable argsort of the full row would.
    Returns (indices np.int64 [Q, k'], distances np.float32 [Q, k']), k' = min(k, G)."""
    if distance not in DISTANCES:
        raise ValueError(f"topk_search: distance must be one of {DISTANCES}, got {distance!r}")
    key = 'global' if distance != 'local' else 'local'
    Q, G = len(q_feats[key]), len(g_feats[key])
    if G >= 1 << 32:
        raise ValueError(f"topk_search: at most 2^32 - 1 gallery items, got {G}")
    k = min(k, G)
    if k == 0 or Q == 0:
        return np.zeros((Q, k), dtype=np.int64), np.zeros((Q, k), dtype=np.float32)
    dev = torch.device(device) if device is not None else torch.device('cpu')
    gallery_block = gallery_block or max(1, min(G, 1 << 16))
    query_block = query_block or max(1, (1 << 22) // max(1, gallery_block))
    keys_needed = ('global', 'local') if distance == 'global_local' else (key,)
    best = torch.full((Q, k), torch.iinfo(torch.int64).max, dtype=torch.int64, device=dev)
    for gs in range(0, G, gallery_block):
        ge = min(G, gs + gallery_block)
        gb = {n: torch.as_tensor(np.asarray(g_feats[n][gs:ge])).to(dev) for n in keys_needed}
        for qs in range(0, Q, query_block):
            qe = min(Q, qs + query_block)
            qb = {n: torch.as_tensor(np.asarray(q_feats[n][qs:qe])).to(dev) for n in keys_needed}
            d = dist_block(qb, gb, distance=distance, normalize=normalize)      # [b, g]
            cand = torch.cat([best[qs:qe], _block_topk_keys(d, k, gs)], 1)
            best[qs:qe] = torch.topk(cand, k, dim=1, largest=False, sorted=True).values
    dist, index = _unpack_keys(best)
    return index.cpu().numpy(), dist.cpu().numpy()


def _gather_rows(array, index, device):
    """array[index] as a tensor on device, for a numpy array or tensor (one index_select) or an
    h5py dataset (read at increasing unique indices, as h5py requires)."""
    if isinstance(array, (np.ndarray, torch.Tensor)):
        t = torch.as_tensor(array)
        return t.index_select(0, torch.from_numpy(index).to(t.device)).to(device)
    uniq, inverse = np.unique(index, return_inverse=True)
    return torch.from_numpy(np.asarray(array[uniq])[inverse]).to(device)


def rerank_shortlist(q_feats, g_feats, shortlist, k=10, distance='global', normalize=False,
                     device=None, pair_block=1 << 14):
    """Exact distances on a shortlist of gallery candidates (from an approximate first stage
    such as faiss) and the top-k among them.

    shortlist: np.int64 [Q, S] gallery indices per query (-1 = no candidate, as faiss pads).
    The distance of each (query, candidate) pair is computed with aligned_reid.distance.pair_dist
    (same definitions as compute_dist), pair_block pairs at a time. Returns (indices np.int64
    [Q, k'], distances np.float32 [Q, k']) ranked by (distance, gallery index), k' = min(k, S);
    rows with fewer valid candidates are padded with index -1 and distance inf."""
    shortlist = np.asarray(shortlist, dtype=np.int64)
    Q, S = shortlist.shape
    k = min(k, S)
    keys_needed = ('global', 'local') if distance == 'global_local' else \
        ('local',) if distance == 'local' else ('global',)
    dev = torch.device(device) if device is not None else torch.device('cpu')
    flat = shortlist.reshape(-1)
    dist = np.full(flat.shape, np.inf, dtype=np.float32)
    valid = np.flatnonzero(flat >= 0)
    rows = valid // S
    queries = {n: torch.as_tensor(np.asarray(q_feats[n])).to(dev) for n in keys_needed}
    for s in range(0, len(valid), pair_block):
        v = valid[s:s + pair_block]
        r = torch.from_numpy(rows[s:s + pair_block]).to(dev)
        x = {n: queries[n].index_select(0, r) for n in keys_needed}
        y = {n: _gather_rows(g_feats[n], flat[v], dev) for n in keys_needed}
        dist[v] = pair_dist(x, y, distance=distance, normalize=normalize).cpu().numpy()
    dist = dist.reshape(Q, S)
    order = np.lexsort((np.where(shortlist >= 0, shortlist, np.iinfo(np.int64).max), dist), axis=1)[:, :k]
    index = np.take_along_axis(shortlist, order, 1)
    dist = np.take_along_axis(dist, order, 1)
    index[~np.isfinite(dist)] = -1
    return index, dist
