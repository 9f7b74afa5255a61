"""Command line for converting image datasets to ArrayRecord (see pipeline/conversion/).

    python -m tools.make_arrayrecord --format=mnist --input=/data/mnist --split=test \
        --output=/data/mnist_ar/test
    python -m tools.make_arrayrecord --format=imagefolder --input=/data/imagenet/train \
        --output=/data/imagenet_ar/train --num_workers=16
    # stored at training resolution: shorter side at most 320 px, JPEG quality 90
    python -m tools.make_arrayrecord --format=imagefolder --input=/data/imagenet/train \
        --output=/data/imagenet_ar320/train --num_workers=16 --shorter_side=320 --jpeg_quality=90

docs/data.md describes every option and the metadata.json written.

Expected failures print one line, `error: ...`, on stderr, with no traceback, and exit with a
status of launch/status.py: 2 (BAD_INPUT) for a bad flag, a missing or empty input, an unknown
format, an unreadable file with --strict, an output that is in use (without --overwrite), one
that must never be replaced (not a dataset this tool wrote) or that is, holds or lies inside the
input; 1 (FAILED) when writing the output fails, such as a full disk or an unwritable folder
(then nothing half-written is left behind). Ctrl-C, SIGTERM or SIGHUP stop the conversion with
128 + the signal's number (130 for Ctrl-C): the temporary folder is deleted, the workers end,
and nothing is published.
"""

from __future__ import annotations

import signal
import sys

from absl import app, flags, logging

from launch.status import ExitStatus
from pipeline.conversion import (
    DEFAULT_MAX_PIXELS,
    ENCODINGS,
    FORMATS,
    JPEG_QUALITY,
    MAX_PIXELS_LIMIT,
    SPLITS,
    ConversionError,
    OutputWriteError,
    convert,
    stopping,
)
from pipeline.records import RAW_MAX_SIDE

# ------------------------------------------------------------------------------ CLI


def define_flags(values: flags.FlagValues) -> flags.FlagValues:
    """Defines the command's flags in `values`: the global FLAGS when run as a program (so
    importing convert() adds no global flags), a fresh FlagValues for `command`."""
    flags.DEFINE_enum("format", None, FORMATS, "Input dataset format.", flag_values=values)
    flags.DEFINE_string(
        "input", None, "Input folder (see the module docstring per format).", flag_values=values
    )
    flags.DEFINE_string(
        "output", None, "Output dataset folder (created; must not be in use).", flag_values=values
    )
    flags.DEFINE_enum(
        "split",
        None,
        SPLITS,
        "mnist/cifar: which split to convert (default: "
        "the only one present). imagefolder: just recorded in the metadata.",
        flag_values=values,
    )
    flags.DEFINE_integer(
        "num_shards",
        None,
        "Shard files (default: ~1 GiB each, at least 1).",
        lower_bound=1,
        flag_values=values,
    )
    flags.DEFINE_integer(
        "num_workers",
        1,
        "Processes reading and encoding images.",
        lower_bound=1,
        flag_values=values,
    )
    flags.DEFINE_bool(
        "strict", False, "Fail on any unreadable file instead of skipping it.", flag_values=values
    )
    flags.DEFINE_bool(
        "overwrite",
        False,
        "Replace what is at --output if it is a dataset this tool wrote (and nothing else) or "
        "a symlink (the link is replaced; its target is left alone).",
        flag_values=values,
    )
    flags.DEFINE_integer(
        "max_pixels",
        DEFAULT_MAX_PIXELS,
        "imagefolder: images with more pixels are downscaled to fit (JPEG stays JPEG at "
        "--jpeg_quality; others become PNG) and listed in metadata. At most "
        f"{MAX_PIXELS_LIMIT}, PIL's decompression-bomb threshold.",
        lower_bound=1,
        upper_bound=MAX_PIXELS_LIMIT,
        flag_values=values,
    )
    flags.DEFINE_integer(
        "shorter_side",
        None,
        "imagefolder: store images at training resolution: an image whose shorter side is "
        "longer than this is downscaled once (Lanczos, aspect kept) to this shorter side; "
        "smaller images keep their size. E.g. 256-320 for 224 px training.",
        lower_bound=1,
        upper_bound=RAW_MAX_SIDE,
        flag_values=values,
    )
    flags.DEFINE_integer(
        "max_side",
        None,
        "imagefolder: likewise, a bound on the longer side (FFCV's max_resolution).",
        lower_bound=1,
        upper_bound=RAW_MAX_SIDE,
        flag_values=values,
    )
    flags.DEFINE_integer(
        "jpeg_quality",
        JPEG_QUALITY,
        "JPEG quality of the images that are downscaled (others keep their coefficients).",
        lower_bound=1,
        upper_bound=100,
        flag_values=values,
    )
    flags.DEFINE_bool(
        "jpeg_restarts",
        True,
        "imagefolder: store JPEGs re-encoded losslessly (same pixels) with restart markers, so "
        "that training decodes only a crop's share of each (docs/data.md); off: their bytes "
        "as they are.",
        flag_values=values,
    )
    flags.DEFINE_enum(
        "encoding",
        None,
        ENCODINGS,
        "How records store images: raw (uint8 pixels: decoding is a copy; the default for "
        "mnist and cifar; for imagefolder every image must have one size) or encoded "
        "(PNG/JPEG; the default for imagefolder).",
        flag_values=values,
    )
    flags.mark_flags_as_required(["format", "input", "output"], flag_values=values)
    return values


def _fail(status: int, message: str) -> int:
    print(f"error: {message}", file=sys.stderr, flush=True)
    return status


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with a bad or missing flag as one line and exit status 2."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        sys.exit(_fail(ExitStatus.BAD_INPUT, str(e)))


def command(argv: list[str]) -> int:
    """The whole command line in this process (argv[0] is the program): returns the exit
    status, having printed the one error line if it is not 0."""
    values = define_flags(flags.FlagValues())
    try:
        rest = values(argv)
    except flags.Error as e:
        return _fail(ExitStatus.BAD_INPUT, str(e))
    return run(values, rest[1:])


def run(f: flags.FlagValues, extra: list[str]) -> int:
    """Converts as the parsed flags say; returns the exit status (module docstring)."""
    if extra:
        return _fail(ExitStatus.BAD_INPUT, f"unexpected arguments: {' '.join(extra)}")
    with stopping.stop_on_signals():
        try:
            convert(
                f.format,
                f.input,
                f.output,
                split=f.split,
                num_shards=f.num_shards,
                num_workers=f.num_workers,
                strict=f.strict,
                overwrite=f.overwrite,
                max_pixels=f.max_pixels,
                shorter_side=f.shorter_side,
                max_side=f.max_side,
                jpeg_quality=f.jpeg_quality,
                jpeg_restarts=f.jpeg_restarts,
                encoding=f.encoding,
            )
        except stopping.Interrupted as e:
            return _fail(
                128 + e.signum,
                f"interrupted ({e}); nothing was published and {f.output!r} is unchanged",
            )
        except OutputWriteError as e:
            return _fail(ExitStatus.FAILED, str(e))
        except ConversionError as e:
            return _fail(ExitStatus.BAD_INPUT, str(e))
        late = stopping.received()
    if late is not None:
        logging.warning(
            "%s arrived while the dataset was being published: %s is complete",
            signal.Signals(late).name,
            f.output,
        )
    return 0


def main(argv: list[str]) -> int:
    return run(flags.FLAGS, argv[1:])


if __name__ == "__main__":
    define_flags(flags.FLAGS)
    app.run(main, flags_parser=_parse_flags)
