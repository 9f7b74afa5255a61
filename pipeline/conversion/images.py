"""Per-image work: an imagefolder file's decode check, 8-bit mapping, size bounds and
downscaling, and re-encoding; and the raw pixels or PNG of a mnist or cifar array.

JPEG and PNG bytes are kept as they are (after a full decode check), except that a JPEG is
re-encoded losslessly with restart markers (below); other formats PIL reads, and 16-bit images,
are re-encoded as 8-bit PNG; images over `max_pixels`, or over the bounded
size (`shorter_side`, `max_side`), are downscaled once with a Lanczos filter (JPEG stays JPEG
at `jpeg_quality`, the rest PNG). Undecodable and floating-point images are skipped (or, with
--strict, fail the conversion). encoding="raw" stores RGB pixels instead and needs every
(bounded) image to have one size (writing.py checks it).

Restart markers. Every JPEG kept is re-encoded losslessly (pipeline/_jpegcrop.c:
restart_index): the same DCT coefficients, quantisation and chroma sampling, so the same
pixels; one baseline scan with optimised Huffman tables; and a restart marker every
JPEG_RESTART_MCUS MCUs, placed so that the intervals tile each MCU row. A downscaled JPEG is
written that way by PIL in the first place. Training
then decodes only the intervals under a crop's window (pipeline/transforms.py), not every row
above it and the whole width of its own. The re-encoding is kept only if PIL decodes it to
exactly the pixels of the bytes it came from; otherwise, and where the module is not built,
the bytes are stored as they are. `jpeg_restarts=False` stores them as they are always.

This runs in the worker processes: the options travel there as a picklable ImageOptions.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import stat
import warnings
from typing import Any, cast

import numpy as np
from PIL import Image, ImageChops

from pipeline import records
from pipeline.conversion.source import Skip

try:  # built at install time against libjpeg-turbo (pyproject.toml)
    from pipeline import _jpegcrop
except ImportError:  # pragma: no cover - depends on the install
    _jpegcrop = None  # type: ignore[assignment]

PNG_COMPRESS_LEVEL = 6  # fixed (zlib's default), so PNG bytes are reproducible
JPEG_QUALITY = 95  # default for downscaled JPEGs; visually lossless, and bytes are reproducible
# Images with more pixels are downscaled (aspect kept) when converted. Training crops and
# resizes every image to ~224 px, so detail beyond a few megapixels is never seen, while decode
# time and memory grow with pixels (a 169-megapixel PNG of 0.5 MB took 1.25 GB to decode and
# crop). 40 MP keeps photos from common cameras (12-36 MP) at full size and bounds one decoded
# RGB image to 120 MB per reader process.
DEFAULT_MAX_PIXELS = 40_000_000
# The reader opens records with PIL's default limits: above this PIL warns of a decompression
# bomb, and refuses twice it, so no record may hold a larger image.
# PIL types it int | None (None switches the check off); its default, read here, is an int.
MAX_PIXELS_LIMIT = cast(int, Image.MAX_IMAGE_PIXELS)
# Restart intervals of up to 2 MCUs (32 px at 4:2:0). Timed on the 400 photo-like originals
# of docs/measurements.md, crops as training plans them: a window decoded in 0.54 ms against
# 0.73 ms without markers, the files 0.8 % larger than the originals; with 1 MCU as fast and
# 2.9 % larger, with 4 MCUs 2 % slower and 1 % smaller.
JPEG_RESTART_MCUS = 2
IMAGE_EXTENSIONS = frozenset(
    {
        ".jpg",
        ".jpeg",
        ".jpe",
        ".png",
        ".bmp",
        ".gif",
        ".webp",
        ".tif",
        ".tiff",
        ".ppm",
        ".pgm",
        ".pbm",
        ".pnm",
    }
)


@dataclasses.dataclass(frozen=True)
class ImageOptions:
    """How imagefolder images are stored (picklable: it travels to the worker processes)."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    shorter_side: int | None = None  # bound on the shorter side (None: no bound)
    max_side: int | None = None  # bound on the longer side
    jpeg_quality: int = JPEG_QUALITY  # for JPEGs that are downscaled
    raw: bool = False  # store RGB pixels instead of PNG/JPEG bytes
    jpeg_restarts: bool = True  # JPEGs re-encoded losslessly with restart markers


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    # No timestamps or text chunks are written; only what the image itself carries.
    img.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def _jpeg_bytes(img: Image.Image, quality: int, restarts: bool) -> bytes:
    """`img` encoded by PIL at `quality` (4:2:0 chroma, PIL's default); with `restarts`, as
    restart_index would have re-encoded it (optimised Huffman tables, restart intervals of up
    to JPEG_RESTART_MCUS MCUs that tile the rows) in the same pass."""
    options: dict[str, Any] = {}
    if restarts:
        # 4:2:0 named, not left to PIL's default: the MCU width below depends on it.
        mcu, sampling = (8, {}) if img.mode == "L" else (16, {"subsampling": "4:2:0"})
        columns = -(-img.width // mcu)
        interval = next(k for k in range(JPEG_RESTART_MCUS, 0, -1) if columns % k == 0)
        options = {"optimize": True, "restart_marker_blocks": interval, **sampling}
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, **options)
    return buf.getvalue()


def restarts_available() -> bool:
    """Whether JPEGs can be re-encoded with restart markers (pipeline._jpegcrop is built)."""
    return _jpegcrop is not None


def restart_indexed(data: bytes, decoded: Image.Image | None = None) -> bytes:
    """The JPEG `data` re-encoded losslessly with restart markers that tile its MCU rows, if
    PIL decodes that to exactly the pixels of `decoded` (default: of `data`); `data` itself
    otherwise, or where pipeline._jpegcrop is not built."""
    if _jpegcrop is None:
        return data
    try:
        indexed = _jpegcrop.restart_index(data, JPEG_RESTART_MCUS)
        if decoded is None:
            decoded = Image.open(io.BytesIO(data))
        with Image.open(io.BytesIO(indexed)) as check:
            # One more image of the size, not two numpy copies (a 40 MP photo: 120 MB each).
            same = (check.mode, check.size) == (decoded.mode, decoded.size) and (
                ImageChops.difference(check, decoded).getbbox() is None
            )
    except Exception:  # pylint: disable=broad-except  # anything at all: keep the bytes
        return data
    return indexed if same else data


def encode_array(raw: bool, pixels: np.ndarray) -> tuple[bytes, str, None, tuple]:
    """HxW (grayscale) or HxWx3 (RGB) uint8 -> raw pixels or PNG."""
    height, width = pixels.shape[:2]
    shape = (width, height, 1 if pixels.ndim == 2 else pixels.shape[2])
    if raw:
        return records.encode_raw(pixels), "raw", None, shape
    return _png_bytes(Image.fromarray(pixels)), "png", None, shape


def _png_compatible(img: Image.Image) -> Image.Image:
    if img.mode in ("L", "LA", "RGB", "RGBA"):
        return img
    if img.mode == "1":
        return img.convert("L")
    has_alpha = "A" in img.mode or "transparency" in img.info
    return img.convert("RGBA" if has_alpha else "RGB")


class _Unsupported(Exception):
    """An image PIL decodes but whose pixels cannot be mapped to 8 bits faithfully."""


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit (and 16-bit-range integer) grayscale -> 8 bits over the full range.

    PIL opens 16-bit RGB(A) PNG/TIFF/PPM as 8-bit RGB(A) already (the high byte of each
    sample), but 16-bit grayscale as mode I;16 or I, which its convert("L") clips at 255: a
    normal photo came out almost white. v >> 8 is PIL's own mapping for RGB, so a gray image
    gives the same values whether it was saved as gray or as RGB, and it inverts the usual
    8->16-bit widening (v * 257) exactly.
    """
    if img.mode == "F":
        raise _Unsupported(
            "floating-point pixels (mode F) have no known range to map onto 0..255; "
            "convert the image to 8 or 16 bits first"
        )
    if img.mode == "I" or img.mode.startswith("I;16"):
        pixels = np.asarray(img)
        low, high = int(pixels.min()), int(pixels.max())
        if low < 0 or high > 65535:  # a 32-bit integer image: its range is unknown
            raise _Unsupported(
                f"integer pixels span {low}..{high}, outside the 16-bit range 0..65535; "
                "convert the image to 8 or 16 bits first"
            )
        return Image.fromarray((pixels >> 8).astype(np.uint8))
    return img


def _downscaled_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    scale = math.sqrt(max_pixels / (width * height))
    w, h = max(1, math.floor(width * scale)), max(1, math.floor(height * scale))
    while w * h > max_pixels:  # floating-point rounding
        w, h = (w - 1, h) if w >= h else (w, h - 1)
    return w, h


def _side_bounded(width: int, height: int, side: int, shorter: bool) -> tuple[int, int]:
    """The size whose shorter (or longer) side is exactly `side`, the aspect ratio kept."""
    wide = width >= height
    fixed, other = (height, width) if wide == shorter else (width, height)
    scaled = max(1, round(other * side / fixed))
    return (scaled, side) if wide == shorter else (side, scaled)


def stored_size(width: int, height: int, opts: ImageOptions) -> tuple[int, int] | None:
    """The size an image of width x height is stored at, or None when it is kept as it is.

    Each bound that the image exceeds gives a size that meets it exactly (aspect kept); the
    smallest of those is taken, then trimmed a pixel at a time if rounding broke another.
    """
    candidates = []
    if width * height > opts.max_pixels:
        candidates.append(_downscaled_size(width, height, opts.max_pixels))
    if opts.shorter_side and min(width, height) > opts.shorter_side:
        candidates.append(_side_bounded(width, height, opts.shorter_side, shorter=True))
    if opts.max_side and max(width, height) > opts.max_side:
        candidates.append(_side_bounded(width, height, opts.max_side, shorter=False))
    if not candidates:
        return None
    w, h = min(candidates, key=lambda size: (size[0] * size[1], size))

    def too_big(w, h):
        return (
            w * h > opts.max_pixels
            or (opts.shorter_side and min(w, h) > opts.shorter_side)
            or (opts.max_side and max(w, h) > opts.max_side)
        )

    while too_big(w, h):
        w, h = (w - 1, h) if w >= h else (w, h - 1)
    return w, h


def _encode_image(
    img: Image.Image, data: bytes, opts: ImageOptions
) -> tuple[bytes, str, str | None, tuple]:
    jpeg = img.format in ("JPEG", "MPO")  # MPO: camera JPEG with extra frames, decodes as JPEG
    width, height = img.size
    small = stored_size(width, height, opts)
    if small is not None and jpeg:
        # Decode at 1/2, 1/4 or 1/8 scale while that leaves at least twice the target size:
        # the DCT does the coarse reduction, the Lanczos filter the last factor of 2 or more.
        img.draft(None, (2 * small[0], 2 * small[1]))
    img.load()  # decodes every pixel: catches truncated and corrupt files
    eight = _to_8bit(img)
    if small is not None or opts.raw:
        # The reader converts to L or RGB anyway (dropping alpha); resize in that mode. Raw
        # imagefolder records are RGB, as the reader reads imagefolder datasets.
        mode = "L" if eight.mode in ("1", "L", "LA") and not opts.raw else "RGB"
        out = eight.convert(mode) if eight.mode != mode else eight
        note = None
        if small is not None:
            out = out.resize(small, Image.Resampling.LANCZOS, reducing_gap=3.0)
            note = f"downscaled from {width}x{height} to {small[0]}x{small[1]}"
        shape = (*out.size, 1 if mode == "L" else 3)
        if opts.raw:
            return records.encode_raw(np.asarray(out)), "raw", note, shape
        if jpeg:
            restarts = opts.jpeg_restarts and restarts_available()  # PIL writes the markers
            return _jpeg_bytes(out, opts.jpeg_quality, restarts), "jpeg", note, shape
        return _png_bytes(out), "png", note, shape
    channels = 1 if eight.mode in ("1", "L", "LA") else 3
    if jpeg:
        kept = restart_indexed(data, img) if opts.jpeg_restarts else data
        return kept, "jpeg", None, (width, height, channels)
    # PNG bytes are kept unless 16-bit (IHDR bit depth, byte 24): 8 bits halve the size and
    # decode the same.
    if img.format == "PNG" and eight is img and data[24] <= 8:
        return data, "png", None, (width, height, channels)
    return _png_bytes(_png_compatible(eight)), "png", None, (width, height, channels)


def _read_regular_file(path: str) -> bytes | None:
    """The file's bytes, or None for a FIFO, socket or device: reading one could block or
    never end (a link to /dev/zero)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: opening a FIFO blocks
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return f.read()


def encode_file(
    root: str, opts: ImageOptions, payload: str | Skip
) -> tuple[bytes | None, str, Any, Any]:
    """Reads and checks one image file of an imagefolder; runs in the worker processes."""
    if isinstance(payload, Skip):
        return None, payload.reason, None, None
    if os.path.splitext(payload)[1].lower() not in IMAGE_EXTENSIONS:
        return None, "not an image file (by extension)", None, None
    try:
        data = _read_regular_file(os.path.join(root, payload))
    except OSError as e:
        return None, f"cannot read the file ({e.strerror or e})", None, None
    if data is None:
        return None, "not a regular file (a FIFO, socket or device)", None, None
    try:
        with warnings.catch_warnings():
            # Images over max_pixels are downscaled here: PIL's warning about size is noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                return _encode_image(img, data, opts)
    except Image.DecompressionBombError as e:
        return None, f"too many pixels to decode safely ({e}); downscale it first", None, None
    except _Unsupported as e:
        return None, str(e), None, None
    except Exception as e:  # PIL raises many exception types for bad files
        return None, f"cannot decode image ({type(e).__name__}: {e})", None, None
