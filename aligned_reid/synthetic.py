"""Procedural pedestrian renderer (Pillow + numpy) that writes a synthetic re-id dataset in the
exact Market-1501 folder layout and file naming, so the real Market preparation runs on it.

Misalignment model (DETECTOR below). Real re-id crops come from pedestrian detectors: Market-1501
and CUHK03 "detected" from DPM, MSMT17 from Faster R-CNN; only Market's queries / gt_bbox and
CUHK03 "labeled" are hand-drawn. The Pedestrian Alignment Network paper (Zheng, Zheng, Yang,
arXiv 1707.00408) names the two detector errors: excessive background and missing parts; the
AlignedReID paper (arXiv 1711.08184) adds pose and occlusion as causes of misalignment. The one
published magnitude is Market-1501's annotation rule (Zheng et al., ICCV 2015, and the dataset
page): a DPM box whose IoU with the hand-drawn box is above 0.5 is kept as a "good" image
(training and gallery), below 0.2 it is a distractor (0000_*), in between junk (-1_*). So:

- queries and gt_bbox images are hand-drawn boxes ('hand'): the person with a margin of 2-6% of
  its height above and below and a 1.5% annotation jitter (our choice; no figure published);
- training and gallery images are detected boxes ('detected'): the hand-drawn box moved by
  (dx, dy) box widths / heights and scaled by k, kept only when IoU > 0.5 (Market's rule).
  A box of equal size passes the rule up to an offset of 1/3 of its side ((1 - s) / (1 + s) > 0.5)
  and a concentric box up to a scale of sqrt(2) (1 / k^2 > 0.5); these bounds span the "poor"
  detections, drawn uniformly within them and filtered by the rule. Such boxes cut off the head
  or the legs (partial bodies) or hold extra background;
- no distribution of DPM (or Faster R-CNN) box errors on these datasets is published that we
  found, so the rest are our choices, stated here: 30% of detections are poor, the others jitter
  with standard deviations of 5% of the height (vertical), 4% of the width (horizontal) and 6%
  in log scale; each camera adds a fixed bias of up to +-4% vertical offset and +-5% log scale
  (detectors err differently with viewpoint and person size); 15% of crops have an occluder
  (band at the bottom or one side);
- distractors and junk are poor detections of people outside the labelled set, boxed with
  IoU < 0.2 (but overlapping the person) and 0.2 <= IoU <= 0.5, as in Market's rule.
"""
import functools
import json
import os
import shutil
import signal
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from aligned_reid.signals import signals_deferred

SUBDIRS = ('bounding_box_train', 'bounding_box_test', 'query', 'gt_bbox')

# Seed-stream tags: every random draw comes from a Generator seeded by (seed, tag, keys...), so an
# image depends only on its own identity / camera / index and never on rendering order.
_IDENTITY, _CAMERA, _IMAGE, _SPLIT, _TRACK, _DISTRACTOR, _JUNK = range(7)

# Detector model of the crops (see the module docstring for the sources and the choices).
DETECTOR = {
    'good_iou': 0.5,               # Market-1501: IoU > 0.5 with the hand-drawn box is "good"
    'distractor_iou': 0.2,         # Market-1501: IoU < 0.2 is a distractor; in between, junk
    'poor_prob': 0.3,              # share of detections drawn from the whole IoU > 0.5 range
    'poor_span': 1. / 3.,          # largest offset (box sides) an equal-size box can have at IoU 0.5
    'poor_scale': 2. ** 0.5,       # largest scale a concentric box can have at IoU 0.5
    'sigma_y': 0.05,               # the others: vertical jitter (box heights)
    'sigma_x': 0.04,               # horizontal jitter (box widths)
    'sigma_log_scale': 0.06,       # scale jitter (log)
    'camera_shift': 0.04,          # per-camera bias: vertical offset up to +-this
    'camera_log_scale': 0.05,      # per-camera bias: log scale up to +-this
    'hand_sigma': 0.015,           # hand-drawn boxes: annotation jitter of offset and log scale
    'hand_margin': (0.02, 0.06),   # hand-drawn boxes: margin above the head / below the feet
    'occlusion_prob': 0.15,        # crops with an occluder in front of the person
}

# Kinds of image; part of the per-image seed so a query never repeats a gallery image.
KIND_TRAIN, KIND_GALLERY, KIND_QUERY, KIND_MQ = range(4)

TOP_PATTERNS = ('plain', 'hstripes', 'vstripes', 'checks', 'logo', 'two_tone')
BOTTOM_TYPES = ('trousers', 'trousers', 'trousers', 'shorts', 'skirt')
HAIR_STYLES = ('short', 'short', 'long', 'cap', 'bald')
BAGS = ('none', 'none', 'backpack', 'shoulder', 'handbag')
BACKGROUND_TEXTURES = ('bricks', 'tiles', 'stripes', 'noise', 'gradient')


def _rng(seed, *keys):
    """np.random.Generator seeded by the non-negative ints (seed, *keys)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed)] + [int(k) for k in keys])))


def _hsv_to_rgb(h, s, v):
    """h, s, v in [0, 1] -> (r, g, b) ints in [0, 255]."""
    i = int(h * 6.) % 6
    f = h * 6. - int(h * 6.)
    p, q, t = v * (1. - s), v * (1. - f * s), v * (1. - (1. - f) * s)
    r, g, b = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return (int(r * 255), int(g * 255), int(b * 255))


def _garment_colour(rng):
    """Clothing colour: a third neutral (black/grey/white), the rest of any hue."""
    if rng.random() < 0.15:
        v = rng.choice([0.1, 0.25, 0.45, 0.65, 0.9]) + rng.uniform(-0.05, 0.05)
        return _hsv_to_rgb(rng.random(), rng.uniform(0., 0.1), float(np.clip(v, 0., 1.)))
    return _hsv_to_rgb(rng.random(), rng.uniform(0.5, 1.0), rng.uniform(0.4, 1.0))


def _distinct_colour(rng, other, min_dist=120):
    """A garment colour at least min_dist (RGB Euclidean) away from `other`."""
    for _ in range(20):
        c = _garment_colour(rng)
        if np.linalg.norm(np.subtract(c, other)) >= min_dist:
            return c
    return tuple(255 - x for x in other)


@functools.lru_cache(maxsize=4096)
def make_identity(seed, pid):
    """Fixed appearance of one person: clothing colours / patterns, body proportions, hair, bag.
    Cached: treat the returned dict as read-only."""
    rng = _rng(seed, _IDENTITY, pid)
    top = _garment_colour(rng)
    skin = _hsv_to_rgb(rng.uniform(0.03, 0.1), rng.uniform(0.25, 0.6), rng.uniform(0.35, 0.95))
    hair_v = rng.choice([0.08, 0.2, 0.35, 0.6, 0.85])
    return {
        'width': rng.uniform(0.8, 1.25),               # shoulder width multiplier
        'head': rng.uniform(0.11, 0.14),                # head diameter / body height
        'torso': rng.uniform(0.28, 0.36),               # torso length / body height
        'skin': skin,
        'hair_style': HAIR_STYLES[rng.integers(len(HAIR_STYLES))],
        'hair': _hsv_to_rgb(rng.uniform(0.02, 0.12), rng.uniform(0.2, 0.7), hair_v),
        'cap': _garment_colour(rng),
        'top': top,
        'top2': _distinct_colour(rng, top),
        'top_pattern': TOP_PATTERNS[rng.integers(len(TOP_PATTERNS))],
        'stripe_period': rng.uniform(0.045, 0.09),      # / body height
        'logo_shape': int(rng.integers(3)),
        'long_sleeves': bool(rng.random() < 0.6),
        'bottom': _distinct_colour(rng, top, 60),
        'bottom_type': BOTTOM_TYPES[rng.integers(len(BOTTOM_TYPES))],
        'shoes': _garment_colour(rng),
        'bag': BAGS[rng.integers(len(BAGS))],
        'bag_colour': _garment_colour(rng),
        'bag_side': int(rng.integers(2)),
    }


@functools.lru_cache(maxsize=64)
def make_camera(seed, cam):
    """Fixed nuisances of one camera: lighting, colour cast, background, detector jitter, noise."""
    rng = _rng(seed, _CAMERA, cam)
    return {
        'seed': seed,
        'id': cam,
        'brightness': rng.uniform(-0.08, 0.08),
        'contrast': rng.uniform(0.8, 1.15),
        'gamma': rng.uniform(0.85, 1.2),
        'cast': tuple(rng.uniform(0.88, 1.12, size=3)),   # per-channel gain
        'wall': _hsv_to_rgb(rng.random(), rng.uniform(0.05, 0.6), rng.uniform(0.25, 0.9)),
        'wall2': _hsv_to_rgb(rng.random(), rng.uniform(0.05, 0.6), rng.uniform(0.25, 0.9)),
        'floor': _hsv_to_rgb(rng.random(), rng.uniform(0.0, 0.4), rng.uniform(0.2, 0.8)),
        'horizon': rng.uniform(0.45, 0.8),              # floor starts here (fraction of height)
        'texture': BACKGROUND_TEXTURES[rng.integers(len(BACKGROUND_TEXTURES))],
        'texture_period': rng.uniform(0.06, 0.2),
        'clutter': [_hsv_to_rgb(rng.random(), rng.uniform(0.1, 0.9), rng.uniform(0.2, 0.95))
                    for _ in range(4)],
        # Detector bias of this camera (viewpoint, person size): mean vertical offset of its
        # detected boxes (fraction of the person's height) and mean box scale.
        'shift': rng.uniform(-DETECTOR['camera_shift'], DETECTOR['camera_shift']),
        'scale': float(np.exp(rng.uniform(-DETECTOR['camera_log_scale'], DETECTOR['camera_log_scale']))),
        'front_prob': rng.uniform(0.2, 0.8),            # viewpoint: front vs back
        'noise': rng.uniform(0.0, 6.0),                 # sensor noise sigma, grey levels
        'blur_prob': rng.uniform(0.0, 0.4),
    }


@functools.lru_cache(maxsize=64)
def _wall(seed, cam_id, h, w):
    """Camera's wall texture, [h + 2p, w + 2p, 3] uint8 (p = texture period), cropped at a random
    offset per image so the pattern shifts with the detection box."""
    cam = make_camera(seed, cam_id)
    p = max(2, int(cam['texture_period'] * h))
    hh, ww = h + 2 * p, w + 2 * p
    ys, xs = np.arange(hh)[:, None], np.arange(ww)[None, :]
    tex = cam['texture']
    wall, wall2 = np.asarray(cam['wall'], np.float32), np.asarray(cam['wall2'], np.float32)
    if tex == 'gradient':
        t = (ys / hh)[..., None]  # [hh, 1, 1]
        return np.broadcast_to(wall * (1. - t) + wall2 * t, (hh, ww, 3)).astype(np.uint8), p
    if tex == 'bricks':
        mask = ((ys % p) < 2) | ((((xs + (ys // p % 2) * p) % (2 * p)) < 2))
    elif tex == 'tiles':
        mask = ((xs // p + ys // p) % 2) == 0
    elif tex == 'stripes':
        mask = np.broadcast_to((xs % (2 * p)) < p, (hh, ww))
    else:
        mask = _rng(seed, _CAMERA, cam_id, 1).random((hh, ww)) < 0.25
    return np.where(mask[..., None], wall2, wall).astype(np.uint8), p


def _background(cam, rng, h, w):
    """Camera scene behind the person: wall texture above the horizon, floor below, clutter."""
    arr = np.empty((h, w, 3), np.uint8)
    yh = int(h * (cam['horizon'] + rng.uniform(-0.05, 0.05)))
    wall, p = _wall(cam['seed'], cam['id'], h, w)
    ox, oy = rng.integers(p), rng.integers(p)
    arr[:yh] = wall[oy:oy + yh, ox:ox + w]
    # Floor shading varies per image (shadows, lighting patches).
    arr[yh:] = np.clip(np.asarray(cam['floor'], np.float32) * rng.uniform(0.8, 1.2), 0, 255).astype(np.uint8)
    img = Image.fromarray(arr)
    draw = ImageDraw.Draw(img)
    for _ in range(rng.integers(1, 4)):
        colour = cam['clutter'][rng.integers(len(cam['clutter']))]
        x0, y0 = rng.uniform(-0.3, 1.) * w, rng.uniform(0., 0.9) * h
        bw, bh = rng.uniform(0.1, 0.5) * w, rng.uniform(0.05, 0.4) * h
        if rng.random() < 0.5:
            draw.rectangle([x0, y0, x0 + bw, y0 + bh], fill=colour)
        else:
            draw.ellipse([x0, y0, x0 + bw, y0 + bh], fill=colour)
    return img


def _pattern_patch(ident, ph, bw, bh, front):
    """Upper-garment texture of size (bh, bw) as an RGB image; pattern scale is tied to body height."""
    c1, c2 = np.asarray(ident['top'], np.uint8), np.asarray(ident['top2'], np.uint8)
    arr = np.empty((bh, bw, 3), np.uint8)
    arr[:] = c1
    period = max(2, int(round(ident['stripe_period'] * ph)))
    ys, xs = np.mgrid[0:bh, 0:bw]
    pat = ident['top_pattern']
    if pat == 'hstripes':
        arr[(ys % (2 * period)) < period] = c2
    elif pat == 'vstripes':
        arr[((xs - bw // 2) % (2 * period)) < period] = c2
    elif pat == 'checks':
        arr[((ys // period + (xs - bw // 2) // period) % 2) == 0] = c2
    elif pat == 'two_tone':
        arr[bh // 2:] = c2
    img = Image.fromarray(arr)
    if pat == 'logo' and front:
        d = ImageDraw.Draw(img)
        r = 0.28 * min(bw, bh)
        cx, cy = bw / 2., bh * 0.4
        box = [cx - r, cy - r, cx + r, cy + r]
        if ident['logo_shape'] == 0:
            d.ellipse(box, fill=tuple(c2))
        elif ident['logo_shape'] == 1:
            d.rectangle(box, fill=tuple(c2))
        else:
            d.polygon([(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)], fill=tuple(c2))
    return img


def _limb(draw, p0, p1, width, colour):
    draw.line([p0, p1], fill=colour, width=max(1, int(round(width))))
    r = width / 2.
    draw.ellipse([p1[0] - r, p1[1] - r, p1[0] + r, p1[1] + r], fill=colour)


def _draw_person(img, ident, cx, top, ph, view, phase, arm_swing):
    """Draw a pedestrian of height ph (pixels) with head top at `top`, centred at cx.

    view: 'front', 'back' or 'side'; phase: walking phase in radians; arm_swing: amplitude.
    """
    draw = ImageDraw.Draw(img)
    side = view == 'side'
    sw = 0.26 * ph * ident['width'] * (0.7 if side else 1.)       # shoulder width
    head_d = ident['head'] * ph
    neck_y = top + head_d * 1.05
    waist_y = neck_y + ident['torso'] * ph
    hip_w = sw * 0.8
    foot_y = top + ph
    leg_w = 0.085 * ph * (1.15 if side else 1.)
    arm_w = 0.065 * ph
    stride = (0.16 if side else 0.05) * ph * np.sin(phase)

    # Backpack body behind the torso (seen in full from the back, as a side bulge otherwise).
    if ident['bag'] == 'backpack':
        bwid = sw * (0.8 if view == 'back' else 0.45)
        bx = cx if view == 'back' else cx + (1 if ident['bag_side'] else -1) * sw * 0.45
        if view != 'back':
            draw.rectangle([bx - bwid / 2, neck_y + 0.02 * ph, bx + bwid / 2, waist_y - 0.02 * ph],
                           fill=ident['bag_colour'])

    # Legs: trousers / shorts / skirt, swinging with the walking phase.
    hip_y = waist_y
    knee_frac = 0.5
    for s in (-1, 1):
        hx = cx + s * hip_w * 0.27
        fx = hx + s * stride + (0 if side else s * 0.02 * ph)
        if ident['bottom_type'] == 'trousers':
            _limb(draw, (hx, hip_y), (fx, foot_y - 0.03 * ph), leg_w, ident['bottom'])
        else:
            kx, ky = hx + (fx - hx) * knee_frac, hip_y + (foot_y - hip_y) * knee_frac
            _limb(draw, (hx, hip_y), (fx, foot_y - 0.03 * ph), leg_w * 0.8, ident['skin'])
            if ident['bottom_type'] == 'shorts':
                _limb(draw, (hx, hip_y), (kx, ky - 0.05 * ph), leg_w * 1.05, ident['bottom'])
        draw.ellipse([fx - leg_w * 0.7, foot_y - 0.05 * ph, fx + leg_w * 0.8, foot_y],
                     fill=ident['shoes'])
    if ident['bottom_type'] == 'skirt':
        sk = hip_y + 0.22 * ph
        draw.polygon([(cx - hip_w / 2, hip_y - 0.01 * ph), (cx + hip_w / 2, hip_y - 0.01 * ph),
                      (cx + hip_w * 0.75, sk), (cx - hip_w * 0.75, sk)], fill=ident['bottom'])
    else:
        draw.rectangle([cx - hip_w / 2, hip_y - 0.01 * ph, cx + hip_w / 2, hip_y + 0.05 * ph],
                       fill=ident['bottom'])

    # Torso with its pattern, pasted through a trapezoid mask.
    x0, x1 = int(cx - sw / 2), int(np.ceil(cx + sw / 2))
    y0, y1 = int(neck_y), int(np.ceil(waist_y + 0.02 * ph))
    bw, bh = max(1, x1 - x0), max(1, y1 - y0)
    patch = _pattern_patch(ident, ph, bw, bh, view == 'front')
    mask = Image.new('L', (bw, bh), 0)
    ImageDraw.Draw(mask).polygon([(0, 0.08 * bh), (0.15 * bw, 0), (0.85 * bw, 0), (bw, 0.08 * bh),
                                  (0.92 * bw, bh), (0.08 * bw, bh)], fill=255)
    img.paste(patch, (x0, y0), mask)
    if ident['bag'] == 'backpack':
        if view == 'back':
            bwid = sw * 0.5
            draw.rounded_rectangle([cx - bwid / 2, neck_y + 0.05 * ph, cx + bwid / 2, waist_y - 0.05 * ph],
                                   radius=max(1, int(0.02 * ph)), fill=ident['bag_colour'])
        elif view == 'front':
            for s in (-1, 1):
                sx = cx + s * sw * 0.28
                draw.line([(sx, neck_y), (sx, waist_y - 0.04 * ph)], fill=ident['bag_colour'],
                          width=max(1, int(0.025 * ph)))
    elif ident['bag'] == 'shoulder':
        s = 1 if ident['bag_side'] else -1
        draw.line([(cx - s * sw * 0.35, neck_y), (cx + s * sw * 0.5, waist_y)],
                  fill=ident['bag_colour'], width=max(1, int(0.02 * ph)))

    # Arms: sleeve colour to the elbow (short) or wrist (long), skin below; hands.
    sleeve = ident['top']
    for s in ((0,) if side else (-1, 1)):
        sx, sy = cx + s * (sw / 2 - arm_w * 0.4), neck_y + 0.03 * ph
        swing = arm_swing * np.sin(phase + np.pi * (s > 0)) * 0.12 * ph
        hx, hy = sx + swing + s * 0.02 * ph, sy + 0.34 * ph
        ex, ey = (sx + hx) / 2., (sy + hy) / 2.
        if ident['long_sleeves']:
            _limb(draw, (sx, sy), (hx, hy), arm_w, sleeve)
        else:
            _limb(draw, (ex, ey), (hx, hy), arm_w * 0.85, ident['skin'])
            _limb(draw, (sx, sy), (ex, ey), arm_w, sleeve)
        r = arm_w * 0.55
        draw.ellipse([hx - r, hy - r, hx + r, hy + r], fill=ident['skin'])
        if ident['bag'] == 'handbag' and (s == (1 if ident['bag_side'] else -1) or side):
            bs = 0.09 * ph
            draw.rectangle([hx - bs / 2, hy, hx + bs / 2, hy + bs * 0.9], fill=ident['bag_colour'])
    if ident['bag'] == 'shoulder':
        s = 1 if ident['bag_side'] else -1
        bx = cx + s * sw * 0.5
        bs = 0.11 * ph
        draw.rectangle([bx - bs / 2, waist_y - bs * 0.3, bx + bs / 2, waist_y + bs * 0.6],
                       fill=ident['bag_colour'])

    # Head, neck and hair.
    draw.rectangle([cx - head_d * 0.18, top + head_d * 0.8, cx + head_d * 0.18, neck_y + 0.01 * ph],
                   fill=ident['skin'])
    hw = head_d * 0.82
    head_box = [cx - hw / 2, top, cx + hw / 2, top + head_d]
    style = ident['hair_style']
    if style == 'long':
        draw.rectangle([cx - hw * 0.55, top + head_d * 0.3, cx + hw * 0.55, neck_y + 0.07 * ph],
                       fill=ident['hair'])
    draw.ellipse(head_box, fill=ident['hair'] if view == 'back' and style != 'bald' else ident['skin'])
    if style in ('short', 'long'):
        draw.chord([head_box[0] - 1, top - 1, head_box[2] + 1, top + head_d * 0.85], 180, 360,
                   fill=ident['hair'])
    elif style == 'cap':
        draw.chord([head_box[0] - 1, top - 1, head_box[2] + 1, top + head_d * 0.9], 180, 360,
                   fill=ident['cap'])
        bx = hw * 0.45 if side else hw * 0.3
        draw.rectangle([cx - bx, top + head_d * 0.35, cx + bx + (hw * 0.3 if side else 0),
                        top + head_d * 0.45], fill=ident['cap'])


def _photometric(img, cam, rng):
    """Camera lighting (brightness, contrast, gamma), colour cast and sensor noise, on uint8 RGB.
    The pointwise part is one 256-entry look-up table per channel."""
    gain = np.asarray(cam['cast']) * rng.uniform(0.96, 1.04, size=3)
    v = (np.arange(256) / 255.) ** (cam['gamma'] * rng.uniform(0.95, 1.05))
    v = (v - 0.5) * cam['contrast'] + 0.5 + cam['brightness'] + rng.uniform(-0.03, 0.03)
    lut = np.clip(np.round(gain[:, None] * v[None, :] * 255.), 0, 255).astype(np.uint8)  # [3, 256]
    x = lut[np.arange(3), np.asarray(img)]  # [h, w, 3]
    if cam['noise'] > 0:
        x = x + np.round(rng.standard_normal(x.shape, np.float32) * cam['noise']).astype(np.int16)
        x = np.clip(x, 0, 255).astype(np.uint8)
    return Image.fromarray(x)


def _occlude(img, cam, rng):
    """Cover a band at the bottom or one side with a foreground object (car, pole, passer-by)."""
    w, h = img.size
    draw = ImageDraw.Draw(img)
    colour = cam['clutter'][rng.integers(len(cam['clutter']))]
    where = rng.integers(3)
    if where == 0:
        y0 = h * rng.uniform(0.65, 0.85)
        draw.rectangle([0, y0, w, h], fill=colour)
    else:
        bw = w * rng.uniform(0.15, 0.35)
        x0 = 0 if where == 1 else w - bw
        draw.rectangle([x0, h * rng.uniform(0., 0.5), x0 + bw, h], fill=colour)


def box_iou(dx, dy, k):
    """IoU of the hand-drawn box, the unit square centred at (0.5, 0.5), with a box of the same
    aspect ratio scaled by k and centred at (0.5 + dx, 0.5 + dy) (dx in widths, dy in heights;
    IoU is invariant to scaling either axis, so the units do not matter)."""
    ox = max(0., min(0.5, dx + k / 2.) - max(-0.5, dx - k / 2.))
    oy = max(0., min(0.5, dy + k / 2.) - max(-0.5, dy - k / 2.))
    inter = ox * oy
    return inter / (1. + k * k - inter)


def sample_box(rng, cam, box):
    """Crop box relative to the person's hand-drawn box: (dx, dy, k) = centre offset in box widths /
    heights and scale factor, with the IoU rule of Market-1501's annotation (see DETECTOR).

    box: 'hand' (annotator's box: query / gt_bbox), 'detected' (IoU > 0.5: training and gallery),
    'junk' (0.2 <= IoU <= 0.5) or 'distractor' (IoU < 0.2 but overlapping the person).
    """
    d = DETECTOR
    if box == 'hand':
        s = d['hand_sigma']
        return rng.normal(0., s), rng.normal(0., s), float(np.exp(rng.normal(0., s)))
    for _ in range(1000):
        if box == 'detected' and rng.random() >= d['poor_prob']:
            dx = rng.normal(0., d['sigma_x'])
            dy = cam['shift'] + rng.normal(0., d['sigma_y'])
            k = cam['scale'] * float(np.exp(rng.normal(0., d['sigma_log_scale'])))
        else:
            # Poor detections: any box within the offsets and scales the IoU rule can admit; the
            # rule below decides whether it counts as detected, junk or distractor.
            span, k_max = (d['poor_span'], d['poor_scale']) if box == 'detected' else (1., 2.)
            dx = rng.uniform(-span, span)
            dy = cam['shift'] + rng.uniform(-span, span)
            k = float(np.exp(rng.uniform(-np.log(k_max), np.log(k_max))))
        iou = box_iou(dx, dy, k)
        if ((box == 'detected' and iou > d['good_iou']) or
                (box == 'junk' and d['distractor_iou'] <= iou <= d['good_iou']) or
                (box == 'distractor' and 0.02 < iou < d['distractor_iou'])):
            return dx, dy, k
    raise RuntimeError('no {} box found in 1000 draws'.format(box))  # not reached with DETECTOR


def render_image(ident, cam, rng, im_size=(128, 64), supersample=2, box='detected'):
    """One crop of `ident` seen by camera `cam`, as a PIL RGB image of size im_size (h, w).

    box: how the crop was boxed, see sample_box: 'hand' for Market's hand-drawn query / gt_bbox
    images, 'detected' for the detector's training and gallery images, 'junk' / 'distractor' for
    the poor detections Market keeps as junk (-1) and distractors (0000).
    """
    h, w = im_size
    H, W = h * supersample, w * supersample
    img = _background(cam, rng, H, W)
    # The annotator's box holds the whole person with a small margin above and below; the crop is
    # that box moved by (dx, dy) and scaled by k, so the body lands at different rows in
    # different crops, or is cut (head or legs outside the crop) when the box slides off it.
    m_top, m_bottom = rng.uniform(*DETECTOR['hand_margin'], size=2)
    dx, dy, k = sample_box(rng, cam, box)
    y0, x0 = 0.5 + dy - k / 2., 0.5 + dx - k / 2.      # crop's top-left in hand-box units
    top = H * (m_top - y0) / k
    ph = H * (1. - m_top - m_bottom) / k
    cx = W * (0.5 - x0) / k
    view = 'front' if rng.random() < cam['front_prob'] else 'back'
    if rng.random() < 0.1:
        view = 'side'
    _draw_person(img, ident, cx, top, ph, view, rng.uniform(0, 2 * np.pi), rng.uniform(0.3, 1.))
    if rng.random() < DETECTOR['occlusion_prob']:
        _occlude(img, cam, rng)
    img = img.resize((w, h), Image.BILINEAR)
    if rng.random() < cam['blur_prob']:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.0)))
    img = _photometric(img, cam, rng)
    if rng.random() < 0.5:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    return img


def _render_job(job):
    """Worker: render and save one image. job = (path, seed, pid, cam, kind, idx, im_size, quality)."""
    path, seed, pid, cam_id, kind, idx, im_size, quality = job
    cam = make_camera(seed, cam_id)
    if kind in ('distractor', 'junk'):
        # Poor detections of people outside the labelled set, boxed by Market's IoU rule.
        rng = _rng(seed, _DISTRACTOR if kind == 'distractor' else _JUNK, idx)
        ident = make_identity(seed, (100000 if kind == 'distractor' else 200000) + idx)
        img = render_image(ident, cam, rng, im_size, box=kind)
    else:
        # As in Market-1501: queries and gt_bbox are hand-drawn, training and gallery detected.
        rng = _rng(seed, _IMAGE, pid, cam_id, kind, idx)
        img = render_image(make_identity(seed, pid), cam, rng, im_size,
                           box='hand' if kind in (KIND_QUERY, KIND_MQ) else 'detected')
    img.save(path, format='JPEG', quality=quality)


def _market_name(pid, cam, seq, frame, bbox):
    return '{}_c{}s{}_{:06d}_{:02d}.jpg'.format('-1' if pid < 0 else '{:04d}'.format(pid),
                                               cam, seq, frame, bbox)


def _plan(num_train_ids, num_test_ids, ims_per_id_cam, num_cams, seed, num_distractors,
          num_junk, mq_per_query, min_cams, max_cams):
    """The whole tree in a fixed order: ([(subdir, file name, pid, cam, kind, index)], train ids,
    test ids). Names are unique across the tree except that each query is repeated in gt_bbox/."""
    split = _rng(seed, _SPLIT)
    pids = split.permutation(np.arange(1, num_train_ids + num_test_ids + 1))
    train_ids = sorted(int(p) for p in pids[:num_train_ids])
    test_ids = sorted(int(p) for p in pids[num_train_ids:])
    items = []
    used = set()

    def track(pid, n):
        """Camera set and per camera a sequence number plus n distinct (frame, bbox) slots."""
        rng = _rng(seed, _TRACK, pid)
        k = int(rng.integers(min_cams, max_cams + 1))
        cams = sorted(int(c) for c in rng.choice(np.arange(1, num_cams + 1), size=k, replace=False))
        out = {}
        for c in cams:
            seq = int(rng.integers(1, 7))
            frames = int(rng.integers(0, 150000)) + np.cumsum(rng.integers(5, 40, size=n))
            out[c] = (seq, [int(f) for f in frames], [int(b) for b in rng.integers(1, 9, size=n)])
        return out

    for pid in train_ids:
        for c, (seq, frames, bboxes) in track(pid, ims_per_id_cam).items():
            for i in range(ims_per_id_cam):
                items.append(('bounding_box_train', _market_name(pid, c, seq, frames[i], bboxes[i]),
                              pid, c, KIND_TRAIN, i))
    n = ims_per_id_cam + 1 + mq_per_query
    for pid in test_ids:
        for c, (seq, frames, bboxes) in track(pid, n).items():
            names = [_market_name(pid, c, seq, f, b) for f, b in zip(frames, bboxes)]
            for i in range(ims_per_id_cam):
                items.append(('bounding_box_test', names[i], pid, c, KIND_GALLERY, i))
            # As in Market-1501 the query is one of the hand-drawn gt_bbox boxes of its (id, cam).
            items.append(('query', names[ims_per_id_cam], pid, c, KIND_QUERY, 0))
            items.append(('gt_bbox', names[ims_per_id_cam], pid, c, KIND_QUERY, 0))
            for i in range(mq_per_query):
                items.append(('gt_bbox', names[ims_per_id_cam + 1 + i], pid, c, KIND_MQ, i))
    for kind, pid, count in (('distractor', 0, num_distractors), ('junk', -1, num_junk)):
        rng = _rng(seed, _DISTRACTOR if kind == 'distractor' else _JUNK, 10 ** 6)
        cams = rng.integers(1, num_cams + 1, size=count)
        frames = rng.integers(0, 200000, size=count)
        for i in range(count):
            name = _market_name(pid, int(cams[i]), int(rng.integers(1, 7)), int(frames[i]), i % 100)
            while name in used:
                frames[i] += 1
                name = _market_name(pid, int(cams[i]), 1, int(frames[i]), i % 100)
            used.add(name)
            items.append(('bounding_box_test', name, pid, int(cams[i]), kind, i))
    return items, train_ids, test_ids


RENDER_MARK = 'rendered.json'  # written last into a complete tree: the settings it was rendered with


def render_settings(num_train_ids=200, num_test_ids=200, ims_per_id_cam=4, num_cams=6, im_size=(128, 64), seed=0,
                    num_distractors=None, num_junk=None, mq_per_query=2, min_cams=2, max_cams=None, jpeg_quality=90):
    """The arguments of render_market_tree checked and resolved (defaults filled in): a dict that the
    tree's completion mark records, so that a rerun can tell whether a tree is the one it would render.
    ValueError naming the argument."""
    h, w = im_size
    if num_cams < 2 or num_cams > 9:
        raise ValueError('num_cams must be in 2..9 (Market names hold one camera digit), got {}'
                         .format(num_cams))
    max_cams = num_cams if max_cams is None else max_cams
    if not 2 <= min_cams <= max_cams <= num_cams:
        raise ValueError('need 2 <= min_cams <= max_cams <= num_cams, got min_cams={} max_cams={} '
                         'num_cams={}'.format(min_cams, max_cams, num_cams))
    if num_train_ids < 1 or num_test_ids < 1 or num_train_ids + num_test_ids > 9999:
        raise ValueError('need num_train_ids >= 1, num_test_ids >= 1 and at most 9999 ids in all '
                         '(4-digit Market ids), got {} + {}'.format(num_train_ids, num_test_ids))
    if ims_per_id_cam < 1:
        raise ValueError('ims_per_id_cam must be >= 1, got {}'.format(ims_per_id_cam))
    if h < 16 or w < 8:
        raise ValueError('im_size must be at least (16, 8), got {}'.format(im_size))
    expected_gallery = num_test_ids * ims_per_id_cam * (min_cams + max_cams) // 2
    return dict(num_train_ids=num_train_ids, num_test_ids=num_test_ids, ims_per_id_cam=ims_per_id_cam,
                num_cams=num_cams, im_size=[int(h), int(w)], seed=seed,
                num_distractors=expected_gallery // 10 if num_distractors is None else num_distractors,
                num_junk=expected_gallery // 20 if num_junk is None else num_junk, mq_per_query=mq_per_query,
                min_cams=min_cams, max_cams=max_cams, jpeg_quality=jpeg_quality)


def _leftovers(out_dir):
    out_dir = os.path.abspath(out_dir)
    return out_dir + '.partial', out_dir + '.old'


def remove_render_leftovers(out_dir):
    """Removes what an interrupted render_market_tree of `out_dir` can leave beside it (the tree being
    rendered, <out_dir>.partial, or the tree being replaced, <out_dir>.old). Returns the paths removed."""
    removed = []
    for path in _leftovers(out_dir):
        if os.path.lexists(path):
            shutil.rmtree(path)
            removed.append(path)
    return removed


def render_state(out_dir):
    """What `out_dir` holds: ('absent', None) no tree; ('complete', mark) a tree render_market_tree finished,
    with its mark {'settings': render_settings(...), 'counts': ...}; ('unmarked', None) Market-layout
    folders without the mark (a render cut short by a hard kill, or made by older code)."""
    mark = os.path.join(out_dir, RENDER_MARK)
    if os.path.isfile(mark):
        with open(mark) as f:
            return 'complete', json.load(f)
    if any(os.path.isdir(os.path.join(out_dir, d)) for d in SUBDIRS):
        return 'unmarked', None
    return 'absent', None


def _ignore_interrupts():
    """Render workers leave Ctrl-C to the parent, which cancels the rest and cleans up."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def render_market_tree(out_dir, num_train_ids=200, num_test_ids=200, ims_per_id_cam=4, num_cams=6,
                       im_size=(128, 64), seed=0, num_distractors=None, num_junk=None,
                       mq_per_query=2, min_cams=2, max_cams=None, jpeg_quality=90, workers=1,
                       overwrite=False):
    """Render a synthetic dataset into out_dir in the Market-1501 layout; return a dict of counts.

    out_dir/bounding_box_train/  ims_per_id_cam images per (train id, camera it is seen by)
    out_dir/bounding_box_test/   same for the test ids, plus distractors 0000_* and junk -1_*
    out_dir/query/               one image per (test id, camera it is seen by)
    out_dir/gt_bbox/             the query image and mq_per_query more per query (id, camera)
    out_dir/rendered.json        written last: the settings (render_settings) and the counts
    Names follow Market: '0002_c1s1_000451_03.jpg' = id, camera, sequence, frame, box index.
    Each id is seen by min_cams..max_cams (default num_cams) cameras, so every query has a gallery
    match in another camera. Output bytes depend only on the arguments (not on `workers`).
    num_distractors / num_junk default to 10% / 5% of the test gallery.
    The tree is rendered into <out_dir>.partial and moved in when complete (signals wait during the
    moves), so an interrupted run leaves no tree that passes for complete (render_state).
    """
    settings = render_settings(num_train_ids, num_test_ids, ims_per_id_cam, num_cams, im_size, seed,
                               num_distractors, num_junk, mq_per_query, min_cams, max_cams, jpeg_quality)
    state, _ = render_state(out_dir)
    if state != 'absent' and not overwrite:
        raise FileExistsError('{} already holds {}; pass overwrite=True (--overwrite) to re-render'.format(
            out_dir, ', '.join(d for d in SUBDIRS + (RENDER_MARK,) if os.path.exists(os.path.join(out_dir, d)))))
    remove_render_leftovers(out_dir)
    partial, old = _leftovers(out_dir)
    items, train_ids, test_ids = _plan(num_train_ids, num_test_ids, ims_per_id_cam, num_cams, seed,
                                       settings['num_distractors'], settings['num_junk'], mq_per_query,
                                       min_cams, settings['max_cams'])
    jobs = [(os.path.join(partial, sub, name), seed, pid, cam, kind, idx, tuple(settings['im_size']), jpeg_quality)
            for sub, name, pid, cam, kind, idx in items]
    try:
        for d in SUBDIRS:
            os.makedirs(os.path.join(partial, d))
        if workers > 1:
            pool = ProcessPoolExecutor(workers, initializer=_ignore_interrupts)
            with signals_deferred():          # the workers are forked at the first submit (see signals)
                pool.submit(int)
            try:
                list(pool.map(_render_job, jobs, chunksize=64))
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
        else:
            for job in jobs:
                _render_job(job)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise

    per_dir = {d: 0 for d in SUBDIRS}
    for sub, *_ in items:
        per_dir[sub] += 1
    counts = {
        'num_train_ids': len(train_ids),
        'num_train_images': per_dir['bounding_box_train'],
        'num_test_ids': len(test_ids),
        'num_gallery_images': per_dir['bounding_box_test'],
        'num_distractors': settings['num_distractors'],
        'num_junk': settings['num_junk'],
        'num_query_images': per_dir['query'],
        'num_gt_bbox_images': per_dir['gt_bbox'],
    }
    with open(os.path.join(partial, RENDER_MARK), 'w') as f:
        json.dump({'settings': settings, 'counts': counts}, f, indent=1, sort_keys=True)
    os.makedirs(out_dir, exist_ok=True)
    os.makedirs(old)
    with signals_deferred():  # the mark goes first and comes back last: a tree between the two is unmarked
        for name in (RENDER_MARK,) + SUBDIRS:
            if os.path.lexists(os.path.join(out_dir, name)):
                os.replace(os.path.join(out_dir, name), os.path.join(old, name))
        for name in SUBDIRS + (RENDER_MARK,):
            os.replace(os.path.join(partial, name), os.path.join(out_dir, name))
    remove_render_leftovers(out_dir)
    return counts
