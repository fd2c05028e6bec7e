"""Synthetic image folders for the demo and the tests: real JPEG files whose class is a shape."""

import os

import numpy as np
from PIL import Image, ImageDraw

_SHAPES = ("disc", "square", "stripes", "triangle", "ring", "cross", "checker", "diamond")


def make_synthetic_image_folder(
    root: str,
    num_images: int = 64,
    size: int = 64,
    seed: int = 0,
    num_classes: int = 4,
    ext: str = "jpg",
) -> str:
    """Write an ImageFolder tree of ``num_images`` real image files under ``root``; return ``root``.

    Class ``c`` is a shape (disc, square, stripes, ...) with random colours, position, scale and
    noise, so that learnt features can be checked with a kNN monitor or a linear probe.
    """
    if not 1 <= num_classes <= len(_SHAPES):
        raise ValueError(f"num_classes must be in 1..{len(_SHAPES)}")
    rng = np.random.default_rng(seed)
    for c in range(num_classes):
        os.makedirs(os.path.join(root, f"class_{c:02d}_{_SHAPES[c]}"), exist_ok=True)
    for i in range(num_images):
        c = i % num_classes
        image = _draw_shape(_SHAPES[c], size, rng)
        path = os.path.join(root, f"class_{c:02d}_{_SHAPES[c]}", f"img_{i:06d}.{ext}")
        if ext in ("jpg", "jpeg"):
            image.save(path, quality=95)
        else:
            image.save(path)
    return root


def _draw_shape(shape, size, rng):
    background = tuple(int(v) for v in rng.integers(0, 256, 3))
    colour = tuple(int(v) for v in rng.integers(0, 256, 3))
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    r = rng.uniform(0.2, 0.4) * size
    cx, cy = rng.uniform(r, size - r, 2)
    box = [cx - r, cy - r, cx + r, cy + r]
    width = max(1, int(r / 3))
    if shape == "disc":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    elif shape == "stripes":
        for x in range(0, size, 2 * width):
            draw.rectangle([x, 0, x + width - 1, size], fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif shape == "ring":
        draw.ellipse(box, outline=colour, width=width)
    elif shape == "cross":
        draw.rectangle([cx - width, cy - r, cx + width, cy + r], fill=colour)
        draw.rectangle([cx - r, cy - width, cx + r, cy + width], fill=colour)
    elif shape == "checker":
        for x in range(0, size, 2 * width):
            for y in range(0, size, 2 * width):
                if (x // (2 * width) + y // (2 * width)) % 2 == 0:
                    draw.rectangle([x, y, x + 2 * width - 1, y + 2 * width - 1], fill=colour)
    else:  # diamond
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=colour)
    noise = rng.normal(0, 8, (size, size, 3))
    pixels = np.clip(np.asarray(image, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)
