"""Trains AlignedReID (global + aligned local batch-hard triplet loss, optional ID loss) on a prepared
dataset, then tests the final model. One process, or DistributedDataParallel under torchrun."""
import sys

import torch

from aligned_reid import cli, distributed, engine, train_flags
from aligned_reid.loss import compute_losses


def build_parser():
    return train_flags.build_parser(__doc__)


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    return train_flags.check_args(parser, parser.parse_args(argv), cli.explicit_dests(build_parser, argv))


def main(args, compute=compute_losses):
    """Trains and tests as the flags say. `compute`: the loss function (aligned_reid.loss.compute_losses).
    Returns the final test's results (aligned_reid.evaluation.evaluate) on rank 0, else None."""
    # seed and distributed set-up
    run = engine.setup_run(args, 'train.py')

    # data
    partitions, im_dir, loader, num_classes = engine.build_train_data(args, run)

    # model, loss, optimizer
    model = engine.build_model(args, num_classes, run)
    amp_dtype, scalers = engine.amp_settings(args.amp, run.device, run.logger)
    if amp_dtype is not None:
        model = model.to(memory_format=torch.channels_last)
    losses = engine.loss_kwargs(args)

    def step_losses(outputs, labels):
        return [compute(outputs[0], labels, **losses)]

    optimizer = torch.optim.Adam(model.parameters(), lr=args.base_lr, weight_decay=args.weight_decay)

    # weights to start from, or the run to resume
    progress = engine.start_from_file(args, [model], [optimizer], scalers, run)

    # test-only early return
    if args.onlytest or progress is None:
        if args.onlytest and run.rank == 0:
            engine.final_test([model], partitions, im_dir, args, run, amp=amp_dtype is not None)
        distributed.cleanup_distributed()
        return None

    # epoch loop (schedule, checkpoints, periodic tests)
    engine.fit(args, run, [model], [optimizer], scalers, loader, step_losses, progress, partitions, im_dir,
               amp_dtype=amp_dtype)

    # final test on rank 0 alone; the other ranks are done
    if run.rank == 0 and args.final_test:
        results = engine.final_test([model], partitions, im_dir, args, run, amp=amp_dtype is not None)
        return results[0] if results else None
    return None


if __name__ == '__main__':
    cli.run_cli(main, parse_args, 'train.py', log_to_file=True)
