"""Pictures of test results with Pillow only: ranked-list grids (query, then the top-k gallery
images framed green for a match, red otherwise, grey without labels) and CMC curves."""

import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

MATCH_COLOR = (0, 170, 0)
NON_MATCH_COLOR = (220, 0, 0)
QUERY_COLOR = (30, 80, 220)
NEUTRAL_COLOR = (150, 150, 150)   # gallery frames when no identity labels are known
CURVE_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
                (140, 86, 75), (227, 119, 194), (127, 127, 127)]


def _open(im, size):
    """Path or PIL image -> RGB image resized to size (h, w)."""
    if isinstance(im, (str, os.PathLike)):
        if not os.path.isfile(im):
            raise FileNotFoundError(f"save_ranked_lists: image not found: {im}")
        im = Image.open(im)
    return im.convert('RGB').resize((size[1], size[0]))


def _framed(im, color, border):
    out = Image.new('RGB', (im.width + 2 * border, im.height + 2 * border), color)
    out.paste(im, (border, border))
    return out


def save_ranked_lists(distmat, q_ids, g_ids, q_cams, g_cams, q_images, g_images, out_dir,
                      top_k=10, query_indices=None, size=(128, 64), border=4, gap=12,
                      caption=16, distance=None):
    """One PNG per query: the query image (blue frame), then its top_k gallery images by
    ascending distance (ties by gallery index), framed green for the same id, red otherwise.

    distmat [Q, G]; q_ids, q_cams [Q]; g_ids, g_cams [G]; q_images / g_images: sequences of
    image paths or PIL images, aligned with the rows / columns. Gallery items with the
    query's id and camera, and junk (id < 0), are left out as in evaluate_rank. Without
    labels (q_ids, g_ids, q_cams, g_cams all None, as for one's own images) every gallery item
    is kept and framed grey; np.inf distances mark items not to draw. size = (h, w)
    of each thumbnail. Each grid is (h + 2 border + caption) high and
    (top_k + 1) (w + 2 border) + gap wide. `distance`: the name of the distance the ranks and the
    numbers under the images are of ('global', 'local, re-ranked' ...), said by a line of
    `caption` pixels added below the grid. Returns the written paths
    (out_dir/query_{index:05d}.png)."""
    distmat = np.asarray(distmat)
    labelled = q_ids is not None
    if not labelled:
        q_ids, g_ids = np.zeros(distmat.shape[0], int), np.zeros(distmat.shape[1], int)
        q_cams, g_cams = q_ids - 1, g_ids
    q_ids, g_ids = np.asarray(q_ids), np.asarray(g_ids)
    q_cams, g_cams = np.asarray(q_cams), np.asarray(g_cams)
    if distmat.shape != (len(q_ids), len(g_ids)) or len(q_images) != len(q_ids) or \
            len(g_images) != len(g_ids):
        raise ValueError(f"save_ranked_lists: distmat {distmat.shape} does not fit "
                         f"{len(q_ids)} query ids / {len(q_images)} images and {len(g_ids)} "
                         f"gallery ids / {len(g_images)} images")
    os.makedirs(out_dir, exist_ok=True)
    h, w = size
    cell_w, cell_h = w + 2 * border, h + 2 * border
    font = ImageFont.load_default()
    paths = []
    for qi in (range(len(q_ids)) if query_indices is None else query_indices):
        order = np.argsort(distmat[qi], kind='stable')
        keep = ~((g_ids[order] == q_ids[qi]) & (g_cams[order] == q_cams[qi])) & (g_ids[order] >= 0)
        if not labelled:
            keep = np.isfinite(distmat[qi][order])
        ranked = order[keep][:top_k]
        canvas = Image.new('RGB', (cell_w * (top_k + 1) + gap, cell_h + caption * (2 if distance else 1)),
                           'white')
        draw = ImageDraw.Draw(canvas)
        if distance:
            draw.text((2, cell_h + caption + 2), f"distance: {distance}", fill='black', font=font)
        canvas.paste(_framed(_open(q_images[qi], size), QUERY_COLOR, border), (0, 0))
        draw.text((2, cell_h + 2), f"query {q_ids[qi]}" if labelled else "query", fill='black',
                  font=font)
        for rank, gi in enumerate(ranked, start=1):
            if not labelled:
                color = NEUTRAL_COLOR
            else:
                color = MATCH_COLOR if g_ids[gi] == q_ids[qi] else NON_MATCH_COLOR
            x = gap + rank * cell_w
            canvas.paste(_framed(_open(g_images[gi], size), color, border), (x, 0))
            draw.text((x + 2, cell_h + 2), f"{rank}: {distmat[qi, gi]:.2f}", fill=color, font=font)
        path = os.path.join(out_dir, f"query_{qi:05d}.png")
        canvas.save(path)
        paths.append(path)
    return paths


def _nice_step(span, target=8):
    raw = span / max(1, target)
    mag = 10 ** np.floor(np.log10(raw))
    for m in (1, 2, 5, 10):
        if m * mag >= raw:
            return m * mag
    return 10 * mag


def plot_cmc(cmcs, path, max_rank=None, size=(640, 480), title='CMC curve'):
    """Draw CMC curves to a PNG: x = rank (1..max_rank), y = matching rate in %.

    cmcs: one CMC array (rank 1 first, values in [0, 1], as evaluate_rank returns) or a dict
    {label: cmc} for several curves with a legend. size = (width, height). Returns path."""
    if not isinstance(cmcs, dict):
        cmcs = {'CMC': cmcs}
    if not cmcs:
        raise ValueError("plot_cmc: no curve given")
    cmcs = {k: np.asarray(v, dtype=np.float64) for k, v in cmcs.items()}
    n = max_rank or max(len(v) for v in cmcs.values())
    W, H = size
    left, right, top, bottom = 60, 20, 30, 50
    pw, ph = W - left - right, H - top - bottom
    lo = min(float(v[:n].min()) for v in cmcs.values()) * 100
    y0 = max(0., np.floor(lo / 10) * 10 - 10 if lo > 10 else 0.)
    y1 = 100.
    img = Image.new('RGB', (W, H), 'white')
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()

    def xy(rank, pct):
        x = left + (rank - 1) / max(1, n - 1) * pw
        y = top + (1 - (pct - y0) / (y1 - y0)) * ph
        return x, y

    draw.rectangle([left, top, left + pw, top + ph], outline='black')
    xstep = max(1, int(_nice_step(n - 1)))
    for r in [1] + list(range(xstep, n + 1, xstep)):
        x, _ = xy(r, y0)
        draw.line([x, top + ph, x, top + ph + 5], fill='black')
        draw.text((x - 6, top + ph + 8), str(r), fill='black', font=font)
    ystep = _nice_step(y1 - y0, 5)
    for p in np.arange(y0, y1 + 1e-9, ystep):
        _, y = xy(1, p)
        draw.line([left - 5, y, left, y], fill='black')
        draw.line([left + 1, y, left + pw - 1, y], fill=(225, 225, 225))
        draw.text((left - 40, y - 6), f"{p:g}", fill='black', font=font)
    draw.text((left + pw // 2 - 15, H - 20), 'Rank', fill='black', font=font)
    draw.text((5, top - 20), 'Matching rate (%)', fill='black', font=font)
    draw.text((left + pw // 2 - 3 * len(title), 8), title, fill='black', font=font)
    for c, (label, cmc) in enumerate(cmcs.items()):
        color = CURVE_COLORS[c % len(CURVE_COLORS)]
        pts = [xy(r + 1, 100 * cmc[r]) for r in range(min(n, len(cmc)))]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=2)
        else:
            draw.ellipse([pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2], fill=color)
        ly = top + ph - 18 * (len(cmcs) - c)
        draw.line([left + pw - 150, ly + 6, left + pw - 130, ly + 6], fill=color, width=2)
        draw.text((left + pw - 125, ly), f"{label} (R1 {100 * cmc[0]:.1f})", fill='black',
                  font=font)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)
    return path
