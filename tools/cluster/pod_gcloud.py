"""gcloud for tpu_pod: bounded calls (or only printed, --dry-run) and the operations on a unit
of TPU slices (a single slice is a unit of one)."""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tools.cluster import pod_supervisor as ps
from tools.cluster import remote_scripts as remote
from tools.cluster.pod_options import Options

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# ssh/scp options on every connection: give up connecting after 30 s, and detect a dead peer
# (a preempted worker) within about 2 minutes.
SSH_OPTIONS = ("-oConnectTimeout=30", "-oServerAliveInterval=30", "-oServerAliveCountMax=4")
API_TIMEOUT = 300  # seconds for one describe or storage call
KILL_AFTER = 30  # seconds between SIGTERM and SIGKILL for a call past its limit
# `describe` output, '|'-separated: the description comes last as it may contain anything.
DESCRIBE_FORMAT = 'value[separator="|"](state,health,symptoms.symptomType.list(),healthDescription)'
WORKERS_FORMAT = "value(networkEndpoints.len())"
ADDRESS_FORMAT = "value(networkEndpoints[0].ipAddress)"
QUEUED_FORMAT = "value(state.state)"


class Failed(Exception):
    """A step that failed: one `error:` line, exit 1 (supervise retries after the next poll)."""


@dataclass(frozen=True)
class Result:
    rc: int
    out: str = ""
    err: str = ""

    @property
    def not_found(self) -> bool:
        return "NOT_FOUND" in self.err

    @property
    def matched_nothing(self) -> bool:
        return "matched no objects" in self.err


def shell_word(arg: str) -> str:
    """`arg` quoted for bash on one line: $'...' when it holds a newline or control character,
    so that each printed command is one line that bash reads back as `arg`."""
    if all(ch.isprintable() for ch in arg):
        return shlex.quote(arg)
    escapes = {"\\": "\\\\", "'": "\\'", "\n": "\\n", "\t": "\\t", "\r": "\\r"}
    body = "".join(escapes.get(ch, ch if ch.isprintable() else _code(ch)) for ch in arg)
    return f"$'{body}'"


def _code(ch: str) -> str:
    return f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\U{ord(ch):08x}"


def error_text(err: str) -> str:
    """The last non-blank lines of a call's stderr, indented."""
    lines = [line for line in err.splitlines() if line.strip()][-15:]
    return "\n".join(f"    | {line}" for line in lines)


class Gcloud:
    """Runs commands in their own process group, each bounded when given a limit; with
    --dry-run only prints them (`+ CMD` on stdout). Ctrl-C/SIGTERM end the call in flight."""

    def __init__(self, dry_run: bool, log: Callable[[str], None], env: dict[str, str]):
        self.dry_run = dry_run
        self.log = log
        self.env = env

    def call(
        self,
        argv: Sequence[str],
        limit: float | None = None,
        show: bool = True,
        capture: bool = True,
        out_path: str = "",
        err_path: str = "",
    ) -> Result:
        """Runs argv; `show` prints it first (stderr); `capture` keeps its output."""
        line = "+ " + " ".join(shell_word(a) for a in argv)
        if self.dry_run:
            print(line, flush=True)
            return Result(0)
        if show:
            print(line, file=sys.stderr, flush=True)
        result = self.execute(list(argv), limit, capture, out_path, err_path)
        if result.rc in (124, 137) and limit is not None:
            self.log(f"timed out after {limit:g}s: {' '.join(argv[:5])}")
        return result

    def execute(
        self, argv: list[str], limit: float | None, capture: bool, out_path: str, err_path: str
    ) -> Result:
        with _output(out_path, capture) as out, _output(err_path, capture) as err:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                text=True,
                env=self.env,
                start_new_session=True,
            )
            try:
                stdout, stderr = proc.communicate(timeout=limit)
                return Result(proc.returncode, stdout or "", stderr or "")
            except subprocess.TimeoutExpired:
                return Result(_end_group(proc))
            except BaseException:
                _end_group(proc)
                raise


class _output:
    """A subprocess output: a file, a pipe (captured) or inherited."""

    def __init__(self, path: str, capture: bool):
        self.path, self.capture, self.file = path, capture, None

    def __enter__(self):
        if self.path:
            self.file = open(self.path, "w")
            return self.file
        return subprocess.PIPE if self.capture else None

    def __exit__(self, *exc):
        if self.file:
            self.file.close()


def _end_group(proc: subprocess.Popen) -> int:
    """SIGTERM to the call's process group, SIGKILL after KILL_AFTER: 124, or 137 if killed."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.communicate(timeout=KILL_AFTER)
        return 124
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.communicate()
        return 137


class Pod:
    """The gcloud operations on one unit of slices (a single slice is a unit of one)."""

    def __init__(self, opts: Options, gcloud: Gcloud, log: Callable[[str], None], tmp_dir: str):
        self.opts = opts
        self.gcloud = gcloud
        self.log = log
        self.tmp_dir = tmp_dir
        self.tarball_path = ""
        self.last_logs = ""
        self.gflags = [f"--zone={opts.zone}"] + (
            [f"--project={opts.project}"] if opts.project else []
        )
        self.ssh_flags = [f"--ssh-flag={o}" for o in SSH_OPTIONS]
        self.scp_flags = [f"--scp-flag={o}" for o in SSH_OPTIONS]

    # ------------------------------------------------------------------- reading state --

    def quiet(self, *args: str) -> Result:
        return self.gcloud.call(["gcloud", *args], limit=API_TIMEOUT, show=False)

    def describe(self, node: str) -> tuple[int, ps.Slice, str]:
        """0 and the node; 1 when gcloud answers NOT_FOUND (the only "missing"); 2 on any
        other error (permissions, credentials, network, quota), with gcloud's message."""
        result = self.quiet(
            "compute",
            "tpus",
            "tpu-vm",
            "describe",
            node,
            *self.gflags,
            f"--format={DESCRIBE_FORMAT}",
        )
        if result.rc != 0:
            return (1 if result.not_found else 2), ps.Slice(ps.MISSING), result.err
        if self.gcloud.dry_run:
            return 0, ps.Slice("DRY_RUN"), ""
        first = (result.out.splitlines() or [""])[0]
        state, health, symptoms, description = (first.split("|", 3) + ["", "", ""])[:4]
        state = "".join(state.split()) or "UNKNOWN"
        return (
            0,
            ps.Slice(state, "".join(health.split()), "".join(symptoms.split()), description),
            "",
        )

    def queued_state(self, resource: str) -> tuple[int, str, str]:
        """Like describe, for a queued resource: its state.state (MISSING when NOT_FOUND)."""
        result = self.quiet(
            "compute", "tpus", "queued-resources", "describe", resource, *self.gflags,
            f"--format={QUEUED_FORMAT}",
        )  # fmt: skip
        if result.rc != 0:
            return (1, ps.MISSING, "") if result.not_found else (2, "", result.err)
        if self.gcloud.dry_run:
            return 0, "DRY_RUN", ""
        return 0, "".join(result.out.split()) or "UNKNOWN", ""

    def ls(self, url: str) -> tuple[int, str, str]:
        """0 when something matches, 1 when nothing does (the bucket is readable), 2 else."""
        result = self.quiet("storage", "ls", url)
        if result.rc != 0:
            return (1 if result.matched_nothing else 2), "", result.err
        return (1, "", "") if self.gcloud.dry_run else (0, result.out, "")

    def finished(self) -> tuple[int, str]:
        rc, _, err = self.ls(f"{self.opts.workdir}/FINISHED")
        return rc, err

    def newest_checkpoint(self) -> tuple[int | None, str]:
        """The newest committed checkpoint step (-1: none), or None when it cannot be listed."""
        rc, out, err = self.ls(f"{self.opts.workdir}/checkpoints/*/commit_success.txt")
        if rc == 2:
            return None, err
        steps = re.findall(r"/checkpoints/([0-9]+)/commit_success\.txt$", out, flags=re.M)
        return max((int(s) for s in steps), default=-1), ""

    def worker_count(self, node: str) -> int:
        result = self.quiet(
            "compute",
            "tpus",
            "tpu-vm",
            "describe",
            node,
            *self.gflags,
            f"--format={WORKERS_FORMAT}",
        )
        if result.rc != 0:
            self.log(f"could not read the worker count of {node}:\n{error_text(result.err)}")
            return 0
        if self.gcloud.dry_run:
            return 1
        text = result.out.strip()
        return int(text) if text.isdigit() else 0

    def coordinator(self, slices: Sequence[int]) -> str:
        """The address of worker 0 of the first training slice (multislice coordinator)."""
        node = self.opts.nodes()[slices[0]]
        result = self.quiet(
            "compute",
            "tpus",
            "tpu-vm",
            "describe",
            node,
            *self.gflags,
            f"--format={ADDRESS_FORMAT}",
        )
        if self.gcloud.dry_run:
            return f"ADDRESS-OF-{node}-WORKER-0"
        address = result.out.strip()
        if result.rc != 0 or not address:
            raise Failed(f"could not read the address of {node}'s worker 0: {result.err.strip()}")
        return address

    # ----------------------------------------------------------- creating and deleting --

    def create(self) -> None:
        """The TPU, or the unit's queued resource (--elastic: one per slice)."""
        opts = self.opts
        if opts.elastic:
            for k in range(opts.slice_count):
                self.create_slice(k)
            return
        if not opts.queued:
            argv = ["compute", "tpus", "tpu-vm", "create", opts.name, *self.gflags]
            self.run([*argv, *self.capacity_flags(f"--version={opts.runtime}")], "create")
            return
        argv = ["compute", "tpus", "queued-resources", "create", opts.name]
        if opts.slice_count == 1:
            argv.append(f"--node-id={opts.name}")
        else:
            argv.append(f"--node-count={opts.slice_count}")
            argv.append(f"--node-prefix={opts.node_prefix or opts.name}")
        argv += [*self.gflags, *self.capacity_flags(f"--runtime-version={opts.runtime}")]
        self.run(argv, "create")

    def create_slice(self, k: int) -> None:
        """--elastic: slice k as its own queued resource, named as its node."""
        node = self.opts.nodes()[k]
        argv = ["compute", "tpus", "queued-resources", "create", node, f"--node-id={node}"]
        argv += [*self.gflags, *self.capacity_flags(f"--runtime-version={self.opts.runtime}")]
        self.run(argv, f"create {node}")

    def capacity_flags(self, runtime: str) -> list[str]:
        opts = self.opts
        flags = [f"--accelerator-type={opts.accelerator}", runtime]
        flags += ["--spot"] if opts.spot else []
        flags += [f"--service-account={opts.service_account}"] if opts.service_account else []
        return flags + opts.create_args

    def delete(self, resources: Sequence[str] | None = None) -> None:
        if not self.opts.queued:
            self.run(
                ["compute", "tpus", "tpu-vm", "delete", self.opts.name, *self.gflags, "--quiet"],
                "delete",
            )
            return
        for resource in resources if resources is not None else self.opts.queued_resources():
            argv = ["compute", "tpus", "queued-resources", "delete", resource, *self.gflags]
            self.run([*argv, "--force", "--quiet"], f"delete {resource}")

    def run(self, argv: list[str], what: str) -> None:
        if self.gcloud.call(["gcloud", *argv], capture=False).rc != 0:
            raise Failed(f"{what} failed: gcloud {' '.join(argv[:4])} {argv[4]}")

    def wait_active(
        self, resources: Sequence[str], poll: float, sleep: Callable[[float], None]
    ) -> None:
        """Waits until every queued resource is ACTIVE; Failed if one failed or is gone."""
        last: dict[str, str] = {}
        pending = list(resources)
        while pending:
            for resource in list(pending):
                rc, state, err = self.queued_state(resource)
                if self.gcloud.dry_run or state == ps.QUEUE_ACTIVE:
                    pending.remove(resource)
                    continue
                if rc == 2:
                    note = f"could not read the queued resource {resource}; retrying:"
                    self.log(f"{note}\n{error_text(err)}")
                    continue
                if last.get(resource) != state:
                    self.log(f"queued resource {resource}: {state}")
                    last[resource] = state
                if state in ("FAILED", "SUSPENDING", "SUSPENDED", "DELETING", ps.MISSING):
                    raise Failed(f"queued resource {resource} is {state}, not ACTIVE")
            if pending:
                sleep(poll)

    # --------------------------------------------------------------- on the workers --

    def ssh(self, node: str, worker: str, limit: float | None, script: str, **kw) -> Result:
        argv = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", node, *self.gflags]
        argv += [f"--worker={worker}", *self.ssh_flags, f"--command={script}"]
        return self.gcloud.call(argv, limit=limit, **kw)

    def ssh_each(
        self, slices: Sequence[int], limit: float, script: Callable[[int], str], what: str
    ) -> None:
        nodes = self.opts.nodes()
        failed = [
            nodes[k]
            for k in slices
            if self.ssh(nodes[k], "all", limit, script(k), capture=False).rc
        ]
        if failed:
            raise Failed(f"{what} failed on {', '.join(failed)}")

    def scp(self, node: str, local: str, remote_name: str) -> None:
        argv = ["gcloud", "compute", "tpus", "tpu-vm", "scp", local, f"{node}:{remote_name}"]
        argv += [*self.gflags, "--worker=all", *self.scp_flags]
        if self.gcloud.call(argv, limit=self.opts.number("setup_timeout"), capture=False).rc:
            raise Failed(f"copying {remote_name} to {node} failed")

    def prepare_tarball(self) -> str:
        """The archive that setup copies: --tarball, else git archive of --ref (default HEAD)."""
        if self.tarball_path:
            return self.tarball_path
        if self.opts.tarball:
            self.tarball_path = self.opts.tarball
            return self.tarball_path
        ref = self.opts.ref or "HEAD"
        if not self.gcloud.dry_run:
            if not shutil.which("git"):
                raise Failed("setup: git not found; use --repo-url or --tarball")
            probe = subprocess.run(
                ["git", "-C", REPO_ROOT, "rev-parse", "--git-dir"], capture_output=True
            )
            if probe.returncode:
                raise Failed(
                    f"setup: {REPO_ROOT} is not a git checkout; use --repo-url or --tarball"
                )
            dirty = subprocess.run(
                ["git", "-C", REPO_ROOT, "status", "--porcelain", "--untracked-files=no"],
                capture_output=True, text=True,
            )  # fmt: skip
            if dirty.stdout.strip():
                self.log(
                    f"warning: uncommitted changes in {REPO_ROOT} are NOT deployed"
                    f" (git archive {ref})"
                )
        path = os.path.join(self.tmp_dir, remote.TARBALL)
        argv = ["git", "-C", REPO_ROOT, "archive", "--format=tar.gz", "-o", path, ref]
        if self.gcloud.call(argv, capture=False).rc:
            raise Failed(f"setup: git archive {ref} failed")
        self.tarball_path = path
        return path

    def url_file(self) -> str:
        """A --repo-url with credentials, in a mode-600 file (scp keeps the mode)."""
        path = os.path.join(self.tmp_dir, "repo-url")
        if not os.path.exists(path):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(self.opts.repo_url + "\n")
        return path

    def setup(self, slices: Sequence[int] | None = None) -> None:
        opts = self.opts
        slices = range(opts.slice_count) if slices is None else slices
        for k in slices:
            node = opts.nodes()[k]
            if not opts.repo_url:
                self.scp(node, self.prepare_tarball(), remote.TARBALL)
            elif remote.has_credentials(opts.repo_url):
                self.log(
                    f"setup: cloning {remote.shown_url(opts.repo_url)} (the credentials go to the"
                    " workers in a file)"
                )
                self.scp(node, self.url_file(), remote.URL_FILE)
        script = remote.setup(opts.repo_url, opts.ref, opts.python_version)
        self.ssh_each(slices, opts.number("setup_timeout"), lambda k: script, "setup")

    def train(self, slices: Sequence[int] | None = None) -> None:
        opts = self.opts
        slices = list(range(opts.slice_count) if slices is None else slices)
        args = [f"--config={opts.config}", f"--workdir={opts.workdir}", *opts.launcher_args]
        env = [(key, value) for key, _, value in (kv.partition("=") for kv in opts.env)]
        coordinator = self.coordinator(slices) if opts.slice_count > 1 else ""

        def script(k: int) -> str:
            if not coordinator:
                return remote.train(args, env)
            unit = slice_environment(slices.index(k), len(slices), coordinator)
            return remote.train(args, env + unit)

        self.ssh_each(slices, opts.number("ssh_timeout"), script, "train")

    def stop(self, slices: Sequence[int] | None = None) -> None:
        opts = self.opts
        limit = opts.number("stop_timeout") + opts.number("ssh_timeout")
        script = remote.stop(opts.number("stop_timeout"))
        self.ssh_each(
            range(opts.slice_count) if slices is None else slices, limit, lambda k: script, "stop"
        )

    def check(self, slices: Sequence[int]) -> ps.Launcher:
        """Asks every worker of the given slices about the launcher (one bounded ssh each)."""
        answers: list[str] = []
        failed: list[int] = []
        rc, errors = 0, []
        for k in slices:
            result = self.ssh(
                self.opts.nodes()[k],
                "all",
                self.opts.number("ssh_timeout"),
                remote.check(),
                show=False,
            )
            if self.gcloud.dry_run:
                answers.append("running")
                continue
            found = remote.parse_check(result.out)
            answers += found
            if result.rc != 0 or not found:
                failed.append(k)
                rc = rc or result.rc
                errors.append(error_text(result.err))
        launcher = ps.combine(answers, tuple(failed), rc)
        return dataclasses.replace(launcher, error="\n".join(e for e in errors if e))

    def collect_logs(self, why: str, slices: Sequence[int] | None = None) -> str:
        """Saves the end of every worker's log under LOGS_DIR/NAME-TIME-WHY/; returns the folder,
        or "" unless every worker's log was saved."""
        opts = self.opts
        slices = range(opts.slice_count) if slices is None else slices
        folder = os.path.join(
            opts.logs_dir, f"{opts.name}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{why}"
        )
        suffix, candidate = 2, folder
        while os.path.exists(candidate):  # a second collection within the same second
            candidate, suffix = f"{folder}-{suffix}", suffix + 1
        folder = candidate
        saved = total = 0
        for k in slices:
            node = opts.nodes()[k]
            workers = self.worker_count(node)
            if workers < 1:
                self.log(f"TPU {node} reports no workers; no logs collected from it")
                continue
            if not self.gcloud.dry_run:
                try:
                    os.makedirs(folder, exist_ok=True)
                except OSError as e:
                    raise Failed(f"cannot save logs in {folder}: {e.strerror}") from e
            prefix = f"slice-{k}-" if opts.slice_count > 1 else ""
            for i in range(workers):
                total += 1
                saved += self._save_log(node, i, os.path.join(folder, f"{prefix}worker-{i}"))
        if not self.gcloud.dry_run and total:
            self.log(f"saved the logs of {saved} of {total} workers in {folder}")
            self.last_logs = folder
        return folder if total and saved == total else ""

    def _save_log(self, node: str, worker: int, base: str) -> int:
        script = remote.log(self.opts.number("log_lines"))
        limit = self.opts.number("ssh_timeout")
        if self.gcloud.dry_run:
            self.ssh(node, str(worker), limit, script)
            return 0
        result = self.ssh(
            node,
            str(worker),
            limit,
            script,
            show=False,
            out_path=base + ".log",
            err_path=base + ".ssh-errors",
        )
        if result.rc:
            self.log(f"could not fetch {node} worker {worker}'s log (see {base}.ssh-errors)")
            return 0
        os.remove(base + ".ssh-errors")
        return 1


def slice_environment(slice_id: int, slices: int, coordinator: str) -> list[tuple[str, str]]:
    """What TPU multislice reads on each host of slice `slice_id`: the coordinator is worker 0
    of the first slice, by address, on libtpu's default port (as the GKE JobSet names it)."""
    return [
        ("MEGASCALE_NUM_SLICES", str(slices)),
        ("MEGASCALE_SLICE_ID", str(slice_id)),
        ("MEGASCALE_COORDINATOR_ADDRESS", coordinator),
    ]
