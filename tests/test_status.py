"""One table of exit statuses: the shell supervisors and the docs agree with launch.status."""

import os
import re

import pytest

from launch.status import ExitStatus
from tests import helpers

SCRIPTS = ["tools/cluster/tpu_pod.sh", "tools/slurm_train.sbatch"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_shell_constants_equal_the_enum(script):
    text = open(os.path.join(helpers.REPO, script)).read()
    constants = dict(re.findall(r"^STATUS_([A-Z_]+)=(\d+)$", text, flags=re.M))
    assert {"PREEMPTED", "STALLED", "BAD_INPUT"} <= set(constants), constants
    for name, value in constants.items():
        assert ExitStatus[name] == int(value), (script, name)
    # Literal statuses must not creep back in beside the constants.
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert not re.search(r"(==|-eq|!=|-ne)\s*\(?(75|5)\b", code), script


def test_every_status_is_documented():
    table = open(os.path.join(helpers.REPO, "docs", "design.md")).read()
    for status in ExitStatus:
        assert re.search(rf"^\| {int(status)} \|", table, flags=re.M), status


def test_only_preempted_and_stalled_are_retriable():
    assert {s for s in ExitStatus if s.retriable} == {ExitStatus.PREEMPTED, ExitStatus.STALLED}
