"""Hostile cases at the edges: the converter (tools.make_arrayrecord), the local supervisor
(launch.local_cluster) and the Slurm batch script. Each row asserts the exit status, the one
`error:` line, and that every file under tmp_path (input, output, a decoy outside both) is as
it was. The converter runs in this process through `make_arrayrecord.command`; rows that need
a process of their own are marked slow. The local_cluster runs with the real launcher are in
tests/integration/test_liveness.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from launch.status import ExitStatus
from pipeline import conversion, records
from tests import helpers
from tests.hostile.harness import assert_one_clear_line, tree_digest
from tests.pipeline.test_make_arrayrecord import make_mnist
from tools import make_arrayrecord

SHARDS = ["data-00000-of-00002.array_record", "data-00001-of-00002.array_record"]
NOT_OURS = "not a dataset written by make_arrayrecord"


def _dataset(root) -> None:
    """root/in (20 MNIST digits), root/out (their dataset, 2 shards), root/decoy."""
    make_mnist(root / "in")
    conversion.convert("mnist", str(root / "in"), str(root / "out"), num_shards=2, progress=False)
    assert sorted(os.listdir(root / "out")) == sorted(SHARDS + [records.METADATA_FILE])
    (root / "decoy").write_text("someone's work")


def _rewrite_metadata(root, **fields) -> None:
    path = root / "out" / records.METADATA_FILE
    metadata = json.loads(path.read_text())
    metadata.update(fields)
    path.write_text(json.dumps(metadata))


def _lists(*extra):
    """Lists `extra` as shards too, with consistent counts: only the names are wrong."""
    return lambda root: _rewrite_metadata(
        root, shards=SHARDS + [e(root) if callable(e) else e for e in extra],
        shard_sizes=[10, 10] + [0] * len(extra),
    )  # fmt: skip


def _with_file(name: str, poison=None):
    def apply(root):
        os.makedirs(os.path.dirname(root / "out" / name), exist_ok=True)
        (root / "out" / name).write_text("mine")
        if poison:
            poison(root)

    return apply


def _symlinked_shard(root) -> None:
    os.remove(root / "out" / SHARDS[1])
    os.symlink(root / "decoy", root / "out" / SHARDS[1])


def _symlinked_metadata(root) -> None:
    shutil.copy(root / "out" / records.METADATA_FILE, root / "elsewhere.json")
    os.remove(root / "out" / records.METADATA_FILE)
    os.symlink(root / "elsewhere.json", root / "out" / records.METADATA_FILE)


# (id, what is done to root/out, what the one line must name besides NOT_OURS)
POISONED_OUTPUTS = [
    ("parent path", _lists("../decoy"), "'../decoy'"),
    ("absolute path", _lists(lambda root: str(root / "decoy")), "decoy'"),
    ("subfolder path", _with_file("sub/x", _lists("sub/x")), "'sub/x'"),
    ("foreign name", _with_file("notes.txt", _lists("notes.txt")), "'notes.txt'"),
    (
        "shards out of order",
        lambda root: _rewrite_metadata(root, shards=SHARDS[::-1]),
        "where make_arrayrecord writes",
    ),
    (
        "unparseable",
        lambda root: (root / "out" / records.METADATA_FILE).write_text("{not json"),
        "not valid JSON",
    ),
    (
        "not the schema",
        lambda root: (root / "out" / records.METADATA_FILE).write_text('{"shards": ["../decoy"]}'),
        "schema version",
    ),
    ("symlink shard", _symlinked_shard, f"did not write: {SHARDS[1]}"),
    ("symlink metadata", _symlinked_metadata, "no metadata.json as a plain file"),
    ("unknown file", _with_file("README.md"), "did not write: README.md"),
    ("hidden file", _with_file(".DS_Store"), "did not write: .DS_Store"),
]


def _convert_args(root, *extra: str) -> list[str]:
    return [
        "make_arrayrecord", "--format=mnist", f"--input={root / 'in'}",
        f"--output={root / 'out'}", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize(
    "poison, named", [c[1:] for c in POISONED_OUTPUTS], ids=[c[0] for c in POISONED_OUTPUTS]
)
def test_overwrite_refuses_what_it_did_not_write(tmp_path, capsys, poison, named):
    _dataset(tmp_path)
    poison(tmp_path)
    before = tree_digest(str(tmp_path))
    status = make_arrayrecord.command(_convert_args(tmp_path, "--overwrite"))
    assert status == ExitStatus.BAD_INPUT
    assert_one_clear_line(capsys.readouterr().err, NOT_OURS, named)
    assert tree_digest(str(tmp_path)) == before


def test_overwrite_replaces_a_dataset_it_wrote(tmp_path, capsys):
    """The table's control row: the same steps without poison do replace the dataset."""
    _dataset(tmp_path)
    status = make_arrayrecord.command(_convert_args(tmp_path, "--overwrite", "--num_shards=1"))
    assert status == 0, capsys.readouterr().err
    assert records.read_metadata(str(tmp_path / "out"))["shards"] == [
        "data-00000-of-00001.array_record"
    ]
    assert sorted(os.listdir(tmp_path)) == ["decoy", "in", "out"]


IN, OUT = "--input={root}/in", "--output={root}/out"
# (id, the command's flags, what the one line must name)
COMMAND_MISTAKES = [
    ("unknown format", ["--format=jpegs", IN, OUT], "value should be one of"),
    ("no output", ["--format=mnist", IN], "--output"),
    ("empty output", ["--format=mnist", IN, "--output="], "--output is empty"),
    ("stray argument", ["--format=mnist", IN, OUT, "stray"], "unexpected arguments: stray"),
    ("zero workers", ["--format=mnist", IN, OUT, "--num_workers=0"], "--num_workers"),
    ("output is a file", ["--format=mnist", IN, "--output={root}/decoy"], "is a file"),
    ("output in input", ["--format=mnist", IN, "--output={root}/in/o"], "lies inside the input"),
    ("missing input", ["--format=mnist", "--input={root}/nope", OUT], "does not exist"),
    ("in use, no --overwrite", ["--format=mnist", IN, OUT], "pass --overwrite"),
]


@pytest.mark.parametrize(
    "flags, named", [c[1:] for c in COMMAND_MISTAKES], ids=[c[0] for c in COMMAND_MISTAKES]
)
def test_command_mistakes_are_one_line_and_status_2(tmp_path, capsys, flags, named):
    _dataset(tmp_path)
    before = tree_digest(str(tmp_path))
    argv = ["make_arrayrecord"] + [f.format(root=tmp_path) for f in flags]
    assert make_arrayrecord.command(argv) == ExitStatus.BAD_INPUT
    assert_one_clear_line(capsys.readouterr().err, named)
    assert tree_digest(str(tmp_path)) == before


def _damaged_gzip(root) -> None:
    path = root / "in" / "t10k-images-idx3-ubyte.gz"
    data = path.read_bytes()
    path.write_bytes(data[:12] + bytes(b ^ 0x55 for b in data[12:40]) + data[40:])


def _truncated_idx(root) -> None:
    make_mnist(root / "raw", gz=False)
    path = root / "raw" / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])


# (id, what is done to the input, the command's flags, what the one line must name)
DAMAGED_INPUTS = [
    ("damaged gzip", _damaged_gzip, ["--format=mnist", IN, OUT], "corrupt gzip data"),
    (
        "truncated IDX",
        _truncated_idx,
        ["--format=mnist", "--input={root}/raw", OUT],
        "the file holds 15675 bytes",
    ),
    ("cifar input is a file", lambda root: None, ["--format=cifar10", "--input={root}/decoy", OUT],
     "is not a directory"),
]  # fmt: skip


@pytest.mark.parametrize(
    "damage, flags, named", [c[1:] for c in DAMAGED_INPUTS], ids=[c[0] for c in DAMAGED_INPUTS]
)
def test_damaged_inputs_are_one_line_and_status_2(tmp_path, capsys, damage, flags, named):
    make_mnist(tmp_path / "in")
    (tmp_path / "decoy").write_text("someone's work")
    damage(tmp_path)
    before = tree_digest(str(tmp_path))
    argv = ["make_arrayrecord"] + [f.format(root=tmp_path) for f in flags]
    assert make_arrayrecord.command(argv) == ExitStatus.BAD_INPUT
    assert_one_clear_line(capsys.readouterr().err, named)
    assert tree_digest(str(tmp_path)) == before


# ------------------------------------------------------------------ the Slurm batch script


def _bash_sbatch(cwd, **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    return subprocess.run(
        ["bash", os.path.join(helpers.REPO, "tools", "cluster", "slurm_train.sbatch")],
        cwd=cwd, env={**clean, **env}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


# (id, environment, what the one line must name)
SBATCH_MISTAKES = [
    ("plain bash", {"WORKDIR": "{root}/w"}, "submit this script with sbatch"),
    ("no WORKDIR", {"SLURM_JOB_ID": "7"}, "set WORKDIR"),
    ("bad MAX_REQUEUES", {"SLURM_JOB_ID": "7", "WORKDIR": "w", "MAX_REQUEUES": "x"}, "MAX_REQU"),
    ("WORKDIR under a file", {"SLURM_JOB_ID": "7", "WORKDIR": "{root}/decoy/w"}, "Not a dir"),
]


@pytest.mark.parametrize(
    "env, named", [c[1:] for c in SBATCH_MISTAKES], ids=[c[0] for c in SBATCH_MISTAKES]
)
def test_sbatch_script_mistakes_are_one_line_and_status_2(tmp_path, env, named):
    (tmp_path / "decoy").write_text("x")
    before = tree_digest(str(tmp_path))
    run = _bash_sbatch(tmp_path, **{k: v.format(root=tmp_path) for k, v in env.items()})
    assert run.returncode == ExitStatus.BAD_INPUT, run.stderr
    assert_one_clear_line(run.stderr, named)
    assert run.stdout == "" and tree_digest(str(tmp_path)) == before  # srun never ran


# ------------------------------------------------------------------ in processes of their own


def _cli(*args: str, **popen) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "tools.make_arrayrecord", *args],
        cwd=helpers.REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen,
    )  # fmt: skip


@pytest.mark.slow
def test_the_real_command_refuses_a_poisoned_dataset(tmp_path):
    _dataset(tmp_path)
    _lists("../decoy")(tmp_path)
    before = tree_digest(str(tmp_path))
    _, stderr = _cli(*_convert_args(tmp_path, "--overwrite")[1:]).communicate(timeout=60)
    assert_one_clear_line(stderr, NOT_OURS, "'../decoy'")
    assert tree_digest(str(tmp_path)) == before


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("signum, workers", [(signal.SIGINT, 2), (signal.SIGTERM, 1)])
def test_a_signal_mid_conversion_publishes_nothing(tmp_path, signum, workers):
    _dataset(tmp_path)  # the dataset at OUT, which --overwrite would replace
    make_mnist(tmp_path / "big", n=20000, gz=False)  # PNG-encoding it takes several seconds
    before = tree_digest(str(tmp_path))
    proc = _cli(
        "--format=mnist", f"--input={tmp_path / 'big'}", f"--output={tmp_path / 'out'}",
        "--overwrite", "--encoding=encoded", f"--num_workers={workers}",
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not any(n.startswith("out.tmp-") for n in os.listdir(tmp_path)):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    time.sleep(1)  # mid-conversion: writing shards into the temporary folder
    workers_seen = _children(proc.pid)
    assert len(workers_seen) >= workers or workers == 1, workers_seen
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, stderr
    name = signal.Signals(signum).name
    assert_one_clear_line(stderr, f"interrupted ({name})", "nothing was published")
    assert tree_digest(str(tmp_path)) == before  # no OUT.tmp-*, the old dataset untouched
    time.sleep(1)
    assert not [pid for pid in workers_seen if _alive(pid)]


@pytest.mark.slow
@pytest.mark.parametrize(
    "flag, named",
    [("--grace_seconds=-1", "--grace_seconds"), ("--num_processes=x", "--num_processes")],
)
def test_local_cluster_flag_mistakes_are_one_line_and_status_2(tmp_path, flag, named):
    run = subprocess.run(
        [sys.executable, "-m", "launch.local_cluster", flag, "--", f"--workdir={tmp_path}/w"],
        cwd=helpers.REPO, env=helpers.child_env(1), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == ExitStatus.BAD_INPUT
    assert_one_clear_line(run.stderr, named)
    assert tree_digest(str(tmp_path)) == {}
