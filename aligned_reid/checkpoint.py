"""The one loader of checkpoints and weight files as models: every layout this project and the older
reproduction wrote (read by aligned_reid.safe_load, which runs no code from the file), converted
exactly into an aligned_reid Model with the settings it was trained with."""
from collections import OrderedDict

from aligned_reid.data import IMAGENET_MEAN, IMAGENET_STD
from aligned_reid.model import BACKBONES, Model

# The older reproduction's test preprocessing (its train.py: im_mean / im_std, after a /255 scale).
OLD_MEAN = (0.486, 0.459, 0.408)
OLD_STD = (0.229, 0.224, 0.225)
MODEL_FLAGS = ('base_model', 'last_stride', 'local_conv_out_channels', 'resize_h_w', 'normalize_feature')
MODEL_DEFAULTS = {'base_model': 'resnet50', 'last_stride': 2, 'local_conv_out_channels': 128,
                  'resize_h_w': [256, 128], 'normalize_feature': False}


from aligned_reid.safe_load import (  # noqa: F401  (re-exported: the reader is part of this module's API)
    CheckpointError, _keys, backbone_state, convert_state, describe, load_file, recognise)


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
    (unused in eval mode and with a set momentum); classifier='drop' ignores 'classifier.*' of the
    file (testing needs no ID classifier); classifier='new' also lets a model's classifier keep its
    initialisation when the file's has another number of classes or none (a new training set).
    Returns a list of notes on what was left as is."""
    own = model.state_dict()
    notes = []
    state = OrderedDict(state)
    file_cls = {k: v for k, v in state.items() if k.startswith('classifier.')}
    own_cls = {k for k in own if k.startswith('classifier.')}
    if file_cls and (classifier == 'drop' and not own_cls):
        for k in file_cls:
            del state[k]
        notes.append('ID classifier of the file not used')
    elif own_cls and classifier == 'new' and (
            not file_cls or any(k not in file_cls or file_cls[k].shape != own[k].shape for k in own_cls)):
        for k in file_cls:
            del state[k]
        for k in own_cls:
            state[k] = own[k]
        notes.append('ID classifier initialised anew ({} classes in the file, {} here)'.format(
            file_cls['classifier.weight'].shape[0] if 'classifier.weight' in file_cls else 'none',
            own['classifier.weight'].shape[0]))
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


def _describe_model(model):
    n_cls = model.classifier.out_features if getattr(model, 'classifier', None) is not None else None
    return '{} with {}-channel local features{}'.format(
        getattr(model, 'base_name', 'a backbone'), model.local_conv.out_channels,
        ', a {}-class classifier'.format(n_cls) if n_cls else ', no classifier')


def read_checkpoint(path, model_index=1):
    """Reads and recognises a whole-model file. Returns a dict: 'object' (what the file holds), 'state'
    (converted state dict, classifier as 'classifier.*'), 'args' (saved train.py arguments or {}),
    'layout', 'epoch', 'older' (from the older reproduction), 'notes' (conversions made),
    'base_model', 'local_conv_out_channels' (inferred from the weights)."""
    obj = load_file(path)
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
                base_model=base, local_conv_out_channels=channels)


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


def load_model(path, device='cpu', overrides=None, model_index=1):
    """A Model in eval mode on `device`, without the ID classifier, from any file read_checkpoint reads.
    overrides: flag values (None ignored) for base_model, last_stride, local_conv_out_channels,
    resize_h_w, normalize_feature. Returns (model, cfg); cfg holds those five settings, 'mean' and 'std'
    of the test normalisation the weights were trained with, 'layout' (the recognised file layout) and
    'size_from_checkpoint' (resize_h_w came from the file or the overrides, not a default)."""
    ckpt = read_checkpoint(path, model_index)
    cfg = resolve_config(ckpt, overrides, path)
    model = Model(base=cfg['base_model'], last_stride=cfg['last_stride'],
                  local_conv_out_channels=cfg['local_conv_out_channels'], num_classes=None, pretrained=False)
    load_into(model, ckpt['state'], path, ckpt['layout'], classifier='drop')
    return model.to(device).eval(), cfg


