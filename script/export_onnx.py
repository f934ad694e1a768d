"""Exports a trained model's inference network (image -> global and local features) to ONNX with a dynamic batch
axis, runs it with onnxruntime and writes the file only if it matches PyTorch (largest difference, relative to the
feature scale, <= --tolerance). The input size, mean and std go into the file's metadata."""
import json
import os

import numpy as np
import torch

from aligned_reid import cli
from aligned_reid.files import atomic_write
from aligned_reid.inference import FeatureExtractor, resolve_checkpoint


class InferenceNet(torch.nn.Module):
    """The model's feature path as a graph with plain tensor outputs: images [N, 3, H, W] (normalised as in
    test.py) -> global [N, C], local [N, h, c]. The ID classifier is left out."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        out = self.model(images)
        return out['global'], out['local']


def build_parser():
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument('--model', required=True,
                   help='checkpoint file (train.py ckpt.pth or a bare state_dict) or experiment folder. '
                        'Default: none (required)')
    p.add_argument('--output', default=None, help='ONNX file to write. Default: <model folder>/model.onnx')
    p.add_argument('--opset', type=int, default=18, help='ONNX opset version. Default: 18')
    p.add_argument('--check_batch', type=int, default=3,
                   help='batch size of the onnxruntime check (differs from the export batch of 2, so the dynamic '
                        'axis is exercised). Default: 3')
    p.add_argument('--tolerance', type=float, default=1e-4,
                   help='largest allowed difference between onnxruntime and PyTorch, relative to the feature scale '
                        '(the largest absolute PyTorch value of each output). Default: 1e-4')
    p.add_argument('--model_index', type=int, default=1,
                   help='which model of a train_ml.py checkpoint (1 or 2). Default: 1')
    p.add_argument('--seed', type=int, default=0, help='seed of the random check batch. Default: 0')
    return p


def check_args(parser, args):
    if not os.path.exists(args.model):
        parser.error('--model: no such file or folder: {}'.format(args.model))
    if args.check_batch < 1 or args.tolerance <= 0:
        parser.error('--check_batch must be >= 1 and --tolerance > 0')
    if args.output is None:
        try:
            args.output = os.path.join(os.path.dirname(os.path.abspath(resolve_checkpoint(args.model))), 'model.onnx')
        except FileNotFoundError as e:
            parser.error('--model: {}'.format(e))
    if os.path.isdir(args.output):
        parser.error('--output {} is a folder; give the ONNX file to write'.format(args.output))
    problem = cli.writable_folder_problem(os.path.dirname(os.path.abspath(args.output)))
    if problem:
        parser.error('--output {}: {}'.format(args.output, problem))
    return args


def parse_args(argv=None):
    parser = build_parser()
    return check_args(parser, parser.parse_args(argv))


def export(model, size, opset=18, metadata=None):
    """InferenceNet(model) (float32, CPU, eval) as an onnx.ModelProto with inputs 'images' [batch, 3, H, W] and
    outputs 'global' [batch, C], 'local' [batch, h, c], batch dynamic, and `metadata` (str -> str) in its
    metadata_props. Uses torch.onnx's dynamo exporter; nothing is written."""
    net = InferenceNet(model).eval()
    example = torch.zeros(2, 3, *size)
    batch = torch.export.Dim('batch', min=1, max=4096)
    program = torch.onnx.export(net, (example,), dynamo=True, input_names=['images'],
                                output_names=['global', 'local'], dynamic_shapes={'images': {0: batch}},
                                opset_version=opset, external_data=False)
    for key, value in (metadata or {}).items():
        program.model.metadata_props[key] = value
    return program.model_proto


def differences(model, onnx_model, images):
    """onnxruntime on `onnx_model` (bytes or a file) against PyTorch for a batch images [B, 3, H, W] ->
    (largest absolute difference, the same relative to the feature scale, onnxruntime outputs). The feature
    scale of an output is its largest absolute PyTorch value; the relative figure is the largest over outputs."""
    import onnxruntime as ort
    session = ort.InferenceSession(onnx_model, providers=['CPUExecutionProvider'])
    got = session.run(['global', 'local'], {'images': images.numpy()})
    with torch.inference_mode():
        want = [w.numpy() for w in InferenceNet(model)(images)]
    absolute = [float(np.abs(g - w).max()) for g, w in zip(got, want)]
    relative = [a / max(float(np.abs(w).max()), np.finfo(np.float32).tiny) for a, w in zip(absolute, want)]
    return max(absolute), max(relative), got


def main(args):
    logger = cli.setup_logging(None, name='aligned_reid.export')
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise SystemExit('export_onnx.py: needs the export extra (pip install -e .[export]): {}'.format(e))
    extractor = FeatureExtractor(args.model, device='cpu', model_index=args.model_index)
    model, cfg = extractor.model.float().eval(), extractor.cfg
    size = tuple(cfg['resize_h_w'])
    metadata = {'resize_h_w': json.dumps(list(size)), 'mean': json.dumps(list(cfg['mean'])),
                'std': json.dumps(list(cfg['std'])), 'normalize_feature': json.dumps(bool(cfg['normalize_feature'])),
                'base_model': str(cfg.get('base_model'))}
    blob = export(model, size, args.opset, metadata).SerializeToString()
    images = torch.randn(args.check_batch, 3, *size, generator=torch.Generator().manual_seed(args.seed))
    absolute, relative, got = differences(model, blob, images)
    logger.info('onnxruntime vs PyTorch on a batch of %d: largest difference %.3g, %.3g of the feature scale '
                '(tolerance %g); outputs %s, %s', args.check_batch, absolute, relative, args.tolerance,
                got[0].shape, got[1].shape)
    if not relative <= args.tolerance:
        raise SystemExit('export_onnx.py: onnxruntime differs from PyTorch by {:.3g} of the feature scale '
                         '(largest difference {:.3g}) > --tolerance {:g}; {} not written'.format(
                             relative, absolute, args.tolerance, args.output))
    with atomic_write(args.output) as f:                 # whole or not at all
        f.write(blob)
    logger.info('wrote %s: input images [batch, 3, %d, %d] resized to that size and normalised with mean %s, '
                'std %s (in the metadata: %s); outputs global, local', args.output, *size, metadata['mean'],
                metadata['std'], ', '.join(metadata))
    return args.output, relative


if __name__ == '__main__':
    cli.run_cli(main, parse_args, 'export_onnx.py', errors=(ValueError, FileNotFoundError),
                interrupted='interrupted; --output is written only after the export passes its check')
