"""Training augmentation (random crop, horizontal flip, random erasing, normalisation) whose
randomness is a function of (seed, epoch, step, slot in the global batch) alone, applied either per
image in loader workers (PIL) or per batch on the device, plus the in-memory training set that
feeds the batched path."""
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Columns of the uniform draws of one image: flip, crop, crop x, crop y, erase, then the erasing
# attempts (area, log aspect ratio, top, left for each).
_FLIP, _CROP, _CROP_X, _CROP_Y, _ERASE, _ATTEMPTS = 0, 1, 2, 3, 4, 5
ERASE_ATTEMPTS = 10
NUM_DRAWS = _ATTEMPTS + 4 * ERASE_ATTEMPTS
# Random erasing as Zhong et al. ("Random Erasing Data Augmentation", AAAI 2020) and torchvision:
# area 2-33 % of the image, aspect ratio 0.3-3.3, up to ten tries to fit, erased to 0 after
# normalisation (the mean colour).
ERASE_AREA = (0.02, 0.33)
ERASE_LOG_RATIO = (float(np.log(0.3)), float(np.log(1 / 0.3)))


def draws(seed, epoch, step, rows):
    """Uniform draws [rows, NUM_DRAWS] in [0, 1) for the first `rows` slots of a batch.

    Row s depends only on (seed, epoch, step, s): numpy fills the matrix row by row from one
    generator keyed by (seed, epoch, step), so a shorter matrix is a prefix of a longer one.
    Neither the worker count, nor which worker or process draws, nor the batch size matter."""
    return np.random.default_rng([seed, epoch, step]).random((rows, NUM_DRAWS))


def crop_boxes(u, prob, ratio, width, height):
    """Crop windows (x0, y0, w, h) [B, 4] int for draws u [B, NUM_DRAWS] on images of the given
    size (scalars or [B] arrays). Images that are not cropped get the whole image."""
    width, height = np.broadcast_to(width, len(u)), np.broadcast_to(height, len(u))
    on = (u[:, _CROP] < prob) & (ratio < 1)
    cw = np.where(on, np.maximum(1, np.round(width * ratio)), width).astype(np.int64)
    ch = np.where(on, np.maximum(1, np.round(height * ratio)), height).astype(np.int64)
    x0 = np.floor(u[:, _CROP_X] * (width - cw + 1)).astype(np.int64) * on
    y0 = np.floor(u[:, _CROP_Y] * (height - ch + 1)).astype(np.int64) * on
    return np.stack([x0, y0, cw, ch], 1)


def erase_boxes(u, prob, height, width):
    """Erased rectangles (top, left, h, w) [B, 4] int on a height x width image; h = w = 0 where
    nothing is erased. The first of the attempts whose rectangle fits inside the image is used."""
    B = len(u)
    att = u[:, _ATTEMPTS:].reshape(B, ERASE_ATTEMPTS, 4)
    area = height * width * (ERASE_AREA[0] + (ERASE_AREA[1] - ERASE_AREA[0]) * att[..., 0])
    ratio = np.exp(ERASE_LOG_RATIO[0] + (ERASE_LOG_RATIO[1] - ERASE_LOG_RATIO[0]) * att[..., 1])
    eh = np.round(np.sqrt(area * ratio)).astype(np.int64)       # [B, attempts]
    ew = np.round(np.sqrt(area / ratio)).astype(np.int64)
    fits = (eh < height) & (ew < width) & (eh > 0) & (ew > 0)
    first = fits.argmax(1)
    on = (u[:, _ERASE] < prob) & fits.any(1)
    rows = np.arange(B)
    eh, ew = eh[rows, first] * on, ew[rows, first] * on
    top = np.floor(att[rows, first, 2] * (height - eh + 1)).astype(np.int64) * on
    left = np.floor(att[rows, first, 3] * (width - ew + 1)).astype(np.int64) * on
    return np.stack([top, left, eh, ew], 1)


class Augment:
    """The training augmentation of one run: resize to `size` (h, w), a random crop of `crop_ratio`
    x the sides with probability `crop_prob` (resized back), a horizontal flip with probability 1/2
    (`flip`), normalisation by mean / std, random erasing with probability `random_erasing`.

    `image(im, epoch, step, slot)` augments one PIL image (loader workers); `batch(u8, epoch, step,
    first_slot)` a batch of uint8 images [B, 3, h, w] already at `size`, on their device. Both take
    their randomness from `draws(seed, epoch, step, ...)` and agree pixel for pixel up to uint8
    rounding, except where a crop is taken: from the original image and resized by PIL in the first,
    from the stored resized image by `grid_sample` in the second (whose edge pixels blend in the
    neighbours just outside the window)."""

    def __init__(self, size, flip=True, crop_prob=0., crop_ratio=1., random_erasing=0., seed=0,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD):
        if not 0 <= crop_prob <= 1 or not 0 < crop_ratio <= 1 or not 0 <= random_erasing <= 1:
            raise ValueError("crop_prob and random_erasing must lie in [0, 1], crop_ratio in (0, 1]")
        self.size = tuple(int(s) for s in size)
        self.flip, self.crop_prob, self.crop_ratio = flip, crop_prob, crop_ratio
        self.random_erasing, self.seed = random_erasing, seed
        self.mean, self.std = tuple(mean), tuple(std)

    def _flips(self, u):
        return (u[:, _FLIP] < 0.5) & self.flip

    def image(self, im, epoch, step, slot):
        """PIL image -> normalised float tensor [3, h, w] for global batch slot `slot`."""
        u = draws(self.seed, epoch, step, slot + 1)[slot:]
        h, w = self.size
        x0, y0, cw, ch = crop_boxes(u, self.crop_prob, self.crop_ratio, im.size[0], im.size[1])[0]
        if (cw, ch) != im.size:
            im = im.crop((int(x0), int(y0), int(x0 + cw), int(y0 + ch)))
        im = im.resize((w, h), Image.BILINEAR)
        if self._flips(u)[0]:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.asarray(im, dtype=np.float32).transpose(2, 0, 1).copy())  # [3, h, w]
        x = normalize_(x, self.mean, self.std)
        top, left, eh, ew = erase_boxes(u, self.random_erasing, h, w)[0]
        x[:, top:top + eh, left:left + ew] = 0
        return x

    def batch(self, u8, epoch, step, first_slot=0):
        """uint8 images [B, 3, h, w] (at `size`, on any device) -> normalised float [B, 3, h, w] for
        global batch slots first_slot .. first_slot + B - 1. One host-to-device copy of the
        parameters (from pinned memory on CUDA, so the host does not wait), no device-to-host read."""
        B, _, h, w = u8.shape
        if (h, w) != self.size:
            raise ValueError(f"Augment.batch: images are {h} x {w}, expected {self.size[0]} x {self.size[1]}")
        u = draws(self.seed, epoch, step, first_slot + B)[first_slot:]
        crop = crop_boxes(u, self.crop_prob, self.crop_ratio, w, h).astype(np.float64)
        flips = self._flips(u)
        # Affine map of the output grid (-1..1, pixel edges) onto the crop window of the input:
        # centre and half-extent per axis; a flip negates the horizontal half-extent.
        cx = -1 + (2 * crop[:, 0] + crop[:, 2]) / w
        cy = -1 + (2 * crop[:, 1] + crop[:, 3]) / h
        sx = crop[:, 2] / w * np.where(flips, -1., 1.)
        sy = crop[:, 3] / h
        erase = erase_boxes(u, self.random_erasing, h, w)
        params = np.concatenate([np.stack([sx, cx, sy, cy], 1), erase], 1).astype(np.float32)
        params = torch.from_numpy(params)
        if u8.device.type == "cuda":
            params = params.pin_memory()
        params = params.to(u8.device, non_blocking=True)                    # [B, 8]
        x = u8.float()
        if (crop[:, 2] != w).any() or (crop[:, 3] != h).any():
            zero = params.new_zeros(B)
            theta = torch.stack([torch.stack([params[:, 0], zero, params[:, 1]], 1),
                                 torch.stack([zero, params[:, 2], params[:, 3]], 1)], 1)  # [B, 2, 3]
            grid = F.affine_grid(theta, [B, 3, h, w], align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        elif flips.any():
            x = torch.where((params[:, 0] < 0)[:, None, None, None], x.flip(3), x)
        x = normalize_(x, self.mean, self.std)
        if erase[:, 2].any():
            rows = torch.arange(h, device=x.device, dtype=torch.float32)[None, :, None]   # [1, h, 1]
            cols = torch.arange(w, device=x.device, dtype=torch.float32)[None, None, :]   # [1, 1, w]
            top, left, eh, ew = (params[:, 4 + i, None, None] for i in range(4))          # [B, 1, 1]
            mask = (rows >= top) & (rows < top + eh) & (cols >= left) & (cols < left + ew)  # [B, h, w]
            x = x.masked_fill(mask[:, None], 0.)
        return x


def normalize_(x, mean, std):
    """0..255 float images [..., 3, h, w] -> (x / 255 - mean) / std, in place; returns x."""
    for c in range(3):  # scalar operands: nothing to copy to the device
        x[..., c, :, :].mul_(1 / (255. * std[c])).sub_(mean[c] / std[c])
    return x


def training_set_bytes(num_images, size):
    """Bytes of `num_images` decoded uint8 images of `size` (h, w)."""
    return int(num_images) * 3 * int(size[0]) * int(size[1])
