"""The exceptions a conversion raises for the failures it expects."""


class ConversionError(Exception):
    """An expected failure: bad input, options or output. The CLI prints it in one line
    without a traceback and exits 2 (launch/status.py BAD_INPUT)."""


class OutputWriteError(ConversionError):
    """Writing the output failed (a full disk, no permission): the CLI exits 1 (FAILED), and
    nothing half-written is left."""
