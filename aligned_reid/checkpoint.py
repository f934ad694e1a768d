"""Loading a trained model for inference: a train.py / train_ml.py checkpoint or a bare state
dict -> the Model its saved arguments describe, and the settings it was trained with."""
from .data import IMAGENET_MEAN, IMAGENET_STD
from .model import Model
from .utils import load_checkpoint

_MODEL_FLAGS = ('base_model', 'last_stride', 'local_conv_out_channels', 'resize_h_w', 'normalize_feature')
_MODEL_DEFAULTS = {'base_model': 'resnet50', 'last_stride': 2, 'local_conv_out_channels': 128,
                  'resize_h_w': [256, 128], 'normalize_feature': False}


def load_model(path, device='cpu', overrides=None, model_index=1):
    """Builds the Model described by the checkpoint's saved arguments and loads its weights.

    path: a train.py checkpoint (dict with 'model' and 'args'; a train_ml.py one also holds
    'models', of which model_index (1-based) is taken) or a bare state dict (then the settings
    come from `overrides` or the defaults of train.py). overrides: dict of model settings
    (base_model, last_stride, local_conv_out_channels, resize_h_w, normalize_feature); None
    values are ignored, others win over the saved ones. The ID classifier is not loaded.
    Returns (model in eval mode on `device`, cfg) with cfg = those five settings, 'mean',
    'std' (the input normalisation), 'layout' ('train.py checkpoint' or 'state dict') and
    'size_from_checkpoint' (whether resize_h_w was read from the file)."""
    state = load_checkpoint(path, map_location='cpu')
    if isinstance(state, dict) and 'model' in state and isinstance(state['model'], dict):
        weights, saved, layout = state['model'], dict(state.get('args') or {}), 'train.py checkpoint'
        if model_index != 1:
            models = state.get('models')
            if not isinstance(models, (list, tuple)) or not 1 <= model_index <= len(models):
                raise ValueError('{}: model_index {} asked, but the checkpoint holds {} model(s)'.format(
                    path, model_index, len(models) if isinstance(models, (list, tuple)) else 1))
            weights = models[model_index - 1]
    elif isinstance(state, dict):
        weights, saved, layout = state, {}, 'state dict'
        if model_index != 1:
            raise ValueError('{}: model_index {} asked of a bare state dict'.format(path, model_index))
    else:
        raise ValueError('{}: not a checkpoint or state_dict'.format(path))
    weights = {(k[len('module.'):] if k.startswith('module.') else k): v for k, v in weights.items()}
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    cfg = {k: overrides[k] if k in overrides else saved.get(k, _MODEL_DEFAULTS[k]) for k in _MODEL_FLAGS}
    cfg['resize_h_w'] = [int(v) for v in cfg['resize_h_w']]
    model = Model(base=cfg['base_model'], last_stride=cfg['last_stride'],
                  local_conv_out_channels=cfg['local_conv_out_channels'], num_classes=None, pretrained=False)
    own = model.state_dict()
    missing = [k for k in own if k not in weights]
    if missing:
        raise ValueError('{}: weights do not fit a {} model (missing {}{}); give --base_model / '
                         '--local_conv_out_channels to match'.format(
                             path, cfg['base_model'], ', '.join(missing[:3]), '...' if len(missing) > 3 else ''))
    try:
        model.load_state_dict({k: weights[k] for k in own})  # the ID classifier is not needed for testing
    except RuntimeError as e:
        raise ValueError('{}: weights do not fit a {} model: {}'.format(path, cfg['base_model'], e))
    cfg.update(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD), layout=layout,
               size_from_checkpoint='resize_h_w' not in overrides and 'resize_h_w' in saved)
    return model.to(device).eval(), cfg
