"""Tests for tools/tpu_pod.sh (against a fake `gcloud`) and tools/slurm_train.sbatch.

The fake gcloud appends its argv as one JSON line per call to calls.jsonl and answers:
  compute tpus tpu-vm describe          one line of `describe_states` per call (the last one
                                        repeats); "MISSING" prints a NOT_FOUND error, exits 1
  compute tpus queued-resources describe  likewise from `qr_states` (default ACTIVE)
  storage ls .../FINISHED               exit status from `finished_rcs` (1 absent, 0 there)
  compute tpus tpu-vm ssh (check script) exit status from `check_rcs` (0 = running)
Everything else succeeds. Nothing here runs the remote scripts or touches real processes.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_POD = os.path.join(REPO, "tools", "tpu_pod.sh")
SBATCH = os.path.join(REPO, "tools", "slurm_train.sbatch")
BASH = shutil.which("bash") or "/bin/bash"

FAKE_GCLOUD = r'''#!{python}
import json, os, sys

state_dir = os.environ["FAKE_GCLOUD_DIR"]
args = sys.argv[1:]
with open(os.path.join(state_dir, "calls.jsonl"), "a") as f:
  f.write(json.dumps(args) + "\n")


def pop(name, default):
  """Next scripted answer; the last one repeats."""
  path = os.path.join(state_dir, name)
  if not os.path.exists(path):
    return default
  with open(path) as f:
    lines = [line.strip() for line in f if line.strip()]
  if not lines:
    return default
  if len(lines) > 1:
    with open(path, "w") as f:
      f.write("\n".join(lines[1:]) + "\n")
  return lines[0]


def command(args):
  for i, a in enumerate(args):
    if a.startswith("--command="):
      return a[len("--command="):]
    if a == "--command":
      return args[i + 1]
  return ""


if args[:4] == ["compute", "tpus", "tpu-vm", "describe"]:
  state = pop("describe_states", "READY")
  if state == "MISSING":
    sys.stderr.write("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource not found\n")
    sys.exit(1)
  print(state)
elif args[:4] == ["compute", "tpus", "queued-resources", "describe"]:
  state = pop("qr_states", "ACTIVE")
  if state == "MISSING":
    sys.stderr.write("ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND\n")
    sys.exit(1)
  print(state)
elif args[:2] == ["storage", "ls"]:
  rc = int(pop("finished_rcs", "1"))
  if rc == 0:
    print(args[2])
  else:
    sys.stderr.write("ERROR: (gcloud.storage.ls) One or more URLs matched no objects.\n")
  sys.exit(rc)
elif args[:4] == ["compute", "tpus", "tpu-vm", "ssh"] and "tpu_pod.sh:check" in command(args):
  sys.exit(int(pop("check_rcs", "0")))
'''


class FakeGcloud:
    """A fake gcloud on PATH plus helpers to script answers and read back the calls."""

    def __init__(self, tmp_path):
        self.dir = tmp_path / "gcloud-state"
        self.dir.mkdir()
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        gcloud = self.bin / "gcloud"
        gcloud.write_text(FAKE_GCLOUD.replace("{python}", sys.executable))
        gcloud.chmod(0o755)
        self.tmp_path = tmp_path

    def script(self, name: str, values) -> None:
        (self.dir / name).write_text("".join(f"{v}\n" for v in values))

    @property
    def calls(self) -> list[list[str]]:
        path = self.dir / "calls.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]

    def env(self, **extra) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TPU_", "CLOUDSDK_"))}
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        env["FAKE_GCLOUD_DIR"] = str(self.dir)
        env["TMPDIR"] = str(self.tmp_path)
        env.update(extra)
        return env

    def run(self, *args, env=None, timeout=60) -> subprocess.CompletedProcess:
        return subprocess.run(
            [BASH, TPU_POD, *args],
            env=env or self.env(),
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )


@pytest.fixture
def gcloud(tmp_path):
    return FakeGcloud(tmp_path)


BASE = ["--name=my-tpu", "--zone=us-central2-b", "--project=my-proj"]
WORKDIR = "gs://my-bucket/runs/r1"


def kind(call: list[str]) -> str:
    """A short label for a recorded gcloud call."""
    if call[:2] == ["storage", "ls"]:
        return "finished?"
    if call[:3] == ["compute", "tpus", "tpu-vm"] or call[:3] == [
        "compute",
        "tpus",
        "queued-resources",
    ]:
        label = ("qr-" if call[2] == "queued-resources" else "") + call[3]
        if call[3] == "ssh":
            first_line = remote_command(call).splitlines()[0]
            label += (
                ":" + first_line.split(":")[-1] if first_line.startswith("# tpu_pod.sh:") else ""
            )
        return label
    return " ".join(call)


def remote_command(call: list[str]) -> str:
    for i, a in enumerate(call):
        if a.startswith("--command="):
            return a[len("--command=") :]
        if a == "--command":
            return call[i + 1]
    raise AssertionError(f"no --command in {call}")


def worker_flag(call: list[str]) -> str:
    for i, a in enumerate(call):
        if a.startswith("--worker="):
            return a[len("--worker=") :]
        if a == "--worker":
            return call[i + 1]
    return ""


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    )


# ------------------------------------------------------------------ help/errors --


@pytest.mark.parametrize("args", [["help"], ["--help"], ["create", "-h"]])
def test_help(gcloud, args):
    proc = gcloud.run(*args)
    assert_ok(proc)
    for word in (
        "Usage:",
        "create",
        "setup",
        "train",
        "status",
        "logs",
        "stop",
        "delete",
        "supervise",
        "--dry-run",
        "TPU_NAME",
        "TPU_ZONE",
        "TPU_PROJECT",
    ):
        assert word in proc.stdout
    assert gcloud.calls == []


def test_no_subcommand_is_usage_error(gcloud):
    proc = gcloud.run()
    assert proc.returncode == 2
    assert "no subcommand" in proc.stderr


def test_unknown_subcommand(gcloud):
    proc = gcloud.run("launch-rockets", *BASE)
    assert proc.returncode == 2
    assert "unknown subcommand" in proc.stderr and "launch-rockets" in proc.stderr
    assert gcloud.calls == []


def test_unknown_option(gcloud):
    proc = gcloud.run("create", *BASE, "--accelerator-type=v4-32", "--turbo")
    assert proc.returncode == 2
    assert "unknown option: --turbo" in proc.stderr


@pytest.mark.parametrize(
    "subcommand", ["create", "setup", "train", "status", "stop", "delete", "supervise"]
)
def test_missing_name(gcloud, subcommand):
    proc = gcloud.run(subcommand, "--zone=z", "--accelerator-type=v4-8", f"--workdir={WORKDIR}")
    assert proc.returncode == 2
    assert (
        "--name" in proc.stderr and f"'{subcommand}'" in proc.stderr and "TPU_NAME" in proc.stderr
    )
    assert gcloud.calls == []


@pytest.mark.parametrize(
    "subcommand,flag",
    [("create", "--accelerator-type"), ("train", "--workdir"), ("supervise", "--workdir")],
)
def test_missing_required_option(gcloud, subcommand, flag):
    args = [subcommand, *BASE]
    if flag != "--accelerator-type":
        args.append("--accelerator-type=v4-8")
    proc = gcloud.run(*args)
    assert proc.returncode == 2
    assert flag in proc.stderr and f"'{subcommand}'" in proc.stderr


def test_train_needs_gs_workdir(gcloud):
    proc = gcloud.run("train", *BASE, "--workdir=/tmp/local")
    assert proc.returncode == 2
    assert "gs://" in proc.stderr
    assert gcloud.calls == []


def test_no_gcloud_on_path(tmp_path):
    # A PATH with the few tools the script needs but no gcloud.
    bin_dir = tmp_path / "nogcloud"
    bin_dir.mkdir()
    for tool in ("dirname", "date", "mktemp", "rm", "cat"):
        found = shutil.which(tool)
        if found:
            (bin_dir / tool).symlink_to(found)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
    env["PATH"] = str(bin_dir)
    proc = subprocess.run(
        [BASH, TPU_POD, "create", *BASE, "--accelerator-type=v4-8"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 127
    assert "gcloud not found on PATH" in proc.stderr
    # --dry-run only prints, so it works without gcloud.
    proc = subprocess.run(
        [BASH, TPU_POD, "create", *BASE, "--accelerator-type=v4-8", "--dry-run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert_ok(proc)
    assert proc.stdout.startswith("+ gcloud compute tpus tpu-vm create my-tpu")


# ------------------------------------------------------------------ create/delete --


def test_create_spot(gcloud):
    assert_ok(gcloud.run("create", *BASE, "--accelerator-type=v4-32", "--spot"))
    (call,) = gcloud.calls
    assert call[:5] == ["compute", "tpus", "tpu-vm", "create", "my-tpu"]
    for arg in (
        "--zone=us-central2-b",
        "--project=my-proj",
        "--accelerator-type=v4-32",
        "--version=tpu-ubuntu2204-base",
        "--spot",
    ):
        assert arg in call


@pytest.mark.parametrize(
    "accelerator,runtime",
    [
        ("v5litepod-16", "v2-alpha-tpuv5-lite"),
        ("v5p-32", "v2-alpha-tpuv5"),
        ("v6e-16", "v2-alpha-tpuv6e"),
    ],
)
def test_create_on_demand_default_runtime(gcloud, accelerator, runtime):
    assert_ok(gcloud.run("create", *BASE, f"--accelerator-type={accelerator}"))
    (call,) = gcloud.calls
    assert call[:4] == ["compute", "tpus", "tpu-vm", "create"]
    assert f"--version={runtime}" in call
    assert "--spot" not in call


def test_create_explicit_runtime_and_extra_args(gcloud):
    assert_ok(
        gcloud.run(
            "create",
            *BASE,
            "--accelerator-type",
            "v4-8",
            "--runtime-version",
            "tpu-vm-custom",
            "--service-account=sa@p.iam.gserviceaccount.com",
            "--create-arg=--network=my-net",
            "--create-arg=--internal-ips",
        )
    )
    (call,) = gcloud.calls
    for arg in (
        "--version=tpu-vm-custom",
        "--service-account=sa@p.iam.gserviceaccount.com",
        "--network=my-net",
        "--internal-ips",
    ):
        assert arg in call


def test_create_queued(gcloud):
    assert_ok(gcloud.run("create", *BASE, "--accelerator-type=v5litepod-16", "--queued", "--spot"))
    (call,) = gcloud.calls
    assert call[:5] == ["compute", "tpus", "queued-resources", "create", "my-tpu"]
    for arg in (
        "--node-id=my-tpu",
        "--zone=us-central2-b",
        "--project=my-proj",
        "--accelerator-type=v5litepod-16",
        "--runtime-version=v2-alpha-tpuv5-lite",
        "--spot",
    ):
        assert arg in call


def test_create_queued_wait(gcloud):
    gcloud.script("qr_states", ["WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"])
    assert_ok(
        gcloud.run(
            "create", *BASE, "--accelerator-type=v4-8", "--queued", "--wait", "--poll-seconds=0"
        )
    )
    assert [kind(c) for c in gcloud.calls] == ["qr-create"] + ["qr-describe"] * 3


def test_env_var_defaults(gcloud):
    env = gcloud.env(
        TPU_NAME="env-tpu",
        TPU_ZONE="europe-west4-a",
        TPU_PROJECT="env-proj",
        TPU_ACCELERATOR_TYPE="v5litepod-8",
        TPU_SPOT="1",
    )
    assert_ok(gcloud.run("create", env=env))
    (call,) = gcloud.calls
    assert call[:5] == ["compute", "tpus", "tpu-vm", "create", "env-tpu"]
    for arg in (
        "--zone=europe-west4-a",
        "--project=env-proj",
        "--accelerator-type=v5litepod-8",
        "--spot",
    ):
        assert arg in call


def test_delete(gcloud):
    assert_ok(gcloud.run("delete", *BASE))
    assert_ok(gcloud.run("delete", *BASE, "--queued"))
    tpu, queued = gcloud.calls
    assert tpu[:5] == ["compute", "tpus", "tpu-vm", "delete", "my-tpu"] and "--quiet" in tpu
    assert queued[:5] == ["compute", "tpus", "queued-resources", "delete", "my-tpu"]
    assert "--force" in queued and "--quiet" in queued


def test_status(gcloud):
    gcloud.script("describe_states", ["PREEMPTED"])
    proc = gcloud.run("status", *BASE, f"--workdir={WORKDIR}")
    assert_ok(proc)
    assert "PREEMPTED" in proc.stdout and "not finished" in proc.stdout
    describe = gcloud.calls[0]
    assert describe[:5] == ["compute", "tpus", "tpu-vm", "describe", "my-tpu"]
    assert "--format=value(state)" in describe
    gcloud.script("describe_states", ["MISSING"])
    proc = gcloud.run("status", *BASE)
    assert proc.returncode == 1 and "MISSING" in proc.stdout


# ------------------------------------------------------------- setup/train/stop --


def test_setup_with_tarball(gcloud, tmp_path):
    tarball = tmp_path / "src.tar.gz"
    tarball.write_bytes(b"not really a tarball")
    assert_ok(gcloud.run("setup", *BASE, f"--tarball={tarball}"))
    scp, ssh = gcloud.calls
    assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"]
    assert str(tarball) in scp and "my-tpu:resnet-src.tar.gz" in scp
    assert "--recurse" in scp and worker_flag(scp) == "all"
    assert ssh[:5] == ["compute", "tpus", "tpu-vm", "ssh", "my-tpu"] and worker_flag(ssh) == "all"
    cmd = remote_command(ssh)
    assert "tar -xzf resnet-src.tar.gz" in cmd
    assert 'pip install ".[tpu]"' in cmd


@pytest.mark.skipif(
    shutil.which("git") is None or not os.path.isdir(os.path.join(REPO, ".git")),
    reason="needs git and a git checkout",
)
def test_setup_default_uses_git_archive(gcloud):
    assert_ok(gcloud.run("setup", *BASE))
    scp, ssh = gcloud.calls
    assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"] and worker_flag(scp) == "all"
    assert any(a.endswith("resnet-src.tar.gz") and os.path.isabs(a) for a in scp)
    assert 'pip install ".[tpu]"' in remote_command(ssh)


def test_setup_with_repo_url(gcloud):
    assert_ok(
        gcloud.run("setup", *BASE, "--repo-url=https://github.com/me/resnet.git", "--ref=v1.0")
    )
    (ssh,) = gcloud.calls  # no scp
    assert worker_flag(ssh) == "all"
    cmd = remote_command(ssh)
    assert "git clone --quiet https://github.com/me/resnet.git" in cmd
    assert "checkout --quiet v1.0" in cmd
    assert 'pip install ".[tpu]"' in cmd


def test_train(gcloud):
    proc = gcloud.run(
        "train",
        *BASE,
        f"--workdir={WORKDIR}/",
        "--",
        "--config.train.num_epochs=1",
        "--config.model.name=resnet 50",
    )
    assert_ok(proc)
    (ssh,) = gcloud.calls
    assert ssh[:5] == ["compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
    assert worker_flag(ssh) == "all"
    cmd = remote_command(ssh)
    assert "nohup" in cmd and "resnet-train.log" in cmd
    assert "python -m launch.main" in cmd
    # The launcher arguments, shell-quoted, in order (trailing slash of the workdir dropped).
    line = next(row for row in cmd.splitlines() if "nohup" in row)
    quoted = line.split("resnet-train ", 1)[1].split(" >>", 1)[0]
    assert shlex.split(quoted) == [
        "--config=configs/resnet50_imagenet.py",
        f"--workdir={WORKDIR}",
        "--config.train.num_epochs=1",
        "--config.model.name=resnet 50",
    ]


def test_train_custom_config(gcloud):
    assert_ok(gcloud.run("train", *BASE, f"--workdir={WORKDIR}", "--config=configs/demo.py"))
    assert "--config=configs/demo.py --workdir=gs://my-bucket/runs/r1" in remote_command(
        gcloud.calls[0]
    )


def test_stop_and_logs(gcloud):
    assert_ok(gcloud.run("stop", *BASE))
    assert_ok(gcloud.run("logs", *BASE))
    stop, logs = gcloud.calls
    assert worker_flag(stop) == "all"
    assert "pkill -TERM" in remote_command(stop)
    assert worker_flag(logs) == "0"
    assert "tail" in remote_command(logs) and "-F" in remote_command(logs)
    assert "resnet-train.log" in remote_command(logs)


# -------------------------------------------------------------------- dry run --


def test_dry_run_prints_and_calls_nothing(gcloud):
    proc = gcloud.run("create", *BASE, "--accelerator-type=v4-32", "--spot", "--dry-run")
    assert_ok(proc)
    assert gcloud.calls == []
    (line,) = proc.stdout.splitlines()
    assert line.startswith("+ gcloud compute tpus tpu-vm create my-tpu")
    assert shlex.split(line[2:]) == [
        "gcloud",
        "compute",
        "tpus",
        "tpu-vm",
        "create",
        "my-tpu",
        "--zone=us-central2-b",
        "--project=my-proj",
        "--accelerator-type=v4-32",
        "--version=tpu-ubuntu2204-base",
        "--spot",
    ]


def test_dry_run_supervise_prints_one_recovery_cycle(gcloud):
    proc = gcloud.run(
        "supervise",
        *BASE,
        "--accelerator-type=v4-32",
        f"--workdir={WORKDIR}",
        "--repo-url=https://example.com/r.git",
        "--dry-run",
        "--",
        "--config.train.num_epochs=1",
    )
    assert_ok(proc)
    assert gcloud.calls == []
    lines = proc.stdout.splitlines()
    assert all(line.startswith("+ gcloud ") for line in lines), lines
    words = [" ".join(line.split()[1:6]) for line in lines]
    assert words == [
        "gcloud storage ls gs://my-bucket/runs/r1/FINISHED",
        "gcloud compute tpus tpu-vm describe",
        "gcloud compute tpus tpu-vm delete",
        "gcloud compute tpus tpu-vm create",
        "gcloud compute tpus tpu-vm ssh",
        "gcloud compute tpus tpu-vm ssh",
    ]


# ------------------------------------------------------------------ supervise --


def supervise(gcloud, *extra, timeout=60):
    return gcloud.run(
        "supervise",
        *BASE,
        "--accelerator-type=v4-32",
        "--spot",
        f"--workdir={WORKDIR}",
        "--poll-seconds=0",
        "--repo-url=https://example.com/resnet.git",
        *extra,
        "--",
        "--config.train.num_epochs=1",
        timeout=timeout,
    )


def test_supervise_recreates_after_preemption(gcloud):
    gcloud.script("describe_states", ["PREEMPTED", "READY"])
    gcloud.script("finished_rcs", [1, 1, 0])
    gcloud.script("check_rcs", [0])  # the launcher is running
    proc = supervise(gcloud)
    assert_ok(proc)
    kinds = [kind(c) for c in gcloud.calls]
    assert kinds == [
        "finished?",
        "describe",
        "delete",
        "create",
        "ssh:setup",
        "ssh:train",
        "finished?",
        "describe",
        "ssh:check",
        "finished?",
    ]
    calls = gcloud.calls
    assert "--quiet" in calls[2]
    assert "--spot" in calls[3] and "--accelerator-type=v4-32" in calls[3]
    assert worker_flag(calls[4]) == "all" and worker_flag(calls[5]) == "all"
    train_cmd = remote_command(calls[5])
    assert "python -m launch.main" in train_cmd
    assert f"--workdir={WORKDIR} --config.train.num_epochs=1" in train_cmd
    assert calls[0] == ["storage", "ls", f"{WORKDIR}/FINISHED"]
    assert "run finished" in proc.stderr


def test_supervise_creates_missing_slice_without_delete(gcloud):
    gcloud.script("describe_states", ["MISSING", "READY"])
    gcloud.script("finished_rcs", [1, 0])
    proc = supervise(gcloud)
    assert_ok(proc)
    assert [kind(c) for c in gcloud.calls] == [
        "finished?",
        "describe",
        "create",
        "ssh:setup",
        "ssh:train",
        "finished?",
    ]


def test_supervise_already_finished(gcloud):
    gcloud.script("finished_rcs", [0])
    proc = supervise(gcloud, "--delete-when-finished")
    assert_ok(proc)
    assert [kind(c) for c in gcloud.calls] == ["finished?", "delete"]


def test_supervise_waits_while_creating(gcloud):
    gcloud.script("describe_states", ["CREATING", "REPAIRING", "READY"])
    gcloud.script("finished_rcs", [1, 1, 1, 0])
    assert_ok(supervise(gcloud))
    assert [kind(c) for c in gcloud.calls] == [
        "finished?",
        "describe",
        "finished?",
        "describe",
        "finished?",
        "describe",
        "ssh:check",
        "finished?",
    ]


def test_supervise_restarts_stopped_launcher(gcloud):
    # READY, but the launcher exited 75 (e.g. a maintenance event): stop leftovers, train again.
    gcloud.script("describe_states", ["READY"])
    gcloud.script("check_rcs", [11, 0])
    gcloud.script("finished_rcs", [1, 1, 1, 0])
    proc = supervise(gcloud)
    assert_ok(proc)
    assert [kind(c) for c in gcloud.calls] == [
        "finished?",
        "describe",
        "ssh:check",
        "finished?",
        "ssh:stop",
        "ssh:train",
        "finished?",
        "describe",
        "ssh:check",
        "finished?",
    ]


def test_supervise_gives_up_after_max_restarts(gcloud):
    gcloud.script("describe_states", ["PREEMPTED"])
    proc = supervise(gcloud, "--max-restarts=2")
    assert proc.returncode == 3, proc.stderr
    assert "--max-restarts=2" in proc.stderr
    assert [kind(c) for c in gcloud.calls].count("create") == 2


def test_supervise_gives_up_after_max_failures(gcloud):
    gcloud.script("describe_states", ["READY"])
    gcloud.script("check_rcs", [13])  # the launcher failed
    proc = supervise(gcloud, "--max-failures=1")
    assert proc.returncode == 3, proc.stderr
    assert "--max-failures=1" in proc.stderr
    assert [kind(c) for c in gcloud.calls].count("ssh:train") == 1


def test_supervise_gives_up_on_bad_config(gcloud):
    gcloud.script("describe_states", ["READY"])
    gcloud.script("check_rcs", [14])  # the launcher exited 2
    proc = supervise(gcloud)
    assert proc.returncode == 3
    assert "ssh:train" not in [kind(c) for c in gcloud.calls]


def test_supervise_queued_recreates_queued_resource(gcloud):
    gcloud.script("describe_states", ["PREEMPTED", "READY"])
    gcloud.script("qr_states", ["SUSPENDED", "WAITING_FOR_RESOURCES", "ACTIVE"])
    gcloud.script("finished_rcs", [1, 0])
    assert_ok(supervise(gcloud, "--queued"))
    kinds = [kind(c) for c in gcloud.calls]
    assert kinds == [
        "finished?",
        "describe",
        "qr-describe",
        "qr-delete",
        "qr-create",
        "qr-describe",
        "qr-describe",
        "ssh:setup",
        "ssh:train",
        "finished?",
    ]
    create = gcloud.calls[4]
    assert "--node-id=my-tpu" in create and "--spot" in create


def test_supervise_queued_keeps_waiting_request(gcloud):
    # No TPU yet because the queued request is still waiting: do not delete/recreate it.
    gcloud.script("describe_states", ["MISSING"])
    gcloud.script("qr_states", ["WAITING_FOR_RESOURCES"])
    gcloud.script("finished_rcs", [1, 1, 0])
    assert_ok(supervise(gcloud, "--queued"))
    kinds = [kind(c) for c in gcloud.calls]
    assert kinds == ["finished?", "describe", "qr-describe"] * 2 + ["finished?"]


# ------------------------------------------------------------------ shellcheck --


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
@pytest.mark.parametrize(
    "script", [TPU_POD, SBATCH, os.path.join(REPO, "tools", "device_wheels.sh")]
)
def test_shellcheck(script):
    proc = subprocess.run(["shellcheck", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------- slurm sbatch --

FAKE_SRUN = r"""#!{bash}
printf '%s\n' "$@" > "$FAKE_SLURM_DIR/srun_args"
if [ "$FAKE_SRUN_MODE" = wait_for_term ]; then
  trap 'kill "$sleeper" 2>/dev/null; echo TERM >> "$FAKE_SLURM_DIR/events"; exit 75' TERM
  sleep 30 &
  sleeper=$!
  echo started >> "$FAKE_SLURM_DIR/events"
  wait "$sleeper"
  exit 1
fi
exit "$FAKE_SRUN_MODE"
"""
FAKE_SCONTROL = r"""#!{bash}
echo "scontrol $*" >> "$FAKE_SLURM_DIR/events"
"""


@pytest.fixture
def slurm(tmp_path):
    bin_dir = tmp_path / "slurm-bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        path = bin_dir / name
        path.write_text(text.replace("{bash}", BASH))
        path.chmod(0o755)
    env = dict(os.environ)
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        FAKE_SLURM_DIR=str(tmp_path),
        SLURM_JOB_ID="4242",
        SLURM_SUBMIT_DIR=str(tmp_path),
        WORKDIR=str(tmp_path / "wd"),
        VENV=str(tmp_path / "no-venv"),
    )
    env.pop("SLURM_RESTART_COUNT", None)
    return tmp_path, env


def events(tmp_path) -> list[str]:
    path = tmp_path / "events"
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.parametrize(
    "srun_rc,expected_rc,requeued", [(0, 0, False), (75, 0, True), (1, 1, False)]
)
def test_sbatch_exit_codes(slurm, srun_rc, expected_rc, requeued):
    tmp_path, env = slurm
    env["FAKE_SRUN_MODE"] = str(srun_rc)
    proc = subprocess.run(
        [BASH, SBATCH, "--config.train.num_epochs=1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == expected_rc, proc.stdout + proc.stderr
    assert ("scontrol requeue 4242" in events(tmp_path)) == requeued
    args = (tmp_path / "srun_args").read_text().splitlines()
    assert "--ntasks-per-node=1" in args
    launcher = args[args.index("python") :]
    assert launcher == [
        "python",
        "-m",
        "launch.main",
        "--config=configs/resnet50_imagenet.py",
        f"--workdir={tmp_path / 'wd'}",
        "--config.train.num_epochs=1",
    ]
    assert (tmp_path / "wd").is_dir()


def test_sbatch_gives_up_after_max_requeues(slurm):
    tmp_path, env = slurm
    env.update(FAKE_SRUN_MODE="75", SLURM_RESTART_COUNT="3", MAX_REQUEUES="3")
    proc = subprocess.run([BASH, SBATCH], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 75
    assert events(tmp_path) == []


def test_sbatch_forwards_sigterm_and_requeues(slurm):
    tmp_path, env = slurm
    env["FAKE_SRUN_MODE"] = "wait_for_term"
    proc = subprocess.Popen(
        [BASH, SBATCH],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 20
        while "started" not in events(tmp_path):
            assert time.monotonic() < deadline, "fake srun did not start"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # what `#SBATCH --signal=B:TERM@120` does
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # only this test's own process group
    assert proc.returncode == 0, out
    assert events(tmp_path) == ["started", "TERM", "scontrol requeue 4242"]
    assert "forwarding" in out and "status 75" in out
