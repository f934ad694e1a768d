"""Tests for aligned_reid.re_ranking against a dense, loop-based transcription of the published
k-reciprocal re-ranking algorithm, and of the features entry against the matrix entry."""

import numpy as np
import pytest
import torch

from aligned_reid.evaluation import compute_dist
from aligned_reid.re_ranking import re_ranking, re_ranking_features


def dense_reference(q_g, q_q, g_g, k1, k2, lam):
    """Zhong et al. (CVPR 2017) step by step on the dense (Q+G)^2 matrices."""
    Q = q_g.shape[0]
    D = np.block([[q_q, q_g], [q_g.T, g_g]])
    D = np.power(D, 2).astype(np.float32)
    D = np.transpose(D / np.max(D, axis=0))
    N = D.shape[0]
    rank = np.argsort(D, axis=1, kind='stable')
    V = np.zeros_like(D)

    def recip(i, k):
        fwd = rank[i, :k + 1]
        return np.array([j for j in fwd if i in rank[j, :k + 1]], dtype=np.int64)

    half = int(np.around(k1 / 2.))
    for i in range(N):
        R = recip(i, k1)
        expanded = list(R)
        for c in R:
            Hc = recip(c, half)
            if len(np.intersect1d(Hc, R)) > 2. / 3 * len(Hc):
                expanded.extend(Hc)
        expanded = np.unique(np.array(expanded, dtype=np.int64))
        w = np.exp(-D[i, expanded])
        V[i, expanded] = w / np.sum(w)
    if k2 != 1:
        V = np.stack([V[rank[i, :k2]].mean(0) for i in range(N)])
    jac = np.zeros((Q, N), dtype=np.float32)
    for i in range(Q):
        for j in range(N):
            t = np.minimum(V[i], V[j]).sum()
            jac[i, j] = 1 - t / (2 - t)
    final = jac * (1 - lam) + D[:Q] * lam
    return final[:, Q:]


def clustered(rng, n, dim, num_ids, spread=0.6):
    centres = rng.standard_normal((num_ids, dim))
    ids = rng.integers(0, num_ids, n)
    return (centres[ids] + spread * rng.standard_normal((n, dim))).astype(np.float32), ids


@pytest.mark.parametrize("k1,k2,lam", [(20, 6, 0.3), (5, 1, 0.5), (7, 3, 0.0)])
def test_matches_dense_reference(k1, k2, lam):
    rng = np.random.default_rng(k1 * 10 + k2)
    q, _ = clustered(rng, 60, 16, 25)
    g, _ = clustered(rng, 240, 16, 25)
    q_g, q_q, g_g = compute_dist(q, g), compute_dist(q, q), compute_dist(g, g)
    ref = dense_reference(q_g, q_q, g_g, k1, k2, lam)
    out = re_ranking(q_g, q_q, g_g, k1=k1, k2=k2, lambda_value=lam)
    assert out.shape == (60, 240) and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-5)
    # the re-ranking changes the order somewhere (the test can fail)
    assert not np.allclose(np.argsort(out, 1), np.argsort(q_g, 1))


def test_asymmetric_and_float64_inputs():
    # Column-max normalisation and transposition follow the published code even when the
    # given matrices are not exactly symmetric.
    rng = np.random.default_rng(1)
    q_g = rng.random((20, 60))
    q_q = rng.random((20, 20))
    g_g = rng.random((60, 60))
    ref = dense_reference(q_g, q_q, g_g, 6, 3, 0.3)
    np.testing.assert_allclose(re_ranking(q_g, q_q, g_g, k1=6, k2=3), ref, atol=1e-5)
    np.testing.assert_allclose(re_ranking(torch.from_numpy(q_g), q_q, g_g, k1=6, k2=3), ref,
                               atol=1e-5)


@pytest.mark.parametrize("distance", ['global', 'local', 'global_local'])
def test_features_entry_equals_matrix_entry(distance):
    rng = np.random.default_rng(3)
    qf, _ = clustered(rng, 30, 24, 10)
    gf, _ = clustered(rng, 120, 24, 10)
    q = {'global': qf, 'local': qf.reshape(30, 4, 6)}
    g = {'global': gf, 'local': gf.reshape(120, 4, 6)}
    mats = [compute_dist(a, b, distance) for a, b in ((q, g), (q, q), (g, g))]
    want = re_ranking(*mats, k1=8, k2=3)
    got = re_ranking_features(q, g, distance, k1=8, k2=3, block_rows=17)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("distance,normalize,metric", [
    ('global', True, 'euclidean'), ('global', False, 'cosine'), ('global', True, 'cosine'),
    ('local', True, 'euclidean'), ('global_local', True, 'euclidean')])
def test_features_entry_options(distance, normalize, metric):
    # features normalised once for every block, the cosine distance through dist_block
    rng = np.random.default_rng(6)
    qf, _ = clustered(rng, 30, 24, 10)
    gf, _ = clustered(rng, 110, 24, 10)
    q = {'global': qf, 'local': qf.reshape(30, 4, 6)}
    g = {'global': gf, 'local': gf.reshape(110, 4, 6)}
    kw = dict(distance=distance, normalize=normalize, metric=metric)
    mats = [compute_dist(a, b, **kw) for a, b in ((q, g), (q, q), (g, g))]
    want = dense_reference(*mats, 8, 3, 0.3)
    np.testing.assert_allclose(re_ranking_features(q, g, k1=8, k2=3, block_rows=11, **kw), want,
                               rtol=0, atol=1e-5)


def test_features_entry_normalized_and_bad_name():
    rng = np.random.default_rng(4)
    q, _ = clustered(rng, 25, 12, 8)
    g, _ = clustered(rng, 70, 12, 8)
    mats = [compute_dist(a, b, normalize=True) for a, b in ((q, g), (q, q), (g, g))]
    np.testing.assert_allclose(re_ranking_features(q, g, normalize=True, k1=6),
                               re_ranking(*mats, k1=6), atol=1e-5)
    with pytest.raises(ValueError, match="distance must be one of"):
        re_ranking_features(q, g, distance='cos')
    with pytest.raises(ValueError, match="shapes do not fit"):
        re_ranking(mats[0], mats[2], mats[1])


def test_sq_euclidean_factors():
    # one matmul of the factors gives the squared distances (before the clamp at 0)
    from aligned_reid.distance import sq_euclidean_factors
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((7, 5)), rng.standard_normal((9, 5))
    a, b = sq_euclidean_factors(torch.from_numpy(x), torch.from_numpy(y))
    want = ((x[:, None] - y[None]) ** 2).sum(-1)
    np.testing.assert_allclose((a @ b.T).numpy(), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk", [None, 8, 3])
@pytest.mark.parametrize("n,K", [(500, 21), (333, 7), (1000, 11), (155, 5), (97, 3)])
def test_nearest_selection_is_a_stable_sort(n, K, chunk, monkeypatch):
    # the top-K search (whole rows, or the K + 1 column chunks of smallest minima and the
    # columns after the last chunk) must equal the head of a stable argsort of
    # T = max(d2, 0) / m, ties and negative values (a rounded distance 0) included
    import aligned_reid.re_ranking as rr
    if chunk is not None:
        monkeypatch.setattr(rr, '_CHUNK_COLUMNS', chunk)
    rng = np.random.default_rng(n + K)
    d2 = rng.random((50, n)).astype(np.float32)
    d2[:10] = rng.integers(0, 30, (10, n)).astype(np.float32)   # many exact ties
    d2[10:20] = (d2[10:20] * 1e-3 + 1).astype(np.float32)        # ties created by the division
    d2[20:30] -= np.float32(0.5)                                 # negatives: all read as 0
    d2[30:40, rng.integers(0, n, 4)] = -1e-6                     # a few negatives in each row
    d2[40:45, :n // 2] = d2[40:45, n // 2:n // 2 * 2]            # each value twice
    m = np.maximum(d2.max(1), 0.1) * np.float32(3.3)
    want = np.argsort(np.maximum(d2, 0) / m[:, None], axis=1, kind='stable')[:, :K]
    mins = None
    tiles = [n]
    if chunk is not None:
        C = n // chunk
        mins = torch.from_numpy(d2[:, :C * chunk].reshape(len(d2), C, chunk).min(2))
        tiles += [chunk, 5 * chunk]
    for tile in tiles:                  # the row block stored in tiles of `tile` columns
        flat = torch.cat([torch.from_numpy(d2[:, c:c + tile]).reshape(-1) for c in range(0, n, tile)])
        block = rr._RowBlock(flat, len(d2), n, tile)
        np.testing.assert_array_equal(block.rows().numpy(), d2)
        got = rr._nearest(block, mins, torch.from_numpy(m), K).numpy()
        np.testing.assert_array_equal(got, want)


def test_duplicate_images_ties():
    # Duplicated gallery images give exactly tied distances; the tie order is the stable one.
    rng = np.random.default_rng(9)
    q, _ = clustered(rng, 30, 8, 10)
    g, _ = clustered(rng, 90, 8, 10)
    g = np.concatenate([g, g[:30], q[:5]])
    mats = [compute_dist(a, b) for a, b in ((q, g), (q, q), (g, g))]
    for k1, k2 in ((6, 3), (3, 2)):
        np.testing.assert_allclose(re_ranking(*mats, k1=k1, k2=k2),
                                   dense_reference(*mats, k1, k2, 0.3), rtol=0, atol=1e-5)


@pytest.mark.parametrize("small", [False, True])
def test_features_entry_exact_duplicates(small, monkeypatch):
    # Identical features of a realistic norm (about 34) are exactly 0 apart in compute_dist and
    # near-duplicates their true tiny distance; the features entry's tiles must say so too (the
    # expanded form is off by up to 5e-4 in d^2 there, which reordered the neighbours: 0.7 off).
    # Each of 6 features is repeated more than k1 + 1 times, so that order decides the sets.
    import aligned_reid.re_ranking as rr
    if small:                     # chunked top-k search, several tiles, columns after the chunks
        monkeypatch.setattr(rr, '_CHUNK_COLUMNS', 4)
        monkeypatch.setattr(rr, '_TILE_ELEMENTS', 17 * 40)
    g = torch.Generator().manual_seed(1)
    base = torch.rand(6, 256, generator=g) * 3.7                # post-ReLU-like, norm ~ 34
    ids = torch.randint(0, 6, (303,), generator=g)
    f = base[ids]
    f[::3] += 1e-5 * torch.rand(len(f[::3]), 256, generator=g)   # near-duplicates, d^2 ~ 1e-8
    q, gal = f[:40].numpy(), f[40:].numpy()
    mats = [compute_dist(a, b) for a, b in ((q, gal), (q, q), (gal, gal))]
    for k2 in (1, 6):
        np.testing.assert_allclose(re_ranking_features(q, gal, k1=20, k2=k2, block_rows=17),
                                   re_ranking(*mats, k1=20, k2=k2), rtol=0, atol=1e-5)


def test_exact_near_with_chunk_minima():
    # the chunk-minima shortcut finds the same entries as the full comparison, and the minima of
    # the chunks it changed are the minima again
    from aligned_reid.distance import exact_near, sq_euclidean_factors
    g = torch.Generator().manual_seed(3)
    x = torch.rand(9, 64, generator=g) * 4.
    y = torch.cat([x[[0, 0, 3, 5]], torch.rand(30, 64, generator=g) * 4., x[[8, 8, 1]]])
    a, b = sq_euclidean_factors(x, y)
    d2 = a @ b.T                                                # [9, 37]: 32 in chunks, 5 after
    xx, yy = a[:, -2], b[:, -1]

    def pair_sq(i, j):
        return (x[i] - y[j]).pow(2).sum(1)

    full = exact_near(d2.clone(), xx, yy, pair_sq)
    want = torch.cdist(x.double(), y.double()).pow(2)
    assert (full[[0, 0, 3, 5, 8, 8, 1], [0, 1, 2, 3, 34, 35, 36]] == 0).all()
    np.testing.assert_allclose(full.numpy(), want.numpy(), rtol=1e-4, atol=1e-3)
    for width in (4, 8, 32):
        c = 32 // width
        mins = d2[:, :c * width].view(9, c, width).amin(2)
        got = exact_near(d2.clone(), xx, yy, pair_sq, mins, width)
        assert torch.equal(got, full)
        assert torch.equal(mins, got[:, :c * width].view(9, c, width).amin(2))


def test_tight_clusters_full_size_sets():
    # Well separated identities with more images than k1: every k-reciprocal set is full and
    # many expansions are accepted (the heavy case at Market-1501 scale).
    rng = np.random.default_rng(21)
    f, _ = clustered(rng, 330, 32, 11, spread=0.3)
    q, g = f[:50], f[50:]
    mats = [compute_dist(a, b) for a, b in ((q, g), (q, q), (g, g))]
    np.testing.assert_allclose(re_ranking(*mats), dense_reference(*mats, 20, 6, 0.3),
                               rtol=0, atol=1e-5)


def test_tied_distances_in_the_matrices():
    # Integer distances tie everywhere: neighbour order must follow the stable (index) rule.
    rng = np.random.default_rng(5)
    f = rng.integers(0, 4, (90, 3)).astype(np.float64)
    d = np.abs(f[:, None] - f[None]).sum(-1)                    # L1 distances, symmetric
    q_g, q_q, g_g = d[:20, 20:], d[:20, :20], d[20:, 20:]
    for k1, k2 in ((6, 3), (20, 6)):
        np.testing.assert_allclose(re_ranking(q_g, q_q, g_g, k1=k1, k2=k2),
                                   dense_reference(q_g, q_q, g_g, k1, k2, 0.3), rtol=0, atol=1e-5)


def test_small_blocks(monkeypatch):
    # Tiny block and pair budgets: every blocked loop runs many times, a row alone over the
    # budget goes in its own block.
    import aligned_reid.re_ranking as rr
    rng = np.random.default_rng(8)
    q, _ = clustered(rng, 40, 8, 12)
    g, _ = clustered(rng, 150, 8, 12)
    mats = [compute_dist(a, b) for a, b in ((q, g), (q, q), (g, g))]
    want = dense_reference(*mats, 10, 4, 0.3)
    monkeypatch.setattr(rr, '_ROW_BLOCK_ELEMENTS', 700)
    monkeypatch.setattr(rr, '_BLOCK_ELEMENTS', 700)
    monkeypatch.setattr(rr, '_PAIR_BUDGET', 50)
    monkeypatch.setattr(rr, '_CHUNK_COLUMNS', 4)
    monkeypatch.setattr(rr, '_TILE_ELEMENTS', 13 * 3)    # 3-row blocks: 12-column tiles
    np.testing.assert_allclose(re_ranking(*mats, k1=10, k2=4), want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(re_ranking_features(q, g, k1=10, k2=4), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("k1,k2", [(20, 6), (4, 1), (500, 3)])
def test_tiny_sets_and_k_above_size(k1, k2):
    # k1 larger than the number of images, one query, one gallery image
    rng = np.random.default_rng(k1)
    for Q, G in ((1, 1), (3, 7), (1, 30)):
        q, g = rng.random((Q, 5)), rng.random((G, 5))
        mats = [compute_dist(a, b) for a, b in ((q, g), (q, q), (g, g))]
        np.testing.assert_allclose(re_ranking(*mats, k1=k1, k2=k2),
                                   dense_reference(*mats, k1, k2, 0.3), rtol=0, atol=1e-5)


def _devices():
    devs = ['cpu']
    if torch.cuda.is_available():
        devs.append('cuda')
    return devs


@pytest.mark.parametrize("device", _devices())
def test_device_path_matrices(device):
    # torch tensors on a device (or device=...) run there and give the CPU path's result
    rng = np.random.default_rng(12)
    q, _ = clustered(rng, 45, 16, 15)
    g, _ = clustered(rng, 160, 16, 15)
    mats = [compute_dist(a, b) for a, b in ((q, g), (q, q), (g, g))]
    want = dense_reference(*mats, 20, 6, 0.3)
    on_dev = [torch.from_numpy(m).to(device) for m in mats]
    got = re_ranking(*on_dev)
    assert isinstance(got, np.ndarray) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(re_ranking(*mats, device=device), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("distance", ['global', 'local', 'global_local'])
def test_device_path_features(device, distance):
    rng = np.random.default_rng(13)
    qf, _ = clustered(rng, 35, 24, 12)
    gf, _ = clustered(rng, 140, 24, 12)
    q = {'global': qf, 'local': qf.reshape(35, 4, 6)}
    g = {'global': gf, 'local': gf.reshape(140, 4, 6)}
    mats = [compute_dist(a, b, distance) for a, b in ((q, g), (q, q), (g, g))]
    want = dense_reference(*mats, 20, 6, 0.3)
    tq = {k: torch.from_numpy(v).to(device) for k, v in q.items()}
    tg = {k: torch.from_numpy(v).to(device) for k, v in g.items()}
    np.testing.assert_allclose(re_ranking_features(tq, tg, distance), want, rtol=0, atol=1e-5)
    np.testing.assert_allclose(re_ranking_features(q, g, distance, device=device, block_rows=13),
                               want, rtol=0, atol=1e-5)
