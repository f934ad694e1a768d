"""Raw-pixel Euclidean baseline on the synthetic test split: resize, flatten, rank the gallery by
Euclidean distance, print Rank-1/mAP (shows how much the camera nuisances defeat raw pixels)."""
import os
import tempfile
import time

import numpy as np
from PIL import Image

from aligned_reid import cli
from aligned_reid.data import parse_im_name, partitions_images_dir, read_partitions
from aligned_reid.evaluation import evaluate_rank
from aligned_reid.prepare import prepare_market_layout
from aligned_reid.synthetic import render_market_tree


def build_parser():
    p = cli.ArgumentParser(description=__doc__)
    p.add_argument('--partitions', default=None,
                   help='partitions.pkl of a prepared synthetic set (default: none, render the '
                        'default set into a temporary folder)')
    p.add_argument('--seed', type=int, default=0, help='render seed when rendering (default 0)')
    p.add_argument('--resize', type=int, nargs=2, default=(128, 64), metavar=('H', 'W'),
                   help='size the images are resized to before flattening (default 128 64)')
    return p


def load_pixels(im_dir, names, resize_h_w):
    """Images -> [N, H*W*3] float32 in [0, 1]."""
    h, w = resize_h_w
    feats = np.empty((len(names), h * w * 3), np.float32)
    for i, n in enumerate(names):
        with Image.open(os.path.join(im_dir, n)) as im:
            feats[i] = np.asarray(im.convert('RGB').resize((w, h), Image.BILINEAR),
                                  np.float32).reshape(-1) / 255.
    return feats


def pairwise_euclidean(q, g):
    """q [Q, d], g [G, d] -> [Q, G] Euclidean distances."""
    d2 = (q * q).sum(1)[:, None] + (g * g).sum(1)[None, :] - 2. * q @ g.T
    return np.sqrt(np.maximum(d2, 0.))


def run(partitions_path, resize_h_w):
    """Rank-1, mAP of the raw-pixel baseline on a prepared set's test split."""
    part = read_partitions(partitions_path)
    im_dir = partitions_images_dir(partitions_path)
    names, marks = np.asarray(part['test_im_names']), np.asarray(part['test_marks'])
    q_names, g_names = list(names[marks == 0]), list(names[marks == 1])
    q_ids, q_cams = map(np.asarray, zip(*[parse_im_name(n) for n in q_names]))
    g_ids, g_cams = map(np.asarray, zip(*[parse_im_name(n) for n in g_names]))
    dist = pairwise_euclidean(load_pixels(im_dir, q_names, resize_h_w),
                              load_pixels(im_dir, g_names, resize_h_w))
    print('queries {}, gallery {}'.format(len(q_names), len(g_names)))
    r = evaluate_rank(dist, q_ids, g_ids, q_cams, g_cams)
    return float(r['cmc'][0]), float(r['mAP'])


def main(args):
    if args.partitions:
        rank1, mAP = run(args.partitions, args.resize)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            t = time.time()
            counts = render_market_tree(os.path.join(tmp, 'raw'), seed=args.seed)
            print('rendered the default synthetic set in {:.1f} s: {}'.format(time.time() - t, counts))
            prepare_market_layout(os.path.join(tmp, 'raw'), os.path.join(tmp, 'prepared'),
                                  dataset='synthetic', num_val_ids=50, verbose=False)
            rank1, mAP = run(os.path.join(tmp, 'prepared', 'partitions.pkl'), args.resize)
    print('raw-pixel Euclidean baseline: Rank-1 {:.2%}  mAP {:.2%}'.format(rank1, mAP))
    return rank1, mAP


if __name__ == '__main__':
    main(build_parser().parse_args())
