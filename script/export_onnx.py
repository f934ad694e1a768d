"""Exports a trained model's inference network (image -> global and local features) to ONNX with a dynamic batch
axis, then runs the file with onnxruntime and fails unless it matches PyTorch (largest difference <= --tolerance)."""
import os

import numpy as np
import torch

from aligned_reid import cli
from aligned_reid.inference import FeatureExtractor


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
                   help='largest allowed absolute difference between onnxruntime and PyTorch. Default: 1e-4')
    p.add_argument('--model_index', type=int, default=1,
                   help='which model of a train_ml.py checkpoint (1 or 2). Default: 1')
    p.add_argument('--seed', type=int, default=0, help='seed of the random check batch. Default: 0')
    return p


def check_args(parser, args):
    if not os.path.exists(args.model):
        parser.error('--model: no such file or folder: {}'.format(args.model))
    if args.check_batch < 1 or args.tolerance <= 0:
        parser.error('--check_batch must be >= 1 and --tolerance > 0')
    return args


def parse_args(argv=None):
    parser = build_parser()
    return check_args(parser, parser.parse_args(argv))


def export(model, path, size, opset=18):
    """Writes InferenceNet(model) (float32, CPU, eval) to `path` with inputs 'images' [batch, 3, H, W] and outputs
    'global' [batch, C], 'local' [batch, h, c], batch dynamic. Uses torch.onnx's dynamo exporter."""
    net = InferenceNet(model).eval()
    example = torch.zeros(2, 3, *size)
    batch = torch.export.Dim('batch', min=1, max=4096)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    program = torch.onnx.export(net, (example,), dynamo=True, input_names=['images'],
                                output_names=['global', 'local'], dynamic_shapes={'images': {0: batch}},
                                opset_version=opset, external_data=False)
    program.save(path)
    return path


def max_difference(model, path, images):
    """Largest absolute difference between onnxruntime on `path` and PyTorch, over both outputs, for a batch
    images [B, 3, H, W] -> (float, onnxruntime outputs)."""
    import onnxruntime as ort
    session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    got = session.run(['global', 'local'], {'images': images.numpy()})
    with torch.inference_mode():
        want = InferenceNet(model)(images)
    return max(float(np.abs(g - w.numpy()).max()) for g, w in zip(got, want)), got


def main(args):
    logger = cli.setup_logging(None, name='aligned_reid.export')
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise SystemExit('export_onnx.py: needs the export extra (pip install -e .[export]): {}'.format(e))
    extractor = FeatureExtractor(args.model, device='cpu', model_index=args.model_index)
    model, size = extractor.model.float().eval(), tuple(extractor.cfg['resize_h_w'])
    out = args.output or os.path.join(os.path.dirname(os.path.abspath(extractor.path)), 'model.onnx')
    export(model, out, size, args.opset)
    logger.info('wrote %s (input images [batch, 3, %d, %d], outputs global, local)', out, *size)
    images = torch.randn(args.check_batch, 3, *size, generator=torch.Generator().manual_seed(args.seed))
    diff, got = max_difference(model, out, images)
    logger.info('onnxruntime vs PyTorch on a batch of %d: largest difference %.3g (tolerance %g); outputs %s, %s',
                args.check_batch, diff, args.tolerance, got[0].shape, got[1].shape)
    if not diff <= args.tolerance:
        raise SystemExit('export_onnx.py: onnxruntime differs from PyTorch by {:.3g} > --tolerance {:g}'.format(
            diff, args.tolerance))
    return out, diff


if __name__ == '__main__':
    cli.run_cli(main, parse_args, 'export_onnx.py', errors=(ValueError, FileNotFoundError))
