"""The checkpoint file, both ways. Writing: its name, the one layout train.py and train_ml.py store one or
N models in (with optimizers, scalers, RNG states, progress and the run's arguments), atomic writes.
Reading: every layout this project and the older reproduction wrote (through the safe reader of
aligned_reid.safe_load, which runs no code from the file), the state to resume from, the run's saved
arguments, and Models built exactly from any of those files."""
import argparse
import json
import os
import random
from collections import OrderedDict

import numpy as np
import torch

from aligned_reid.data import IMAGENET_MEAN, IMAGENET_STD
from aligned_reid.files import atomic_write
from aligned_reid.model import BACKBONES, Model
from aligned_reid.safe_load import CheckpointError, load_file

CKPT_NAME = 'ckpt.pth'    # the checkpoint of an experiment folder
ARGS_NAME = 'args.json'   # a readable copy of the run's arguments; the checkpoint's 'args' are the ones used


# ----------------------------------------------------------------------------- atomic writes

class CheckpointWriteError(OSError):
    """A checkpoint could not be written (full disk, read-only folder...); the message names the path
    and says whether the previous checkpoint is intact."""


def _os_error_in(exc):
    """The OSError behind `exc` (itself, or its cause / context: torch.save turns a failed write of its
    file object into a RuntimeError whose context is the OSError), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def save_checkpoint(state, path):
    """Writes `state` (any torch-serialisable object) to `path` atomically (files.atomic_write: a crash
    mid-write leaves the previous checkpoint intact). A failed write (no space left, permission denied)
    raises CheckpointWriteError, one line naming the path, the reason and whether the previous
    checkpoint survives."""
    path = os.path.abspath(path)
    try:
        with atomic_write(path) as f:
            torch.save(state, f)
    except (OSError, RuntimeError) as e:
        cause = _os_error_in(e)
        if cause is None:
            raise
        previous = ('the previous checkpoint {} is intact'.format(path) if os.path.isfile(path)
                    else 'no earlier checkpoint existed')
        raise CheckpointWriteError(cause.errno, 'cannot write checkpoint {}: {}; {}'.format(
            path, cause.strerror or cause, previous)) from None


def write_json(obj, path):
    """Writes `obj` as indented JSON, atomically (files.atomic_write). A failed write (a full disk)
    raises CheckpointWriteError naming `path`; a previous file there is intact."""
    try:
        with atomic_write(path, 'w') as f:
            json.dump(obj, f, indent=2, sort_keys=True)
    except OSError as e:
        raise CheckpointWriteError(e.errno, 'cannot write {}: {}'.format(path, e.strerror or e)) from None


# ----------------------------------------------------------------------------- RNG states

def get_rng_state():
    """Captures python, numpy, torch CPU and (when present) CUDA generator states."""
    state = {
        'python': random.getstate(),
        'numpy': np.random.get_state(),
        'torch': torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    """Restores the states captured by get_rng_state (missing entries are left alone)."""
    if 'python' in state:
        random.setstate(state['python'])
    if 'numpy' in state:
        np.random.set_state(state['numpy'])
    if 'torch' in state:
        torch.set_rng_state(torch.as_tensor(state['torch'], dtype=torch.uint8).cpu())
    if 'cuda' in state and torch.cuda.is_available():
        cuda_states = state['cuda']
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([torch.as_tensor(s, dtype=torch.uint8).cpu() for s in cuda_states])


# ----------------------------------------------------------------------------- the layout we write

# train.py (one model) and train_ml.py (two) write the same keys. 'model' is model 1 (the one test.py tests by
# default); it and models[0] are one object, stored once.
KEYS = ('model', 'models', 'optimizers', 'scalers', 'epoch', 'step_in_epoch', 'best_metric', 'args', 'rng',
        'world_size')
TRANSIENT_ARGS = ('start',)  # attributes of parsed arguments that are not flags (never saved)


def path_in(exp_dir):
    """The checkpoint file of an experiment folder."""
    return os.path.join(exp_dir, CKPT_NAME)


def run_arguments(args):
    """The run's arguments as saved in args.json and in every checkpoint: its flags, nothing else."""
    return {k: v for k, v in vars(args).items() if k not in TRANSIENT_ARGS}


def training_state(models, optimizers, scalers, epoch, step_in_epoch, best_metric, args, rng, world_size):
    """The checkpoint dict of a run: bare models and their optimizers and GradScalers (None without one),
    `epoch` epochs and `step_in_epoch` steps of the next done, the best periodic test (a dict or None), the
    run's arguments (a dict), every rank's RNG states (get_rng_state, in rank order) and the world size."""
    sds = [m.state_dict() for m in models]
    state = {'model': sds[0], 'models': sds, 'optimizers': [o.state_dict() for o in optimizers],
             'scalers': [s.state_dict() if s is not None else None for s in scalers], 'epoch': epoch,
             'step_in_epoch': step_in_epoch, 'best_metric': best_metric, 'args': args, 'rng': rng,
             'world_size': world_size}
    assert tuple(state) == KEYS
    return state


def resume_state(obj):
    """What a resumed run needs from a checkpoint object, from the layout above or the two this code wrote
    before it (train.py: 'optimizer' and 'scaler'; train_ml.py: 'optimizers' and 'scalers', no
    'best_metric'): dict of 'optimizers', 'scalers' (lists, one per model), 'epoch', 'step_in_epoch',
    'best_metric', 'rng' (list per rank), 'world_size'. CheckpointError when it holds no optimizer state."""
    if 'optimizers' in obj:
        optimizers, scalers = list(obj['optimizers']), list(obj.get('scalers') or [])
    elif 'optimizer' in obj:
        optimizers, scalers = [obj['optimizer']], [obj.get('scaler')]
    else:
        raise CheckpointError('holds no optimizer state: it cannot be resumed')
    scalers += [None] * (len(optimizers) - len(scalers))
    return dict(optimizers=optimizers, scalers=scalers, epoch=int(obj.get('epoch') or 0),
                step_in_epoch=int(obj.get('step_in_epoch') or 0), best_metric=obj.get('best_metric'),
                rng=list(obj.get('rng') or []), world_size=obj.get('world_size', 1))


# ----------------------------------------------------------------------------- layouts we read

def _is_state_dict(obj):
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items())


def _is_optimizer_state(obj):
    return isinstance(obj, dict) and 'state' in obj and 'param_groups' in obj


def describe(obj):
    """A short description of an unrecognised object, for messages."""
    if isinstance(obj, dict):
        keys = [repr(k) for k in list(obj)[:8]]
        return 'a dict with keys {}{}'.format(', '.join(keys), ' ...' if len(obj) > 8 else '')
    if isinstance(obj, (list, tuple)):
        return 'a {} of {} items'.format(type(obj).__name__, len(obj))
    return 'a {}'.format(type(obj).__name__)


def _saved_args(args):
    """Saved arguments as a dict: ours are a dict; other code bases pickle an argparse.Namespace."""
    if isinstance(args, argparse.Namespace):
        return dict(vars(args))
    return dict(args) if isinstance(args, dict) else {}


def _pick(models, model_index, path, what):
    if not 1 <= model_index <= len(models):
        raise CheckpointError('{}: {} holds {} model(s); --model_index {} is out of range (1..{})'.format(
            path, what, len(models), model_index, len(models)))
    return models[model_index - 1]


def recognise(obj, path, model_index=1):
    """(model state dict as in the file, saved train.py arguments or {}, layout description, epoch or
    None, whether it comes from the older reproduction) for every layout read here:
    train.py / train_ml.py checkpoints ('model', 'models'), the older reproduction's ckpt.pth
    (state_dicts=[model(s)..., optimizer(s)...], ep, scores), a dict holding 'state_dict', or a plain
    state dict. model_index (1-based) picks a model of a mutual-learning checkpoint."""
    if isinstance(obj, dict) and _is_state_dict(obj.get('model')):
        args = _saved_args(obj.get('args'))
        epoch = obj.get('epoch')
        if isinstance(obj.get('models'), list) and len(obj['models']) > 1:
            n = len(obj['models'])
            sd = _pick(obj['models'], model_index, path, 'this train_ml.py checkpoint')
            layout = 'train_ml.py checkpoint, model {} of {} (epoch {})'.format(model_index, n, epoch)
        else:
            sd = _pick([obj['model']], model_index, path, 'this train.py checkpoint')
            layout = 'train.py checkpoint (epoch {})'.format(epoch)
        return sd, args, layout, epoch, False
    if isinstance(obj, dict) and isinstance(obj.get('state_dicts'), (list, tuple)):
        sds = list(obj['state_dicts'])
        models = [sd for sd in sds if _is_state_dict(sd)]
        optims = [sd for sd in sds if _is_optimizer_state(sd)]
        in_order = all(_is_state_dict(sd) for sd in sds[:len(models)])  # models first, then optimizers
        if not models or len(models) + len(optims) != len(sds) or not in_order:
            raise CheckpointError('{}: a dict with state_dicts, but its {} entries are not model state dicts '
                                  'followed by optimizer states'.format(path, len(sds)))
        epoch = obj.get('ep')
        kind = ('mutual learning, {} models + {} optimizers'.format(len(models), len(optims))
                if len(models) > 1 else 'model + optimizer' if optims else 'model')
        sd = _pick(models, model_index, path, "the older reproduction's ckpt.pth")
        layout = "the older reproduction's ckpt.pth ({}; model {}; epoch {})".format(kind, model_index, epoch)
        return sd, {}, layout, epoch, True
    if model_index != 1:
        raise CheckpointError('{}: holds one model; --model_index {} is out of range (1..1)'.format(
            path, model_index))
    if isinstance(obj, dict) and _is_state_dict(obj.get('state_dict')):
        return obj['state_dict'], _saved_args(obj.get('args')), "checkpoint dict holding 'state_dict'", None, False
    if _is_state_dict(obj):
        return obj, {}, 'plain state dict', None, False
    raise CheckpointError("{}: not a model checkpoint: {} (expected a state dict of tensors, a train.py "
                          "checkpoint holding 'model', or the older reproduction's dict holding "
                          "'state_dicts')".format(path, describe(obj)))


def convert_state(sd):
    """Our Model's key names from any layout: 'module.' prefixes (DataParallel / DDP) stripped, the
    older reproduction's 'fc.*' classifier renamed 'classifier.*', and its local_conv bias folded into
    local_bn: in eval mode BN(conv(x) + b) = gamma (conv(x) + b - mean) / sqrt(var + eps) + beta, which is
    BN(conv(x)) with running mean (mean - b); in training mode the batch mean absorbs b, so the bias never
    mattered there. Returns (state dict, list of the conversions made)."""
    out, notes = OrderedDict(), []
    for k, v in sd.items():
        while k.startswith('module.'):
            k = k[len('module.'):]
            if "'module.' prefixes stripped" not in notes:
                notes.append("'module.' prefixes stripped")
        if k.startswith('fc.'):
            k = 'classifier.' + k[len('fc.'):]
            if "'fc.*' classifier read as 'classifier.*'" not in notes:
                notes.append("'fc.*' classifier read as 'classifier.*'")
        if k in out:
            raise CheckpointError('key {!r} appears twice once prefixes are stripped'.format(k))
        out[k] = v
    bias = out.get('local_conv.bias')
    if bias is not None and 'local_bn.running_mean' in out:
        mean = out['local_bn.running_mean']
        if bias.shape == mean.shape:
            out['local_bn.running_mean'] = (mean.double() - bias.double()).to(mean.dtype)
            del out['local_conv.bias']
            notes.append('local_conv.bias folded into local_bn.running_mean')
    return out, notes


def _keys(keys, n=6):
    keys = sorted(keys)
    return ', '.join(keys[:n]) + (' ... ({} in all)'.format(len(keys)) if len(keys) > n else '')


def load_backbone(model, path):
    """Loads the backbone of `model` from `path`: a torchvision ResNet state dict (with or without 'fc.*'),
    or the backbone of any whole-model file read_checkpoint reads. FileNotFoundError names the path; a
    ValueError names the keys that do not fit. Returns the model."""
    if not os.path.isfile(path):
        raise FileNotFoundError('pretrained weights file not found: {}'.format(path))
    state, layout = backbone_state(path)
    model.load_backbone_state(state, '{} ({})'.format(path, layout))
    return model


def backbone_state(path):
    """The ResNet backbone weights (torchvision key names, no 'fc.*') of any file: a torchvision ResNet
    state dict, or any whole-model layout read_checkpoint recognises (its 'base.*' keys)."""
    sd, _, layout, _, _ = recognise(load_file(path), path)
    state, _ = convert_state(sd)
    if any(k.startswith('base.') for k in state):
        other = [k for k in state if not k.startswith(('base.', 'local_', 'classifier.'))]
        if other:
            raise CheckpointError('{} ({}): keys outside the model: {}'.format(path, layout, _keys(other)))
        return OrderedDict((k[len('base.'):], v) for k, v in state.items() if k.startswith('base.')), layout
    return OrderedDict((k, v) for k, v in state.items() if not k.startswith('classifier.')), layout


# ----------------------------------------------------------------------------- models from files

# The older reproduction's test preprocessing (its train.py: im_mean / im_std, after a /255 scale).
OLD_MEAN = (0.486, 0.459, 0.408)
OLD_STD = (0.229, 0.224, 0.225)
MODEL_FLAGS = ('base_model', 'last_stride', 'local_conv_out_channels', 'resize_h_w', 'normalize_feature')
MODEL_DEFAULTS = {'base_model': 'resnet50', 'last_stride': 2, 'local_conv_out_channels': 128,
                  'resize_h_w': [256, 128], 'normalize_feature': False}


def infer_architecture(state, path, layout):
    """(base_model, local_conv_out_channels) from the key structure and shapes of a converted state."""
    blocks, bottleneck = {}, False
    for k in state:
        parts = k.split('.')
        if len(parts) > 3 and parts[0] == 'base' and parts[1].startswith('layer') and parts[2].isdigit():
            blocks[parts[1]] = max(blocks.get(parts[1], 0), int(parts[2]) + 1)
            bottleneck = bottleneck or parts[3] == 'conv3'
    counts = tuple(blocks.get('layer{}'.format(i), 0) for i in range(1, 5))
    known = {((2, 2, 2, 2), False): 'resnet18', ((3, 4, 6, 3), False): 'resnet34',
             ((3, 4, 6, 3), True): 'resnet50', ((3, 4, 23, 3), True): 'resnet101'}
    base = known.get((counts, bottleneck))
    if base is None:
        raise CheckpointError('{} ({}): its keys describe no supported backbone (blocks per stage {}, {}; '
                              'supported: {})'.format(path, layout, counts, 'bottleneck' if bottleneck else 'basic',
                                                      ', '.join(BACKBONES)))
    w = state.get('local_conv.weight')
    if w is None:
        raise CheckpointError("{} ({}): no 'local_conv.weight': a bare backbone, not an AlignedReID model "
                              "(use it with train.py --pretrained_path)".format(path, layout))
    return base, int(w.shape[0])


def load_into(model, state, source, layout, classifier='drop'):
    """Loads a converted state dict into `model` with no silent partial load: a missing or unexpected
    key, or a shape that differs, raises CheckpointError naming the keys and the layout. Exact,
    documented exceptions: num_batches_tracked absent from files of torch < 0.4.1 keeps the model's
    (unused in eval mode and with a set momentum); an ID classifier ('classifier.*') of the file is
    dropped when the model has none (testing, or training without the ID loss: every file of the older
    reproduction carries its 'fc.*' one); classifier='new' also lets a model's classifier keep its
    initialisation when the file's has another number of classes or none (a new training set), and
    keeps the file's when it fits. `model` may live on the meta device with `state` from meta_state: a
    dry run that checks everything without the data. Returns a list of notes on what was dropped, kept
    or left as is."""
    own = model.state_dict()
    notes = []
    state = OrderedDict(state)
    file_cls = {k: v for k, v in state.items() if k.startswith('classifier.')}
    own_cls = {k for k in own if k.startswith('classifier.')}
    file_classes = file_cls['classifier.weight'].shape[0] if 'classifier.weight' in file_cls else None
    if file_cls and not own_cls:
        for k in file_cls:
            del state[k]
        notes.append('ID classifier of the file ({} classes) dropped: the model has none'.format(file_classes))
    elif own_cls and classifier == 'new':
        if not file_cls or any(k not in file_cls or file_cls[k].shape != own[k].shape for k in own_cls):
            for k in file_cls:
                del state[k]
            for k in own_cls:
                state[k] = own[k]
            notes.append('ID classifier initialised anew ({} classes in the file, {} here)'.format(
                file_classes or 'none', own['classifier.weight'].shape[0]))
        else:
            notes.append('ID classifier of the file kept ({} classes)'.format(file_classes))
    for k in own:
        if k.endswith('num_batches_tracked') and k not in state:
            state[k] = own[k]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts, fixes = [], []
        if missing:
            parts.append('the model needs keys the file lacks: ' + _keys(missing))
            if all(k.startswith('classifier.') for k in missing):
                fixes.append('the ID classifier (-idlw > 0) is not in the file: train without -idlw, or start a '
                             'new run from it with --model_weight_file (the classifier is then initialised anew)')
            else:
                fixes.append('the file is incomplete or holds another network: use the whole state dict of an '
                             'AlignedReID model')
        if unexpected:
            parts.append('the file holds keys the model does not use: ' + _keys(unexpected))
            fixes.append('these belong to another network or a variant not read here; the backbone and local '
                         'channels are read from the weights, --last_stride and -idlw from the flags')
        raise CheckpointError('{} ({}): {}; the model is {}. To fix: {}'.format(
            source, layout, '; '.join(parts), _describe_model(model), '; '.join(fixes)))
    bad = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in own if state[k].shape != own[k].shape]
    if bad:
        raise CheckpointError('{} ({}): shapes differ from the model ({}): {}'.format(
            source, layout, _describe_model(model),
            '; '.join('{} {} in the file, {} here'.format(*b) for b in bad[:4])))
    model.load_state_dict(state, strict=True)
    return notes


def meta_state(state):
    """`state` with every tensor replaced by a meta tensor of its shape and dtype: loaded into a Model built
    on the meta device (load_into, Model.load_backbone_state) it is checked key by key and shape by shape
    exactly as the real tensors would be, with nothing copied (the flag checks refuse weights that do not
    fit before a run writes anything)."""
    return OrderedDict((k, v.to('meta') if torch.is_tensor(v) else v) for k, v in state.items())


def models_to_load(num_models, file_models, model_index=1, own_run=False, index_given=False):
    """Which model of a file (1-based) each of `num_models` models loads: model i its model i when the file
    is the run's own (resumed or tested: own_run) or, to start from, holds as many models and no model index
    is given (mutual learning goes on from both, not from two copies of one); else every model the file's
    model `model_index`."""
    if num_models > 1 and (own_run or (file_models == num_models and not index_given)):
        return list(range(1, num_models + 1))
    return [model_index] * num_models


def _describe_model(model):
    n_cls = model.classifier.out_features if getattr(model, 'classifier', None) is not None else None
    return '{} with {}-channel local features{}'.format(
        getattr(model, 'base_name', 'a backbone'), model.local_conv.out_channels,
        ', a {}-class classifier'.format(n_cls) if n_cls else ', no classifier')


def read_checkpoint(path, model_index=1, obj=None):
    """Reads and recognises a whole-model file. Returns a dict: 'object' (what the file holds), 'state'
    (converted state dict, classifier as 'classifier.*'), 'args' (saved train.py arguments or {}),
    'layout', 'epoch', 'older' (from the older reproduction), 'notes' (conversions made),
    'base_model', 'local_conv_out_channels' (inferred from the weights), 'index' (model_index) and
    'num_models' (how many models the file holds). `obj`: what the file holds, when
    it was read already (model 2 of a file whose model 1 was read), so no file is read twice."""
    obj = load_file(path) if obj is None else obj
    sd, args, layout, epoch, older = recognise(obj, path, model_index)
    try:
        state, notes = convert_state(sd)
    except CheckpointError as e:
        raise CheckpointError('{} ({}): {}'.format(path, layout, e)) from None
    bare_keys = [k[k.rfind('module.') + len('module.'):] if 'module.' in k else k for k in sd]
    older = older or 'local_conv.bias' in bare_keys or any(k.startswith('fc.') for k in bare_keys)
    if older and 'older' not in layout:
        layout = "the older reproduction's model weights ({})".format(layout)
    base, channels = infer_architecture(state, path, layout)
    return dict(object=obj, state=state, args=args, layout=layout, epoch=epoch, older=older, notes=notes,
                base_model=base, local_conv_out_channels=channels, index=model_index,
                num_models=count_models(obj))


def count_models(obj):
    """How many models a file object that recognise reads holds (2 for train_ml.py's and the older
    reproduction's mutual-learning checkpoints)."""
    if isinstance(obj, dict) and _is_state_dict(obj.get('model')):
        return len(obj['models']) if isinstance(obj.get('models'), list) and obj['models'] else 1
    if isinstance(obj, dict) and isinstance(obj.get('state_dicts'), (list, tuple)):
        return sum(1 for sd in obj['state_dicts'] if _is_state_dict(sd))
    return 1


def resolve_config(ckpt, overrides=None, path=''):
    """The model and test settings of a read checkpoint: overrides (flag values; None ignored) win over
    the saved arguments, which win over the defaults; base_model and local_conv_out_channels come from
    the weights, and an override that contradicts them is an error."""
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    saved = ckpt['args']
    cfg = {}
    for k in MODEL_FLAGS:
        cfg[k] = overrides.get(k, saved.get(k, MODEL_DEFAULTS[k]))
    for k in ('base_model', 'local_conv_out_channels'):
        if k in overrides and overrides[k] != ckpt[k]:
            raise CheckpointError('{} ({}): --{} {} does not fit the weights, which are {} {}: drop the flag'.format(
                path, ckpt['layout'], k, overrides[k], k, ckpt[k]))
        cfg[k] = ckpt[k]
    cfg['resize_h_w'] = [int(v) for v in cfg['resize_h_w']]
    cfg['last_stride'] = int(cfg['last_stride'])
    cfg['normalize_feature'] = bool(cfg['normalize_feature'])
    default_mean, default_std = (OLD_MEAN, OLD_STD) if ckpt['older'] else (IMAGENET_MEAN, IMAGENET_STD)
    cfg['mean'] = [float(v) for v in overrides.get('mean', saved.get('mean', default_mean))]
    cfg['std'] = [float(v) for v in overrides.get('std', saved.get('std', default_std))]
    cfg['layout'] = ckpt['layout']
    cfg['size_from_checkpoint'] = 'resize_h_w' in overrides or 'resize_h_w' in saved
    return cfg


def load_model(path, device='cpu', overrides=None, model_index=1, ckpt=None):
    """A Model in eval mode on `device`, without the ID classifier, from any file read_checkpoint reads.
    overrides: flag values (None ignored) for base_model, last_stride, local_conv_out_channels,
    resize_h_w, normalize_feature. Returns (model, cfg); cfg holds those five settings, 'mean' and 'std'
    of the test normalisation the weights were trained with, 'layout' (the recognised file layout) and
    'size_from_checkpoint' (resize_h_w came from the file or the overrides, not a default). `ckpt`: what
    read_checkpoint(path, model_index) returned, when the caller read the file already."""
    ckpt = ckpt or read_checkpoint(path, model_index)
    cfg = resolve_config(ckpt, overrides, path)
    model = Model(base=cfg['base_model'], last_stride=cfg['last_stride'],
                  local_conv_out_channels=cfg['local_conv_out_channels'], num_classes=None, pretrained=False)
    load_into(model, ckpt['state'], path, ckpt['layout'], classifier='drop')
    return model.to(device).eval(), cfg
