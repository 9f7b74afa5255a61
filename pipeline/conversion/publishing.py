"""Publishes a finished dataset at OUTPUT, never harming what is there or in the input.

Everything is written into a fresh `OUTPUT.tmp-<pid>-<random>` folder and renamed to OUTPUT
only when complete, so a failed or killed conversion never leaves a folder that looks like a
dataset. The output may not be, hold or lie inside the input; an existing output is replaced
(with `overwrite`) only if it is a symlink or a dataset this package wrote, and nothing but its
own files is ever deleted.
"""

from __future__ import annotations

import os
import re
import stat

from absl import logging

from pipeline import records
from pipeline.conversion.errors import ConversionError


def _is_within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_not_nested(input_path: str, output_dir: str) -> None:
    """The output may not be the input, hold it, or lie inside it (compared as real paths).

    Replacing such an output deletes the input; one inside the input would be read by the next
    conversion (as a class folder of an imagefolder).
    """
    source = os.path.realpath(input_path)
    # Where the output's folder really goes: a symlink at OUTPUT is replaced, not followed.
    target = os.path.join(
        os.path.realpath(os.path.dirname(output_dir)), os.path.basename(output_dir)
    )
    if _is_within(target, source) or _is_within(source, target):
        if target == source:
            how = "is"
        else:
            how = "lies inside" if _is_within(target, source) else "contains"
        real = "" if source == os.path.abspath(input_path) else f" (really {source})"
        raise ConversionError(
            f"output {output_dir!r} {how} the input {input_path!r}{real}; "
            "choose an output folder outside the input"
        )


class _NotOurs(Exception):
    """Why a folder is not a dataset this package wrote (the reason ends the CLI's line)."""


def _shard_names(count: int) -> list[str]:
    return [records.SHARD_PATTERN.format(index=s, count=count) for s in range(count)]


def _is_shard_name(name: str) -> bool:
    """Whether `name` is a shard name of SHARD_PATTERN, of any index and count."""
    match = re.fullmatch(r"data-(\d+)-of-(\d+)\.array_record", name)
    if match is None:
        return False
    return name == records.SHARD_PATTERN.format(index=int(match[1]), count=int(match[2]))


def _own_files(path: str) -> set[str]:
    """The names of the files a dataset written by this package at `path` holds.

    Raises _NotOurs unless metadata.json is a plain file in this project's schema that lists
    exactly the shard names convert() writes, and every entry of the folder is one of those
    names as a plain file. Only such names are ever deleted: a metadata.json listing
    `../x`, an absolute path or a stranger's file must not turn --overwrite into a deletion
    elsewhere.
    """
    metadata_path = os.path.join(path, records.METADATA_FILE)
    if not _is_plain_file(metadata_path):
        raise _NotOurs(f"it has no {records.METADATA_FILE} as a plain file")
    try:
        shards = records.read_metadata(path)["shards"]
    except records.DatasetError as e:
        raise _NotOurs(str(e)) from None
    expected = _shard_names(len(shards))
    if shards != expected:
        foreign = [s for s in shards if not _is_shard_name(s)]
        if foreign:
            raise _NotOurs(f"its {records.METADATA_FILE} lists {foreign[0]!r}, not a shard name")
        listed, ours = next((s, e) for s, e in zip(shards, expected) if s != e)
        raise _NotOurs(
            f"its {records.METADATA_FILE} lists {listed!r} where make_arrayrecord writes {ours!r}"
        )
    own = {records.METADATA_FILE, *shards}
    foreign = [n for n in sorted(os.listdir(path)) if n not in own or not _is_plain_file(path, n)]
    if foreign:
        listed = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if foreign[5:] else "")
        raise _NotOurs(f"it holds files that make_arrayrecord did not write: {listed}")
    return own


def _is_plain_file(*parts: str) -> bool:
    try:
        return stat.S_ISREG(os.lstat(os.path.join(*parts)).st_mode)
    except OSError:
        return False


def existing_output(output_dir: str, overwrite: bool) -> str:
    """What is at OUTPUT: "absent", "empty" (an empty folder), "a symlink" or "a dataset".

    Raises ConversionError when it must not be replaced: without `overwrite` anything but an
    empty folder; with it, anything but a symlink or a folder holding exactly a dataset this
    package wrote (see _own_files; hidden files count too: whatever else sits there may be
    someone's work).
    """
    if not os.path.lexists(output_dir):
        return "absent"
    if os.path.islink(output_dir):
        kind = "a symlink"
    elif not os.path.isdir(output_dir):
        raise ConversionError(f"output {output_dir!r} is a file, not a folder; not replacing it")
    elif not os.listdir(output_dir):
        return "empty"
    else:
        try:
            _own_files(output_dir)
        except _NotOurs as e:
            raise ConversionError(
                f"output {output_dir!r} is not a dataset written by make_arrayrecord ({e}); "
                "not replacing it: choose another --output"
            ) from None
        kind = "a dataset"
    if not overwrite:
        raise ConversionError(
            f"output {output_dir!r} already exists ({kind}); pass --overwrite to replace it"
        )
    return kind


def fresh_folder(prefix: str) -> str:
    """Creates PREFIX-<random>: never a folder someone else (or an earlier run) left there.

    Not tempfile.mkdtemp: its mode 0700 would be the published dataset's.
    """
    while True:
        path = f"{prefix}-{os.urandom(4).hex()}"
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue


def _aside_name(output_dir: str) -> str:
    for n in range(1000):
        old = f"{output_dir}.old-{os.getpid()}-{n}"
        if not os.path.lexists(old):
            return old
    raise ConversionError(f"too many {output_dir}.old-* entries; remove them")


def publish(tmp: str, output_dir: str, overwrite: bool) -> None:
    kind = existing_output(output_dir, overwrite)  # again: it may have changed meanwhile
    if kind in ("absent", "empty"):
        os.rename(tmp, output_dir)  # rename(2) replaces an empty folder atomically
        return
    own = _own_files(output_dir) if kind == "a dataset" else set()
    old = _aside_name(output_dir)
    os.rename(output_dir, old)
    try:
        os.rename(tmp, output_dir)
    except OSError:
        os.rename(old, output_dir)
        raise
    try:
        if kind == "a symlink":
            if os.path.islink(old):
                os.remove(old)  # the link only: whatever it pointed at is left alone
        else:
            _remove_own_files(old, own)
            os.rmdir(old)  # fails if anything else appeared meanwhile
    except OSError as e:  # the new dataset is in place: not a failure of the conversion
        logging.warning("the replaced dataset is left at %s (%s); delete it yourself", old, e)


def _remove_own_files(folder: str, own: set[str]) -> None:
    """Deletes the plain files named in `own` (plain names, see _own_files) from `folder`,
    through a descriptor of the folder itself: nothing outside it can be reached."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        for name in os.listdir(fd):
            if name in own and stat.S_ISREG(
                os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode
            ):
                os.unlink(name, dir_fd=fd)
    finally:
        os.close(fd)
