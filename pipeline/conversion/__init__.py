"""Converts an image dataset into sharded ArrayRecord files in the schema of records.py.

The command line is `python -m tools.make_arrayrecord`; the launcher calls `convert` directly
for the embedded demo data. docs/data.md is the user's reference for everything here.

The modules, in the order a conversion uses them:
  converter    convert(): checks the options, then runs the steps below
  imagefolder  reads INPUT/<class>/<image> folders, with the symlink rules
  mnist        reads MNIST IDX files
  cifar        reads CIFAR-10/100 pickle batches, with a restricted unpickler
  source       what every reader returns (Source) and the splits
  images       per-image work in the workers: decode check, 8 bits, size bounds, encoding
  writing      the shards, in example order, and the size statistics of metadata.json
  progress     the progress line
  publishing   the --overwrite rules and the atomic rename into place
  stopping     Ctrl-C, SIGTERM and SIGHUP under the CLI: stop, publish nothing
  errors       ConversionError, the failures the CLI prints in one line
"""

from pipeline.conversion.converter import ENCODINGS, FORMATS, convert
from pipeline.conversion.errors import ConversionError, OutputWriteError
from pipeline.conversion.images import DEFAULT_MAX_PIXELS, JPEG_QUALITY, MAX_PIXELS_LIMIT
from pipeline.conversion.source import SPLITS
from pipeline.conversion.writing import WRITER_OPTIONS

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "ENCODINGS",
    "FORMATS",
    "JPEG_QUALITY",
    "MAX_PIXELS_LIMIT",
    "SPLITS",
    "WRITER_OPTIONS",
    "ConversionError",
    "OutputWriteError",
    "convert",
]
