"""The hostile suite's common ground: what a user's files looked like, and what a refusal says.

Each module in tests/hostile/ is a table, one row per thing a careful user might do wrong.
Every row asserts three things: the exit status, the one `error:` line naming what is wrong,
and that the user's files are exactly as they were (`tree_digest` before and after).
"""

from __future__ import annotations

import hashlib
import os


def tree_digest(root: str) -> dict[str, str]:
    """Every path under `root` (relative) -> its content digest, "dir", or "link:TARGET".

    Equal digests before and after a case mean nothing was created, changed or deleted.
    A missing root digests to {}.
    """
    digest: dict[str, str] = {}
    if not os.path.lexists(root):
        return digest
    for folder, dirs, files in os.walk(root):
        for name in sorted(dirs + files):
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                digest[rel] = "link:" + os.readlink(path)
            elif os.path.isdir(path):
                digest[rel] = "dir"
            else:
                with open(path, "rb") as f:
                    digest[rel] = hashlib.sha256(f.read()).hexdigest()
    return digest


def error_lines(output: str) -> list[str]:
    """The lines of `output` that report an error to the user (`error: ...`)."""
    return [line for line in output.splitlines() if line.startswith("error:")]


def assert_one_clear_line(output: str, *expected: str) -> str:
    """`output` (stderr) holds exactly one `error:` line, no traceback, and that line names
    every string in `expected`. Returns the line."""
    assert "Traceback (most recent call last)" not in output, output[-3000:]
    lines = error_lines(output)
    assert len(lines) == 1, f"expected one error line, got {lines!r}\n{output[-3000:]}"
    for text in expected:
        assert text in lines[0], f"{text!r} not in {lines[0]!r}"
    return lines[0]
