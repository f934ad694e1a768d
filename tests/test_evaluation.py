"""Tests for aligned_reid.evaluation: evaluate_rank against a brute-force per-query reference
(both AP formulas, ties, skipped queries, distractors, junk), known answers, pooling, test-time
features and evaluate(). The distances are in test_distance.py."""

import numpy as np
import pytest
import torch

from aligned_reid import evaluation as ev


def reference_rank(distmat, q_ids, g_ids, q_cams, g_cams, max_rank, ap_mode,
                   separate_camera_set=False, first_match_break=True):
    """Per-query loop written straight from the protocol: stable sort (distance, then index),
    drop same id + same camera and junk (id < 0), walk the list."""
    cmc = np.zeros(max_rank)
    aps, inps, valid = [], [], []
    for i in range(len(q_ids)):
        order = sorted(range(len(g_ids)), key=lambda j: (distmat[i, j], j))
        kept = [j for j in order
                if not (g_ids[j] == q_ids[i] and g_cams[j] == q_cams[i]) and g_ids[j] >= 0
                and not (separate_camera_set and g_cams[j] == q_cams[i])]
        hits = [r for r, j in enumerate(kept) if g_ids[j] == q_ids[i]]
        valid.append(bool(hits))
        if not hits:
            continue
        n = len(hits)
        ap = 0.
        for k, r in enumerate(hits, start=1):
            prec = k / (r + 1)
            if ap_mode == 'standard':
                ap += prec / n
            else:
                old = (k - 1) / r if r != 0 else 1.
                ap += (old + prec) / 2 / n
        aps.append(ap)
        inps.append(n / (hits[-1] + 1))
        if first_match_break:
            for k in range(hits[0], max_rank):
                cmc[k] += 1
        else:
            for j, r in enumerate(hits):
                for k in range(r - j, max_rank):
                    cmc[k] += 1. / n
    nv = sum(valid)
    return cmc / nv, np.mean(aps), np.mean(inps), np.array(aps), np.array(valid)


def random_case(rng, Q, G, num_ids, num_cams, ties=False, junk=False):
    g_ids = rng.integers(0, num_ids, G)          # id 0 = distractors
    g_cams = rng.integers(1, num_cams + 1, G)
    if junk:
        g_ids[rng.random(G) < 0.1] = -1
    q_ids = rng.integers(1, num_ids, Q)
    q_cams = rng.integers(1, num_cams + 1, Q)
    if ties:
        d = rng.integers(0, 4, (Q, G)).astype(np.float32)
    else:
        d = rng.random((Q, G))
        d -= 0.5 * (q_ids[:, None] == g_ids[None])  # matches tend to rank higher
    return d, q_ids, g_ids, q_cams, g_cams


@pytest.mark.parametrize("ap_mode", ev.AP_MODES)
@pytest.mark.parametrize("ties,junk,sep,fmb", [(False, False, False, True), (True, False, False, True),
                                               (False, True, False, True), (True, True, True, True),
                                               (False, False, False, False), (True, False, True, False)])
def test_evaluate_rank_matches_reference(ap_mode, ties, junk, sep, fmb):
    rng = np.random.default_rng(7 + ties + 2 * junk + 4 * sep + 8 * fmb)
    d, q_ids, g_ids, q_cams, g_cams = random_case(rng, 40, 90, 12, 3, ties, junk)
    ref_cmc, ref_map, ref_inp, ref_aps, ref_valid = reference_rank(
        d, q_ids, g_ids, q_cams, g_cams, 20, ap_mode, sep, fmb)
    out = ev.evaluate_rank(d, q_ids, g_ids, q_cams, g_cams, max_rank=20, ap_mode=ap_mode,
                           separate_camera_set=sep, first_match_break=fmb, block_rows=7)
    assert out['num_skipped'] == int((~ref_valid).sum())
    assert out['num_valid_queries'] == int(ref_valid.sum())
    np.testing.assert_array_equal(out['valid'], ref_valid)
    np.testing.assert_allclose(out['cmc'], ref_cmc, rtol=0, atol=1e-12)
    np.testing.assert_allclose(out['all_AP'], ref_aps, rtol=0, atol=1e-12)
    assert abs(out['mAP'] - ref_map) < 1e-12 and abs(out['mINP'] - ref_inp) < 1e-12


def test_skipped_queries_and_single_camera_ids():
    # id 5 is seen by camera 1 only: its query (camera 1) has nothing left and is skipped.
    d = np.array([[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]])
    out = ev.evaluate_rank(d, np.array([5, 6]), np.array([5, 5, 6, 0]), np.array([1, 1]),
                           np.array([1, 1, 2, 2]), max_rank=4)
    assert out['num_skipped'] == 1 and out['num_valid_queries'] == 1
    # query 6 (cam 1): ranking 3 (distractor), 2 (match) -> first match at rank 2
    np.testing.assert_allclose(out['cmc'], [0, 1, 1, 1])
    assert out['mAP'] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="no query"):
        ev.evaluate_rank(d[:1], np.array([5]), np.array([5, 5, 6, 0]), np.array([1]),
                         np.array([1, 1, 2, 2]))


def test_known_answer_5x5():
    # Rows: queries; columns: gallery. Query ids 1..5 cam 1, gallery ids 1..5 cam 2.
    d = np.array([[0.0, 0.5, 0.6, 0.7, 0.8],    # match first       -> rank 1, AP 1
                  [0.1, 0.4, 0.2, 0.3, 0.9],    # order 0,2,3,1: rank 4, AP 1/4
                  [0.5, 0.6, 0.1, 0.2, 0.3],    # match first       -> rank 1
                  [0.2, 0.1, 0.3, 0.4, 0.5],    # order 1,0,2,3: rank 4, AP 1/4
                  [0.3, 0.2, 0.1, 0.0, 0.4]])   # order 3,2,1,0,4: rank 5, AP 1/5
    ids = np.arange(1, 6)
    out = ev.evaluate_rank(d, ids, ids, np.ones(5), np.full(5, 2), max_rank=5)
    np.testing.assert_allclose(out['cmc'], [0.4, 0.4, 0.4, 0.8, 1.0])
    np.testing.assert_allclose(out['all_AP'], [1, 0.25, 1, 0.25, 0.2])
    assert out['mAP'] == pytest.approx(2.7 / 5)
    # one match per query: trapezoid AP = (old + 1/(r+1)) / 2 with old = 0 (or 1 at r = 0)
    off = ev.evaluate_rank(d, ids, ids, np.ones(5), np.full(5, 2), max_rank=5,
                           ap_mode='market_official')
    np.testing.assert_allclose(off['all_AP'], [1, 0.125, 1, 0.125, 0.1])


def test_trapezoid_two_matches_by_hand():
    # ranked: match, non, match -> standard (1 + 2/3)/2, official ((1+1)/2 + (1/2+2/3)/2)/2
    d = np.array([[0.1, 0.2, 0.3]])
    args = (np.array([1]), np.array([1, 2, 1]), np.array([1]), np.array([2, 2, 2]))
    std = ev.evaluate_rank(d, *args, max_rank=3)
    off = ev.evaluate_rank(d, *args, max_rank=3, ap_mode='market_official')
    assert std['mAP'] == pytest.approx((1 + 2 / 3) / 2)
    assert off['mAP'] == pytest.approx((1 + (0.5 + 2 / 3) / 2) / 2)
    assert std['mINP'] == pytest.approx(2 / 3)


def test_ties_ordered_by_gallery_index():
    d = np.zeros((1, 4), dtype=np.float32)       # every distance equal
    out = ev.evaluate_rank(d, np.array([1]), np.array([2, 1, 3, 1]), np.array([1]),
                           np.array([2, 2, 2, 2]), max_rank=4)
    np.testing.assert_allclose(out['cmc'], [0, 1, 1, 1])
    assert out['mAP'] == pytest.approx((1 / 2 + 2 / 4) / 2)


def test_monotonic_and_torch_input():
    rng = np.random.default_rng(3)
    d, q_ids, g_ids, q_cams, g_cams = random_case(rng, 30, 200, 20, 4)
    out = ev.evaluate_rank(torch.from_numpy(d), torch.from_numpy(q_ids), g_ids, q_cams, g_cams)
    assert np.all(np.diff(out['cmc']) >= 0) and out['cmc'][-1] <= 1
    assert 0 < out['mINP'] <= out['mAP'] <= 1
    assert len(out['cmc']) == 50 and len(out['all_AP']) == out['num_valid_queries']


def test_single_gallery_shot():
    # With one kept gallery item per identity the random draw changes nothing.
    rng = np.random.default_rng(5)
    g_ids = np.arange(1, 31)
    q_ids = rng.permutation(g_ids)[:20]
    d = rng.random((20, 30))
    cams_q, cams_g = np.ones(20), np.full(30, 2)
    a = ev.evaluate_rank(d, q_ids, g_ids, cams_q, cams_g, max_rank=10)
    b = ev.evaluate_rank(d, q_ids, g_ids, cams_q, cams_g, max_rank=10, single_gallery_shot=True)
    np.testing.assert_allclose(a['cmc'], b['cmc'])
    # With two items per id the single-shot rank-k is an average over draws: seeded, and
    # never below the all-gallery CMC (fewer non-matches compete).
    g2 = np.concatenate([g_ids, g_ids])
    d2 = rng.random((20, 60))
    c2 = np.full(60, 2)
    full = ev.evaluate_rank(d2, q_ids, g2, cams_q, c2, max_rank=10)
    s1 = ev.evaluate_rank(d2, q_ids, g2, cams_q, c2, max_rank=10, single_gallery_shot=True,
                          repeats=5, seed=1)
    s2 = ev.evaluate_rank(d2, q_ids, g2, cams_q, c2, max_rank=10, single_gallery_shot=True,
                          repeats=5, seed=1)
    np.testing.assert_array_equal(s1['cmc'], s2['cmc'])
    assert s1['cmc'][0] >= 0 and np.all(np.diff(s1['cmc']) >= 0)
    assert s1['mAP'] == full['mAP']


def test_multi_query_pooling():
    feats = {'global': np.arange(12, dtype=np.float32).reshape(6, 2),
             'ids': np.array([1, 1, 1, 2, 1, 2]), 'cams': np.array([1, 1, 2, 1, 1, 1]),
             'marks': np.array([0, 2, 2, 0, 2, 1])}
    avg = ev.pool_multi_query(feats, 'avg')
    # query 0 (id 1, cam 1) pools with rows 1 and 4 (id 1, cam 1, mark 2), not row 2 (cam 2)
    np.testing.assert_allclose(avg['global'][0], feats['global'][[0, 1, 4]].mean(0))
    np.testing.assert_allclose(avg['global'][1], feats['global'][3])   # nothing to pool
    mx = ev.pool_multi_query(feats, 'max')
    np.testing.assert_allclose(mx['global'][0], feats['global'][4])
    np.testing.assert_array_equal(avg['ids'], [1, 2])


class _TinyModel(torch.nn.Module):
    def forward(self, x):
        return {'global': x.mean((2, 3)), 'local': x.mean(3).transpose(1, 2)}


class _Data(torch.utils.data.Dataset):
    def __init__(self):
        self.x = torch.randn(10, 3, 4, 2, generator=torch.Generator().manual_seed(0))
        self.ids = np.array([1, 1, 2, 2, 3, 3, 1, 2, 3, 0])
        self.cams = np.array([1, 2] * 5)
        self.marks = np.array([0, 0, 0, 1, 1, 1, 1, 1, 1, 1])

    def __len__(self):
        return 10

    def __getitem__(self, i):
        return self.x[i], i


def test_extract_features_and_evaluate():
    data = _Data()
    loader = torch.utils.data.DataLoader(data, batch_size=3, shuffle=True)
    feats = ev.extract_features(_TinyModel(), loader, 'cpu', progress=False)
    np.testing.assert_allclose(feats['global'], data.x.mean((2, 3)).numpy(), atol=1e-6)
    assert feats['local'].shape == (10, 4, 3)
    flip = ev.extract_features(_TinyModel(), loader, 'cpu', flip=True, progress=False)
    np.testing.assert_allclose(flip['global'], feats['global'], atol=1e-6)  # mean is flip-invariant
    res = ev.evaluate(feats, distances=('global', 'local', 'global_local'), re_rank=True, k1=3, k2=2)
    assert set(res) == {'global', 'local', 'global_local', 'global+re_rank', 'local+re_rank',
                        'global_local+re_rank'}
    table = ev.format_table(res)
    assert table.count('\n') == 4 and 'Rank-1 (%) after Re-ranking' in table
    assert f"{100 * res['global']['cmc'][0]:.2f}" in table.splitlines()[2]


@pytest.mark.parametrize("ap_mode", ev.AP_MODES)
def test_many_ties_long_rows(ap_mode):
    # Long rows of few distinct values: the fast sort scrambles equal distances, so this
    # exercises the tie repair (the documented order is distance, then gallery index).
    rng = np.random.default_rng(11)
    d, q_ids, g_ids, q_cams, g_cams = random_case(rng, 12, 3000, 40, 3, ties=True, junk=True)
    assert not np.array_equal(np.argsort(d, 1), np.argsort(d, 1, kind='stable'))
    ref_cmc, ref_map, ref_inp, ref_aps, _ = reference_rank(d, q_ids, g_ids, q_cams, g_cams, 50,
                                                            ap_mode)
    out = ev.evaluate_rank(d, q_ids, g_ids, q_cams, g_cams, max_rank=50, ap_mode=ap_mode)
    np.testing.assert_allclose(out['cmc'], ref_cmc, atol=1e-12)
    np.testing.assert_allclose(out['all_AP'], ref_aps, atol=1e-12)
    assert abs(out['mINP'] - ref_inp) < 1e-12


def test_evaluate_multi_query_uses_pooled_queries():
    rng = np.random.default_rng(2)
    feats = {'global': rng.standard_normal((12, 4)).astype(np.float32),
             'ids': np.array([1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 0]),
             'cams': np.array([1, 1, 1, 2, 2, 2, 1, 1, 2, 1, 2, 2]),
             'marks': np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 1, 1, 1])}
    res = ev.evaluate(feats, multi_query='avg')['global']
    pooled = feats['global'][[0, 1, 2]].copy()
    pooled[0] = feats['global'][[0, 6]].mean(0)       # id 1 cam 1 has one mark-2 image
    pooled[1] = feats['global'][[1, 7]].mean(0)       # id 2 cam 1 likewise; id 3 cam 1 none
    g = feats['marks'] == 1
    want = ev.evaluate_rank(ev.compute_dist(pooled, feats['global'][g]), feats['ids'][:3],
                            feats['ids'][g], feats['cams'][:3], feats['cams'][g])
    np.testing.assert_allclose(res['all_AP'], want['all_AP'])
    np.testing.assert_allclose(res['cmc'], want['cmc'])


def test_test_images_drops_unused_multi_query_images():
    parts = {'test_im_names': ['a', 'b', 'c', 'd', 'e', 'f'], 'test_marks': [0, 1, 2, 1, 2, 0],
             'val_im_names': ['x', 'y'], 'val_marks': [1, 0]}
    for mq in (None, 'none'):
        assert ev.test_images(parts, 'test', mq) == (['a', 'b', 'd', 'f'], [0, 1, 1, 0])
    for mq in ('avg', 'max'):
        assert ev.test_images(parts, 'test', mq) == (parts['test_im_names'], parts['test_marks'])
    assert ev.test_images(parts, 'val') == (['x', 'y'], [1, 0])
    with pytest.raises(ValueError, match="multi_query"):
        ev.test_images(parts, 'test', 'mean')
    with pytest.raises(ValueError, match="test_marks"):
        ev.test_images(dict(parts, test_marks=[0, 1]), 'test')


@pytest.mark.parametrize("device", ['cpu'] + (['cuda'] if torch.cuda.is_available() else []))
def test_evaluate_on_a_device(device):
    # distances and re-ranking on `device` give the CPU results (re-ranked: the matrix entry)
    from aligned_reid.re_ranking import re_ranking
    rng = np.random.default_rng(6)
    n = 160
    ids = rng.integers(1, 20, n)
    centres = rng.standard_normal((20, 12))
    f = (centres[ids] + 0.5 * rng.standard_normal((n, 12))).astype(np.float32)
    feats = {'global': f, 'local': f.reshape(n, 3, 4), 'ids': ids,
             'cams': rng.integers(1, 4, n), 'marks': (np.arange(n) >= 40).astype(np.int64)}
    res = ev.evaluate(feats, distances=('global', 'global_local'), re_rank=True, device=device)
    q, g = feats['marks'] == 0, feats['marks'] == 1
    for name in ('global', 'global_local'):
        pick = lambda sel: {'global': f[sel], 'local': feats['local'][sel]}
        mats = [ev.compute_dist(pick(a), pick(b), name) for a, b in ((q, g), (q, q), (g, g))]
        for key, d in ((name, mats[0]), (name + '+re_rank', re_ranking(*mats))):
            want = ev.evaluate_rank(d, ids[q], ids[g], feats['cams'][q], feats['cams'][g])
            np.testing.assert_allclose(res[key]['all_AP'], want['all_AP'], atol=1e-6)
            np.testing.assert_allclose(res[key]['cmc'], want['cmc'], atol=1e-6)
