"""Prepares DukeMTMC-reID (the downloaded DukeMTMC-reID.zip or the extracted folder) into
<save_dir>/images/ and <save_dir>/partitions.pkl. Run: cd data_set && python duke_prepare.py"""
import os

from aligned_reid import cli
from aligned_reid.prepare import (OFFICIAL_COUNTS, add_common_arguments, prepare_market_layout,
                                  resolve_raw, run_cli)

DEFAULT_DIR = os.path.join('~', 'Dataset', 'duke')
ZIP_NAME = 'DukeMTMC-reID.zip'
FOLDER_NAME = 'DukeMTMC-reID'


def build_parser():
    p = cli.ArgumentParser(description=__doc__)
    add_common_arguments(p, DEFAULT_DIR, ZIP_NAME, FOLDER_NAME)
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    raw = resolve_raw(args.raw_dir, args.zip_file, os.path.join(DEFAULT_DIR, FOLDER_NAME),
                      os.path.join(DEFAULT_DIR, ZIP_NAME))
    return prepare_market_layout(raw, os.path.expanduser(args.save_dir), dataset='duke',
                                 overwrite=args.overwrite, num_val_ids=args.num_val_ids, seed=args.seed,
                                 expected=OFFICIAL_COUNTS['duke'], use_gt_bbox=False, link=not args.copy,
                                 skip_bad_images=args.skip_bad_images)


if __name__ == '__main__':
    run_cli(main)
