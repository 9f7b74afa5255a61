"""Reads an imagefolder: INPUT/<class>/<image>, class index = position in the sorted folder
names.

Symlinks are followed, but no file becomes two examples (see _list_imagefolder for the rules).
The files themselves are read and checked later, in the workers (images.encode_file).
"""

from __future__ import annotations

import collections
import functools
import os

from absl import logging

from pipeline.conversion.errors import ConversionError
from pipeline.conversion.images import ImageOptions, encode_file
from pipeline.conversion.source import Skip, Source


def _sorted_entries(path: str) -> list[os.DirEntry]:
    with os.scandir(path) as entries:
        return sorted(entries, key=lambda e: e.name)


def _class_of(real: str, label_of_real: dict[str, int]) -> int | None:
    """The class whose (real) folder is or holds the real path `real`, if any."""
    while True:
        if real in label_of_real:
            return label_of_real[real]
        parent = os.path.dirname(real)
        if parent == real:
            return None
        real = parent


def _walk_class(
    path: str, label: int, classes: list[str], reals: list[str], label_of_real: dict[str, int]
) -> list[tuple[str, str | None]]:
    """Lists one class folder depth-first in sorted order, following symlinks.

    Returns (relpath, real path) per file, the real path only for files reached through a
    symlink (it decides which class they belong to). Each directory (device, inode) is read
    at most once per class, so symlink loops end; a directory link into another class's folder
    is not followed.
    """
    files, seen = [], set()
    stack = [(path, classes[label], reals[label], False)]
    while stack:
        path, rel, real, linked = stack.pop()
        st = os.stat(path)
        if (st.st_dev, st.st_ino) in seen:
            logging.warning("%s: a directory already read in this class, not read again", rel)
            continue
        seen.add((st.st_dev, st.st_ino))
        subdirs = []
        for entry in _sorted_entries(path):
            if entry.name.startswith("."):
                continue
            is_link = entry.is_symlink()
            child = os.path.realpath(entry.path) if is_link else os.path.join(real, entry.name)
            child_rel = f"{rel}/{entry.name}"
            if not entry.is_dir():  # is_dir follows symlinks
                files.append((child_rel, child if linked or is_link else None))
            elif (
                (linked or is_link)
                and (other := _class_of(child, label_of_real)) is not None
                and other != label
            ):
                logging.warning(
                    "%s: leads into class folder %r (through a symlink); not followed",
                    child_rel,
                    classes[other],
                )
            else:
                subdirs.append((entry.path, child_rel, child, linked or is_link))
        stack.extend(reversed(subdirs))
    return files


def _resolve_links(
    per_class: list[list[tuple[str, str | None]]],
    classes: list[str],
    reals: list[str],
    label_of_real: dict[str, int],
) -> dict[str, str]:
    """Which files reached through symlinks to skip (see _list_imagefolder): relpath -> why."""
    linked = collections.defaultdict(list)  # real path -> [(label, relpath)] in sorted order
    for label, files in enumerate(per_class):
        for rel, real in files:
            if real is not None:
                linked[real].append((label, rel))
    if not linked:
        return {}
    direct = {}  # real path -> relpath, for linked files that are also reached directly
    for label, files in enumerate(per_class):
        for rel, real in files:
            if real is None:
                real = os.path.join(reals[label], rel.split("/", 1)[1])
                if real in linked:
                    direct[real] = rel
    skip = {}
    for real, links in linked.items():
        if real in direct:
            for _, rel in links:
                skip[rel] = f"a link to {direct[real]}, which is read as itself"
            continue
        lies_in = _class_of(real, label_of_real)
        labels = sorted({label for label, _ in links})
        if lies_in is not None:  # in a class folder, but where its walk does not go (hidden)
            keep = next((link for link in links if link[0] == lies_in), None)
        else:
            keep = links[0] if len(labels) == 1 else None
        for link in links:
            if link is keep:
                continue
            if keep is not None and link[0] == keep[0]:
                skip[link[1]] = f"a link to the same file as {keep[1]}"
            elif lies_in is not None:
                skip[link[1]] = f"a link into class folder {classes[lies_in]!r}"
            else:
                names = " and ".join(repr(classes[i]) for i in labels)
                skip[link[1]] = f"the same file is linked from classes {names}: ambiguous label"
    return skip


def _list_imagefolder(path: str) -> tuple[list[str], list[tuple[int, int, str | Skip]]]:
    """The classes, and (example id, label, relpath or Skip) for every candidate file.

    Symlink rules, which make one file one example with one label, whatever links point at it:
    * a class is a folder, or a symlink to one, directly in INPUT; two classes that are the
      same directory, or one inside the other, are an error;
    * inside a class folder, file and directory symlinks are followed in sorted order; each
      directory is read once per class (loops end); a directory link into another class's
      folder is not followed;
    * a file is identified by its real path. Reached directly (no symlink below its class
      folder), it is read there and every link to it is skipped. Reached only through links,
      it goes to the class whose folder it lies in, if any (links from other classes are
      skipped), else to the one class linking it (its first link in sorted order); linked from
      several classes and lying in none, its label is ambiguous and every link is skipped.
    Skipped files stay candidates (they take an id, so they shift no other id) and are listed
    in metadata's `skipped`; --strict does not fail on them.
    """
    if not os.path.isdir(path):
        raise ConversionError(f"imagefolder input {path!r} is not a directory")
    classes = [e.name for e in _sorted_entries(path) if e.is_dir() and not e.name.startswith(".")]
    if not classes:
        raise ConversionError(
            f"no class sub-folders in {path!r} (imagefolder expects INPUT/<class>/<image>)"
        )
    reals = [os.path.realpath(os.path.join(path, c)) for c in classes]
    # With a trailing separator, a folder is a prefix of what it holds, and sorted, a folder
    # that holds others is directly followed by one of them.
    key = [real.rstrip(os.sep) + os.sep for real in reals]
    order = sorted(range(len(classes)), key=key.__getitem__)
    for outer, inner in zip(order, order[1:]):
        if key[inner].startswith(key[outer]):
            raise ConversionError(
                f"class folders {classes[outer]!r} and {classes[inner]!r} of {path!r} are the "
                "same directory or one holds the other (through a symlink): each class needs "
                "its own folder"
            )
    label_of_real = {real: label for label, real in enumerate(reals)}

    per_class = []
    for label, name in enumerate(classes):
        files = _walk_class(os.path.join(path, name), label, classes, reals, label_of_real)
        files.sort(key=lambda file: file[0])
        if not files:
            logging.warning("class folder %r has no files; it stays class %d", name, label)
        per_class.append(files)
    skip = _resolve_links(per_class, classes, reals, label_of_real)

    items: list[tuple[int, int, str | Skip]] = []
    for label, files in enumerate(per_class):
        # Ids follow the sorted list of ALL candidates, so a skipped file shifts no other id.
        for rel, _ in files:
            payload = Skip(rel, skip[rel]) if rel in skip else rel
            items.append((len(items), label, payload))
    return classes, items


def read_imagefolder(path: str, split: str | None, opts: ImageOptions) -> Source:
    classes, items = _list_imagefolder(path)
    if not items:
        raise ConversionError(f"no files in the class folders of {path!r}")
    # Output size ~ input size; stat a sample rather than every file (slow on network disks).
    step = max(1, len(items) // 1000)
    sample = [os.path.join(path, p) for _, _, p in items[::step] if isinstance(p, str)]
    sizes = [os.path.getsize(p) for p in sample if os.path.isfile(p)]
    return Source(
        split,
        classes,
        None,
        items,
        functools.partial(encode_file, path, opts),
        sum(sizes) / max(1, len(sizes)),
    )
