"""Renders the synthetic pedestrian dataset in the Market-1501 layout and prepares it like Market-1501
into <save_dir>/images/ and <save_dir>/partitions.pkl. Run: python data_set/synthetic_prepare.py"""
import os
import time

from aligned_reid import cli
from aligned_reid.prepare import prepare_market_layout, run_cli
from aligned_reid.synthetic import (RENDER_MARK, remove_render_leftovers, render_market_tree, render_settings,
                                    render_state)

DEFAULT_DIR = os.path.join('~', 'Dataset', 'synthetic')


def build_parser():
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument('--save_dir', default=DEFAULT_DIR, help='output folder (default: %(default)s)')
    p.add_argument('--raw_dir', default=None,
                   help='where the raw Market-layout tree is rendered (default: <save_dir>/raw)')
    p.add_argument('--num_train_ids', type=int, default=200, help='training identities (default: %(default)s)')
    p.add_argument('--num_test_ids', type=int, default=200, help='test identities (default: %(default)s)')
    p.add_argument('--ims_per_id_cam', type=int, default=4,
                   help='images per identity and camera seeing it (default: %(default)s)')
    p.add_argument('--num_cams', type=int, default=6, help='cameras, 2..9 (default: %(default)s)')
    p.add_argument('--im_size', type=int, nargs=2, default=(128, 64), metavar=('H', 'W'),
                   help='image height and width (default: 128 64)')
    p.add_argument('--seed', type=int, default=0, help='render seed (default: %(default)s)')
    p.add_argument('--num_val_ids', type=int, default=None,
                   help='training identities held out for validation '
                        '(default: min(100, num_train_ids // 4))')
    p.add_argument('--workers', type=int, default=1,
                   help='rendering processes; the output does not depend on it (default: %(default)s)')
    p.add_argument('--overwrite', action='store_true',
                   help='re-render and re-prepare over an existing raw tree / prepared set; each is built '
                        'beside the old one and swapped in when complete (default: refuse; a complete render '
                        'of the same settings is prepared without rendering it again)')
    return p


def main(argv=None):
    """Parses argv (default sys.argv[1:]), renders, prepares; returns the partitions dict. A rerun says what
    it finds: leftovers of an interrupted run (removed), a complete render of the same settings (prepared
    without rendering it again), or a finished set (refused without --overwrite)."""
    p = build_parser()
    args = p.parse_args(argv)
    if args.num_train_ids < 2:
        p.error('--num_train_ids must be at least 2, got {}'.format(args.num_train_ids))
    num_val_ids = min(100, args.num_train_ids // 4) if args.num_val_ids is None else args.num_val_ids
    if not 0 <= num_val_ids < args.num_train_ids:
        p.error('--num_val_ids must be in 0..num_train_ids-1 = {}, got {}'
                .format(args.num_train_ids - 1, num_val_ids))
    save_dir = os.path.abspath(os.path.expanduser(args.save_dir))
    raw_dir = os.path.abspath(os.path.expanduser(args.raw_dir or os.path.join(save_dir, 'raw')))
    settings = render_settings(num_train_ids=args.num_train_ids, num_test_ids=args.num_test_ids,
                               ims_per_id_cam=args.ims_per_id_cam, num_cams=args.num_cams,
                               im_size=tuple(args.im_size), seed=args.seed)
    # Look before spending the render time.
    for path in remove_render_leftovers(raw_dir):
        print('removed {}: the incomplete render of an interrupted run'.format(path))
    state, mark = render_state(raw_dir)
    if not args.overwrite:
        prepared = [os.path.join(save_dir, n) for n in ('partitions.pkl', 'images')
                    if os.path.lexists(os.path.join(save_dir, n))]
        if prepared:
            raise FileExistsError('{} already holds a prepared set ({}); pass --overwrite to replace it'.format(
                save_dir, ', '.join(prepared)))
        if state == 'unmarked':
            raise FileExistsError('{} holds Market-layout folders without {}, the mark of a complete render (a run '
                                  'killed midway, or older code); pass --overwrite to render it again'.format(
                                      raw_dir, RENDER_MARK))
        if state == 'complete' and mark['settings'] != settings:
            other = ', '.join('{} {}'.format(k, mark['settings'].get(k)) for k in settings
                              if mark['settings'].get(k) != settings[k])
            raise FileExistsError('{} holds a complete render of other settings ({}); pass --overwrite to '
                                  'render it again'.format(raw_dir, other))
    if state == 'complete' and not args.overwrite:
        print('{} holds a complete render of these settings (an earlier run stopped before preparing it): '
              'preparing it'.format(raw_dir))
    else:
        t = time.time()
        print('rendering into {}'.format(raw_dir), flush=True)
        counts = render_market_tree(raw_dir, workers=args.workers, overwrite=args.overwrite, **dict(
            settings, im_size=tuple(settings['im_size'])))
        print('rendered {} in {:.1f} s: {}'.format(raw_dir, time.time() - t, counts))
    return prepare_market_layout(raw_dir, save_dir, dataset='synthetic', overwrite=args.overwrite,
                                 num_val_ids=num_val_ids)


if __name__ == '__main__':
    run_cli(main)
