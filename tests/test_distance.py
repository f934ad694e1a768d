"""Tests of aligned_reid.distance against brute-force references (conftest.py): shortest paths by
enumerating every monotone path, per-pair local distances, Euclidean distances, the query x gallery
distances of every kind, the exact blocked top-k search and the re-ranked shortlist; gradchecks; the
public names that loss and evaluation re-export."""
import h5py
import numpy as np
import pytest
import torch

from aligned_reid import distance, evaluation, loss
from aligned_reid.distance import (_shortest_path_cells_first, _sort_keys, _unpack_keys, batch_local_dist,
                                   compute_dist, euclidean_dist, local_dist, normalize, pair_dist, rerank_shortlist,
                                   shortest_path, topk_search)
from aligned_reid.loss import compute_losses
from conftest import brute_dist, brute_global_dist, brute_local_dist, brute_shortest_path

# Tiny tensors: on a shared machine thread wake-ups would cost more than the work.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_public_names_are_the_distance_module_functions():
    for name in ('euclidean_dist', 'shortest_path', 'local_dist', 'batch_local_dist', 'normalize'):
        assert getattr(loss, name) is getattr(distance, name)
    for name in ('compute_dist', 'pair_dist', 'DISTANCES', 'METRICS'):
        assert getattr(evaluation, name) is getattr(distance, name)


def test_shortest_path_matches_enumeration():
    gen = torch.Generator().manual_seed(0)
    for m in range(1, 7):
        for n in range(1, 7):
            grid = torch.rand(3, m, n, generator=gen, dtype=torch.float64)
            got = shortest_path(grid)
            assert got.shape == (3,)
            for b in range(3):
                assert abs(got[b].item() - brute_shortest_path(grid[b])) < 1e-9, (m, n)


@pytest.mark.parametrize("schedule", ["diagonals", "rows"])
def test_sweep_on_strided_view_matches_enumeration(schedule):
    # local_dist hands the sweep a non-contiguous [m, n, B, N] view of its distance grid.
    gen = torch.Generator().manual_seed(12)
    for m in range(1, 7):
        for n in range(1, 7):
            grid = torch.rand(2, m, 3, n, generator=gen, dtype=torch.float64)
            expected = [[brute_shortest_path(grid[b, :, c]) for c in range(3)] for b in range(2)]
            got = _shortest_path_cells_first(grid.permute(1, 3, 0, 2), schedule=schedule)
            assert torch.allclose(got, torch.tensor(expected, dtype=torch.float64), atol=1e-9)


def test_schedules_have_the_same_gradient():
    # Away from ties the gradient of the shortest path sum is the indicator of its cells.
    gen = torch.Generator().manual_seed(4)
    for m, n in ((1, 4), (4, 1), (3, 5), (8, 8)):
        grid = torch.rand(m, n, 16, generator=gen, dtype=torch.float64)
        grads = []
        for schedule in ("diagonals", "rows"):
            g = grid.clone().requires_grad_(True)
            _shortest_path_cells_first(g, schedule=schedule).sum().backward()
            grads.append(g.grad)
        assert torch.equal(grads[0], grads[1]), (m, n)
        assert set(grads[0].unique().tolist()) <= {0., 1.} and (grads[0].sum((0, 1)) == m + n - 1).all()
    with pytest.raises(ValueError, match="schedule"):
        _shortest_path_cells_first(grid, schedule="columns")


def test_shortest_path_known_answers_and_shapes():
    # The cheap path zigzags: 1 -> 0 -> 0 -> 0 -> 1 beats every straight route.
    grid = torch.tensor([[1., 0., 9.], [9., 0., 0.], [9., 9., 1.]], dtype=torch.float64)
    assert shortest_path(grid).item() == 2.
    assert shortest_path(torch.arange(5.).reshape(1, 5)).item() == 10.
    assert shortest_path(torch.arange(4.).reshape(4, 1)).item() == 6.
    assert shortest_path(torch.tensor([[3.]])).item() == 3.
    assert shortest_path(torch.rand(2, 3, 4, 5)).shape == (2, 3)
    with pytest.raises(ValueError):
        shortest_path(torch.rand(5))


def test_shortest_path_gradcheck():
    gen = torch.Generator().manual_seed(1)
    for shape in [(2, 4, 3), (3, 1, 4), (2, 3, 1), (5, 5)]:
        grid = torch.rand(*shape, generator=gen, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(shortest_path, (grid,))


def test_shortest_path_gradient_marks_the_path():
    grid = torch.tensor([[1., 0., 9.], [9., 0., 0.], [9., 9., 1.]], requires_grad=True)
    shortest_path(grid).backward()
    expected = torch.tensor([[1., 1., 0.], [0., 1., 1.], [0., 0., 1.]])
    assert torch.equal(grid.grad, expected)


def test_euclidean_dist_and_normalize():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    y = torch.randn(4, 7, generator=gen, dtype=torch.float64)
    ref = torch.tensor([[(a - b).norm().item() for b in y] for a in x], dtype=torch.float64)
    assert torch.allclose(euclidean_dist(x, y), ref, atol=1e-9)
    assert torch.allclose(normalize(x).norm(dim=1), torch.ones(5, dtype=torch.float64))
    assert torch.equal(normalize(torch.zeros(2, 3)), torch.zeros(2, 3))
    # Identical rows: distance ~0 with a finite gradient (clamped before the square root).
    z = x.clone().requires_grad_(True)
    euclidean_dist(z, z).sum().backward()
    assert torch.isfinite(z.grad).all()


@pytest.mark.parametrize("aligned", [True, False])
def test_local_dist_blocked_equals_unblocked_and_brute_force(aligned):
    gen = torch.Generator().manual_seed(3)
    m = 4
    n = 3 if aligned else 4
    x = torch.randn(7, m, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(6, n, 5, generator=gen, dtype=torch.float64)
    full = local_dist(x, y, block_size=100, aligned=aligned)
    ref = torch.tensor([[brute_local_dist(a, b, aligned) for b in y] for a in x],
                       dtype=torch.float64)
    assert full.shape == (7, 6)
    assert torch.allclose(full, ref, atol=1e-9)
    for block in (1, 2, 3, 7):
        assert torch.allclose(local_dist(x, y, block_size=block, aligned=aligned), full,
                              atol=1e-12)
    # With autograd (a different sweep) the values are the same.
    with_grad = local_dist(x.requires_grad_(True), y, block_size=3, aligned=aligned)
    assert with_grad.requires_grad and torch.allclose(with_grad, full, atol=1e-12)
    x = x.detach()
    # The paired form agrees with the matrix form on its diagonal.
    paired = batch_local_dist(x[:6], y, aligned=aligned)
    assert torch.allclose(paired, full[torch.arange(6), torch.arange(6)], atol=1e-9)


def test_local_dist_errors_and_empty():
    with pytest.raises(ValueError, match="m=3 and n=4"):
        local_dist(torch.rand(2, 3, 5), torch.rand(2, 4, 5), aligned=False)
    with pytest.raises(ValueError, match="m=3 and n=4"):
        batch_local_dist(torch.rand(2, 3, 5), torch.rand(2, 4, 5), aligned=False)
    with pytest.raises(ValueError):
        local_dist(torch.rand(2, 3, 5), torch.rand(2, 3, 6))
    with pytest.raises(ValueError):
        local_dist(torch.rand(2, 3, 5), torch.rand(2, 3, 5), block_size=0)
    assert local_dist(torch.rand(0, 3, 5), torch.rand(4, 3, 5)).shape == (0, 4)


def test_local_dist_gradcheck():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 4, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: local_dist(a, b, block_size=2), (x, y))
    assert torch.autograd.gradcheck(lambda a, b: batch_local_dist(a, b), (x[:2], y))


def test_local_dist_noncontiguous_and_half_inputs():
    gen = torch.Generator().manual_seed(11)
    big = torch.randn(5, 4, 12, generator=gen)
    x = big[:, :, ::2]                              # non-contiguous [5, 4, 6]
    y = big.flip(0)[:3, :, 1::2]
    expected = local_dist(x.contiguous(), y.contiguous())
    assert torch.allclose(local_dist(x, y, block_size=2), expected, atol=1e-5)
    half = local_dist(x.bfloat16(), y.bfloat16())
    assert half.dtype == torch.float32
    assert torch.allclose(half, local_dist(x.bfloat16().float(), y.bfloat16().float()))
    labels = torch.tensor([0, 0, 1, 1, 1])
    out = {"global": big[:, 0].bfloat16(), "local": x.bfloat16()}
    res = compute_losses(out, labels, local_loss_weight=1.)
    assert res["loss"].dtype == torch.float32 and torch.isfinite(res["loss"])


def test_compute_dist_variants():
    rng = np.random.default_rng(0)
    q = {'global': rng.standard_normal((5, 8)).astype(np.float32),
         'local': rng.standard_normal((5, 4, 3)).astype(np.float32)}
    g = {'global': rng.standard_normal((7, 8)).astype(np.float32),
         'local': rng.standard_normal((7, 4, 3)).astype(np.float32)}
    eu = np.sqrt(((q['global'][:, None] - g['global'][None]) ** 2).sum(-1))
    np.testing.assert_allclose(compute_dist(q, g, 'global', block_size=2), eu, atol=1e-5)
    qn = q['global'] / np.linalg.norm(q['global'], axis=1, keepdims=True)
    gn = g['global'] / np.linalg.norm(g['global'], axis=1, keepdims=True)
    np.testing.assert_allclose(compute_dist(q, g, 'global', normalize=True),
                               np.sqrt(((qn[:, None] - gn[None]) ** 2).sum(-1)), atol=1e-5)
    np.testing.assert_allclose(compute_dist(q, g, 'global', metric='cosine'),
                               1 - qn @ gn.T, atol=1e-5)
    loc = local_dist(torch.from_numpy(q['local']), torch.from_numpy(g['local'])).numpy()
    np.testing.assert_allclose(compute_dist(q, g, 'local'), loc, atol=1e-5)
    np.testing.assert_allclose(compute_dist(q, g, 'global_local'), eu + loc, atol=1e-5)
    pairs = pair_dist({k: v[[0, 4]] for k, v in q.items()},
                         {k: v[[6, 2]] for k, v in g.items()}, 'global_local').numpy()
    np.testing.assert_allclose(pairs, [eu[0, 6] + loc[0, 6], eu[4, 2] + loc[4, 2]], atol=1e-5)
    with pytest.raises(ValueError, match="distance must be one of"):
        compute_dist(q, g, 'nope')
    with pytest.raises(ValueError, match="cosine"):
        compute_dist(q, g, 'local', metric='cosine')


def test_sort_keys_rank_like_a_stable_argsort():
    rng = np.random.default_rng(1)
    vals = rng.choice(np.array([-2.5, -1e-30, -0., 0., 1e-30, 0.5, 0.5, 3., np.inf], dtype=np.float32),
                      size=(5, 40))
    idx = torch.arange(40).expand(5, 40)
    keys = _sort_keys(torch.from_numpy(vals), idx)
    order = torch.topk(keys, 17, dim=1, largest=False).values
    dist, index = _unpack_keys(order)
    # -0. and 0. are equal: compare against the stable argsort of the values with -0. made 0.
    want = np.argsort(vals + np.float32(0.), axis=1, kind='stable')[:, :17]
    np.testing.assert_array_equal(index.numpy(), want)
    np.testing.assert_array_equal(dist.numpy(), np.take_along_axis(vals, want, 1) + np.float32(0.))


@pytest.mark.parametrize('distance', ['global', 'local', 'global_local'])
def test_topk_search_equals_brute_force_ranking(distance):
    rng = np.random.default_rng(2)
    q = {'global': rng.normal(size=(9, 6)).astype(np.float32),
         'local': rng.normal(size=(9, 3, 4)).astype(np.float32)}
    g = {'global': rng.normal(size=(23, 6)).astype(np.float32),
         'local': rng.normal(size=(23, 4, 4)).astype(np.float32)}
    ref = brute_dist(q, g, distance)
    want = np.argsort(ref, axis=1, kind='stable')
    for k, qb, gb in ((5, 2, 4), (23, 4, 7), (40, None, None), (1, 9, 23)):
        index, dist = topk_search(q, g, k=k, distance=distance, query_block=qb, gallery_block=gb)
        kk = min(k, 23)
        assert index.shape == dist.shape == (9, kk)
        np.testing.assert_array_equal(index, want[:, :kk])
        np.testing.assert_allclose(dist, np.take_along_axis(ref, want[:, :kk], 1), rtol=1e-5, atol=1e-5)


def test_topk_search_normalized_and_from_hdf5(tmp_path):
    rng = np.random.default_rng(3)
    q = {'global': rng.normal(size=(4, 8)).astype(np.float32)}
    gal = rng.normal(size=(30, 8)).astype(np.float32)
    path = tmp_path / 'g.h5'
    with h5py.File(str(path), 'w') as f:
        f['global'] = gal
    ref = brute_global_dist(q['global'], gal, normalize=True)
    with h5py.File(str(path), 'r') as f:
        index, dist = topk_search(q, {'global': f['global']}, k=6, normalize=True, gallery_block=8)
    np.testing.assert_array_equal(index, np.argsort(ref, axis=1, kind='stable')[:, :6])
    empty = topk_search(q, {'global': gal[:0]}, k=3)
    assert empty[0].shape == (4, 0)


def test_rerank_shortlist_equals_brute_force_on_the_shortlist():
    rng = np.random.default_rng(4)
    q = {'global': rng.normal(size=(5, 6)).astype(np.float32),
         'local': rng.normal(size=(5, 3, 4)).astype(np.float32)}
    g = {'global': rng.normal(size=(20, 6)).astype(np.float32),
         'local': rng.normal(size=(20, 3, 4)).astype(np.float32)}
    short = np.stack([rng.permutation(20)[:8] for _ in range(5)])
    short[1, 5:] = -1                                  # faiss pads missing candidates with -1
    ref = brute_dist(q, g, 'global_local')
    index, dist = rerank_shortlist(q, g, short, k=6, distance='global_local', pair_block=7)
    for i in range(5):
        cand = short[i][short[i] >= 0]
        order = cand[np.argsort(ref[i, cand], kind='stable')][:6]
        assert list(index[i][:len(order)]) == list(order)
        np.testing.assert_allclose(dist[i][:len(order)], ref[i, order], rtol=1e-5, atol=1e-5)
    assert list(index[1][5:]) == [-1] and np.isinf(dist[1][5])


def test_topk_search_ties_across_block_cuts_go_to_the_lower_index():
    # Small integer features: every dot product is exact in float32 whatever the matmul blocking,
    # so duplicates give bitwise equal distances and the ties are real.
    rng = np.random.default_rng(6)
    base = rng.integers(-3, 4, size=(6, 5)).astype(np.float32)
    g = base[rng.integers(0, 6, size=40)]
    q = np.concatenate([base[:3], rng.integers(-3, 4, size=(2, 5)).astype(np.float32)])
    ref = brute_global_dist(q, g)
    want = np.argsort(ref, axis=1, kind='stable')
    for k, gb in ((3, 5), (9, 7), (12, 40), (40, 6)):
        index, dist = topk_search({'global': q}, {'global': g}, k=k, gallery_block=gb)
        np.testing.assert_array_equal(index, want[:, :k])
        np.testing.assert_allclose(dist, np.take_along_axis(ref, want[:, :k], 1), atol=1e-3)


@pytest.mark.parametrize('scale', [1., 34.])
def test_identical_and_near_duplicate_features_get_their_exact_distance(scale):
    # The expanded form |x|^2 + |y|^2 - 2 x.y in float32 gave identical features of norm 34 a distance of
    # 0.0135; near-duplicates are now computed as |x - y|^2, identical ones get exactly 0.
    from aligned_reid.distance import compute_dist, pair_dist
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 512, generator=g) * scale / 13.   # post-ReLU-like features, norms ~ scale
    y = torch.cat([x[:10], x[10:20] + 1e-4 * torch.randn(10, 512, generator=g), torch.rand(30, 512, generator=g)])
    d = compute_dist(x.numpy(), y.numpy(), block_size=7)
    ref = torch.cdist(x.double(), y.double()).numpy()
    assert (np.diag(d[:10, :10]) == 0).all()
    near = np.arange(10, 20)
    np.testing.assert_allclose(d[near, near], ref[near, near], rtol=1e-3)
    np.testing.assert_allclose(d, ref, rtol=1e-5, atol=2e-6 * scale ** 2)
    p = pair_dist(x[:20].numpy(), y[:20].numpy()).numpy()
    assert (p[:10] == 0).all()
    np.testing.assert_allclose(p, d[np.arange(20), np.arange(20)], rtol=1e-6, atol=0)
