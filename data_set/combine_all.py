"""Combines the trainval sets of prepared datasets (default Market-1501 + CUHK03 detected + DukeMTMC-reID)
into one trainval set with disjoint identities and cameras. Run: cd data_set && python combine_all.py"""
import os

from aligned_reid import cli
from aligned_reid.data import parse_im_name, partitions_images_dir, read_partitions
from aligned_reid.prepare import Item, add_common_arguments, check_save_dir, run_cli, write_prepared

DEFAULT_DATASETS = [os.path.join('~', 'Dataset', 'market1501'), os.path.join('~', 'Dataset', 'cuhk03', 'detected'),
                    os.path.join('~', 'Dataset', 'duke')]
DEFAULT_DIR = os.path.join('~', 'Dataset', 'combined')  # script/train.py --train_dataset combined
DEFAULT_NAMES = ('market1501', 'cuhk03_detected', 'duke')
DEFAULT_IDS = 2220  # 751 + 767 + 702 on the full datasets


def combined_items(dataset_dirs):
    """Items of the combined trainval set. Dataset i's person ids become id_offset + its trainval
    label + 1 and its cameras cam_offset + rank of the camera + 1, offsets running over the datasets.
    Returns (items, provenance rows (dir, dataset name, ids, first id, last id, {old cam: new cam},
    images), names of the datasets)."""
    items, provenance, names = [], [], []
    seen = set()
    id_offset = cam_offset = 0
    for d in dataset_dirs:
        d = os.path.abspath(os.path.expanduser(d))
        pkl = d if d.endswith('.pkl') else os.path.join(d, 'partitions.pkl')
        if not os.path.isfile(pkl):
            raise FileNotFoundError(f'prepared dataset not found: {pkl} (run its *_prepare.py first)')
        if os.path.realpath(pkl) in seen:
            raise ValueError(f'{pkl} is given twice')
        seen.add(os.path.realpath(pkl))
        part = read_partitions(pkl)
        images = partitions_images_dir(pkl)
        ids2labels = part['trainval_ids2labels']
        parsed = [parse_im_name(n) for n in part['trainval_im_names']]
        cams = {cam: cam_offset + i + 1 for i, cam in enumerate(sorted({c for _, c in parsed}))}
        for name, (pid, cam) in zip(part['trainval_im_names'], parsed):
            items.append(Item(os.path.join(images, name), id_offset + ids2labels[pid] + 1, cams[cam], 'trainval'))
        name = part.get('dataset') or os.path.basename(os.path.dirname(pkl))
        names.append(name)
        provenance.append((os.path.dirname(pkl), name, len(ids2labels), id_offset + 1, id_offset + len(ids2labels), cams, len(parsed)))
        id_offset += len(ids2labels)
        cam_offset += len(cams)
    return items, provenance, names


def format_provenance(provenance):
    lines = ['identities and cameras of the combined set come from:']
    for d, name, n_ids, first, last, cams, n_images in provenance:
        cam_map = ', '.join(f'{old}->{new}' for old, new in cams.items())
        lines.append(f'  ids {first}-{last} ({n_ids} ids, {n_images} images) <- {name} trainval ({d}); '
                     f'cameras {cam_map}')
    return '\n'.join(lines)


def combine(dataset_dirs, save_dir, overwrite=False, link=True, skip_bad_images=False):
    """Writes the combined trainval set to <save_dir>/images/ and partitions.pkl (trainval keys only).
    Returns (partitions, provenance rows)."""
    if not dataset_dirs:
        raise ValueError('no datasets to combine')
    check_save_dir(save_dir, overwrite)
    items, provenance, names = combined_items(dataset_dirs)
    print(format_provenance(provenance))
    expected = {'trainval_ids': DEFAULT_IDS} if tuple(names) == DEFAULT_NAMES else None
    part = write_prepared(items, save_dir, '+'.join(names), overwrite=overwrite, expected=expected,
                          trainval_only=True, link=link, raw_paths=[p[0] for p in provenance],
                          skip_bad_images=skip_bad_images)
    return part, provenance


def build_parser():
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument('--datasets', nargs='+', default=DEFAULT_DATASETS,
                   help='prepared dataset folders (or their partitions.pkl) to combine, in id order '
                        '(default: %(default)s)')
    add_common_arguments(p, DEFAULT_DIR, val=False)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    return combine(args.datasets, os.path.expanduser(args.save_dir), overwrite=args.overwrite,
                   link=not args.copy, skip_bad_images=args.skip_bad_images)


if __name__ == '__main__':
    run_cli(main)
