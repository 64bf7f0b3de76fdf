"""Procedural, text-free PNG images whose measurable properties are set by latent variables.

The five latent properties (each in [0, 1]) are the ones SMP 2019's image
features measure: brightness, contrast, hue count, colour entropy and how far
the main subject sits from the centre. The engagement model uses the same
latents, so a model that measures them well from pixels can recover that part
of engagement.
"""

from __future__ import annotations

import colorsys
import io

import numpy as np
from PIL import Image, ImageDraw


def draw_image(props: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """An RGB uint8 image (size × size × 3) for latent ``props`` = (brightness, contrast, hues, entropy, off_centre)."""
    brightness, contrast, hue_level, entropy, off_centre = (float(p) for p in props)
    n_hues = 1 + int(hue_level * 5.999)
    base = rng.random()
    hues = (base + np.arange(n_hues) / n_hues + rng.normal(0, 0.02, n_hues)) % 1.0
    palette = [
        tuple(int(255 * c) for c in colorsys.hsv_to_rgb(h, 0.45 + 0.5 * rng.random(), 0.45 + 0.55 * rng.random()))
        for h in hues
    ]

    # Background: a vertical gradient between two palette colours.
    top, bottom = np.array(palette[0], float), np.array(palette[-1], float) * 0.6
    t = np.linspace(0, 1, size)[:, None, None]
    canvas = Image.fromarray(np.broadcast_to(top * (1 - t) + bottom * t, (size, size, 3)).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)

    # Clutter: more shapes (and so more colour entropy) as entropy rises.
    for _ in range(1 + int(entropy * 12)):
        x0, y0 = rng.integers(0, size, 2)
        w, h = rng.integers(size // 12, size // 3, 2)
        colour = palette[rng.integers(0, n_hues)]
        box = (int(x0), int(y0), int(x0 + w), int(y0 + h))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)

    # The subject: a large disc displaced from the centre by off_centre.
    angle = rng.random() * 2 * np.pi
    cx = size * (0.5 + 0.4 * off_centre * np.cos(angle))
    cy = size * (0.5 + 0.4 * off_centre * np.sin(angle))
    r = size * 0.18
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=palette[-1 if n_hues > 1 else 0], outline=(250, 250, 250))

    pixels = np.asarray(canvas, dtype=float)
    pixels += rng.normal(0, 1, pixels.shape[:2])[..., None] * (4 + 30 * entropy)  # texture
    # Set global contrast and brightness last, so they follow the latents.
    luminance = pixels.mean(axis=2, keepdims=True)
    pixels = (pixels - luminance.mean()) / (luminance.std() + 1e-6) * (12 + 60 * contrast) + 45 + 165 * brightness
    return np.clip(pixels, 0, 255).astype(np.uint8)


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", optimize=False)
    return buf.getvalue()
