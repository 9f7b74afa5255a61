"""Prints the Kubernetes manifest for a multi-host TPU training run on GKE (a JobSet).

    python -m tools.cluster.gke_jobset --accelerator=tpu-v5-lite-podslice --topology=4x4 \
        --image=us-docker.pkg.dev/my-project/repo/resnet:v1 --workdir=gs://my-bucket/resnet50 \
        [--slices=2] [--config=configs/resnet50_imagenet.py] [--spot] [--env=KEY=VALUE ...] \
        [-- --config.train.num_epochs=90] > resnet.yaml
    kubectl apply -f resnet.yaml

One JobSet (jobset.x-k8s.io/v1alpha2) with one replicated Job, `--slices` replicas of it: each
an Indexed Job of one pod per TPU VM of one slice. Why a JobSet and not a plain Indexed Job:
the processes of all slices form one `jax.distributed` job, so when one pod fails or is
preempted they must all restart together, from the last checkpoint. A JobSet restarts the whole
group (it recreates every Job, of every slice); a plain Indexed Job only replaces the failed
pod, whose peers then wait for it inside a collective until they time out.

Multislice (--slices=N > 1, multi-host slices only, as GKE requires): every pod gets
MEGASCALE_NUM_SLICES=N, MEGASCALE_SLICE_ID (its Job's index, from the JobSet label) and
MEGASCALE_COORDINATOR_ADDRESS (pod 0 of slice 0). JAX numbers the processes slice by slice
from these and launch.distributed lays the 'batch' axis out slice by slice. Each slice needs a
node pool of its own (the exclusive-topology annotation puts one Job on one node pool).

Exit statuses of the launcher (launch/status.py), through the Job's podFailurePolicy (a pod
failure fails the Job at once: backoffLimit 0) and the JobSet's failurePolicy rules:
  2, 3 (bad input, diverged)        FailJobSet: stop, retrying cannot help
  75 (preempted: checkpoint saved)  RestartJobSetAndIgnoreMaxRestarts
  pod DisruptionTarget (preemption, eviction, node lost)  likewise
  anything else, 5 (stalled) included  RestartJobSet: restarted, counted in --max-restarts
The rules tell those apart by the Job's failure message ("... failed with exit code 75
matching FailJob rule at index 1"), with `onJobFailureMessagePatterns`, which JobSet has had
since v0.10. On an older JobSet that field is dropped, and the first rule (FailJobSet) then
matches every podFailurePolicy failure: such a JobSet stops on a preemption rather than
looping on a bad configuration.

The peers: GKE's TPU webhook injects TPU_WORKER_ID and TPU_WORKER_HOSTNAMES into the pods of an
Indexed Job with a subdomain (JobSet sets it: network.enableDNSHostnames) that request
google.com/tpu, and `jax.distributed.initialize()` reads them (JAX's GKE TPU cluster
detection), so the launcher needs no coordinator flags.

Expected failures (a workdir that is not gs://, a topology that does not fit the accelerator,
a bad --env) print one line on stderr and exit 2. Not run on a real cluster in this tree: see
docs/operations.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import shlex
import sys
from typing import NoReturn

import yaml

from launch.status import ExitStatus

# GKE node label cloud.google.com/gke-tpu-accelerator -> (TPU generation, dimensions of its
# topology, chips per TPU VM in a multi-host slice). Every multi-host machine type has 4 chips
# (ct4p-hightpu-4t, ct5p-hightpu-4t, ct5lp-hightpu-4t, ct6e-standard-4t, tpu7x-standard-4t).
ACCELERATORS = {
    "tpu-v4-podslice": ("v4", 3, 4),
    "tpu-v5p-slice": ("v5p", 3, 4),
    "tpu-v5-lite-podslice": ("v5e", 2, 4),
    "tpu-v6e-slice": ("v6e", 2, 4),
    "tpu7x": ("TPU7x (Ironwood)", 3, 4),
}
# 2D generations run slices of up to 8 chips (1x1, 2x2, 2x4) on one VM (ct5lp-hightpu-1t/4t/8t,
# ct6e-standard-1t/4t/8t); 3D ones up to 4 (2x2x1). v6e also offers 2x4 as two 4-chip VMs
# (ct6e-standard-4t): pass --chips-per-host=4 for that node pool.
SINGLE_HOST_MAX_CHIPS = {2: 8, 3: 4}

CONTAINER = "trainer"  # the podFailurePolicy rules name it
REPLICATED_JOB = "slice"
# Plain ints: YAML's safe dumper writes no IntEnum.
FATAL_EXIT_STATUSES = (int(ExitStatus.BAD_INPUT), int(ExitStatus.DIVERGED))
PREEMPTED_EXIT_STATUS = int(ExitStatus.PREEMPTED)
# What TPU multislice reads on every host (JAX's TPU cluster detection, libtpu).
SLICE_COUNT_ENV = "MEGASCALE_NUM_SLICES"
SLICE_ID_ENV = "MEGASCALE_SLICE_ID"
SLICE_COORDINATOR_ENV = "MEGASCALE_COORDINATOR_ADDRESS"
JOB_INDEX_LABEL = "jobset.sigs.k8s.io/job-index"  # JobSet's label: which replica (slice)
JOBSET_API = "jobset.x-k8s.io/v1alpha2"
NAME_PATTERN = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
# Pod hostnames are <name>-slice-<job index>-<pod index>; a DNS label has at most 63 characters.
MAX_NAME_LENGTH = 40
ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class UsageError(ValueError):
    """A bad option: reported in one line, exit status 2."""


@dataclasses.dataclass(frozen=True)
class Slice:
    accelerator: str
    topology: str
    chips: int
    chips_per_host: int

    @property
    def hosts(self) -> int:
        return self.chips // self.chips_per_host


def parse_slice(accelerator: str, topology: str, chips_per_host: int | None = None) -> Slice:
    """Checks the topology against the accelerator; works out the chips per pod and the pods."""
    if accelerator not in ACCELERATORS:
        raise UsageError(
            f"--accelerator must be one of {', '.join(sorted(ACCELERATORS))}, got {accelerator!r}"
        )
    generation, dims, multi_host_chips = ACCELERATORS[accelerator]
    if not re.fullmatch(r"[1-9][0-9]*(x[1-9][0-9]*)*", topology) or topology.count("x") + 1 != dims:
        example = "4x4" if dims == 2 else "2x2x4"
        raise UsageError(
            f"--topology for {accelerator} ({generation}) has {dims} dimensions, like {example}; "
            f"got {topology!r}"
        )
    chips = math.prod(int(d) for d in topology.split("x"))
    if chips_per_host is None:
        chips_per_host = chips if chips <= SINGLE_HOST_MAX_CHIPS[dims] else multi_host_chips
    if chips_per_host < 1 or chips % chips_per_host:
        raise UsageError(
            f"--chips-per-host={chips_per_host} does not divide the {chips} chips of {topology}"
        )
    return Slice(accelerator, topology, chips, chips_per_host)


@dataclasses.dataclass(frozen=True)
class Options:
    name: str
    image: str
    workdir: str
    slice: Slice
    slices: int = 1
    config: str = "configs/resnet50_imagenet.py"
    namespace: str | None = None
    grace_seconds: int = 300
    max_restarts: int = 5
    spot: bool = False
    service_account: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    launcher_args: tuple[str, ...] = ()


def check(options: Options) -> None:
    if not options.workdir.startswith("gs://") or len(options.workdir) <= len("gs://"):
        raise UsageError(
            f"--workdir must be a gs://BUCKET/PATH URL that every pod shares, got "
            f"{options.workdir!r}"
        )
    if not NAME_PATTERN.fullmatch(options.name) or len(options.name) > MAX_NAME_LENGTH:
        raise UsageError(
            f"--name must be a DNS label of at most {MAX_NAME_LENGTH} characters (lower-case "
            f"letters, digits, '-'), got {options.name!r}"
        )
    if not options.image:
        raise UsageError("--image is required")
    if options.grace_seconds < 30:
        raise UsageError(
            f"--grace-seconds={options.grace_seconds} leaves no time to save a checkpoint; "
            "use at least 30"
        )
    if options.max_restarts < 0:
        raise UsageError("--max-restarts must be >= 0")
    check_slices(options)
    for key, _ in options.env:
        if not ENV_KEY.fullmatch(key):
            raise UsageError(f"--env takes KEY=VALUE with KEY a variable name, got {key!r}")
        if key in (SLICE_COUNT_ENV, SLICE_ID_ENV, SLICE_COORDINATOR_ENV):
            raise UsageError(f"--env {key} is written from --slices; set --slices instead")


def check_slices(options: Options) -> None:
    if options.slices < 1:
        raise UsageError(f"--slices must be at least 1, got {options.slices}")
    if options.slices > 1 and options.slice.hosts == 1:
        raise UsageError(
            f"--slices={options.slices} needs multi-host slices, and {options.slice.accelerator} "
            f"{options.slice.topology} runs on one VM: GKE multislice takes multi-host slice "
            "node pools only; choose a larger --topology"
        )


def slice_env(options: Options) -> list[dict]:
    """The multislice variables: the slice count, this pod's slice, the one coordinator."""
    if options.slices == 1:
        return []
    # JobSet's pod DNS name: <jobset>-<replicated job>-<job index>-<pod index>.<subdomain>,
    # the subdomain being the JobSet's name.
    coordinator = f"{options.name}-{REPLICATED_JOB}-0-0.{options.name}"
    job_index = {"fieldRef": {"fieldPath": f"metadata.labels['{JOB_INDEX_LABEL}']"}}
    return [
        {"name": SLICE_COUNT_ENV, "value": str(options.slices)},
        {"name": SLICE_ID_ENV, "valueFrom": job_index},
        {"name": SLICE_COORDINATOR_ENV, "value": coordinator},
    ]


def pod_failure_policy() -> dict:
    # Rule indexes appear in the Job's failure message, which the JobSet rules match.
    return {
        "rules": [
            {
                "action": "FailJob",
                "onExitCodes": {
                    "containerName": CONTAINER,
                    "operator": "In",
                    "values": list(FATAL_EXIT_STATUSES),
                },
            },
            {
                "action": "FailJob",
                "onExitCodes": {
                    "containerName": CONTAINER,
                    "operator": "In",
                    "values": [PREEMPTED_EXIT_STATUS],
                },
            },
            {
                "action": "FailJob",
                "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
            },
        ]
    }


def jobset_failure_policy(max_restarts: int) -> dict:
    fatal = "|".join(str(code) for code in FATAL_EXIT_STATUSES)
    return {
        "maxRestarts": max_restarts,
        "rules": [
            {
                "name": "fatalExitStatus",
                "action": "FailJobSet",
                "onJobFailureReasons": ["PodFailurePolicy"],
                "onJobFailureMessagePatterns": [
                    f"failed with exit code ({fatal}) matching FailJob"
                ],
            },
            {
                "name": "preempted",
                "action": "RestartJobSetAndIgnoreMaxRestarts",
                "onJobFailureReasons": ["PodFailurePolicy"],
                "onJobFailureMessagePatterns": [
                    f"failed with exit code {PREEMPTED_EXIT_STATUS} matching FailJob",
                    "has condition DisruptionTarget matching FailJob",
                ],
            },
            # No rule matches any other failure: JobSet's default, RestartJobSet (counted).
        ],
    }


def pod_spec(options: Options) -> dict:
    s = options.slice
    node_selector = {
        "cloud.google.com/gke-tpu-accelerator": s.accelerator,
        "cloud.google.com/gke-tpu-topology": s.topology,
    }
    spec: dict = {
        "restartPolicy": "Never",  # required by podFailurePolicy; JobSet restarts the slice
        "terminationGracePeriodSeconds": options.grace_seconds,
        "nodeSelector": node_selector,
    }
    if options.spot:
        node_selector["cloud.google.com/gke-spot"] = "true"
        spec["tolerations"] = [
            {
                "key": "cloud.google.com/gke-spot",
                "operator": "Equal",
                "value": "true",
                "effect": "NoSchedule",
            }
        ]
    if options.service_account:
        spec["serviceAccountName"] = options.service_account
    env = [{"name": "PYTHONUNBUFFERED", "value": "1"}]
    env += slice_env(options)
    env += [{"name": key, "value": value} for key, value in options.env]
    chips = {"google.com/tpu": s.chips_per_host}
    spec["containers"] = [
        {
            "name": CONTAINER,
            "image": options.image,
            "command": ["python", "-m", "launch.main"],
            "args": [
                f"--config={options.config}",
                f"--workdir={options.workdir.rstrip('/')}",
                *options.launcher_args,
            ],
            "env": env,
            "resources": {"requests": dict(chips), "limits": dict(chips)},
        }
    ]
    return spec


def job_spec(options: Options) -> dict:
    """The batch/v1 JobSpec of the slice: one pod per TPU VM, indexed."""
    hosts = options.slice.hosts
    labels = {
        "app.kubernetes.io/name": "resnet-multihost",
        "app.kubernetes.io/instance": options.name,
    }
    return {
        "completionMode": "Indexed",
        "completions": hosts,
        "parallelism": hosts,
        "backoffLimit": 0,  # one failed pod fails the Job, and JobSet restarts the whole slice
        "podFailurePolicy": pod_failure_policy(),
        "template": {"metadata": {"labels": labels}, "spec": pod_spec(options)},
    }


def jobset(options: Options) -> dict:
    check(options)
    metadata: dict = {
        "name": options.name,
        "labels": {"app.kubernetes.io/name": "resnet-multihost"},
        # All pods of the slice on one node pool (one TPU slice), never split over two.
        "annotations": {
            "alpha.jobset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gke-nodepool"
        },
    }
    if options.namespace:
        metadata["namespace"] = options.namespace
    return {
        "apiVersion": JOBSET_API,
        "kind": "JobSet",
        "metadata": metadata,
        "spec": {
            "failurePolicy": jobset_failure_policy(options.max_restarts),
            "network": {"enableDNSHostnames": True, "publishNotReadyAddresses": True},
            "replicatedJobs": [
                {
                    "name": REPLICATED_JOB,
                    "replicas": options.slices,  # one Job per slice
                    "template": {"spec": job_spec(options)},
                }
            ],
        },
    }


def render(options: Options, command_line: str = "") -> str:
    s = options.slice
    slices = f"{options.slices} slices (multislice) of " if options.slices > 1 else ""
    pools = f"{options.slices} TPU node pools" if options.slices > 1 else "a TPU node pool"
    header = [
        f"# {options.name}: {slices}{s.accelerator} {s.topology}, {s.chips} chips, {s.hosts} "
        f"pod(s) of {s.chips_per_host} chip(s); workdir {options.workdir}",
        "# Needs the JobSet controller (v0.10 or newer for onJobFailureMessagePatterns) on a GKE",
        f"# cluster with {pools} of this accelerator and topology. docs/operations.md",
    ]
    if command_line:
        one_line = command_line.replace("\r", "\\r").replace("\n", "\\n")
        header.insert(0, f"# Generated by: {one_line}")
    body = yaml.safe_dump(jobset(options), sort_keys=False, default_flow_style=False, width=100)
    return "\n".join(header) + "\n" + body


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not ENV_KEY.fullmatch(key):
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE with KEY a variable name: {text!r}")
    return key, value


class _Parser(argparse.ArgumentParser):
    """argparse whose refusals are one `error:` line and ExitStatus.BAD_INPUT."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"error: {message} (see {self.prog} --help)\n")
        sys.exit(int(ExitStatus.BAD_INPUT))


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m tools.cluster.gke_jobset",
        description="Print a JobSet manifest that trains on a multi-host TPU slice on GKE.",
        epilog="Arguments after -- go to the launcher (python -m launch.main).",
    )
    p.add_argument("--accelerator", required=True, choices=sorted(ACCELERATORS))
    p.add_argument("--topology", required=True, help="e.g. 4x4 (v5e, v6e) or 2x2x4 (v4, v5p)")
    p.add_argument("--image", required=True, help="container image with '.[tpu]' installed")
    p.add_argument("--workdir", required=True, help="gs://BUCKET/PATH shared by every pod")
    p.add_argument(
        "--slices",
        type=int,
        default=Options.slices,
        help="TPU slices joined over the data-centre network (multislice; default 1)",
    )
    p.add_argument("--config", default=Options.config, help="launcher config")
    p.add_argument("--name", default="resnet-train", help="JobSet name (default resnet-train)")
    p.add_argument("--namespace", default=None)
    p.add_argument(
        "--chips-per-host",
        type=int,
        default=None,
        help="TPU chips per pod (default: 4 on multi-host slices, all chips on one VM otherwise)",
    )
    p.add_argument(
        "--grace-seconds",
        type=int,
        default=Options.grace_seconds,
        help="terminationGracePeriodSeconds: longer than a checkpoint save takes (default 300)",
    )
    p.add_argument(
        "--max-restarts",
        type=int,
        default=Options.max_restarts,
        help="restarts after failures other than preemption before the JobSet fails (default 5)",
    )
    p.add_argument("--spot", action="store_true", help="schedule on Spot TPU nodes")
    p.add_argument(
        "--service-account", default=None, help="Kubernetes service account (Workload Identity)"
    )
    p.add_argument(
        "--env",
        type=_env_pair,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment variable for the launcher, repeatable",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own, launcher_args = argv, []
    if "--" in argv:
        cut = argv.index("--")
        own, launcher_args = argv[:cut], argv[cut + 1 :]
    p = parser()
    args = p.parse_args(own)
    try:
        options = Options(
            name=args.name,
            image=args.image,
            workdir=args.workdir,
            slice=parse_slice(args.accelerator, args.topology, args.chips_per_host),
            slices=args.slices,
            config=args.config,
            namespace=args.namespace,
            grace_seconds=args.grace_seconds,
            max_restarts=args.max_restarts,
            spot=args.spot,
            service_account=args.service_account,
            env=tuple(args.env),
            launcher_args=tuple(launcher_args),
        )
        text = render(options, shlex.join(["python", "-m", "tools.cluster.gke_jobset", *argv]))
    except UsageError as e:
        p.error(str(e))
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
