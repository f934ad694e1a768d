"""Builders, for tests, of the files the older PyTorch reproduction wrote: Python 2 cPickle protocol-2
pickles written opcode by opcode, torch's legacy (pre-1.6) serialisation with CUDA storage locations,
and a model in that code base's layout (local_conv with a bias, fc classifier)."""
import struct
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
LEGACY_PROTOCOL = 1001


class Global:
    """A module-level name, written with the text GLOBAL opcode as Python 2 did."""

    def __init__(self, module, name):
        self.module, self.name = module, name


class Reduce:
    """callable(*args), then optionally __setstate__ / BUILD with `state`."""

    def __init__(self, func, args, state=None):
        self.func, self.args, self.state = func, tuple(args), state


class PersistentId:
    def __init__(self, value):
        self.value = value


def py2_dumps(obj):
    """Protocol-2 pickle bytes of `obj` as Python 2's cPickle wrote them: bytes objects are Python 2
    `str` (SHORT_BINSTRING / BINSTRING, read back with encoding='latin1'), globals are text, big ints
    text-encoded longs (LONG 'L...L\\n'), dicts and lists built with MARK ... SETITEMS / APPENDS."""
    out = bytearray(b'\x80\x02')

    def w(o):
        if o is None:
            out.extend(b'N')
        elif o is True or o is False:
            out.extend(b'\x88' if o else b'\x89')
        elif isinstance(o, int):
            if 0 <= o < 256:
                out.extend(b'K' + bytes([o]))
            elif -2 ** 31 <= o < 2 ** 31:
                out.extend(b'J' + struct.pack('<i', o))
            else:
                out.extend(b'L%dL\n' % o)
        elif isinstance(o, float):
            out.extend(b'G' + struct.pack('>d', o))
        elif isinstance(o, bytes):
            out.extend((b'U' + bytes([len(o)])) if len(o) < 256 else (b'T' + struct.pack('<i', len(o))))
            out.extend(o)
        elif isinstance(o, str):
            data = o.encode('utf-8')
            out.extend(b'X' + struct.pack('<I', len(data)) + data)
        elif isinstance(o, tuple):
            out.extend(b'(')
            for v in o:
                w(v)
            out.extend(b't')
        elif isinstance(o, list):
            out.extend(b']')
            if o:
                out.extend(b'(')
                for v in o:
                    w(v)
                out.extend(b'e')
        elif isinstance(o, dict):
            out.extend(b'}')
            if o:
                out.extend(b'(')
                for k, v in o.items():
                    w(k)
                    w(v)
                out.extend(b'u')
        elif isinstance(o, Global):
            out.extend(b'c' + o.module.encode() + b'\n' + o.name.encode() + b'\n')
        elif isinstance(o, Reduce):
            w(o.func)
            w(o.args)
            out.extend(b'R')
            if o.state is not None:
                w(o.state)
                out.extend(b'b')
        elif isinstance(o, PersistentId):
            w(o.value)
            out.extend(b'Q')
        else:
            raise TypeError(type(o))

    w(obj)
    out.extend(b'.')
    return bytes(out)


_STORAGE = {torch.float32: 'FloatStorage', torch.float64: 'DoubleStorage', torch.int64: 'LongStorage'}


class LegacyWriter:
    """Turns tensors into Python 2 era legacy torch pickles: each tensor gets its own storage, stored
    at `location` ('cuda:0' as a GPU run of the old code wrote it), rebuilt with torch 0.3's
    _rebuild_tensor or torch 0.4's _rebuild_tensor_v2."""

    def __init__(self, location='cuda:0', v2=False):
        self.location, self.v2 = location, v2
        self.storages = []  # (key, tensor)

    def tensor(self, t):
        t = t.detach().contiguous().cpu()
        key = str(140000000 + len(self.storages)).encode()
        self.storages.append((key, t))
        module = 'torch.cuda' if self.location.startswith('cuda') else 'torch'
        pid = PersistentId((b'storage', Global(module, _STORAGE[t.dtype]), key, self.location.encode(),
                            t.numel(), None))
        size, stride = tuple(t.shape), tuple(t.stride())
        if self.v2:
            return Reduce(Global('torch._utils', '_rebuild_tensor_v2'),
                          (pid, 0, size, stride, False, Reduce(Global('collections', 'OrderedDict'), ())))
        return Reduce(Global('torch._utils', '_rebuild_tensor'), (pid, 0, size, stride))

    def state_dict(self, sd):
        """An OrderedDict of tensors as Python 2 pickled it (keys are Python 2 str)."""
        return Reduce(Global('collections', 'OrderedDict'),
                      ([[k.encode(), self.tensor(v)] for k, v in sd.items()],))

    def convert(self, obj):
        """Plain containers with tensors and str -> the builder objects (str become Python 2 str)."""
        if torch.is_tensor(obj):
            return self.tensor(obj)
        if isinstance(obj, OrderedDict):
            return Reduce(Global('collections', 'OrderedDict'),
                          ([[self.convert(k), self.convert(v)] for k, v in obj.items()],))
        if isinstance(obj, dict):
            return {self.convert(k): self.convert(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self.convert(v) for v in obj]
        if isinstance(obj, tuple):
            return tuple(self.convert(v) for v in obj)
        if isinstance(obj, str):
            return obj.encode()
        return obj

    def file_bytes(self, payload):
        """The whole legacy file: magic, protocol, sys_info, the object, storage keys, raw storages."""
        body = py2_dumps(payload)  # fills self.storages
        parts = [py2_dumps(LEGACY_MAGIC), py2_dumps(LEGACY_PROTOCOL),
                 py2_dumps({b'protocol_version': LEGACY_PROTOCOL, b'little_endian': True,
                            b'type_sizes': {b'short': 2, b'int': 4, b'long': 8}}),
                 body, py2_dumps([k for k, _ in self.storages])]
        for _, t in self.storages:
            parts.append(struct.pack('<q', t.numel()) + t.numpy().tobytes())
        return b''.join(parts)


def write_py2_torch_file(path, obj, location='cuda:0', v2=False):
    """Writes `obj` (containers of tensors, str, numbers) as the older code's torch.save did under
    Python 2 on a GPU machine."""
    writer = LegacyWriter(location, v2)
    data = writer.file_bytes(writer.convert(obj))
    with open(path, 'wb') as f:
        f.write(data)


class OldModel(nn.Module):
    """The older reproduction's Model layout on a resnet18: base (torchvision layers up to layer4),
    local_conv WITH a bias, local_bn, local_relu and an 'fc' classifier. forward -> (global [N, C],
    local [N, h, c], logits)."""

    def __init__(self, local_conv_out_channels=16, num_classes=5):
        super().__init__()
        r = torchvision.models.resnet18(weights=None)
        self.base = nn.Sequential(OrderedDict((n, getattr(r, n)) for n in (
            'conv1', 'bn1', 'relu', 'maxpool', 'layer1', 'layer2', 'layer3', 'layer4')))
        self.local_conv = nn.Conv2d(512, local_conv_out_channels, 1)
        self.local_bn = nn.BatchNorm2d(local_conv_out_channels)
        self.local_relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        feat = self.base(x)
        global_feat = F.avg_pool2d(feat, feat.size()[2:]).view(feat.size(0), -1)
        local = torch.mean(feat, -1, keepdim=True)
        local = self.local_relu(self.local_bn(self.local_conv(local)))
        return global_feat, local.squeeze(-1).permute(0, 2, 1), self.fc(global_feat)


def randomized_old_model(seed=0, **kwargs):
    """An OldModel with random weights and BN statistics (a trained-looking model), in eval mode."""
    torch.manual_seed(seed)
    m = OldModel(**kwargs)
    with torch.no_grad():
        for name, t in m.state_dict().items():
            if name.endswith('running_var'):
                t.copy_(torch.rand_like(t) + 0.5)
            elif t.is_floating_point():
                t.copy_(torch.randn_like(t) * (0.05 if name.endswith('weight') and t.dim() == 4 else 0.5))
        m.local_conv.bias.mul_(4.)  # a bias big enough that dropping it would show
    return m.eval()


def old_state_dict(model):
    """The state dict as torch 0.3 wrote it: no num_batches_tracked."""
    return OrderedDict((k, v) for k, v in model.state_dict().items() if not k.endswith('num_batches_tracked'))


def old_s26_array(names):
    """A numpy |S26 array of image names as Python 2 pickled it (builder objects for py2_dumps)."""
    data = b''.join(n.encode().ljust(26, b'\0') for n in names)
    dtype = Reduce(Global('numpy', 'dtype'), (b'S26', 0, 1), (3, b'|', None, None, None, 26, 1, 0))
    return Reduce(Global('numpy.core.multiarray', '_reconstruct'), (Global('numpy', 'ndarray'), (0,), b'b'),
                  (1, (len(names),), dtype, False, data))


def old_partitions_pickle(names_by_split):
    """A partitions.pkl as the older code wrote it under Python 2 (protocol 2): numpy |S26 arrays for
    trainval image names, a list of numpy.string_ for the test names, int lists and dicts."""
    s26_array = old_s26_array

    def string_(name):
        dtype = Reduce(Global('numpy', 'dtype'), (b'S26', 0, 1), (3, b'|', None, None, None, 26, 1, 0))
        return Reduce(Global('numpy.core.multiarray', 'scalar'), (dtype, name.encode().ljust(26, b'\0')))

    tv = names_by_split['trainval']
    ids = sorted({int(n[:8]) for n in tv})
    test = names_by_split['test']
    obj = {b'trainval_im_names': s26_array(tv),
           b'trainval_ids2labels': {i: label for label, i in enumerate(ids)},
           b'test_im_names': [string_(n) for n in test],
           b'test_marks': [m for m in names_by_split['test_marks']]}
    return py2_dumps(obj)

