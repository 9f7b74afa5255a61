"""The text of `tpu_pod help`."""

from tools.cluster.remote_scripts import UV_VERSION

USAGE = """\
Usage: tools/cluster/tpu_pod.sh SUBCOMMAND [options] [-- LAUNCHER_ARGS...]

Manage a Cloud TPU VM pod slice, or several slices as one multislice unit
(--slices=N), that runs this project's multi-host launcher (python -m
launch.main) on every worker.

Subcommands:
  create     Create the TPU VM slice (on-demand by default; --spot; --queued).
  setup      Copy this repo to every worker (git archive of --ref, default HEAD;
             or --repo-url to git clone there) and pip install '.[tpu]' into
             ~/resnet-venv (Python >= 3.11; uses uv {uv} to get one if the
             image lacks it).
  train      Start the launcher on all workers at once, in the background
             (nohup), logging to ~/resnet-train.log on each worker.
  status     Print the TPU state and health (and queued-resource state / run status).
  logs       Follow the launcher log of one worker (default: worker 0); with
             --all-workers, save the end of every worker's log under --logs-dir.
  stop       Send SIGTERM to the launcher on all workers (it checkpoints and
             exits 75) and wait for it to exit (SIGKILL after --stop-timeout).
  delete     Delete the TPU (with --queued: the queued resource and its TPU;
             with --slices: every slice of the unit).
             Billing stops only when the TPU is deleted.
  supervise  Loop until WORKDIR/FINISHED exists: recreate the slice when it is
             preempted/missing/failed (delete, create, setup, train), restart the
             launcher when it stopped; then exit 0. See docs/operations.md.
  help       Show this help.

Options (defaults from the environment variables in brackets):
  --name NAME               TPU name [TPU_NAME]                 (all subcommands)
  --zone ZONE               zone, e.g. us-central2-b [TPU_ZONE] (all subcommands)
  --project PROJECT         GCP project [TPU_PROJECT]; default: gcloud config
  --accelerator-type TYPE   e.g. v4-32, v5litepod-16, v5p-32, v6e-16
                            [TPU_ACCELERATOR_TYPE]           (create, supervise)
  --runtime-version VER     TPU software version [TPU_RUNTIME_VERSION]; default
                            by type: v4 and older tpu-ubuntu2204-base, v5e
                            v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e
                            v2-alpha-tpuv6e
  --spot                    Spot capacity (cheaper, can be preempted any time)
                            [TPU_SPOT=1]
  --queued                  Use a queued resource (gcloud compute tpus
                            queued-resources, --node-id=NAME); waits in a queue
                            until capacity is available [TPU_QUEUED=1]
  --service-account EMAIL   service account of the TPU VMs (default: the
                            Compute Engine default service account)
  --create-arg ARG          extra flag for the create call, repeatable, e.g.
                            --create-arg=--network=my-net
  --wait                    create: wait until the TPU is READY (queued)
  --slices N                N slices as one unit [TPU_SLICES] (default 1): one
                            queued resource NAME with --node-count=N, nodes
                            PREFIX-0 ... PREFIX-(N-1); each host gets
                            MEGASCALE_NUM_SLICES, MEGASCALE_SLICE_ID and
                            MEGASCALE_COORDINATOR_ADDRESS (implies --queued)
  --node-prefix PREFIX      node names of a unit (default: NAME)
  --elastic                 supervise --slices=N: one queued resource per slice
                            (PREFIX-k); when slices are lost, train at once on
                            the most ready slices whose devices divide the global
                            batch, request the lost ones again, and grow back
                            when they are ready
  --global-batch N          --elastic: the run's global batch (default: from
                            -- --config.train.global_batch_size=N)
  --repo-url URL            setup: git clone URL on the workers instead of
                            copying a git archive of this checkout [TPU_REPO_URL];
                            credentials in it (https://user:TOKEN@host/...) are
                            copied to the workers in a file, never printed
  --ref REF                 setup: commit/branch/tag to deploy (default: HEAD
                            for git archive, the default branch for --repo-url)
  --tarball FILE            setup: copy this .tar.gz (repo files at the top
                            level) instead of running git archive
  --python-version VER      setup: Python installed with uv when the image has
                            no Python >= 3.11 (default 3.12)
  --workdir gs://BUCKET/DIR run directory (checkpoints, TensorBoard, FINISHED)
                            [TPU_WORKDIR]                    (train, supervise)
  --config PATH             launcher config [TPU_CONFIG]
                            (default configs/resnet50_imagenet.py)
  --env KEY=VALUE           environment variable for the launcher on every
                            worker, repeatable (train, supervise), e.g.
                            --env=JAX_COMPILATION_CACHE_DIR=gs://my-bucket/xla-cache
  --worker N                logs: worker whose log to follow (default 0)
  --slice K                 logs: slice of the unit whose worker to follow
                            (default 0)
  --all-workers             logs: save the last --log-lines lines of every
                            worker's log to --logs-dir/NAME-TIME-logs/worker-N.log
  --logs-dir DIR            where logs --all-workers and supervise save logs
                            (default tpu-logs)
  --log-lines N             lines of each worker's log to save (default 5000)
  --stop-timeout SECONDS    stop: wait this long before SIGKILL (default 300)
  --ssh-timeout SECONDS     limit for one ssh command (check, train, logs;
                            stop adds --stop-timeout) (default 300)
  --setup-timeout SECONDS   limit for the setup ssh and each scp (default 3600)
  --poll-seconds N          supervise: seconds between checks (default 60)
  --max-restarts N          supervise: give up (exit 3) after N recreations or
                            launcher restarts (default 100); errors of gcloud
                            itself (permissions, credentials, network) do not count
  --max-failures N          supervise: give up (exit 3) when the launcher has
                            failed (exit status not 0/75/5) more than N times
                            in a row without a new checkpoint in between
                            (default 3); exit status 2 (bad input) or 3
                            (diverged) gives up at once
  --unreachable-polls N     supervise: a READY slice whose workers cannot be
                            reached by ssh is recreated only after N polls in a
                            row (default 10), only if the TPU API does not call
                            it HEALTHY, and only if no new checkpoint appeared
                            for --progress-timeout
  --progress-timeout SECONDS  supervise: see --unreachable-polls (default 3600)
  --max-backoff SECONDS     supervise: longest wait between retries of a failed
                            gcloud call (default 1800)
  --delete-when-finished    supervise: delete the TPU once the run finished
  --delete-on-give-up       supervise: delete the TPU when giving up (exit 3);
                            without it the slice is kept, and billed
  --dry-run                 print every command (prefixed '+ ') and run nothing
  -h, --help                show this help
  -- LAUNCHER_ARGS...       passed to the launcher (train, supervise), e.g.
                            -- --config.train.num_epochs=1

Needs on this machine: gcloud, python3 (3.8 or newer; standard library only), and
git for the default setup. Multi-worker ssh needs your key in an agent:
ssh-add ~/.ssh/google_compute_engine

Examples:
  export TPU_NAME=resnet-v4-32 TPU_ZONE=us-central2-b TPU_PROJECT=my-project
  tools/cluster/tpu_pod.sh create --accelerator-type=v4-32 --spot
  tools/cluster/tpu_pod.sh setup
  tools/cluster/tpu_pod.sh train --workdir=gs://my-bucket/resnet50 -- --config.train.num_epochs=90
  tools/cluster/tpu_pod.sh logs
  tools/cluster/tpu_pod.sh logs --all-workers --logs-dir=/tmp/tpu-logs
  tools/cluster/tpu_pod.sh stop && tools/cluster/tpu_pod.sh delete
  tools/cluster/tpu_pod.sh supervise --accelerator-type=v4-32 --spot \\
      --workdir=gs://my-bucket/resnet50 \\
      --env=JAX_COMPILATION_CACHE_DIR=gs://my-bucket/xla-cache \\
      -- --config.train.num_epochs=90
  tools/cluster/tpu_pod.sh supervise --slices=2 --elastic \\
      --accelerator-type=v5litepod-16 --spot --workdir=gs://my-bucket/resnet50

Exit status: 0 success; 1 a command failed; 2 usage error; 3 supervise gave
up (--max-restarts / --max-failures / launcher exit 2 or 3); 127 gcloud not
found on PATH.
The launcher itself exits 0 when finished, 75 when preempted and 5 when stalled
(rerun the same command to resume), 2 on bad input, 3 when training diverged,
anything else on failure.
""".replace("{uv}", UV_VERSION)
