"""One table of exit statuses: the supervisors and the docs agree with launch.status."""

import os
import re

import pytest

from launch.status import ExitStatus
from tests import helpers

SCRIPTS = ["tools/cluster/slurm_train.sbatch"]
TPU_POD_MODULES = ["pod_supervisor", "pod_driver", "pod_gcloud", "tpu_pod"]


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


def test_tpu_pod_reads_the_enum():
    from tools.cluster import pod_supervisor

    assert pod_supervisor.RETRIABLE == {s for s in ExitStatus if s.retriable}
    assert set(pod_supervisor.FATAL) == {ExitStatus.BAD_INPUT, ExitStatus.DIVERGED}
    assert pod_supervisor.combine(["75", "running"]).kind == "retriable"
    assert pod_supervisor.combine([str(int(ExitStatus.STALLED))]).kind == "retriable"
    assert pod_supervisor.combine([str(int(ExitStatus.SAVE_FAILED))]).kind == "failed"
    for module in TPU_POD_MODULES:
        path = os.path.join(helpers.REPO, "tools", "cluster", module + ".py")
        code = "\n".join(line.split("#", 1)[0] for line in open(path).read().splitlines())
        # Launcher statuses come from ExitStatus, not from literals.
        assert not re.search(r"(==|!=)\s*\(?(75|5)\b", code), module


def test_every_status_is_documented():
    table = open(os.path.join(helpers.REPO, "docs", "design.md")).read()
    for status in ExitStatus:
        assert re.search(rf"^\| {int(status)} \|", table, flags=re.M), status


def test_only_preempted_and_stalled_are_retriable():
    assert {s for s in ExitStatus if s.retriable} == {ExitStatus.PREEMPTED, ExitStatus.STALLED}
