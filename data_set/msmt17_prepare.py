"""Prepares MSMT17 (V1 or V2: the zip or the extracted folder with train/ test/ or mask_train_v2/
mask_test_v2/ and the list files) into <save_dir>/images/ and <save_dir>/partitions.pkl.
Run: cd data_set && python msmt17_prepare.py"""
import os
import re
import zipfile

from aligned_reid import cli
from aligned_reid.prepare import (OFFICIAL_COUNTS, Item, ZipMember, add_common_arguments,
                                  check_save_dir, run_cli, write_prepared)

DEFAULT_DIR = os.path.join('~', 'Dataset', 'msmt17')
VERSIONS = ('MSMT17_V1', 'MSMT17_V2')
IMAGE_DIRS = {'train': ('train', 'mask_train_v2'), 'test': ('test', 'mask_test_v2')}
LISTS = (('list_train.txt', 'train', 'trainval'), ('list_val.txt', 'train', 'trainval'),
         ('list_query.txt', 'test', 'query'), ('list_gallery.txt', 'test', 'gallery'))
# 0000_000_01_0303morning_0015_0.jpg: person, running index, camera (1-15), date/time, frame, ...
NAME_RE = re.compile(r'(\d+)_(\d+)_(\d+)_\S*\.(?:jpg|jpeg|png)', re.IGNORECASE)


def parse_list(lines, list_name):
    """Lines 'relative/path.jpg label' -> [(path, label, camera, line number)]. Blank lines are
    skipped; anything else that does not parse raises ValueError naming the file and line."""
    rows = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        fields = line.split()
        where = f'{list_name} line {lineno}: {line.strip()!r}'
        if len(fields) != 2 or not fields[1].isdigit():
            raise ValueError(f'{where} is not "<relative image path> <integer label>"')
        parts = fields[0].replace('\\', '/').split('/')
        if fields[0].startswith(('/', '\\')) or '..' in parts or ':' in parts[0]:
            raise ValueError(f'{where}: the image path must stay inside the image folder')
        m = NAME_RE.fullmatch(os.path.basename(fields[0]))
        if m is None:
            raise ValueError(f'{where}: cannot parse the camera from the image name '
                             "(expected e.g. '0000_000_01_0303morning_0015_0.jpg')")
        cam = int(m.group(3))
        if cam < 1:
            raise ValueError(f'{where}: camera {cam} (cameras are numbered from 1)')
        rows.append((fields[0], int(fields[1]), cam, lineno))
    if not rows:
        raise ValueError(f'{list_name} lists no images')
    return rows


class _Source:
    """The MSMT17 tree inside a folder or a zip: finds the list files and the image folders."""

    def __init__(self, raw):
        self.raw = raw
        self.zip = zipfile.is_zipfile(raw)
        if self.zip:
            with zipfile.ZipFile(raw) as zf:
                self.members = {m for m in zf.namelist() if not m.startswith('__MACOSX/')}
            roots = sorted((os.path.dirname(m) for m in self.members
                            if os.path.basename(m) == 'list_train.txt'), key=len)
        else:
            if os.path.exists(raw) and not os.path.isdir(raw):
                raise ValueError(f'{raw} is neither a folder nor a zip archive (a damaged or partial '
                                 'download?); give the downloaded .zip or the extracted folder')
            if not os.path.isdir(raw):
                raise FileNotFoundError(f'raw dataset not found: {raw}')
            roots = []
            for dirpath, dirnames, filenames in os.walk(raw):
                if 'list_train.txt' in filenames:
                    roots.append(dirpath)
                    break
                if dirpath[len(raw):].count(os.sep) >= 2:
                    dirnames[:] = []
                dirnames.sort()
        if not roots:
            raise ValueError(f'{raw}: no list_train.txt found (expected the MSMT17_V1 or MSMT17_V2 layout)')
        self.root = roots[0]
        self.dirs = {}
        for kind, names in IMAGE_DIRS.items():
            found = [n for n in names if self._isdir(self._join(n))]
            if not found:
                raise ValueError(f'{raw}: missing subfolder {self._join(names[0])}/ '
                                 f'(or {names[1]}/ in MSMT17_V2)')
            self.dirs[kind] = self._join(found[0])

    def _join(self, *parts):
        return '/'.join((self.root, *parts)) if self.zip else os.path.join(self.root, *parts)

    def _isdir(self, path):
        if self.zip:
            prefix = path.strip('/') + '/'
            return any(m.startswith(prefix) for m in self.members)
        return os.path.isdir(path)

    def read_lines(self, name):
        path = self._join(name)
        if self.zip:
            if path not in self.members:
                raise ValueError(f'{self.raw}: missing list file {path}')
            with zipfile.ZipFile(self.raw) as zf:
                return zf.read(path).decode('utf-8').splitlines()
        if not os.path.isfile(path):
            raise ValueError(f'{self.raw}: missing list file {path}')
        with open(path, encoding='utf-8') as f:
            return f.read().splitlines()

    def image(self, kind, rel, where):
        path = (self.dirs[kind] + '/' + rel) if self.zip else os.path.join(self.dirs[kind], rel)
        if self.zip:
            if path not in self.members:
                raise FileNotFoundError(f'{where}: image listed but missing: {path} in {self.raw}')
            return ZipMember(self.raw, path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f'{where}: image listed but missing: {path}')
        return path


def msmt17_items(raw):
    """Items of MSMT17: trainval = list_train + list_val, person id label + 1; test ids are shifted
    past the training ids (label + 1 + number of training labels) so the two never share a name."""
    src = _Source(raw)
    rows = {name: parse_list(src.read_lines(name), name) for name, _, _ in LISTS}
    num_train_labels = 1 + max(label for name in ('list_train.txt', 'list_val.txt') for _, label, _, _ in rows[name])
    items = []
    for name, kind, split in LISTS:
        offset = 1 if kind == 'train' else 1 + num_train_labels
        for rel, label, cam, lineno in rows[name]:
            items.append(Item(src.image(kind, rel, f'{name} line {lineno}'), label + offset, cam, split))
    return items


def prepare_msmt17(raw, save_dir, overwrite=False, num_val_ids=100, seed=1, link=True, skip_bad_images=False):
    """Prepares MSMT17 V1 or V2 (folder or zip) into <save_dir>; undecodable images stop it with their list,
    or are left out with skip_bad_images. Returns the partitions dict."""
    raw = os.path.abspath(os.path.expanduser(raw))
    if not os.path.exists(raw):
        raise FileNotFoundError(f'raw dataset not found: {raw}')
    check_save_dir(save_dir, overwrite, raw_paths=(raw,))
    return write_prepared(msmt17_items(raw), save_dir, 'msmt17', overwrite=overwrite, num_val_ids=num_val_ids,
                          seed=seed, expected=OFFICIAL_COUNTS['msmt17'], link=link, raw_paths=(raw,),
                          skip_bad_images=skip_bad_images)


def build_parser():
    p = cli.ArgumentParser(description=__doc__)
    add_common_arguments(p, DEFAULT_DIR, 'MSMT17_V1.zip (or MSMT17_V2.zip)', 'MSMT17_V1 (or MSMT17_V2)')
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    raw = args.raw_dir or args.zip_file
    if raw is None:
        candidates = [os.path.join(DEFAULT_DIR, v + ext) for v in VERSIONS for ext in ('', '.zip')]
        raw = next((c for c in candidates if os.path.exists(os.path.expanduser(c))), None)
        if raw is None:
            raise FileNotFoundError(f'raw dataset not found: looked for {", ".join(candidates)}; '
                                    'download it there or pass --raw_dir / --zip_file')
    return prepare_msmt17(raw, os.path.expanduser(args.save_dir), overwrite=args.overwrite,
                          num_val_ids=args.num_val_ids, seed=args.seed, link=not args.copy,
                          skip_bad_images=args.skip_bad_images)


if __name__ == '__main__':
    run_cli(main)
