"""The training loop of train.py (one model) and train_ml.py (two, mutual learning): the run's set-up (seed,
processes, experiment folder, data, models, weights to start from or resume), one epoch for one or N models
with one host read per step, the epoch loop with saving and periodic tests, the final test, lr schedules."""
import json
import math
import os
import random
import signal
import sys
import time
import warnings
from collections import namedtuple

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from aligned_reid import checkpoint, cli, data, distributed, evaluation, files
from aligned_reid.augment import Augment
from aligned_reid.model import Model

# tensorboardX scalar groups of the original: group -> {tag: key in the epoch statistics}
SCALAR_GROUPS = {
    'loss': {'global_loss': 'global_loss', 'local_loss': 'local_loss', 'id_loss': 'id_loss', 'loss': 'loss'},
    'precision': {'global_precision': 'global_prec', 'local_precision': 'local_prec', 'id_precision': 'id_prec'},
    'satisfy_margin': {'global_satisfy_margin': 'global_sm', 'local_satisfy_margin': 'local_sm'},
    'global_dist': {'global_dist_ap': 'global_dist_ap', 'global_dist_an': 'global_dist_an'},
    'local_dist': {'local_dist_ap': 'local_dist_ap', 'local_dist_an': 'local_dist_an'},
    'mutual_loss': {'own_loss': 'own_loss', 'mutual_loss': 'mutual_loss', 'prob_mutual_loss': 'prob_mutual_loss',
                    'global_dist_mutual_loss': 'global_dist_mutual_loss',
                    'local_dist_mutual_loss': 'local_dist_mutual_loss'},
    'lr': {'lr': 'lr'},
    'speed': {'images_per_s': 'images_per_s', 'data_wait_share': 'data_wait', 'first_batch_s': 'first_batch_s'},
}
RUN_STATS = ('lr', 'images_per_s', 'data_wait', 'first_batch_s')  # the epoch's figures that are not per model


# ----------------------------------------------------------------------------- seeding and lr schedules

def set_seed(seed):
    """Seeds python, numpy and torch (all devices) with `seed`."""
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def configure_determinism(deterministic):
    """deterministic: torch's deterministic algorithms, deterministic cuDNN without autotuning and the
    cuBLAS workspace setting they need (call before CUDA starts), so that a run, and a resumed run,
    repeat bit for bit on a GPU too. Otherwise cuDNN autotunes its kernels for the fixed input size."""
    if deterministic:
        os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')
    torch.use_deterministic_algorithms(bool(deterministic))
    torch.backends.cudnn.deterministic = bool(deterministic)
    torch.backends.cudnn.benchmark = not deterministic


def exp_decay_lr(base_lr, epoch, exp_decay_at_epoch, total_epochs, final_ratio=1e-3):
    """Learning rate of the original `exp` schedule for 1-based `epoch`.

    The base rate is kept up to epoch `exp_decay_at_epoch - 1`; from there it decays
    exponentially, reaching `final_ratio * base_lr` at epoch `total_epochs`:
        lr = base_lr * final_ratio ** ((epoch + 1 - exp_decay_at_epoch) / (total_epochs + 1 - exp_decay_at_epoch))
    (the original's formula; with the published 151 / 300 the rate starts falling at epoch 151).
    """
    if epoch < exp_decay_at_epoch:
        return base_lr
    span = total_epochs + 1 - exp_decay_at_epoch
    if span <= 0:
        return base_lr * final_ratio
    return base_lr * final_ratio ** (float(epoch + 1 - exp_decay_at_epoch) / span)


def staircase_lr(base_lr, epoch, decay_at_epochs, factor):
    """Learning rate of the `staircase` schedule for 1-based `epoch`: base_lr times `factor`
    once for every entry of `decay_at_epochs` that is <= epoch."""
    n = sum(1 for e in decay_at_epochs if epoch >= e)
    return base_lr * factor ** n


def lr_at_epoch(schedule, base_lr, epoch, total_epochs, exp_decay_at_epoch=151,
                staircase_decay_at_epochs=(101, 201), staircase_decay_multiply_factor=0.1):
    """Dispatches to the named schedule ('exp' or 'staircase'); epochs are 1-based."""
    if schedule == 'exp':
        return exp_decay_lr(base_lr, epoch, exp_decay_at_epoch, total_epochs)
    if schedule == 'staircase':
        return staircase_lr(base_lr, epoch, staircase_decay_at_epochs, staircase_decay_multiply_factor)
    raise ValueError("unknown lr schedule {!r}; choose 'exp' or 'staircase'".format(schedule))


def set_lr(optimizer, lr):
    """Sets the learning rate of every parameter group."""
    for g in optimizer.param_groups:
        g['lr'] = lr


def epoch_lr(args, epoch):
    """The learning rate of (1-based) `epoch` under the schedule the flags describe."""
    return lr_at_epoch(args.lr_decay_type, args.base_lr, epoch, args.total_epochs,
                       exp_decay_at_epoch=args.exp_decay_at_epoch,
                       staircase_decay_at_epochs=args.staircase_decay_at_epochs,
                       staircase_decay_multiply_factor=args.staircase_decay_multiply_factor)


# ----------------------------------------------------------------------------- the run's set-up

Run = namedtuple('Run', 'rank world device logger script')
Progress = namedtuple('Progress', 'epoch step best')  # epochs done, steps of the next done, best periodic test


def setup_run(args, script):
    """Distributed set-up, the experiment folder, logging, the saved arguments and the seed. `script`: the
    name errors are reported under ('train.py'). Returns a Run (rank, world size, device, logger, script)."""
    configure_determinism(args.deterministic)
    rank, world, local_rank = distributed.init_distributed(args.device)
    device = torch.device('cuda', local_rank) if args.device == 'cuda' and world > 1 else torch.device(args.device)
    if rank == 0:
        os.makedirs(args.exp_dir, exist_ok=True)
    distributed.barrier()
    logger = cli.setup_logging(os.path.join(args.exp_dir, 'train.log'), main_process=rank == 0)
    if rank == 0:
        for path, size in files.remove_stale_temp_files(args.exp_dir):
            logger.info('removed %s (%.1f MB): the temporary file of a save that was killed midway', path,
                        size / 2 ** 20)
        saved = checkpoint.run_arguments(args)
        checkpoint.write_json(saved, os.path.join(args.exp_dir, checkpoint.ARGS_NAME))
        logger.info('command: %s', ' '.join(sys.argv))
        logger.info('arguments: %s', json.dumps(saved, sort_keys=True))
    set_seed(args.seed + rank)
    return Run(rank, world, device, logger, script)


def build_train_data(args, run):
    """The training split's P x K batches for this rank, through the --train_pipeline the flags and the
    device select. Returns (partitions, images folder, loader, number of identities)."""
    partitions = data.read_partitions(args.train_partitions)
    im_dir = data.partitions_images_dir(args.train_partitions)
    part = args.trainset_part
    names = partitions[part + '_im_names']
    augment = Augment(tuple(args.resize_h_w), crop_prob=args.crop_prob, crop_ratio=args.crop_ratio,
                      random_erasing=args.random_erasing, seed=args.seed, mean=args.mean, std=args.std)
    pipeline, store = data.choose_train_pipeline(args.train_pipeline, run.device, len(names), args.resize_h_w)
    t0 = time.perf_counter()
    loader = data.make_train_loader(im_dir, names, partitions[part + '_ids2labels'], args.ids_per_batch,
                                    args.ims_per_id, augment, workers=args.workers, seed=args.seed, rank=run.rank,
                                    world_size=run.world, device=run.device, pipeline=pipeline, store=store)
    num_classes = len(partitions[part + '_ids2labels'])
    run.logger.info('train set: %s %s, %d identities, %d images, %d steps of %d x %d per epoch on %d process(es)',
                    args.train_dataset, part, num_classes, len(names), len(loader), args.ids_per_batch,
                    args.ims_per_id, run.world)
    if pipeline == 'memory':
        device = run.device
        run.logger.info('input pipeline: memory (%.2f GB of uint8 images decoded in %.1f s, kept %s; augmented in '
                        'batch on %s)', data.training_set_bytes(len(names), args.resize_h_w) / 1e9,
                        time.perf_counter() - t0, 'on ' + str(device) if store == 'device' or device.type != 'cuda'
                        else 'in pinned host memory', device)
    else:
        run.logger.info('input pipeline: %d persistent loader worker(s)%s', args.workers,
                        '' if args.workers else ' (0: decoding in the training process)')
    return partitions, im_dir, loader, num_classes


def init_seed(seed, index):
    """The seed model `index` (0-based) of a run seeded with `seed` is initialised from: a function of the two
    alone (numpy's SeedSequence, so neighbouring seeds and indices give unrelated streams)."""
    words = np.random.SeedSequence((seed % 2 ** 64, index)).generate_state(2, np.uint32)
    return int(words[0]) << 32 | int(words[1])


def build_model(args, num_classes, run, index=0):
    """The Model the flags describe, on the run's device. Its random initialisation comes from a generator
    seeded with init_seed(args.seed, index) alone (the global RNG state is left as it was), so it does not
    depend on what the data pipeline drew before, the device, the rank, or the script: model 1 of
    train_ml.py (index 0) starts where train.py's model does with the same seed. A model that gets every
    weight from a file (resumed, tested, or started from --model_weight_file) skips the ImageNet weights (and
    works offline); --pretrained_path loads the backbone from a file instead."""
    from_file = bool(args.model_file)
    try:
        with torch.random.fork_rng(devices=[]):  # built on the CPU, then moved
            torch.manual_seed(init_seed(args.seed, index))
            model = Model(base=args.base_model, last_stride=args.last_stride,
                          local_conv_out_channels=args.local_conv_out_channels,
                          num_classes=num_classes if args.id_loss_weight > 0 else None,
                          pretrained=args.pretrained and not from_file and not args.pretrained_path)
        if args.pretrained_path and not from_file:
            checkpoint.load_backbone(model, args.pretrained_path)
    except RuntimeError as e:  # ImageNet weights unreachable: say which flags help, no traceback
        raise SystemExit('{}: --pretrained true: {} To train from scratch instead, pass --pretrained false.'
                         .format(run.script, e))
    except (ValueError, OSError) as e:  # a weights file that is unreadable, refused, or does not fit the backbone
        raise SystemExit('{}: {}: {}'.format(run.script, '--pretrained_path' if args.pretrained_path
                                             else '--pretrained true', e))
    return model.to(run.device)


def amp_settings(amp, device, logger, num_models=1):
    """(autocast dtype or None, [GradScaler or None] for each model) for --amp on `device`: bfloat16 where
    the GPU supports it (no scaler needed), else float16 with a scaler per model."""
    if not amp:
        return None, [None] * num_models
    if device.type != 'cuda':
        warnings.warn('--amp has no effect on the CPU; training in float32')
        logger.warning('--amp ignored on the CPU')
        return None, [None] * num_models
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, [None] * num_models
    return torch.float16, [torch.amp.GradScaler('cuda') for _ in range(num_models)]


def loss_kwargs(args):
    """The keyword arguments of aligned_reid.loss.compute_losses the flags describe."""
    return dict(global_margin=args.global_margin, local_margin=args.local_margin,
                global_loss_weight=args.global_loss_weight, local_loss_weight=args.local_loss_weight,
                id_loss_weight=args.id_loss_weight, normalize_feature=args.normalize_feature,
                local_dist_own_hard_sample=args.local_dist_own_hard_sample, label_smoothing=args.label_smoothing,
                check_batch=False)  # the P x K sampler (P, K >= 2) gives every anchor a positive and a negative


def start_from_file(args, models, optimizers, scalers, run):
    """Loads the weights of args.model_file into the models (the checkpoint resumed or tested, or
    --model_weight_file to start from), read once (args.start holds it when the flag checks read it, and
    checked there that it fits) and checked key by key by aligned_reid.checkpoint.load_into: a classifier
    the models lack is dropped, one of another class count initialised anew, each with a log line. Model
    i loads the file's model i when it is the run's own or holds as many models (checkpoint.models_to_load),
    else every model loads --model_index. Logs the input normalisation and where it comes from. With
    --resume, also the optimizer, scaler and RNG states and the progress. A file that does not fit stops
    the run with one line. Returns the Progress to start from, or None when a resumed run is already
    finished."""
    progress = Progress(0, 0, None)
    if not args.model_file:
        log_normalisation(run.logger, args, None)
        return progress
    logger, path = run.logger, args.model_file
    tested_or_resumed = args.resume or args.onlytest
    info = args.start or checkpoint.read_checkpoint(path, args.model_index)
    args.start = None  # the file's tensors are not kept beyond this
    first = info
    try:
        indices = info.get('indices') or checkpoint.models_to_load(len(models), info['num_models'], args.model_index,
                                                                   own_run=tested_or_resumed)
        for model, index in zip(models, indices):
            if index != info['index']:
                info = checkpoint.read_checkpoint(path, index, obj=info['object'])
            notes = checkpoint.load_into(model, info['state'], path, info['layout'],
                                         classifier='drop' if tested_or_resumed else 'new')
            logger.info('weights from %s (%s)%s', path, info['layout'], ''.join('; ' + n for n in info['notes'] + notes))
        log_normalisation(logger, args, first)
        if not args.resume:
            return progress
        state = checkpoint.resume_state(info['object'])
    except (ValueError, OSError) as e:
        raise SystemExit('{}: {}'.format(run.script, e))
    try:
        if len(state['optimizers']) != len(optimizers):
            raise ValueError('{} optimizer state(s) for {} model(s)'.format(len(state['optimizers']), len(optimizers)))
        for optimizer, sd in zip(optimizers, state['optimizers']):
            optimizer.load_state_dict(sd)
    except (KeyError, ValueError) as e:
        raise SystemExit('{}: --resume true: the optimizer state of {} does not fit this model ({}); keep the '
                         "run's flags (-idlw, --base_model) or use another --exp_dir".format(run.script, path, e))
    for scaler, sd in zip(scalers, state['scalers']):
        if scaler is not None and sd:
            scaler.load_state_dict(sd)
    if len(state['rng']) == run.world:
        checkpoint.set_rng_state(state['rng'][run.rank])
    progress = Progress(state['epoch'], state['step_in_epoch'], state['best_metric'])
    logger.info('resumed from %s: %d epochs done%s', path, progress.epoch,
                ' and {} steps of the next'.format(progress.step) if progress.step else '')
    if progress.epoch >= args.total_epochs and not progress.step:
        logger.info('the run in %s is already finished (%d of %d epochs): nothing to train. Test it with '
                    '--onlytest true, or train on with a larger --total_epochs', args.exp_dir, progress.epoch,
                    args.total_epochs)
        return None
    return progress


def log_normalisation(logger, args, info):
    """One line: the input normalisation of the run, and whether it is the one the weights it starts from
    (`info`: the file read, or None) were trained with, the one given with --mean / --std, or ImageNet's."""
    own = checkpoint.resolve_config(info) if info is not None else None
    if own is not None and [args.mean, args.std] == [own['mean'], own['std']]:
        source = "the weights' own, as they were trained"
    elif own is not None:
        source = '--mean / --std; the weights were trained with mean {} std {}'.format(own['mean'], own['std'])
    elif [list(args.mean), list(args.std)] == [list(data.IMAGENET_MEAN), list(data.IMAGENET_STD)]:
        source = "ImageNet's"
    else:
        source = '--mean / --std'
    logger.info('input normalisation: mean %s std %s (%s)', list(args.mean), list(args.std), source)


# ----------------------------------------------------------------------------- one epoch

class NonFiniteLoss(RuntimeError):
    pass


class StopFlag:
    """The SIGINT / SIGTERM handler of the epoch loop. The first signal sets `requested` (the loop then
    finishes its step, saves a checkpoint to `ckpt_path` and exits) and says so on stderr at once. A second
    one within GRACE_S seconds is taken for the same request repeated (a double Ctrl-C) and the save goes
    on; a later one stops the process at once without saving, which loses nothing already saved: the
    checkpoint write is atomic, so one cut short leaves the previous checkpoint in place."""

    GRACE_S = 2.

    def __init__(self, script='train.py', ckpt_path='ckpt.pth'):
        self.requested = False
        self.signum = None
        self.script, self.ckpt_path, self.first = script, ckpt_path, None

    def say(self, text):
        """One line on stderr, written with os.write (no buffered stream is touched inside a handler)."""
        try:
            os.write(2, '\n{}: {}\n'.format(self.script, text).encode('utf-8', 'replace'))
        except OSError:
            pass

    def __call__(self, signum, frame):
        name, now = signal.Signals(signum).name, time.monotonic()
        if not self.requested:
            self.requested, self.signum, self.first = True, signum, now
            self.say('{}: stopping after this training step and saving a checkpoint to {} (continue later with '
                     '--resume true); a second Ctrl-C, {:g} s or more after this one, stops at once without '
                     'saving and keeps the last checkpoint saved'.format(name, self.ckpt_path, self.GRACE_S))
            return
        if now - self.first < self.GRACE_S:
            self.say('{} again within {:g} s: taken for the same request; still stopping after this step with a '
                     'checkpoint (once more, later, to stop without saving)'.format(name, self.GRACE_S))
            return
        kept = ('{} keeps the last checkpoint saved (an atomic write: a save cut short leaves it intact)'.format(
            self.ckpt_path) if os.path.isfile(self.ckpt_path) else 'no checkpoint had been saved yet')
        self.say('{} again: stopping now without saving; {}'.format(name, kept))
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def install(self):
        self.previous = {s: signal.signal(s, self) for s in (signal.SIGINT, signal.SIGTERM)}

    def uninstall(self):
        for s, handler in getattr(self, 'previous', {}).items():
            signal.signal(s, handler)


class DeviceStats:
    """Per-step scalars of a loss dict summed on the device, read only when asked (log time, epoch end).
    The loss terms (keys ending in 'loss') come first; `add` returns them as one tensor [T] for the
    step's single read."""

    def __init__(self):
        self.keys, self.terms, self.sum, self.n = None, None, None, 0

    def add(self, result):
        if self.keys is None:
            scalars = [k for k, v in result.items() if torch.is_tensor(v) and v.numel() == 1]
            self.terms = [k for k in scalars if k.endswith('loss')]
            self.keys = self.terms + sorted(k for k in scalars if k not in self.terms)
        vec = torch.stack([result[k].detach().float().reshape(()) for k in self.keys])
        self.sum = vec if self.sum is None else self.sum + vec
        self.n += 1
        return vec[:len(self.terms)]

    def means(self):
        if not self.n:
            return {}
        return {k: v / self.n for k, v in zip(self.keys, self.sum.tolist())}


def read_step(terms, stop, device):
    """The one device-to-host read of a training step: the loss terms [T] of this rank, and whether any
    rank has a non-finite term or a stop request. Returns (values, any non-finite, stop now)."""
    requested = stop is not None and stop.requested
    if not distributed.is_dist():
        values = terms.tolist()
        return values, not all(math.isfinite(v) for v in values), requested
    flags = torch.stack([(~torch.isfinite(terms)).any().float(),
                         torch.tensor(float(requested)).to(device)])
    torch.distributed.all_reduce(flags)
    out = torch.cat([terms, flags]).tolist()
    return out[:-2], out[-2] > 0, out[-1] > 0


def non_finite_message(names, values, epoch, step, total):
    bad = [(k, v) for k, v in zip(names, values) if not math.isfinite(v)]
    what = '{} = {}'.format(*bad[0]) if bad else 'a loss term on another rank'
    return 'non-finite loss: {} at epoch {} step {}/{}'.format(what, epoch, step, total)


class EpochTimer:
    """Wall time of an epoch, the share of it spent waiting for the next batch, and the latency of the
    first batch (the time a restarted loader would add at every epoch)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.wait, self.first = 0., None

    def batches(self, iterable):
        it = iter(iterable)
        while True:
            t = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            now = time.perf_counter()
            self.wait += now - t
            if self.first is None:
                self.first = now - self.start
            yield batch

    def stats(self):
        seconds = time.perf_counter() - self.start
        return seconds, {'data_wait': self.wait / max(seconds, 1e-9), 'first_batch_s': self.first or 0.}


def optimizer_step(optimizer, scaler):
    """optimizer.step(), through the GradScaler when float16 autocast uses one."""
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def merge_results(results):
    """One model's loss dict as it is; N models' dicts merged with 'm1_', 'm2_' ... prefixes."""
    if len(results) == 1:
        return results[0]
    return {'m{}_{}'.format(i + 1, k): v for i, r in enumerate(results) for k, v in r.items()}


def train_one_epoch(models, loader, optimizers, scalers, device, epoch, step_losses, amp_dtype=None, start_step=0,
                    stop=None, channels_last=False, logger=None, steps_per_log=0, progress=True):
    """One pass of the models over the P x K loader from `start_step`, all on the same batches.

    step_losses(outputs, labels) -> one loss dict per model (outputs: the models' output dicts, in float32),
    each with the 'loss' that model minimises (aligned_reid.loss.compute_losses for one model,
    mutual_learning_losses for two). Statistics stay on the device. The step's one device-to-host read
    (`read_step`: the loss terms plus the non-finite and stop flags of all ranks) comes after backward and
    before the optimizer steps, so a non-finite loss raises NonFiniteLoss naming the term, epoch and step
    before any update uses it. `progress`: a progress bar on rank 0. Returns (mean statistics, 'm1_' / 'm2_' prefixed for two models; images seen
    on all ranks; steps done; stopped early; seconds)."""
    for model in models:
        model.train()
    world = distributed.get_world_size()
    total = len(loader)
    loader.set_epoch(epoch, start_step)
    timer, stats = EpochTimer(), DeviceStats()
    n_images, stopped, step = 0, False, start_step
    bar = tqdm(total=total, initial=start_step, desc='epoch {}'.format(epoch), disable=not (progress and distributed.is_main()),
               leave=False, dynamic_ncols=True)
    try:  # the bar is cleared however the epoch ends (an error message then starts its own line)
        for step, (images, labels) in enumerate(timer.batches(loader), start=start_step + 1):
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            outputs = []
            for model in models:
                with torch.autocast(device_type=device.type, dtype=amp_dtype or torch.float32,
                                    enabled=amp_dtype is not None):
                    out = model(images)
                outputs.append({k: v.float() for k, v in out.items()})
            results = step_losses(outputs, labels)
            for optimizer in optimizers:
                optimizer.zero_grad(set_to_none=True)
            for result, scaler in zip(results, scalers):
                (scaler.scale(result['loss']) if scaler is not None else result['loss']).backward()
            merged = merge_results(results)
            values, any_bad, stop_now = read_step(stats.add(merged), stop, device)
            if any_bad:
                raise NonFiniteLoss(non_finite_message(stats.terms, values, epoch, step, total))
            for optimizer, scaler in zip(optimizers, scalers):
                optimizer_step(optimizer, scaler)
            n_images += images.shape[0] * world
            bar.update()
            shown = ['loss'] if len(models) == 1 else ['m{}_loss'.format(i + 1) for i in range(len(models))]
            bar.set_postfix({k: '{:.4f}'.format(values[stats.terms.index(k)]) for k in shown}, refresh=False)
            if steps_per_log and step % steps_per_log == 0 and logger is not None:
                logger.info('epoch %d step %d/%d  %s', epoch, step, total,
                            '  '.join('{} {:.4f}'.format(k, v) for k, v in sorted(stats.means().items())))
            if stop_now:
                stopped = True
                break
    finally:
        bar.close()
    seconds, timing = timer.stats()
    means = distributed.reduce_mean_scalars(stats.means())
    means.update(timing)
    return means, n_images, step, stopped, seconds


# ----------------------------------------------------------------------------- the epoch loop

def bare(model):
    return model.module if isinstance(model, DistributedDataParallel) else model


def save(path, models, optimizers, scalers, epoch, step_in_epoch, best, args):
    """Gathers every rank's RNG state, then rank 0 writes the checkpoint atomically."""
    rng = distributed.all_gather_object(checkpoint.get_rng_state())
    if distributed.is_main():
        checkpoint.save_checkpoint(checkpoint.training_state(
            [bare(m) for m in models], optimizers, scalers, epoch, step_in_epoch, best, checkpoint.run_arguments(args),
            rng, distributed.get_world_size()), path)
    distributed.barrier()


def make_writer(exp_dir):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:  # logging still goes to stdout and the log file
        return None
    return SummaryWriter(log_dir=os.path.join(exp_dir, 'tensorboard'))


def write_scalars(writer, stats, epoch, num_models=1):
    """The epoch's statistics as the original's tensorboard groups; with several models each model's
    tags carry its prefix ('m1_global_loss')."""
    if writer is None:
        return
    prefixes = [''] if num_models == 1 else ['m{}_'.format(i + 1) for i in range(num_models)]
    for group, tags in SCALAR_GROUPS.items():
        values = {}
        for tag, key in tags.items():
            for prefix in [''] if key in RUN_STATS else prefixes:
                if prefix + key in stats:
                    values[prefix + tag] = stats[prefix + key]
        if values:
            writer.add_scalars(group, values, epoch)
    writer.flush()


def shutdown(stop, writer):
    """Restores the signal handlers, closes the tensorboard writer and leaves the process group."""
    stop.uninstall()
    if writer is not None:
        writer.close()
    distributed.cleanup_distributed()


def periodic_test(models, partitions, im_dir, args, run, best, epoch, writer, amp):
    """The test of --epochs_per_test (global distance, no re-ranking) on the validation split (training on
    'train') or the test split, on rank 0; logs Rank-1 and mAP of each model. Returns the best result so far
    (by model 1's Rank-1), the same on every rank."""
    split = 'val' if args.trainset_part == 'train' else 'test'
    if run.rank == 0:
        for i, model in enumerate(models):
            results, _ = evaluate_model(model, partitions, im_dir, split, args, run.device, amp=amp)
            r1, mAP = float(np.asarray(results['global']['cmc'])[0]), float(results['global']['mAP'])
            label = 'model {} '.format(i + 1) if len(models) > 1 else ''
            run.logger.info('%sepoch %d %s: Rank-1 %.2f%%  mAP %.2f%%', label, epoch, split, 100 * r1, 100 * mAP)
            if writer is not None:
                writer.add_scalars(split + '_scores', {label.replace(' ', '_') + 'rank1': r1,
                                                       label.replace(' ', '_') + 'mAP': mAP}, epoch)
            if i == 0 and (best is None or r1 > best['rank1']):
                best = {'rank1': r1, 'mAP': mAP, 'epoch': epoch, 'split': split}
    return distributed.all_gather_object(best)[0]


def fit(args, run, models, optimizers, scalers, loader, step_losses, progress, partitions, im_dir, amp_dtype=None):
    """The epoch loop from `progress` to --total_epochs: the epoch's learning rate, train_one_epoch, the
    epoch's log line and tensorboard scalars, the periodic test, and the checkpoint after every epoch. A
    SIGINT / SIGTERM finishes the step, saves (mid-epoch: resumable at that step) and exits 128 + signal (see
    StopFlag for a second one); a non-finite loss exits with one line and keeps the last good checkpoint."""
    ckpt_path = checkpoint.path_in(args.exp_dir)
    logger = run.logger
    bare_models = models
    if run.world > 1:
        unused = len(models) > 1 or args.local_loss_weight == 0 or args.global_loss_weight == 0
        models = [DistributedDataParallel(m, device_ids=[run.device.index] if run.device.type == 'cuda' else None,
                                          find_unused_parameters=unused) for m in models]
    writer = make_writer(args.exp_dir) if run.rank == 0 else None
    stop = StopFlag(run.script, ckpt_path)
    stop.install()
    best = progress.best
    for epoch in range(progress.epoch + 1, args.total_epochs + 1):
        lr = epoch_lr(args, epoch)
        for optimizer in optimizers:
            set_lr(optimizer, lr)
        try:
            stats, n_images, step, stopped, seconds = train_one_epoch(
                models, loader, optimizers, scalers, run.device, epoch, step_losses, amp_dtype=amp_dtype,
                start_step=progress.step if epoch == progress.epoch + 1 else 0, stop=stop,
                channels_last=amp_dtype is not None, logger=logger, steps_per_log=args.steps_per_log)
        except NonFiniteLoss as e:
            logger.error('%s; stopping. The last good checkpoint is kept: %s', e, ckpt_path)
            shutdown(stop, writer)
            raise SystemExit('{}: {}'.format(run.script, e))
        stats.update(lr=lr, images_per_s=n_images / max(seconds, 1e-9))
        if stopped and step < len(loader):
            save(ckpt_path, models, optimizers, scalers, epoch - 1, step, best, args)
            logger.info('stopped by signal %s at epoch %d step %d/%d; checkpoint saved to %s; continue with '
                        '--resume true', stop.signum, epoch, step, len(loader), ckpt_path)
            shutdown(stop, writer)
            raise SystemExit(128 + (stop.signum or 0))
        logger.info('epoch %d/%d  lr %.3g  %.1f images/s  %.1f s  data wait %.1f%%  first batch %.2f s  %s', epoch,
                    args.total_epochs, lr, stats['images_per_s'], seconds, 100 * stats['data_wait'],
                    stats['first_batch_s'], '  '.join('{} {:.4f}'.format(k, v) for k, v in sorted(stats.items())
                                                      if k not in RUN_STATS))
        write_scalars(writer, stats, epoch, len(models))
        # the last epoch's test split is the final test's: tested there, with every distance
        repeated = epoch == args.total_epochs and args.final_test and args.trainset_part != 'train'
        if args.epochs_per_test and epoch % args.epochs_per_test == 0 and not repeated:
            best = periodic_test(bare_models, partitions, im_dir, args, run, best, epoch, writer,
                                 amp=amp_dtype is not None)
        save(ckpt_path, models, optimizers, scalers, epoch, 0, best, args)
        if stopped:
            logger.info('stopped by signal %s after epoch %d; checkpoint saved to %s', stop.signum, epoch, ckpt_path)
            shutdown(stop, writer)
            raise SystemExit(128 + (stop.signum or 0))
    distributed.barrier()
    shutdown(stop, writer)


# ----------------------------------------------------------------------------- tests

def evaluate_model(model, partitions, im_dir, split, args, device, distances=('global',), re_rank=False, amp=False):
    """Features of `split` ('test' or 'val') extracted with the bare model at the run's input size and
    normalisation, and their evaluation. Returns (results dict of aligned_reid.evaluation.evaluate, table)."""
    _, results = evaluation.test_split(
        model, partitions, im_dir, split, device, args.resize_h_w, args.mean, args.std, batch_size=args.test_batch_size,
        workers=args.workers, distances=distances, re_rank=re_rank, ap_mode=args.ap_mode,
        normalize=args.normalize_feature, amp=amp)
    return results, evaluation.format_table(results)


def test_distances(local_loss_weight):
    return ('global', 'local', 'global_local') if local_loss_weight > 0 else ('global',)


def final_test(models, partitions, im_dir, args, run, amp=False):
    """Tests the final model(s) on the test split (global distance, plus local and global+local when the local
    loss was trained; re-ranked too with --to_re_rank) and writes metrics.json (model 1's results, and
    'results_model2' for mutual learning). Rank 0 only. Returns a list of results dicts, one per model, or
    None when the partitions hold no test split."""
    logger = run.logger
    if 'test_im_names' not in partitions:
        logger.info('%s has no test split; skipping the final test', args.train_partitions)
        return None
    all_results = []
    for i, model in enumerate(models):
        results, table = evaluate_model(model, partitions, im_dir, 'test', args, run.device,
                              distances=test_distances(args.local_loss_weight), re_rank=args.to_re_rank, amp=amp)
        label = 'model {}: '.format(i + 1) if len(models) > 1 else ''
        logger.info('%stest on %s (%s):\n%s', label, args.train_dataset, args.train_partitions, table)
        all_results.append(results)
    others = {'results_model{}'.format(i + 1): evaluation.metrics_summary(r) for i, r in enumerate(all_results)
              if i > 0}
    checkpoint.write_json(evaluation.metrics_record(all_results[0], args.train_dataset, args.train_dataset,
                                                    args.train_partitions, args.ap_mode, **others),
                          os.path.join(args.exp_dir, 'metrics.json'))
    return all_results
