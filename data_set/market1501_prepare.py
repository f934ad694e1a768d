"""Prepares Market-1501 (the downloaded zip or the extracted Market-1501-v15.09.15 folder) into
<save_dir>/images/ and <save_dir>/partitions.pkl. Run: cd data_set && python market1501_prepare.py"""
import os

from aligned_reid import cli
from aligned_reid.prepare import (OFFICIAL_COUNTS, add_common_arguments, prepare_market_layout,
                                  resolve_raw, run_cli)

DEFAULT_DIR = os.path.join('~', 'Dataset', 'market1501')
ZIP_NAME = 'Market-1501-v15.09.15.zip'
FOLDER_NAME = 'Market-1501-v15.09.15'


def build_parser():
    p = cli.ArgumentParser(description=__doc__)
    add_common_arguments(p, DEFAULT_DIR, ZIP_NAME, FOLDER_NAME)
    p.add_argument('--no_gt_bbox', action='store_true',
                   help='leave out the gt_bbox/ multi-query images (default: use them)')
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    raw = resolve_raw(args.raw_dir, args.zip_file, os.path.join(DEFAULT_DIR, FOLDER_NAME),
                      os.path.join(DEFAULT_DIR, ZIP_NAME))
    return prepare_market_layout(raw, os.path.expanduser(args.save_dir), dataset='market1501',
                                 overwrite=args.overwrite, num_val_ids=args.num_val_ids, seed=args.seed,
                                 expected=OFFICIAL_COUNTS['market1501'], use_gt_bbox=not args.no_gt_bbox,
                                 link=not args.copy, skip_bad_images=args.skip_bad_images)


if __name__ == '__main__':
    run_cli(main)
