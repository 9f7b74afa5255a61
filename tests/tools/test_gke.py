"""Tests for tools/cluster/gke_jobset.py: the JobSet manifest for a multi-host TPU slice on GKE.

The Job inside the JobSet (a batch/v1 JobSpec: pod template, podFailurePolicy, resources) is
validated offline against the Kubernetes API schema that `kubernetes-validate` ships. No JobSet
schema is used here: the JobSet wrapper is checked against the field names and enums of the
JobSet v1alpha2 API (kubernetes-sigs/jobset, api/jobset/v1alpha2/jobset_types.go), written out
below. The failure policies are checked by evaluating them the way the Job controller and the
JobSet controller do, on each of the launcher's exit statuses.
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys

import pytest
import yaml

from launch.status import ExitStatus
from tools.cluster import gke_jobset

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def options(**overrides) -> gke_jobset.Options:
    values = dict(
        name="resnet-train",
        image="us-docker.pkg.dev/my-project/repo/resnet:v1",
        workdir="gs://my-bucket/runs/r1",
        slice=gke_jobset.parse_slice("tpu-v5-lite-podslice", "4x4"),
    )
    values.update(overrides)
    return gke_jobset.Options(**values)


def rendered(**overrides) -> dict:
    (doc,) = yaml.safe_load_all(gke_jobset.render(options(**overrides)))
    return doc


def the_job(doc: dict) -> dict:
    """The JobSet's Job, as the JobSet controller creates it (a batch/v1 Job)."""
    (replicated,) = doc["spec"]["replicatedJobs"]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": f"{doc['metadata']['name']}-{replicated['name']}-0"},
        "spec": replicated["template"]["spec"],
    }


def the_pod(doc: dict) -> dict:
    return the_job(doc)["spec"]["template"]["spec"]


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tools.cluster.gke_jobset", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


# ------------------------------------------------------------- Kubernetes schema --


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        dict(spot=True, service_account="resnet-ksa", namespace="ml", env=(("A", "b c"),)),
        dict(slice=gke_jobset.parse_slice("tpu-v4-podslice", "2x2x4"), launcher_args=("--x=1",)),
        dict(slice=gke_jobset.parse_slice("tpu-v6e-slice", "2x4", chips_per_host=4)),
        dict(slices=3, env=(("A", "b"),)),
    ],
)
def test_job_validates_against_the_kubernetes_schema(overrides):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    job = the_job(rendered(**overrides))
    # 1.31: the first release with podFailurePolicy GA; and the newest schema shipped.
    for version in ("1.31", kubernetes_validate.latest_version()):
        kubernetes_validate.validate(job, version, strict=True)
    # The enums the OpenAPI schema leaves as plain strings.
    for rule in job["spec"]["podFailurePolicy"]["rules"]:
        assert rule["action"] in ("FailJob", "FailIndex", "Ignore", "Count")
        if "onExitCodes" in rule:
            assert rule["onExitCodes"]["operator"] in ("In", "NotIn")
            assert 0 not in rule["onExitCodes"]["values"]  # not allowed with In
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"  # podFailurePolicy needs it


def test_the_schema_check_is_real():
    """The validation above rejects a misspelled field and a wrongly typed value."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    job = the_job(rendered())
    misspelled = copy.deepcopy(job)
    rule = misspelled["spec"]["podFailurePolicy"]["rules"][0]
    rule["onExitCode"] = rule.pop("onExitCodes")
    with pytest.raises(kubernetes_validate.ValidationError, match="onExitCode"):
        kubernetes_validate.validate(misspelled, "1.31", strict=True)
    mistyped = copy.deepcopy(job)
    mistyped["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "300"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(mistyped, "1.31", strict=True)


# The JobSet v1alpha2 API (jobset_types.go): field names and enums used here.
JOBSET_SPEC = {
    "replicatedJobs",
    "network",
    "successPolicy",
    "failurePolicy",
    "startupPolicy",
    "suspend",
    "coordinator",
    "managedBy",
    "ttlSecondsAfterFinished",
    "volumeClaimPolicies",
}
REPLICATED_JOB = {"name", "groupName", "template", "replicas", "dependsOn"}
NETWORK = {"enableDNSHostnames", "subdomain", "publishNotReadyAddresses"}
FAILURE_POLICY = {"maxRestarts", "restartStrategy", "rules"}
FAILURE_RULE = {
    "name",
    "action",
    "onJobFailureReasons",
    "onJobFailureMessagePatterns",
    "targetReplicatedJobs",
}
FAILURE_ACTIONS = {
    "FailJobSet",
    "RestartJobSet",
    "RestartJobSetAndIgnoreMaxRestarts",
    "RestartJob",
    "RestartJobAndIgnoreMaxRestarts",
}
RULE_NAME = re.compile(r"[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?")
# Job failure reasons (batch/v1 JobConditions): what onJobFailureReasons can match.
JOB_FAILURE_REASONS = {
    "BackoffLimitExceeded",
    "DeadlineExceeded",
    "PodFailurePolicy",
    "MaxFailedIndexesExceeded",
    "FailedIndexes",
}


def test_jobset_uses_only_fields_of_the_jobset_api():
    doc = rendered(spot=True, namespace="ml")
    assert doc["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and doc["kind"] == "JobSet"
    assert set(doc) == {"apiVersion", "kind", "metadata", "spec"}
    spec = doc["spec"]
    assert set(spec) <= JOBSET_SPEC
    (replicated,) = spec["replicatedJobs"]
    assert set(replicated) <= REPLICATED_JOB and set(replicated["template"]) == {"spec"}
    assert replicated["replicas"] == 1
    assert set(spec["network"]) <= NETWORK
    assert spec["network"]["enableDNSHostnames"] is True  # pods get <name>.<subdomain> DNS names
    policy = spec["failurePolicy"]
    assert set(policy) <= FAILURE_POLICY
    for rule in policy["rules"]:
        assert set(rule) <= FAILURE_RULE
        assert rule["action"] in FAILURE_ACTIONS
        assert RULE_NAME.fullmatch(rule["name"])
        assert set(rule["onJobFailureReasons"]) <= JOB_FAILURE_REASONS
        for pattern in rule["onJobFailureMessagePatterns"]:
            re.compile(pattern)  # RE2 syntax; these use nothing Python's re reads differently
    assert len({rule["name"] for rule in policy["rules"]}) == len(policy["rules"])
    # Every pod of the slice on one node pool (= one TPU slice).
    annotations = doc["metadata"]["annotations"]
    assert annotations["alpha.jobset.sigs.k8s.io/exclusive-topology"] == (
        "cloud.google.com/gke-nodepool"
    )
    assert doc["metadata"]["namespace"] == "ml"


# -------------------------------------------------------------- failure policies --


def job_failure(job_spec: dict, exit_code: int | None, disrupted: bool = False):
    """What the Job controller does when a pod of the Job fails (pkg/controller/job).

    Returns (reason, message) of the Job's Failed condition, or None if the failure is ignored.
    `exit_code` None: the container has no exit code (killed with its node).
    """
    pod = "default/resnet-train-slice-0-1-abcde"
    exit_code = None if exit_code is None else int(exit_code)
    for index, rule in enumerate(job_spec.get("podFailurePolicy", {}).get("rules", [])):
        matched = None
        if "onExitCodes" in rule:
            req = rule["onExitCodes"]
            if exit_code and req.get("containerName") in (None, gke_jobset.CONTAINER):
                inside = exit_code in req["values"]
                if inside == (req["operator"] == "In"):
                    matched = (
                        f"Container {gke_jobset.CONTAINER} for pod {pod} failed with exit code "
                        f"{exit_code} matching {rule['action']} rule at index {index}"
                    )
        elif disrupted and any(
            c["type"] == "DisruptionTarget" and c["status"] == "True"
            for c in rule["onPodConditions"]
        ):
            matched = (
                f"Pod {pod} has condition DisruptionTarget matching {rule['action']} rule at "
                f"index {index}"
            )
        if matched:
            if rule["action"] == "FailJob":
                return "PodFailurePolicy", matched
            if rule["action"] == "Ignore":
                return None
            break  # Count: counts against backoffLimit below
    if job_spec["backoffLimit"] == 0:
        return "BackoffLimitExceeded", "Job has reached the specified backoff limit"
    return None


def jobset_action(policy: dict, reason: str, message: str) -> str:
    """The JobSet controller: the first rule matching both reason and message, else restart."""
    for rule in policy["rules"]:
        reasons = rule.get("onJobFailureReasons", [])
        patterns = rule.get("onJobFailureMessagePatterns", [])
        if reasons and reason not in reasons:
            continue
        if patterns and not any(re.search(p, message) for p in patterns):
            continue
        return rule["action"]
    return "RestartJobSet"


@pytest.mark.parametrize("slices", [1, 2])
@pytest.mark.parametrize(
    "exit_code,disrupted,expected",
    [
        (ExitStatus.BAD_INPUT, False, "FailJobSet"),
        (ExitStatus.DIVERGED, False, "FailJobSet"),
        (ExitStatus.PREEMPTED, False, "RestartJobSetAndIgnoreMaxRestarts"),
        (ExitStatus.PREEMPTED, True, "RestartJobSetAndIgnoreMaxRestarts"),
        (None, True, "RestartJobSetAndIgnoreMaxRestarts"),  # node preempted: no exit code
        (137, True, "RestartJobSetAndIgnoreMaxRestarts"),  # SIGKILL after the grace period
        (ExitStatus.STALLED, False, "RestartJobSet"),  # retried, counted in maxRestarts
        (ExitStatus.FAILED, False, "RestartJobSet"),
        (ExitStatus.SAVE_FAILED, False, "RestartJobSet"),
        (137, False, "RestartJobSet"),  # e.g. out of memory
        (23, False, "RestartJobSet"),  # 2 and 3 only as whole codes
        (50, False, "RestartJobSet"),
    ],
)
def test_failure_policy_per_exit_status(slices, exit_code, disrupted, expected):
    doc = rendered(slices=slices)
    failure = job_failure(the_job(doc)["spec"], exit_code, disrupted)
    assert failure is not None  # one failed pod always fails the Job: the slice restarts whole
    assert jobset_action(doc["spec"]["failurePolicy"], *failure) == expected


def test_a_slice_failure_restarts_every_slice():
    """The rules act on the whole JobSet: no rule restarts only the failed slice's Job
    (RestartJob), and none is limited to some replicated jobs."""
    policy = rendered(slices=4)["spec"]["failurePolicy"]
    for rule in policy["rules"]:
        assert rule["action"] in (
            "FailJobSet",
            "RestartJobSet",
            "RestartJobSetAndIgnoreMaxRestarts",
        )
        assert "targetReplicatedJobs" not in rule


# ------------------------------------------------------------------ multislice --


def env_of(doc: dict) -> dict:
    (container,) = the_pod(doc)["containers"]
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_multislice_is_one_job_per_slice_with_its_slice_environment():
    doc = rendered(slices=3, name="r50")
    (replicated,) = doc["spec"]["replicatedJobs"]
    assert replicated["replicas"] == 3
    spec = the_job(doc)["spec"]
    assert spec["parallelism"] == spec["completions"] == 4  # a 4x4 v5e slice: 4 VMs each
    env = env_of(doc)
    assert env["MEGASCALE_NUM_SLICES"] == "3"
    # Each Job (slice) gets its own index from JobSet's label on its pods.
    assert env["MEGASCALE_SLICE_ID"] == {
        "fieldRef": {"fieldPath": "metadata.labels['jobset.sigs.k8s.io/job-index']"}
    }
    # Pod 0 of slice 0 through JobSet's headless Service (<jobset>-<job>-<index>-<pod>.<jobset>).
    assert env["MEGASCALE_COORDINATOR_ADDRESS"] == "r50-slice-0-0.r50"
    assert doc["spec"]["network"]["enableDNSHostnames"] is True
    # One slice: none of it.
    assert not any(k.startswith("MEGASCALE") for k in env_of(rendered()))


@pytest.mark.parametrize(
    "overrides,error",
    [
        (dict(slices=0), "--slices must be at least 1"),
        (
            dict(slices=2, slice=gke_jobset.parse_slice("tpu-v5-lite-podslice", "2x2")),
            "needs multi-host slices",
        ),
        (dict(slices=2, env=(("MEGASCALE_SLICE_ID", "1"),)), "written from --slices"),
    ],
)
def test_bad_multislice_options_are_refused(overrides, error):
    with pytest.raises(gke_jobset.UsageError, match=error):
        gke_jobset.render(options(**overrides))


def test_retriable_statuses_match_the_launcher():
    assert {s for s in ExitStatus if s.retriable} == {ExitStatus.PREEMPTED, ExitStatus.STALLED}
    assert ExitStatus.PREEMPTED == gke_jobset.PREEMPTED_EXIT_STATUS
    assert set(gke_jobset.FATAL_EXIT_STATUSES) == {ExitStatus.BAD_INPUT, ExitStatus.DIVERGED}


def test_older_jobset_fails_safe():
    """A JobSet before v0.10 drops onJobFailureMessagePatterns: then nothing loops forever."""
    doc = rendered()
    policy = copy.deepcopy(doc["spec"]["failurePolicy"])
    for rule in policy["rules"]:
        rule.pop("onJobFailureMessagePatterns")
    spec = the_job(doc)["spec"]
    for code in (ExitStatus.BAD_INPUT, ExitStatus.DIVERGED, ExitStatus.PREEMPTED):
        assert jobset_action(policy, *job_failure(spec, code)) == "FailJobSet"


def test_max_restarts_and_grace_period():
    doc = rendered(max_restarts=7, grace_seconds=900)
    assert doc["spec"]["failurePolicy"]["maxRestarts"] == 7
    assert the_pod(doc)["terminationGracePeriodSeconds"] == 900
    assert the_pod(rendered())["terminationGracePeriodSeconds"] == 300  # the default
    with pytest.raises(gke_jobset.UsageError, match="grace-seconds"):
        gke_jobset.render(options(grace_seconds=10))


# ------------------------------------------------------------- TPU slice shape --


@pytest.mark.parametrize(
    "accelerator,topology,chips_per_host,pods,chips",
    [
        ("tpu-v5-lite-podslice", "4x4", None, 4, 4),
        ("tpu-v5-lite-podslice", "16x16", None, 64, 4),
        ("tpu-v5-lite-podslice", "2x4", None, 1, 8),  # ct5lp-hightpu-8t: one VM
        ("tpu-v5-lite-podslice", "2x2", None, 1, 4),
        ("tpu-v6e-slice", "4x8", None, 8, 4),
        ("tpu-v6e-slice", "2x4", 4, 2, 4),  # 2x4 on two ct6e-standard-4t VMs
        ("tpu-v4-podslice", "2x2x1", None, 1, 4),
        ("tpu-v4-podslice", "2x2x4", None, 4, 4),
        ("tpu-v5p-slice", "4x4x4", None, 16, 4),
        ("tpu7x", "2x2x2", None, 2, 4),
    ],
)
def test_node_selectors_and_tpu_resources(accelerator, topology, chips_per_host, pods, chips):
    doc = rendered(slice=gke_jobset.parse_slice(accelerator, topology, chips_per_host))
    spec = the_job(doc)["spec"]
    assert spec["parallelism"] == spec["completions"] == pods
    pod = spec["template"]["spec"]
    assert pod["nodeSelector"] == {
        "cloud.google.com/gke-tpu-accelerator": accelerator,
        "cloud.google.com/gke-tpu-topology": topology,
    }
    (container,) = pod["containers"]
    assert container["resources"] == {
        "requests": {"google.com/tpu": chips},
        "limits": {"google.com/tpu": chips},
    }


@pytest.mark.parametrize(
    "accelerator,topology,chips_per_host,error",
    [
        ("tpu-v4-podslice", "4x4", None, "3 dimensions"),
        ("tpu-v5-lite-podslice", "2x2x4", None, "2 dimensions"),
        ("tpu-v5-lite-podslice", "4x0", None, "2 dimensions"),
        ("tpu-v5-lite-podslice", "4x4", 3, "does not divide"),
        ("tpu-v9-superpod", "4x4", None, "--accelerator must be one of"),
    ],
)
def test_bad_slices_are_refused(accelerator, topology, chips_per_host, error):
    with pytest.raises(gke_jobset.UsageError, match=error):
        gke_jobset.parse_slice(accelerator, topology, chips_per_host)


def test_spot_and_service_account():
    pod = the_pod(rendered(spot=True, service_account="resnet-ksa"))
    assert pod["nodeSelector"]["cloud.google.com/gke-spot"] == "true"
    toleration = {"key": "cloud.google.com/gke-spot", "operator": "Equal", "value": "true"}
    assert dict(toleration, effect="NoSchedule") in pod["tolerations"]
    assert pod["serviceAccountName"] == "resnet-ksa"
    plain = the_pod(rendered())
    assert "tolerations" not in plain and "serviceAccountName" not in plain


# ------------------------------------------------------------- launcher and CLI --


def test_launcher_command_env_and_no_coordinator_flags():
    doc = rendered(
        config="configs/demo.py",
        env=(("JAX_COMPILATION_CACHE_DIR", "gs://my-bucket/xla-cache"), ("TRICKY", "a 'b' $c")),
        launcher_args=("--config.train.num_epochs=90",),
    )
    (container,) = the_pod(doc)["containers"]
    assert container["name"] == gke_jobset.CONTAINER
    assert container["command"] == ["python", "-m", "launch.main"]
    assert container["args"] == [
        "--config=configs/demo.py",
        "--workdir=gs://my-bucket/runs/r1",
        "--config.train.num_epochs=90",
    ]
    # GKE injects TPU_WORKER_ID / TPU_WORKER_HOSTNAMES; jax.distributed.initialize() reads them.
    assert not any("coordinator" in a or "process_id" in a for a in container["args"])
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env == {
        "PYTHONUNBUFFERED": "1",
        "JAX_COMPILATION_CACHE_DIR": "gs://my-bucket/xla-cache",
        "TRICKY": "a 'b' $c",
    }
    assert not any(e["name"].startswith("TPU_WORKER") for e in container["env"])


@pytest.mark.parametrize(
    "workdir", ["/mnt/data/run", "s3://bucket/run", "gs://", "run", "gcs://bucket/run"]
)
def test_workdir_must_be_gcs(workdir):
    with pytest.raises(gke_jobset.UsageError, match="gs://"):
        gke_jobset.render(options(workdir=workdir))


@pytest.mark.parametrize("name", ["Resnet", "resnet_train", "-resnet", "r" * 41])
def test_bad_names_are_refused(name):
    with pytest.raises(gke_jobset.UsageError, match="--name"):
        gke_jobset.render(options(name=name))


def test_cli_prints_a_manifest():
    proc = run_cli(
        "--accelerator=tpu-v6e-slice",
        "--topology=4x4",
        "--image=img:1",
        "--workdir=gs://b/run/",
        "--spot",
        "--env=JAX_COMPILATION_CACHE_DIR=gs://b/xla-cache",
        "--grace-seconds=600",
        "--",
        "--config.train.num_epochs=1",
    )
    assert proc.returncode == 0, proc.stderr
    generated_by = "# Generated by: python -m tools.cluster.gke_jobset --accelerator="
    assert proc.stdout.startswith(generated_by)
    (doc,) = yaml.safe_load_all(proc.stdout)
    (container,) = the_pod(doc)["containers"]
    assert container["args"] == [
        "--config=configs/resnet50_imagenet.py",
        "--workdir=gs://b/run",
        "--config.train.num_epochs=1",
    ]
    assert the_pod(doc)["terminationGracePeriodSeconds"] == 600
    assert the_job(doc)["spec"]["parallelism"] == 4
    multislice = run_cli(
        "--accelerator=tpu-v6e-slice", "--topology=4x4", "--image=img:1", "--workdir=gs://b/r",
        "--slices=2",
    )  # fmt: skip
    assert multislice.returncode == 0, multislice.stderr
    assert "2 slices (multislice) of tpu-v6e-slice 4x4" in multislice.stdout
    (doc,) = yaml.safe_load_all(multislice.stdout)
    assert doc["spec"]["replicatedJobs"][0]["replicas"] == 2


@pytest.mark.parametrize(
    "args,error",
    [
        (["--workdir=/tmp/run"], "gs://"),
        (["--workdir=gs://b/r", "--topology=4x4x4"], "2 dimensions"),
        (["--workdir=gs://b/r", "--env=1A=b"], "KEY=VALUE"),
        (["--workdir=gs://b/r", "--accelerator=tpu-v2"], "invalid choice"),
        (["--workdir=gs://b/r", "--slices=0"], "--slices must be at least 1"),
        (["--workdir=gs://b/r", "--slices=two"], "invalid int value"),
    ],
)
def test_cli_usage_errors_exit_2(args, error):
    base = {"--accelerator": "tpu-v5-lite-podslice", "--topology": "4x4", "--image": "img:1"}
    given = {a.split("=", 1)[0] for a in args}
    argv = [f"{k}={v}" for k, v in base.items() if k not in given] + args
    proc = run_cli(*argv)
    assert proc.returncode == 2
    assert error in proc.stderr
    assert proc.stdout == ""
