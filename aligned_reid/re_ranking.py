"""k-reciprocal re-ranking (Zhong et al., "Re-ranking Person Re-identification with k-reciprocal
Encoding", CVPR 2017), exact and memory-bounded, in torch on the CPU or a GPU: distances in row
blocks reduced tile by tile to row maxima and top-k neighbours, sparse V, Jaccard sums through an
inverted index over the (query, gallery) pairs that share a column."""

import contextlib
import time

import numpy as np
import torch

from .distance import dist_block, exact_near, exact_near_pairs, pair_dist, sq_euclidean_factors
from .distance import normalize as normalize_rows

# Sizes of the temporaries on the CPU. Those made again for every block are kept under glibc's
# largest mmap threshold (32 MB), so that freed blocks are reused from the heap instead of
# being unmapped and faulted in again: such page faults were most of the old code's system
# time. The distance row block is one buffer for the whole pass, as large as the matmul needs
# to run near its full rate (it packs the [N, C] operand once per block).
_ROW_BLOCK_ELEMENTS = 3 << 23  # cells of the [B, Q + G] distance row block (96 MB of float32)
_BLOCK_ELEMENTS = 1 << 22     # cells of a [B, G] block of the Jaccard sums (16 MB)
_PAIR_BUDGET = 1 << 19        # (entry, row) pairs expanded at once in the sparse steps
_CHUNK_COLUMNS = 64           # columns per chunk of the top-k search (see _nearest)
_TILE_ELEMENTS = 1 << 23      # cells of a distance tile, reduced while it is in a large L3 (32 MB)


def re_ranking(q_g_dist, q_q_dist, g_g_dist, k1=20, k2=6, lambda_value=0.3, device=None):
    """Re-rank a query x gallery distance matrix with k-reciprocal encoding.

    q_g_dist [Q, G], q_q_dist [Q, Q], g_g_dist [G, G] (numpy or torch). Computes exactly what
    the published algorithm computes on the full (Q+G) x (Q+G) matrix D = [[q_q, q_g],
    [q_g^T, g_g]]: T = (D^2 / column max of D^2)^T (float32), neighbours in ascending T per row
    (ties: lower index first), k-reciprocal sets of k1 expanded by the round(k1/2)-reciprocal
    sets of their members that share more than 2/3 of their elements, V rows exp(-T)
    normalised to sum 1, query expansion over the k2 nearest rows, Jaccard distance, and
    final = (1 - lambda_value) * jaccard + lambda_value * T, restricted to query rows and
    gallery columns. Never builds the dense V or rank matrices: memory is the inputs plus the
    [Q, G] output plus blocks of bounded size.
    device: where to compute ('cpu', 'cuda', ...); default: the device of q_g_dist when it is
    a tensor, else the CPU. Inputs elsewhere are copied there.
    Returns np.float32 [Q, G]."""
    dev = _pick_device(device, q_g_dist)
    q_g = _matrix(q_g_dist, 'q_g_dist', dev)
    q_q = _matrix(q_q_dist, 'q_q_dist', dev)
    g_g = _matrix(g_g_dist, 'g_g_dist', dev)
    Q, G = q_g.shape
    if q_q.shape != (Q, Q) or g_g.shape != (G, G):
        raise ValueError(f"re_ranking: shapes do not fit: q_g_dist {tuple(q_g.shape)}, q_q_dist "
                         f"{tuple(q_q.shape)}, g_g_dist {tuple(g_g.shape)}")
    N = Q + G
    dtype = torch.promote_types(torch.promote_types(q_g.dtype, q_q.dtype), g_g.dtype)
    q_g, q_q, g_g = q_g.to(dtype), q_q.to(dtype), g_g.to(dtype)
    scratch = {}

    def sq_into(src, out):
        """out = float32(src * src), squared in the inputs' precision as the reference does."""
        if dtype == torch.float32:
            torch.mul(src, src, out=out)
        else:
            out.copy_(src * src)

    def rows(s, e, block):
        """Rows s:e of T's numerator, i.e. columns s:e of D squared, into the block, in one
        piece (the core is asked for whole rows: the transposes want whole blocks)."""
        out = block.rows()
        if s < Q:                                              # query columns of D
            a, b = s, min(e, Q)
            sq_into(q_g[a:b], out[:b - a, Q:])                 # D[Q:, j] = q_g[j, :]
            cols = _scratch(scratch, 'cols', Q * (b - a), dev).view(Q, b - a)
            sq_into(q_q[:, a:b], cols)
            out[:b - a, :Q].copy_(cols.t())
        if e > Q:                                              # gallery columns of D
            a, b = max(s, Q) - Q, e - Q
            cols = _scratch(scratch, 'cols', N * (b - a), dev).view(N, b - a)
            sq_into(q_g[:, a:b], cols[:Q])
            sq_into(g_g[:, a:b], cols[Q:])
            out[e - s - (b - a):e - s].copy_(cols.t())        # a cache-blocked transpose
        yield 0, N, out

    def pairs(i, j):
        """T numerators at (i, j): D[j, i] squared -> float32 [P]."""
        r, c = j, i
        rq, cq = r < Q, c < Q
        rr, cc = r.clamp(max=Q - 1), c.clamp(max=Q - 1)
        rg, cg = (r - Q).clamp(min=0), (c - Q).clamp(min=0)
        v = torch.where(rq, torch.where(cq, q_q[rr, cc], q_g[rr, cg]),
                        torch.where(cq, q_g[cc, rg], g_g[rg, cg]))
        return (v * v).float()

    return _re_rank_core(Q, N, rows, pairs, k1, k2, lambda_value, dev, whole_rows=True)


def re_ranking_features(q_feats, g_feats, distance='global', k1=20, k2=6, lambda_value=0.3,
                        normalize=False, metric='euclidean', device=None, block_rows=None):
    """k-reciprocal re-ranking from features, never holding a dense (Q+G)^2 matrix.

    q_feats, g_feats: dicts with 'global' [N, C] and/or 'local' [N, h, c] (or the arrays), as
    for evaluation.compute_dist; distance 'global' | 'local' | 'global_local' (normalize,
    metric as there). Distances are computed on `device` (default: the features' device when
    they are tensors, else the CPU) `block_rows` rows at a time (rows of the symmetric
    (Q+G) x (Q+G) matrix; default: a block of bounded size), reduced on the fly to each row's
    max and nearest neighbours; the re-ranking then runs on the same device, and the distances
    V needs are recomputed for the few pairs involved. Same result as
    re_ranking(compute_dist(q, g), compute_dist(q, q), compute_dist(g, g)) up to float32
    rounding of the distances. Returns np.float32 [Q, G]."""
    keys = {'global': ('global',), 'local': ('local',), 'global_local': ('global', 'local')}
    if distance not in keys:
        raise ValueError(f"re_ranking_features: distance must be one of {tuple(keys)}, "
                         f"got {distance!r}")
    if isinstance(q_feats, dict):
        missing = [k for k in keys[distance] if k not in q_feats or k not in g_feats]
        if missing:
            raise ValueError(f"re_ranking_features: distance {distance!r} needs {missing} "
                             f"features in both dicts")
    first = q_feats[keys[distance][0]] if isinstance(q_feats, dict) else q_feats
    dev = _pick_device(device, first)

    def cat(key):
        a = q_feats[key] if isinstance(q_feats, dict) else q_feats
        b = g_feats[key] if isinstance(g_feats, dict) else g_feats
        return torch.cat([torch.as_tensor(a).to(dev, torch.float32),
                          torch.as_tensor(b).to(dev, torch.float32)], 0)

    allf = {k: cat(k) for k in keys[distance]}
    Q = len(first)
    N = len(allf[keys[distance][0]])
    once = normalize and metric == 'euclidean'       # normalised here, not again in every block
    if once:
        allf = {k: normalize_rows(v) for k, v in allf.items()}
    kw = dict(distance=distance, normalize=normalize and not once, metric=metric)
    # What rows and pairs read; pairs, the core's last use of it, empties it.
    held = {'feats': allf}
    if distance == 'global' and metric == 'euclidean':
        held = {'factors': sq_euclidean_factors(allf['global'], allf['global'])}  # [N, C + 2] x 2
        held['norms'] = held['factors'][0][:, -2].contiguous()                    # |x|^2 [N]
    del allf

    def rows(s, e, block):
        for c0, c1, part in block.tiles():
            if 'factors' in held:
                left, right = held['factors']
                torch.matmul(left[s:e], right[c0:c1].t(), out=part)   # d^2 before the clamp
            else:
                feats = held['feats']
                d = dist_block({k: v[s:e] for k, v in feats.items()},
                               {k: v[c0:c1] for k, v in feats.items()}, out=part, **kw)
                if d.data_ptr() != part.data_ptr():   # the local distance has its own buffers
                    part.copy_(d)
                part.mul_(part)
            yield c0, c1, part

    def near(s, e, c0, c1, part, mins, width):
        # the entries of near-duplicates again as |x - y|^2, as compute_dist has them
        left, right = held['factors']
        C = left.shape[1] - 2
        x, y = left[s:e, :C], right[c0:c1, :C]                   # y = -2 * features
        exact_near(part, held['norms'][s:e], held['norms'][c0:c1],
                   lambda i, j: x[i].add(y[j], alpha=.5).pow_(2).sum(1), mins, width)

    def pairs(i, j):
        out = torch.empty(len(i), dtype=torch.float32, device=dev)
        if 'factors' in held:
            (left, right), norms = held['factors'], held['norms']
            C = left.shape[1] - 2
            step = max(1, _PAIR_BUDGET * 2 // left.shape[1])  # gathered rows: 4 MB a side
            for s in range(0, len(i), step):
                ii, jj = i[s:s + step], j[s:s + step]
                sq = norms.index_select(0, jj) + norms.index_select(0, ii)   # |x|^2 + |y|^2
                d2 = out[s:s + step]
                torch.sum(left.index_select(0, jj).mul_(right.index_select(0, ii)), 1, out=d2)
                exact_near_pairs(d2, sq, lambda p: (left[jj[p], :C] - left[ii[p], :C]).pow_(2).sum(1))
            out.clamp_min_(0.)
        else:
            feats = held['feats']
            step = max(1, _PAIR_BUDGET * 2 // sum(v[0].numel() for v in feats.values()))
            for s in range(0, len(i), step):
                ii, jj = i[s:s + step], j[s:s + step]
                out[s:s + step] = pair_dist({k: v.index_select(0, jj) for k, v in feats.items()},
                                            {k: v.index_select(0, ii) for k, v in feats.items()},
                                            **kw).square()
        held.clear()
        return out

    return _re_rank_core(Q, N, rows, pairs, k1, k2, lambda_value, dev, block_rows,
                         near=near if 'factors' in held else None)


# ----------------------------------------------------------------------------- the core

# Per-stage costs for bench/: a caller that sets STAGES to a dict gets, for each stage name,
# [wall s, user s, system s, minor page faults] summed over the run. None: not measured.
STAGES = None


@contextlib.contextmanager
def _stage(name, device):
    if STAGES is None:
        yield
        return
    import resource                     # POSIX only, and only where STAGES is asked for
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    yield
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    acc = STAGES.setdefault(name, [0., 0., 0., 0])
    acc[0] += t1 - t0
    acc[1] += r1.ru_utime - r0.ru_utime
    acc[2] += r1.ru_stime - r0.ru_stime
    acc[3] += r1.ru_minflt - r0.ru_minflt


def _pick_device(device, x):
    if device is not None:
        return torch.device(device)
    return x.device if isinstance(x, torch.Tensor) else torch.device('cpu')


def _matrix(x, name, device):
    t = x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if t.dim() != 2:
        raise ValueError(f"re_ranking: {name} must be 2-D, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        t = t.double()
    elif t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    return t.to(device)


def _scratch(store, name, numel, device, dtype=torch.float32):
    """A flat buffer of at least `numel` elements, reused between blocks."""
    buf = store.get(name)
    if buf is None or buf.numel() < numel:
        buf = store[name] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def _block_elements(device, cpu_elements):
    """Cells of one dense block: cpu_elements on the CPU; on a GPU a share of the free memory,
    so that few large blocks keep it busy."""
    if device.type == 'cuda':
        free, _ = torch.cuda.mem_get_info(device)
        return int(min(1 << 28, max(cpu_elements, free // 64)))
    return cpu_elements


def _pair_budget(device):
    """(entry, row) pairs expanded at once: small on the CPU, larger on a GPU."""
    return _PAIR_BUDGET * 16 if device.type == 'cuda' else _PAIR_BUDGET


class _RowBlock:
    """B rows of the [N, N] distances held tile after tile in one flat buffer: tile t, the
    columns [t T, min(N, (t + 1) T)) of every row, is one contiguous [B, width] piece, which a
    matmul writes in one sweep and the reductions read in order (written through a column
    slice of a row-major [B, N] block, rows N floats apart, the matmul ran a third slower at
    MSMT17 size). T >= N: the row-major [B, N] block itself."""

    def __init__(self, flat, B, N, T):
        self.flat, self.B, self.N, self.T = flat[:B * N], B, N, min(T, N)

    def tile(self, c0):
        """The tile starting at column c0 (a multiple of T) -> (c1, view [B, c1 - c0])."""
        c1 = min(self.N, c0 + self.T)
        return c1, self.flat[self.B * c0:self.B * c1].view(self.B, c1 - c0)

    def tiles(self):
        for c0 in range(0, self.N, self.T):
            c1, part = self.tile(c0)
            yield c0, c1, part

    def rows(self, idx=None):
        """Whole rows (idx: int64 [R]; None: all) -> [R, N]; a view when T >= N."""
        parts = [p if idx is None else p.index_select(0, idx) for _, _, p in self.tiles()]
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)

    def columns_from(self, c):
        """Columns c: of every row, when they lie in the last tile -> view [B, N - c]."""
        c0 = (self.N - 1) // self.T * self.T
        assert c >= c0
        return self.tile(c0)[1][:, c - c0:]

    def chunks(self, pick, width):
        """Column chunks of `width` (T a multiple of it): pick [B, k] chunk indices -> their
        values [B, k, width]."""
        start = pick * width                                  # first column of each chunk
        c0 = torch.div(start, self.T, rounding_mode='floor') * self.T    # its tile
        wide = (c0 + self.T).clamp_(max=self.N) - c0
        rows = torch.arange(self.B, device=pick.device)[:, None]
        at = c0 * self.B + rows * wide + (start - c0)           # the chunk's first cell
        return self.flat[at[:, :, None] + torch.arange(width, device=pick.device)]


def _nearest(block, mins, m, K):
    """Indices of the K smallest entries of each row of T = max(d2, 0) / m (d2 [B, N] float32,
    the rows of a _RowBlock, m [B] > 0), ascending, ties in T by lower index (the order a stable
    argsort of T gives) -> int64 [B, K], on d2's device.

    The clamp and the division by m keep the order of d2 but may merge neighbours into ties,
    so the K + 1 smallest d2 are taken (any order among equal d2), put in (T, index) order,
    and kept when the K-th and (K+1)-th T differ: then nothing outside them can tie with the
    K-th. Rows with a tie at that boundary are redone with a stable sort of T.
    mins [B, C] (or None: search whole rows): the minima of the row chunks of _CHUNK_COLUMNS
    columns, d2[:, :C * _CHUNK_COLUMNS].view(B, C, -1).amin(2). The K + 1 smallest d2 of a
    row lie in its K + 1 chunks of smallest minima and the columns after the last chunk (a
    chunk left out has a minimum no smaller than theirs), so only those are searched."""
    B, n = block.B, block.N
    kc = min(n, K + 1)
    if mins is None:
        v, idx = torch.topk(block.rows(), kc, dim=1, largest=False, sorted=False)
    else:
        width, C = _CHUNK_COLUMNS, mins.shape[1]
        pick = torch.topk(mins, kc, dim=1, largest=False, sorted=False)[1]            # [B, kc]
        cand = block.chunks(pick, width).view(B, -1)
        if n > C * width:                                      # the columns after the chunks
            cand = torch.cat([cand, block.columns_from(C * width)], 1)
        v, o = torch.topk(cand, kc, dim=1, largest=False, sorted=False)
        in_chunk = pick.gather(1, torch.div(o, width, rounding_mode='floor').clamp_(max=kc - 1))
        idx = torch.where(o < kc * width, in_chunk * width + o % width,
                          o + (C - kc) * width)                # candidate -> column
    idx, o = idx.sort(1)                                       # index order, then stable by T
    t = v.gather(1, o).clamp_min_(0.).div_(m[:, None])
    t, o = t.sort(dim=1, stable=True)
    idx = idx.gather(1, o)
    if kc == K + 1:
        tied = torch.nonzero(t[:, K] == t[:, K - 1]).flatten()
        if len(tied):
            full = block.rows(tied).clamp_min_(0.).div_(m[tied, None])
            full = torch.sort(full, dim=1, stable=True)[1]
            idx[tied] = full[:, :kc]
    return idx[:, :K]


def _reciprocal(nn, block):
    """nn [N, k] nearest neighbours (self included) -> [N, k] where entry c keeps nn[i, c]
    if i is among nn[nn[i, c]] (k-reciprocal), else -1; forward order kept."""
    out = torch.empty_like(nn)
    for s in range(0, len(nn), block):
        f = nn[s:s + block]                                    # [B, k]
        me = torch.arange(s, s + len(f), device=nn.device)[:, None, None]
        back = nn.index_select(0, f.reshape(-1)).view(len(f), nn.shape[1], -1)   # [B, k, k]
        ok = (back == me).any(2)
        out[s:s + block] = torch.where(ok, f, torch.full_like(f, -1))
    return out


def _expansion(R, H, block):
    """k-reciprocal expansion (Zhong et al., Sec. 4.1). R [N, k1+1] k1-reciprocal sets,
    H [N, kh+1] round(k1/2)-reciprocal sets (-1 = empty slot). A member c of R(i) adds H(c)
    when |H(c) & R(i)| > 2/3 |H(c)|. Returns (counts [N], columns) of the unique, sorted
    expanded sets, row after row.

    One stable sort per row of R(i) followed by the H(c) of its members gives both the
    membership test (a value is in R(i) when its run of equal values starts with an entry of
    R(i)) and the union (the first kept entry of each run)."""
    k, kh = R.shape[1], H.shape[1]
    empty = len(R)                                             # sorts after every index
    counts, cols = [], []
    for s in range(0, len(R), block):
        r = R[s:s + block]                                     # [B, k]
        B = len(r)
        h = H.index_select(0, r.clamp(min=0).reshape(-1)).view(B, k, kh)
        h = torch.where((r >= 0)[:, :, None], h, -1)           # [B, k, kh]
        v = torch.cat([r, h.view(B, -1)], 1)
        v, src = torch.where(v >= 0, v, empty).sort(dim=1, stable=True)   # [B, k + k * kh]
        starts = torch.ones_like(v, dtype=torch.bool)
        starts[:, 1:] = v[:, 1:] != v[:, :-1]
        pos = torch.arange(v.shape[1], device=v.device).expand(B, -1)
        run = torch.where(starts, pos, 0).cummax(1)[0]         # first position of each run
        from_r = src < k
        in_r = torch.empty_like(from_r).scatter_(1, src, from_r.gather(1, run))
        hvalid = h >= 0
        member = in_r[:, k:].view(B, k, kh) & hvalid
        accept = (member.sum(-1).double() > 2. / 3 * hvalid.sum(-1).double()) & (r >= 0)
        owner = torch.div(src - k, kh, rounding_mode='floor').clamp_(min=0)
        keep = (v < empty) & (from_r | accept.gather(1, owner))
        kept = keep.cumsum(1)                                  # first kept entry of each run:
        first = keep & (kept - kept.gather(1, run) + keep.gather(1, run).long() == 1)
        counts.append(first.sum(1))
        cols.append(v[first])
    return torch.cat(counts), torch.cat(cols)


def _ranges(counts, budget):
    """Split rows into consecutive groups whose summed counts [R] stay within `budget` (a row
    above it goes alone) -> list of (start, end) row ranges."""
    csum = np.concatenate([[0], torch.cumsum(counts, 0).cpu().numpy()])
    out, s, n = [], 0, len(counts)
    while s < n:
        e = max(s + 1, int(np.searchsorted(csum, csum[s] + budget, 'right')) - 1)
        out.append((s, e))
        s = e
    return out


def _gather_rows(indptr, src, device):
    """Positions of the entries of CSR rows src [S] (indptr [R+1]) -> (owner [P] index into
    src, pos [P] entry positions), the rows' entries one after another."""
    start = indptr.index_select(0, src)
    lens = indptr.index_select(0, src + 1) - start
    owner = torch.repeat_interleave(torch.arange(len(src), device=device), lens)
    start -= torch.cumsum(lens, 0) - lens                      # entry position - pair position
    pos = torch.arange(len(owner), device=device) + start.index_select(0, owner)
    return owner, pos


def _query_expansion(indptr, cols, vals, nearest, kk, N, device, budget):
    """V_qe[i] = mean of V rows nearest[i, :kk] (CSR in, CSR out with sorted columns)."""
    lens = (indptr[1:] - indptr[:-1])[nearest[:, :kk]].sum(1)         # entries before merging
    out_counts, out_cols, out_vals = [], [], []
    for s, e in _ranges(lens, budget):
        src = nearest[s:e, :kk].reshape(-1)
        owner, pos = _gather_rows(indptr, src, device)
        row = owner // kk                                               # local row in s:e
        key = row * N + cols.index_select(0, pos)
        key, o = key.sort()
        uniq, inv = torch.unique_consecutive(key, return_inverse=True)
        v = torch.zeros(len(uniq), dtype=torch.float32, device=device)
        v.index_add_(0, inv, vals.index_select(0, pos.index_select(0, o)))
        out_counts.append(torch.bincount(uniq // N, minlength=e - s))
        out_cols.append(uniq % N)
        out_vals.append(v / kk)
    counts = torch.cat(out_counts)
    indptr = torch.zeros(N + 1, dtype=torch.int64, device=device)
    indptr[1:] = torch.cumsum(counts, 0)
    return indptr, torch.cat(out_cols), torch.cat(out_vals)


def _re_rank_core(Q, N, rows, pairs, k1, k2, lambda_value, device, block_rows=None,
                  near=None, whole_rows=False):
    """Shared implementation. rows(s, e, block): a generator that writes rows s:e of the
    squared distances whose row max normalises T into the _RowBlock block (float32 on
    `device`; negative values, the rounding of a distance 0, stand for 0), tile by tile (or
    the whole rows at once, block.rows(), when whole_rows), and yields (c0, c1, part) after
    each, part the [e - s, c1 - c0] view written, so that the tile is reduced while it is in
    the cache. pairs(i, j) -> float32 [P]: the same values at
    explicit (row, column) pairs (int64 tensors on `device`), called once, after the last
    rows. near(s, e, c0, c1, part, mins, width) (optional): called on each tile part after the
    minima mins [e - s, c] of its first c chunks of `width` columns (None: no whole chunk) are
    taken, to correct entries of the tile and those minima before anything else reads them.
    Returns the final distance np.float32 [Q, N - Q]."""
    if k1 < 1 or k2 < 1:
        raise ValueError(f"re_ranking: k1 and k2 must be >= 1, got k1={k1}, k2={k2}")
    if not 0. <= lambda_value <= 1.:
        raise ValueError(f"re_ranking: lambda_value must be in [0, 1], got {lambda_value}")
    G = N - Q
    kh = int(np.around(k1 / 2.))
    K = min(N, max(k1 + 1, kh + 1, k2))
    block = block_rows or max(1, _block_elements(device, _ROW_BLOCK_ELEMENTS) // max(1, N))
    W = _CHUNK_COLUMNS
    C = N // W if N // W > 2 * min(N, K + 1) else 0            # chunks of the top-k search
    tile = N if device.type == 'cuda' or whole_rows or not C else \
        max(W, _TILE_ELEMENTS // min(block, N) // W * W)
    with torch.no_grad():
        rowmax = torch.empty(N, dtype=torch.float32, device=device)
        nearest = torch.empty((N, K), dtype=torch.int64, device=device)   # initial_rank[:, :K]
        final = torch.empty((Q, G), dtype=torch.float32, device=device)
        # Pass 1: rows of T's numerator -> max, nearest neighbours, and the final distance
        # where no Jaccard term adds to it, lambda * T + (1 - lambda) (query rows, gallery
        # columns).
        buf = torch.empty(min(block, N) * N, dtype=torch.float32, device=device)
        mins = torch.empty((min(block, N), C), dtype=torch.float32, device=device)
        rest = torch.full((), 1. - lambda_value, dtype=torch.float32, device=device)
        for s in range(0, N, block):
            e = min(N, s + block)
            d2, bq = _RowBlock(buf, e - s, N, tile), max(0, min(e, Q) - s)   # bq: query rows
            pieces, m = rows(s, e, d2), None
            while True:
                with _stage('distances', device):
                    piece = next(pieces, None)
                if piece is None:
                    break
                with _stage('max, top-k', device):
                    c0, c1, part = piece
                    a, b = c0 // W, min(C, c1 // W)            # whole chunks in the piece
                    if b > a:
                        torch.amin(part[:, :(b - a) * W].view(e - s, b - a, W), 2,
                                   out=mins[:e - s, a:b])
                    if near is not None:
                        near(s, e, c0, c1, part, mins[:e - s, a:b] if b > a else None, W)
                    pm = part.amax(1)                          # NaN propagates
                    m = pm if m is None else torch.maximum(m, pm, out=m)
                    if bq and c1 > Q:                          # query rows, gallery columns
                        g0 = max(c0, Q)
                        torch.clamp_min(part[:bq, g0 - c0:], 0.,
                                        out=final[s:s + bq, g0 - Q:c1 - Q])
            with _stage('max, top-k', device):
                m = m.clamp_min_(0.)
                if torch.isnan(m).any():
                    raise ValueError("re_ranking: the distances hold NaN")
                m = torch.where(m > 0, m, torch.ones_like(m))  # all-zero row: leave it at 0
                rowmax[s:e] = m
                nearest[s:e] = _nearest(d2, mins[:e - s] if C else None, m, K)
                if bq:                                         # lambda * T + (1 - lambda)
                    torch.addcmul(rest, final[s:s + bq], (lambda_value / m[:bq])[:, None],
                                  out=final[s:s + bq])
        del buf, mins
        # k-reciprocal sets, their expansion, and V (CSR: indptr, cols, vals).
        sblock = max(1, _pair_budget(device) // (K * K))
        with _stage('reciprocal sets', device):
            R = _reciprocal(nearest[:, :min(N, k1 + 1)].contiguous(), sblock)
            H = _reciprocal(nearest[:, :min(N, kh + 1)].contiguous(), sblock)
        with _stage('expansion', device):
            counts, cols = _expansion(R, H, sblock)
        del R, H
        with _stage('V weights', device):
            indptr = torch.zeros(N + 1, dtype=torch.int64, device=device)
            indptr[1:] = torch.cumsum(counts, 0)
            rows_of = torch.repeat_interleave(torch.arange(N, device=device), counts)
            w = pairs(rows_of, cols).div_(rowmax.index_select(0, rows_of)).neg_().exp_()
            wsum = torch.zeros(N, dtype=torch.float32, device=device).index_add_(0, rows_of, w)
            vals = w.div_(wsum.index_select(0, rows_of))             # exp(-T) / row sum
            del rows_of, w
        if k2 != 1:
            with _stage('query expansion', device):
                indptr, cols, vals = _query_expansion(indptr, cols, vals, nearest, min(k2, N),
                                                      N, device, _pair_budget(device))
        del nearest
        # Inverted index of the gallery rows of V: for each column k, the gallery rows
        # holding it and their values.
        with _stage('inverted index', device):
            gstart = int(indptr[Q])
            o = torch.argsort(cols[gstart:], stable=True)     # gallery entries by column
            col_vals = vals[gstart:].index_select(0, o)
            col_rows = torch.searchsorted(indptr[Q + 1:] - gstart, o, right=True)   # row - Q
            del o
            col_len = torch.bincount(cols[gstart:], minlength=N)
            col_ptr = torch.zeros(N + 1, dtype=torch.int64, device=device)
            col_ptr[1:] = torch.cumsum(col_len, 0)
        # Jaccard distance of query rows to gallery rows, t = sum_k min(V[i, k], V[j, k]), over
        # the (query entry, gallery row) pairs that share a column, in blocks of queries. Pass 1
        # wrote lambda * T + (1 - lambda), the final distance where t = 0; the cells with t > 0
        # lose (1 - lambda) * t / (2 - t) (the Jaccard distance is 1 - t / (2 - t)).
        with _stage('jaccard', device):
            q_cols, q_vals = cols[:gstart].clone(), vals[:gstart].clone()
            del cols, vals                                  # the gallery part is in col_*
            q_rows = torch.repeat_interleave(torch.arange(Q, device=device),
                                             indptr[1:Q + 1] - indptr[:Q])
            per_query = torch.zeros(Q, dtype=torch.int64, device=device).index_add_(
                0, q_rows, col_len[q_cols])                            # pairs per query
            qcap = max(1, _block_elements(device, _BLOCK_ELEMENTS) // max(1, G))
            acc = torch.zeros(min(Q, qcap) * G, dtype=torch.float32, device=device)
            flat = final.view(-1)
            for s0, e0 in _ranges(per_query, _pair_budget(device)):
                for s in range(s0, e0, qcap):
                    e = min(e0, s + qcap)
                    a, b = int(indptr[s]), int(indptr[e])
                    owner, pos = _gather_rows(col_ptr, q_cols[a:b], device)
                    cell = q_rows[a:b].index_select(0, owner).sub_(s).mul_(G).add_(
                        col_rows.index_select(0, pos))                 # in acc
                    acc.index_add_(0, cell, torch.minimum(q_vals[a:b].index_select(0, owner),
                                                          col_vals.index_select(0, pos)))
                    t = acc.index_select(0, cell)          # a cell's pairs all hold its sum
                    acc.index_fill_(0, cell, 0.)           # zero again for the next block
                    cell += s * G                                      # in final
                    gap = t.div_(t.neg().add_(2.)).mul_(1. - lambda_value)
                    flat.index_copy_(0, cell, flat.index_select(0, cell).sub_(gap))
        return final.cpu().numpy()
