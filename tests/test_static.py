"""Static checks, as part of the suite: ruff (lint and format) on everything, mypy on the
packages (launch, pipeline, resnet; configured in pyproject.toml)."""

import subprocess
import sys

import pytest

from tests import helpers


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=helpers.REPO, capture_output=True, text=True, timeout=600
    )


@pytest.mark.parametrize("command", [("check", "."), ("format", "--check", ".")])
def test_ruff_is_clean(command):
    run = _run("ruff", *command)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]


@pytest.mark.slow
def test_mypy_is_clean():
    run = _run("mypy")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Success: no issues found" in run.stdout
