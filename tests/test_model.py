"""Tests of aligned_reid.model: output shapes for every backbone, input size and last stride,
pretrained weights loaded exactly from local files, clear errors, gradients to every branch."""
import logging

import pytest
import torch
import torchvision

from aligned_reid.checkpoint import load_backbone
from aligned_reid.model import Model


# Tiny tensors: on a shared machine thread wake-ups would cost more than the work.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("last_stride", [2, 1])
@pytest.mark.parametrize("base,dim", [("resnet18", 512), ("resnet34", 512),
                                      ("resnet50", 2048), ("resnet101", 2048)])
def test_output_shapes(base, dim, last_stride):
    model = Model(base, last_stride=last_stride, num_classes=7).eval()
    assert model.global_dim == dim
    with torch.no_grad():
        for height in (256, 384):
            out = model(torch.randn(1, 3, height, 128))
            rows = height // 32 * (2 if last_stride == 1 else 1)
            assert set(out) == {"global", "local", "logits"}
            assert out["global"].shape == (1, dim)
            assert out["local"].shape == (1, rows, 128)
            assert out["logits"].shape == (1, 7)
            assert (out["local"] >= 0).all()        # after the ReLU


def test_features_and_gradients():
    torch.manual_seed(0)
    model = Model("resnet18", local_conv_out_channels=16).train()
    x = torch.randn(2, 3, 64, 32)
    out = model(x)
    assert set(out) == {"global", "local"} and out["local"].shape == (2, 2, 16)
    # The global feature is the average of the last map; the local one pools each row of it.
    feat = model.base(x)
    assert torch.allclose(out["global"], feat.mean(dim=(2, 3)), atol=1e-5)
    (out["global"].sum() + out["local"].sum()).backward()
    assert model.base.conv1.weight.grad.abs().sum() > 0
    assert model.local_conv.weight.grad.abs().sum() > 0


def test_classifier_init():
    model = Model("resnet18", num_classes=1000)
    assert model.classifier.weight.std().item() == pytest.approx(0.001, rel=0.05)
    assert torch.equal(model.classifier.bias, torch.zeros(1000))


def randomized_resnet18():
    """A torchvision ResNet-18 whose every tensor (buffers included) is random."""
    torch.manual_seed(1)
    net = torchvision.models.resnet18()
    with torch.no_grad():
        for t in net.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t))
    return net


@pytest.mark.parametrize("wrap", ["plain", "no_fc", "checkpoint", "model_key"])
def test_pretrained_file_loads_exactly(tmp_path, wrap, caplog):
    reference = randomized_resnet18().state_dict()
    state = dict(reference)
    if wrap == "no_fc":
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    elif wrap == "checkpoint":
        state = {"state_dict": {"module." + k: v for k, v in state.items()}, "epoch": 3}
    elif wrap == "model_key":
        state = {"model": state}
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    with caplog.at_level(logging.WARNING):
        model = load_backbone(Model("resnet18", last_stride=1), str(path))
    loaded = model.base.state_dict()
    expected = {k: v for k, v in reference.items() if not k.startswith("fc.")}
    assert set(loaded) == set(expected)
    for k, v in expected.items():
        assert torch.equal(loaded[k], v), k
    assert "missing" not in caplog.text and "unexpected" not in caplog.text


def test_pretrained_file_with_missing_or_unexpected_keys_is_refused(tmp_path):
    # No silent partial load: a missing backbone key or a key nothing uses stops with both named.
    state = randomized_resnet18().state_dict()
    del state["layer4.1.bn2.weight"]
    state["extra.weight"] = torch.zeros(3)
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match="partial.pth") as err:
        load_backbone(Model("resnet18"), str(path))
    assert "missing: layer4.1.bn2.weight" in str(err.value)
    assert "unexpected: extra.weight" in str(err.value)
    with pytest.raises(ValueError, match="does not fit the resnet50 backbone"):
        load_backbone(Model("resnet50"), str(path))


def test_pretrained_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_backbone(Model("resnet18"), str(tmp_path / "nowhere.pth"))
    wrong = tmp_path / "wrong.pth"
    torch.save({"foo.weight": torch.zeros(2)}, wrong)
    with pytest.raises(ValueError, match="does not fit the resnet18 backbone"):
        load_backbone(Model("resnet18"), str(wrong))
    with pytest.raises(ValueError, match="resnet152"):
        Model("resnet152")
    with pytest.raises(ValueError, match="last_stride"):
        Model("resnet18", last_stride=3)

    # Offline: the download fails; the error must say how to pass a local file.
    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(RuntimeError, match="--pretrained_path") as err:
        Model("resnet50", pretrained=True)
    assert "resnet50-0676ba61.pth" in str(err.value)


class _Payload:
    """Unpickling this runs os.system: what a crafted weights file does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return os.system, ("touch " + self.marker,)


def test_imagenet_weights_in_the_hub_cache_are_read_safely(tmp_path, monkeypatch):
    # torchvision's own reader unpickles the cached file with a full unpickler; ours refuses the payload.
    from aligned_reid.safe_load import CheckpointError
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    marker = tmp_path / "payload_ran"
    torch.save({"conv1.weight": torch.zeros(1), "evil": _Payload(str(marker))}, cache / "resnet18-f37072fd.pth")
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("cached file not used"))
    with pytest.raises(CheckpointError, match="resnet18-f37072fd.pth"):
        Model("resnet18", pretrained=True)
    assert not marker.exists()


def test_imagenet_weights_from_the_hub_cache_load_exactly(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    reference = randomized_resnet18().state_dict()
    torch.save(reference, cache / "resnet18-f37072fd.pth")
    model = Model("resnet18", pretrained=True)
    for k, v in model.base.state_dict().items():
        assert torch.equal(v, reference[k]), k

    # a missing file is downloaded into the cache (here: a copy standing in for the network), then read safely
    def fake_download(url, dst, hash_prefix=None, progress=True):
        assert url.endswith("/resnet18-f37072fd.pth") and hash_prefix == "f37072fd"
        torch.save(reference, dst)

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    model = Model("resnet18", pretrained=True)
    assert torch.equal(model.base.state_dict()["layer2.0.conv1.weight"], reference["layer2.0.conv1.weight"])


def test_pretrained_from_training_checkpoint_with_extras(tmp_path):
    import argparse
    reference = randomized_resnet18().state_dict()
    model_state = {"base." + k: v for k, v in reference.items() if not k.startswith("fc.")}
    model_state["local_conv.weight"] = torch.zeros(128, 512, 1, 1)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": model_state, "args": argparse.Namespace(lr=1.), "epoch": 2}, path)
    model = load_backbone(Model("resnet18"), str(path))
    assert torch.equal(model.base.state_dict()["layer3.0.conv1.weight"],
                       reference["layer3.0.conv1.weight"])
    assert not torch.equal(model.local_conv.weight, torch.zeros(128, 512, 1, 1))
