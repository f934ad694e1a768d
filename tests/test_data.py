"""Tests for aligned_reid.data: names, the partitions contract, sampler, transforms, loaders."""
import os
import pickle
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from aligned_reid import data
from aligned_reid.augment import Augment
from aligned_reid.data import (PKSampler, build_transform, make_im_name, make_test_loader,
                               make_train_loader, parse_im_name, read_partitions,
                               validate_partitions, write_partitions)


def _partitions():
    names = [make_im_name(pid, cam, k) for pid in (3, 5, 9) for cam in (1, 2) for k in range(2)]
    test = [make_im_name(pid, cam, 0) for pid in (0, 11, 12) for cam in (1, 2)]
    return {
        "trainval_im_names": names,
        "trainval_ids2labels": {3: 0, 5: 1, 9: 2},
        "train_im_names": names[:8],
        "train_ids2labels": {3: 0, 5: 1},
        "val_im_names": names[8:],
        "val_marks": [0, 1, 1, 1],
        "test_im_names": test,
        "test_marks": [1, 1, 0, 1, 0, 2],
        "format_version": 1,
        "dataset": "toy",
    }


def test_names_round_trip_and_bad_name():
    assert make_im_name(2, 1, 7) == "00000002_0001_00000007.jpg"
    assert parse_im_name("/a/b/00000002_0013_00000007.jpg") == (2, 13)
    assert parse_im_name(make_im_name(0, 6, 0)) == (0, 6)
    with pytest.raises(ValueError, match="0002_c1s1_000451_03.jpg"):
        parse_im_name("0002_c1s1_000451_03.jpg")


def test_write_read_round_trip(tmp_path):
    path = tmp_path / "p" / "partitions.pkl"
    write_partitions(_partitions(), path)
    assert read_partitions(path) == _partitions()
    assert os.listdir(tmp_path / "p") == ["partitions.pkl"]


def test_interrupted_write_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "partitions.pkl"
    write_partitions(_partitions(), path)
    before = path.read_bytes()

    def broken_dump(obj, f, protocol=None):
        f.write(b"\x80\x04half")
        raise KeyboardInterrupt

    monkeypatch.setattr(pickle, "dump", broken_dump)
    new = _partitions()
    new["dataset"] = "other"
    with pytest.raises(KeyboardInterrupt):
        write_partitions(new, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["partitions.pkl"]


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_malicious_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    obj = _partitions()
    obj["dataset"] = _Evil()
    path = tmp_path / "partitions.pkl"
    path.write_bytes(pickle.dumps(obj))
    with pytest.raises(ValueError, match="refusing to load posix.system|refusing to load os.system"):
        read_partitions(path)
    assert not (tmp_path / "pwned").exists()


def test_old_reproduction_numpy_arrays_load(tmp_path):
    obj = _partitions()
    for key in ("trainval_im_names", "test_im_names"):
        obj[key] = np.array(obj[key])
    obj["test_marks"] = np.array(obj["test_marks"], dtype=np.int64)
    obj["trainval_ids2labels"] = {np.int64(k): np.int64(v) for k, v in obj["trainval_ids2labels"].items()}
    path = tmp_path / "old.pkl"
    path.write_bytes(pickle.dumps(obj, protocol=2))
    loaded = read_partitions(path)
    assert loaded == _partitions()
    assert type(loaded["test_im_names"][0]) is str and type(loaded["test_marks"][0]) is int


@pytest.mark.parametrize("mutate, message", [
    (lambda p: p.pop("trainval_im_names"), "trainval_im_names"),
    (lambda p: p.pop("val_marks"), "val_marks"),
    (lambda p: p.update(test_marks=p["test_marks"][:-1]), "test_marks"),
    (lambda p: p.update(test_marks=[3] * 6), "test_marks"),
    (lambda p: p.update(trainval_ids2labels={3: 0, 5: 1, 9: 5}), "trainval_ids2labels"),
    (lambda p: p.update(train_ids2labels={3: 0}), "person id 5"),
    (lambda p: p.update(val_im_names=[], val_marks=[]), "empty"),
    (lambda p: p.update(test_im_names=["x.jpg"] * 6), "x.jpg"),
    (lambda p: p.update(extra=1), "extra"),
])
def test_validation_names_the_problem(tmp_path, mutate, message):
    obj = _partitions()
    mutate(obj)
    with pytest.raises(ValueError, match=message):
        validate_partitions(obj)
    path = tmp_path / "partitions.pkl"
    with pytest.raises(ValueError, match=message):
        write_partitions(obj, path)
    assert not path.exists()


def test_read_missing_and_garbage(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pkl"):
        read_partitions(tmp_path / "nope.pkl")
    (tmp_path / "bad.pkl").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="bad.pkl"):
        read_partitions(tmp_path / "bad.pkl")


def _labels():
    # 10 identities with 1..10 images each, interleaved.
    counts = {i: i + 1 for i in range(10)}
    labels = [i for i in range(10) for _ in range(counts[i])]
    rng = np.random.default_rng(0)
    return rng.permutation(labels).tolist(), counts


def test_sampler_batches_are_p_by_k_and_cover_ids():
    labels, counts = _labels()
    sampler = PKSampler(labels, ids_per_batch=3, ims_per_id=4, seed=5)
    assert len(sampler) == 3
    batches = list(sampler)
    assert len(batches) == 3
    seen_ids = []
    for batch in batches:
        assert len(batch) == 12
        per_id = Counter(labels[i] for i in batch)
        assert len(per_id) == 3 and set(per_id.values()) == {4}
        for pid in per_id:
            idx = [i for i in batch if labels[i] == pid]
            assert all(labels[i] == pid for i in idx)
            if counts[pid] >= 4:  # no replacement when the identity has enough images
                assert len(set(idx)) == 4
        seen_ids += list(per_id)
    assert len(seen_ids) == len(set(seen_ids)) == 9  # each id at most once; one left over


def test_sampler_is_reproducible_and_changes_with_epoch():
    labels, _ = _labels()
    a = PKSampler(labels, 2, 3, seed=1)
    b = PKSampler(labels, 2, 3, seed=1)
    assert list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    assert list(PKSampler(labels, 2, 3, seed=2)) != first


def test_sampler_ddp_shares_are_disjoint_and_cover_the_global_batch():
    labels, _ = _labels()
    single = list(PKSampler(labels, 4, 2, seed=3))
    shares = [list(PKSampler(labels, 4, 2, seed=3, rank=r, world_size=2)) for r in range(2)]
    for b, whole in enumerate(single):
        ids = [{labels[i] for i in share[b]} for share in shares]
        assert not ids[0] & ids[1]
        assert len(shares[0][b]) == len(shares[1][b]) == 4
        assert shares[0][b] + shares[1][b] == whole


def test_sampler_bad_arguments():
    labels, _ = _labels()
    with pytest.raises(ValueError, match="exceeds the number of identities"):
        PKSampler(labels, 11, 2)
    with pytest.raises(ValueError, match="divisible"):
        PKSampler(labels, 3, 2, world_size=2)


def _write_images(folder, names, size=(24, 12)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for n in names:
        arr = rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / n)


def test_loaders_yield_normalised_tensors(tmp_path):
    p = _partitions()
    im_dir = tmp_path / "images"
    _write_images(im_dir, p["trainval_im_names"] + p["test_im_names"])
    tf = build_transform((16, 8), train=False)
    test_loader = make_test_loader(str(im_dir), p["test_im_names"], p["test_marks"], tf,
                                   batch_size=4, workers=0)
    ds = test_loader.dataset
    assert ds.ids.tolist() == [0, 0, 11, 11, 12, 12] and ds.cams.tolist() == [1, 2] * 3
    assert ds.marks.tolist() == p["test_marks"]
    images, idx = next(iter(test_loader))
    assert images.shape == (4, 3, 16, 8) and idx.tolist() == [0, 1, 2, 3]
    with Image.open(im_dir / p["test_im_names"][1]) as im:
        ref = np.asarray(im.convert("RGB").resize((8, 16), Image.BILINEAR), dtype=np.float32) / 255
    ref = (ref - np.array(data.IMAGENET_MEAN)) / np.array(data.IMAGENET_STD)
    np.testing.assert_allclose(images[1].permute(1, 2, 0).numpy(), ref, atol=1e-5)

    augment = Augment((16, 8), crop_prob=0.5, crop_ratio=0.8, random_erasing=0.5)
    loader = make_train_loader(str(im_dir), p["trainval_im_names"], p["trainval_ids2labels"], 3, 2,
                               augment, workers=0, seed=0)
    images, labels = next(iter(loader))
    assert images.shape == (6, 3, 16, 8) and images.dtype == torch.float32
    assert sorted(Counter(labels.tolist()).values()) == [2, 2, 2]


def test_transform_argument_checks():
    with pytest.raises(ValueError, match="crop_ratio"):
        Augment((16, 8), crop_ratio=0)
    with pytest.raises(ValueError, match="Augment"):
        build_transform((16, 8), train=True)
