"""Synthetic images for the demo and the tests: real JPEG files whose class is a shape family.

As in real images, the category is carried by shape and texture, not colour: every instance
gets a random colour, scale, aspect and position on a cluttered background. MoCo v2's aug+
(colour jitter, grayscale) makes features colour-invariant, so colour-coded classes would
reward exactly what it teaches to ignore. :func:`draw_family` also draws the objects of the
demo's detection tree (:mod:`moco_d2.detection.data.synthetic`), so that pretraining and
fine-tuning see the same visual world.
"""

import os

import numpy as np
from PIL import Image, ImageDraw

FAMILIES = ("ellipse", "rectangle", "triangle", "ring", "cross", "diamond", "stripes", "checker")
Box = tuple[float, float, float, float]  # x0, y0, x1, y1; x1, y1 exclusive


def random_colour(rng: np.random.Generator, away_from: tuple[int, ...] | None = None) -> tuple:
    """A random RGB colour, at least 96 apart (L1) from ``away_from`` so that it stays visible."""
    while True:
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        if away_from is None or sum(abs(a - b) for a, b in zip(colour, away_from)) >= 96:
            return colour


def cluttered_background(size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A flat random colour with thin lines and small dots of other colours: clutter that is
    no family's instance."""
    background = random_colour(rng)
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    w, h = size
    for _ in range(int(rng.integers(2, 6))):
        x0, x1 = rng.uniform(0, w, 2)
        y0, y1 = rng.uniform(0, h, 2)
        draw.line([(x0, y0), (x1, y1)], fill=random_colour(rng, background), width=1)
    for _ in range(int(rng.integers(2, 6))):
        x, y, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(1, max(w, h) / 40 + 1)
        draw.ellipse([x - r, y - r, x + r, y + r], fill=random_colour(rng, background))
    return image


def draw_family(image: Image.Image, family: int, box: Box, rng: np.random.Generator) -> None:
    """An instance of ``FAMILIES[family]`` filling ``box``, in a colour apart from the pixel at
    the box's centre (the background there)."""
    x0, y0, x1, y1 = box[0], box[1], box[2] - 1, box[3] - 1
    cx, cy, w, h = (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0
    centre = image.getpixel((int(cx), int(cy)))
    colour = random_colour(rng, centre if isinstance(centre, tuple) else None)
    draw = ImageDraw.Draw(image)
    bar = max(1.0, min(w, h) / 6)
    name = FAMILIES[family]
    if name == "ellipse":
        draw.ellipse((x0, y0, x1, y1), fill=colour)
    elif name == "rectangle":
        draw.rectangle((x0, y0, x1, y1), fill=colour)
    elif name == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=colour)
    elif name == "ring":
        draw.ellipse((x0, y0, x1, y1), outline=colour, width=int(bar))
    elif name == "cross":
        draw.rectangle((cx - bar, y0, cx + bar, y1), fill=colour)
        draw.rectangle((x0, cy - bar, x1, cy + bar), fill=colour)
    elif name == "diamond":
        draw.polygon([(cx, y0), (x1, cy), (cx, y1), (x0, cy)], fill=colour)
    elif name == "stripes":
        for x in np.arange(x0, x1, 2 * bar):
            draw.rectangle((x, y0, min(x + bar, x1), y1), fill=colour)
    else:  # checker
        cell = 1.5 * bar
        for i, x in enumerate(np.arange(x0, x1, cell)):
            for j, y in enumerate(np.arange(y0, y1, cell)):
                if (i + j) % 2 == 0:
                    draw.rectangle((x, y, min(x + cell, x1), min(y + cell, y1)), fill=colour)


def add_noise(image: Image.Image, rng: np.random.Generator, sigma: float = 8.0) -> Image.Image:
    pixels = np.asarray(image, dtype=np.float64) + rng.normal(0, sigma, (*image.size[::-1], 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def random_box(rng: np.random.Generator, width: int, height: int, scale: tuple) -> Box:
    """A box whose side is ``scale`` (lo, hi) of the image's shorter side, aspect 1:2 to 2:1."""
    side = rng.uniform(*scale) * min(width, height)
    aspect = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
    w = min(width, max(4.0, side * aspect**0.5))
    h = min(height, max(4.0, side / aspect**0.5))
    x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
    return (x0, y0, x0 + w, y0 + h)


def make_synthetic_image_folder(
    root: str,
    num_images: int = 64,
    size: int = 64,
    seed: int = 0,
    num_classes: int = 4,
    ext: str = "jpg",
) -> str:
    """Write an ImageFolder tree of ``num_images`` real image files under ``root``; return
    ``root``. Image ``i`` shows one instance of family ``i % num_classes`` (folder
    ``class_{c:02d}_{family}``), so that learnt features can be checked with a kNN monitor or a
    linear probe."""
    if not 1 <= num_classes <= len(FAMILIES):
        raise ValueError(f"num_classes must be in 1..{len(FAMILIES)}")
    rng = np.random.default_rng(seed)
    for c in range(num_classes):
        os.makedirs(os.path.join(root, f"class_{c:02d}_{FAMILIES[c]}"), exist_ok=True)
    for i in range(num_images):
        c = i % num_classes
        image = cluttered_background((size, size), rng)
        draw_family(image, c, random_box(rng, size, size, (0.3, 0.75)), rng)
        path = os.path.join(root, f"class_{c:02d}_{FAMILIES[c]}", f"img_{i:06d}.{ext}")
        add_noise(image, rng).save(path, quality=95)  # ignored by PNG
    return root
