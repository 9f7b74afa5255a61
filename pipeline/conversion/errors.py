"""The one exception type a conversion raises for the failures it expects."""


class ConversionError(Exception):
    """An expected failure (bad input, options or output, I/O errors); the CLI prints it
    without a traceback."""
