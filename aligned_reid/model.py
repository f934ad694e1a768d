"""The AlignedReID network: a torchvision ResNet backbone with a global branch (average pool),
an aligned local branch (horizontal stripes -> 1x1 conv -> BN -> ReLU) and an optional ID
classifier."""
import logging
import os
import re
from collections import OrderedDict

import torch
import torch.nn as nn
import torchvision

from aligned_reid.safe_load import load_file

logger = logging.getLogger(__name__)

BACKBONES = {
    "resnet18": (torchvision.models.resnet18, "ResNet18_Weights"),
    "resnet34": (torchvision.models.resnet34, "ResNet34_Weights"),
    "resnet50": (torchvision.models.resnet50, "ResNet50_Weights"),
    "resnet101": (torchvision.models.resnet101, "ResNet101_Weights"),
}


def _imagenet_weights(base):
    """torchvision's IMAGENET1K_V1 weights enum entry for `base`."""
    return getattr(torchvision.models, BACKBONES[base][1]).IMAGENET1K_V1


def imagenet_state(base):
    """torchvision's ImageNet (IMAGENET1K_V1) weights of `base` as a state dict. They are read from the torch
    hub cache ($TORCH_HOME/hub/checkpoints/, where torchvision keeps them) by the safe reader of
    aligned_reid.safe_load, so a crafted file there runs no code; a missing file is first downloaded there
    (its SHA-256 prefix checked). RuntimeError saying how to work offline when it cannot be downloaded;
    aligned_reid.safe_load.CheckpointError (a ValueError naming the file) when the cached file is unreadable
    or refused."""
    weights = _imagenet_weights(base)
    file_name = os.path.basename(weights.url)
    cache = os.path.join(torch.hub.get_dir(), "checkpoints")
    path = os.path.join(cache, file_name)
    if not os.path.isfile(path):
        hash_prefix = re.search(r"-([a-f0-9]+)\.", file_name)
        try:
            os.makedirs(cache, exist_ok=True)
            torch.hub.download_url_to_file(weights.url, path, hash_prefix.group(1) if hash_prefix else None,
                                           progress=True)
        except Exception as e:  # offline, proxy, hash mismatch, read-only cache ...
            raise RuntimeError(
                f"Could not download torchvision's {base} ImageNet weights "
                f"(IMAGENET1K_V1, {weights.url}): {e}. Download {file_name} on a machine "
                f"with a network and pass it with --pretrained_path FILE (library: "
                f"aligned_reid.checkpoint.load_backbone(model, FILE)), or put it in {cache}.") from e
    return load_file(path)


class Model(nn.Module):
    """AlignedReID model (Zhang et al., arXiv 1711.08184, section 3).

    base: resnet18 | resnet34 | resnet50 | resnet101 (torchvision, without avgpool and fc).
    last_stride: 2 (torchvision's) or 1 (doubles the last map: 16 x 8 for a 256 x 128 input).
    local_conv_out_channels: stripe feature size. num_classes: adds a linear ID classifier on
    the global feature. pretrained: load torchvision's ImageNet weights (IMAGENET1K_V1, from the
    torch hub cache, read safely, or a network: imagenet_state). Backbone weights from any other
    file: aligned_reid.checkpoint.load_backbone(model, path).

    forward(x [N, 3, H, W]) -> {'global': [N, C], 'local': [N, h, local_conv_out_channels],
    'logits': [N, num_classes] (with a classifier)}, C = self.global_dim (512 for
    resnet18/34, 2048 for resnet50/101), h = H / 32 (H / 16 with last stride 1)."""

    def __init__(self, base="resnet50", last_stride=2, local_conv_out_channels=128,
                 num_classes=None, pretrained=False):
        super().__init__()
        if base not in BACKBONES:
            raise ValueError(f"Model: unknown base {base!r}; choose one of {sorted(BACKBONES)}")
        if last_stride not in (1, 2):
            raise ValueError(f"Model: last_stride must be 1 or 2, got {last_stride!r}")
        self.base_name = base
        resnet = BACKBONES[base][0](weights=None)
        if last_stride == 1:
            block = resnet.layer4[0]
            # Bottleneck strides in conv2 (torchvision's ResNet v1.5), BasicBlock in conv1.
            conv = block.conv2 if hasattr(block, "conv3") else block.conv1
            conv.stride = (1, 1)
            block.downsample[0].stride = (1, 1)
        self.base = nn.Sequential(OrderedDict(
            (name, getattr(resnet, name)) for name in
            ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")))
        self.global_dim = resnet.fc.in_features
        self.local_conv = nn.Conv2d(self.global_dim, local_conv_out_channels, 1, bias=False)
        self.local_bn = nn.BatchNorm2d(local_conv_out_channels)
        self.local_relu = nn.ReLU(inplace=True)
        self.classifier = None
        if num_classes:
            self.classifier = nn.Linear(self.global_dim, num_classes)
            nn.init.normal_(self.classifier.weight, std=0.001)
            nn.init.constant_(self.classifier.bias, 0.)
        if pretrained:
            self.load_backbone_state(imagenet_state(base), _imagenet_weights(base).url)

    def load_backbone_state(self, state, source):
        """Loads backbone weights (torchvision ResNet key names; 'fc.*' ignored) from `state`. Every backbone
        key must be present and every key used; otherwise a ValueError names `source` and the keys."""
        # The ImageNet classifier has no counterpart here; dropping it is expected, not news.
        state = OrderedDict((k, v) for k, v in state.items() if not k.startswith("fc."))
        own = self.base.state_dict()
        missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
        unexpected = [k for k in state if k not in own]
        if missing or unexpected:
            def keys(ks):
                return ", ".join(ks[:6]) + (f" ... ({len(ks)} in all)" if len(ks) > 6 else "")
            raise ValueError(
                f"{source}: does not fit the {self.base_name} backbone"
                + (f"; missing: {keys(missing)}" if missing else "")
                + (f"; unexpected: {keys(unexpected)}" if unexpected else "")
                + " (expected torchvision ResNet keys such as 'conv1.weight', 'layer1.0.bn1.weight'; "
                  "pick the matching --base_model)")
        bad = [k for k in state if state[k].shape != own[k].shape]
        if bad:
            raise ValueError(f"{source}: shapes differ from the {self.base_name} backbone: "
                             + "; ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                                         for k in bad[:4]))
        for k in own:
            if k not in state:  # num_batches_tracked of files older than torch 0.4.1
                state[k] = own[k]
        self.base.load_state_dict(state, strict=True)
        logger.info("loaded %d backbone tensors from %s", len(state), source)
        return [], []

    def forward(self, x):
        """x [N, 3, H, W] -> dict of 'global' [N, C], 'local' [N, h, c], 'logits' [N, K]."""
        feat = self.base(x)                                   # [N, C, h, w]
        global_feat = feat.mean(dim=(2, 3))                   # [N, C]
        local = feat.mean(dim=3, keepdim=True)                # [N, C, h, 1]
        local = self.local_relu(self.local_bn(self.local_conv(local)))   # [N, c, h, 1]
        out = {"global": global_feat, "local": local.squeeze(3).transpose(1, 2)}  # [N, h, c]
        if self.classifier is not None:
            out["logits"] = self.classifier(global_feat)
        return out
