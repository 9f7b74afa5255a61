"""Hostile cases for tools/cluster/tpu_pod (tpu_pod.sh), one row per case.

A command line that cannot work is refused in one `error:` line with exit 2 before any gcloud
call; a workdir that supervise cannot list is refused with exit 1 before anything is created or
deleted. The user's files (a prepared tarball, earlier logs) stay exactly as they were.
"""

from __future__ import annotations

import pytest

from launch.status import ExitStatus
from tests.hostile.harness import assert_one_clear_line, tree_digest
from tools.cluster import pod_gcloud, tpu_pod

BASE = ["--name=my-tpu", "--zone=us-central2-b", "--project=my-proj"]
WORKDIR = "--workdir=gs://my-bucket/runs/r1"
SUPERVISE = ["supervise", *BASE, "--accelerator-type=v5litepod-16", WORKDIR]


class Refusing(pod_gcloud.Gcloud):
    """gcloud that no call should reach but `storage ls`, which it refuses as gcloud does."""

    calls: list[list[str]] = []

    def execute(self, argv, limit, capture, out_path, err_path):
        Refusing.calls.append(argv)
        assert argv[1:3] == ["storage", "ls"], argv
        return pod_gcloud.Result(
            1, "", "ERROR: (gcloud.storage.ls) PERMISSION_DENIED: my@me has no storage.objects.list"
        )


CASES = [
    pytest.param(["create", *BASE, "--accelerator-type=v4-8", "--slices=0"],
                 ("--slices must be a positive integer, got '0'",), id="zero-slices"),
    pytest.param(["create", *BASE, "--accelerator-type=v4-8", "--elastic"],
                 ("--elastic needs --slices=N with N > 1",), id="elastic-one-slice"),
    pytest.param([*SUPERVISE, "--slices=2", "--elastic"],
                 ("--elastic needs the global batch",), id="elastic-no-batch"),
    pytest.param([*SUPERVISE[:-2], "--accelerator-type=tpu7x-64", "--runtime-version=r", WORKDIR,
                  "--slices=2", "--elastic", "--global-batch=64"],
                 ("unknown device count", "tpu7x-64"), id="elastic-unknown-type"),
    pytest.param(["create", *BASE, "--accelerator-type=v4-8", "--slices=2",
                  "--node-prefix=My_Pod"], ("--node-prefix must be lowercase",), id="bad-prefix"),
    pytest.param(["logs", *BASE, "--slices=2", "--slice=5"],
                 ("--slice must be below --slices=2",), id="slice-out-of-range"),
    pytest.param(["logs", *BASE, "--all-workers", "--logs-dir="],
                 ("--logs-dir must not be empty",), id="empty-logs-dir"),
    pytest.param([*SUPERVISE, "--tarball={root}/missing.tar.gz"],
                 ("--tarball: no such file",), id="missing-tarball"),
    pytest.param([*SUPERVISE, "--tarball={root}/src.tar.gz", "--repo-url=https://x/r.git"],
                 ("use only one of --tarball and --repo-url",), id="tarball-and-url"),
    pytest.param(["train", *BASE, "--workdir={root}"], ("must be a gs://BUCKET/PATH URL",),
                 id="local-workdir"),
    pytest.param(["train", *BASE, WORKDIR, "--env=MY-KEY=1"], ("--env takes KEY=VALUE",),
                 id="bad-env"),
    pytest.param([*SUPERVISE, "--max-restarts=-1"],
                 ("--max-restarts must be a non-negative integer",), id="negative-restarts"),
    pytest.param(["create", *BASE, "--accelerator-type=v4-8", "--wait=yes"],
                 ("--wait takes no value",), id="switch-with-value"),
    pytest.param(["create", *BASE, "--accelerator-type=v9-8"],
                 ("no default runtime version", "v9-8"), id="unknown-type"),
]  # fmt: skip


@pytest.fixture
def user_files(tmp_path):
    root = tmp_path / "user"
    (root / "tpu-logs" / "my-tpu-20250101T000000Z-exit1").mkdir(parents=True)
    (root / "tpu-logs" / "my-tpu-20250101T000000Z-exit1" / "worker-0.log").write_text("old\n")
    (root / "src.tar.gz").write_bytes(b"the user's archive")
    return root


def _run(args, root, capsys) -> tuple[int, str]:
    """tpu_pod in this process, with a gcloud on PATH that `Refusing` stands in for."""
    Refusing.calls = []
    argv = [a.replace("{root}", str(root)) for a in args]
    if not any(a.startswith("--logs-dir=") for a in argv):
        argv.append(f"--logs-dir={root}/tpu-logs")
    bin_dir = root.parent / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "gcloud").write_text("#!/bin/sh\nexit 99\n")
    (bin_dir / "gcloud").chmod(0o755)
    environ = {"PATH": str(bin_dir), "TMPDIR": str(root.parent)}
    rc = tpu_pod.main(argv, environ, Refusing, sleep=lambda s: None, clock=lambda: 0.0)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("args,expected", CASES)
def test_refused_before_any_call(args, expected, user_files, capsys):
    before = tree_digest(str(user_files))
    rc, err = _run(args, user_files, capsys)
    assert rc == ExitStatus.BAD_INPUT
    assert_one_clear_line(err, *expected)
    assert Refusing.calls == []
    assert tree_digest(str(user_files)) == before


def test_supervise_refuses_a_workdir_it_cannot_list(user_files, capsys):
    before = tree_digest(str(user_files))
    rc, err = _run([*SUPERVISE, "--tarball={root}/src.tar.gz"], user_files, capsys)
    assert rc == ExitStatus.FAILED
    assert_one_clear_line(err, "cannot list gs://my-bucket/runs/r1/", "PERMISSION_DENIED")
    assert [argv[1:3] for argv in Refusing.calls] == [["storage", "ls"]]
    assert tree_digest(str(user_files)) == before
