"""The five high-level image features of SMP 2019 (after Ke et al., "The design of high-level
features for photo quality assessment"), computed from decoded RGB pixels with numpy.

- clarity_contrast: share of spectral energy at high spatial frequencies (sharp, detailed images score high);
- hue_count: number of well-populated hue bins among saturated, mid-brightness pixels (simple images score low);
- brightness_contrast: spread of the brightness (V) channel;
- colour_entropy: Shannon entropy (bits) of the 8×8×8 colour histogram;
- composition_offset: distance of the salient-mass centroid from the image centre, as a fraction of the half-diagonal.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

IMAGE_STAT_COLUMNS = ["clarity_contrast", "hue_count", "brightness_contrast", "colour_entropy", "composition_offset"]


MAX_PIXELS = 40_000_000  # 40 MP (a 48 MP phone photo is rare in posts): a 9000×9000 PNG of 252 KiB cost 3.4 s


def decode(data: bytes, size: int | None = 128) -> np.ndarray:
    """Bytes → RGB uint8 array (optionally resized so statistics are comparable across sizes). An image over
    ``MAX_PIXELS`` is refused from its header, before a pixel is decoded."""
    with Image.open(io.BytesIO(data)) as im:
        if im.width * im.height > MAX_PIXELS:
            raise ValueError(f"image of {im.width}×{im.height} pixels is over the {MAX_PIXELS:,}-pixel limit")
        im = im.convert("RGB")
        if size is not None:
            im = im.resize((size, size), Image.BILINEAR)
        return np.asarray(im)


def _channels(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """R, G, B as contiguous float64 planes. Reductions over the 3-long colour axis (``max(axis=2)``, ``mean``,
    ``norm``) cost numpy ~0.5 ms each on a 128×128 image; on planes they are elementwise, with the same result
    bit for bit (a sum over three is the same left-to-right sum). With the HSV and median below: image_stats
    6.1 → 3.4 ms a photo, bit-identical on random, grey, tied and drawn images."""
    x = np.moveaxis(rgb, 2, 0).astype(np.float64)
    return x[0], x[1], x[2]


def _hsv(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r, g, b = (c / 255.0 for c in _channels(rgb))
    mx, mn = np.maximum(np.maximum(r, g), b), np.minimum(np.minimum(r, g), b)
    delta = mx - mn
    nz = delta > 1e-9
    rm = nz & (mx == r)
    gm = nz & (mx == g) & ~rm
    bm = nz & ~rm & ~gm
    # Each sector's formula over the whole plane, then picked per pixel: the same values as assigning through
    # boolean masks (elementwise either way), without the nine masked gathers and scatters.
    d = np.where(nz, delta, 1.0)
    # (g - b) / d lies in [-1, 1] (|g - b| <= max - min, and rounding keeps the order), where x % 6 is x, or
    # x + 6 below zero: the same numbers as np.remainder's fmod-and-adjust, at a tenth of its 0.38 ms.
    red_sector = (g - b) / d
    red_sector = np.where(red_sector < 0, red_sector + 6, red_sector)
    hue = np.where(rm, red_sector, np.where(gm, (b - r) / d + 2, np.where(bm, (r - g) / d + 4, 0.0)))
    sat = np.where(mx > 0, delta / np.maximum(mx, 1e-9), 0.0)
    return hue / 6.0, sat, mx


def image_stats(rgb: np.ndarray) -> np.ndarray:
    """The five features for one RGB image, as float32 in IMAGE_STAT_COLUMNS order."""
    red, green, blue = _channels(rgb)
    gray = (red + green + blue) / 3
    h, w = gray.shape

    spectrum = np.abs(np.fft.fftshift(np.fft.fft2(gray - gray.mean())))
    yy, xx = np.mgrid[0:h, 0:w]
    radius = np.hypot((yy - h / 2) / (h / 2), (xx - w / 2) / (w / 2))
    clarity = spectrum[radius > 0.25].sum() / max(spectrum.sum(), 1e-9)

    hue, sat, val = _hsv(rgb)
    usable = (sat > 0.2) & (val > 0.15) & (val < 0.95)
    hist = np.histogram(hue[usable], bins=20, range=(0, 1))[0].astype(np.float64)
    hue_count = float((hist > 0.05 * hist.max()).sum()) if hist.max() > 0 else 0.0

    brightness_contrast = float(val.std())

    q = (rgb // 32).astype(np.int64)
    codes = q[..., 0] * 64 + q[..., 1] * 8 + q[..., 2]
    p = np.bincount(codes.ravel(), minlength=512).astype(np.float64)
    p = p[p > 0] / p.sum()
    entropy = float(-(p * np.log2(p)).sum())

    # Salient mass: pixels far from the median colour, weighted by that distance.
    mr, mg, mb = (np.median(plane) for plane in np.moveaxis(rgb, 2, 0))  # a contiguous plane each: 0.45 → 0.2 ms
    dr, dg, db = red - mr, green - mg, blue - mb
    dist = np.sqrt(dr * dr + dg * dg + db * db)
    weight = np.where(dist > np.percentile(dist, 75), dist, 0.0)
    if weight.sum() > 0:
        cy, cx = (yy * weight).sum() / weight.sum(), (xx * weight).sum() / weight.sum()
        offset = float(np.hypot((cy - h / 2) / (h / 2), (cx - w / 2) / (w / 2)) / np.sqrt(2))
    else:
        offset = 0.0
    return np.array([clarity, hue_count, brightness_contrast, entropy, offset], dtype=np.float32)
