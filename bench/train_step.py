"""Benchmark: one full AlignedReID training step (global + aligned local triplet + ID loss)
against the bare backbone forward and backward on the same batch, in the same process.
Example: python bench/train_step.py --base resnet50 --device cpu (add --threads 1 on a busy CPU)."""
import functools
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from aligned_reid import cli, distance
from aligned_reid.loss import compute_losses
from aligned_reid.model import Model

# Operators that only make views: no kernel on any device.
_VIEWS = ("view", "_unsafe_view", "as_strided", "slice", "select", "t", "transpose", "permute", "expand",
          "unsqueeze", "squeeze", "alias", "detach", "split", "chunk", "unbind")


class OpCounter(TorchDispatchMode):
    """Counts the tensor operations that reach a backend (forward and autograd's backward), views
    excepted: on a GPU each is at least one kernel launch, so the count is a device-independent
    measure of a step's launch overhead."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__.lstrip("_") not in _VIEWS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def loss_operations(fixed, labels, schedule):
    """Tensor operations of the losses alone (forward + backward) with one shortest-path schedule."""
    original = distance._shortest_path_cells_first
    distance._shortest_path_cells_first = functools.partial(original, schedule=schedule)
    try:
        feats = {k: v.clone().requires_grad_(True) for k, v in fixed.items()}
        with OpCounter() as counter:
            compute_losses(feats, labels, global_loss_weight=1., local_loss_weight=1., id_loss_weight=1.,
                           check_batch=False)["loss"].backward()
    finally:
        distance._shortest_path_cells_first = original
    return counter.count


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = Model(args.base, last_stride=args.last_stride, num_classes=args.num_classes)
    model.to(device).train()
    batch = args.ids_per_batch * args.ims_per_id
    images = torch.randn(batch, 3, args.height, args.width, device=device)
    labels = torch.arange(args.ids_per_batch, device=device).repeat_interleave(args.ims_per_id)

    def bare_step():
        model.zero_grad(set_to_none=True)
        model.base(images).mean(dim=(2, 3)).sum().backward()

    def full_step():
        model.zero_grad(set_to_none=True)
        losses = compute_losses(model(images), labels, global_margin=0.3, local_margin=0.3,
                                global_loss_weight=1., local_loss_weight=1., id_loss_weight=1.,
                                check_batch=False)
        losses["loss"].backward()

    with torch.no_grad():
        fixed = {k: v.detach() for k, v in model(images).items()}

    def losses_only():
        feats = {k: v.clone().requires_grad_(True) for k, v in fixed.items()}
        compute_losses(feats, labels, global_loss_weight=1., local_loss_weight=1.,
                       id_loss_weight=1., check_batch=False)["loss"].backward()

    def timed(fn):
        """Wall-clock and process CPU seconds of one call (CPU time is the steadier figure on
        a machine shared with other jobs)."""
        if device.type == "cuda":
            torch.cuda.synchronize()
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - w0, time.process_time() - c0

    bare_step(), full_step()                   # warm-up (allocator, kernels)
    bare, full = [], []
    for _ in range(args.repeats):              # interleaved, so load changes hit both alike
        bare.append(timed(bare_step))
        full.append(timed(full_step))
    losses_only()
    loss_times = [timed(losses_only) for _ in range(20)]
    wb, cb = min(t[0] for t in bare), min(t[1] for t in bare)
    wf, cf = min(t[0] for t in full), min(t[1] for t in full)
    print(f"{args.base}, batch {batch} ({args.ids_per_batch} ids x {args.ims_per_id}) at "
          f"{args.height}x{args.width}, {args.device}, {torch.get_num_threads()} threads, "
          f"best of {args.repeats}")
    print("                                      wall s   CPU s")
    print(f"bare backbone forward+backward     : {wb:7.3f} {cb:7.3f}")
    print(f"AlignedReID step (global+local+ID) : {wf:7.3f} {cf:7.3f}")
    print(f"ratio full / bare                  : {wf / wb:7.3f} {cf / cb:7.3f}")
    print(f"losses alone, forward+backward     : {min(t[0] for t in loss_times):7.4f} "
          f"{min(t[1] for t in loss_times):7.4f}  (on fixed features, best of 20)")
    rows, diagonals = (loss_operations(fixed, labels, s) for s in ("rows", "diagonals"))
    print(f"losses alone, tensor operations    : {rows} with the row schedule of the shortest path (CUDA's), "
          f"{diagonals} with the anti-diagonal one (the CPU's): {diagonals / rows:.2f}x")


def build_parser():
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument("--base", default="resnet50", help="backbone (default resnet50)")
    p.add_argument("--last_stride", type=int, default=2, help="last stride (default 2)")
    p.add_argument("--ids_per_batch", type=int, default=8, help="identities per batch (default 8)")
    p.add_argument("--ims_per_id", type=int, default=4, help="images per identity (default 4)")
    p.add_argument("--height", type=int, default=256, help="input height (default 256)")
    p.add_argument("--width", type=int, default=128, help="input width (default 128)")
    p.add_argument("--num_classes", type=int, default=751,
                   help="ID classifier size (default 751, Market-1501 trainval)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads, 0 keeps torch's default (default 0)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per variant (default 3)")
    return p


if __name__ == "__main__":
    main(build_parser().parse_args())
