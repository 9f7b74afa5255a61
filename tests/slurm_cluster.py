"""A real one-node Slurm cluster on localhost, for tests: munged, slurmctld and slurmd.

Everything lives in one directory (configuration, key, sockets, state, spool, logs) and the
daemons listen on free ports, so nothing of a system-wide MUNGE or Slurm is read or clobbered.
Client commands (sbatch, scontrol, ...) find the cluster through `SLURM_CONF` in `env()`.

The daemons are the packaged ones (Debian's `slurm-wlm` 22.05 and `munge`) run in the
foreground as children of this process. slurmd launches jobs as their owner, so it must run as
root, as on any cluster. Plugins: no cgroups (proctrack/linuxproc tracks a job's processes
through /proc, task/none binds nothing), no accounting database, the builtin FIFO scheduler.

Timers that a cluster would keep at their defaults are shortened through slurm.conf, each
documented in `_CONFIG` below; what a job sees (signals, requeue, exit codes) is unchanged.

Run `python -m tests.slurm_cluster [DIR]` (as root) for a cluster to try things on, until
SIGINT or SIGTERM.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "scancel", "squeue", "sinfo", "srun")

# Shortened timers, and why each is legitimate:
#   AuthInfo cred_expire: a requeued job waits this long (BeginTime) before it may run again
#     (default 120 s, which is what production sees); 5 s here.
#   SchedulerParameters sched_interval: the full scheduling pass, which is what starts a
#     requeued job once its BeginTime has passed (default 60 s); 2 s here.
#   KillWait: SIGTERM -> SIGKILL grace at the time limit and on scancel (default 30 s); 10 s
#     here, still far longer than a save of the test model takes.
#   MinJobAge: finished jobs stay visible to `scontrol show job` for this long (default 300 s).
_CONFIG = """\
ClusterName=pytest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket,cred_expire={cred_expire}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig={root}/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
MailProg=/bin/true
SchedulerType=sched/builtin
SchedulerParameters=sched_interval={sched_interval}
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
KillWait={kill_wait}
MinJobAge={min_job_age}
GresTypes=gpu
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} Gres=gpu:{gpus} State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def unavailable_reason() -> str | None:
    """Why a local Slurm cannot run here, or None when it can."""
    missing = [name for name in DAEMONS + CLIENTS if shutil.which(name) is None]
    if missing:
        return (
            f"Slurm/MUNGE not installed (missing {', '.join(missing)}): "
            "apt-get install slurm-wlm munge"
        )
    if os.geteuid() != 0:
        return "slurmd must run as root to launch jobs"
    return None


def _free_port() -> int:
    import portpicker  # pylint: disable=g-import-not-at-top

    return portpicker.pick_unused_port()


class SlurmError(RuntimeError):
    pass


class LocalSlurm:
    """A one-node Slurm cluster under `root`; `start()`, use, then `stop()`."""

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        cred_expire: int = 5,
        sched_interval: int = 2,
        kill_wait: int = 10,
        min_job_age: int = 600,
        gpus: int = 2,
    ):
        self.root = Path(root)
        self.host = socket.gethostname().split(".")[0]
        self.cpus = os.cpu_count() or 1
        self.conf = self.root / "slurm.conf"
        self.gpus = gpus
        self.settings = dict(
            cred_expire=cred_expire,
            sched_interval=sched_interval,
            kill_wait=kill_wait,
            min_job_age=min_job_age,
        )
        self._procs: dict[str, subprocess.Popen] = {}

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 60) -> None:
        try:
            self._write_files()
            self._start_munged(timeout)
            self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-f", str(self.conf)])
            self._wait(lambda: self._client_ok("scontrol", "ping"), timeout, "slurmctld to answer")
            self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", self.host])
            self._wait(lambda: self.node_state() == "idle", timeout, "the node to be idle")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Cancels every job, waits for them to end, then stops the daemons (reverse order)."""
        if "slurmd" in self._procs and self._procs["slurmd"].poll() is None:
            jobs = self.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
            for job in jobs:
                self.run("scancel", job, check=False)
            deadline = time.monotonic() + self.settings["kill_wait"] + 30
            while jobs and time.monotonic() < deadline:
                if not self.run("squeue", "-h", "-o", "%i", check=False).stdout.split():
                    break
                time.sleep(0.5)
        for name in reversed(DAEMONS):
            proc = self._procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def __enter__(self) -> LocalSlurm:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- clients -----------------------------------------------------------------------------

    def env(self, base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
        """An environment whose Slurm commands talk to this cluster (base: os.environ)."""
        env = dict(os.environ if base is None else base)
        env = {k: v for k, v in env.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        env["SLURM_CONF"] = str(self.conf)
        env.update(extra)
        return env

    def run(self, *args: str, check: bool = True, env=None, timeout: float = 30, cwd=None):
        proc = subprocess.run(
            list(args), env=env or self.env(), capture_output=True, text=True,
            timeout=timeout, cwd=cwd,
        )  # fmt: skip
        if check and proc.returncode:
            raise SlurmError(
                f"{shlex.join(args)} exited {proc.returncode}: {proc.stdout}{proc.stderr}"
            )
        return proc

    def sbatch(self, *args: str, env: dict[str, str], cwd: str) -> str:
        """Submits a batch job; returns its id."""
        out = self.run("sbatch", "--parsable", *args, env=env, cwd=cwd).stdout.strip()
        return out.split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, Reason, ...)."""
        out = self.run("scontrol", "-o", "show", "job", job_id).stdout
        return dict(re.findall(r"(\w+(?::\w+)?)=(\S*)", out))

    def wait_for_job(self, job_id: str, predicate, timeout: float, what: str) -> dict[str, str]:
        """Polls the job until predicate(job dict) holds; returns that dict."""
        info: dict[str, str] = {}

        def check():
            nonlocal info
            info = self.job(job_id)
            return predicate(info)

        self._wait(check, timeout, lambda: f"job {job_id}: {what} (last seen: {info})")
        return info

    def node_state(self) -> str:
        proc = self.run("sinfo", "-h", "-n", self.host, "-o", "%T", check=False)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    def logs(self) -> str:
        parts = []
        for name in ("munged.log", "slurmctld.log", "slurmd.log"):
            path = self.root / name
            if path.exists():
                lines = path.read_text(errors="replace").splitlines()[-40:]
                parts.append(f"--- {name} (last {len(lines)} lines)\n" + "\n".join(lines))
        return "\n".join(parts)

    # ---- internals ---------------------------------------------------------------------------

    def _write_files(self) -> None:
        for sub in ("munge", "state", "spool"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        (self.root / "plugstack.conf").write_text("")
        # GPUs as Slurm sees them: gres/gpu entries, each a character device (Slurm requires
        # one; these are copies of /dev/null). No CUDA device exists behind them.
        devices = []
        (self.root / "dev").mkdir(exist_ok=True)
        for index in range(self.gpus):
            devices.append(self.root / "dev" / f"gpu{index}")
            if not devices[-1].exists():
                os.mknod(devices[-1], 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        (self.root / "gres.conf").write_text(
            "".join(f"NodeName={self.host} Name=gpu File={path}\n" for path in devices)
        )
        self.conf.write_text(
            _CONFIG.format(
                root=self.root,
                host=self.host,
                cpus=self.cpus,
                gpus=self.gpus,
                ctld_port=_free_port(),
                slurmd_port=_free_port(),
                **self.settings,
            )
        )

    def _start_munged(self, timeout: float) -> None:
        munge = self.root / "munge"
        self._spawn(
            "munged",
            [
                "munged", "--foreground", "--force",
                f"--socket={munge / 'munge.socket'}",
                f"--key-file={munge / 'munge.key'}",
                f"--pid-file={munge / 'munged.pid'}",
                f"--seed-file={munge / 'munged.seed'}",
                f"--log-file={self.root / 'munged.log'}",
            ],
        )  # fmt: skip
        self._wait(lambda: (munge / "munge.socket").exists(), timeout, "munged's socket")

    def _spawn(self, name: str, argv: list[str]) -> None:
        out = open(self.root / f"{name}.stdout", "wb")  # noqa: SIM115 (closed with the process)
        try:
            self._procs[name] = subprocess.Popen(
                argv, env=self.env(), stdout=out, stderr=subprocess.STDOUT, cwd=self.root,
                start_new_session=True,
            )  # fmt: skip
        finally:
            out.close()

    def _client_ok(self, *args: str) -> bool:
        return self.run(*args, check=False).returncode == 0

    def _wait(self, predicate, timeout: float, what) -> None:
        """Polls `predicate`; `what` (a string, or a function giving one) names it in errors."""
        deadline = time.monotonic() + timeout
        while not predicate():
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    stdout = (self.root / f"{name}.stdout").read_text(errors="replace")
                    what = what() if callable(what) else what
                    raise SlurmError(
                        f"{name} exited with status {proc.returncode} while waiting for {what}:"
                        f"\n{stdout}\n{self.logs()}"
                    )
            if time.monotonic() > deadline:
                what = what() if callable(what) else what
                raise SlurmError(
                    f"timed out after {timeout:.0f}s waiting for {what}\n{self.logs()}"
                )
            time.sleep(0.25)


def main() -> int:
    reason = unavailable_reason()
    if reason:
        print(reason, file=sys.stderr)
        return 1
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/local-slurm")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    with LocalSlurm(root) as cluster:
        print(
            f"Slurm is up: export SLURM_CONF={cluster.conf}   (SIGINT/SIGTERM stops it)", flush=True
        )
        while not stop.wait(1):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
