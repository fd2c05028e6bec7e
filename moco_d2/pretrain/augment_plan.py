"""The host side of :class:`~moco_d2.pretrain.device_augment.DeviceAugment`: which batched op runs
on which images, laid out so that every op touches only the images it applies to.

The parameters are drawn on the host, so before any device work the host knows every image's
jitter order and flags. The batch is reordered on the device once per jitter position, so that
the images whose op at that position is the same form one contiguous slice; once more for the
ops after the jitter (grayscale, blur, flip and normalize); and back to its own order at the end.
Each op then runs on slices. Within the slice of an op, the images whose factor is above 1 come
last: only they can leave [0, 1], so only they are clamped (a factor of at most 1 blends values
of [0, 1] into [0, 1], so torchvision's clamp changes nothing there but rounding).

Everything the device needs, the gather indices, the per-image factors, the blur kernels and the
constants, travels as one packed int32 array (:attr:`Plan.packed`, float32 values by their
bits): one host-to-device copy per call.
"""

from dataclasses import dataclass, field

import numpy as np

from moco_d2 import IMAGENET_MEAN, IMAGENET_STD

BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)
NONE = 4  # no jitter op at this position (the image is not jittered)
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision
ROW = 4  # floats per image and jitter position (see _jitter_rows)

# (blur, flip, grayscale) bits in the order of the last segment: blur and flip are one slice
# each, grayscale two
_OUT_ORDER = ("100", "101", "111", "110", "010", "011", "001", "000")
_OUT_RANK = np.argsort([int(bits, 2) for bits in _OUT_ORDER])  # bits value -> place

# The packed floats start with these per-channel constants: the hue kernel's (see
# device_augment._hue) and Normalize as one affine map x * scale + shift.
_CONSTANTS = {
    "hue_centres": (3, 2, 4),
    "hue_slopes": (1, -1, -1),
    "hue_offsets": (-1, 2, 2),
    "scale": tuple(1 / s for s in IMAGENET_STD),
    "shift": tuple(-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)),
}
CONSTANTS = {name: slice(3 * i, 3 * i + 3) for i, name in enumerate(_CONSTANTS)}


@dataclass
class JitterRun:
    """Images ``start:stop`` of a segment take jitter ``op``, then ``clamp`` (a stretch of
    them, or None) is clamped to [0, 1]."""

    op: int
    start: int
    stop: int
    clamp: slice | None


@dataclass
class Segment:
    """One ordering of the batch and the ops run in it: grayscale, then jitter.

    ``gather``: offset in the packed ints of the ``n`` indices that reorder the batch as the
    previous segment left it (the input for the first). ``rows``: offset in the packed floats of
    the ``(n, ROW)`` jitter parameters in this order.
    """

    gather: int
    rows: int = 0
    gray: list[tuple[int, int]] = field(default_factory=list)
    jitter: list[JitterRun] = field(default_factory=list)


@dataclass
class Plan:
    """The segments, then in the last one's order: ``blur`` stretches ``(start, stop, offset of
    their kernels)``; ``out`` stretches ``(start, stop, start of their blur stretch or None,
    flipped)`` covering the batch, normalised into the output; ``restore`` the offset of the
    indices back to the input's order. The packed ints come first (``ints`` of them)."""

    n: int
    segments: list[Segment]
    blur: list[tuple[int, int, int]]
    out: list[tuple[int, int, int | None, bool]]
    restore: int
    kernel_size: int
    ints: int
    packed: np.ndarray


class _Packer:
    """Arrays appended to the packed ints or floats; each append returns its offset."""

    def __init__(self) -> None:
        constants = np.array([v for values in _CONSTANTS.values() for v in values], np.float32)
        self.ints: list[np.ndarray] = []
        self.floats: list[np.ndarray] = [constants]
        self.n_ints, self.n_floats = 0, len(constants)

    def add_ints(self, values: np.ndarray) -> int:
        self.ints.append(values.astype(np.int32).ravel())
        self.n_ints += values.size
        return self.n_ints - values.size

    def add_floats(self, values: np.ndarray) -> int:
        self.floats.append(values.astype(np.float32).ravel())
        self.n_floats += values.size
        return self.n_floats - values.size

    def packed(self) -> np.ndarray:
        return np.concatenate([*self.ints, np.concatenate(self.floats).view(np.int32)])


def _runs(values: np.ndarray) -> list[tuple[int, int, int]]:
    """The maximal stretches ``(start, stop, value)`` of equal ``values``."""
    bounds = [0, *(np.flatnonzero(values[1:] != values[:-1]) + 1).tolist(), len(values)]
    return [(a, b, int(values[a])) for a, b in zip(bounds[:-1], bounds[1:])]


def gaussian_kernels(sigma: np.ndarray, size: int) -> np.ndarray:
    """``(N, size)`` normalised 1-D Gaussians, one per σ, centred on the middle tap."""
    x = np.arange(size) - (size - 1) / 2
    pdf = np.exp(-0.5 * (x / sigma.astype(np.float64)[:, None]) ** 2)
    return (pdf / pdf.sum(axis=1, keepdims=True)).astype(np.float32)


def _jitter_rows(p, op: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(n, 4, ROW)`` parameters of each image's op at each position, and whether to clamp.

    Brightness: the factor. Contrast and saturation: the factor, then (1 − factor) × the luma
    weights. Hue: the shift in sixths of a turn plus 0, 2 and 4 (the sector of the max channel).
    """
    n = len(op)
    ones = np.ones(n, dtype=np.float32)
    by_op = np.stack([p.brightness.numpy(), p.contrast.numpy(), p.saturation.numpy(), ones, ones])
    factor = np.take_along_axis(by_op.T, op, axis=1)  # 1 for hue and for no op
    rows = np.zeros((n, 4, ROW), dtype=np.float32)
    rows[..., 0] = factor
    rows[..., 1:] = (1 - factor)[..., None] * np.array(GRAY_WEIGHTS, dtype=np.float32)
    shifts = 6 * p.hue.numpy()[:, None, None] + np.array([0, 2, 4], dtype=np.float32)
    rows[..., :3] = np.where((op == HUE)[..., None], shifts, rows[..., :3])
    return rows, factor > 1


def build_plan(p, aug_plus: bool, height: int, width: int, blur_kernel: int) -> Plan:
    """The plan for a batch with the host parameters ``p`` (an ``AugmentParams``)."""
    jitter, gray = p.jitter.numpy(), p.grayscale.numpy()
    blur, flip = p.blur.numpy(), p.flip.numpy()
    n = len(jitter)
    op = np.where(jitter[:, None], p.order.numpy(), NONE)  # (n, 4): the op at each position
    rows, clamp = _jitter_rows(p, op)
    kernel_size = min(blur_kernel, 2 * (min(height, width) - 1) + 1)  # reflect padding's limit

    keys = [2 * op[:, j] + clamp[:, j] for j in range(4)]  # per op: unclamped, then clamped
    if not aug_plus:  # grayscale first: those images, then the others reversed (one hue run)
        keys[0] = np.where(gray, keys[0], 4 * NONE + 1 - keys[0])
    keys.append(_OUT_RANK[4 * blur + 2 * flip + (gray if aug_plus else 0)])

    pack = _Packer()
    segments = []
    position = np.arange(n)  # where each image is in the batch as the previous segment left it
    for s, key in enumerate(keys):
        order = np.argsort(key, kind="stable")
        seg = Segment(gather=pack.add_ints(position[order]))
        position[order] = np.arange(n)
        if s < 4:
            seg.rows = pack.add_floats(rows[order, s])
            for a, b, o in _runs(op[order, s]):
                clamped = a + np.flatnonzero(clamp[order[a:b], s])
                span = slice(int(clamped[0]), int(clamped[-1]) + 1) if len(clamped) else None
                if o != NONE:
                    seg.jitter.append(JitterRun(o, a, b, span))
        if s == (4 if aug_plus else 0):
            seg.gray = [(a, b) for a, b, g in _runs(gray[order]) if g]
        segments.append(seg)

    sigma = p.sigma.numpy()[order]
    blur_runs = []
    for a, b, blurred in _runs(blur[order]):
        if blurred:
            kernels = np.repeat(gaussian_kernels(sigma[a:b], kernel_size), 3, axis=0)
            blur_runs.append((a, b, pack.add_floats(kernels)))
    out = []
    for a, b, v in _runs(2 * blur[order] + flip[order]):
        source = [start for start, _, _ in blur_runs if start <= a] if v & 2 else []
        out.append((a, b, max(source, default=None), bool(v & 1)))
    restore = pack.add_ints(position)
    return Plan(n, segments, blur_runs, out, restore, kernel_size, pack.n_ints, pack.packed())
