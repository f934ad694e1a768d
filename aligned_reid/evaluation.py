"""Test-time evaluation: feature extraction, query x gallery distances (global, local, global+local),
the Market-1501 ranking protocol (CMC, mAP, mINP), multi-query pooling, evaluate() and its table."""

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from tqdm import tqdm

from . import data
from .signals import started
# compute_dist / pair_dist live in aligned_reid.distance; they stay importable from here.
from .distance import DISTANCES, METRICS, compute_dist, pair_dist  # noqa: F401

AP_MODES = ('standard', 'market_official')
_BLOCK_ELEMENTS = 1 << 22     # ~4M matrix cells per row block in evaluate_rank


# ----------------------------------------------------------------------------- features

def test_images(partitions, split='test', multi_query=None):
    """The images of a split that a test uses, in partitions order -> (im_names, marks) lists.

    Marks 0 (query) and 1 (gallery) always; the Market-1501 multi-query images (mark 2) only
    when multi_query is 'avg' or 'max' (None or 'none': they are not used, so not extracted)."""
    names, marks = partitions[split + '_im_names'], partitions[split + '_marks']
    if len(names) != len(marks):
        raise ValueError(f"{split}_im_names has {len(names)} entries but {split}_marks "
                         f"{len(marks)}")
    if multi_query not in (None, 'none', 'avg', 'max'):
        raise ValueError(f"multi_query must be None, 'none', 'avg' or 'max', got {multi_query!r}")
    wanted = (0, 1, 2) if multi_query in ('avg', 'max') else (0, 1)
    keep = [i for i, m in enumerate(marks) if int(m) in wanted]
    return [names[i] for i in keep], [int(marks[i]) for i in keep]


def forward_features(model, images, flip=False, amp=False, keys=('global', 'local')):
    """The test-time features of one batch images [B, 3, H, W] (on the model's device) -> dict of
    float32 tensors, for each of `keys` the model gives: 'global' [B, C], 'local' [B, h, c].
    flip=True averages in the features of the mirrored batch (a horizontal flip does not move rows,
    so stripes keep their meaning); amp=True runs the model under autocast on the images' device
    type. Call under torch.inference_mode() with the model in eval mode."""
    with torch.autocast(device_type=images.device.type, enabled=amp):
        out = model(images)
        out_flip = model(torch.flip(images, dims=[3])) if flip else None
    feats = {}
    for key in keys:
        if key in out:
            f = out[key].float()
            feats[key] = (f + out_flip[key].float()) / 2. if flip else f
    return feats


def extract_features(model, loader, device, flip=False, amp=False, progress=True):
    """Run `model` over a test loader and collect its features in dataset order.

    loader yields (images [B, 3, H, W], indices [B]) and loader.dataset has .ids .cams .marks
    (aligned_reid.data.TestSet). The model returns a dict with 'global' [B, C] and (optionally)
    'local' [B, h, c]. With flip=True the features of the horizontally flipped image are
    averaged in (stripes stay in place: a horizontal flip does not move rows). amp=True runs the
    model under autocast (features are returned as float32).

    Returns a dict: 'global' np.float32 [N, C], 'local' np.float32 [N, h, c] (if the model gives
    it), 'ids', 'cams', 'marks' np.int64 [N]."""
    device = torch.device(device)
    dataset = loader.dataset
    n = len(dataset)
    feats = {}
    filled = np.zeros(n, dtype=bool)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for images, indices in tqdm(started(loader), total=len(loader), desc='extract features',
                                        disable=not progress, leave=False):
                out = forward_features(model, images.to(device, non_blocking=True), flip, amp)
                idx = np.asarray(indices, dtype=np.int64)
                for key, f in out.items():
                    f = f.cpu().numpy()
                    if key not in feats:
                        feats[key] = np.zeros((n,) + f.shape[1:], dtype=np.float32)
                    feats[key][idx] = f
                filled[idx] = True
    finally:
        model.train(was_training)
    if not filled.all():
        raise ValueError(f"extract_features: the loader gave features for {int(filled.sum())} "
                         f"of {n} images (does it drop the last batch or sample?)")
    if 'global' not in feats:
        raise ValueError("extract_features: the model output has no 'global' entry")
    for key in ('ids', 'cams', 'marks'):
        feats[key] = np.asarray(getattr(dataset, key), dtype=np.int64)
    return feats


def pool_multi_query(feats, mode='avg'):
    """Market-1501 multi-query: each query's features pooled with the mark-2 images of the same
    id and camera.

    feats: dict from extract_features (marks 0 query, 1 gallery, 2 multi-query). Returns a new
    dict of the same form holding only the queries (mark 0), whose 'global' [Q, C] and
    'local' [Q, h, c] are the average (mode='avg') or element-wise max (mode='max') over the
    query image and the multi-query images of its (id, camera); a query without such images
    keeps its own features."""
    if mode not in ('avg', 'max'):
        raise ValueError(f"pool_multi_query: mode must be 'avg' or 'max', got {mode!r}")
    marks, ids, cams = feats['marks'], feats['ids'], feats['cams']
    q = np.flatnonzero(marks == 0)
    mq = np.flatnonzero(marks == 2)
    groups = {}
    for j in mq:
        groups.setdefault((int(ids[j]), int(cams[j])), []).append(j)
    out = {'ids': ids[q], 'cams': cams[q], 'marks': marks[q]}
    for key in ('global', 'local'):
        if key not in feats:
            continue
        f = feats[key]
        pooled = f[q].copy()
        for row, i in enumerate(q):
            extra = groups.get((int(ids[i]), int(cams[i])))
            if not extra:
                continue
            stack = f[np.concatenate([[i], extra])]
            pooled[row] = stack.mean(0) if mode == 'avg' else stack.max(0)
        out[key] = pooled
    return out


# ----------------------------------------------------------------------------- ranking

def _to_numpy(x, name, dtype=None):
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if dtype is not None:
        x = x.astype(dtype, copy=False)
    return x


def evaluate_rank(distmat, q_ids, g_ids, q_cams, g_cams, max_rank=50, ap_mode='standard',
                  separate_camera_set=False, single_gallery_shot=False, first_match_break=True,
                  repeats=10, seed=0, block_rows=None):
    """CMC, mAP and mINP of a query x gallery distance matrix under the Market-1501 protocol.

    distmat [Q, G] (smaller = more similar), q_ids/q_cams [Q], g_ids/g_cams [G].
    Protocol, per query:
      * gallery items with the query's id AND camera are removed, and so are junk items
        (gallery id < 0, as the official Market-1501 code does); distractors (id 0) stay and
        never match a query (query ids are > 0);
      * separate_camera_set=True also removes every gallery item of the query's camera;
      * the remaining gallery is ranked by ascending distance; equal distances are ordered by
        gallery index (a stable sort), so results are deterministic;
      * a query with no remaining match is skipped and counted in num_skipped.
    CMC (first_match_break=True): cmc[k] = fraction of valid queries whose first match is within
    the top k+1 (cmc[0] is Rank-1). With first_match_break=False (the classic CUHK03 form) each
    of a query's n matches adds 1/n at its rank among the non-matches. single_gallery_shot=True
    (CUHK03): for the CMC, one gallery item per identity is drawn at random among the kept
    ones, `repeats` times with np.random.default_rng(seed), and the CMCs are averaged.
    AP over all kept items (the single-shot draw does not touch it), with n good matches at
    0-based kept positions r_1 < ... < r_n:
      * ap_mode='standard': non-interpolated, AP = (1/n) sum_i i / (r_i + 1);
      * ap_mode='market_official': trapezoid rule of the official Market-1501 evaluation code
        (compute_AP.m), AP = (1/n) sum_i (p_old_i + i / (r_i + 1)) / 2 with
        p_old_i = (i - 1) / r_i, or 1 if r_i == 0.
    INP (Ye et al., mINP) = n / (r_n + 1).

    Returns a dict: 'cmc' np.float64 [max_rank], 'mAP', 'mINP' (floats in [0, 1]), 'all_AP' and
    'all_INP' [num_valid_queries], 'valid' bool [Q] (queries not skipped), 'num_valid_queries',
    'num_skipped'."""
    if ap_mode not in AP_MODES:
        raise ValueError(f"ap_mode must be one of {AP_MODES}, got {ap_mode!r}")
    distmat = _to_numpy(distmat, 'distmat')
    if distmat.dtype not in (np.float32, np.float64):
        distmat = distmat.astype(np.float64)
    q_ids, g_ids = _to_numpy(q_ids, 'q_ids', np.int64), _to_numpy(g_ids, 'g_ids', np.int64)
    q_cams, g_cams = _to_numpy(q_cams, 'q_cams', np.int64), _to_numpy(g_cams, 'g_cams', np.int64)
    Q, G = distmat.shape if distmat.ndim == 2 else (None, None)
    if distmat.ndim != 2 or q_ids.shape != (Q,) or q_cams.shape != (Q,) or \
            g_ids.shape != (G,) or g_cams.shape != (G,):
        raise ValueError(f"evaluate_rank: distmat {distmat.shape} does not fit q_ids "
                         f"{q_ids.shape}, q_cams {q_cams.shape}, g_ids {g_ids.shape}, "
                         f"g_cams {g_cams.shape}")
    if max_rank < 1:
        raise ValueError(f"evaluate_rank: max_rank must be >= 1, got {max_rank}")
    if Q == 0 or G == 0:
        raise ValueError(f"evaluate_rank: empty distmat {distmat.shape}")
    if distmat.size and np.isnan(np.max(distmat)):              # max propagates NaN
        raise ValueError("evaluate_rank: distmat holds NaN")
    has_junk = bool((g_ids < 0).any())
    block = block_rows or max(1, _BLOCK_ELEMENTS // max(1, G))
    rows, kept = _good_ranks(distmat, q_ids, g_ids, q_cams, g_cams, separate_camera_set, block)
    ss_orders = {}
    if single_gallery_shot:
        for qi in np.unique(rows):
            ss_orders[qi] = np.argsort(distmat[qi], kind='stable')
    kept = kept.astype(np.float64)

    num_good = np.bincount(rows, minlength=Q)
    valid = num_good > 0
    num_valid = int(valid.sum())
    if num_valid == 0:
        raise ValueError("evaluate_rank: no query has a matching gallery item under the "
                         "protocol (check ids and cameras)")
    starts = np.concatenate([[0], np.cumsum(num_good)[:-1]])    # first event of each row
    i = np.arange(len(rows)) - starts[rows] + 1.                 # 1-based match index
    precision = i / (kept + 1.)
    if ap_mode == 'standard':
        contrib = precision
    else:
        old = np.where(kept > 0, (i - 1.) / np.maximum(kept, 1.), 1.)
        contrib = (old + precision) / 2.
    ap = np.bincount(rows, weights=contrib, minlength=Q)[valid] / num_good[valid]
    last = starts + num_good - 1
    inp = num_good[valid] / (kept[last[valid]] + 1.)

    cmc = np.zeros(max_rank, dtype=np.float64)
    if single_gallery_shot:
        cmc = _single_shot_cmc(ss_orders, q_ids, g_ids, g_cams, q_cams, has_junk,
                               separate_camera_set, first_match_break, max_rank, repeats, seed)
    elif first_match_break:
        first = kept[starts[valid]].astype(np.int64)
        cmc += np.bincount(np.minimum(first, max_rank), minlength=max_rank + 1)[:max_rank]
    else:
        shifted = (kept - (i - 1.)).astype(np.int64)            # rank among non-matches
        w = 1. / num_good[rows]
        inside = shifted < max_rank
        cmc += np.bincount(shifted[inside], weights=w[inside], minlength=max_rank)
    cmc = np.cumsum(cmc) / num_valid
    return {'cmc': cmc, 'mAP': float(ap.mean()), 'mINP': float(inp.mean()), 'all_AP': ap,
            'all_INP': inp, 'valid': valid, 'num_valid_queries': num_valid,
            'num_skipped': int(Q - num_valid)}


def _good_ranks(distmat, q_ids, g_ids, q_cams, g_cams, separate_camera_set, block):
    """Every good match (same id, other camera, id >= 0) of every query and its 0-based
    position among the query's kept gallery items, ordered by (distance, gallery index).

    Instead of arg-sorting each row, the kept distances of a row block are sorted as values
    (removed items masked with NaN, which sorts last) and each good item's position is read
    by binary search; only a good item whose distance is shared by another kept item needs a
    direct count to apply the index tie rule. Row blocks run on a few threads (numpy releases
    the GIL while sorting). Returns (rows [E], kept [E]) sorted by row, then position."""
    Q, G = distmat.shape
    by_id = np.argsort(g_ids, kind='stable')                     # gallery grouped by id
    ids_sorted = g_ids[by_id]
    lo = np.searchsorted(ids_sorted, q_ids, 'left')
    hi = np.searchsorted(ids_sorted, q_ids, 'right')
    junk = np.flatnonzero(g_ids < 0)

    def one_block(s):
        e = min(Q, s + block)
        n = hi[s:e] - lo[s:e]
        r = np.repeat(np.arange(e - s), n)                       # same-id pairs (row, item)
        j = by_id[np.repeat(lo[s:e], n) + np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)]
        same_cam = g_cams[j] == q_cams[s + r]
        dist = distmat[s:e]
        masked = np.array(dist, copy=True)
        masked[r[same_cam], j[same_cam]] = np.nan
        if len(junk):
            masked[:, junk] = np.nan
        if separate_camera_set:
            masked[g_cams[None, :] == q_cams[s:e, None]] = np.nan
        masked.sort(axis=1)                                      # kept values, NaN last
        good = ~same_cam & (g_ids[j] >= 0)
        r, j = r[good], j[good]
        v = dist[r, j]
        pos = np.empty(len(r), dtype=np.int64)
        tied = np.zeros(len(r), dtype=bool)
        bounds = np.concatenate([[0], np.cumsum(np.bincount(r, minlength=e - s))])
        for row in np.flatnonzero(np.diff(bounds)):
            a, b = bounds[row], bounds[row + 1]
            left = np.searchsorted(masked[row], v[a:b], 'left')
            pos[a:b] = left
            tied[a:b] = np.searchsorted(masked[row], v[a:b], 'right') - left > 1
        for t in np.flatnonzero(tied):                           # equal distances: index order
            keep = _kept_mask(s + r[t], q_ids, g_ids, q_cams, g_cams, separate_camera_set)
            pos[t] += np.count_nonzero(keep[:j[t]] & (dist[r[t], :j[t]] == v[t]))
        return r + s, pos

    starts = range(0, Q, block)
    workers = min(4, os.cpu_count() or 1, len(starts))
    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            parts = list(pool.map(one_block, starts))
    else:
        parts = [one_block(s) for s in starts]
    rows = np.concatenate([p[0] for p in parts])
    kept = np.concatenate([p[1] for p in parts])
    order = np.lexsort((kept, rows))
    return rows[order], kept[order]


def _kept_mask(qi, q_ids, g_ids, q_cams, g_cams, separate_camera_set):
    """Gallery items [G] that stay in query qi's ranking under the protocol."""
    keep = ~((g_ids == q_ids[qi]) & (g_cams == q_cams[qi])) & (g_ids >= 0)
    if separate_camera_set:
        keep &= g_cams != q_cams[qi]
    return keep


def _single_shot_cmc(orders, q_ids, g_ids, g_cams, q_cams, has_junk, separate_camera_set,
                     first_match_break, max_rank, repeats, seed):
    """CMC histogram (not yet cumulated) with one random gallery item per identity,
    averaged over `repeats` draws; queries in ascending order, draws from one seeded rng."""
    rng = np.random.default_rng(seed)
    hist = np.zeros(max_rank, dtype=np.float64)
    for qi in sorted(orders):
        order = orders[qi]
        ids = g_ids[order]
        cams = g_cams[order]
        keep = ~((ids == q_ids[qi]) & (cams == q_cams[qi]))
        if has_junk:
            keep &= ids >= 0
        if separate_camera_set:
            keep &= cams != q_cams[qi]
        ids = ids[keep]                                         # kept gallery ids, ranked
        for _ in range(repeats):
            # one item per id: the one with the largest random key inside its id group
            key = rng.random(len(ids))
            by = np.lexsort((-key, ids))
            first_of_id = np.ones(len(by), dtype=bool)
            first_of_id[1:] = ids[by][1:] != ids[by][:-1]
            picked = np.sort(by[first_of_id])                  # ranked positions of the draw
            hits = np.flatnonzero(ids[picked] == q_ids[qi])
            if first_match_break:
                if hits[0] < max_rank:
                    hist[hits[0]] += 1. / repeats
            else:
                for j, k in enumerate(hits):
                    if k - j < max_rank:
                        hist[k - j] += 1. / (len(hits) * repeats)
    return hist


# ----------------------------------------------------------------------------- evaluate

def evaluate(feats, distances=('global',), re_rank=False, ap_mode='standard', multi_query=None,
             normalize=False, metric='euclidean', max_rank=50, k1=20, k2=6, lambda_value=0.3,
             device=None):
    """From extract_features' dict to metrics for every requested distance.

    feats: dict with 'global' / 'local' features and 'ids', 'cams', 'marks' (0 query,
    1 gallery, 2 multi-query; mark 2 images are used only with multi_query='avg'|'max').
    distances: names from ('global', 'local', 'global_local'). re_rank=True adds the
    k-reciprocal re-ranked result (k1, k2, lambda_value) of each distance, computed from the
    features by re_ranking.re_ranking_features (no dense (Q+G)^2 matrix is held).
    normalize / metric as for compute_dist (metric applies to 'global' only); device: where
    the distances and the re-ranking are computed ('cpu', 'cuda', ...; default: the CPU for
    numpy features); ap_mode and max_rank as for evaluate_rank.
    Returns {name: evaluate_rank dict}, names like 'global', 'global+re_rank'."""
    from .re_ranking import re_ranking_features

    if isinstance(distances, str):
        distances = (distances,)
    marks = np.asarray(feats['marks'])
    q_sel, g_sel = marks == 0, marks == 1
    if not q_sel.any() or not g_sel.any():
        raise ValueError(f"evaluate: need mark 0 (query) and mark 1 (gallery) images, got "
                         f"{int(q_sel.sum())} queries and {int(g_sel.sum())} gallery images")
    pick = lambda sel: {k: v[sel] for k, v in feats.items() if k in ('global', 'local')}
    if multi_query is not None:
        q = pool_multi_query(feats, multi_query)
        qf = {k: v for k, v in q.items() if k in ('global', 'local')}
    else:
        qf = pick(q_sel)
    gf = pick(g_sel)
    ids, cams = np.asarray(feats['ids']), np.asarray(feats['cams'])
    q_ids, q_cams, g_ids, g_cams = ids[q_sel], cams[q_sel], ids[g_sel], cams[g_sel]
    results = {}
    for name in distances:
        kw = dict(distance=name, normalize=normalize, metric=metric if name == 'global' else
                  'euclidean', device=device)
        q_g = compute_dist(qf, gf, **kw)
        results[name] = evaluate_rank(q_g, q_ids, g_ids, q_cams, g_cams, max_rank=max_rank,
                                      ap_mode=ap_mode)
        if re_rank:
            rr = re_ranking_features(qf, gf, k1=k1, k2=k2, lambda_value=lambda_value, **kw)
            results[name + '+re_rank'] = evaluate_rank(rr, q_ids, g_ids, q_cams, g_cams,
                                                       max_rank=max_rank, ap_mode=ap_mode)
    return results



def test_split(model, partitions, im_dir, split, device, resize_h_w, mean, std, batch_size=64, workers=4,
               distances=('global',), re_rank=False, ap_mode='standard', normalize=False, multi_query='none',
               flip=False, amp=False):
    """Extracts the features of a split ('test' or 'val') of a partitions dict (aligned_reid.data) with
    `model` (images from `im_dir`, resized to resize_h_w and normalised by mean / std) and evaluates them
    (`evaluate`). Returns (features dict of extract_features, results dict of evaluate)."""
    device = torch.device(device)
    transform = data.build_transform(tuple(resize_h_w), train=False, mean=mean, std=std)
    names, marks = test_images(partitions, split, multi_query)  # no unused mark-2 images
    loader = data.make_test_loader(im_dir, names, marks, transform, batch_size=batch_size, workers=workers,
                                   pin_memory=device.type == 'cuda')
    feats = extract_features(model, loader, device, flip=flip, amp=amp and device.type == 'cuda')
    results = evaluate(feats, distances=distances, re_rank=re_rank, ap_mode=ap_mode,
                       multi_query=None if multi_query in (None, 'none') else multi_query, normalize=normalize,
                       device=device)
    return feats, results


def metrics_summary(results):
    """Plain-float summary of aligned_reid.evaluation.evaluate results for metrics.json:
    name -> rank1, rank5, rank10, mAP, cmc (to rank 50), and mINP / query counts when present."""
    out = {}
    for name, r in results.items():
        cmc = np.asarray(r['cmc'], dtype=float)
        row = {'rank1': float(cmc[0]), 'rank5': float(cmc[min(4, len(cmc) - 1)]),
               'rank10': float(cmc[min(9, len(cmc) - 1)]), 'mAP': float(r['mAP']), 'cmc': cmc[:50].tolist()}
        for k in ('mINP', 'num_valid_queries', 'num_skipped'):
            if k in r:
                row[k] = float(r[k])
        out[name] = row
    return out


def metrics_record(results, train_dataset, test_dataset, test_partitions, ap_mode, **settings):
    """The metrics.json record of a test: what was tested on what, `settings` (any further plain values),
    and metrics_summary(results) under 'results'."""
    record = {'train_dataset': train_dataset, 'test_dataset': test_dataset, 'test_partitions': test_partitions,
              'ap_mode': ap_mode, 'results': metrics_summary(results)}
    record.update(settings)
    return record

def format_table(results):
    """Markdown table in the form of the original README: one row per distance with Rank-1,
    mAP, Rank-1 and mAP after re-ranking (when present), then Rank-5, Rank-10, mINP (%)."""
    def pct(m, key):
        if m is None:
            return '-'
        if key.startswith('r'):
            k = int(key[1:])
            return f"{100. * m['cmc'][k - 1]:.2f}" if len(m['cmc']) >= k else '-'
        return f"{100. * m[key]:.2f}"

    bases = [name for name in results if not name.endswith('+re_rank')]
    bases += [name[:-len('+re_rank')] for name in results if name.endswith('+re_rank')
              and name[:-len('+re_rank')] not in bases]
    lines = ["|   | Rank-1 (%) | mAP (%) | Rank-1 (%) after Re-ranking | mAP (%) after Re-ranking "
             "| Rank-5 (%) | Rank-10 (%) | mINP (%) |",
             "| --- | :---: | :---: | :---: | :---: | :---: | :---: | :---: |"]
    for name in bases:
        m, rr = results.get(name), results.get(name + '+re_rank')
        lines.append(f"| test with {name.replace('_', ' + ')} distance | {pct(m, 'r1')} | "
                     f"{pct(m, 'mAP')} | {pct(rr, 'r1')} | {pct(rr, 'mAP')} | {pct(m, 'r5')} | "
                     f"{pct(m, 'r10')} | {pct(m, 'mINP')} |")
    return '\n'.join(lines)
