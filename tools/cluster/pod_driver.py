"""tpu_pod supervise: observes the unit with gcloud, asks `pod_supervisor.decide`, carries the
action out, and logs each transition with its reason and the time it took."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from launch.status import ExitStatus
from tools.cluster import pod_supervisor as ps
from tools.cluster.pod_gcloud import Failed, Pod, error_text
from tools.cluster.pod_options import Options, devices_per_slice, global_batch
from tools.cluster.remote_scripts import PROG


class GiveUp(Exception):
    """supervise gives up: exit 3."""


class Supervisor:
    """Observes the unit, asks `pod_supervisor.decide`, carries the action out."""

    def __init__(
        self,
        pod: Pod,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.pod = pod
        self.opts = pod.opts
        self.clock = clock
        self.sleep = sleep
        self.policy = policy_of(self.opts)
        self.history = ps.History()

    def run(self) -> int:
        opts, pod = self.opts, self.pod
        pod.log(f"supervising {describe_unit(opts)} until {opts.workdir}/FINISHED exists")
        # Without a readable workdir the FINISHED marker cannot be seen, and a finished run
        # would be started again and again: refuse to start.
        rc, _, err = pod.ls(f"{opts.workdir}/")
        if rc == 2:
            raise Failed(
                f"cannot list {opts.workdir}/ (supervise reads FINISHED and checkpoints/ there);"
                " check the bucket name, 'gcloud auth login' and your storage permissions,"
                f" then rerun. gcloud said: {_last_line(err)}"
            )
        if not opts.repo_url:
            pod.prepare_tarball()  # deploy the same code on every recreation
        while True:
            training = self.training()
            action, self.history = ps.decide(self.observe(), self.history, self.policy)
            for note in action.notes:
                pod.log(note)
            if action.kind is ps.Kind.FINISH:
                return self.finish()
            self.act(action, training)
            if opts.dry_run:
                pod.log("dry run: stopping after one supervise iteration")
                return ExitStatus.FINISHED
            if action.kind is ps.Kind.BACKOFF:
                self.sleep(action.delay)
            elif action.kind is not ps.Kind.RECHECK:
                self.sleep(self.policy.poll_seconds)

    def observe(self) -> ps.Observation:
        """One poll: FINISHED, every node, the queued resources, the launcher, the checkpoints.
        The first gcloud error (other than NOT_FOUND) ends the poll."""
        pod, now = self.pod, self.clock()
        rc, err = pod.finished()
        if rc != 1:
            failed = f"reading {self.opts.workdir}/FINISHED" if rc == 2 else ""
            return ps.Observation(now, finished=rc == 0, failed_call=failed, error=error_text(err))
        slices = []
        for node in self.opts.nodes():
            rc, node_state, err = pod.describe(node)
            if rc == 2:
                return ps.Observation(
                    now, failed_call=f"describing TPU {node}", error=error_text(err)
                )
            slices.append(node_state)
        if self.opts.queued and not self.opts.dry_run and any(s.state != ps.READY for s in slices):
            read = self.read_queued(slices)
            if isinstance(read, ps.Observation):
                return dataclasses.replace(read, now=now)
            slices = read
        return self.observe_launcher(now, tuple(slices))

    def read_queued(self, slices: list[ps.Slice]) -> list[ps.Slice] | ps.Observation:
        resources = self.opts.queued_resources()
        states = []
        for resource in resources:
            rc, state, err = self.pod.queued_state(resource)
            if rc == 2:
                return ps.Observation(
                    0, failed_call=f"describing queued resource {resource}", error=error_text(err)
                )
            states.append(state)
        if len(resources) == 1:
            states *= len(slices)
        return [dataclasses.replace(s, queued=q) for s, q in zip(slices, states)]

    def observe_launcher(self, now: float, slices: tuple[ps.Slice, ...]) -> ps.Observation:
        pod = self.pod
        training = self.training()
        obs = ps.Observation(now, slices=slices)
        if training and all(slices[k].state == ps.READY for k in training):
            launcher = pod.check(training)
            obs = dataclasses.replace(obs, launcher=launcher)
            if launcher.kind == "running":
                return obs
            if launcher.kind not in ("fatal", "unreachable"):
                rc, err = pod.finished()  # the run may have finished since the first look
                if rc == 2:
                    failed = f"reading {self.opts.workdir}/FINISHED"
                    return ps.Observation(now, failed_call=failed, error=error_text(err))
                obs = dataclasses.replace(obs, finished_after_check=rc == 0)
        # Something is wrong: the newest checkpoint tells progress and where training resumes.
        step, err = pod.newest_checkpoint()
        if step is None:
            pod.log(f"could not list {self.opts.workdir}/checkpoints/:\n{error_text(err)}")
        return dataclasses.replace(obs, newest_step=step, listing_failed=step is None)

    def training(self) -> tuple[int, ...]:
        """The slices the launcher runs on: all of them, unless --elastic shrank the unit."""
        active = self.history.active
        return tuple(range(self.opts.slice_count)) if active is None else active

    def act(self, action: ps.Action, training: tuple[int, ...]) -> None:
        """Carries out `action`; `training` is what ran before. A failed step is logged and
        the next poll decides again."""
        handlers: dict[ps.Kind, Callable[[ps.Action, tuple[int, ...]], None]] = {
            ps.Kind.RECREATE: self.recreate,
            ps.Kind.RELAUNCH: self.relaunch,
            ps.Kind.RESIZE: self.resize,
            ps.Kind.GIVE_UP: self.give_up,
        }
        handler = handlers.get(action.kind)
        if handler is None:
            return
        started = self.clock()
        try:
            if action.logs:
                self.pod.collect_logs(action.logs, training)
            handler(action, training)
        except Failed as e:
            self.pod.log(f"{e}; retrying after the next poll")
            return
        if action.kind is not ps.Kind.RESIZE or action.reason:
            took = self.clock() - started
            self.pod.log(f"{action.kind.value} done in {took:.0f}s{self.resume_text()}")

    def resume_text(self) -> str:
        step = self.history.last_step
        return f"; training resumes from checkpoint step {step}" if step >= 0 else ""

    def recreate(self, action: ps.Action, training: tuple[int, ...]) -> None:
        pod, opts = self.pod, self.opts
        if opts.elastic:  # requested again one by one; training starts when they are ready
            for k in range(opts.slice_count):
                self.requeue(k)
            return
        if action.delete_first or opts.dry_run:
            pod.delete()
        pod.create()
        if opts.queued:
            pod.log(f"waiting for queued resource {opts.name} to become ACTIVE")
            pod.wait_active(opts.queued_resources(), self.policy.poll_seconds, self.sleep)
        pod.setup()
        pod.train()

    def relaunch(self, action: ps.Action, training: tuple[int, ...]) -> None:
        """Starts the launcher again after stopping leftovers; installs first if train fails."""
        pod = self.pod
        try:
            pod.stop(training)
        except Failed as e:
            pod.log(str(e))
        try:
            pod.train(training)
        except Failed:
            pod.log("train failed; running setup and trying again")
            pod.setup(training)
            pod.train(training)

    def requeue(self, k: int) -> None:
        """--elastic: deletes what is left of slice k's queued resource and requests it again."""
        node = self.opts.nodes()[k]
        rc, _, _ = self.pod.queued_state(node)
        if rc != 1:
            self.pod.delete([node])
        self.pod.create_slice(k)

    def resize(self, action: ps.Action, training: tuple[int, ...]) -> None:
        """--elastic: requests lost slices again, then trains on `action.slices`: the slices
        that trained before are stopped (they checkpoint), the joining ones are set up."""
        pod = self.pod
        for k in action.requeue:
            self.requeue(k)
        if not action.reason:
            return
        pod.log(f"resizing: {action.reason}")
        staying = [k for k in training if k in action.slices]
        if staying:
            try:
                pod.stop(staying)
            except Failed as e:
                pod.log(str(e))
        if action.slices:
            joining = [k for k in action.slices if k not in training]
            if joining:
                pod.setup(joining)
            pod.train(action.slices)

    def give_up(self, action: ps.Action, training: tuple[int, ...]) -> None:
        pod = self.pod
        logs = f"; logs in {pod.last_logs}" if pod.last_logs else ""
        pod.log(f"giving up: {action.reason}{logs}")
        raise GiveUp(action.reason)

    def finish(self) -> int:
        pod, opts = self.pod, self.opts
        pod.log(f"run finished: {opts.workdir}/FINISHED exists")
        if opts.delete_when_finished:
            pod.delete()
        else:
            pod.log(f"the TPU still exists and is billed; run '{delete_command(opts)}' when done")
        return ExitStatus.FINISHED


def describe_unit(opts: Options) -> str:
    kind = ("spot" if opts.spot else "on-demand") + (", queued" if opts.queued else "")
    if opts.slice_count > 1:
        kind += f", {opts.slice_count} slices {' '.join(opts.nodes())}"
        kind += ", elastic" if opts.elastic else ""
    return f"TPU {opts.name} ({opts.accelerator}, {kind})"


def policy_of(opts: Options) -> ps.Policy:
    return ps.Policy(
        slices=opts.slice_count,
        queued=opts.queued,
        elastic=opts.elastic,
        global_batch=global_batch(opts),
        devices_per_slice=devices_per_slice(opts.accelerator) or 1,
        poll_seconds=opts.number("poll_seconds"),
        max_backoff=opts.number("max_backoff"),
        max_restarts=opts.number("max_restarts"),
        max_failures=opts.number("max_failures"),
        unreachable_polls=opts.number("unreachable_polls"),
        progress_timeout=opts.number("progress_timeout"),
    )


def _last_line(err: str) -> str:
    lines = [line.strip() for line in err.splitlines() if line.strip()]
    return lines[-1] if lines else "(nothing)"


def delete_command(opts: Options) -> str:
    words = [f"tools/cluster/{PROG}", "delete", f"--name={opts.name}", f"--zone={opts.zone}"]
    words += [f"--project={opts.project}"] if opts.project else []
    words += [f"--slices={opts.slices}"] if opts.slice_count > 1 else []
    words += ["--elastic"] if opts.elastic else []
    words += ["--queued"] if opts.queued and opts.slice_count == 1 else []
    return " ".join(words)


def after_give_up(pod: Pod) -> None:
    opts = pod.opts
    if opts.delete_on_give_up:
        pod.log(f"deleting the TPU {opts.name} (--delete-on-give-up)")
        try:
            pod.delete()
        except Failed:
            pod.log(
                f"deleting {opts.name} failed: it still exists and is billed; run '{PROG} delete'"
            )
    else:
        pod.log(
            f"the TPU {opts.name} is NOT deleted: it still exists and is billed until you run"
            f" '{delete_command(opts)}' (or pass --delete-on-give-up)"
        )
