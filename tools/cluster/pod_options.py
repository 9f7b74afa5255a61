"""tpu_pod's command line: options, environment defaults and the checks made before any call."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

SUBCOMMANDS = ("create", "setup", "train", "status", "logs", "stop", "delete", "supervise")


class UsageError(Exception):
    """A bad command line: one `error:` line, exit 2."""


VALUE_FLAGS = {
    "--name": "name",
    "--zone": "zone",
    "--project": "project",
    "--accelerator-type": "accelerator",
    "--runtime-version": "runtime",
    "--service-account": "service_account",
    "--create-arg": "create_args",
    "--repo-url": "repo_url",
    "--ref": "ref",
    "--tarball": "tarball",
    "--python-version": "python_version",
    "--workdir": "workdir",
    "--config": "config",
    "--env": "env",
    "--worker": "worker",
    "--slice": "slice",
    "--logs-dir": "logs_dir",
    "--log-lines": "log_lines",
    "--stop-timeout": "stop_timeout",
    "--ssh-timeout": "ssh_timeout",
    "--setup-timeout": "setup_timeout",
    "--poll-seconds": "poll_seconds",
    "--max-restarts": "max_restarts",
    "--max-failures": "max_failures",
    "--unreachable-polls": "unreachable_polls",
    "--progress-timeout": "progress_timeout",
    "--max-backoff": "max_backoff",
    "--slices": "slices",
    "--node-prefix": "node_prefix",
    "--global-batch": "global_batch",
}
SWITCHES = {
    "--spot": "spot",
    "--queued": "queued",
    "--wait": "wait",
    "--all-workers": "all_workers",
    "--delete-when-finished": "delete_when_finished",
    "--delete-on-give-up": "delete_on_give_up",
    "--elastic": "elastic",
    "--dry-run": "dry_run",
    "--help": "help",
    "-h": "help",
}
UINT_FLAGS = (
    "log_lines",
    "stop_timeout",
    "ssh_timeout",
    "setup_timeout",
    "poll_seconds",
    "max_restarts",
    "max_failures",
    "unreachable_polls",
    "progress_timeout",
    "max_backoff",
    "slice",
    "global_batch",
)
TRUE_WORDS = ("1", "true", "TRUE", "True", "yes", "YES", "on", "ON")


@dataclass
class Options:
    subcommand: str = ""
    name: str = ""
    zone: str = ""
    project: str = ""
    accelerator: str = ""
    runtime: str = ""
    spot: bool = False
    queued: bool = False
    service_account: str = ""
    create_args: list[str] = field(default_factory=list)
    wait: bool = False
    repo_url: str = ""
    ref: str = ""
    tarball: str = ""
    python_version: str = "3.12"
    workdir: str = ""
    config: str = "configs/resnet50_imagenet.py"
    env: list[str] = field(default_factory=list)
    worker: str = "0"
    slice: str = "0"
    all_workers: bool = False
    logs_dir: str = "tpu-logs"
    log_lines: str = "5000"
    stop_timeout: str = "300"
    ssh_timeout: str = "300"
    setup_timeout: str = "3600"
    poll_seconds: str = "60"
    max_restarts: str = "100"
    max_failures: str = "3"
    unreachable_polls: str = "10"
    progress_timeout: str = "3600"
    max_backoff: str = "1800"
    slices: str = "1"
    node_prefix: str = ""
    elastic: bool = False
    global_batch: str = ""
    delete_when_finished: bool = False
    delete_on_give_up: bool = False
    dry_run: bool = False
    help: bool = False
    launcher_args: list[str] = field(default_factory=list)

    def number(self, name: str) -> int:
        return int(getattr(self, name) or 0)

    @property
    def slice_count(self) -> int:
        return int(self.slices)

    def nodes(self) -> list[str]:
        """The TPU node of each slice: NAME for one slice, PREFIX-0, PREFIX-1... for several."""
        if self.slice_count == 1:
            return [self.name]
        return [f"{self.node_prefix or self.name}-{k}" for k in range(self.slice_count)]

    def queued_resources(self) -> list[str]:
        """One queued resource for the unit; with --elastic one per slice, named as its node."""
        return self.nodes() if self.elastic else [self.name]


def from_environment(environ: dict[str, str]) -> Options:
    opts = Options()
    for flag_name, var in (
        ("name", "TPU_NAME"),
        ("zone", "TPU_ZONE"),
        ("project", "TPU_PROJECT"),
        ("accelerator", "TPU_ACCELERATOR_TYPE"),
        ("runtime", "TPU_RUNTIME_VERSION"),
        ("repo_url", "TPU_REPO_URL"),
        ("workdir", "TPU_WORKDIR"),
        ("config", "TPU_CONFIG"),
        ("slices", "TPU_SLICES"),
    ):
        if environ.get(var):
            setattr(opts, flag_name, environ[var])
    opts.spot = environ.get("TPU_SPOT", "0") in TRUE_WORDS
    opts.queued = environ.get("TPU_QUEUED", "0") in TRUE_WORDS
    return opts


def parse(argv: Sequence[str], environ: dict[str, str]) -> Options:
    """The command line over the environment's defaults; raises UsageError."""
    opts = from_environment(environ)
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--":
            opts.launcher_args = args
            break
        opt, inline, value = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if opt in VALUE_FLAGS:
            if not inline:
                if not args:
                    raise UsageError(f"option {opt} needs a value")
                value = args.pop(0)
            attr = VALUE_FLAGS[opt]
            if attr in ("create_args", "env"):
                getattr(opts, attr).append(value)
            else:
                setattr(opts, attr, value)
        elif opt in SWITCHES:
            if inline:
                raise UsageError(f"option {opt} takes no value")
            setattr(opts, SWITCHES[opt], True)
        elif arg.startswith("-"):
            raise UsageError(f"unknown option: {arg} (launcher arguments go after --)")
        elif not opts.subcommand:
            opts.subcommand = arg
        else:
            raise UsageError(f"unexpected argument: {arg} (launcher arguments go after --)")
    return opts


def default_runtime(accelerator: str) -> str:
    for prefixes, runtime in (
        (("v6e-",), "v2-alpha-tpuv6e"),
        (("v5p-",), "v2-alpha-tpuv5"),
        (("v5litepod-", "v5e-"), "v2-alpha-tpuv5-lite"),
        (("v2-", "v3-", "v4-"), "tpu-ubuntu2204-base"),
    ):
        if accelerator.startswith(prefixes) or accelerator == "v6e":
            return runtime
    return ""


def devices_per_slice(accelerator: str) -> int:
    """JAX devices in one slice: v4 and v5p types count TensorCores (two per device), the
    others count devices. 0 when the type is not known."""
    match = re.fullmatch(r"(v2|v3|v4|v5p|v5litepod|v5e|v6e)-(\d+)", accelerator)
    if not match:
        return 0
    count = int(match.group(2))
    return count // 2 if match.group(1) in ("v4", "v5p") else count


def global_batch(opts: Options) -> int:
    """--global-batch, else --config.train.global_batch_size=N among the launcher arguments."""
    if opts.global_batch:
        return int(opts.global_batch)
    for arg in opts.launcher_args:
        match = re.fullmatch(r"--config\.train\.global_batch_size=(\d+)", arg)
        if match:
            return int(match.group(1))
    return 0


def _require(opts: Options, value: str, flag_name: str, var: str = "") -> None:
    if not value:
        also = f" (or set {var})" if var else ""
        raise UsageError(f"'{opts.subcommand}' needs {flag_name}{also}")


def validate(opts: Options) -> None:
    """Refuses a command line that cannot work, before any gcloud call."""
    if not opts.subcommand:
        raise UsageError("no subcommand given")
    if opts.subcommand not in SUBCOMMANDS:
        raise UsageError(
            f"unknown subcommand: '{opts.subcommand}' (expected create, setup, train, status,"
            " logs, stop, delete, supervise or help)"
        )
    _require(opts, opts.name, "--name", "TPU_NAME")
    _require(opts, opts.zone, "--zone", "TPU_ZONE")
    for name in UINT_FLAGS:
        value = getattr(opts, name)
        if value and not re.fullmatch(r"[0-9]+", value):
            flag_name = "--" + name.replace("_", "-")
            raise UsageError(f"{flag_name} must be a non-negative integer, got '{value}'")
    _validate_unit(opts)
    if opts.subcommand in ("create", "supervise"):
        _require(opts, opts.accelerator, "--accelerator-type", "TPU_ACCELERATOR_TYPE")
        if not opts.runtime:
            opts.runtime = default_runtime(opts.accelerator)
            if not opts.runtime:
                raise UsageError(
                    f"no default runtime version for accelerator type '{opts.accelerator}';"
                    " pass --runtime-version"
                )
    if opts.subcommand in ("train", "supervise"):
        _require(opts, opts.workdir, "--workdir", "TPU_WORKDIR")
        if not re.match(r"gs://.", opts.workdir):
            raise UsageError(
                "--workdir must be a gs://BUCKET/PATH URL that all TPU workers share,"
                f" got '{opts.workdir}'"
            )
        opts.workdir = opts.workdir.rstrip("/")
        _require(opts, opts.config, "--config", "TPU_CONFIG")
    if opts.subcommand in ("setup", "supervise"):
        if opts.tarball and opts.repo_url:
            raise UsageError("use only one of --tarball and --repo-url")
        if opts.tarball and not os.path.isfile(opts.tarball):
            raise UsageError(f"--tarball: no such file: {opts.tarball}")
        if not re.fullmatch(r"3\.[0-9]+", opts.python_version):
            raise UsageError(f"--python-version must look like 3.12, got '{opts.python_version}'")
    for kv in opts.env:
        if not re.match(r"[A-Za-z_][A-Za-z0-9_]*=", kv):
            raise UsageError(
                f"--env takes KEY=VALUE with KEY a shell variable name, got '{kv.split('=', 1)[0]}'"
            )
    if opts.worker != "all" and not re.fullmatch(r"[0-9]+", opts.worker):
        raise UsageError(f"--worker must be a worker number or 'all', got '{opts.worker}'")
    if not opts.logs_dir:
        raise UsageError("--logs-dir must not be empty")


def _validate_unit(opts: Options) -> None:
    """--slices, --node-prefix, --elastic, --global-batch, --slice."""
    if not re.fullmatch(r"[1-9][0-9]*", opts.slices):
        raise UsageError(f"--slices must be a positive integer, got '{opts.slices}'")
    count = opts.slice_count
    if count > 1:
        opts.queued = True  # several slices are one unit only through a queued resource
    elif opts.node_prefix or opts.elastic:
        flag_name = "--node-prefix" if opts.node_prefix else "--elastic"
        raise UsageError(f"{flag_name} needs --slices=N with N > 1")
    if opts.node_prefix and not re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", opts.node_prefix):
        raise UsageError(
            "--node-prefix must be lowercase letters, digits and hyphens, starting with a"
            f" letter, got '{opts.node_prefix}'"
        )
    if int(opts.slice or 0) >= count:
        raise UsageError(f"--slice must be below --slices={count}, got '{opts.slice}'")
    if opts.elastic and opts.subcommand == "supervise":
        if not devices_per_slice(opts.accelerator):
            raise UsageError(
                f"--elastic: unknown device count of accelerator type '{opts.accelerator}'"
            )
        if not global_batch(opts):
            raise UsageError(
                "--elastic needs the global batch: --global-batch=N or"
                " -- --config.train.global_batch_size=N"
            )
