"""Per-example image transforms: decode, random-resized-crop, flip, centre crop.

Transforms run on the host and return uint8 HWC arrays. Normalisation (mean/std) happens on
the accelerator inside the jitted step: a uint8 batch is a quarter of the host-to-device
bytes of a float32 one, and XLA fuses the arithmetic into the first convolution.

Every encoding a record may hold (PNG, JPEG, raw pixels: pipeline/records.py) goes through
`open_image` / `decode_image`; `stored_pixels` gives the stored array without augmentation
(for raw records, a view of the record bytes, without PIL).

Scaled JPEG decoding. A JPEG can be decoded at 1/2, 1/4 or 1/8 of its size inside the inverse
DCT (libjpeg's scaled IDCT, PIL's `Image.draft`), for a fraction of the work. The crop box is
decided in full-resolution coordinates from the image header, exactly as without it (same
random draws, same geometry); then the image is decoded at the smallest scale that still
leaves the crop at least `image_size` pixels in both dimensions (with a margin,
DCT_SCALE_MARGIN), the box is mapped onto the reduced image and the crop is resized as
without it. With `image_size`=224 that happens when the crop is at least 560 px on its shorter
side: large photos and the multi-megapixel tail, where decoding costs most.
docs/measurements.md gives the speed and the fidelity (PSNR against the full decode).

The batch path (`crop_into`). Training writes each crop straight into its slot of a
preallocated batch array. The box and the flip come from the same random draws as
`random_resized_crop`, so the crop geometry is unchanged (`plan_crop`). Only the window the
crop needs is decoded (`decode_window`: libjpeg-turbo's partial decoding, pipeline/_jpegcrop.c,
at the same reduced scale): the rows below it are never read, and the rows above it and the
columns beside it skip the inverse DCT and colour conversion. In a JPEG with restart markers
that tile its MCU rows (what the converter stores: pipeline/conversion/images.py) they are not
entropy-decoded either: only the intervals under the window are read. Its pixels are exactly
those of a whole decode (tests/pipeline/test_jpegcrop.py). OpenCV resizes the window into the slot
(bilinear; an antialiased reduction when reducing; an affine warp where a reduced decode
leaves the box with fractional bounds) and flips it there. The decode is libjpeg-turbo's, as
PIL's is, with its fast IDCT (FAST_DCT); a CMYK JPEG's window is converted to RGB as PIL
converts it. OpenCV's resampling differs from PIL's: with the fast IDCT, the crops are at
least 33 dB and 40 dB in the median from PIL's on photo-like images
(tests/pipeline/test_transforms.py). Without the compiled module the whole image is
decoded (simplejpeg). Images that path does not take (PNG, raw, or simplejpeg/OpenCV not
installed) go through `random_resized_crop` into the same slot.
"""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
from PIL import Image, JpegImagePlugin

from pipeline import records

try:  # the fast batch path; PIL does everything when these wheels are missing
    import cv2
    import simplejpeg  # type: ignore[import-untyped]
except ImportError:  # pragma: no cover - depends on the install
    cv2 = simplejpeg = None  # type: ignore[assignment]
else:
    # Parallelism is Grain's (threads, worker processes); OpenCV's own pool would oversubscribe.
    cv2.setNumThreads(1)
try:  # partial decoding, built at install time against the system's libjpeg-turbo
    from pipeline import _jpegcrop
except ImportError:  # pragma: no cover - depends on the install
    _jpegcrop = None  # type: ignore[assignment]

# What the converter stores; naming them skips PIL's probing of every other format.
_FORMATS = ("JPEG", "PNG")
_DCT_SCALES = (8, 4, 2)  # the reductions libjpeg decodes directly, largest first
# A reduced decode must leave the crop at least this many times the output size, so that
# PIL's antialiasing resize still does part of the reduction. At 1.0 (the scaled IDCT doing
# all of it) the result was sharper than the full decode's: on detailed real photos (the
# scikit-image/scikit-learn sample photos, JPEG quality 90) the worst crops came within
# 32.3 dB PSNR of the full-decode path; at 1.25, 37.3 dB (median 46 dB).
DCT_SCALE_MARGIN = 1.25


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """Train-time augmentation settings (Inception-style random-resized-crop)."""

    image_size: int
    channels: int = 3
    crop_scale: tuple[float, float] = (0.08, 1.0)  # fraction of the source area
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect ratio range
    random_flip: bool = True
    scaled_decode: bool = True  # JPEGs: decode at 1/2..1/8 scale when the crop allows


def _mode(channels: int) -> str:
    return "L" if channels == 1 else "RGB"


def raw_pixels(image_bytes: bytes) -> np.ndarray:
    """The HxWxC uint8 array of a raw image: a read-only view of the bytes, no copy, no PIL.

    ValueError if the bytes are not a complete raw image (records.encode_raw).
    """
    height, width, channels = records.raw_shape(image_bytes)
    return np.frombuffer(
        image_bytes, np.uint8, count=height * width * channels, offset=records.RAW_HEADER_SIZE
    ).reshape(height, width, channels)


def open_image(image_bytes: bytes) -> Image.Image:
    """A PIL image of any stored encoding. PNG and JPEG are opened lazily (only the header is
    read, so a JPEG can still be given a reduced decoding scale); raw pixels are wrapped."""
    if records.is_raw(image_bytes):
        pixels = raw_pixels(image_bytes)
        return Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
    return Image.open(io.BytesIO(image_bytes), formats=_FORMATS)


def decode_image(image_bytes: bytes, channels: int) -> Image.Image:
    """The whole image, decoded, in mode L (channels=1) or RGB: for every stored encoding."""
    image = open_image(image_bytes)
    if image.mode != _mode(channels):
        image = image.convert(_mode(channels))
    image.load()
    return image


def stored_pixels(image_bytes: bytes, channels: int) -> np.ndarray:
    """The stored image as HxWxC uint8, not augmented. Raw records with `channels` channels are
    returned as a read-only view of the bytes (no copy, no PIL); others are decoded."""
    if records.is_raw(image_bytes):
        pixels = raw_pixels(image_bytes)
        if pixels.shape[2] == channels:
            return pixels
    return _to_array(decode_image(image_bytes, channels), channels)


def _to_array(image: Image.Image, channels: int) -> np.ndarray:
    array = np.asarray(image, dtype=np.uint8)
    return array[:, :, None] if channels == 1 else array


def dct_scale(box_size: tuple[float, float], image_size: int) -> int:
    """The largest JPEG reduction (8, 4, 2 or 1) that keeps a crop of box_size (width, height)
    at least image_size pixels (times DCT_SCALE_MARGIN) in both dimensions."""
    for scale in _DCT_SCALES:
        if min(box_size) >= DCT_SCALE_MARGIN * scale * image_size:
            return scale
    return 1


def _crop_resize(
    image: Image.Image,
    box: tuple[float, float, float, float],
    image_size: int,
    channels: int,
    scaled_decode: bool,
) -> Image.Image:
    """Resizes `box` (full-resolution coordinates) of `image` to image_size x image_size.

    A JPEG not yet decoded is decoded at a reduced DCT scale when the box allows (see the
    module docstring); anything else is decoded whole.
    """
    scale: float = 1
    if (
        scaled_decode
        and isinstance(image, JpegImagePlugin.JpegImageFile)
        and image.tile  # not decoded yet
    ):
        scale = dct_scale((box[2] - box[0], box[3] - box[1]), image_size)
        if scale > 1:
            width, height = image.size
            drafted = image.draft(_mode(channels), (width // scale, height // scale))
            # draft picks the scale; read it back (the reduced image is ceil(size / scale)).
            scale = width / drafted[1][2] if drafted else 1
            left, top, right, bottom = (v / scale for v in box)
            box = (left, top, right, bottom)
    if image.mode != _mode(channels):
        image = image.convert(_mode(channels))
    # `box` makes PIL crop and resize in one resampling pass.
    return image.resize((image_size, image_size), Image.Resampling.BILINEAR, box=box)


def random_box(
    width: int, height: int, aug: Augmentation, rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """The random-resized-crop box (left, top, right, bottom) in full-resolution pixels."""
    area = width * height
    log_ratio = (math.log(aug.crop_ratio[0]), math.log(aug.crop_ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*aug.crop_scale)
        ratio = math.exp(rng.uniform(*log_ratio))
        crop_w = int(round(math.sqrt(target_area * ratio)))
        crop_h = int(round(math.sqrt(target_area / ratio)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            left = int(rng.integers(0, width - crop_w + 1))
            top = int(rng.integers(0, height - crop_h + 1))
            return (left, top, left + crop_w, top + crop_h)
    return (0, 0, width, height)  # fallback: the whole image


def random_resized_crop(
    image: Image.Image, aug: Augmentation, rng: np.random.Generator
) -> np.ndarray:
    """Crops a random area and aspect ratio, resizes to `image_size`, maybe flips.

    `image` may be lazily opened (open_image): a JPEG is then decoded at a reduced scale when
    the crop allows (aug.scaled_decode).
    """
    width, height = image.size  # from the header: nothing decoded yet
    box = random_box(width, height, aug, rng)
    out = _crop_resize(image, box, aug.image_size, aug.channels, aug.scaled_decode)
    if aug.random_flip and rng.random() < 0.5:
        # In PIL, on the small output: a contiguous result. A numpy view with a negative
        # stride made batching (np.stack) copy pixel by pixel: 19 ms instead of 0.4 ms for
        # 64 images of 224 px, and np.ascontiguousarray of it costs 0.2 ms an image.
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return _to_array(out, aug.channels)


def fast_path_available() -> bool:
    return cv2 is not None and simplejpeg is not None


def window_decode_available() -> bool:
    """Whether partial JPEG decoding (pipeline/_jpegcrop.c) was built at install time."""
    return _jpegcrop is not None


# libjpeg-turbo's fast integer IDCT: within 41.6 dB (median 45 dB) of the accurate one on
# photo-like JPEGs and 15-25 % less decode time. Fast chroma upsampling is not used: it fell to
# 32.2 dB, under the 35 dB bar (docs/measurements.md).
FAST_DCT = True
_JPEG_SOI = b"\xff\xd8"
# The end-of-image marker. A file without it at the end (truncated, or with bytes after it) is
# decoded whole, so that damage below a crop's window is still found and named.
_JPEG_EOI = b"\xff\xd9"
_FAST_COLORSPACES = ("Gray", "YCbCr", "RGB")  # what libjpeg-turbo converts to RGB/gray itself
_CMYK_COLORSPACES = ("CMYK", "YCCK")  # partial decoding to CMYK, converted as PIL converts


def _jpeg_header(image_bytes: bytes) -> tuple[int, int, str] | None:
    """(width, height, colour space) of a JPEG, or None for anything else."""
    if not fast_path_available() or image_bytes[:2] != _JPEG_SOI:
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(image_bytes)
    except ValueError:
        return None  # let PIL read it and say what is wrong
    return width, height, colorspace


def decode_scaled(image_bytes: bytes, size: tuple[int, int], scale: int, channels: int):
    """The whole JPEG decoded at 1/scale (libjpeg's scaled IDCT) as HxWxC uint8."""
    width, height = size
    return simplejpeg.decode_jpeg(
        image_bytes,
        "GRAY" if channels == 1 else "RGB",
        fastdct=FAST_DCT,
        min_factor=scale,
        min_height=-(-height // scale),
        min_width=-(-width // scale),
    )


@dataclasses.dataclass(frozen=True)
class CropPlan:
    """What crop_into decides from a JPEG's header and the draws, before decoding anything."""

    size: tuple[int, int]  # (width, height) of the stored image
    box: tuple[int, int, int, int]  # the crop, full-resolution pixels
    scale: int  # the JPEG is decoded at 1/scale
    window: tuple[int, int, int, int]  # what to decode, in pixels of the 1/scale image
    cmyk: bool  # decoded as CMYK and converted to RGB by PIL, as PIL's own decode is

    def box_in(self, x0: int, y0: int) -> tuple[int, int, int, int]:
        """The box in full-resolution pixels from the first pixel of a window decode_window
        returned starting at (x0, y0) of the 1/scale image."""
        left, top, right, bottom = self.box
        dx, dy = x0 * self.scale, y0 * self.scale
        return (left - dx, top - dy, right - dx, bottom - dy)


def plan_crop(image_bytes: bytes, aug: Augmentation, rng: np.random.Generator) -> CropPlan | None:
    """The box (random_resized_crop's draws), the decoding scale and window of a JPEG the fast
    path takes; None, drawing nothing, for anything else."""
    header = _jpeg_header(image_bytes)
    cmyk = header is not None and header[2] in _CMYK_COLORSPACES and _jpegcrop is not None
    if header is None or not (header[2] in _FAST_COLORSPACES or cmyk):
        return None
    size = header[:2]
    box = random_box(*size, aug, rng)
    scale = dct_scale((box[2] - box[0], box[3] - box[1]), aug.image_size)
    scale = scale if aug.scaled_decode else 1
    return CropPlan(size, box, scale, _window(box, size, scale), cmyk)


def _window(box, size, scale: int) -> tuple[int, int, int, int]:
    """The pixels of the image decoded at 1/scale that resizing `box` (full-resolution) reads:
    the box itself at full scale; at a reduction, the box's fractional bounds widened to whole
    pixels and by one more, the bilinear sampling's neighbours."""
    if scale == 1:
        return box
    width, height = (-(-side // scale) for side in size)
    return (
        max(box[0] // scale - 1, 0),
        max(box[1] // scale - 1, 0),
        min(-(-box[2] // scale) + 1, width),
        min(-(-box[3] // scale) + 1, height),
    )


def decode_window(image_bytes: bytes, plan: CropPlan, channels: int) -> tuple[np.ndarray, int, int]:
    """The plan's window of the JPEG decoded at 1/plan.scale, and only that (libjpeg-turbo's
    partial decoding, pipeline/_jpegcrop.c): (pixels, x0, y0), the pixels starting at column
    x0 <= the window's left and at its top row y0; inside the window they are a whole
    decode's pixels (the extra columns beside it need not be).

    A whole decode (simplejpeg) where partial decoding is not built or the file does not end
    with its end-of-image marker. ValueError for bytes libjpeg cannot decode."""
    complete = image_bytes[-2:] == _JPEG_EOI
    if plan.cmyk and not complete:
        raise ValueError("a CMYK JPEG without its end-of-image marker")  # PIL decides
    if _jpegcrop is None or not complete:
        return decode_scaled(image_bytes, plan.size, plan.scale, channels), 0, 0
    pixels, height, width, x0 = _jpegcrop.decode_crop(
        image_bytes, *plan.window, plan.scale, 4 if plan.cmyk else channels, FAST_DCT
    )
    if plan.cmyk:  # PIL's reading of CMYK JPEGs (inverted, Adobe's convention) and conversion
        image = Image.frombuffer("CMYK", (width, height), pixels, "raw", "CMYK;I", 0, 1)
        array = _to_array(image.convert(_mode(channels)), channels)
    else:
        array = np.frombuffer(pixels, np.uint8).reshape(height, width, channels)
    return array, x0, plan.window[1]


def resize_reduced_into(out: np.ndarray, pixels: np.ndarray, box, scale: int) -> None:
    """Resizes `box` (full-resolution pixels, relative to the first pixel of `pixels`) of
    `pixels` (decoded at 1/scale) into `out` (SxSxC), as resize_into resizes a window.

    Reduced pixel i covers full-resolution pixels [i * scale, (i + 1) * scale) (the last one
    a partial block), so the box maps by `scale` itself, to fractional bounds, and stays
    inside the reduced image. OpenCV's resize takes whole pixels only: an affine warp samples
    the fractional box bilinearly, at the pixel centres cv2.resize would use.
    """
    size = out.shape[0]
    if out.shape[2] == 1:
        pixels, out = pixels[:, :, 0], out[:, :, 0]
    left, top, right, bottom = (v / scale for v in box)
    reduce = right - left > size and bottom - top > size
    side = 2 * size if reduce else size
    sx, sy = (right - left) / side, (bottom - top) / side
    # Output pixel j's centre, j + 0.5, samples the box at left + (j + 0.5) * sx: in the
    # source's pixel-centre coordinates, that less 0.5.
    warp = np.array([[sx, 0.0, left + 0.5 * sx - 0.5], [0.0, sy, top + 0.5 * sy - 0.5]])
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    if reduce:
        sampled = cv2.warpAffine(
            pixels, warp, (side, side), flags=flags, borderMode=cv2.BORDER_REPLICATE
        )
        cv2.resize(sampled, (size, size), dst=out, interpolation=cv2.INTER_AREA)
    else:
        cv2.warpAffine(
            pixels, warp, (size, size), dst=out, flags=flags, borderMode=cv2.BORDER_REPLICATE
        )


def resize_into(out: np.ndarray, window: np.ndarray) -> None:
    """Resizes `window` (HxWxC) into `out` (SxSxC), in place: bilinear when enlarging; when
    reducing both sides, an antialiased reduction like PIL's in two steps: bilinear to 2S x 2S,
    then the mean of each 2 x 2 block. OpenCV's area averaging by a whole factor is fast; by
    any other factor it runs generic code, slower than both steps together (`area_resize` in
    tools.bench.input's breakdown, docs/measurements.md)."""
    size = out.shape[0]
    if out.shape[2] == 1:
        window, out = window[:, :, 0], out[:, :, 0]
    if window.shape[0] > size and window.shape[1] > size:
        window = cv2.resize(window, (2 * size, 2 * size), interpolation=cv2.INTER_LINEAR)
        cv2.resize(window, (size, size), dst=out, interpolation=cv2.INTER_AREA)
    else:
        cv2.resize(window, (size, size), dst=out, interpolation=cv2.INTER_LINEAR)


def resize_planned(out: np.ndarray, pixels: np.ndarray, x0: int, y0: int, plan: CropPlan) -> None:
    """The plan's box of decode_window's pixels, resized into `out` by OpenCV."""
    box = plan.box_in(x0, y0)
    if plan.scale == 1:
        resize_into(out, pixels[box[1] : box[3], box[0] : box[2]])
    else:
        resize_reduced_into(out, pixels, box, plan.scale)


def crop_into(
    out: np.ndarray, image_bytes: bytes, aug: Augmentation, rng: np.random.Generator
) -> None:
    """random_resized_crop of a stored image, written into `out` (a batch slot, SxSxC).

    The same random draws, box and flip as random_resized_crop; JPEGs are decoded by
    libjpeg-turbo into numpy, only the window the crop needs, and resized straight into `out`.
    """
    draws = rng.bit_generator.state
    plan = plan_crop(image_bytes, aug, rng)
    if plan is not None:
        try:
            pixels, x0, y0 = decode_window(image_bytes, plan, aug.channels)
        except ValueError:
            # A damaged JPEG: PIL decides, with the same draws, as it does everywhere else (it
            # refuses a truncated file, for one, and says so).
            plan = None
            rng.bit_generator.state = draws
    if plan is None:
        out[...] = random_resized_crop(open_image(image_bytes), aug, rng)
        return
    resize_planned(out, pixels, x0, y0, plan)
    if aug.random_flip and rng.random() < 0.5:
        cv2.flip(out, 1, dst=out)


def center_box(width: int, height: int, crop_fraction: float) -> tuple[float, float, float, float]:
    side = min(width, height) * crop_fraction
    left, top = (width - side) / 2, (height - side) / 2
    return (left, top, left + side, top + side)


def center_crop(
    image: Image.Image,
    image_size: int,
    channels: int,
    crop_fraction: float,
    *,
    scaled_decode: bool = True,
) -> np.ndarray:
    """Eval transform: the centre `crop_fraction` of the shorter side, resized to `image_size`.

    crop_fraction=0.875 is the usual ImageNet "resize to 256, crop 224"; 1.0 keeps the whole
    (square) image, as for MNIST and CIFAR. A lazily opened JPEG is decoded at a reduced scale
    when the crop allows (scaled_decode).
    """
    box = center_box(*image.size, crop_fraction)
    out = _crop_resize(image, box, image_size, channels, scaled_decode)
    return np.ascontiguousarray(_to_array(out, channels))
