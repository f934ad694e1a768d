"""Tests for aligned_reid.augment and the two training pipelines of aligned_reid.data: randomness that is a
function of (seed, epoch, step, slot) only, the per-image and batched paths against references written
here, and batches that do not depend on the worker count, worker lifetime, resume point or pipeline."""
import math

import numpy as np
import pytest
import torch
from PIL import Image

from aligned_reid import augment as aug
from aligned_reid.augment import Augment, draws
from aligned_reid.data import choose_train_pipeline, make_im_name, make_train_loader

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])


def _reference(im, u, size, flip, crop_prob, crop_ratio, erase_prob):
    """One image augmented by hand from its uniform draws u [NUM_DRAWS], following the documented recipe
    (crop window, bilinear resize, flip, normalise, then the first of ten erasing attempts that fits)."""
    h, w = size
    W, H = im.size
    if u[1] < crop_prob and crop_ratio < 1:
        cw, ch = max(1, round(W * crop_ratio)), max(1, round(H * crop_ratio))
        x0, y0 = math.floor(u[2] * (W - cw + 1)), math.floor(u[3] * (H - ch + 1))
        im = im.crop((x0, y0, x0 + cw, y0 + ch))
    im = im.resize((w, h), Image.BILINEAR)
    a = np.asarray(im, dtype=np.float64)
    if flip and u[0] < 0.5:
        a = a[:, ::-1]
    a = (a / 255 - IMAGENET_MEAN) / IMAGENET_STD
    if u[4] < erase_prob:
        for t in range(10):
            area_u, ratio_u, top_u, left_u = u[5 + 4 * t:9 + 4 * t]
            area = h * w * (0.02 + 0.31 * area_u)
            ratio = math.exp(math.log(0.3) + (math.log(1 / 0.3) - math.log(0.3)) * ratio_u)
            eh, ew = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
            if 0 < eh < h and 0 < ew < w:
                top, left = math.floor(top_u * (h - eh + 1)), math.floor(left_u * (w - ew + 1))
                a[top:top + eh, left:left + ew] = 0
                break
    return a.transpose(2, 0, 1)


def _random_image(rng, h=24, w=12):
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_draws_depend_on_seed_epoch_step_and_slot_only():
    full = draws(7, 3, 5, 20)
    assert full.shape == (20, aug.NUM_DRAWS)
    assert np.array_equal(draws(7, 3, 5, 4), full[:4])     # a row does not depend on the batch size
    assert not np.array_equal(draws(7, 3, 6, 4), full[:4])
    assert not np.array_equal(draws(7, 4, 5, 4), full[:4])
    assert not np.array_equal(draws(8, 3, 5, 4), full[:4])


@pytest.mark.parametrize('flip,crop_prob,crop_ratio,erase', [(True, 0., 1., 0.), (True, 1., 0.7, 0.),
                                                             (False, 0.5, 0.8, 1.), (True, 0.5, 0.6, 0.5)])
def test_image_path_matches_reference(flip, crop_prob, crop_ratio, erase):
    rng = np.random.default_rng(1)
    a = Augment((16, 8), flip=flip, crop_prob=crop_prob, crop_ratio=crop_ratio, random_erasing=erase, seed=11)
    u = draws(11, 2, 3, 40)
    for slot in range(40):
        im = _random_image(rng)
        got = a.image(im, 2, 3, slot).numpy()
        ref = _reference(im, u[slot], (16, 8), flip, crop_prob, crop_ratio, erase)
        np.testing.assert_allclose(got, ref, atol=1e-5, err_msg=str(slot))


def test_erasing_happens_at_the_asked_rate_and_only_when_it_fits():
    u = draws(0, 0, 0, 4000)
    boxes = aug.erase_boxes(u, 0.5, 16, 8)
    on = boxes[:, 2] > 0
    assert 0.45 < on.mean() < 0.55
    assert np.all(boxes[on, 0] + boxes[on, 2] <= 16) and np.all(boxes[on, 1] + boxes[on, 3] <= 8)
    assert not on[u[:, 4] >= 0.5].any()
    for k in range(0, 4000, 97):     # the box against the hand-made reference, on a blank image
        ref = _reference(Image.new('RGB', (8, 16)), u[k], (16, 8), False, 0., 1., 0.5)
        top, left, eh, ew = boxes[k]
        erased = np.zeros((16, 8), bool)
        erased[top:top + eh, left:left + ew] = True
        assert np.array_equal(ref[0] == 0, erased), k


def test_batch_path_equals_image_path_without_crop():
    rng = np.random.default_rng(2)
    ims = [_random_image(rng, 16, 8) for _ in range(12)]
    u8 = torch.stack([torch.from_numpy(np.asarray(im).transpose(2, 0, 1).copy()) for im in ims])
    a = Augment((16, 8), random_erasing=0.7, seed=5)
    batch = a.batch(u8, 4, 9, first_slot=6)
    assert batch.shape == (12, 3, 16, 8) and batch.dtype == torch.float32
    for k, im in enumerate(ims):
        torch.testing.assert_close(batch[k], a.image(im, 4, 9, 6 + k), atol=1e-5, rtol=0)


def test_batch_path_crops_the_same_window():
    # A linear ramp: bilinear interpolation reproduces it exactly inside the window, so the two paths
    # differ only by uint8 rounding and where PIL clamps at the crop's edge (half a pixel of the ramp).
    ys, xs = np.mgrid[0:32, 0:16]
    ramp = np.stack([4 * xs + 2 * ys, 3 * ys, 8 * xs + 60], -1).astype(np.uint8)
    im = Image.fromarray(ramp)
    u8 = torch.from_numpy(ramp.transpose(2, 0, 1).copy())[None].repeat(16, 1, 1, 1)
    a = Augment((32, 16), crop_prob=1., crop_ratio=0.75, seed=3)
    batch = a.batch(u8, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(3, 1, 1) * 255
    for k in range(16):
        diff = ((batch[k] - a.image(im, 1, 1, k)) * std).abs()
        assert diff.max() <= 8 / 2 * 0.75 + 1.01, k


def test_batch_refuses_wrong_size():
    with pytest.raises(ValueError, match='expected 16 x 8'):
        Augment((16, 8)).batch(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), 0, 0)


# ----------------------------------------------------------------------------- loaders

def _train_set(tmp_path, ids=6, per_id=5, size=(24, 12)):
    rng = np.random.default_rng(0)
    names = [make_im_name(pid, 1 + k % 2, k) for pid in range(1, ids + 1) for k in range(per_id)]
    im_dir = tmp_path / 'images'
    im_dir.mkdir()
    for n in names:
        _random_image(rng, *size).save(im_dir / n)
    return str(im_dir), names, {pid: pid - 1 for pid in range(1, ids + 1)}


def _epoch(loader, epoch, start_step=0):
    loader.set_epoch(epoch, start_step)
    return [(x.clone(), y.clone()) for x, y in loader]


def _same(a, b, atol=0.):
    return len(a) == len(b) and all(torch.allclose(x1, x2, atol=atol, rtol=0) and torch.equal(y1, y2)
                                    for (x1, y1), (x2, y2) in zip(a, b))


def test_batches_do_not_depend_on_workers_lifetime_or_resume_point(tmp_path):
    im_dir, names, ids2labels = _train_set(tmp_path)
    a = Augment((16, 8), crop_prob=0.5, crop_ratio=0.8, random_erasing=0.5, seed=4)
    make = lambda workers: make_train_loader(im_dir, names, ids2labels, 3, 2, a, workers=workers, seed=4)
    zero, two = make(0), make(2)
    ref = {e: _epoch(zero, e) for e in (1, 2)}
    assert len(ref[1]) == 2 and not _same(ref[1], ref[2])
    # two persistent workers, epochs in a row, then epoch 1 again; a fresh loader with one worker
    assert _same(_epoch(two, 1), ref[1]) and _same(_epoch(two, 2), ref[2]) and _same(_epoch(two, 1), ref[1])
    assert two.loader.persistent_workers
    assert _same(_epoch(make(1), 2), ref[2])
    # resuming mid-epoch yields the rest of that epoch's batches, augmented alike
    assert _same(_epoch(make(2), 2, start_step=1), ref[2][1:])


def test_memory_pipeline_matches_worker_pipeline(tmp_path):
    im_dir, names, ids2labels = _train_set(tmp_path)
    a = Augment((16, 8), random_erasing=0.5, seed=9)   # no crop: the two paths agree to rounding
    workers = make_train_loader(im_dir, names, ids2labels, 3, 2, a, workers=0, seed=9)
    memory = make_train_loader(im_dir, names, ids2labels, 3, 2, a, workers=1, seed=9, pipeline='memory')
    assert memory.images.dtype == torch.uint8 and memory.images.shape == (len(names), 3, 16, 8)
    for e in (1, 2):
        assert _same(_epoch(memory, e), _epoch(workers, e), atol=1e-5)
    assert _same(_epoch(memory, 2, start_step=1), _epoch(workers, 2)[1:], atol=1e-5)


def test_ranks_get_their_rows_of_the_global_batch(tmp_path):
    im_dir, names, ids2labels = _train_set(tmp_path, ids=8)
    a = Augment((16, 8), crop_prob=0.5, crop_ratio=0.8, random_erasing=0.5, seed=1)
    whole = _epoch(make_train_loader(im_dir, names, ids2labels, 4, 2, a, workers=0, seed=1), 3)
    for pipeline in ('workers', 'memory'):
        shares = [_epoch(make_train_loader(im_dir, names, ids2labels, 4, 2, a, workers=0, seed=1, rank=r,
                                           world_size=2, pipeline=pipeline), 3) for r in (0, 1)]
        for step, (x, y) in enumerate(whole):
            got_x = torch.cat([shares[0][step][0], shares[1][step][0]])
            got_y = torch.cat([shares[0][step][1], shares[1][step][1]])
            assert torch.equal(got_y, y)
            if pipeline == 'workers':
                assert torch.equal(got_x, x)
            else:   # crops interpolate differently; the flips and erasings line up
                assert got_x.shape == x.shape


def test_choose_train_pipeline_on_the_cpu():
    assert choose_train_pipeline('auto', 'cpu', 10, (256, 128)) == ('workers', None)
    assert choose_train_pipeline('workers', 'cpu', 10, (256, 128)) == ('workers', None)
    assert choose_train_pipeline('memory', 'cpu', 10, (256, 128)) == ('memory', 'host')
    with pytest.raises(ValueError, match='auto, workers or memory'):
        choose_train_pipeline('gpu', 'cpu', 10, (256, 128))
