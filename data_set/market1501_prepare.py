"""Prepares Market-1501 (the downloaded zip or the extracted Market-1501-v15.09.15 folder) into
<save_dir>/images/ and <save_dir>/partitions.pkl. Run: python market1501_prepare.py"""
import argparse
import os
import sys

from aligned_reid.prepare import OFFICIAL_COUNTS, prepare_market_layout, resolve_raw

DEFAULT_DIR = os.path.join('~', 'Dataset', 'market1501')


def build_parser():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument('--zip_file', default=None,
                   help='the downloaded zip (default: %s/Market-1501-v15.09.15.zip, used when the '
                        'extracted folder is absent)' % DEFAULT_DIR)
    p.add_argument('--raw_dir', default=None,
                   help='the extracted folder (default: %s/Market-1501-v15.09.15 when it exists)' % DEFAULT_DIR)
    p.add_argument('--save_dir', default=DEFAULT_DIR, help='output folder (default: %(default)s)')
    p.add_argument('--overwrite', action='store_true', help='replace an existing prepared set (default: refuse)')
    p.add_argument('--num_val_ids', type=int, default=100,
                   help='training identities held out for validation (default: %(default)s)')
    p.add_argument('--seed', type=int, default=1, help='seed of the validation split (default: %(default)s)')
    p.add_argument('--no_gt_bbox', action='store_true',
                   help='skip the gt_bbox/ multi-query images (default: use them)')
    p.add_argument('--copy', action='store_true', help='copy images instead of hard-linking (default: link)')
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.zip_file and args.raw_dir:
        p.error('give either --zip_file or --raw_dir, not both')
    raw = resolve_raw(args.raw_dir, args.zip_file, os.path.join(DEFAULT_DIR, 'Market-1501-v15.09.15'),
                      os.path.join(DEFAULT_DIR, 'Market-1501-v15.09.15.zip'))
    return prepare_market_layout(raw, os.path.expanduser(args.save_dir), dataset='market1501',
                                 overwrite=args.overwrite, num_val_ids=args.num_val_ids, seed=args.seed,
                                 expected=OFFICIAL_COUNTS['market1501'], use_gt_bbox=not args.no_gt_bbox,
                                 link=not args.copy)


if __name__ == '__main__':
    try:
        main()
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        sys.exit(f'error: {e}')
