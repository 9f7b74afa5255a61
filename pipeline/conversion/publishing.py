"""Publishes a finished dataset at OUTPUT, never harming what is there or in the input.

Everything is written into a fresh `OUTPUT.tmp-<pid>-<random>` folder and renamed to OUTPUT
only when complete, so a failed or killed conversion never leaves a folder that looks like a
dataset. The output may not be, hold or lie inside the input; an existing output is replaced
(with `overwrite`) only if it is a symlink or a dataset this package wrote, and nothing but its
own files is ever deleted.
"""

from __future__ import annotations

import json
import os

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


def _own_files(path: str) -> list[str] | None:
    """The files a dataset written by this package holds, if `path` is one; else None."""
    try:
        with open(os.path.join(path, records.METADATA_FILE), "rb") as f:
            shards = json.loads(f.read()).get("shards")
    except (OSError, ValueError, AttributeError):  # no file, not JSON, not a JSON object
        return None
    if not (isinstance(shards, list) and all(isinstance(s, str) for s in shards)):
        return None
    return [records.METADATA_FILE, *shards]


def existing_output(output_dir: str, overwrite: bool) -> str:
    """What is at OUTPUT: "absent", "empty" (an empty folder), "a symlink" or "a dataset".

    Raises ConversionError when it must not be replaced: without `overwrite` anything but an
    empty folder; with it, anything but a symlink or a folder holding exactly a dataset this
    package wrote (metadata.json and its shards as plain files, nothing else, hidden files
    included: whatever else sits there may be someone's work).
    """
    if not os.path.lexists(output_dir):
        return "absent"
    if os.path.islink(output_dir):
        kind = "a symlink"
    elif not os.path.isdir(output_dir):
        raise ConversionError(f"output {output_dir!r} is a file, not a folder; not replacing it")
    else:
        names = sorted(os.listdir(output_dir))
        if not names:
            return "empty"
        own = _own_files(output_dir)
        foreign = [
            n
            for n in names
            if own is None
            or n not in own
            or os.path.islink(os.path.join(output_dir, n))
            or not os.path.isfile(os.path.join(output_dir, n))
        ]
        if foreign:
            listed = ", ".join(foreign[:5]) + (
                f" and {len(foreign) - 5} more" if foreign[5:] else ""
            )
            what = (
                f"is not a dataset written by make_arrayrecord (it holds {listed})"
                if own is None
                else f"holds files that make_arrayrecord did not write ({listed})"
            )
            raise ConversionError(
                f"output {output_dir!r} {what}; not replacing it: choose another --output"
            )
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
    own = _own_files(output_dir) if kind == "a dataset" else None
    old = _aside_name(output_dir)
    os.rename(output_dir, old)
    try:
        os.rename(tmp, output_dir)
    except OSError:
        os.rename(old, output_dir)
        raise
    try:
        if kind == "a symlink":
            os.remove(old)  # the link only: whatever it pointed at is left alone
        else:
            # Only the files this package wrote; rmdir fails if anything else appeared.
            assert own is not None  # kind is "a dataset": _own_files found one
            for name in own:
                os.remove(os.path.join(old, name))
            os.rmdir(old)
    except OSError as e:  # the new dataset is in place: not a failure of the conversion
        logging.warning("the replaced dataset is left at %s (%s); delete it yourself", old, e)
