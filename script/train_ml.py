"""Mutual learning (AlignedReID section 3.3, Zhang et al. "Deep Mutual Learning"): two models trained
together on the same P x K batches, each pulled towards the other's class probabilities and distances.
Flags as script/train.py, plus the mutual-loss weights -pmlw, -gdmlw, -ldmlw (-ldmlw needs
--local_dist_own_hard_sample true) and --same_init (both models from the same weights)."""
import functools
import sys

import torch

from aligned_reid import cli, distributed, engine, train_flags
from aligned_reid.loss import mutual_learning_losses


def build_parser():
    return train_flags.build_parser(__doc__, mutual=True)


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    return train_flags.check_args(parser, parser.parse_args(argv), cli.explicit_dests(build_parser, argv),
                                  mutual=True)


def main(args):
    """Trains both models and tests them. Returns the final test's results of each model on rank 0."""
    # seed and distributed set-up
    run = engine.setup_run(args, 'train_ml.py')

    # data
    partitions, im_dir, loader, num_classes = engine.build_train_data(args, run)

    # models, losses, optimizers
    # (model i from the generator of (seed, i); --same_init: both from model 1's, so they start equal)
    models = [engine.build_model(args, num_classes, run, index=0 if args.same_init else i)
              for i in range(train_flags.NUM_MODELS)]
    amp_dtype, scalers = engine.amp_settings(args.amp, run.device, run.logger, num_models=len(models))
    if amp_dtype is not None:
        models = [m.to(memory_format=torch.channels_last) for m in models]
    mutual = dict(prob_weight=args.prob_mutual_loss_weight, global_dist_weight=args.global_dist_mutual_loss_weight,
                  local_dist_weight=args.local_dist_mutual_loss_weight)
    step_losses = functools.partial(mutual_learning_losses, losses=engine.loss_kwargs(args), mutual=mutual)
    optimizers = [torch.optim.Adam(m.parameters(), lr=args.base_lr, weight_decay=args.weight_decay) for m in models]

    # weights to start from, or the run to resume
    progress = engine.start_from_file(args, models, optimizers, scalers, run)

    # test-only early return
    if args.onlytest or progress is None:
        results = None
        if args.onlytest and run.rank == 0:
            results = engine.final_test(models, partitions, im_dir, args, run, amp=amp_dtype is not None)
        distributed.cleanup_distributed()
        return results

    # epoch loop (schedule, checkpoints, periodic tests)
    engine.fit(args, run, models, optimizers, scalers, loader, step_losses, progress, partitions, im_dir,
               amp_dtype=amp_dtype)

    # final test of both models on rank 0
    if run.rank == 0 and args.final_test:
        return engine.final_test(models, partitions, im_dir, args, run, amp=amp_dtype is not None)
    return None


if __name__ == '__main__':
    cli.run_cli(main, parse_args, 'train_ml.py', log_to_file=True)
