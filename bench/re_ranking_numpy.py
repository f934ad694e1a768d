"""The numpy k-reciprocal re-ranking of commit a0b4112 (aligned_reid/re_ranking.py there, with the
compute_dist / pair_dist of that commit's evaluation.py that it called), kept unchanged as the
baseline that bench/evaluation.py runs beside the torch implementation in the same invocation.
Not part of the package: `git show a0b4112:aligned_reid/re_ranking.py` is its source."""

import numpy as np
import scipy.sparse as sp
import torch

from aligned_reid.distance import batch_local_dist, local_dist

_BLOCK_ELEMENTS = 1 << 22     # ~4M cells per dense row block


def re_ranking(q_g_dist, q_q_dist, g_g_dist, k1=20, k2=6, lambda_value=0.3):
    """Re-rank a query x gallery distance matrix with k-reciprocal encoding.

    q_g_dist [Q, G], q_q_dist [Q, Q], g_g_dist [G, G] (numpy or torch). Computes exactly what
    the published algorithm computes on the full (Q+G) x (Q+G) matrix D = [[q_q, q_g],
    [q_g^T, g_g]]: T = (D^2 / column max of D^2)^T (float32), neighbours in ascending T per row
    (ties: lower index first), k-reciprocal sets of k1 expanded by the round(k1/2)-reciprocal
    sets of their members that share more than 2/3 of their elements, V rows exp(-T)
    normalised to sum 1, query expansion over the k2 nearest rows, Jaccard distance, and
    final = (1 - lambda_value) * jaccard + lambda_value * T, restricted to query rows and
    gallery columns. Never builds the dense V or rank matrices: memory is the inputs plus the
    [Q, G] output plus O((Q+G) * k1^2).
    Returns np.float32 [Q, G]."""
    q_g = _np(q_g_dist, 'q_g_dist')
    q_q = _np(q_q_dist, 'q_q_dist')
    g_g = _np(g_g_dist, 'g_g_dist')
    Q, G = q_g.shape
    if q_q.shape != (Q, Q) or g_g.shape != (G, G):
        raise ValueError(f"re_ranking: shapes do not fit: q_g_dist {q_g.shape}, q_q_dist "
                         f"{q_q.shape}, g_g_dist {g_g.shape}")
    dtype = np.result_type(q_g, q_q, g_g)

    def sq(x):
        x = np.asarray(x, dtype=dtype)
        return (x * x).astype(np.float32, copy=False)

    def rows(s, e):
        """Rows s:e of T's numerator: columns s:e of D, squared -> [B, Q+G]."""
        parts = []
        if s < Q:
            a, b = s, min(e, Q)
            parts.append(np.concatenate([q_q[:, a:b].T, q_g[a:b]], axis=1))
        if e > Q:
            a, b = max(s, Q) - Q, e - Q
            parts.append(np.concatenate([q_g[:, a:b].T, g_g[:, a:b].T], axis=1))
        return sq(np.concatenate(parts, axis=0))

    def pairs(i, j):
        """T numerators at (i, j): D[j, i] squared -> [P]."""
        r, c = j, i
        out = np.empty(len(i), dtype=dtype)
        for rq in (True, False):
            for cq in (True, False):
                m = ((r < Q) == rq) & ((c < Q) == cq)
                if not m.any():
                    continue
                rr, cc = r[m], c[m]
                if rq and cq:
                    out[m] = q_q[rr, cc]
                elif rq:
                    out[m] = q_g[rr, cc - Q]
                elif cq:
                    out[m] = q_g[cc, rr - Q]
                else:
                    out[m] = g_g[rr - Q, cc - Q]
        return sq(out)

    return _re_rank_core(Q, Q + G, rows, pairs, k1, k2, lambda_value)


def re_ranking_features(q_feats, g_feats, distance='global', k1=20, k2=6, lambda_value=0.3,
                        normalize=False, metric='euclidean', device=None, block_rows=None):
    """k-reciprocal re-ranking from features, never holding a dense (Q+G)^2 matrix.

    q_feats, g_feats: dicts with 'global' [N, C] and/or 'local' [N, h, c] (or the arrays), as
    for evaluation.compute_dist; distance 'global' | 'local' | 'global_local' (normalize,
    metric as there). Distances are computed `block_rows` rows at a time (rows of the symmetric
    (Q+G) x (Q+G) matrix), reduced on the fly to each row's max and k1+1 nearest neighbours;
    the distances V needs are recomputed for the few pairs involved. Same result as
    re_ranking(compute_dist(q, g), compute_dist(q, q), compute_dist(g, g)) up to float32
    rounding of the distances. Returns np.float32 [Q, G]."""
    def cat(key):
        a = q_feats[key] if isinstance(q_feats, dict) else q_feats
        b = g_feats[key] if isinstance(g_feats, dict) else g_feats
        return torch.cat([torch.as_tensor(a).float(), torch.as_tensor(b).float()], 0)

    keys = {'global': ('global',), 'local': ('local',), 'global_local': ('global', 'local')}
    if distance not in keys:
        raise ValueError(f"re_ranking_features: distance must be one of {tuple(keys)}, "
                         f"got {distance!r}")
    if isinstance(q_feats, dict):
        missing = [k for k in keys[distance] if k not in q_feats or k not in g_feats]
        if missing:
            raise ValueError(f"re_ranking_features: distance {distance!r} needs {missing} "
                             f"features in both dicts")
    allf = {k: cat(k) for k in keys[distance]}
    Q = len(q_feats[keys[distance][0]] if isinstance(q_feats, dict) else q_feats)
    N = len(allf[keys[distance][0]])
    kw = dict(distance=distance, normalize=normalize, metric=metric)

    def rows(s, e):
        d = compute_dist({k: v[s:e] for k, v in allf.items()}, allf, device=device, **kw)
        return d * d

    def pairs(i, j):
        out = np.empty(len(i), dtype=np.float32)
        step = 1 << 16
        for s in range(0, len(i), step):
            ii = torch.from_numpy(i[s:s + step])
            jj = torch.from_numpy(j[s:s + step])
            d = pair_dist({k: v[jj] for k, v in allf.items()},
                          {k: v[ii] for k, v in allf.items()}, **kw).cpu().numpy()
            out[s:s + step] = d * d
        return out

    return _re_rank_core(Q, N, rows, pairs, k1, k2, lambda_value, block_rows)


# ----------------------------------------------------------------------------- the core

def _np(x, name):
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"re_ranking: {name} must be 2-D, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    return x


def _nearest(d2, m, K, chunk=16):
    """Indices of the K smallest entries of each row of T = d2 / m (d2 [B, N] np.float32,
    m [B]), ascending, ties in T by lower index (the order a stable argsort of T gives)
    -> np.int64 [B, K].

    Exact two-stage selection: the K + 1 smallest values of a row lie in the K + 1 column
    chunks (strided sets of columns) with the smallest minima, so only those are sorted. Dividing by m > 0 keeps
    the order of d2 but may merge neighbours into ties; rows with a tie in T among the K + 1
    candidates, or tied chunk minima at the boundary, are redone with a stable sort of T."""
    B, n = d2.shape
    width = n // chunk                                         # chunk c: columns c + k * width
    if width <= K + 2:                                         # small rows: sort them all
        return np.argsort(d2 / m[:, None], axis=1, kind='stable')[:, :K]
    steps = np.arange(0, n, width)                             # ceil(n / width) offsets
    mins = d2[:, :width].copy()
    for a in steps[1:]:
        part = d2[:, a:a + width]                              # the last one may be shorter
        np.minimum(mins[:, :part.shape[1]], part, out=mins[:, :part.shape[1]])
    pick = np.argpartition(mins, K + 1, axis=1)[:, :K + 2]     # the K + 2 smallest chunks
    pm = np.take_along_axis(mins, pick, 1)
    o = np.argsort(pm, axis=1, kind='stable')
    pick, pm = np.take_along_axis(pick, o, 1), np.take_along_axis(pm, o, 1)
    boundary_tie = pm[:, K] == pm[:, K + 1]
    cols = (pick[:, :K + 1, None] + steps).reshape(B, -1)
    cols = np.where(cols < n, cols, pick[:, :K + 1, None].repeat(len(steps), 2).reshape(B, -1))
    cand = np.take_along_axis(d2, cols, 1) / m[:, None]        # T of the candidates
    o = np.lexsort((cols, cand), axis=1)                       # by T, then column
    cand = np.take_along_axis(cand, o, 1)
    cols = np.take_along_axis(cols, o, 1)
    # drop repeated columns (padding of chunks without a leftover column)
    same = np.zeros(cols.shape, dtype=bool)
    same[:, 1:] = cols[:, 1:] == cols[:, :-1]
    cand = np.where(same, np.inf, cand)
    o = np.argsort(cand, axis=1, kind='stable')
    cand = np.take_along_axis(cand, o, 1)[:, :K + 1]
    idx = np.take_along_axis(cols, o, 1)[:, :K].copy()
    tied = (cand[:, 1:] == cand[:, :-1]).any(1) | boundary_tie
    for r in np.flatnonzero(tied):
        idx[r] = np.argsort(d2[r] / m[r], kind='stable')[:K]
    return idx


def _reciprocal(nn, block):
    """nn [N, k] nearest neighbours (self included) -> [N, k] where entry c keeps nn[i, c]
    if i is among nn[nn[i, c]] (k-reciprocal), else -1; forward order kept."""
    out = np.full(nn.shape, -1, dtype=np.int64)
    for s in range(0, len(nn), block):
        f = nn[s:s + block]                                    # [B, k]
        back = nn[f]                                           # [B, k, k]
        me = np.arange(s, s + len(f))[:, None, None]
        ok = (back == me).any(2)
        out[s:s + block] = np.where(ok, f, -1)
    return out


def _expansion(R, H, block):
    """k-reciprocal expansion (Zhong et al., Sec. 4.1). R [N, k1+1] k1-reciprocal sets,
    H [N, kh+1] round(k1/2)-reciprocal sets (-1 = empty slot). A member c of R(i) adds H(c)
    when |H(c) & R(i)| > 2/3 |H(c)|. Returns CSR-style (indptr, indices) of the unique,
    sorted expanded sets."""
    counts, cols = [], []
    for s in range(0, len(R), block):
        r = R[s:s + block]                                     # [B, k]
        h = H[np.maximum(r, 0)]                                # [B, k, kh]
        hvalid = (h >= 0) & (r >= 0)[:, :, None]
        member = (h[..., None] == r[:, None, None, :]).any(-1) & hvalid
        size = hvalid.sum(-1)
        accept = (member.sum(-1) > 2. / 3 * size) & (r >= 0)   # the published test, as written
        add = np.where(accept[..., None] & hvalid, h, -1).reshape(len(r), -1)
        allm = np.sort(np.concatenate([r, add], 1), axis=1)    # [B, k + k*kh]
        keep = allm >= 0
        keep[:, 1:] &= allm[:, 1:] != allm[:, :-1]
        counts.append(keep.sum(1))
        cols.append(allm[keep])
    counts = np.concatenate(counts)
    indptr = np.concatenate([[0], np.cumsum(counts)])
    return indptr, np.concatenate(cols)


def _re_rank_core(Q, N, rows, pairs, k1, k2, lambda_value, block_rows=None):
    """Shared implementation. rows(s, e) -> np.float32 [B, N]: rows s:e of the squared
    distances whose row max normalises T; pairs(i, j) -> np.float32 [P]: the same values at
    explicit (row, column) pairs. Returns the final distance np.float32 [Q, N - Q]."""
    if k1 < 1 or k2 < 1:
        raise ValueError(f"re_ranking: k1 and k2 must be >= 1, got k1={k1}, k2={k2}")
    if not 0. <= lambda_value <= 1.:
        raise ValueError(f"re_ranking: lambda_value must be in [0, 1], got {lambda_value}")
    G = N - Q
    kh = int(np.around(k1 / 2.))
    K = min(N, max(k1 + 1, kh + 1, k2))
    block = block_rows or max(1, _BLOCK_ELEMENTS // max(1, N))
    rowmax = np.empty(N, dtype=np.float32)
    nearest = np.empty((N, K), dtype=np.int64)                 # initial_rank[:, :K]
    final = np.empty((Q, G), dtype=np.float32)
    # Pass 1: normalised rows -> max, nearest neighbours, query x gallery part of T.
    for s in range(0, N, block):
        e = min(N, s + block)
        d2 = rows(s, e)                                        # [B, N] np.float32
        m = d2.max(1)                                          # NaN propagates
        if np.isnan(m).any():
            raise ValueError("re_ranking: the distances hold NaN")
        m = np.where(m > 0, m, np.float32(1.))                 # all-zero row: leave it at 0
        rowmax[s:e] = m
        nearest[s:e] = _nearest(d2, m, K)
        if s < Q:
            b = min(e, Q) - s
            final[s:s + b] = d2[:b, Q:] / m[:b, None]
        del d2
    # k-reciprocal sets and their expansion.
    sblock = max(1, (1 << 21) // (K * K))
    R = _reciprocal(nearest[:, :min(N, k1 + 1)], sblock)
    H = _reciprocal(nearest[:, :min(N, kh + 1)], sblock)
    indptr, cols = _expansion(R, H, sblock)
    rows_of = np.repeat(np.arange(N), np.diff(indptr))
    t_vals = pairs(rows_of, cols) / rowmax[rows_of]            # T[i, j], float32
    w = np.exp(-t_vals.astype(np.float32))
    wsum = np.bincount(rows_of, weights=w, minlength=N).astype(np.float32)
    V = sp.csr_matrix((w / wsum[rows_of], cols, indptr), shape=(N, N), dtype=np.float32)
    del R, H, rows_of, cols, w, t_vals
    if k2 != 1:
        kk = min(k2, N)
        sel = sp.csr_matrix((np.ones(N * kk, dtype=np.float32), nearest[:, :kk].ravel(),
                             np.arange(0, N * kk + 1, kk)), shape=(N, N))
        V = (sel @ V).astype(np.float32) / np.float32(kk)
        V = sp.csr_matrix(V)
    del nearest
    V.sort_indices()
    # Jaccard distance of query rows to gallery rows: sum_k min(V[i, k], V[j, k]).
    Vq = V[:Q]
    Vg_cols = sp.csr_matrix(V[Q:].T)                           # [N, G]: column k -> gallery rows
    col_ptr, col_rows, col_vals = Vg_cols.indptr, Vg_cols.indices, Vg_cols.data
    qblock = max(1, _BLOCK_ELEMENTS // max(1, G))
    for s in range(0, Q, qblock):
        e = min(Q, s + qblock)
        sub = Vq[s:e]
        qi = np.repeat(np.arange(e - s), np.diff(sub.indptr))  # local query row of each entry
        k, a = sub.indices, sub.data
        lens = col_ptr[k + 1] - col_ptr[k]
        rep = np.repeat(np.arange(len(k)), lens)               # entry -> expanded pairs
        offs = np.arange(len(rep)) - np.repeat(np.cumsum(lens) - lens, lens)
        pos = col_ptr[k][rep] + offs
        mins = np.minimum(a[rep], col_vals[pos])
        tmin = np.bincount(qi[rep] * G + col_rows[pos], weights=mins,
                           minlength=(e - s) * G).astype(np.float32).reshape(e - s, G)
        jac = np.float32(1.) - tmin / (np.float32(2.) - tmin)
        final[s:e] = jac * (1 - lambda_value) + final[s:e] * lambda_value
    return final


# ----------------------------------------------------------------------------- a0b4112's distances

DISTANCES = ('global', 'local', 'global_local')
METRICS = ('euclidean', 'cosine')


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


def _global_block(x, y, normalize, metric):
    """x [B, C], y [N, C] (tensors) -> [B, N]."""
    if normalize or metric == 'cosine':
        x, y = _normalize(x), _normalize(y)
    if metric == 'cosine':
        return 1. - x @ y.t()
    d2 = (x * x).sum(1, keepdim=True) + (y * y).sum(1)[None] - 2. * (x @ y.t())
    return d2.clamp_min_(0.).sqrt_()


def compute_dist(q_feats, g_feats, distance='global', normalize=False, metric='euclidean',
                 device=None, block_size=None):
    """Query x gallery distance matrix -> np.float32 [Q, G] (a0b4112's evaluation.compute_dist)."""
    _check_distance(distance, metric)
    out = None
    if distance in ('global', 'global_local'):
        x = _as_tensor(_get(q_feats, 'global', distance), device)
        y = _as_tensor(_get(g_feats, 'global', distance), device)
        bs = block_size or max(1, _BLOCK_ELEMENTS // max(1, y.shape[0]))
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
    """Distances between paired rows -> torch.float32 [P] (a0b4112's evaluation.pair_dist)."""
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
            d2 = (x * x).sum(1) + (y * y).sum(1) - 2. * (x * y).sum(1)
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
