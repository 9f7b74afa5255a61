"""tools/cluster/tpu_pod (tpu_pod.sh): the supervise rules as a table, the CLI in-process
against a fake `gcloud`, a few end-to-end runs of tpu_pod.sh, and the real gcloud's parser.

GCP cannot run here: the fake gcloud below stands in for it, and the real gcloud (where
installed) parses every command line that --dry-run prints.

The fake appends its argv as one JSON line per call to calls.jsonl and answers from scripted
files, one line per call (the last one repeats); `NAME.KEY` (KEY a node or queued resource)
is read before `NAME`:
  compute tpus tpu-vm describe            `describe_states`: "STATE [HEALTH [SYMPTOMS]]" through
                                          the requested value() format, "@FILE" prints FILE, or
                                          an error name; `workers` (default 2) answers
                                          networkEndpoints.len(); the address is 10.0.0.2
  compute tpus queued-resources describe  `qr_states` (default ACTIVE) or an error name
  storage ls .../FINISHED                 `finished_rcs`: 1 absent, 0 there, or an error name
  storage ls .../checkpoints/*/commit_...  `checkpoints`: committed steps, space-separated
  storage ls (anything else)              `workdir_ls`: OK, EMPTY or an error name
  compute tpus tpu-vm ssh (check script)  `check_results`: one launcher state per worker; the
                                          fake RUNS the real remote check script per worker
                                          (fake HOME, fake pgrep); SSH_ERROR, HANG or an error
  compute tpus tpu-vm ssh (log script)    runs the real log script on a log "line from worker N"
  compute tpus tpu-vm ssh (setup script)  `setup_results`: OK, FAIL or HANG
  compute tpus tpu-vm scp                 copies the local file to scp/<remote name>
Error names: MISSING (NOT_FOUND), DENIED (PERMISSION_DENIED), EXPIRED (credentials), NETWORK.
In-process, a HANG answers as a call past its time limit (124); tpu_pod.sh end to end (slow)
really waits.
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

from tools.cluster import pod_gcloud, tpu_pod
from tools.cluster import pod_supervisor as ps
from tools.cluster import remote_scripts as remote

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TPU_POD = os.path.join(REPO, "tools", "cluster", "tpu_pod.sh")
SBATCH = os.path.join(REPO, "tools", "cluster", "slurm_train.sbatch")
BASH = shutil.which("bash") or "/bin/bash"
REAL_GCLOUD = shutil.which("gcloud")  # looked up before any fake is put on PATH

FAKE_GCLOUD = r'''
import json, os, re, shutil, subprocess, sys, time

ERRORS = ("MISSING", "DENIED", "EXPIRED", "NETWORK")
HANG = -1


def pop(state_dir, name, key, default):
    """Next scripted answer for `key` (else for everyone); the last one repeats."""
    path = os.path.join(state_dir, name + "." + key)
    if not os.path.exists(path):
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


def flag(args, name, default=""):
    for i, a in enumerate(args):
        if a.startswith(name + "="):
            return a[len(name) + 1:]
        if a == name:
            return args[i + 1]
    return default


def fail(args, kind):
    """Answers like gcloud does for these errors (messages as gcloud prints them)."""
    group = "gcloud." + ".".join(a for a in args[:4] if not a.startswith(("-", "gs://")))
    if kind == "NETWORK":
        return 1, "", ("ERROR: gcloud crashed (ConnectionError): HTTPSConnectionPool("
                       "host='tpu.googleapis.com', port=443): Max retries exceeded\n")
    msg = {
        "MISSING": "NOT_FOUND: Resource 'projects/p/locations/z/nodes/my-tpu' was not found",
        "DENIED": ("PERMISSION_DENIED: Permission 'tpu.nodes.get' denied on resource "
                   "'projects/p/locations/z/nodes/my-tpu' (or it may not exist)."),
        "EXPIRED": ("There was a problem refreshing your current auth tokens: Reauthentication "
                    "failed. cannot prompt during non-interactive execution.\n"
                    "Please run:\n\n  $ gcloud auth login\n"),
    }[kind]
    return 1, "", "ERROR: (%s) %s\n" % (group, msg)


def value(fmt, values):
    """The value() format: fields in order, separator '\t' unless [separator="..."]."""
    m = re.fullmatch(r'value(?:\[separator="(.*)"\])?\((.*)\)', fmt)
    if not m:
        raise SystemExit("fake gcloud: unsupported --format " + repr(fmt))
    sep = "\t" if m.group(1) is None else m.group(1)
    return sep.join(values[field] for field in m.group(2).split(",")) + "\n"


def run_remote(state_dir, script, name, home_setup):
    """Runs a remote script as one worker's login shell would, in a fake HOME."""
    home = os.path.join(state_dir, name)
    os.makedirs(home, exist_ok=True)
    stub = os.path.join(state_dir, "remote-bin")
    os.makedirs(stub, exist_ok=True)
    with open(os.path.join(stub, "pgrep"), "w") as f:
        f.write('#!/bin/sh\n[ "$FAKE_RUNNING" = 1 ]\n')
    os.chmod(os.path.join(stub, "pgrep"), 0o755)
    env = dict(os.environ, HOME=home, PATH=stub + os.pathsep + os.environ["PATH"])
    env.update(home_setup(home))
    proc = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
    return proc.returncode, proc.stdout, proc.stderr


def ssh_check(state_dir, args, node, command):
    answer = pop(state_dir, "check_results", node, "running running")
    if answer == "HANG":
        return HANG, "", ""
    if answer == "SSH_ERROR":
        return 255, "", ("ssh: connect to host 203.0.113.7 port 22: Connection timed out\n"
                         "ERROR: (gcloud.compute.tpus.tpu-vm.ssh) [/usr/bin/ssh] exited with "
                         "return code [255].\n")
    if answer in ERRORS:
        return fail(args, answer)
    out = ""
    for worker, code in enumerate(answer.split()):
        def setup(home, code=code):
            path = os.path.join(home, "resnet-train.exitcode")
            if os.path.exists(path):
                os.remove(path)
            if code not in ("running", "none"):
                with open(path, "w") as f:
                    f.write(code + "\n")
            return {"FAKE_RUNNING": "1" if code == "running" else "0"}

        rc, text, err = run_remote(state_dir, command, "%s-worker-%d" % (node, worker), setup)
        if rc:
            return rc, out, err
        out += text
    return 0, out, ""


def storage_ls(state_dir, args):
    url = args[2]
    if url.endswith("/FINISHED"):
        answer = pop(state_dir, "finished_rcs", "", "1")
        matched = [url] if answer == "0" else []
    elif url.endswith("/checkpoints/*/commit_success.txt"):
        answer = pop(state_dir, "checkpoints", "", "-")
        base = url[: -len("*/commit_success.txt")]
        matched = [base + s + "/commit_success.txt" for s in answer.split() if s != "-"]
    else:
        answer = pop(state_dir, "workdir_ls", "", "OK")
        matched = [] if answer == "EMPTY" else [url + "checkpoints/"]
    if answer in ERRORS:
        return fail(args, answer)
    if not matched:
        return 1, "", "ERROR: (gcloud.storage.ls) One or more URLs matched no objects.\n"
    return 0, "\n".join(matched) + "\n", ""


def answer(args, state_dir):
    """(exit status or HANG, stdout, stderr) of one gcloud call."""
    with open(os.path.join(state_dir, "calls.jsonl"), "a") as f:
        f.write(json.dumps(args) + "\n")
    command = flag(args, "--command")
    first_line = command.splitlines()[0] if command else ""
    if args[:4] == ["compute", "tpus", "tpu-vm", "describe"]:
        fmt = flag(args, "--format")
        if fmt == "value(networkEndpoints.len())":
            return 0, pop(state_dir, "workers", args[4], "2") + "\n", ""
        if fmt == "value(networkEndpoints[0].ipAddress)":
            return 0, "10.0.0.2\n", ""
        line = pop(state_dir, "describe_states", args[4], "READY")
        if line in ERRORS:
            return fail(args, line)
        if line.startswith("@"):
            with open(os.path.join(state_dir, line[1:])) as f:
                return 0, f.read(), ""
        words = line.split() + ["", ""]
        return 0, value(fmt, {"state": words[0], "health": words[1],
                              "symptoms.symptomType.list()": words[2],
                              "healthDescription": ""}), ""
    if args[:4] == ["compute", "tpus", "queued-resources", "describe"]:
        state = pop(state_dir, "qr_states", args[4], "ACTIVE")
        if state in ERRORS:
            return fail(args, state)
        return 0, value(flag(args, "--format"), {"state.state": state}), ""
    if args[:2] == ["storage", "ls"]:
        return storage_ls(state_dir, args)
    if args[3] == "create" and pop(state_dir, "create_results", args[4], "OK") == "QUOTA":
        return 1, "", ("ERROR: (gcloud.compute.tpus.tpu-vm.create) Quota "
                       "'TPUV4sPodPerProjectPerZoneForTPUAPI' exhausted.\n")
    if args[:4] == ["compute", "tpus", "tpu-vm", "scp"]:
        os.makedirs(os.path.join(state_dir, "scp"), exist_ok=True)
        shutil.copy(args[4], os.path.join(state_dir, "scp", args[5].split(":", 1)[1]))
        return 0, "", ""
    if args[:4] == ["compute", "tpus", "tpu-vm", "ssh"]:
        node = args[4]
        if first_line == "# tpu_pod.sh:check":
            return ssh_check(state_dir, args, node, command)
        if first_line == "# tpu_pod.sh:log":
            worker = int(flag(args, "--worker"))
            if pop(state_dir, "log_results", node, "OK") == "SSH_ERROR":
                return 255, "", "ssh: connect to host 203.0.113.7 port 22: Connection refused\n"

            def setup(home, worker=worker):
                with open(os.path.join(home, "resnet-train.log"), "w") as f:
                    f.write("first line\nline from worker %d\n" % worker)
                return {}

            return run_remote(state_dir, command, "%s-log-%d" % (node, worker), setup)
        if first_line == "# tpu_pod.sh:setup":
            result = pop(state_dir, "setup_results", node, "OK")
            return (HANG if result == "HANG" else 1 if result == "FAIL" else 0), "", ""
    return 0, "", ""


if __name__ == "__main__":
    rc, out, err = answer(sys.argv[1:], os.environ["FAKE_GCLOUD_DIR"])
    if rc == HANG:
        time.sleep(60)
        rc = 0
    sys.stdout.write(out)
    sys.stderr.write(err)
    sys.exit(rc)
'''
FAKE = {"__name__": "fake_gcloud"}
exec(compile(FAKE_GCLOUD, "fake_gcloud", "exec"), FAKE)


class InProcessGcloud(pod_gcloud.Gcloud):
    """The real runner (printing, dry run, time-limit reporting) with gcloud answered by the
    fake in this process. Records each call's time limit."""

    def execute(self, argv, limit, capture, out_path, err_path):
        if argv[0] != "gcloud":
            return super().execute(argv, limit, capture, out_path, err_path)
        state_dir = self.env["FAKE_GCLOUD_DIR"]
        with open(os.path.join(state_dir, "limits.jsonl"), "a") as f:
            f.write(json.dumps([argv[1:], limit]) + "\n")
        rc, out, err = FAKE["answer"](argv[1:], state_dir)
        if rc == FAKE["HANG"]:
            assert limit is not None, argv
            return pod_gcloud.Result(124)
        for path, text in ((out_path, out), (err_path, err)):
            if path:
                with open(path, "w") as f:
                    f.write(text)
        return pod_gcloud.Result(rc, out, err)


class Clock:
    """Time that passes only when the supervisor sleeps."""

    def __init__(self):
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class Run:
    def __init__(self, rc: int, stdout: str, stderr: str, sleeps: list[float]):
        self.returncode, self.stdout, self.stderr, self.sleeps = rc, stdout, stderr, sleeps


class FakeGcloud:
    """A fake gcloud on PATH (for subprocesses) and in-process; scripts answers, reads calls."""

    def __init__(self, tmp_path, capsys):
        self.dir = tmp_path / "gcloud-state"
        self.dir.mkdir()
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        gcloud = self.bin / "gcloud"
        gcloud.write_text(f"#!{sys.executable} -S\n" + FAKE_GCLOUD)
        gcloud.chmod(0o755)
        self.tmp_path = tmp_path
        self.logs = tmp_path / "logs"
        self.capsys = capsys

    def script(self, name: str, values) -> None:
        (self.dir / name).write_text("".join(f"{v}\n" for v in values))

    def _jsonl(self, name: str) -> list:
        path = self.dir / name
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]

    @property
    def calls(self) -> list[list[str]]:
        return self._jsonl("calls.jsonl")

    @property
    def limits(self) -> list[tuple[list[str], float | None]]:
        return [tuple(x) for x in self._jsonl("limits.jsonl")]

    def kinds(self) -> list[str]:
        return [kind(c) for c in self.calls]

    def env(self, **extra) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("TPU_", "CLOUDSDK_"))}
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        env["FAKE_GCLOUD_DIR"] = str(self.dir)
        env["TMPDIR"] = str(self.tmp_path)
        env.update(extra)
        return env

    def run(self, *args, env=None) -> Run:
        """tpu_pod in this process: the real CLI, the fake's answers, a clock that only moves
        when the supervisor sleeps."""
        clock = Clock()
        self.capsys.readouterr()
        rc = tpu_pod.main(
            list(args), env or self.env(), InProcessGcloud, sleep=clock.sleep, clock=clock
        )
        out, err = self.capsys.readouterr()
        return Run(rc, out, err, clock.sleeps)

    def run_script(self, *args, env=None, timeout=60) -> subprocess.CompletedProcess:
        """tools/cluster/tpu_pod.sh in a subprocess, with the fake gcloud on PATH."""
        env = env or self.env()
        env.setdefault("TPU_POD_PYTHON", sys.executable)
        return subprocess.run(
            [BASH, TPU_POD, *args], env=env, cwd=self.tmp_path, capture_output=True, text=True,
            timeout=timeout,
        )  # fmt: skip


@pytest.fixture
def gcloud(tmp_path, capsys):
    return FakeGcloud(tmp_path, capsys)


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
    if call[2] in ("tpu-vm", "queued-resources"):
        label = ("qr-" if call[2] == "queued-resources" else "") + call[3]
        if call[3] == "describe" and "--format=value(networkEndpoints.len())" in call:
            return "workers?"
        if call[3] == "describe" and "--format=value(networkEndpoints[0].ipAddress)" in call:
            return "address?"
        if call[3] == "ssh":
            first_line = remote_command(call).splitlines()[0]
            label += ":" + first_line.split(":")[-1]
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
    return next((a[len("--worker=") :] for a in call if a.startswith("--worker=")), "")


def assert_ok(proc) -> None:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    )


def dry_run_lines(stdout: str) -> list[str]:
    """The `+ CMD` lines of --dry-run output, without the '+ '."""
    return [line[2:] for line in stdout.splitlines() if line.startswith("+ ")]


# ------------------------------------------------------------------------ the rules, pure --

POLICY = ps.Policy(max_restarts=5, max_failures=2, unreachable_polls=3, progress_timeout=600)
READY = (ps.Slice("READY", "HEALTHY"),)


def launcher(*answers: str) -> ps.Launcher:
    return ps.combine(list(answers))


UNREACHABLE = ps.Launcher("unreachable", ssh_rc=255, unreachable=(0,), error="    | ssh: timed out")


def obs(**fields) -> ps.Observation:
    fields.setdefault("now", 5000.0)
    fields.setdefault("slices", READY)
    return ps.Observation(**fields)


# (name, history, observation, policy, expected kind, substrings of the notes and reason)
RULES = [
    ("1 finished", ps.History(), obs(finished=True), POLICY, ps.Kind.FINISH, []),
    (
        "2 api error backs off",
        ps.History(api_errors=2),
        obs(failed_call="describing TPU my-tpu", error="    | PERMISSION_DENIED"),
        ps.replace(POLICY, poll_seconds=10, max_backoff=30),
        ps.Kind.BACKOFF,
        ["describing TPU my-tpu failed (3 in a row", "retrying in 30s", "PERMISSION_DENIED"],
    ),
    ("3 preempted", ps.History(), obs(slices=(ps.Slice("PREEMPTED"),)), POLICY,
     ps.Kind.RECREATE, ["recreating the slice (PREEMPTED) (restart 1 of at most 5)"]),
    ("3 missing", ps.History(), obs(slices=(ps.Slice("MISSING"),)), POLICY, ps.Kind.RECREATE,
     ["MISSING"]),
    ("3 queued request waits", ps.History(),
     obs(slices=(ps.Slice("MISSING", queued="WAITING_FOR_RESOURCES"),)),
     ps.replace(POLICY, queued=True), ps.Kind.WAIT, ["queued resource is WAITING_FOR_RESOURCES"]),
    ("3 suspended request recreated", ps.History(),
     obs(slices=(ps.Slice("MISSING", queued="SUSPENDED"),)), ps.replace(POLICY, queued=True),
     ps.Kind.RECREATE, ["MISSING"]),
    ("3 one slice of a unit lost", ps.History(),
     obs(slices=(READY[0], ps.Slice("PREEMPTED", queued="SUSPENDED"))),
     ps.replace(POLICY, queued=True, slices=2), ps.Kind.RECREATE,
     ["slice 1 PREEMPTED", "recreating the slice (PREEMPTED)"]),
    ("4 creating waits", ps.History(), obs(slices=(ps.Slice("CREATING"),)), POLICY, ps.Kind.WAIT,
     []),
    ("4 stuck recreated", ps.History(transition_since=1000.0), obs(slices=(ps.Slice("REPAIRING"),)),
     POLICY, ps.Kind.RECREATE, ["stuck in REPAIRING for 1800s"]),
    ("5 bad input gives up", ps.History(), obs(launcher=launcher("2", "running")), POLICY,
     ps.Kind.GIVE_UP, ["status 2 (bad input", "workers: 2,running"]),
    ("5 diverged gives up", ps.History(), obs(launcher=launcher("3", "3")), POLICY,
     ps.Kind.GIVE_UP, ["status 3 (training diverged"]),
    ("6 preempted launcher", ps.History(), obs(launcher=launcher("75", "75")), POLICY,
     ps.Kind.RELAUNCH, ["retriable exit status 75", "starting the launcher again (restart 1"]),
    ("6 stalled launcher", ps.History(), obs(launcher=launcher("5", "running")), POLICY,
     ps.Kind.RELAUNCH, ["retriable exit status 5"]),
    ("7 failure counted", ps.History(), obs(launcher=launcher("1", "running"), newest_step=100),
     POLICY, ps.Kind.RELAUNCH, ["exit status 1 (failure 1 of at most 2"]),
    ("7 failures without progress give up",
     ps.History(failures=2, failure_step=100, last_step=100, steps_listed=True),
     obs(launcher=launcher("1", "1"), newest_step=100), POLICY, ps.Kind.GIVE_UP,
     ["failed 3 times with no new checkpoint", "--max-failures=2"]),
    ("7 a new checkpoint resets the count",
     ps.History(failures=2, failure_step=100, last_step=100, steps_listed=True),
     obs(launcher=launcher("1", "1"), newest_step=200), POLICY, ps.Kind.RELAUNCH,
     ["step 200 is new since the last failure: failure count reset", "failure 1 of at most 2"]),
    ("8 stopped launcher", ps.History(), obs(launcher=launcher("none", "0")), POLICY,
     ps.Kind.RELAUNCH, ["not running on every worker (workers: none,0)"]),
    ("8 finished meanwhile", ps.History(),
     obs(launcher=launcher("0", "0"), finished_after_check=True), POLICY, ps.Kind.RECHECK, []),
    ("9 unreachable first poll", ps.History(), obs(launcher=UNREACHABLE, newest_step=100,
     slices=(ps.Slice("READY", "TIMEOUT"),)), POLICY, ps.Kind.WAIT,
     ["exit status 255, 1 poll(s) in a row", "ssh: timed out", "ssh-add", "no new checkpoint"]),
    ("9 unreachable but healthy",
     ps.History(unreachable=5, unreachable_since=0.0, last_step=100, steps_listed=True),
     obs(launcher=UNREACHABLE, newest_step=100), POLICY, ps.Kind.WAIT,
     ["HEALTHY: not recreating"]),
    ("9 unreachable under maintenance",
     ps.History(unreachable=5, unreachable_since=0.0, last_step=100, steps_listed=True),
     obs(launcher=UNREACHABLE, newest_step=100,
         slices=(ps.Slice("READY", "UNHEALTHY_MAINTENANCE"),)),
     POLICY, ps.Kind.WAIT, ["under maintenance"]),
    ("9 unreachable, checkpoints advance",
     ps.History(unreachable=5, unreachable_since=0.0, last_step=100, steps_listed=True),
     obs(launcher=UNREACHABLE, newest_step=200, slices=(ps.Slice("READY", "TIMEOUT"),)), POLICY,
     ps.Kind.WAIT, ["still advancing (step 200)"]),
    ("9 unreachable, listing fails",
     ps.History(unreachable=5, unreachable_since=0.0, last_step=100, steps_listed=True),
     obs(launcher=UNREACHABLE, listing_failed=True, slices=(ps.Slice("READY", "TIMEOUT"),)),
     POLICY, ps.Kind.WAIT, ["cannot be listed"]),
    ("9 unreachable, stuck: recreate",
     ps.History(unreachable=5, unreachable_since=0.0, last_step=100, last_step_changed=0.0,
                steps_listed=True),
     obs(launcher=UNREACHABLE, newest_step=100,
         slices=(ps.Slice("READY", "TIMEOUT", "EXECUTE_TIMED_OUT"),)),
     POLICY, ps.Kind.RECREATE,
     ["READY but unreachable, TPU READY, health TIMEOUT, symptoms EXECUTE_TIMED_OUT"]),
    ("10 restarts exhausted", ps.History(restarts=5), obs(slices=(ps.Slice("PREEMPTED"),)),
     POLICY, ps.Kind.GIVE_UP, ["would exceed --max-restarts=5"]),
]  # fmt: skip


@pytest.mark.parametrize(
    "history,observation,policy,expected,texts",
    [row[1:] for row in RULES],
    ids=[row[0] for row in RULES],
)
def test_rules(history, observation, policy, expected, texts):
    action, _ = ps.decide(observation, history, policy)
    assert action.kind is expected, action
    said = "\n".join(action.notes) + "\n" + action.reason
    for text in texts:
        assert text in said, said


def test_backoff_doubles_and_is_capped():
    policy = ps.Policy(poll_seconds=10, max_backoff=45)
    assert [ps.backoff_delay(n, policy) for n in range(1, 6)] == [10, 20, 40, 45, 45]


def test_failures_and_stalls_save_logs_first():
    actions = {
        code: ps.decide(obs(launcher=launcher(code, "running")), ps.History(), POLICY)[0]
        for code in ("1", "4", "137", "5", "75", "2", "3")
    }
    assert {c: a.logs for c, a in actions.items()} == {
        "1": "exit1", "4": "exit4", "137": "exit137", "5": "exit5", "75": "", "2": "exit2",
        "3": "exit3",
    }  # fmt: skip


def test_an_api_error_changes_nothing_and_the_next_answer_resets_the_count():
    history = ps.History(restarts=2, failures=1)
    action, after = ps.decide(obs(failed_call="reading FINISHED"), history, POLICY)
    assert action.kind is ps.Kind.BACKOFF
    assert (after.restarts, after.failures, after.api_errors) == (2, 1, 1)
    _, after = ps.decide(obs(launcher=launcher("running")), after, POLICY)
    assert after.api_errors == 0


def test_unreachable_slice_is_recreated_only_after_the_polls_and_the_quiet_time():
    history, kinds = ps.History(), []
    slices = (ps.Slice("READY", "TIMEOUT"),)
    for poll in range(4):
        now = 1000.0 + 250 * poll
        observation = obs(now=now, launcher=UNREACHABLE, newest_step=100, slices=slices)
        action, history = ps.decide(observation, history, POLICY)
        kinds.append(action.kind)
    # 3 polls in a row, but 600 s without a new checkpoint only at the 4th (t=1750 vs 1000).
    assert kinds == [ps.Kind.WAIT, ps.Kind.WAIT, ps.Kind.WAIT, ps.Kind.RECREATE]


# ------------------------------------------------------------------ elastic, pure --

ELASTIC = ps.Policy(
    slices=4, queued=True, elastic=True, global_batch=1024, devices_per_slice=16, max_restarts=9
)
GONE = ps.Slice("PREEMPTED", queued="SUSPENDED")
WAITING = ps.Slice("MISSING", queued="WAITING_FOR_RESOURCES")


def elastic(slices, history=None, policy=ELASTIC, **fields):
    return ps.decide(obs(slices=tuple(slices), **fields), history or ps.History(), policy)


def test_elastic_shrinks_at_once_to_slices_that_divide_the_batch():
    # 3 of 4 slices left: 3 x 16 devices do not divide 1024, 2 x 16 do.
    action, history = elastic([READY[0], GONE, READY[0], READY[0]])
    assert action.kind is ps.Kind.RESIZE
    assert action.slices == (0, 2) and action.requeue == (1,)
    assert "slice(s) 1 lost: training on 2 slice(s) [0, 2] instead of 4" in action.reason
    assert "global batch 1024, 16 devices per slice" in action.reason
    assert history.active == (0, 2) and history.restarts == 1


def test_elastic_keeps_training_while_the_lost_slice_waits_then_grows_back():
    history = ps.History(active=(0, 1), stuck_since=(-1.0,) * 4)
    action, history = elastic([READY[0], READY[0], WAITING, WAITING], history,
                              launcher=launcher("running"))  # fmt: skip
    assert action.kind is ps.Kind.WAIT
    action, history = elastic([READY[0], READY[0], READY[0], READY[0]], history)
    assert action.kind is ps.Kind.RESIZE and action.slices == (0, 1, 2, 3)
    assert action.reason.startswith("capacity returned: training on 4 slice(s)")
    assert history.active == (0, 1, 2, 3)


def test_elastic_waits_when_no_ready_set_divides_the_batch():
    policy = ps.replace(ELASTIC, global_batch=96, devices_per_slice=64)
    action, history = elastic([GONE, GONE, READY[0], READY[0]], policy=policy)
    assert action.kind is ps.Kind.RESIZE and action.slices == () and action.requeue == (0, 1)
    assert "no set of ready slices divides the global batch 96" in action.reason
    action, _ = elastic([WAITING, WAITING, READY[0], READY[0]], history, policy=policy)
    assert action.kind is ps.Kind.WAIT and "waiting for capacity" in action.notes[-1]


def test_elastic_checks_the_launcher_of_the_training_slices_only():
    history = ps.History(active=(0, 1), stuck_since=(-1.0,) * 4)
    action, _ = elastic([READY[0], READY[0], WAITING, WAITING], history,
                        launcher=launcher("75", "75"))  # fmt: skip
    assert action.kind is ps.Kind.RELAUNCH


# ------------------------------------------------------------------ help/errors --


@pytest.mark.parametrize("args", [["help"], ["--help"], ["create", "-h"]])
def test_help(gcloud, args):
    proc = gcloud.run(*args)
    assert_ok(proc)
    for word in (
        "Usage:", "create", "setup", "train", "status", "logs", "stop", "delete", "supervise",
        "--dry-run", "--env", "--all-workers", "--delete-on-give-up", "--slices", "--elastic",
        "ssh-add ~/.ssh/google_compute_engine", "TPU_NAME", "TPU_ZONE", "TPU_PROJECT",
    ):  # fmt: skip
        assert word in proc.stdout
    assert gcloud.calls == []


USAGE_ERRORS = [
    ([], "no subcommand given"),
    (["launch-rockets", *BASE], "unknown subcommand: 'launch-rockets'"),
    (["create", *BASE, "--accelerator-type=v4-32", "--turbo"], "unknown option: --turbo"),
    (["create", *BASE, "--spot=yes", "--accelerator-type=v4-8"], "--spot takes no value"),
    (["create", *BASE, "--accelerator-type"], "option --accelerator-type needs a value"),
    (["create", *BASE], "'create' needs --accelerator-type (or set TPU_ACCELERATOR_TYPE)"),
    (["train", *BASE], "'train' needs --workdir"),
    (["supervise", *BASE, "--accelerator-type=v4-8"], "'supervise' needs --workdir"),
    (["train", *BASE, "--workdir=/tmp/local"], "gs://"),
    (["create", *BASE, "--accelerator-type=tpu9-1"], "no default runtime version"),
    (["logs", *BASE, "--worker=two"], "--worker must be a worker number or 'all'"),
    (["stop", *BASE, "--stop-timeout=-1"], "--stop-timeout must be a non-negative integer"),
    (["create", *BASE, "--accelerator-type=v4-8", "--slices=0"], "--slices must be a positive"),
    (["create", *BASE, "--accelerator-type=v4-8", "--elastic"], "--elastic needs --slices"),
    (["create", *BASE, "--accelerator-type=v4-8", "--node-prefix=x"], "--node-prefix needs"),
    (["create", *BASE, "--accelerator-type=v4-8", "--slices=2", "--node-prefix=My_Pod"],
     "--node-prefix must be lowercase"),
    (["logs", *BASE, "--slices=2", "--slice=2"], "--slice must be below --slices=2"),
    (["supervise", *BASE, "--accelerator-type=v4-8", "--slices=2", "--elastic",
      f"--workdir={WORKDIR}"], "--elastic needs the global batch"),
    (["supervise", *BASE, "--accelerator-type=v4-8", f"--workdir={WORKDIR}",
      "--tarball=/no/such.tar.gz"], "--tarball: no such file"),
    (["setup", *BASE, "--python-version=3"], "--python-version must look like 3.12"),
]  # fmt: skip


@pytest.mark.parametrize("args,message", USAGE_ERRORS, ids=[m for _, m in USAGE_ERRORS])
def test_usage_errors(gcloud, args, message):
    proc = gcloud.run(*args)
    assert proc.returncode == 2
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert message in line
    assert "Traceback" not in proc.stderr
    assert gcloud.calls == []


@pytest.mark.parametrize("subcommand", ["create", "setup", "train", "status", "supervise"])
def test_missing_name(gcloud, subcommand):
    proc = gcloud.run(subcommand, "--zone=z", "--accelerator-type=v4-8", f"--workdir={WORKDIR}")
    assert proc.returncode == 2
    assert f"'{subcommand}' needs --name (or set TPU_NAME)" in proc.stderr
    assert gcloud.calls == []


@pytest.mark.parametrize("bad", ["1KEY=v", "KEY", "MY-KEY=v", "=v"])
def test_env_needs_key_value(gcloud, bad):
    proc = gcloud.run("train", *BASE, f"--workdir={WORKDIR}", f"--env={bad}")
    assert proc.returncode == 2
    assert "--env takes KEY=VALUE" in proc.stderr
    assert gcloud.calls == []


def test_no_gcloud_on_path(gcloud, tmp_path):
    env = gcloud.env(PATH=str(tmp_path / "empty"))
    proc = gcloud.run("create", *BASE, "--accelerator-type=v4-8", env=env)
    assert proc.returncode == 127
    assert "gcloud not found on PATH" in proc.stderr
    # --dry-run only prints, so it works without gcloud.
    proc = gcloud.run("create", *BASE, "--accelerator-type=v4-8", "--dry-run", env=env)
    assert_ok(proc)
    assert proc.stdout.startswith("+ gcloud compute tpus tpu-vm create my-tpu")


# ------------------------------------------------------------------ create/delete --


def test_create_spot(gcloud):
    assert_ok(gcloud.run("create", *BASE, "--accelerator-type=v4-32", "--spot"))
    (call,) = gcloud.calls
    assert call == [
        "compute", "tpus", "tpu-vm", "create", "my-tpu", "--zone=us-central2-b",
        "--project=my-proj", "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot",
    ]  # fmt: skip


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
    assert f"--version={runtime}" in call and "--spot" not in call


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
        )  # fmt: skip
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
    assert call == [
        "compute", "tpus", "queued-resources", "create", "my-tpu", "--node-id=my-tpu",
        "--zone=us-central2-b", "--project=my-proj", "--accelerator-type=v5litepod-16",
        "--runtime-version=v2-alpha-tpuv5-lite", "--spot",
    ]  # fmt: skip


def test_create_queued_wait(gcloud):
    gcloud.script("qr_states", ["WAITING_FOR_RESOURCES", "DENIED", "PROVISIONING", "ACTIVE"])
    proc = gcloud.run(
        "create", *BASE, "--accelerator-type=v4-8", "--queued", "--wait", "--poll-seconds=7"
    )
    assert_ok(proc)
    assert gcloud.kinds() == ["qr-create"] + ["qr-describe"] * 4
    assert "PERMISSION_DENIED" in proc.stderr  # shown, then retried
    assert proc.sleeps == [7, 7, 7]


def test_create_queued_wait_fails_when_the_request_fails(gcloud):
    gcloud.script("qr_states", ["WAITING_FOR_RESOURCES", "FAILED"])
    proc = gcloud.run("create", *BASE, "--accelerator-type=v4-8", "--queued", "--wait")
    assert proc.returncode == 1
    assert "error: tpu_pod.sh: queued resource my-tpu is FAILED, not ACTIVE" in proc.stderr


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
    for arg in ("--zone=europe-west4-a", "--project=env-proj", "--accelerator-type=v5litepod-8"):
        assert arg in call
    assert "--spot" in call


def test_delete(gcloud):
    assert_ok(gcloud.run("delete", *BASE))
    assert_ok(gcloud.run("delete", *BASE, "--queued"))
    tpu, queued = gcloud.calls
    assert tpu == ["compute", "tpus", "tpu-vm", "delete", "my-tpu", *BASE[1:], "--quiet"]
    assert queued == [
        "compute", "tpus", "queued-resources", "delete", "my-tpu", *BASE[1:], "--force", "--quiet",
    ]  # fmt: skip


def test_a_failed_create_is_one_error_line(gcloud):
    gcloud.script("create_results", ["QUOTA"])
    proc = gcloud.run("create", *BASE, "--accelerator-type=v4-8")
    assert proc.returncode == 1
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert "create failed: gcloud compute tpus tpu-vm create my-tpu" in line


def test_status(gcloud):
    gcloud.script("describe_states", ["PREEMPTED"])
    proc = gcloud.run("status", *BASE, f"--workdir={WORKDIR}")
    assert_ok(proc)
    assert "PREEMPTED" in proc.stdout and "not finished" in proc.stdout
    assert gcloud.calls[0][:5] == ["compute", "tpus", "tpu-vm", "describe", "my-tpu"]
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
    assert scp[:7] == ["compute", "tpus", "tpu-vm", "scp", str(tarball), "my-tpu:resnet-src.tar.gz",
                       "--zone=us-central2-b"]  # fmt: skip
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
    assert kind(scp) == "scp" and worker_flag(scp) == "all"
    assert scp[4].endswith("resnet-src.tar.gz") and os.path.isabs(scp[4])
    assert os.path.getsize(gcloud.dir / "scp" / "resnet-src.tar.gz") > 1000  # a real archive
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
    version = remote.UV_VERSION
    assert re.fullmatch(r"\d+\.\d+\.\d+", version)
    assert f"curl -LsSf https://astral.sh/uv/{version}/install.sh |" in cmd
    assert "astral.sh/uv/install.sh" not in cmd  # never the moving "latest" installer
    install = cmd.split(f"astral.sh/uv/{version}/install.sh |", 1)[1].splitlines()[1]
    assert 'UV_UNMANAGED_INSTALL="$HOME/.local/bin"' in install
    assert "UV_NO_MODIFY_PATH=1" in install and install.rstrip().endswith(" sh")


def launcher_words(cmd: str) -> list[str]:
    line = next(row for row in cmd.splitlines() if "nohup" in row)
    return shlex.split(line.split("resnet-train ", 1)[1].split(" >>", 1)[0])


def test_train(gcloud):
    proc = gcloud.run(
        "train", *BASE, f"--workdir={WORKDIR}/", "--", "--config.train.num_epochs=1",
        "--config.model.name=resnet 50",
    )  # fmt: skip
    assert_ok(proc)
    (ssh,) = gcloud.calls
    assert ssh[:5] == ["compute", "tpus", "tpu-vm", "ssh", "my-tpu"] and worker_flag(ssh) == "all"
    cmd = remote_command(ssh)
    assert "nohup" in cmd and "resnet-train.log" in cmd and "python -m launch.main" in cmd
    assert "MEGASCALE" not in cmd  # one slice: JAX finds its peers by itself
    # The launcher arguments, shell-quoted, in order (trailing slash of the workdir dropped).
    assert launcher_words(cmd) == [
        "--config=configs/resnet50_imagenet.py",
        f"--workdir={WORKDIR}",
        "--config.train.num_epochs=1",
        "--config.model.name=resnet 50",
    ]


ENV = {
    "JAX_COMPILATION_CACHE_DIR": "gs://my-bucket/xla-cache",
    "TRICKY": 'it\'s a "test" with $HOME, `backticks`; rm -rf / & a\nnewline',
    "EMPTY": "",
}


def exported(cmd: str) -> dict[str, str]:
    """What the export lines of a train script set, in a real shell."""
    lines = cmd.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("export "))
    end = next(i for i, line in enumerate(lines) if "resnet-train.exitcode" in line)
    names = [line.split()[1].split("=")[0] for line in lines if line.startswith("export ")]
    probe = "\n".join(lines[first:end]) + '\nprintf "%s\\0"'
    probe += "".join(f' "${n}"' for n in names) + "\n"
    out = subprocess.run([BASH, "-c", probe], capture_output=True, text=True, timeout=30).stdout
    return dict(zip(names, out.split("\0")[:-1]))


def test_env_reaches_the_launcher_on_every_worker(gcloud):
    assert_ok(
        gcloud.run(
            "train", *BASE, f"--workdir={WORKDIR}", *[f"--env={k}={v}" for k, v in ENV.items()]
        )
    )
    cmd = remote_command(gcloud.calls[0])
    lines = cmd.splitlines()
    exports = [i for i, line in enumerate(lines) if line.startswith("export ")]
    # Exported after the venv is activated and before the launcher starts (it inherits them).
    activate = next(
        i for i, line in enumerate(lines) if line.startswith(". ") and "activate" in line
    )
    nohup = next(i for i, line in enumerate(lines) if "nohup" in line)
    assert activate < min(exports) and max(exports) < nohup
    assert exported(cmd) == ENV  # the quoting survives a real shell
    assert "(environment: JAX_COMPILATION_CACHE_DIR TRICKY EMPTY)" in cmd  # named in the log


def test_stop_and_logs(gcloud):
    assert_ok(gcloud.run("stop", *BASE))
    assert_ok(gcloud.run("logs", *BASE))
    stop, logs = gcloud.calls
    assert worker_flag(stop) == "all" and "pkill -TERM" in remote_command(stop)
    assert worker_flag(logs) == "0"
    assert remote_command(logs) == 'tail -n 200 -F "$HOME/resnet-train.log"'


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


def test_logs_all_workers_fails_when_a_log_is_missing(gcloud):
    gcloud.script("log_results", ["OK", "SSH_ERROR"])
    proc = gcloud.run("logs", *BASE, "--all-workers", f"--logs-dir={gcloud.logs}")
    assert proc.returncode == 1
    (folder,) = gcloud.logs.iterdir()
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["worker-0.log", "worker-1.log", "worker-1.ssh-errors"]  # what came, and why
    assert "Connection refused" in (folder / "worker-1.ssh-errors").read_text()
    assert "saved the logs of 1 of 2 workers" in proc.stderr


def test_logs_into_a_file_is_one_error_line(gcloud):
    gcloud.logs.write_text("not a folder")
    proc = gcloud.run("logs", *BASE, "--all-workers", f"--logs-dir={gcloud.logs}")
    assert proc.returncode == 1
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert f"cannot save logs in {gcloud.logs}/my-tpu-" in line and "Traceback" not in proc.stderr
    assert gcloud.logs.read_text() == "not a folder"


# -------------------------------------------------------------------- dry run --


def test_dry_run_prints_and_calls_nothing(gcloud):
    proc = gcloud.run("create", *BASE, "--accelerator-type=v4-32", "--spot", "--dry-run")
    assert_ok(proc)
    assert gcloud.calls == []
    (line,) = proc.stdout.splitlines()
    assert shlex.split(line[2:]) == [
        "gcloud", "compute", "tpus", "tpu-vm", "create", "my-tpu", "--zone=us-central2-b",
        "--project=my-proj", "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot",
    ]  # fmt: skip


def test_dry_run_supervise_prints_one_recovery_cycle(gcloud):
    proc = gcloud.run(
        "supervise", *BASE, "--accelerator-type=v4-32", f"--workdir={WORKDIR}",
        "--repo-url=https://example.com/r.git", "--dry-run", "--", "--config.train.num_epochs=1",
    )  # fmt: skip
    assert_ok(proc)
    assert gcloud.calls == []
    lines = dry_run_lines(proc.stdout)
    assert [" ".join(line.split()[:5]).replace(" '", " ") for line in lines] == [
        "gcloud storage ls gs://my-bucket/runs/r1/",
        "gcloud storage ls gs://my-bucket/runs/r1/FINISHED",
        "gcloud compute tpus tpu-vm describe",
        "gcloud storage ls gs://my-bucket/runs/r1/checkpoints/*/commit_success.txt'",
        "gcloud compute tpus tpu-vm delete",
        "gcloud compute tpus tpu-vm create",
        "gcloud compute tpus tpu-vm ssh",
        "gcloud compute tpus tpu-vm ssh",
    ]


# ------------------------------------------------------------------ supervise --


def supervise(gcloud, *extra):
    return gcloud.run(
        "supervise", *BASE, "--accelerator-type=v4-32", "--spot", f"--workdir={WORKDIR}",
        "--repo-url=https://example.com/resnet.git", f"--logs-dir={gcloud.logs}", *extra,
        "--", "--config.train.num_epochs=1",
    )  # fmt: skip


def test_supervise_recreates_after_preemption(gcloud):
    gcloud.script("describe_states", ["PREEMPTED", "READY"])
    gcloud.script("finished_rcs", [1, 1, 0])
    proc = supervise(gcloud)
    assert_ok(proc)
    assert gcloud.kinds() == [
        "workdir?", "finished?", "describe", "ckpts?", "delete", "create", "ssh:setup",
        "ssh:train", "finished?", "describe", "ssh:check", "finished?",
    ]  # fmt: skip
    calls = gcloud.calls
    assert "--quiet" in calls[4]
    assert "--spot" in calls[5] and "--accelerator-type=v4-32" in calls[5]
    assert worker_flag(calls[6]) == "all" and worker_flag(calls[7]) == "all"
    assert launcher_words(remote_command(calls[7]))[1:] == [
        f"--workdir={WORKDIR}",
        "--config.train.num_epochs=1",
    ]
    assert "recreating the slice (PREEMPTED) (restart 1 of at most 100)" in proc.stderr
    assert re.search(r"recreate done in \d+s", proc.stderr)
    assert "run finished" in proc.stderr
    assert proc.sleeps == [60, 60]


def test_supervise_creates_missing_slice_without_delete(gcloud):
    gcloud.script("describe_states", ["MISSING", "READY"])
    gcloud.script("finished_rcs", [1, 0])
    assert_ok(supervise(gcloud))
    assert gcloud.kinds() == [
        "workdir?", "finished?", "describe", "ckpts?", "create", "ssh:setup", "ssh:train",
        "finished?",
    ]  # fmt: skip


def test_supervise_already_finished(gcloud):
    gcloud.script("finished_rcs", [0])
    assert_ok(supervise(gcloud, "--delete-when-finished"))
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
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert "cannot list gs://my-bucket/runs/r1/" in line and shown in line


def test_supervise_accepts_a_new_empty_workdir(gcloud):
    gcloud.script("workdir_ls", ["EMPTY"])
    gcloud.script("finished_rcs", [0])
    assert_ok(supervise(gcloud))
    assert gcloud.kinds() == ["workdir?", "finished?"]


def test_supervise_waits_while_creating(gcloud):
    gcloud.script("describe_states", ["CREATING", "REPAIRING", "READY"])
    gcloud.script("finished_rcs", [1, 1, 1, 0])
    assert_ok(supervise(gcloud))
    assert gcloud.kinds() == ["workdir?"] + ["finished?", "describe", "ckpts?"] * 2 + [
        "finished?",
        "describe",
        "ssh:check",
        "finished?",
    ]


def test_supervise_restarts_preempted_launcher(gcloud):
    gcloud.script("check_results", ["75 75", "running running"])
    gcloud.script("finished_rcs", [1, 1, 1, 0])
    proc = supervise(gcloud, "--max-failures=0")
    assert_ok(proc)
    assert gcloud.kinds() == [
        "workdir?", "finished?", "describe", "ssh:check", "finished?", "ckpts?", "ssh:stop",
        "ssh:train", "finished?", "describe", "ssh:check", "finished?",
    ]  # fmt: skip
    assert "retriable exit status 75" in proc.stderr


def test_supervise_stalled_launcher_is_retriable(gcloud):
    # Exit 5 (stalled, stacks dumped): logs saved, launcher restarted, not a failure.
    gcloud.script("check_results", ["5 running", "running running"])
    gcloud.script("finished_rcs", [1, 1, 1, 0])
    proc = supervise(gcloud, "--max-failures=0")
    assert_ok(proc)
    assert gcloud.kinds()[3:11] == [
        "ssh:check", "finished?", "ckpts?", "workers?", "ssh:log", "ssh:log", "ssh:stop",
        "ssh:train",
    ]  # fmt: skip
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
    assert len(list(gcloud.logs.iterdir())) == 2  # the logs of every failed launch


def test_supervise_counts_failures_only_without_new_checkpoints(gcloud):
    gcloud.script("check_results", ["1 1", "1 1", "1 1", "running running"])
    gcloud.script("checkpoints", ["100", "200", "300"])
    gcloud.script("finished_rcs", [1] * 7 + [0])
    proc = supervise(gcloud, "--max-failures=1")
    assert_ok(proc)
    assert gcloud.kinds().count("ssh:train") == 3
    assert proc.stderr.count("failure count reset") == 2


def test_supervise_gives_up_on_bad_input(gcloud):
    gcloud.script("check_results", ["2 2"])
    proc = supervise(gcloud)
    assert proc.returncode == 3
    assert "ssh:train" not in gcloud.kinds()
    assert "status 2 (bad input" in proc.stderr


def test_supervise_stops_when_training_diverged(gcloud):
    gcloud.script("check_results", ["running 3"])
    proc = supervise(gcloud)
    assert proc.returncode == 3
    kinds = gcloud.kinds()
    assert "ssh:train" not in kinds and "ssh:stop" not in kinds and "delete" not in kinds
    assert "status 3 (training diverged" in proc.stderr
    (folder,) = gcloud.logs.iterdir()  # saved before giving up, and named
    assert folder.name.endswith("-exit3") and (folder / "worker-0.log").exists()
    assert f"logs in {folder}" in proc.stderr
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
    gcloud.script("describe_states", [error, error, error, "READY"])
    gcloud.script("finished_rcs", [1, 1, 1, 1, 0])
    proc = supervise(gcloud, "--max-restarts=0", "--poll-seconds=10")
    assert_ok(proc)
    kinds = gcloud.kinds()
    assert "create" not in kinds and "delete" not in kinds
    assert kinds.count("describe") == 4
    assert proc.stderr.count("not counted as a restart") == 3
    assert proc.sleeps == [10, 20, 40, 10]  # backoff grows with the errors in a row
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


def unreachable_run(gcloud, describe, checkpoints, polls, *extra):
    gcloud.script("describe_states", describe)
    gcloud.script("check_results", ["SSH_ERROR"])
    gcloud.script("checkpoints", checkpoints)
    gcloud.script("finished_rcs", [1] * polls + [0])
    return supervise(gcloud, "--unreachable-polls=2", "--progress-timeout=0", *extra)


def test_supervise_keeps_unreachable_slice_while_checkpoints_advance(gcloud):
    proc = unreachable_run(gcloud, ["READY TIMEOUT"], ["100", "200", "300", "400", "500"], 5)
    assert_ok(proc)
    kinds = gcloud.kinds()
    assert "delete" not in kinds and "create" not in kinds and "ssh:train" not in kinds
    assert kinds.count("ssh:check") == 5 and kinds.count("ckpts?") == 5
    assert "Connection timed out" in proc.stderr and "exit status 255" in proc.stderr
    assert "checkpoints are still advancing (step 500)" in proc.stderr
    assert "ssh-add ~/.ssh/google_compute_engine" in proc.stderr


def test_supervise_recreates_unreachable_unhealthy_stuck_slice(gcloud):
    proc = unreachable_run(gcloud, ["READY TIMEOUT EXECUTE_TIMED_OUT"], ["100"], 2)
    assert_ok(proc)
    assert gcloud.kinds()[:13] == [
        "workdir?", "finished?", "describe", "ssh:check", "ckpts?", "finished?", "describe",
        "ssh:check", "ckpts?", "delete", "create", "ssh:setup", "ssh:train",
    ]  # fmt: skip
    assert "health TIMEOUT, symptoms EXECUTE_TIMED_OUT" in proc.stderr


def test_supervise_is_not_stuck_when_setup_or_check_hangs(gcloud):
    # In-process a hang answers as a call past its limit; test_script_ends_a_hanging_setup
    # runs the real time limit.
    gcloud.script("describe_states", ["MISSING", "READY"])
    gcloud.script("setup_results", ["HANG", "OK"])
    gcloud.script("check_results", ["HANG", "running running"])
    gcloud.script("finished_rcs", [1, 1, 1, 0])
    proc = supervise(gcloud, "--setup-timeout=2", "--ssh-timeout=3")
    assert_ok(proc)
    assert "timed out after 2s: gcloud compute tpus tpu-vm ssh" in proc.stderr
    assert "setup failed on my-tpu; retrying after the next poll" in proc.stderr
    assert "timed out after 3s" in proc.stderr and "exit status 124" in proc.stderr
    assert gcloud.kinds()[3:6] == ["ckpts?", "create", "ssh:setup"]
    assert gcloud.kinds()[6] != "ssh:train"


def test_supervise_queued_recreates_queued_resource(gcloud):
    gcloud.script("describe_states", ["PREEMPTED", "READY"])
    gcloud.script("qr_states", ["SUSPENDED", "WAITING_FOR_RESOURCES", "ACTIVE"])
    gcloud.script("finished_rcs", [1, 0])
    assert_ok(supervise(gcloud, "--queued"))
    assert gcloud.kinds() == [
        "workdir?", "finished?", "describe", "qr-describe", "ckpts?", "qr-delete", "qr-create",
        "qr-describe", "qr-describe", "ssh:setup", "ssh:train", "finished?",
    ]  # fmt: skip
    assert "--node-id=my-tpu" in gcloud.calls[6] and "--spot" in gcloud.calls[6]


def test_supervise_queued_keeps_waiting_request(gcloud):
    gcloud.script("describe_states", ["MISSING"])
    gcloud.script("qr_states", ["WAITING_FOR_RESOURCES"])
    gcloud.script("finished_rcs", [1, 1, 0])
    assert_ok(supervise(gcloud, "--queued"))
    assert gcloud.kinds() == ["workdir?"] + [
        "finished?",
        "describe",
        "qr-describe",
        "ckpts?",
    ] * 2 + ["finished?"]


def test_supervise_queued_permission_error_is_not_missing(gcloud):
    gcloud.script("describe_states", ["MISSING"])
    gcloud.script("qr_states", ["DENIED", "WAITING_FOR_RESOURCES"])
    gcloud.script("finished_rcs", [1, 1, 0])
    assert_ok(supervise(gcloud, "--queued", "--max-restarts=0"))
    assert "qr-delete" not in gcloud.kinds() and "qr-create" not in gcloud.kinds()


def test_every_ssh_and_scp_is_bounded_and_carries_the_ssh_options(gcloud, tmp_path):
    tarball = tmp_path / "src.tar.gz"
    tarball.write_bytes(b"x")
    gcloud.script("describe_states", ["PREEMPTED", "READY"])
    gcloud.script("check_results", ["1 1", "running running"])
    gcloud.script("finished_rcs", [1, 1, 1, 1, 0])
    proc = gcloud.run(
        "supervise", *BASE, "--accelerator-type=v4-8", f"--workdir={WORKDIR}",
        f"--tarball={tarball}", f"--logs-dir={gcloud.logs}", "--ssh-timeout=123",
        "--setup-timeout=456", "--stop-timeout=7",
    )  # fmt: skip
    assert_ok(proc)
    pairs = [
        (c, limit) for c, limit in gcloud.limits if c[0] == "compute" and c[3] in ("ssh", "scp")
    ]
    assert {kind(c) for c, _ in pairs} == {
        "scp", "ssh:setup", "ssh:train", "ssh:check", "ssh:log", "ssh:stop",
    }  # fmt: skip
    for call, limit in pairs:
        prefix = "--scp-flag=" if call[3] == "scp" else "--ssh-flag="
        assert all(prefix + option in call for option in SSH_OPTIONS), call
        assert limit == {"scp": 456, "ssh:setup": 456, "ssh:stop": 7 + 123}.get(kind(call), 123)
    polls = [limit for c, limit in gcloud.limits if c[0] == "storage" or c[3] == "describe"]
    assert polls and all(limit == 300 for limit in polls)


# ------------------------------------------------------------------ multislice --

UNIT = [*BASE, "--accelerator-type=v5litepod-16", "--slices=2", "--spot"]


def test_unit_create_is_one_queued_resource_with_node_count(gcloud):
    assert_ok(gcloud.run("create", *UNIT, "--node-prefix=pod"))
    (call,) = gcloud.calls
    assert call == [
        "compute", "tpus", "queued-resources", "create", "my-tpu", "--node-count=2",
        "--node-prefix=pod", "--zone=us-central2-b", "--project=my-proj",
        "--accelerator-type=v5litepod-16", "--runtime-version=v2-alpha-tpuv5-lite", "--spot",
    ]  # fmt: skip


def test_unit_setup_train_status_logs_delete(gcloud, tmp_path):
    tarball = tmp_path / "src.tar.gz"
    tarball.write_bytes(b"x")
    assert_ok(gcloud.run("setup", *BASE, "--slices=2", f"--tarball={tarball}"))
    assert [kind(c) for c in gcloud.calls] == ["scp", "scp", "ssh:setup", "ssh:setup"]
    assert [c[5] for c in gcloud.calls if c[3] == "scp"] == [
        "my-tpu-0:resnet-src.tar.gz", "my-tpu-1:resnet-src.tar.gz",
    ]  # fmt: skip
    calls = len(gcloud.calls)
    assert_ok(gcloud.run("train", *BASE, "--slices=2", f"--workdir={WORKDIR}", "--env=A=b"))
    address, *trains = gcloud.calls[calls:]
    assert kind(address) == "address?" and address[4] == "my-tpu-0"
    assert [(c[4], worker_flag(c)) for c in trains] == [("my-tpu-0", "all"), ("my-tpu-1", "all")]
    for k, call in enumerate(trains):
        assert exported(remote_command(call)) == {
            "A": "b",
            "MEGASCALE_NUM_SLICES": "2",
            "MEGASCALE_SLICE_ID": str(k),
            "MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2",
        }
    gcloud.script("describe_states.my-tpu-1", ["PREEMPTED"])
    gcloud.script("qr_states", ["SUSPENDED"])
    proc = gcloud.run("status", *BASE, "--slices=2")
    assert proc.returncode == 0
    assert proc.stdout.splitlines() == [
        "TPU my-tpu-0 (us-central2-b): READY (health unknown)",
        "TPU my-tpu-1 (us-central2-b): PREEMPTED (health unknown)",
        "queued resource my-tpu: SUSPENDED",
    ]
    calls = len(gcloud.calls)
    assert_ok(gcloud.run("logs", *BASE, "--slices=2", "--all-workers", f"--logs-dir={gcloud.logs}"))
    (folder,) = gcloud.logs.iterdir()
    assert sorted(p.name for p in folder.iterdir()) == [
        f"slice-{k}-worker-{i}.log" for k in range(2) for i in range(2)
    ]
    assert_ok(gcloud.run("logs", *BASE, "--slices=2", "--slice=1", "--worker=1"))
    follow = gcloud.calls[-1]
    assert follow[4] == "my-tpu-1" and worker_flag(follow) == "1"
    assert_ok(gcloud.run("delete", *BASE, "--slices=2"))
    assert gcloud.calls[-1][:5] == ["compute", "tpus", "queued-resources", "delete", "my-tpu"]


def test_unit_is_recreated_as_a_whole_when_a_slice_is_preempted(gcloud):
    gcloud.script("describe_states.my-tpu-1", ["PREEMPTED", "READY"])
    gcloud.script("qr_states", ["SUSPENDED", "ACTIVE"])
    gcloud.script("finished_rcs", [1, 1, 0])
    gcloud.script("checkpoints", ["300"])
    proc = supervise(gcloud, "--slices=2", "--accelerator-type=v5litepod-16")
    assert_ok(proc)
    assert gcloud.kinds() == [
        "workdir?", "finished?", "describe", "describe", "qr-describe", "ckpts?", "qr-delete",
        "qr-create",
        "qr-describe", "ssh:setup", "ssh:setup", "address?", "ssh:train", "ssh:train",
        "finished?", "describe", "describe", "ssh:check", "ssh:check", "finished?",
    ]  # fmt: skip
    create = gcloud.calls[7]
    assert "--node-count=2" in create and "--node-prefix=my-tpu" in create
    assert "slice 1 PREEMPTED" in proc.stderr
    assert "recreating the slice (PREEMPTED)" in proc.stderr


def test_elastic_unit_shrinks_then_grows_back(gcloud):
    # Slice 1 is preempted: training continues at once on slice 0 (1 x 8 devices divide 64),
    # slice 1 is requested again, and once it is ready both train again.
    gcloud.script("describe_states.my-tpu-1", ["READY", "PREEMPTED", "MISSING", "READY"])
    gcloud.script("qr_states.my-tpu-1", ["SUSPENDED", "SUSPENDED", "WAITING_FOR_RESOURCES"])
    gcloud.script("finished_rcs", [1, 1, 1, 1, 0])
    gcloud.script("checkpoints", ["40"])
    proc = supervise(
        gcloud, "--slices=2", "--elastic", "--accelerator-type=v5litepod-8", "--global-batch=64"
    )
    assert_ok(proc)
    assert gcloud.kinds() == [
        "workdir?",
        "finished?", "describe", "describe", "ssh:check", "ssh:check",
        # slice 1 preempted: request it again, go on with slice 0 alone at once
        "finished?", "describe", "describe", "qr-describe", "qr-describe", "ckpts?",
        "qr-describe", "qr-delete", "qr-create", "ssh:stop", "address?", "ssh:train",
        # its request waits for capacity: slice 0 trains
        "finished?", "describe", "describe", "qr-describe", "qr-describe", "ssh:check",
        # slice 1 is back: set it up, both train
        "finished?", "describe", "describe", "ssh:check", "ssh:stop", "ssh:setup",
        "address?", "ssh:train", "ssh:train",
        "finished?",
    ]  # fmt: skip
    lines = proc.stderr
    assert "resizing: slice(s) 1 lost: training on 1 slice(s) [0] instead of 2" in lines
    assert "resizing: capacity returned: training on 2 slice(s) [0, 1] instead of 1" in lines
    assert re.search(r"resize done in \d+s; training resumes from checkpoint step 40", lines)
    requeue = [c for c in gcloud.calls if kind(c) == "qr-create"]
    assert [c[4] for c in requeue] == ["my-tpu-1"] and "--node-id=my-tpu-1" in requeue[0]
    trains = [c for c in gcloud.calls if kind(c) == "ssh:train"]
    envs = [(c[4], exported(remote_command(c))) for c in trains]
    slice_ids = [
        (node, env["MEGASCALE_NUM_SLICES"], env["MEGASCALE_SLICE_ID"]) for node, env in envs
    ]
    assert slice_ids == [
        ("my-tpu-0", "1", "0"), ("my-tpu-0", "2", "0"), ("my-tpu-1", "2", "1"),
    ]  # fmt: skip


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
        ),  # fmt: skip
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
            env=gcloud.env(TPU_REPO_URL=SECRET_URL),
        )  # fmt: skip
    )
    assert_ok(runs[0])
    assert_ok(runs[3])
    assert gcloud.kinds()[2:] == [
        "workdir?", "finished?", "describe", "ckpts?", "create", "scp", "ssh:setup", "ssh:train",
        "finished?", "describe", "ssh:check", "finished?",
    ]  # fmt: skip
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


# ------------------------------------------------------- tools/cluster/tpu_pod.sh, end to end --


@pytest.mark.slow
def test_script_supervises_a_preempted_slice_end_to_end(gcloud):
    """tpu_pod.sh in a subprocess, every gcloud call a process of the fake on PATH."""
    gcloud.script("describe_states", ["PREEMPTED", "READY"])
    gcloud.script("finished_rcs", [1, 1, 0])
    proc = gcloud.run_script(
        "supervise", *BASE, "--accelerator-type=v4-8", f"--workdir={WORKDIR}",
        "--poll-seconds=0", "--repo-url=https://example.com/resnet.git",
    )  # fmt: skip
    assert_ok(proc)
    assert gcloud.kinds() == [
        "workdir?", "finished?", "describe", "ckpts?", "delete", "create", "ssh:setup",
        "ssh:train", "finished?", "describe", "ssh:check", "finished?",
    ]  # fmt: skip
    assert "run finished" in proc.stderr


@pytest.mark.slow
def test_script_refusals_and_missing_gcloud(gcloud, tmp_path):
    proc = gcloud.run_script("create", *BASE, "--slices=two", "--accelerator-type=v4-8")
    assert proc.returncode == 2
    assert proc.stderr.splitlines()[0] == (
        "error: tpu_pod.sh: --slices must be a positive integer, got 'two'"
    )
    only_dirname = tmp_path / "no-gcloud"  # what the script itself needs, and no gcloud
    only_dirname.mkdir()
    (only_dirname / "dirname").symlink_to(shutil.which("dirname") or "/usr/bin/dirname")
    env = gcloud.env(PATH=str(only_dirname), TPU_POD_PYTHON=sys.executable)
    proc = gcloud.run_script("create", *BASE, "--accelerator-type=v4-8", env=env)
    assert proc.returncode == 127 and "gcloud not found on PATH" in proc.stderr


@pytest.mark.slow
def test_script_ends_a_hanging_setup_at_its_time_limit(gcloud):
    # A slice preempted during setup: the ssh connection hangs; the time limit ends it (and
    # its process group) and the next poll carries on.
    gcloud.script("describe_states", ["MISSING", "READY"])
    gcloud.script("setup_results", ["HANG", "OK"])
    gcloud.script("finished_rcs", [1, 1, 0])
    start = time.monotonic()
    proc = gcloud.run_script(
        "supervise", *BASE, "--accelerator-type=v4-8", f"--workdir={WORKDIR}",
        "--poll-seconds=0", "--repo-url=https://example.com/resnet.git", "--setup-timeout=2",
    )  # fmt: skip
    assert_ok(proc)
    assert time.monotonic() - start < 40
    assert "timed out after 2s: gcloud compute tpus tpu-vm ssh" in proc.stderr
    assert gcloud.kinds()[4:6] == ["create", "ssh:setup"] and gcloud.kinds()[6] != "ssh:train"


@pytest.mark.slow
def test_sigterm_stops_supervise_and_the_call_in_flight(gcloud):
    # The bounded ssh runs in its own process group: the signal must reach it.
    gcloud.script("describe_states", ["MISSING"])
    gcloud.script("setup_results", ["HANG"])
    env = gcloud.env(TPU_POD_PYTHON=sys.executable)
    proc = subprocess.Popen(
        [BASH, TPU_POD, "supervise", *BASE, "--accelerator-type=v4-8", f"--workdir={WORKDIR}",
         "--poll-seconds=0", "--repo-url=https://example.com/resnet.git"],
        env=env, cwd=gcloud.tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while "ssh:setup" not in gcloud.kinds():
            assert time.monotonic() < deadline, "setup did not start"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=40)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # only this test's own process group
    assert proc.returncode == -signal.SIGTERM
    if shutil.which("ps"):  # no fake gcloud of this test is left running
        time.sleep(0.5)
        leftovers = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
        assert str(gcloud.bin / "gcloud") not in leftovers


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


@pytest.mark.slow
@needs_real_gcloud
def test_dry_run_commands_parse_with_the_real_gcloud(gcloud, tmp_path):
    """Every command line tpu_pod prints is accepted by the real gcloud's parser.

    With no account configured, gcloud parses the whole command line (flags, positionals,
    the TPU resource) and only then stops with "You do not currently have an active account
    selected"; a flag it does not know fails earlier, with "unrecognized arguments" (exit 2).
    """
    tarball = tmp_path / "src.tar.gz"
    tarball.write_bytes(b"x")
    sup = [*BASE, f"--workdir={WORKDIR}", "--dry-run", "--env=A=b c"]
    unit = ["--slices=2", "--node-prefix=pod"]
    invocations = [
        ["create", *BASE, "--accelerator-type=v4-32", "--spot", "--service-account=s@p.iam",
         "--dry-run"],
        ["create", *BASE, "--accelerator-type=v5litepod-16", "--queued", "--dry-run"],
        ["create", *BASE, "--accelerator-type=v5litepod-16", *unit, "--spot", "--dry-run"],
        ["setup", *BASE, f"--tarball={tarball}", "--dry-run"],
        ["setup", *BASE, f"--repo-url={SECRET_URL}", "--dry-run"],
        ["setup", *BASE, *unit, f"--tarball={tarball}", "--dry-run"],
        ["train", *sup],
        ["train", *sup, *unit],
        ["status", *BASE, "--queued", f"--workdir={WORKDIR}", "--dry-run"],
        ["status", *BASE, *unit, "--dry-run"],
        ["logs", *BASE, "--worker=1", "--dry-run"],
        ["logs", *BASE, "--all-workers", "--dry-run"],
        ["logs", *BASE, *unit, "--all-workers", "--dry-run"],
        ["stop", *BASE, "--dry-run"],
        ["delete", *BASE, "--dry-run"],
        ["delete", *BASE, "--queued", "--dry-run"],
        ["delete", *BASE, *unit, "--elastic", "--dry-run"],
        ["supervise", *sup, "--accelerator-type=v4-32", f"--tarball={tarball}"],
        ["supervise", *sup, "--accelerator-type=v5litepod-16", *unit, f"--tarball={tarball}"],
        ["create", *BASE, "--accelerator-type=v5litepod-16", *unit, "--elastic", "--dry-run"],
    ]  # fmt: skip
    lines = []
    for args in invocations:
        proc = gcloud.run(*args)
        assert_ok(proc)
        lines += [line for line in dry_run_lines(proc.stdout) if line.startswith("gcloud ")]
    unique = list(dict.fromkeys(lines))
    assert len(unique) >= 25
    assert any("--node-count=2 --node-prefix=pod" in line for line in unique)
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


@pytest.mark.slow
@needs_real_gcloud
def test_describe_formats_with_the_real_gcloud_formatter(gcloud, tmp_path):
    """The --format strings, applied by gcloud's own resource printer to TPU API v2 messages.

    The Node, Symptom and QueuedResource messages come from the API client that gcloud ships
    (so the field names are the API's), and the printed line is fed back to tpu_pod.
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
        ["train", *BASE, "--slices=2", f"--workdir={WORKDIR}", "--dry-run"],
    ):
        for line in dry_run_lines(gcloud.run(*args).stdout):
            if "--command=" in line:  # remote scripts: no --format there
                continue
            formats.update(
                a[len("--format=") :] for a in shlex.split(line) if a.startswith("--format=")
            )
    assert len(formats) == 4
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
    assert printed["value(networkEndpoints[0].ipAddress)"] == "10.0.0.0"
    assert printed["value(state.state)"] == "WAITING_FOR_RESOURCES"
    (describe,) = [f for f in formats if f.startswith("value[")]
    assert (
        printed[describe]
        == "READY|TIMEOUT|EXECUTE_TIMED_OUT,LOW_MEMORY|worker 1 unresponsive | retrying"
    )
    # tpu_pod reads that line as gcloud prints it.
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
