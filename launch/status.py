"""The launcher's exit statuses: the one table that every supervisor reads.

The supervisors act on these numbers: `launch.local_cluster`, `tools/cluster/slurm_train.sbatch`,
`tools/cluster/tpu_pod.sh` and the GKE JobSet of `tools/cluster/gke_jobset.py`; the tests check
that their constants equal the values here.
"""

from __future__ import annotations

import enum


class ExitStatus(enum.IntEnum):
    FINISHED = 0  # the run is complete; process 0 wrote WORKDIR/FINISHED
    FAILED = 1  # anything unexpected: read the log; a rerun resumes from the last checkpoint
    BAD_INPUT = 2  # configuration, data, workdir or checkpoints unusable: retrying cannot help
    DIVERGED = 3  # too many non-finite steps in a row: retrying cannot help
    SAVE_FAILED = 4  # a checkpoint could not be written: fix the storage, then rerun
    STALLED = 5  # no progress (or no preemption save) in time; stacks logged; rerun resumes
    PREEMPTED = 75  # EX_TEMPFAIL: stopped at an agreed step with it saved; rerun resumes

    @property
    def retriable(self) -> bool:
        """Whether rerunning the same command can make progress without a human."""
        return self in (ExitStatus.PREEMPTED, ExitStatus.STALLED)


def describe(code: int) -> str:
    try:
        return f"{code} ({ExitStatus(code).name.lower()})"
    except ValueError:
        return f"{code} (killed by signal {code - 128})" if code > 128 else str(code)
