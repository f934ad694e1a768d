"""Tests for aligned_reid.visualize: ranked-list grids and CMC plots are written with the
expected size, order and frame colours."""

import numpy as np
import pytest
from PIL import Image

from aligned_reid import visualize as vis


def test_save_ranked_lists(tmp_path):
    rng = np.random.default_rng(0)
    g_images = []
    for k in range(6):                      # solid colour per gallery image, some from files
        im = Image.new('RGB', (20, 40), tuple(int(c) for c in rng.integers(0, 255, 3)))
        if k % 2:
            p = tmp_path / f"g{k}.png"
            im.save(p)
            im = str(p)
        g_images.append(im)
    q_images = [Image.new('RGB', (20, 40), (0, 0, 0))] * 2
    d = np.array([[0.5, 0.1, 0.3, 0.2, 0.9, 0.0],
                  [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
    q_ids, q_cams = np.array([1, 2]), np.array([1, 1])
    g_ids, g_cams = np.array([1, 2, 1, 3, 2, 1]), np.array([2, 2, 2, 2, 1, 1])
    paths = vis.save_ranked_lists(d, q_ids, g_ids, q_cams, g_cams, q_images, g_images,
                                  tmp_path / 'ranks', top_k=3, size=(64, 32), border=4, gap=12,
                                  caption=16)
    assert [p.split('/')[-1] for p in paths] == ['query_00000.png', 'query_00001.png']
    im = Image.open(paths[0]).convert('RGB')
    assert im.size == (4 * (32 + 8) + 12, 64 + 8 + 16)
    # query 0: item 5 (id 1, cam 1) is junk for it; ranking 1 (id 2), 3 (id 3), 2 (id 1)
    cell = 32 + 8
    frame = lambda rank: im.getpixel((12 + rank * cell + 1, 1))
    inside = lambda rank: im.getpixel((12 + rank * cell + 16, 30))
    assert frame(1) == vis.NON_MATCH_COLOR and frame(2) == vis.NON_MATCH_COLOR
    assert frame(3) == vis.MATCH_COLOR
    assert inside(3) == g_images[2].getpixel((5, 5))          # gallery item 2, resized
    assert im.getpixel((1, 1)) == vis.QUERY_COLOR
    with pytest.raises(FileNotFoundError):
        vis.save_ranked_lists(d, q_ids, g_ids, q_cams, g_cams, q_images,
                              g_images[:5] + [str(tmp_path / 'missing.png')], tmp_path, top_k=6)
    with pytest.raises(ValueError, match="does not fit"):
        vis.save_ranked_lists(d[:, :5], q_ids, g_ids, q_cams, g_cams, q_images, g_images, tmp_path)


def test_plot_cmc(tmp_path):
    cmc = np.linspace(0.6, 1.0, 20)
    path = vis.plot_cmc({'global': cmc, 'global+re_rank': np.minimum(cmc + 0.1, 1)},
                        str(tmp_path / 'sub' / 'cmc.png'), size=(400, 300))
    im = Image.open(path).convert('RGB')
    assert im.size == (400, 300)
    arr = np.asarray(im)
    for color in vis.CURVE_COLORS[:2]:
        assert np.all(arr == color, axis=2).any()
    # the first curve starts low-left: its colour appears in the left part of the plot
    mask = np.all(arr == vis.CURVE_COLORS[0], axis=2)
    ys, xs = np.nonzero(mask[:, :120])
    assert len(xs) > 0
    single = vis.plot_cmc(cmc, str(tmp_path / 'one.png'))
    assert Image.open(single).size == (640, 480)
