"""Hostile cases for multislice: the slice a host declares (MEGASCALE_NUM_SLICES /
MEGASCALE_SLICE_ID), `launch.local_cluster --slices` and `tools.cluster.gke_jobset --slices`.

Each row asserts the exit status, the one `error:` line, and that the user's files (a workdir
with a file of theirs, the datasets) are exactly as they were. The JobSet generator runs in
this process through its `main`; rows that start the launcher or the supervisor are slow.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from launch.status import ExitStatus
from tests import helpers
from tests.hostile.harness import assert_one_clear_line, tree_digest
from tools.cluster import gke_jobset

GKE_BASE = ["--accelerator=tpu-v6e-slice", "--image=img:1", "--workdir=gs://b/run"]

# (id, arguments after GKE_BASE, what the one line must name)
GKE_ROWS = [
    ("no slices", ["--topology=4x4", "--slices=0"], "--slices must be at least 1, got 0"),
    ("slices not a number", ["--topology=4x4", "--slices=two"], "--slices: invalid int value"),
    (
        "multislice of one-VM slices",
        ["--topology=2x2", "--slices=2"],
        "--slices=2 needs multi-host slices, and tpu-v6e-slice 2x2 runs on one VM",
    ),
    (
        "slice id by hand",
        ["--topology=4x4", "--slices=2", "--env=MEGASCALE_SLICE_ID=1"],
        "--env MEGASCALE_SLICE_ID is written from --slices",
    ),
    (
        "slice count by hand",
        ["--topology=4x4", "--env=MEGASCALE_NUM_SLICES=4"],
        "--env MEGASCALE_NUM_SLICES is written from --slices",
    ),
]


@pytest.mark.parametrize("argv,expected", [r[1:] for r in GKE_ROWS], ids=[r[0] for r in GKE_ROWS])
def test_gke_jobset_refuses(argv, expected, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "resnet.yaml").write_text("the manifest in use")
    before = tree_digest(str(tmp_path))
    with pytest.raises(SystemExit) as exit_:
        gke_jobset.main(GKE_BASE + argv)
    assert exit_.value.code == ExitStatus.BAD_INPUT
    out, err = capsys.readouterr()
    assert out == ""  # nothing for a `> resnet.yaml` to keep
    assert_one_clear_line(err, expected)
    assert tree_digest(str(tmp_path)) == before


# (id, the launcher's environment, what the one line must name)
DECLARED_SLICE_ROWS = [
    (
        "count not a number",
        {"MEGASCALE_NUM_SLICES": "two", "MEGASCALE_SLICE_ID": "0"},
        "MEGASCALE_NUM_SLICES='two' must be a whole number of slices, at least 1",
    ),
    (
        "zero slices",
        {"MEGASCALE_NUM_SLICES": "0"},
        "MEGASCALE_NUM_SLICES='0' must be a whole number of slices, at least 1",
    ),
    (
        "slice id out of range",
        {"MEGASCALE_NUM_SLICES": "2", "MEGASCALE_SLICE_ID": "2"},
        "MEGASCALE_SLICE_ID='2' must be this host's slice, 0 to 1 (MEGASCALE_NUM_SLICES=2)",
    ),
    (
        "slice id without a count",
        {"MEGASCALE_SLICE_ID": "1"},
        "MEGASCALE_SLICE_ID=1 is set without MEGASCALE_NUM_SLICES",
    ),
    (
        "two slices, one process",
        {"MEGASCALE_NUM_SLICES": "2", "MEGASCALE_SLICE_ID": "0"},
        "MEGASCALE_NUM_SLICES=2 but slice(s) 1 have no process (1 process(es) in all)",
    ),
]


def _user_files(data, tmp_path) -> tuple[str, list[str]]:
    """A workdir holding a file of the user's; the trees whose digests must not change."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("mine")
    return str(workdir), [str(tmp_path), *data]


@pytest.mark.slow
@pytest.mark.parametrize(
    "env,expected", [r[1:] for r in DECLARED_SLICE_ROWS], ids=[r[0] for r in DECLARED_SLICE_ROWS]
)
def test_the_launcher_refuses_a_bad_slice_declaration(env, expected, data, tmp_path):
    workdir, trees = _user_files(data, tmp_path)
    before = [tree_digest(t) for t in trees]
    run = subprocess.run(
        [sys.executable, "-m", "launch.main", *helpers.tiny_run_args(*data, workdir)],
        cwd=helpers.REPO, env=dict(helpers.child_env(2), **env), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert run.returncode == ExitStatus.BAD_INPUT, run.stderr[-3000:]
    assert_one_clear_line(run.stderr, expected)
    assert [tree_digest(t) for t in trees] == before


# (id, local_cluster flags, what the one line must name)
SUPERVISOR_ROWS = [
    (
        "slices do not divide",
        ["--num_processes=2", "--slices=3"],
        "--slices=3 must divide --num_processes=2",
    ),
    ("no slices", ["--num_processes=2", "--slices=0"], "--slices=0 must divide"),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags,expected", [r[1:] for r in SUPERVISOR_ROWS], ids=[r[0] for r in SUPERVISOR_ROWS]
)
def test_local_cluster_refuses_bad_slices(flags, expected, data, tmp_path):
    workdir, trees = _user_files(data, tmp_path)
    before = [tree_digest(t) for t in trees]
    run = subprocess.run(
        [sys.executable, "-m", "launch.local_cluster", *flags, "--",
         *helpers.tiny_run_args(*data, workdir)],
        cwd=helpers.REPO, env=helpers.child_env(2), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == ExitStatus.BAD_INPUT, run.stdout[-3000:] + run.stderr[-3000:]
    assert_one_clear_line(run.stderr, expected)
    assert "[p0]" not in run.stdout  # refused before any process started
    assert [tree_digest(t) for t in trees] == before


# (id, each host's environment, what every host's one line must name)
DISAGREEING_HOST_ROWS = [
    (
        "counts differ",
        [{"MEGASCALE_NUM_SLICES": "2", "MEGASCALE_SLICE_ID": "0"}, {}],
        "the hosts declare different MEGASCALE_NUM_SLICES (process 0: 2, process 1: 1)",
    ),
    (
        "slices of unequal size",
        [
            {"MEGASCALE_NUM_SLICES": "2", "MEGASCALE_SLICE_ID": "0"},
            {"MEGASCALE_NUM_SLICES": "2", "MEGASCALE_SLICE_ID": "0"},
            {"MEGASCALE_NUM_SLICES": "2", "MEGASCALE_SLICE_ID": "1"},
        ],
        "slices must have equal numbers of devices, got slice 0: 2, slice 1: 1",
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "envs,expected",
    [r[1:] for r in DISAGREEING_HOST_ROWS],
    ids=[r[0] for r in DISAGREEING_HOST_ROWS],
)
def test_hosts_that_disagree_on_slices_all_refuse(envs, expected, data, tmp_path):
    """Hosts started by hand, as on a real cluster, each with its own slice variables: every
    host learns every declaration and all of them refuse with the same line."""
    import portpicker  # pylint: disable=g-import-not-at-top

    workdir, trees = _user_files(data, tmp_path)
    before = [tree_digest(t) for t in trees]
    address = f"localhost:{portpicker.pick_unused_port()}"
    hosts = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "launch.main",
                *helpers.tiny_run_args(*data, workdir),
                f"--coordinator_address={address}",
                f"--num_processes={len(envs)}",
                f"--process_id={index}",
            ],
            cwd=helpers.REPO,
            env=dict(helpers.child_env(1), **env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for index, env in enumerate(envs)
    ]
    for host in hosts:
        _, err = host.communicate(timeout=300)
        assert host.returncode == ExitStatus.BAD_INPUT, err[-3000:]
        assert_one_clear_line(err, expected)
    assert [tree_digest(t) for t in trees] == before
