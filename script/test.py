"""Tests a model trained by train.py on a prepared dataset (the same one or another: cross-dataset),
with global / local / global+local distances and optional re-ranking; prints the table, writes metrics."""
import os

import numpy as np
import torch

from aligned_reid import checkpoint, cli, data, evaluation
from aligned_reid.cli import OldFlag, boolean

DISTANCES = {'global': ('global',), 'local': ('local',), 'global_local': ('global_local',),
             'all': ('global', 'local', 'global_local')}
MODEL_FLAGS = checkpoint.MODEL_FLAGS
# train.py's flags that a test command may carry over (the older reproduction's too), and what test.py uses instead
TRAINING_FLAGS = {
    ('-glw', '--global_loss_weight', '--g_loss_weight'): 'a loss weight; test.py chooses the distances to rank with by '
                                                         '--test_distance global|local|global_local|all',
    ('-llw', '--local_loss_weight', '--l_loss_weight'): 'a loss weight; test.py chooses the distances to rank with by '
                                                        '--test_distance global|local|global_local|all',
    ('-idlw', '--id_loss_weight'): 'a loss weight (the ID classifier is not used in testing); test.py chooses the '
                                   'distances to rank with by --test_distance global|local|global_local|all',
    ('-gm', '--global_margin'): 'a triplet margin; test.py chooses the distances to rank with by --test_distance',
    ('-lm', '--local_margin'): 'a triplet margin; test.py chooses the distances to rank with by --test_distance',
    ('--set_seed',): 'it seeds training; testing here has no randomness, drop it',
    ('--log_to_file',): 'test.py always writes test.log in --exp_dir, drop it',
}


class TrainingFlag(cli.RefusedFlag):
    """A flag of train.py that test.py has no use for (not argparse's 'unrecognized arguments')."""
    what = 'a flag of training (train.py), not of test.py'


# Model flags whose value a trained run fixes: testing at other values needs --allow_other_settings true.
RUN_SETTINGS = ('resize_h_w', 'last_stride', 'normalize_feature')


def build_parser():
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument('--onlytest', '--only_test', dest='onlytest', type=boolean, default=True,
                   help="accepted for the original's command line; test.py always only tests. Default: true")
    p.add_argument('--to_re_rank', type=boolean, default=True,
                   help='also report k-reciprocal re-ranked results (true/false). Default: true')
    p.add_argument('--train_dataset', '--dataset', dest='train_dataset', default=None,
                   help='dataset the model was trained on: finds its experiment folder exp/train/<name> '
                        "(--dataset, the older reproduction's name, is accepted). Default: the one saved with the "
                        'run in --exp_dir (or beside --model_weight_file), else market1501')
    p.add_argument('--test_dataset', default=None,
                   help='dataset to test on; names the default partitions path ~/Dataset/<name>/partitions.pkl. '
                        'Default: the train dataset')
    p.add_argument('--test_partitons', '--test_partitions', '--test_dataset_partitions', dest='test_partitions',
                   default=None, help='partitions.pkl of the test set (all three spellings accepted). '
                                      'Default: ~/Dataset/<test_dataset>/partitions.pkl')
    p.add_argument('--exp_dir', default=None,
                   help='experiment folder of the trained model; results are written here. '
                        'Default: exp/train/<train_dataset> under the current folder')
    p.add_argument('--model_weight_file', default=None,
                   help="checkpoint or weights to test: a train.py / train_ml.py checkpoint, a state dict, or the "
                        "older reproduction's model_weight.pth / ckpt.pth (read safely: no code from the file runs). "
                        'Default: <exp_dir>/ckpt.pth')
    p.add_argument('--model_index', type=int, default=1,
                   help='which model of a mutual-learning checkpoint to test (1-based; train_ml.py files and the '
                        "older reproduction's [model1, model2, ..., optim1, ...] ckpt.pth). Default: 1")
    p.add_argument('--test_distance', choices=tuple(DISTANCES), default='global',
                   help='distance(s) to rank with: global, local, global_local (their sum) or all. Default: global')
    p.add_argument('--ap_mode', choices=('standard', 'market_official'), default='standard',
                   help='AP formula: non-interpolated (standard) or the trapezoid one of the official '
                        'Market-1501 code. Default: standard')
    p.add_argument('--multi_query', choices=('none', 'avg', 'max'), default='none',
                   help="Market-1501 multi-query: pool the query's gt_bbox images (mark 2) by average or max. "
                        'Default: none')
    p.add_argument('--flip', type=boolean, default=False,
                   help='average features of the image and its mirror (true/false). Default: false')
    p.add_argument('--test_batch_size', '--batch_size', dest='test_batch_size', type=int, default=64,
                   help='batch size of feature extraction. Default: 64')
    p.add_argument('--workers', type=int, default=cli.default_workers(),
                   help='data loader worker processes. ' + cli.WORKERS_HELP)
    cli.add_device_argument(p)
    p.add_argument('--amp', type=boolean, nargs='?', const=True, default=False,
                   help='mixed-precision feature extraction on CUDA. Default: false')
    p.add_argument('--num_vis_queries', type=int, default=0,
                   help='draw the ranked lists of this many queries and the CMC curve. Default: 0 (none)')
    p.add_argument('--vis_dir', default=None,
                   help='folder of the pictures. Default: <exp_dir>/ranks_<test_dataset>')
    cli.add_model_arguments(p)
    p.add_argument('--allow_other_settings', type=boolean, default=False,
                   help='test with --resize_h_w / --last_stride / --normalize_feature values other than those the '
                        'checkpoint was trained with (true/false); the metrics then go to metrics_<settings>.json '
                        '(for example metrics_256x128.json), never to the run\'s metrics.json. Default: false (such '
                        'a flag stops the test)')
    old = p.add_argument_group("the older reproduction's flags with no counterpart here (each stops with a "
                               'line naming what to use instead)')
    old.add_argument('-d', '--sys_device_ids', action=OldFlag, nargs='?', help=cli.OLD_DEVICE_HELP)
    old.add_argument('-r', '--run', action=OldFlag, nargs='?', help=cli.OLD_RUN_HELP)
    train = p.add_argument_group('flags of train.py (each stops with a line naming what test.py uses instead)')
    for flags, instead in TRAINING_FLAGS.items():
        train.add_argument(*flags, action=TrainingFlag, nargs='?', help=instead + '. Default: none')
    cli.accept_negative_numbers(p)
    return p


def read_model_file(path, model_index):
    """The checkpoint to test, read and recognised once (aligned_reid.checkpoint.read_checkpoint), or None
    when it cannot be read: main then reports why as it loads the model."""
    try:
        return checkpoint.read_checkpoint(path, model_index)
    except (ValueError, OSError):
        return None


def check_args(parser, args):
    """Resolves default paths and stops with a message naming the flag on anything unusable. Without
    --train_dataset the run's saved arguments name the training set (and, tested on it, its partitions)."""
    cli.check_model_arguments(parser, args)
    if args.model_index < 1:
        parser.error('--model_index must be at least 1 (models are counted from 1), got {}'.format(args.model_index))
    saved, args.start = {}, None
    if args.train_dataset is None:
        # the run's saved arguments (inside its checkpoint) name the training set
        path = args.model_weight_file or (checkpoint.path_in(os.path.abspath(os.path.expanduser(args.exp_dir)))
                                          if args.exp_dir else None)
        if path and os.path.isfile(path):
            args.start = read_model_file(path, args.model_index)
            saved = args.start['args'] if args.start else {}
        args.train_dataset = saved.get('train_dataset') or 'market1501'
    if args.test_dataset is None:
        args.test_dataset = args.train_dataset
        saved_parts = saved.get('train_partitions')
        if args.test_partitions is None and saved_parts and os.path.isfile(saved_parts):
            args.test_partitions = saved_parts
    if args.test_partitions is None:
        if args.test_dataset not in cli.DATASET_DIRS:
            parser.error('--test_dataset {!r} is unknown: choose one of {} or give --test_partitons'.format(
                args.test_dataset, ', '.join(cli.DATASET_DIRS)))
        args.test_partitions = cli.default_partitions_path(args.test_dataset)
    args.test_partitions = os.path.expanduser(args.test_partitions)
    exp_dir_given = args.exp_dir is not None
    if args.exp_dir is None:
        args.exp_dir = cli.default_exp_dir(args.train_dataset)
    args.exp_dir = os.path.abspath(os.path.expanduser(args.exp_dir))
    if args.model_weight_file is None:
        args.model_weight_file = checkpoint.path_in(args.exp_dir)
        if not os.path.isfile(args.model_weight_file):
            if exp_dir_given:
                parser.error('--exp_dir {}: no trained model there ({} not found; give the folder train.py '
                             'wrote, or --model_weight_file)'.format(args.exp_dir, args.model_weight_file))
            parser.error('no trained model for --train_dataset {}: {} not found (train it, or give --exp_dir or '
                         '--model_weight_file)'.format(args.train_dataset, args.model_weight_file))
    elif not os.path.isfile(args.model_weight_file):
        parser.error('--model_weight_file: file not found: {}'.format(args.model_weight_file))
    problem = data.partitions_file_problem(args.test_partitions)
    if problem:
        parser.error('--test_partitons: {}'.format(problem))
    cli.check_device(parser, args)
    for flag, low in (('test_batch_size', 1), ('workers', 0), ('num_vis_queries', 0)):
        if getattr(args, flag) < low:
            parser.error('--{} must be at least {}, got {}'.format(flag, low, getattr(args, flag)))
    for flag, folder in (('--exp_dir', args.exp_dir), ('--vis_dir', args.vis_dir)):
        problem = folder and cli.writable_folder_problem(folder)
        if problem:
            parser.error('{}: {} (results are written there)'.format(flag, problem))
    if args.start is None:
        args.start = read_model_file(args.model_weight_file, args.model_index)
    args.other_settings = other_settings(args)
    if args.other_settings and not args.allow_other_settings:
        parser.error('{}: {} was trained with {}; a test at other settings than the model\'s gives other results. '
                     'Drop the flag, or pass --allow_other_settings true to test so anyway (the metrics then go to '
                     'metrics_{}.json, not metrics.json)'.format(
                         settings_flags(args.other_settings), args.model_weight_file,
                         settings_flags(args.other_settings, saved=True), settings_tag(args.other_settings)))
    return args


def settings_flags(changed, saved=False):
    """The flags of other_settings as typed, with the values given (or, `saved`, the checkpoint's):
    '--resize_h_w 256 128 --normalize_feature true'."""
    return ' '.join('--{} {}'.format(k, cli.flag_value(values[saved])) for k, values in changed.items())


def other_settings(args):
    """{flag: (value given, value saved)} for the flags of RUN_SETTINGS given on the command line that differ
    from the arguments saved in the checkpoint (a file without saved arguments contradicts nothing)."""
    saved = args.start['args'] if args.start else {}
    plain = lambda v: [int(x) for x in v] if isinstance(v, (list, tuple)) else v
    return {k: (getattr(args, k), saved[k]) for k in RUN_SETTINGS
            if getattr(args, k) is not None and k in saved and plain(getattr(args, k)) != plain(saved[k])}


def settings_tag(changed):
    """The other settings of a test in file names: '256x128', 'stride1', 'normalized' ... joined by '_'."""
    names = {'resize_h_w': lambda v: '{}x{}'.format(*v), 'last_stride': lambda v: 'stride{}'.format(v),
             'normalize_feature': lambda v: 'normalized' if v else 'unnormalized'}
    return '_'.join(names[k](changed[k][0]) for k in RUN_SETTINGS if k in changed)


def parse_args(argv=None):
    parser = build_parser()
    return check_args(parser, parser.parse_args(argv))


def load_model(args, device):
    """The Model of --model_weight_file (any layout aligned_reid.checkpoint reads; read already by the flag
    checks when readable) with the settings it was trained with; command-line model flags win. Returns
    (model in eval mode on `device`, settings dict with mean / std)."""
    return checkpoint.load_model(args.model_weight_file, device=device, model_index=args.model_index,
                                 overrides={k: getattr(args, k) for k in MODEL_FLAGS}, ckpt=args.start)


def evaluate(model, partitions, im_dir, cfg, args, device):
    """Extracts test-split features and evaluates them. Returns (features, results, table)."""
    feats, results = evaluation.test_split(
        model, partitions, im_dir, 'test', device, cfg['resize_h_w'], cfg['mean'], cfg['std'],
        batch_size=args.test_batch_size, workers=args.workers, distances=DISTANCES[args.test_distance],
        re_rank=args.to_re_rank, ap_mode=args.ap_mode, normalize=cfg['normalize_feature'],
        multi_query=args.multi_query, flip=args.flip, amp=args.amp)
    return feats, results, evaluation.format_table(results)


def draw(feats, results, partitions, im_dir, args, cfg):
    """Ranked lists of the first --num_vis_queries queries (distance of --test_distance, before re-ranking, named
    in each picture) and the CMC curves of every result, through aligned_reid.visualize. Returns the folder."""
    from aligned_reid import visualize
    vis_dir = args.vis_dir or os.path.join(args.exp_dir, 'ranks_{}'.format(results_tag(args, args.test_dataset)))
    os.makedirs(vis_dir, exist_ok=True)
    marks = np.asarray(feats['marks'])
    q, g = marks == 0, marks == 1
    pick = lambda sel: {k: feats[k][sel] for k in ('global', 'local') if k in feats}
    distance = DISTANCES[args.test_distance][0]
    distmat = evaluation.compute_dist(pick(q), pick(g), distance=distance, normalize=cfg['normalize_feature'])
    distmat = distmat.cpu().numpy() if torch.is_tensor(distmat) else np.asarray(distmat)
    names = np.asarray([os.path.join(im_dir, n) for n in evaluation.test_images(partitions, 'test', args.multi_query)[0]])
    ids, cams = np.asarray(feats['ids']), np.asarray(feats['cams'])
    h, w = cfg['resize_h_w']
    visualize.save_ranked_lists(distmat, ids[q], ids[g], cams[q], cams[g], list(names[q]), list(names[g]),
                                vis_dir, query_indices=list(range(min(args.num_vis_queries, int(q.sum())))),
                                size=(max(h, 128), max(w, 64)), distance=distance)
    visualize.plot_cmc({name: r['cmc'] for name, r in results.items()}, os.path.join(vis_dir, 'cmc.png'))
    return vis_dir


def results_tag(args, *parts):
    """`parts` and the tag of other settings (settings_tag) joined by '_': what a test's metrics file and
    pictures folder are named for, so that a test at other settings never replaces the run's own."""
    return '_'.join(list(parts) + ([settings_tag(args.other_settings)] if args.other_settings else []))


def main(args):
    device = torch.device(args.device)
    partitions = data.read_partitions(args.test_partitions)
    if 'test_im_names' not in partitions:
        raise SystemExit('test.py: {} has no test split (a combined training set?)'.format(args.test_partitions))
    if args.multi_query != 'none' and 2 not in partitions['test_marks']:
        raise SystemExit('test.py: --multi_query {}: {} holds no multi-query images (mark 2, the gt_bbox/ '
                         'images of Market-1501); use --multi_query none'.format(args.multi_query,
                                                                                args.test_partitions))
    model, cfg = load_model(args, device)  # read and recognised before anything is written
    args.start = None
    logger = cli.setup_logging(os.path.join(args.exp_dir, 'test.log'))
    if args.other_settings:
        logger.warning('warning: testing with %s, not the %s that %s was trained with (--allow_other_settings '
                       'true): the results differ from the run\'s and are written apart from its metrics.json',
                       settings_flags(args.other_settings), settings_flags(args.other_settings, saved=True),
                       args.model_weight_file)
    if not cfg['size_from_checkpoint']:
        logger.warning('warning: %s holds no input size (a bare state dict?): testing at %d x %d; give '
                       '--resize_h_w H W if the model was trained at another size', args.model_weight_file,
                       *cfg['resize_h_w'])
    im_dir = data.partitions_images_dir(args.test_partitions)
    h, w = cfg['resize_h_w']
    logger.info('testing %s (%s, %s; input %d x %d, flip %s, mean %s, std %s) on %s (%s)', args.model_weight_file,
                cfg['layout'], cfg['base_model'], h, w, 'on' if args.flip else 'off', cfg['mean'], cfg['std'],
                args.test_dataset, args.test_partitions)
    feats, results, table = evaluate(model, partitions, im_dir, cfg, args, device)
    logger.info('train %s -> test %s, %s distance%s, input %d x %d%s:\n%s', args.train_dataset, args.test_dataset,
                args.test_distance, ', multi-query ' + args.multi_query if args.multi_query != 'none' else '',
                h, w, ', flip' if args.flip else '', table)
    tag = results_tag(args, *[args.test_dataset] if args.test_dataset != args.train_dataset else [])
    out = os.path.join(args.exp_dir, 'metrics_{}.json'.format(tag) if tag else 'metrics.json')
    checkpoint.write_json(evaluation.metrics_record(
        results, args.train_dataset, args.test_dataset, args.test_partitions, args.ap_mode,
        model_weight_file=args.model_weight_file, test_distance=args.test_distance, multi_query=args.multi_query,
        base_model=cfg['base_model'], resize_h_w=[int(h), int(w)], flip=bool(args.flip)), out)
    logger.info('metrics written to %s', out)
    if args.num_vis_queries:
        try:
            logger.info('pictures written to %s', draw(feats, results, partitions, im_dir, args, cfg))
        except (ImportError, AttributeError) as e:
            logger.warning('no pictures: aligned_reid.visualize is not usable here (%s)', e)
    return results


if __name__ == '__main__':
    cli.run_cli(main, parse_args, 'test.py', errors=(ValueError, FileNotFoundError),
                interrupted='interrupted; metrics.json is written only once the evaluation completes')
