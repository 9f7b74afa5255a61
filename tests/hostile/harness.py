"""The hostile suite's common ground: what a user's files looked like, and what a refusal says.

Each module in tests/hostile/ is a table, one row per thing a careful user might do wrong.
Every row asserts three things: the exit status, the one `error:` line naming what is wrong,
and that the user's files are exactly as they were (`tree_digest` before and after).
"""

from __future__ import annotations

import hashlib
import json
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


def user_workdir(root) -> str:
    """A workdir under `root` holding files of a user's run (a checkpoints folder, metrics)."""
    workdir = os.path.join(str(root), "w")
    os.makedirs(os.path.join(workdir, "checkpoints"))
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": 4, "kind": "train"}) + "\n")
    return workdir


def assert_config_refused(data, root, capfd, overrides: dict, message: str) -> None:
    """The tiny run with `overrides`, in-process through launch.main's one mapping of errors
    to statuses, on a user's workdir: exit 2, one `error:` line starting with `message`, and
    the workdir unchanged."""
    import pytest  # pylint: disable=g-import-not-at-top

    from launch import main as launcher  # pylint: disable=g-import-not-at-top
    from launch import train  # pylint: disable=g-import-not-at-top
    from launch.status import ExitStatus  # pylint: disable=g-import-not-at-top
    from tests import helpers  # pylint: disable=g-import-not-at-top

    workdir = user_workdir(root)
    before = tree_digest(workdir)
    config = helpers.tiny_config(*data, **overrides)
    capfd.readouterr()
    with pytest.raises(SystemExit) as exited:
        launcher.exit_with_status(lambda: train.train_and_evaluate(config, workdir))
    assert exited.value.code == ExitStatus.BAD_INPUT
    line = assert_one_clear_line(capfd.readouterr().err, message)
    assert line.startswith(f"error: {message}")
    assert tree_digest(workdir) == before
