"""What `tpu_pod supervise` does next: a pure function of what one poll saw and what came before.

`decide(observation, history, policy)` returns the next `Action` and the new `History`. It runs
no command and reads no clock: the driver in `tools.cluster.tpu_pod` observes (gcloud), calls
`decide`, and carries the action out. The rules (docs/operations.md, *Unattended runs*):

1. FINISHED exists: stop (exit 0).
2. A gcloud error other than NOT_FOUND: nothing changes, wait with exponential backoff.
3. A slice PREEMPTED, TERMINATED, missing...: recreate the unit (counted in --max-restarts);
   a queued request still waiting for capacity keeps its place.
4. A slice CREATING, REPAIRING...: wait; recreate after TRANSITION_TIMEOUT.
5. Launcher exit 2 or 3 on any worker: save the logs, give up.
6. Launcher exit 75 or 5: retriable, start it again (5 saves the logs first).
7. Any other exit status: a failure; save the logs, count it; more than --max-failures failures
   with no new checkpoint in between give up.
8. Not running after exit 0 or never started: start it again (unless FINISHED appeared).
9. Workers unreachable by ssh: recreate only after --unreachable-polls polls in a row, when the
   API does not call the slice HEALTHY nor under maintenance, checkpoints can be listed and no new
   one appeared for --progress-timeout seconds.
10. More than --max-restarts recreations and restarts: give up.
Elastic multislice (one queued resource per slice): a lost slice is requested again; training
continues at once on the largest set of ready slices that divides the global batch, and grows
back when the lost slices are ready again.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from launch.status import ExitStatus

READY = "READY"
MISSING = "MISSING"  # gcloud answered NOT_FOUND
TRANSITIONAL = frozenset(
    {
        "CREATING",
        "STARTING",
        "RESTARTING",
        "REPAIRING",
        "REIMAGING",
        "STOPPING",
        "DELETING",
        "HIDING",
        "UNHIDING",
        "UNKNOWN",
        "STATE_UNSPECIFIED",
    }
)
QUEUE_WAITING = frozenset({"ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING", "CREATING"})
QUEUE_ACTIVE = "ACTIVE"
TRANSITION_TIMEOUT = 1800  # seconds a slice may stay CREATING, REPAIRING... before a recreation
FATAL = (ExitStatus.BAD_INPUT, ExitStatus.DIVERGED)  # retrying cannot help
RETRIABLE = frozenset(s for s in ExitStatus if s.retriable)


class Kind(enum.Enum):
    FINISH = "finish"  # the run is complete
    WAIT = "wait"  # nothing to do until the next poll
    RECHECK = "recheck"  # poll again at once
    BACKOFF = "backoff"  # a gcloud call failed: wait `delay` seconds
    RECREATE = "recreate"  # delete what is left of the unit, create it, set up, train
    RELAUNCH = "relaunch"  # stop leftovers and start the launcher again on a ready unit
    RESIZE = "resize"  # elastic: request `requeue` again, train on `slices`
    GIVE_UP = "give_up"  # exit 3


@dataclass(frozen=True)
class Policy:
    """The supervise options that the rules read."""

    slices: int = 1
    queued: bool = False
    elastic: bool = False
    global_batch: int = 0
    devices_per_slice: int = 1
    poll_seconds: float = 60
    max_backoff: float = 1800
    max_restarts: int = 100
    max_failures: int = 3
    unreachable_polls: int = 10
    progress_timeout: float = 3600


@dataclass(frozen=True)
class Slice:
    """One TPU node as `describe` reports it, and its queued resource's state when read."""

    state: str
    health: str = ""
    symptoms: str = ""
    description: str = ""
    queued: str = ""  # "" when not read, MISSING when the request is gone

    def health_text(self) -> str:
        text = f"health {self.health or 'unknown'}"
        if self.symptoms:
            text += f", symptoms {self.symptoms}"
        if self.description:
            text += f": {self.description}"
        return text


@dataclass(frozen=True)
class Launcher:
    """The launcher on the workers of the training slices, combined (see `combine`)."""

    kind: str  # running, fatal, failed, retriable, stopped or unreachable
    code: int | None = None  # the exit status that decided `kind`
    codes: str = ""  # every worker's answer, comma-separated
    ssh_rc: int = 0  # exit status of the failed ssh call (unreachable)
    unreachable: tuple[int, ...] = ()  # slices whose check failed
    error: str = ""  # what gcloud said when the check failed


def _retriable(code: int) -> bool:
    return code in RETRIABLE


def combine(answers: list[str], failed_slices: tuple[int, ...] = (), ssh_rc: int = 0) -> Launcher:
    """One launcher state from every worker's answer ("running", an exit status or "none")."""
    codes = ",".join(answers)
    if failed_slices or not answers:
        return Launcher("unreachable", codes=codes, ssh_rc=ssh_rc, unreachable=failed_slices)
    numbers = [int(a) for a in answers if a.lstrip("-").isdigit()]
    for kind, matches in (
        ("fatal", lambda c: c in FATAL),
        ("failed", lambda c: c != ExitStatus.FINISHED and not _retriable(c)),
        ("retriable", _retriable),
    ):
        hits = [c for c in numbers if matches(c)]
        if hits:
            return Launcher(kind, code=hits[-1], codes=codes)
    if any(a != "running" for a in answers):
        return Launcher("stopped", codes=codes)
    return Launcher("running", codes=codes)


@dataclass(frozen=True)
class Observation:
    """What one poll saw, in the order it looks: a failed call ends the poll there."""

    now: float
    finished: bool = False
    slices: tuple[Slice, ...] = ()
    launcher: Launcher | None = None
    finished_after_check: bool = False  # FINISHED appeared while the launcher was checked
    newest_step: int | None = None  # newest committed checkpoint; -1 none; None not listed
    listing_failed: bool = False  # the checkpoints could not be listed
    failed_call: str = ""  # "describing TPU x": a gcloud error other than NOT_FOUND
    error: str = ""  # what gcloud said


@dataclass(frozen=True)
class History:
    """What the rules remember between polls."""

    restarts: int = 0  # recreations and launcher restarts (--max-restarts)
    failures: int = 0  # launcher failures since the last new checkpoint (--max-failures)
    failure_step: int = -1  # newest checkpoint step at the last failure
    api_errors: int = 0  # failed gcloud calls in a row (backoff)
    unreachable: int = 0  # polls in a row on which the workers could not be checked
    unreachable_since: float = -1
    last_step: int = -1  # newest checkpoint step seen, and when it changed
    last_step_changed: float = -1
    steps_listed: bool = False
    step_advanced: bool = False  # the last listing found a newer step than the one before
    transition_since: float = -1  # when the unit entered a transitional state
    stuck_since: tuple[float, ...] = ()  # elastic: the same, per slice
    active: tuple[int, ...] | None = None  # the slices the launcher runs on; None: all
    last_seen: str = ""  # the last state line logged


@dataclass(frozen=True)
class Action:
    kind: Kind
    reason: str = ""
    delay: float = 0
    logs: str = ""  # save every worker's log first, in a folder ending with this
    delete_first: bool = True  # recreate: something of the unit is left to delete
    slices: tuple[int, ...] = ()  # resize: the slices to train on
    requeue: tuple[int, ...] = ()  # resize: slices whose queued resource is requested again
    notes: tuple[str, ...] = ()  # log lines that explain the decision, in order


def backoff_delay(errors_in_a_row: int, policy: Policy) -> float:
    """--poll-seconds doubled per error in a row, at most --max-backoff."""
    delay = policy.poll_seconds
    for _ in range(1, errors_in_a_row):
        if delay >= policy.max_backoff:
            break
        delay *= 2
    return min(delay, policy.max_backoff)


def usable_slices(ready: list[int], policy: Policy) -> tuple[int, ...]:
    """The most ready slices whose devices divide the global batch (none if no count does)."""
    for count in range(len(ready), 0, -1):
        if policy.global_batch % (count * policy.devices_per_slice) == 0:
            return tuple(ready[:count])
    return ()


def unit_text(slices: tuple[Slice, ...]) -> str:
    if len(slices) == 1:
        return f"{slices[0].state} ({slices[0].health_text()})"
    return "; ".join(f"slice {k} {s.state} ({s.health_text()})" for k, s in enumerate(slices))


def decide(obs: Observation, hist: History, policy: Policy) -> tuple[Action, History]:
    if obs.failed_call:
        return _backoff(obs, hist, policy)
    if obs.finished:
        return Action(Kind.FINISH), hist
    hist = _track_progress(replace(hist, api_errors=0), obs)
    notes: tuple[str, ...] = ()
    seen = unit_text(obs.slices)
    if seen != hist.last_seen:
        notes = (seen,)
        hist = replace(hist, last_seen=seen)
    if policy.elastic:
        action, hist = _decide_elastic(obs, hist, policy)
    else:
        action, hist = _decide_unit(obs, hist, policy)
    return replace(action, notes=notes + action.notes), hist


def _backoff(obs: Observation, hist: History, policy: Policy) -> tuple[Action, History]:
    errors = hist.api_errors + 1
    delay = backoff_delay(errors, policy)
    note = (
        f"{obs.failed_call} failed ({errors} in a row; not counted as a restart, nothing"
        f" changed); retrying in {delay:g}s. gcloud said:\n{obs.error}"
    )
    return Action(Kind.BACKOFF, delay=delay, notes=(note,)), replace(hist, api_errors=errors)


def _track_progress(hist: History, obs: Observation) -> History:
    if obs.newest_step is None:
        return replace(hist, step_advanced=False)
    step = obs.newest_step
    changed = step != hist.last_step
    return replace(
        hist,
        last_step=step,
        last_step_changed=obs.now if changed else hist.last_step_changed,
        steps_listed=True,
        step_advanced=changed and hist.steps_listed and step > hist.last_step,
    )


def _count_restart(hist: History, policy: Policy, what: str) -> tuple[Action | None, History, str]:
    """Counts one recreation or restart; a GIVE_UP action when it exceeds --max-restarts."""
    restarts = hist.restarts + 1
    hist = replace(hist, restarts=restarts)
    if restarts > policy.max_restarts:
        reason = f"{what} would exceed --max-restarts={policy.max_restarts}"
        return Action(Kind.GIVE_UP, reason=reason), hist, ""
    return None, hist, f"{what} (restart {restarts} of at most {policy.max_restarts})"


def _recreate(
    hist: History, policy: Policy, why: str, delete_first: bool = True
) -> tuple[Action, History]:
    give_up, hist, note = _count_restart(hist, policy, f"recreating the slice ({why})")
    if give_up:
        return give_up, hist
    hist = replace(hist, transition_since=-1, unreachable=0)
    if policy.elastic:
        hist = replace(hist, active=())
    return Action(Kind.RECREATE, reason=why, delete_first=delete_first, notes=(note,)), hist


def _timer(since: float, now: float) -> tuple[float, bool]:
    """Starts a transition timer if needed; whether TRANSITION_TIMEOUT has passed."""
    since = now if since < 0 else since
    return since, now - since > TRANSITION_TIMEOUT


def _decide_unit(obs: Observation, hist: History, policy: Policy) -> tuple[Action, History]:
    """One slice, or several as one queued resource: any loss recreates the whole unit."""
    states = [s.state for s in obs.slices]
    if all(state == READY for state in states):
        return _decide_launcher(obs, replace(hist, transition_since=-1), policy)
    gone = [s for s in states if s != READY and s not in TRANSITIONAL]
    queued = obs.slices[0].queued if policy.queued else ""
    if gone and all(s == MISSING for s in gone) and queued in QUEUE_WAITING:
        note = f"queued resource is {queued}; waiting"
        return Action(Kind.WAIT, notes=(note,)), replace(hist, transition_since=-1)
    if gone and not (all(s == MISSING for s in gone) and queued == QUEUE_ACTIVE):
        why = ", ".join(sorted(set(gone)))
        if policy.queued:
            delete_first = queued != MISSING
        else:
            delete_first = not all(s == MISSING for s in states)
        return _recreate(hist, policy, why, delete_first)
    since, expired = _timer(hist.transition_since, obs.now)
    if expired:
        stuck = next(s for s in states if s != READY)
        return _recreate(hist, policy, f"stuck in {stuck} for {TRANSITION_TIMEOUT}s")
    return Action(Kind.WAIT), replace(hist, transition_since=since)


def _decide_launcher(obs: Observation, hist: History, policy: Policy) -> tuple[Action, History]:
    launcher = obs.launcher or Launcher("running")
    if launcher.kind != "unreachable":
        hist = replace(hist, unreachable=0)
    if launcher.kind == "running":
        return Action(Kind.WAIT), hist
    if launcher.kind == "unreachable":
        return _decide_unreachable(obs, hist, policy, launcher)
    if launcher.kind == "fatal":
        why = (
            "training diverged"
            if launcher.code == ExitStatus.DIVERGED
            else "bad input: configuration, data, workdir or checkpoints"
        )
        reason = (
            f"the launcher exited with status {launcher.code} ({why}; workers:"
            f" {launcher.codes}): retrying cannot help"
        )
        return Action(Kind.GIVE_UP, reason=reason, logs=f"exit{launcher.code}"), hist
    if obs.finished_after_check:
        return Action(Kind.RECHECK), hist
    notes: list[str] = []
    logs = ""
    if launcher.kind == "failed":
        logs = f"exit{launcher.code}"
        give_up, hist, note = _count_failure(hist, policy, launcher.code)
        if give_up:
            return replace(give_up, logs=logs), hist
        notes.append(note)
    elif launcher.kind == "retriable":
        if launcher.code == ExitStatus.STALLED:
            logs = f"exit{launcher.code}"
        notes.append(
            f"the launcher stopped with retriable exit status {launcher.code}"
            f" (workers: {launcher.codes})"
        )
    else:
        notes.append(f"the launcher is not running on every worker (workers: {launcher.codes})")
    give_up, hist, note = _count_restart(hist, policy, "starting the launcher again")
    if give_up:
        return replace(give_up, logs=logs, notes=tuple(notes)), hist
    notes.append(note)
    return Action(Kind.RELAUNCH, reason=launcher.kind, logs=logs, notes=tuple(notes)), hist


def _count_failure(
    hist: History, policy: Policy, code: int | None
) -> tuple[Action | None, History, str]:
    notes = ""
    failures = hist.failures
    if hist.last_step > hist.failure_step:
        if failures > 0:
            notes = (
                f"checkpoint step {hist.last_step} is new since the last failure:"
                " failure count reset\n"
            )
        failures = 0
    failures += 1
    hist = replace(hist, failures=failures, failure_step=hist.last_step)
    if failures > policy.max_failures:
        reason = (
            f"the launcher failed {failures} times with no new checkpoint in between"
            f" (--max-failures={policy.max_failures})"
        )
        return Action(Kind.GIVE_UP, reason=reason), hist, ""
    return (
        None,
        hist,
        notes + f"the launcher failed with exit status {code} (failure {failures} of at most"
        f" {policy.max_failures} with no new checkpoint)",
    )


def _decide_unreachable(
    obs: Observation, hist: History, policy: Policy, launcher: Launcher
) -> tuple[Action, History]:
    count = hist.unreachable + 1
    since = obs.now if count == 1 else hist.unreachable_since
    hist = replace(hist, unreachable=count, unreachable_since=since)
    slices = [obs.slices[k] for k in launcher.unreachable] or list(obs.slices)
    health = "; ".join(f"TPU {s.state}, {s.health_text()}" for s in slices)
    notes = [
        f"could not check the launcher on the workers (gcloud ssh exit status {launcher.ssh_rc},"
        f" {count} poll(s) in a row; {health}). gcloud said:\n{launcher.error}"
    ]
    if count == 1:
        notes.append(
            "if this persists, check ssh access from this machine: ssh-add"
            " ~/.ssh/google_compute_engine, OS Login roles, firewall rules for port 22,"
            " this machine's network"
        )
    quiet = int(obs.now - max(hist.last_step_changed, since))
    if hist.step_advanced:
        notes.append(
            f"checkpoints are still advancing (step {hist.last_step}): training runs;"
            " not touching the slice"
        )
    elif all(s.health == "HEALTHY" for s in slices):
        notes.append("the TPU API reports the slice HEALTHY: not recreating it for an ssh failure")
    elif any(s.health == "UNHEALTHY_MAINTENANCE" for s in slices):
        notes.append("the slice is under maintenance and resumes once rescheduled: waiting")
    elif obs.listing_failed:
        notes.append(
            "the checkpoints cannot be listed: not recreating the slice on unknown progress"
        )
    elif count < policy.unreachable_polls or quiet < policy.progress_timeout:
        notes.append(
            f"no new checkpoint for {quiet}s (newest step: {hist.last_step}); the slice is"
            f" recreated after {policy.unreachable_polls} unreachable polls and"
            f" {policy.progress_timeout:g}s without a new checkpoint"
        )
    else:
        why = f"READY but unreachable, {health}, no new checkpoint for {quiet}s"
        action, hist = _recreate(hist, policy, why)
        return replace(action, notes=tuple(notes) + action.notes), hist
    return Action(Kind.WAIT, notes=tuple(notes)), hist


def _decide_elastic(obs: Observation, hist: History, policy: Policy) -> tuple[Action, History]:
    """Each slice its own queued resource: train on what is ready, request the rest again."""
    count = len(obs.slices)
    active = tuple(range(count)) if hist.active is None else hist.active
    stuck = list(hist.stuck_since) or [-1.0] * count
    requeue: list[int] = []
    notes: list[str] = []
    for k, s in enumerate(obs.slices):
        if s.state == READY or (s.state == MISSING and s.queued in QUEUE_WAITING):
            stuck[k] = -1
        elif s.state in TRANSITIONAL or (s.state == MISSING and s.queued == QUEUE_ACTIVE):
            stuck[k], expired = _timer(stuck[k], obs.now)
            if expired:
                requeue.append(k)
                notes.append(f"slice {k} stuck in {s.state} for {TRANSITION_TIMEOUT}s")
        else:
            requeue.append(k)
            notes.append(f"slice {k} is {s.state}")
    hist = replace(
        hist, stuck_since=tuple(-1.0 if k in requeue else stuck[k] for k in range(count))
    )
    for k in requeue:
        give_up, hist, note = _count_restart(hist, policy, f"requesting slice {k} again")
        if give_up:
            return give_up, hist
        notes.append(note)
    ready = [k for k, s in enumerate(obs.slices) if s.state == READY]
    best = usable_slices(ready, policy)
    lost = [k for k in active if k not in ready]
    if lost or len(best) > len(active):
        why = _resize_reason(active, best, lost, bool(ready), policy)
        action = Action(Kind.RESIZE, reason=why, slices=best, requeue=tuple(requeue))
        return replace(action, notes=tuple(notes)), replace(hist, active=best)
    if requeue:
        action = Action(Kind.RESIZE, reason="", slices=active, requeue=tuple(requeue))
        return replace(action, notes=tuple(notes)), hist
    if not active:
        notes.append("no slice set that divides the global batch is ready: waiting for capacity")
        return Action(Kind.WAIT, notes=tuple(notes)), hist
    trained = replace(obs, slices=tuple(obs.slices[k] for k in active))
    return _decide_launcher(trained, hist, policy)


def _resize_reason(
    active: tuple[int, ...], best: tuple[int, ...], lost: list[int], any_ready: bool, policy: Policy
) -> str:
    batch = f"global batch {policy.global_batch}"
    if lost:
        cause = f"slice(s) {', '.join(map(str, lost))} lost"
    else:
        cause = "capacity returned"
    if not best:
        why = "no set of ready slices divides the " + batch if any_ready else "no slice is ready"
        return f"{cause}: {why}; training waits for capacity"
    return (
        f"{cause}: training on {len(best)} slice(s) {list(best)} instead of"
        f" {len(active)} ({batch}, {policy.devices_per_slice} devices per slice)"
    )
