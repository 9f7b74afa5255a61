# Partial JPEG decoding, built from _jpegcrop.c at install time (pyproject.toml).
def decode_crop(
    data: bytes | bytearray | memoryview,
    left: int,
    top: int,
    right: int,
    bottom: int,
    scale: int,
    channels: int,
    fast_dct: bool,
    /,
) -> tuple[bytearray, int, int, int]: ...
def restart_index(data: bytes | bytearray | memoryview, max_mcus: int, /) -> bytes: ...
