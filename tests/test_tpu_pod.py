"""tools/cluster/tpu_pod.sh against a fake `gcloud`, and the real gcloud's parser where installed.

The Slurm script is tested against a real Slurm in test_slurm.py; shellcheck runs on both here.

The fake gcloud appends its argv as one JSON line per call to calls.jsonl (and the command line
of its parent process, e.g. `timeout`, to parents.jsonl) and answers from scripted files, one
line per call (the last one repeats):
  compute tpus tpu-vm describe            `describe_states`: "STATE [HEALTH [SYMPTOMS]]" printed
                                          through the requested value() format, "@FILE" prints
                                          FILE, or an error name (below); `workers` (default 2)
                                          answers networkEndpoints.len()
  compute tpus queued-resources describe  `qr_states` (default ACTIVE) or an error name
  storage ls .../FINISHED                 `finished_rcs`: 1 absent, 0 there, or an error name
  storage ls .../checkpoints/*/commit_...  `checkpoints`: committed steps, space-separated
  storage ls (anything else)              `workdir_ls`: OK, EMPTY (matched no objects) or an
                                          error name
  compute tpus tpu-vm ssh (check script)  `check_results`: one launcher state per worker
                                          ("running", an exit status, "none"); the fake RUNS the
                                          real remote check script once per worker, with a fake
                                          HOME and a fake pgrep; SSH_ERROR or HANG instead
  compute tpus tpu-vm ssh (log script)    runs the real remote log script on a fake HOME whose
                                          log says "line from worker N"
  compute tpus tpu-vm ssh (setup script)  `setup_results`: OK, FAIL or HANG
  compute tpus tpu-vm scp                 copies the local file to scp/<remote name>
Error names: MISSING (NOT_FOUND), DENIED (PERMISSION_DENIED), EXPIRED (credentials), NETWORK.
Everything else succeeds. Nothing here touches a real process or the network.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_POD = os.path.join(REPO, "tools", "cluster", "tpu_pod.sh")
SBATCH = os.path.join(REPO, "tools", "slurm_train.sbatch")
BASH = shutil.which("bash") or "/bin/bash"
REAL_GCLOUD = shutil.which("gcloud")  # looked up before any fake is put on PATH

FAKE_GCLOUD = r'''#!{python} -S
import json, os, re, shutil, subprocess, sys, time

state_dir = os.environ["FAKE_GCLOUD_DIR"]
args = sys.argv[1:]
with open(os.path.join(state_dir, "calls.jsonl"), "a") as f:
    f.write(json.dumps(args) + "\n")
try:
    with open("/proc/%d/cmdline" % os.getppid(), "rb") as f:
        parent = [a.decode() for a in f.read().split(b"\0") if a]
except OSError:
    parent = []
with open(os.path.join(state_dir, "parents.jsonl"), "a") as f:
    f.write(json.dumps(parent) + "\n")


def pop(name, default):
    """Next scripted answer; the last one repeats."""
    path = os.path.join(state_dir, name)
    if not os.path.exists(path):
        return default
    with open(path) as f:
        lines = [line.rstrip("\n") for line in f if line.strip()]
    if not lines:
        return default
    if len(lines) > 1:
        with open(path, "w") as f:
            f.write("\n".join(lines[1:]) + "\n")
    return lines[0].strip()


def flag(name, default=""):
    for i, a in enumerate(args):
        if a.startswith(name + "="):
            return a[len(name) + 1:]
        if a == name:
            return args[i + 1]
    return default


def fail(kind):
    """Exits like gcloud does for these errors (messages as gcloud prints them)."""
    group = "gcloud." + ".".join(a for a in args[:4] if not a.startswith(("-", "gs://")))
    if kind == "MISSING":
        msg = "NOT_FOUND: Resource 'projects/p/locations/z/nodes/my-tpu' was not found"
    elif kind == "DENIED":
        msg = ("PERMISSION_DENIED: Permission 'tpu.nodes.get' denied on resource "
               "'projects/p/locations/z/nodes/my-tpu' (or it may not exist).")
    elif kind == "EXPIRED":
        msg = ("There was a problem refreshing your current auth tokens: Reauthentication "
               "failed. cannot prompt during non-interactive execution.\n"
               "Please run:\n\n  $ gcloud auth login\n")
    elif kind == "NETWORK":
        sys.stderr.write("ERROR: gcloud crashed (ConnectionError): HTTPSConnectionPool("
                         "host='tpu.googleapis.com', port=443): Max retries exceeded\n")
        sys.exit(1)
    else:
        raise SystemExit("fake gcloud: unknown scripted answer " + repr(kind))
    sys.stderr.write("ERROR: (%s) %s\n" % (group, msg))
    sys.exit(1)


ERRORS = ("MISSING", "DENIED", "EXPIRED", "NETWORK")


def print_value(fmt, values):
    """The value() format: fields in order, separator '\t' unless [separator="..."]."""
    m = re.fullmatch(r'value(?:\[separator="(.*)"\])?\((.*)\)', fmt)
    if not m:
        raise SystemExit("fake gcloud: unsupported --format " + repr(fmt))
    sep = "\t" if m.group(1) is None else m.group(1)
    out = []
    for field in m.group(2).split(","):
        if field not in values:
            raise SystemExit("fake gcloud: unknown field " + repr(field))
        out.append(values[field])
    print(sep.join(out))


def run_remote(script, worker, home_setup):
    """Runs a remote script as one worker's login shell would, in a fake HOME."""
    home = os.path.join(state_dir, "worker-%d" % worker)
    os.makedirs(home, exist_ok=True)
    stub = os.path.join(state_dir, "remote-bin")
    os.makedirs(stub, exist_ok=True)
    with open(os.path.join(stub, "pgrep"), "w") as f:
        f.write('#!/bin/sh\n[ "$FAKE_RUNNING" = 1 ]\n')
    os.chmod(os.path.join(stub, "pgrep"), 0o755)
    env = dict(os.environ, HOME=home, PATH=stub + os.pathsep + os.environ["PATH"])
    env.update(home_setup(home))
    return subprocess.run(["bash", "-c", script], env=env).returncode


command = flag("--command")
first_line = command.splitlines()[0] if command else ""

if args[:4] == ["compute", "tpus", "tpu-vm", "describe"]:
    fmt = flag("--format")
    if fmt == "value(networkEndpoints.len())":
        print(pop("workers", "2"))
        sys.exit(0)
    line = pop("describe_states", "READY")
    if line in ERRORS:
        fail(line)
    if line.startswith("@"):
        with open(os.path.join(state_dir, line[1:])) as f:
            sys.stdout.write(f.read())
        sys.exit(0)
    words = line.split() + ["", ""]
    print_value(fmt, {
        "state": words[0],
        "health": words[1],
        "symptoms.symptomType.list()": words[2],
        "healthDescription": "",
    })
elif args[:4] == ["compute", "tpus", "queued-resources", "describe"]:
    state = pop("qr_states", "ACTIVE")
    if state in ERRORS:
        fail(state)
    print_value(flag("--format"), {"state.state": state})
elif args[:2] == ["storage", "ls"]:
    url = args[2]
    if url.endswith("/FINISHED"):
        answer = pop("finished_rcs", "1")
        if answer in ERRORS:
            fail(answer)
        matched = [url] if answer == "0" else []
    elif url.endswith("/checkpoints/*/commit_success.txt"):
        answer = pop("checkpoints", "-")
        if answer in ERRORS:
            fail(answer)
        base = url[: -len("*/commit_success.txt")]
        matched = [base + s + "/commit_success.txt" for s in answer.split() if s != "-"]
    else:
        answer = pop("workdir_ls", "OK")
        if answer in ERRORS:
            fail(answer)
        matched = [] if answer == "EMPTY" else [url + "checkpoints/"]
    if not matched:
        sys.stderr.write("ERROR: (gcloud.storage.ls) One or more URLs matched no objects.\n")
        sys.exit(1)
    print("\n".join(matched))
elif args[:4] == ["compute", "tpus", "tpu-vm", "scp"]:
    os.makedirs(os.path.join(state_dir, "scp"), exist_ok=True)
    shutil.copy(args[4], os.path.join(state_dir, "scp", args[5].split(":", 1)[1]))
elif args[:4] == ["compute", "tpus", "tpu-vm", "ssh"] and first_line == "# tpu_pod.sh:check":
    answer = pop("check_results", "running running")
    if answer == "HANG":
        time.sleep(60)
    if answer == "SSH_ERROR":
        sys.stderr.write("ssh: connect to host 203.0.113.7 port 22: Connection timed out\n"
                         "ERROR: (gcloud.compute.tpus.tpu-vm.ssh) [/usr/bin/ssh] exited with "
                         "return code [255].\n")
        sys.exit(255)
    if answer in ERRORS:
        fail(answer)

    for worker, code in enumerate(answer.split()):
        def setup(home, code=code):
            path = os.path.join(home, "resnet-train.exitcode")
            if os.path.exists(path):
                os.remove(path)
            if code not in ("running", "none"):
                with open(path, "w") as f:
                    f.write(code + "\n")
            return {"FAKE_RUNNING": "1" if code == "running" else "0"}

        rc = run_remote(command, worker, setup)
        if rc:
            sys.exit(rc)
elif args[:4] == ["compute", "tpus", "tpu-vm", "ssh"] and first_line == "# tpu_pod.sh:log":
    worker = int(flag("--worker"))

    def setup(home, worker=worker):
        with open(os.path.join(home, "resnet-train.log"), "w") as f:
            f.write("first line\nline from worker %d\n" % worker)
        return {}

    sys.exit(run_remote(command, worker, setup))
elif args[:4] == ["compute", "tpus", "tpu-vm", "ssh"] and first_line == "# tpu_pod.sh:setup":
    answer = pop("setup_results", "OK")
    if answer == "HANG":
        time.sleep(60)
    sys.exit(1 if answer == "FAIL" else 0)
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
        self.logs = tmp_path / "logs"

    def script(self, name: str, values) -> None:
        (self.dir / name).write_text("".join(f"{v}\n" for v in values))

    def _jsonl(self, name: str) -> list[list[str]]:
        path = self.dir / name
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]

    @property
    def calls(self) -> list[list[str]]:
        return self._jsonl("calls.jsonl")

    @property
    def parents(self) -> list[list[str]]:
        """The command line of each call's parent process (Linux only; [] elsewhere)."""
        return self._jsonl("parents.jsonl")

    def kinds(self) -> list[str]:
        return [kind(c) for c in self.calls]

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
SSH_OPTIONS = ["-oConnectTimeout=30", "-oServerAliveInterval=30", "-oServerAliveCountMax=4"]


def kind(call: list[str]) -> str:
    """A short label for a recorded gcloud call."""
    if call[:2] == ["storage", "ls"]:
        if call[2].endswith("/FINISHED"):
            return "finished?"
        if call[2].endswith("/commit_success.txt"):
            return "ckpts?"
        return "workdir?"
    if call[:3] == ["compute", "tpus", "tpu-vm"] or call[:3] == [
        "compute",
        "tpus",
        "queued-resources",
    ]:
        label = ("qr-" if call[2] == "queued-resources" else "") + call[3]
        if call[3] == "describe" and "--format=value(networkEndpoints.len())" in call:
            return "workers?"
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


def dry_run_lines(stdout: str) -> list[str]:
    """The `+ CMD` lines of --dry-run output, without the '+ '."""
    return [line[2:] for line in stdout.splitlines() if line.startswith("+ ")]


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
        "--env",
        "--all-workers",
        "--delete-on-give-up",
        "ssh-add ~/.ssh/google_compute_engine",
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


@pytest.mark.parametrize("bad", ["1KEY=v", "KEY", "MY-KEY=v", "=v"])
def test_env_needs_key_value(gcloud, bad):
    proc = gcloud.run("train", *BASE, f"--workdir={WORKDIR}", f"--env={bad}")
    assert proc.returncode == 2
    assert "--env takes KEY=VALUE" in proc.stderr
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
    env["TMPDIR"] = str(tmp_path)
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
    gcloud.script("qr_states", ["WAITING_FOR_RESOURCES", "DENIED", "PROVISIONING", "ACTIVE"])
    proc = gcloud.run(
        "create", *BASE, "--accelerator-type=v4-8", "--queued", "--wait", "--poll-seconds=0"
    )
    assert_ok(proc)
    assert gcloud.kinds() == ["qr-create"] + ["qr-describe"] * 4
    assert "PERMISSION_DENIED" in proc.stderr  # shown, then retried


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
    gcloud.script("describe_states", ["MISSING"])
    proc = gcloud.run("status", *BASE)
    assert proc.returncode == 1 and "MISSING" in proc.stdout


def test_status_shows_health_and_gcloud_errors(gcloud):
    gcloud.script("describe_states", ["READY TIMEOUT EXECUTE_TIMED_OUT,LOW_MEMORY"])
    proc = gcloud.run("status", *BASE)
    assert_ok(proc)
    assert "READY (health TIMEOUT, symptoms EXECUTE_TIMED_OUT,LOW_MEMORY)" in proc.stdout
    # A permission error is not "MISSING": it is shown as gcloud said it.
    gcloud.script("describe_states", ["DENIED"])
    proc = gcloud.run("status", *BASE)
    assert proc.returncode == 1
    assert "MISSING" not in proc.stdout
    assert "PERMISSION_DENIED: Permission 'tpu.nodes.get' denied" in proc.stdout


# ------------------------------------------------------------- setup/train/stop --


def test_setup_with_tarball(gcloud, tmp_path):
    tarball = tmp_path / "src.tar.gz"
    tarball.write_bytes(b"not really a tarball")
    assert_ok(gcloud.run("setup", *BASE, f"--tarball={tarball}"))
    scp, ssh = gcloud.calls
    assert scp[:4] == ["compute", "tpus", "tpu-vm", "scp"]
    assert str(tarball) in scp and "my-tpu:resnet-src.tar.gz" in scp
    assert worker_flag(scp) == "all"
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
    (ssh,) = gcloud.calls  # no scp: nothing secret to copy
    assert worker_flag(ssh) == "all"
    cmd = remote_command(ssh)
    assert "url=https://github.com/me/resnet.git" in cmd
    assert 'GIT_TERMINAL_PROMPT=0 git clone --quiet "$url"' in cmd
    assert "checkout --quiet v1.0" in cmd
    assert 'pip install ".[tpu]"' in cmd


def test_setup_pins_uv_and_leaves_profiles_alone(gcloud, tmp_path):
    tarball = tmp_path / "src.tar.gz"
    tarball.write_bytes(b"x")
    assert_ok(gcloud.run("setup", *BASE, f"--tarball={tarball}"))
    cmd = remote_command(gcloud.calls[-1])
    version = re.search(r"^UV_VERSION=(\S+)$", open(TPU_POD).read(), re.M).group(1)
    assert re.fullmatch(r"\d+\.\d+\.\d+", version)
    assert f"curl -LsSf https://astral.sh/uv/{version}/install.sh |" in cmd
    assert "astral.sh/uv/install.sh" not in cmd  # never the moving "latest" installer
    install = cmd.split(f"astral.sh/uv/{version}/install.sh |", 1)[1].splitlines()[1]
    assert 'UV_UNMANAGED_INSTALL="$HOME/.local/bin"' in install
    assert "UV_NO_MODIFY_PATH=1" in install and install.rstrip().endswith(" sh")


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


ENV = {
    "JAX_COMPILATION_CACHE_DIR": "gs://my-bucket/xla-cache",
    "TRICKY": 'it\'s a "test" with $HOME, `backticks`; rm -rf / & a\nnewline',
    "EMPTY": "",
}


def test_env_reaches_the_launcher_on_every_worker(gcloud, tmp_path):
    assert_ok(
        gcloud.run(
            "train", *BASE, f"--workdir={WORKDIR}", *[f"--env={k}={v}" for k, v in ENV.items()]
        )
    )
    cmd = remote_command(gcloud.calls[0])
    lines = cmd.splitlines()
    exports = [i for i, line in enumerate(lines) if line.startswith("export ")]
    assert len(exports) == len(ENV)
    # Exported after the venv is activated and before the launcher starts (it inherits them).
    activate = next(
        i for i, line in enumerate(lines) if '/bin/activate"' in line and line[0] == "."
    )
    nohup = next(i for i, line in enumerate(lines) if "nohup" in line)
    assert activate < min(exports) and max(exports) < nohup
    # The quoting survives a real shell: every value arrives byte for byte.
    probe = (
        "\n".join(lines[i] for i in exports)
        + '\nprintf "%s\\0" "$JAX_COMPILATION_CACHE_DIR" "$TRICKY" "$EMPTY"\n'
    )
    out = subprocess.run([BASH, "-c", probe], capture_output=True, text=True, timeout=30).stdout
    assert out.split("\0")[:-1] == list(ENV.values())
    assert "(environment: JAX_COMPILATION_CACHE_DIR TRICKY EMPTY)" in cmd  # named in the log


def test_stop_and_logs(gcloud):
    assert_ok(gcloud.run("stop", *BASE))
    assert_ok(gcloud.run("logs", *BASE))
    stop, logs = gcloud.calls
    assert worker_flag(stop) == "all"
    assert "pkill -TERM" in remote_command(stop)
    assert worker_flag(logs) == "0"
    assert "tail" in remote_command(logs) and "-F" in remote_command(logs)
    assert "resnet-train.log" in remote_command(logs)


def test_logs_all_workers(gcloud):
    gcloud.script("workers", [3])
    proc = gcloud.run("logs", *BASE, "--all-workers", f"--logs-dir={gcloud.logs}", "--log-lines=50")
    assert_ok(proc)
    assert gcloud.kinds() == ["workers?", "ssh:log", "ssh:log", "ssh:log"]
    assert [worker_flag(c) for c in gcloud.calls[1:]] == ["0", "1", "2"]
    assert "tail -n 50" in remote_command(gcloud.calls[1])
    (folder,) = gcloud.logs.iterdir()
    assert folder.name.startswith("my-tpu-") and folder.name.endswith("-logs")
    assert sorted(p.name for p in folder.iterdir()) == [f"worker-{i}.log" for i in range(3)]
    for i in range(3):
        assert (folder / f"worker-{i}.log").read_text() == f"first line\nline from worker {i}\n"
    assert str(folder) in proc.stderr


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
        "gcloud storage ls gs://my-bucket/runs/r1/",
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
        f"--logs-dir={gcloud.logs}",
        *extra,
        "--",
        "--config.train.num_epochs=1",
        timeout=timeout,
    )


def test_supervise_recreates_after_preemption(gcloud):
    gcloud.script("describe_states", ["PREEMPTED", "READY"])
    gcloud.script("finished_rcs", [1, 1, 0])
    proc = supervise(gcloud)
    assert_ok(proc)
    assert gcloud.kinds() == [
        "workdir?",
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
    assert calls[0] == ["storage", "ls", f"{WORKDIR}/"]
    assert calls[1] == ["storage", "ls", f"{WORKDIR}/FINISHED"]
    assert "--quiet" in calls[3]
    assert "--spot" in calls[4] and "--accelerator-type=v4-32" in calls[4]
    assert worker_flag(calls[5]) == "all" and worker_flag(calls[6]) == "all"
    train_cmd = remote_command(calls[6])
    assert "python -m launch.main" in train_cmd
    assert f"--workdir={WORKDIR} --config.train.num_epochs=1" in train_cmd
    assert "run finished" in proc.stderr


def test_supervise_creates_missing_slice_without_delete(gcloud):
    gcloud.script("describe_states", ["MISSING", "READY"])
    gcloud.script("finished_rcs", [1, 0])
    proc = supervise(gcloud)
    assert_ok(proc)
    assert gcloud.kinds() == [
        "workdir?",
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
    assert gcloud.kinds() == ["workdir?", "finished?", "delete"]


@pytest.mark.parametrize(
    "error,shown",
    [("DENIED", "PERMISSION_DENIED"), ("MISSING", "NOT_FOUND"), ("EXPIRED", "gcloud auth login")],
)
def test_supervise_refuses_a_workdir_it_cannot_list(gcloud, error, shown):
    # Otherwise FINISHED is never seen and a finished run is started again and again.
    gcloud.script("workdir_ls", [error])
    proc = supervise(gcloud)
    assert proc.returncode == 1
    assert gcloud.kinds() == ["workdir?"]
    assert "cannot list gs://my-bucket/runs/r1/" in proc.stderr
    assert shown in proc.stderr


def test_supervise_accepts_a_new_empty_workdir(gcloud):
    # "matched no objects": the bucket is readable, the run folder does not exist yet.
    gcloud.script("workdir_ls", ["EMPTY"])
    gcloud.script("finished_rcs", [0])
    assert_ok(supervise(gcloud))
    assert gcloud.kinds() == ["workdir?", "finished?"]


def test_supervise_waits_while_creating(gcloud):
    gcloud.script("describe_states", ["CREATING", "REPAIRING", "READY"])
    gcloud.script("finished_rcs", [1, 1, 1, 0])
    assert_ok(supervise(gcloud))
    assert gcloud.kinds() == [
        "workdir?",
        "finished?",
        "describe",
        "finished?",
        "describe",
        "finished?",
        "describe",
        "ssh:check",
        "finished?",
    ]


def test_supervise_restarts_preempted_launcher(gcloud):
    # READY, but the launcher exited 75 (e.g. a maintenance event): stop leftovers, train again.
    gcloud.script("check_results", ["75 75", "running running"])
    gcloud.script("finished_rcs", [1, 1, 1, 0])
    proc = supervise(gcloud, "--max-failures=0")
    assert_ok(proc)
    assert gcloud.kinds() == [
        "workdir?",
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
    assert "retriable exit status 75" in proc.stderr


def test_supervise_stalled_launcher_is_retriable(gcloud):
    # Exit 5 (stalled, stacks dumped): logs saved, launcher restarted, not a failure.
    gcloud.script("check_results", ["5 running", "running running"])
    gcloud.script("finished_rcs", [1, 1, 1, 0])
    proc = supervise(gcloud, "--max-failures=0")
    assert_ok(proc)
    kinds = gcloud.kinds()
    assert kinds[3:10] == [
        "ssh:check",
        "finished?",
        "workers?",
        "ssh:log",
        "ssh:log",
        "ssh:stop",
        "ssh:train",
    ]
    assert "retriable exit status 5" in proc.stderr
    (folder,) = gcloud.logs.iterdir()
    assert folder.name.endswith("-exit5")
    assert "line from worker 1" in (folder / "worker-1.log").read_text()


def test_supervise_gives_up_after_max_restarts(gcloud):
    gcloud.script("describe_states", ["PREEMPTED"])
    proc = supervise(gcloud, "--max-restarts=2")
    assert proc.returncode == 3, proc.stderr
    assert "--max-restarts=2" in proc.stderr
    assert gcloud.kinds().count("create") == 2


def test_supervise_gives_up_after_max_failures(gcloud):
    gcloud.script("check_results", ["1 running"])  # the launcher failed on worker 0
    gcloud.script("checkpoints", ["100"])  # ... and no new checkpoint appears
    proc = supervise(gcloud, "--max-failures=1")
    assert proc.returncode == 3, proc.stderr
    assert "--max-failures=1" in proc.stderr
    assert gcloud.kinds().count("ssh:train") == 1
    # The logs of every failed launch were saved.
    assert len(list(gcloud.logs.iterdir())) == 2


def test_supervise_counts_failures_only_without_new_checkpoints(gcloud):
    # Three failures, but a new checkpoint between each: training progresses, keep going.
    gcloud.script("check_results", ["1 1", "1 1", "1 1", "running running"])
    gcloud.script("checkpoints", ["100", "200", "300"])
    gcloud.script("finished_rcs", [1] * 7 + [0])
    proc = supervise(gcloud, "--max-failures=1")
    assert_ok(proc)
    assert gcloud.kinds().count("ssh:train") == 3
    assert proc.stderr.count("failure count reset") == 2


def test_supervise_gives_up_on_bad_input(gcloud):
    gcloud.script("check_results", ["2 2"])  # the launcher exited 2
    proc = supervise(gcloud)
    assert proc.returncode == 3
    assert "ssh:train" not in gcloud.kinds()
    assert "status 2 (bad input" in proc.stderr


def test_supervise_stops_when_training_diverged(gcloud):
    gcloud.script("check_results", ["running 3"])  # diverged (every host decides the same)
    proc = supervise(gcloud)
    assert proc.returncode == 3
    kinds = gcloud.kinds()
    assert "ssh:train" not in kinds and "ssh:stop" not in kinds and "delete" not in kinds
    assert "status 3 (training diverged" in proc.stderr
    # The logs were saved before giving up, and the slice is said to be still billed.
    (folder,) = gcloud.logs.iterdir()
    assert folder.name.endswith("-exit3") and (folder / "worker-0.log").exists()
    assert str(folder) in proc.stderr
    assert "NOT deleted: it still exists and is billed" in proc.stderr
    delete = "tools/cluster/tpu_pod.sh delete --name=my-tpu --zone=us-central2-b --project=my-proj'"
    assert delete in proc.stderr


def test_supervise_delete_on_give_up(gcloud):
    gcloud.script("check_results", ["3 3"])
    proc = supervise(gcloud, "--delete-on-give-up")
    assert proc.returncode == 3
    kinds = gcloud.kinds()
    assert kinds[-1] == "delete" and kinds.index("ssh:log") < kinds.index("delete")
    assert "--delete-on-give-up" in proc.stderr and "is billed" not in proc.stderr


def test_supervise_saves_logs_when_a_launch_fails(gcloud):
    gcloud.script("check_results", ["running 1", "running running"])
    gcloud.script("finished_rcs", [1, 1, 1, 0])
    proc = supervise(gcloud)
    assert_ok(proc)
    (folder,) = gcloud.logs.iterdir()
    assert folder.name.endswith("-exit1")
    logs = {p.name: p.read_text() for p in folder.iterdir()}
    assert logs == {f"worker-{i}.log": f"first line\nline from worker {i}\n" for i in range(2)}
    assert "exit status 1 (failure 1 of at most 3" in proc.stderr


@pytest.mark.parametrize("error", ["DENIED", "EXPIRED", "NETWORK"])
def test_supervise_api_errors_are_retried_not_counted(gcloud, error):
    # describe fails with PERMISSION_DENIED / expired credentials / a network error: that is
    # not "missing", so nothing is created or deleted, and no restart is used up.
    gcloud.script("describe_states", [error, error, error, "READY"])
    gcloud.script("finished_rcs", [1, 1, 1, 1, 0])
    proc = supervise(gcloud, "--max-restarts=0")
    assert_ok(proc)
    kinds = gcloud.kinds()
    assert "create" not in kinds and "delete" not in kinds
    assert kinds.count("describe") == 4
    assert proc.stderr.count("not counted as a restart") == 3
    assert "3 in a row" in proc.stderr  # backoff grows with the errors in a row
    shown = {
        "DENIED": "PERMISSION_DENIED: Permission 'tpu.nodes.get' denied",
        "EXPIRED": "gcloud auth login",
        "NETWORK": "ConnectionError",
    }[error]
    assert shown in proc.stderr


def test_supervise_finished_check_errors_are_retried(gcloud):
    gcloud.script("finished_rcs", ["EXPIRED", "NETWORK", 0])
    proc = supervise(gcloud, "--max-restarts=0")
    assert_ok(proc)
    assert gcloud.kinds() == ["workdir?", "finished?", "finished?", "finished?"]
    assert "Reauthentication failed" in proc.stderr


def test_supervise_backoff_is_exponential_and_capped(gcloud):
    gcloud.script("describe_states", ["DENIED"] * 3 + ["READY"])
    gcloud.script("finished_rcs", [1] * 4 + [0])
    proc = gcloud.run(
        "supervise",
        *BASE,
        "--accelerator-type=v4-32",
        f"--workdir={WORKDIR}",
        "--poll-seconds=1",
        "--max-backoff=2",
        "--repo-url=https://example.com/resnet.git",
    )
    assert_ok(proc)
    delays = re.findall(r"retrying in (\d+)s", proc.stderr)
    assert delays == ["1", "2", "2"]


def unreachable_run(gcloud, describe, checkpoints, polls, *extra):
    gcloud.script("describe_states", describe)
    gcloud.script("check_results", ["SSH_ERROR"])
    gcloud.script("checkpoints", checkpoints)
    gcloud.script("finished_rcs", [1] * polls + [0])
    return supervise(gcloud, "--unreachable-polls=2", "--progress-timeout=0", *extra)


def test_supervise_keeps_unreachable_slice_while_checkpoints_advance(gcloud):
    # ssh fails on every poll (revoked key, firewall, our network...), the TPU API gives no
    # health, but new checkpoints keep appearing: the run is fine, never delete it.
    proc = unreachable_run(gcloud, ["READY TIMEOUT"], ["100", "200", "300", "400", "500"], 5)
    assert_ok(proc)
    kinds = gcloud.kinds()
    assert "delete" not in kinds and "create" not in kinds and "ssh:train" not in kinds
    assert kinds.count("ssh:check") == 5 and kinds.count("ckpts?") == 5
    # gcloud's ssh error is shown, not thrown away.
    assert "Connection timed out" in proc.stderr and "exit status 255" in proc.stderr
    assert "checkpoints are still advancing (step 500)" in proc.stderr
    assert "ssh-add ~/.ssh/google_compute_engine" in proc.stderr


def test_supervise_keeps_unreachable_slice_the_api_calls_healthy(gcloud):
    proc = unreachable_run(gcloud, ["READY HEALTHY"], ["100"], 5)
    assert_ok(proc)
    assert "delete" not in gcloud.kinds() and "create" not in gcloud.kinds()
    assert "reports the slice HEALTHY: not recreating it" in proc.stderr


def test_supervise_waits_for_maintenance(gcloud):
    proc = unreachable_run(gcloud, ["READY UNHEALTHY_MAINTENANCE"], ["100"], 4)
    assert_ok(proc)
    assert "delete" not in gcloud.kinds()
    assert "under maintenance" in proc.stderr


def test_supervise_recreates_unreachable_unhealthy_stuck_slice(gcloud):
    # Unreachable for 2 polls, health TIMEOUT, symptoms, and no new checkpoint: recreate.
    gcloud.script("setup_results", ["OK"])
    proc = unreachable_run(
        gcloud, ["READY TIMEOUT EXECUTE_TIMED_OUT", "READY TIMEOUT EXECUTE_TIMED_OUT"], ["100"], 2
    )
    assert_ok(proc)
    kinds = gcloud.kinds()
    assert kinds[:13] == [
        "workdir?",
        "finished?",
        "describe",
        "ssh:check",
        "ckpts?",
        "finished?",
        "describe",
        "ssh:check",
        "ckpts?",
        "delete",
        "create",
        "ssh:setup",
        "ssh:train",
    ]
    assert "health TIMEOUT, symptoms EXECUTE_TIMED_OUT" in proc.stderr


def test_supervise_does_not_recreate_when_checkpoints_cannot_be_listed(gcloud):
    proc = unreachable_run(gcloud, ["READY TIMEOUT"], ["DENIED"], 4)
    assert_ok(proc)
    assert "delete" not in gcloud.kinds()
    assert "cannot be listed" in proc.stderr


def test_supervise_queued_recreates_queued_resource(gcloud):
    gcloud.script("describe_states", ["PREEMPTED", "READY"])
    gcloud.script("qr_states", ["SUSPENDED", "WAITING_FOR_RESOURCES", "ACTIVE"])
    gcloud.script("finished_rcs", [1, 0])
    assert_ok(supervise(gcloud, "--queued"))
    assert gcloud.kinds() == [
        "workdir?",
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
    create = gcloud.calls[5]
    assert "--node-id=my-tpu" in create and "--spot" in create


def test_supervise_queued_keeps_waiting_request(gcloud):
    # No TPU yet because the queued request is still waiting: do not delete/recreate it.
    gcloud.script("describe_states", ["MISSING"])
    gcloud.script("qr_states", ["WAITING_FOR_RESOURCES"])
    gcloud.script("finished_rcs", [1, 1, 0])
    assert_ok(supervise(gcloud, "--queued"))
    assert gcloud.kinds() == ["workdir?"] + ["finished?", "describe", "qr-describe"] * 2 + [
        "finished?"
    ]


def test_supervise_queued_permission_error_is_not_missing(gcloud):
    gcloud.script("describe_states", ["MISSING"])
    gcloud.script("qr_states", ["DENIED", "WAITING_FOR_RESOURCES"])
    gcloud.script("finished_rcs", [1, 1, 0])
    proc = supervise(gcloud, "--queued", "--max-restarts=0")
    assert_ok(proc)
    assert "qr-delete" not in gcloud.kinds() and "qr-create" not in gcloud.kinds()


# ------------------------------------------------------------------ timeouts --


def ssh_and_scp(gcloud) -> list[tuple[list[str], list[str]]]:
    return [
        (call, parent)
        for call, parent in zip(gcloud.calls, gcloud.parents)
        if call[:4] in (["compute", "tpus", "tpu-vm", "ssh"], ["compute", "tpus", "tpu-vm", "scp"])
    ]


def test_every_ssh_and_scp_has_timeouts(gcloud, tmp_path):
    tarball = tmp_path / "src.tar.gz"
    tarball.write_bytes(b"x")
    gcloud.script("describe_states", ["PREEMPTED", "READY"])
    gcloud.script("check_results", ["1 1", "running running"])
    gcloud.script("finished_rcs", [1, 1, 1, 1, 0])
    proc = gcloud.run(
        "supervise",
        *BASE,
        "--accelerator-type=v4-8",
        f"--workdir={WORKDIR}",
        "--poll-seconds=0",
        f"--tarball={tarball}",
        f"--logs-dir={gcloud.logs}",
        "--ssh-timeout=123",
        "--setup-timeout=456",
        "--stop-timeout=7",
    )
    assert_ok(proc)
    assert_ok(
        gcloud.run("logs", *BASE, "--all-workers", f"--logs-dir={gcloud.logs}", "--ssh-timeout=123")
    )
    pairs = ssh_and_scp(gcloud)
    kinds = {kind(call) for call, _ in pairs}
    assert kinds == {"scp", "ssh:setup", "ssh:train", "ssh:check", "ssh:log", "ssh:stop"}
    for call, parent in pairs:
        prefix = "--scp-flag=" if call[3] == "scp" else "--ssh-flag="
        for option in SSH_OPTIONS:
            assert prefix + option in call, call
        if not parent:
            continue  # no /proc: the parent process cannot be checked here
        # Run under timeout(1), killed with its children when the limit passes.
        assert os.path.basename(parent[0]) in ("timeout", "gtimeout"), parent
        limit = {"scp": "456", "ssh:setup": "456", "ssh:stop": str(7 + 123)}.get(kind(call), "123")
        assert parent[1:4] == ["--kill-after=30", limit, "gcloud"], (kind(call), parent)


def test_supervise_is_not_stuck_when_setup_hangs(gcloud):
    # A slice preempted during setup: the ssh connection hangs; the time limit ends it and
    # the next poll carries on.
    gcloud.script("describe_states", ["MISSING", "READY"])
    gcloud.script("setup_results", ["HANG", "OK"])
    gcloud.script("finished_rcs", [1, 1, 0])
    start = time.monotonic()
    proc = supervise(gcloud, "--setup-timeout=2", timeout=50)
    assert_ok(proc)
    assert time.monotonic() - start < 40
    assert "timed out after 2s: gcloud compute tpus tpu-vm ssh" in proc.stderr
    assert gcloud.kinds()[3:5] == ["create", "ssh:setup"]
    assert "ssh:train" not in gcloud.kinds()[:6]  # train was not started after the failed setup


def test_supervise_is_not_stuck_when_the_check_hangs(gcloud):
    gcloud.script("check_results", ["HANG", "running running"])
    gcloud.script("finished_rcs", [1, 1, 0])
    start = time.monotonic()
    proc = supervise(gcloud, "--ssh-timeout=2", timeout=50)
    assert_ok(proc)
    assert time.monotonic() - start < 40
    assert "exit status 124" in proc.stderr  # counted as unreachable, nothing deleted
    assert "delete" not in gcloud.kinds()


def test_sigterm_stops_supervise_and_the_call_in_flight(gcloud):
    # The bounded ssh runs in its own process group (timeout's): the signal must reach it.
    gcloud.script("describe_states", ["MISSING"])
    gcloud.script("setup_results", ["HANG"])
    proc = subprocess.Popen(
        [BASH, TPU_POD, "supervise", *BASE, "--accelerator-type=v4-8", f"--workdir={WORKDIR}"]
        + ["--poll-seconds=0", "--repo-url=https://example.com/resnet.git"],
        env=gcloud.env(),
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while "ssh:setup" not in gcloud.kinds():
            assert time.monotonic() < deadline, "setup did not start"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # only this test's own process group
    assert proc.returncode == -signal.SIGTERM
    if shutil.which("ps"):  # no fake gcloud of this test is left running
        time.sleep(0.5)
        leftovers = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        assert str(gcloud.bin / "gcloud") not in leftovers


# ------------------------------------------------------------------ secrets --

TOKEN = "ghp_S3cr3tT0k3nValue"
SECRET_URL = f"https://build-bot:{TOKEN}@github.com/me/resnet.git"


def test_repo_url_token_never_printed(gcloud):
    runs = [
        gcloud.run("setup", *BASE, f"--repo-url={SECRET_URL}", "--ref=v1"),
        gcloud.run("setup", *BASE, f"--repo-url={SECRET_URL}", "--dry-run"),
        gcloud.run(
            "supervise",
            *BASE,
            "--accelerator-type=v4-8",
            f"--workdir={WORKDIR}",
            f"--repo-url={SECRET_URL}",
            "--dry-run",
        ),
    ]
    # A real supervise run that recreates the slice, with the URL from the environment.
    gcloud.script("describe_states", ["MISSING", "READY"])
    gcloud.script("finished_rcs", [1, 1, 0])
    runs.append(
        gcloud.run(
            "supervise",
            *BASE,
            "--accelerator-type=v4-8",
            f"--workdir={WORKDIR}",
            "--poll-seconds=0",
            env=gcloud.env(TPU_REPO_URL=SECRET_URL),
        )
    )
    assert_ok(runs[0])
    assert_ok(runs[3])
    assert gcloud.kinds()[2:] == [
        "workdir?",
        "finished?",
        "describe",
        "create",
        "scp",
        "ssh:setup",
        "ssh:train",
        "finished?",
        "describe",
        "ssh:check",
        "finished?",
    ]
    for proc in runs:
        assert TOKEN not in proc.stdout + proc.stderr
    assert "https://***@github.com/me/resnet.git" in runs[0].stderr
    # Not on any command line either (ps shows those): the workers get it in a file.
    assert gcloud.calls and all(TOKEN not in arg for call in gcloud.calls for arg in call)
    scp = gcloud.calls[0]
    assert kind(scp) == "scp" and scp[5] == "my-tpu:.resnet-repo-url" and worker_flag(scp) == "all"
    assert (gcloud.dir / "scp" / ".resnet-repo-url").read_text() == SECRET_URL + "\n"
    cmd = remote_command(gcloud.calls[1])
    assert 'url=$(cat "$HOME/.resnet-repo-url")' in cmd
    assert 'rm -f "$HOME/.resnet-repo-url"' in cmd
    # The clone does not keep the token in .git/config.
    assert "remote set-url origin https://github.com/me/resnet.git" in cmd


def test_remote_setup_masks_credentials_in_git_errors(gcloud, tmp_path):
    # Run the real remote setup script with a git that fails the way git does, quoting the URL.
    assert_ok(gcloud.run("setup", *BASE, f"--repo-url={SECRET_URL}"))
    script = remote_command(gcloud.calls[1])
    home = tmp_path / "home"
    home.mkdir()
    (home / ".resnet-repo-url").write_text(SECRET_URL + "\n")
    fake_bin = tmp_path / "git-bin"
    fake_bin.mkdir()
    (fake_bin / "git").write_text(
        "#!/bin/sh\n"
        "echo \"fatal: unable to access '$3': Could not resolve host: github.com\" >&2\n"
        "exit 128\n"
    )
    (fake_bin / "git").chmod(0o755)
    env = dict(os.environ, HOME=str(home), PATH=f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run([BASH, "-c", script], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert "fatal: unable to access 'https://***@github.com/me/resnet.git'" in proc.stderr
    assert TOKEN not in proc.stdout + proc.stderr
    assert not (home / ".resnet-repo-url").exists()  # read once, then deleted


# ----------------------------------------------------------- the real gcloud --

needs_real_gcloud = pytest.mark.skipif(
    REAL_GCLOUD is None, reason="the Google Cloud CLI (gcloud) is not installed"
)


def real_gcloud_env(tmp_path) -> dict[str, str]:
    """The real gcloud, with an empty configuration: no account, no project.

    Checked with strace: with these settings the calls below open no network connection and
    send no DNS query.
    """
    config = tmp_path / "gcloud-config"
    config.mkdir(exist_ok=True)
    # gcloud's cached answer to "is this a GCE VM?": without it, the first call looks up
    # metadata.google.internal in DNS.
    (config / "gce").write_text("False")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLOUDSDK_")}
    env.update(
        CLOUDSDK_CONFIG=str(config),
        CLOUDSDK_CORE_DISABLE_PROMPTS="1",
        CLOUDSDK_COMPONENT_MANAGER_DISABLE_UPDATE_CHECK="1",
        CLOUDSDK_CORE_DISABLE_USAGE_REPORTING="1",
        CLOUDSDK_CORE_CHECK_GCE_METADATA="false",  # no lookup of the GCE metadata server
        PATH=f"{os.path.dirname(REAL_GCLOUD)}{os.pathsep}{env.get('PATH', '')}",
    )
    return env


@needs_real_gcloud
def test_dry_run_commands_parse_with_the_real_gcloud(gcloud, tmp_path):
    """Every command line the script prints is accepted by the real gcloud's parser.

    With no account configured, gcloud parses the whole command line (flags, positionals,
    the TPU resource) and only then stops with "You do not currently have an active account
    selected"; a flag it does not know fails earlier, with "unrecognized arguments" (exit 2).
    """
    tarball = tmp_path / "src.tar.gz"
    tarball.write_bytes(b"x")
    sup = [*BASE, f"--workdir={WORKDIR}", "--dry-run", "--env=A=b c"]
    invocations = [
        [
            "create",
            *BASE,
            "--accelerator-type=v4-32",
            "--spot",
            "--service-account=s@p.iam",
            "--dry-run",
        ],
        ["create", *BASE, "--accelerator-type=v5litepod-16", "--queued", "--dry-run"],
        ["setup", *BASE, f"--tarball={tarball}", "--dry-run"],
        ["setup", *BASE, f"--repo-url={SECRET_URL}", "--dry-run"],
        ["train", *sup],
        ["status", *BASE, "--queued", f"--workdir={WORKDIR}", "--dry-run"],
        ["logs", *BASE, "--worker=1", "--dry-run"],
        ["logs", *BASE, "--all-workers", "--dry-run"],
        ["stop", *BASE, "--dry-run"],
        ["delete", *BASE, "--dry-run"],
        ["delete", *BASE, "--queued", "--dry-run"],
        ["supervise", *sup, "--accelerator-type=v4-32", f"--tarball={tarball}"],
    ]
    lines = []
    for args in invocations:
        proc = gcloud.run(*args)
        assert_ok(proc)
        lines += [line for line in dry_run_lines(proc.stdout) if line.startswith("gcloud ")]
    # The script's own checks and supervise's polls, as the loop would run them.
    lines.append(f"gcloud storage ls '{WORKDIR}/checkpoints/*/commit_success.txt'")
    unique = list(dict.fromkeys(lines))
    assert len(unique) >= 15
    env = real_gcloud_env(tmp_path)

    def parse(line: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [BASH, "-c", line], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
        )

    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(parse, unique))
    for line, proc in zip(unique, results):
        assert proc.returncode == 1 and "do not currently have an active account" in proc.stderr, (
            f"{line[:300]}\nexit {proc.returncode}\n{proc.stderr[-2000:]}"
        )


@needs_real_gcloud
def test_describe_formats_with_the_real_gcloud_formatter(gcloud, tmp_path):
    """The --format strings, applied by gcloud's own resource printer to TPU API v2 messages.

    The Node, Symptom and QueuedResource messages come from the API client that gcloud ships
    (so the field names are the API's), and the printed line is fed back to the script.
    """
    env = real_gcloud_env(tmp_path)
    info = subprocess.run(
        [REAL_GCLOUD, "info", "--format=value(installation.sdk_root,basic.python_location)"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert info.returncode == 0, info.stderr
    sdk_root, python = info.stdout.strip().split("\t")
    formats = set()
    for args in (
        ["status", *BASE, "--queued", "--dry-run"],
        ["logs", *BASE, "--all-workers", "--dry-run"],
    ):
        for line in dry_run_lines(gcloud.run(*args).stdout):
            formats.update(
                a[len("--format=") :] for a in shlex.split(line) if a.startswith("--format=")
            )
    assert len(formats) == 3
    program = (
        "import sys\n"
        "sys.path[:0] = [sys.argv[1] + '/lib', sys.argv[1] + '/lib/third_party']\n"
        "from googlecloudsdk.core.resource import resource_printer\n"
        "from googlecloudsdk.generated_clients.apis.tpu.v2 import tpu_v2_messages as m\n"
        "S = m.Symptom.SymptomTypeValueValuesEnum\n"
        "node = m.Node(\n"
        "    state=m.Node.StateValueValuesEnum.READY,\n"
        "    health=m.Node.HealthValueValuesEnum.TIMEOUT,\n"
        "    healthDescription='worker 1 unresponsive | retrying',\n"
        "    symptoms=[m.Symptom(symptomType=S.EXECUTE_TIMED_OUT, workerId='1'),\n"
        "              m.Symptom(symptomType=S.LOW_MEMORY, workerId='2')],\n"
        "    networkEndpoints=[m.NetworkEndpoint(ipAddress='10.0.0.%d' % i) for i in range(4)])\n"
        "qr = m.QueuedResource(state=m.QueuedResourceState(\n"
        "    state=m.QueuedResourceState.StateValueValuesEnum.WAITING_FOR_RESOURCES))\n"
        "for fmt in sys.argv[2:]:\n"
        "    print('=== ' + fmt)\n"
        "    resource_printer.Print([qr if 'state.state' in fmt else node], fmt)\n"
    )
    clean = {k: v for k, v in env.items() if not k.startswith("PYTHON")}
    out = subprocess.run(
        [python, "-c", program, sdk_root, *sorted(formats)],
        env=clean,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    printed = dict(re.findall(r"^=== (.*)\n(.*)$", out.stdout, re.M))
    assert printed["value(networkEndpoints.len())"] == "4"
    assert printed["value(state.state)"] == "WAITING_FOR_RESOURCES"
    (describe,) = [f for f in formats if f.startswith("value[")]
    assert (
        printed[describe]
        == "READY|TIMEOUT|EXECUTE_TIMED_OUT,LOW_MEMORY|worker 1 unresponsive | retrying"
    )
    # The script reads that line as gcloud prints it.
    (gcloud.dir / "node.txt").write_text(printed[describe] + "\n")
    gcloud.script("describe_states", ["@node.txt"])
    proc = gcloud.run("status", *BASE)
    assert_ok(proc)
    assert proc.stdout.strip() == (
        "TPU my-tpu (us-central2-b): READY (health TIMEOUT, symptoms EXECUTE_TIMED_OUT,LOW_MEMORY:"
        " worker 1 unresponsive | retrying)"
    )


# ------------------------------------------------------------------ shellcheck --


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
@pytest.mark.parametrize(
    "script", [TPU_POD, SBATCH, os.path.join(REPO, "tools", "bench", "offline_wheels.sh")]
)
def test_shellcheck(script):
    proc = subprocess.run(["shellcheck", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
