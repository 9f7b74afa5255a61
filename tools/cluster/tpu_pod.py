"""tpu_pod: Cloud TPU VM slices (one, or several as one multislice unit) for the launcher.

`python -m tools.cluster.tpu_pod help` (or `tools/cluster/tpu_pod.sh help`) shows the usage.
Modules: pod_options (command line), pod_gcloud (gcloud calls and the operations on a unit),
pod_driver (supervise's loop), pod_supervisor (supervise's rules, pure), remote_scripts (what
runs on the workers), tpu_pod_usage (the help text).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

from launch.status import ExitStatus
from tools.cluster import remote_scripts as remote
from tools.cluster.pod_driver import GiveUp, Supervisor, after_give_up
from tools.cluster.pod_gcloud import Failed, Gcloud, Pod, error_text
from tools.cluster.pod_options import Options, UsageError, parse, validate
from tools.cluster.tpu_pod_usage import USAGE

PROG = remote.PROG
GAVE_UP = 3  # supervise gave up (documented in the usage)
NO_GCLOUD = 127


def do_create(pod: Pod, sleep: Callable[[float], None]) -> None:
    opts = pod.opts
    pod.create()
    if not opts.queued:
        return
    if opts.wait:
        pod.wait_active(opts.queued_resources(), opts.number("poll_seconds"), sleep)
    else:
        pod.log(
            f"queued resource {opts.name} requested; '{PROG} status --queued' shows its state"
            " (train after setup once it is ACTIVE)"
        )


def do_status(pod: Pod) -> int:
    opts = pod.opts
    ok = True
    for node in opts.nodes():
        rc, node_state, err = pod.describe(node)
        if rc == 0:
            print(f"TPU {node} ({opts.zone}): {node_state.state} ({node_state.health_text()})")
        elif rc == 1:
            print(f"TPU {node} ({opts.zone}): MISSING")
            ok = False
        else:
            print(f"TPU {node} ({opts.zone}): could not be read:\n{error_text(err)}")
            ok = False
    if opts.queued:
        for resource in opts.queued_resources():
            rc, state, err = pod.queued_state(resource)
            if rc == 2:
                print(f"queued resource {resource}: could not be read:\n{error_text(err)}")
                ok = False
            else:
                print(f"queued resource {resource}: {state}")
    if opts.workdir:
        rc, err = pod.finished()
        if rc == 2:
            print(f"run {opts.workdir}: could not be read:\n{error_text(err)}")
            ok = False
        else:
            print(f"run {opts.workdir}: {'FINISHED' if rc == 0 else 'not finished'}")
    return ExitStatus.FINISHED if ok or opts.dry_run else ExitStatus.FAILED


def do_logs(pod: Pod) -> int:
    opts = pod.opts
    if opts.all_workers:
        complete = pod.collect_logs("logs")
        return ExitStatus.FINISHED if complete or opts.dry_run else ExitStatus.FAILED
    node = opts.nodes()[int(opts.slice)]
    return pod.ssh(node, opts.worker, None, remote.follow(), capture=False).rc


def log_line(message: str) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    print(f"{stamp} {PROG}: {message}", file=sys.stderr, flush=True)


class Interrupted(BaseException):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_interrupted(signum: int, frame) -> None:
    raise Interrupted(signum)


def execute(opts: Options, gcloud: Gcloud, log: Callable[[str], None], tmp_dir: str,
            sleep: Callable[[float], None] = time.sleep,
            clock: Callable[[], float] = time.monotonic) -> int:  # fmt: skip
    """Runs one validated subcommand; raises Failed or GiveUp."""
    pod = Pod(opts, gcloud, log, tmp_dir)
    sub = opts.subcommand
    if sub == "create":
        do_create(pod, sleep)
    elif sub == "setup":
        pod.setup()
    elif sub == "train":
        pod.train()
        log(f"started; follow with '{PROG} logs', stop with '{PROG} stop'")
    elif sub == "status":
        return do_status(pod)
    elif sub == "logs":
        return do_logs(pod)
    elif sub == "stop":
        pod.stop()
    elif sub == "delete":
        pod.delete()
    else:
        try:
            return Supervisor(pod, clock, sleep).run()
        except GiveUp:
            after_give_up(pod)
            return GAVE_UP
    return ExitStatus.FINISHED


def main(
    argv: Sequence[str] | None = None,
    environ: dict[str, str] | None = None,
    runner: type[Gcloud] = Gcloud,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    """The command line; `runner`, `sleep` and `clock` are what the tests replace."""
    environ = dict(os.environ if environ is None else environ)
    try:
        opts = parse(sys.argv[1:] if argv is None else argv, environ)
        if opts.help or opts.subcommand == "help":
            print(USAGE, end="")
            return ExitStatus.FINISHED
        validate(opts)
    except UsageError as e:
        print(f"error: {PROG}: {e}", file=sys.stderr)
        print(f"Run 'tools/cluster/{PROG} help' for usage.", file=sys.stderr)
        return ExitStatus.BAD_INPUT
    if not opts.dry_run and not shutil.which("gcloud", path=environ.get("PATH", "")):
        print(
            f"error: {PROG}: gcloud not found on PATH; install the Google Cloud CLI"
            " (https://cloud.google.com/sdk/docs/install) and run 'gcloud auth login'",
            file=sys.stderr,
        )
        return NO_GCLOUD
    if opts.subcommand == "supervise":
        environ["CLOUDSDK_CORE_DISABLE_PROMPTS"] = "1"  # nobody answers a prompt
    try:  # the tarball and a credentials file live here while tpu_pod runs
        tmp_dir = tempfile.mkdtemp(prefix="tpu_pod.", dir=environ.get("TMPDIR"))
    except OSError as e:
        print(f"error: {PROG}: cannot make a temporary folder: {e}", file=sys.stderr)
        return ExitStatus.FAILED
    gcloud = runner(opts.dry_run, log_line, environ)
    previous = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return execute(opts, gcloud, log_line, tmp_dir, sleep, clock)
    except Failed as e:
        print(f"error: {PROG}: {e}", file=sys.stderr)
        return ExitStatus.FAILED
    except Interrupted as e:
        # Ends like the signal would have (the call in flight was ended with its group).
        shutil.rmtree(tmp_dir, ignore_errors=True)
        signal.signal(e.signum, signal.SIG_DFL)
        os.kill(os.getpid(), e.signum)
        return 128 + e.signum
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        for s, handler in previous.items():
            signal.signal(s, handler)


if __name__ == "__main__":
    sys.exit(main())
