"""Mutual learning (AlignedReID section 3.3, Zhang et al. "Deep Mutual Learning"): two models trained
together on the same P x K batches, each pulled towards the other's class probabilities and distances.
Flags as script/train.py, plus the mutual-loss weights -pmlw, -gdmlw, -ldmlw."""
import argparse
import os
import sys

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import train as single  # script/train.py, beside this file
from aligned_reid import utils
from aligned_reid.loss import compute_losses, mutual_losses

NUM_MODELS = 2


def build_parser():
    p = single.build_parser()
    p.description = __doc__
    m = p.add_argument_group('mutual learning')
    m.add_argument('-pmlw', '--prob_mutual_loss_weight', '--pm_loss_weight', dest='prob_mutual_loss_weight', type=float, default=0.,
                   help='weight of the KL divergence to the partner\'s class probabilities (needs -idlw > 0). '
                        'Default: 0')
    m.add_argument('-gdmlw', '--global_dist_mutual_loss_weight', '--gdm_loss_weight',
                   dest='global_dist_mutual_loss_weight', type=float, default=0.,
                   help='weight of the squared difference to the partner\'s global distance matrix. Default: 0')
    m.add_argument('-ldmlw', '--local_dist_mutual_loss_weight', '--ldm_loss_weight',
                   dest='local_dist_mutual_loss_weight', type=float, default=0.,
                   help='weight of the squared difference to the partner\'s local distance matrix. Default: 0')
    m.add_argument('--num_models', type=int, default=NUM_MODELS,
                   help="the older reproduction's flag, accepted with its one value here: this script trains {} "
                        'models. Default: {}'.format(NUM_MODELS, NUM_MODELS))
    for action in p._actions:
        if action.dest == 'exp_dir':
            action.help = ('experiment folder. Default: exp/train_ml/<train_dataset> under the current folder')
    return p


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.exp_dir is None:
        args.exp_dir = os.path.join('exp', 'train_ml', args.train_dataset)
    args = single.check_args(parser, args, single.explicit_dests(argv, build_parser))
    if args.num_models != NUM_MODELS:
        parser.error('--num_models {}: train_ml.py trains {} models; for one, use train.py'.format(
            args.num_models, NUM_MODELS))
    for flag in ('prob_mutual_loss_weight', 'global_dist_mutual_loss_weight', 'local_dist_mutual_loss_weight'):
        if getattr(args, flag) < 0:
            parser.error('--{} must not be negative, got {}'.format(flag, getattr(args, flag)))
    if args.prob_mutual_loss_weight > 0 and args.id_loss_weight == 0:
        parser.error('-pmlw {} needs the classifier: give -idlw > 0'.format(args.prob_mutual_loss_weight))
    return args


def train_one_epoch(models, loader, optimizers, scalers, device, epoch, losses, mutual, amp_dtype=None,
                    start_step=0, stop=None, channels_last=False):
    """One pass of both models over the same batches. Model i minimises its own AlignedReID losses plus
    the mutual losses against the other model's (detached) outputs. Statistics stay on the device; the
    step's one read (train.read_step) comes before the updates, so a non-finite loss stops the run first.
    Returns (mean statistics with 'm1_' / 'm2_' prefixes, images seen on all ranks, steps done, stopped
    early, seconds)."""
    for m in models:
        m.train()
    total = len(loader)
    loader.set_epoch(epoch, start_step)
    timer, stats = single.EpochTimer(), single.DeviceStats()
    n_images, stopped, step = 0, False, start_step
    bar = tqdm(total=total, initial=start_step, desc='epoch {}'.format(epoch), disable=not utils.is_main(),
               leave=False, dynamic_ncols=True)
    try:  # the bar is cleared however the epoch ends (an error message then starts its own line)
        for step, (images, labels) in enumerate(timer.batches(loader), start=start_step + 1):
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            outputs = []
            for m in models:
                with torch.autocast(device_type=device.type, dtype=amp_dtype or torch.float32,
                                    enabled=amp_dtype is not None):
                    outputs.append({k: v.float() for k, v in m(images).items()})
            results = {}
            for i, out in enumerate(outputs):
                own = compute_losses(out, labels, **losses)
                ml = mutual_losses(out, outputs[1 - i], labels, normalize_feature=losses['normalize_feature'], **mutual)
                r = dict(own, **{k: v for k, v in ml.items() if k != 'loss'})
                r['own_loss'], r['mutual_loss'], r['loss'] = own['loss'], ml['loss'], own['loss'] + ml['loss']
                results.update({'m{}_{}'.format(i + 1, k): v for k, v in r.items()})
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            for i, scaler in enumerate(scalers):
                loss = results['m{}_loss'.format(i + 1)]
                (scaler.scale(loss) if scaler is not None else loss).backward()
            values, any_bad, stop_now = single.read_step(stats.add(results), stop, device)
            if any_bad:
                raise single.NonFiniteLoss(single.non_finite_message(stats.terms, values, epoch, step, total))
            for opt, scaler in zip(optimizers, scalers):
                single.optimizer_step(opt, scaler)
            n_images += images.shape[0] * utils.get_world_size()
            bar.update()
            bar.set_postfix(loss1='{:.4f}'.format(values[stats.terms.index('m1_loss')]),
                            loss2='{:.4f}'.format(values[stats.terms.index('m2_loss')]), refresh=False)
            if stop_now:
                stopped = True
                break
    finally:
        bar.close()
    means, seconds = single.epoch_means(timer, stats)
    return means, n_images, step, stopped, seconds


def save(path, models, optimizers, scalers, epoch, step_in_epoch, args):
    """Both models in one atomic checkpoint; 'model' holds model 1 so that test.py tests it."""
    rng = utils.all_gather_object(utils.get_rng_state())
    if utils.is_main():
        sds = [single.bare(m).state_dict() for m in models]
        utils.save_checkpoint({
            'model': sds[0], 'models': sds, 'optimizers': [o.state_dict() for o in optimizers],
            'scalers': [s.state_dict() if s is not None else None for s in scalers],
            'epoch': epoch, 'step_in_epoch': step_in_epoch, 'args': vars(args), 'rng': rng,
            'world_size': utils.get_world_size()}, path)
    utils.barrier()


def main(args):
    # seed and distributed set-up
    rank, world, device, logger = single.setup_run(args)
    main_proc = rank == 0

    # data
    partitions, im_dir, loader, num_classes = single.build_train_data(args, rank, world, device, logger)

    # models, losses, optimizers
    models = [single.build_model(args, num_classes, device) for _ in range(NUM_MODELS)]
    amp_dtype, _ = single.amp_settings(args.amp, device, logger)
    scalers = [single.amp_settings(args.amp, device, logger)[1] if amp_dtype == torch.float16 else None
               for _ in models]
    channels_last = amp_dtype is not None
    if channels_last:
        models = [m.to(memory_format=torch.channels_last) for m in models]
    losses = single.loss_kwargs(args)
    mutual = dict(prob_weight=args.prob_mutual_loss_weight, global_dist_weight=args.global_dist_mutual_loss_weight,
                  local_dist_weight=args.local_dist_mutual_loss_weight)
    optimizers = [torch.optim.Adam(m.parameters(), lr=args.base_lr, weight_decay=args.weight_decay) for m in models]

    # resume
    ckpt_path = os.path.join(args.exp_dir, 'ckpt.pth')
    start_epoch, start_step = 0, 0
    if args.model_file:
        # model i of a mutual-learning file (ours or the older reproduction's) for model i here; a
        # --model_weight_file to start from gives both models its --model_index model.
        resumed = args.resume or args.onlytest
        for i, m in enumerate(models):
            args_i = argparse.Namespace(**dict(vars(args), model_index=i + 1 if resumed else args.model_index))
            state = single.load_model_file(args_i, m, logger)
        if args.resume:
            for o, sd in zip(optimizers, state['optimizers']):
                o.load_state_dict(sd)
            for s, sd in zip(scalers, state.get('scalers') or []):
                if s is not None and sd:
                    s.load_state_dict(sd)
            start_epoch, start_step = state['epoch'], state.get('step_in_epoch', 0)
            if len(state.get('rng') or []) == world:
                utils.set_rng_state(state['rng'][rank])
            logger.info('resumed from %s: %d epochs done', ckpt_path, start_epoch)
            if start_epoch >= args.total_epochs and not start_step:
                logger.info('the run in %s is already finished (%d of %d epochs): nothing to train. Test it '
                            'with --onlytest true, or train on with a larger --total_epochs',
                            args.exp_dir, start_epoch, args.total_epochs)
                utils.cleanup_distributed()
                return None

    if not args.onlytest:
        if world > 1:
            models = [DistributedDataParallel(m, device_ids=[device.index] if device.type == 'cuda' else None,
                                              find_unused_parameters=True) for m in models]
        writer = single.make_writer(args.exp_dir) if main_proc else None
        stop = single.StopFlag()
        stop.install()
        for epoch in range(start_epoch + 1, args.total_epochs + 1):
            lr = single.epoch_lr(args, epoch)
            for o in optimizers:
                utils.set_lr(o, lr)
            try:
                stats, n_images, step, stopped, seconds = train_one_epoch(
                    models, loader, optimizers, scalers, device, epoch, losses, mutual, amp_dtype=amp_dtype,
                    start_step=start_step if epoch == start_epoch + 1 else 0, stop=stop, channels_last=channels_last)
            except single.NonFiniteLoss as e:
                logger.error('%s; stopping. The last good checkpoint is kept: %s', e, ckpt_path)
                single.shutdown(stop, writer)
                raise SystemExit('train_ml.py: {}'.format(e))
            stats.update(lr=lr, images_per_s=n_images / max(seconds, 1e-9))
            if stopped and step < len(loader):
                save(ckpt_path, models, optimizers, scalers, epoch - 1, step, args)
                logger.info('stopped by signal %s at epoch %d step %d; checkpoint saved to %s', stop.signum, epoch,
                            step, ckpt_path)
                single.shutdown(stop, writer)
                raise SystemExit(128 + (stop.signum or 0))
            logger.info('epoch %d/%d  lr %.3g  %.1f images/s  %.1f s  %s', epoch, args.total_epochs, lr,
                        stats['images_per_s'], seconds, '  '.join('{} {:.4f}'.format(k, v) for k, v in
                                                                   sorted(stats.items()) if k[:1] == 'm'))
            if writer is not None:
                for i in (1, 2):
                    single.write_scalars(writer, {k[3:]: v for k, v in stats.items() if k.startswith('m%d_' % i)},
                                         epoch)
                    writer.add_scalars('mutual_loss', {k: v for k, v in stats.items() if 'mutual' in k}, epoch)
                single.write_scalars(writer, {'lr': lr, 'images_per_s': stats['images_per_s']}, epoch)
            save(ckpt_path, models, optimizers, scalers, epoch, 0, args)
            if stopped:
                single.shutdown(stop, writer)
                raise SystemExit(128 + (stop.signum or 0))
        utils.barrier()
        single.shutdown(stop, writer)
    else:
        utils.cleanup_distributed()

    # final test of both models on rank 0
    if not main_proc or not (args.final_test or args.onlytest):
        return None
    results = [single.final_test(single.bare(m), partitions, im_dir, args, device, logger,
                                 amp=amp_dtype is not None, write=False, label='model {}: '.format(i + 1))
               for i, m in enumerate(models)]
    if results[0] is not None:
        utils.write_json({'train_dataset': args.train_dataset, 'test_dataset': args.train_dataset,
                          'test_partitions': args.train_partitions, 'ap_mode': args.ap_mode,
                          'results': utils.metrics_summary(results[0]),
                          'results_model2': utils.metrics_summary(results[1])},
                         os.path.join(args.exp_dir, 'metrics.json'))
    return results


if __name__ == '__main__':
    single.run_cli(main, parse_args, script='train_ml.py')
