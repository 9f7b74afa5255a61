#!/usr/bin/env bash
# tpu_pod.sh: create a Cloud TPU VM pod slice, install this project on every
# worker, run the multi-host launcher, and keep it running through preemptions.
# Run `tools/tpu_pod.sh help` for usage. Only `gcloud` (Google Cloud CLI) is
# needed locally, plus `git` for the default `setup` path.
set -euo pipefail

PROG=tpu_pod.sh
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# Fixed locations on each TPU worker (relative to the login user's $HOME).
REMOTE_SRC_DIR=resnet-multihost
REMOTE_VENV=resnet-venv
REMOTE_LOG=resnet-train.log
REMOTE_EXITCODE=resnet-train.exitcode
REMOTE_TARBALL=resnet-src.tar.gz
# Matches the launcher process (`python -m launch.main ...`) but not the shells
# that start, check or stop it (their command lines start with `bash`).
LAUNCHER_PATTERN='^[^ ]*python[^ ]* -m launch[.]main( |$)'

# Exit codes of the remote status check (see remote_check_script).
CHECK_RUNNING=0
CHECK_EXITED_OK=10
CHECK_PREEMPTED=11
CHECK_NOT_STARTED=12
CHECK_FAILED=13
CHECK_BAD_CONFIG=14

usage() {
  cat <<EOF
Usage: tools/$PROG SUBCOMMAND [options] [-- LAUNCHER_ARGS...]

Manage a Cloud TPU VM pod slice that runs this project's multi-host launcher
(python -m launch.main) on every worker.

Subcommands:
  create     Create the TPU VM slice (on-demand by default; --spot; --queued).
  setup      Copy this repo to every worker (git archive of --ref, default HEAD;
             or --repo-url to git clone there) and pip install '.[tpu]' into
             ~/$REMOTE_VENV (Python >= 3.11; uses uv to get one if the image lacks it).
  train      Start the launcher on all workers at once, in the background
             (nohup), logging to ~/$REMOTE_LOG on each worker.
  status     Print the TPU state (and queued-resource state / run status).
  logs       Follow the launcher log of one worker (default: worker 0).
  stop       Send SIGTERM to the launcher on all workers (it checkpoints and
             exits 75) and wait for it to exit (SIGKILL after --stop-timeout).
  delete     Delete the TPU (with --queued: the queued resource and its TPU).
             Billing stops only when the TPU is deleted.
  supervise  Loop until WORKDIR/FINISHED exists: recreate the slice when it is
             preempted/missing/failed (delete, create, setup, train), restart the
             launcher when it is not running; then exit 0.
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
  --repo-url URL            setup: git clone URL on the workers instead of
                            copying a git archive of this checkout [TPU_REPO_URL]
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
  --worker N                logs: worker whose log to follow (default 0)
  --stop-timeout SECONDS    stop: wait this long before SIGKILL (default 300)
  --poll-seconds N          supervise: seconds between checks (default 60)
  --max-restarts N          supervise: give up (exit 3) after N recreations or
                            launcher restarts (default 100)
  --max-failures N          supervise: give up (exit 3) when the launcher has
                            failed (exit status not 0/75) more than N times
                            (default 3); exit status 2 (bad configuration)
                            gives up at once
  --delete-when-finished    supervise: delete the TPU once the run finished
  --dry-run                 print every command (prefixed '+ ') and run nothing
  -h, --help                show this help
  -- LAUNCHER_ARGS...       passed to the launcher (train, supervise), e.g.
                            -- --config.train.num_epochs=1

Examples:
  export TPU_NAME=resnet-v4-32 TPU_ZONE=us-central2-b TPU_PROJECT=my-project
  tools/$PROG create --accelerator-type=v4-32 --spot
  tools/$PROG setup
  tools/$PROG train --workdir=gs://my-bucket/resnet50 -- --config.train.num_epochs=90
  tools/$PROG logs
  tools/$PROG stop && tools/$PROG delete
  tools/$PROG supervise --accelerator-type=v4-32 --spot \\
      --workdir=gs://my-bucket/resnet50 -- --config.train.num_epochs=90

Exit status: 0 success; 1 a command failed; 2 usage error; 3 supervise gave
up (--max-restarts / --max-failures); 127 gcloud not found on PATH.
The launcher itself exits 0 when finished, 75 when preempted (rerun the same
command to resume), anything else on failure.
EOF
}

# ------------------------------------------------------------------ helpers --

info() { printf '%s %s: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$PROG" "$*" >&2; }
die() {
  echo "$PROG: error: $*" >&2
  exit 1
}
usage_error() {
  echo "$PROG: error: $*" >&2
  echo "Run 'tools/$PROG help' for usage." >&2
  exit 2
}
is_true() {
  case "$1" in
    1 | true | TRUE | True | yes | YES | on | ON) return 0 ;;
    *) return 1 ;;
  esac
}

# In --dry-run mode commands are printed on the original stdout (fd 3), also
# from inside command substitutions. Commands run with fd 3 closed so that
# background processes (ssh) do not keep a pipe on our stdout open.
exec 3>&1
show_cmd() {
  local s
  s=$(printf ' %q' "$@")
  printf '+%s\n' "$s"
}
# run CMD...: print the command (stderr), then run it; in dry-run only print it.
run() {
  if ((DRY_RUN)); then
    show_cmd "$@" >&3
    return 0
  fi
  show_cmd "$@" >&2
  "$@" 3>&-
}
# Like run, but silent when really running (for frequent polling calls).
run_quiet() {
  if ((DRY_RUN)); then
    show_cmd "$@" >&3
    return 0
  fi
  "$@" 3>&-
}
gc() { run gcloud "$@"; }

TMP_DIR=""
cleanup() {
  if [[ -n $TMP_DIR ]]; then rm -rf "$TMP_DIR"; fi
}
trap cleanup EXIT

# ------------------------------------------------------------------ options --

SUBCOMMAND=""
NAME=${TPU_NAME:-}
ZONE=${TPU_ZONE:-}
PROJECT=${TPU_PROJECT:-}
ACCEL=${TPU_ACCELERATOR_TYPE:-}
RUNTIME=${TPU_RUNTIME_VERSION:-}
SPOT=0
if is_true "${TPU_SPOT:-0}"; then SPOT=1; fi
QUEUED=0
if is_true "${TPU_QUEUED:-0}"; then QUEUED=1; fi
SERVICE_ACCOUNT=""
CREATE_ARGS=()
WAIT=0
REPO_URL=${TPU_REPO_URL:-}
REF=""
TARBALL=""
PYTHON_VERSION=3.12
WORKDIR=${TPU_WORKDIR:-}
CONFIG=${TPU_CONFIG:-configs/resnet50_imagenet.py}
WORKER=0
STOP_TIMEOUT=300
POLL_SECONDS=60
MAX_RESTARTS=100
MAX_FAILURES=3
DELETE_WHEN_FINISHED=0
DRY_RUN=0
SHOW_HELP=0
LAUNCHER_ARGS=()

while (($# > 0)); do
  arg=$1
  shift
  if [[ $arg == -- ]]; then
    LAUNCHER_ARGS=("$@")
    break
  fi
  opt=$arg
  inline=0
  val=""
  if [[ $arg == --*=* ]]; then
    opt=${arg%%=*}
    val=${arg#*=}
    inline=1
  fi
  case $opt in
    --name | --zone | --project | --accelerator-type | --runtime-version | \
      --service-account | --create-arg | --repo-url | --ref | --tarball | \
      --python-version | --workdir | --config | --worker | --stop-timeout | \
      --poll-seconds | --max-restarts | --max-failures)
      if ((!inline)); then
        (($# > 0)) || usage_error "option $opt needs a value"
        val=$1
        shift
      fi
      case $opt in
        --name) NAME=$val ;;
        --zone) ZONE=$val ;;
        --project) PROJECT=$val ;;
        --accelerator-type) ACCEL=$val ;;
        --runtime-version) RUNTIME=$val ;;
        --service-account) SERVICE_ACCOUNT=$val ;;
        --create-arg) CREATE_ARGS+=("$val") ;;
        --repo-url) REPO_URL=$val ;;
        --ref) REF=$val ;;
        --tarball) TARBALL=$val ;;
        --python-version) PYTHON_VERSION=$val ;;
        --workdir) WORKDIR=$val ;;
        --config) CONFIG=$val ;;
        --worker) WORKER=$val ;;
        --stop-timeout) STOP_TIMEOUT=$val ;;
        --poll-seconds) POLL_SECONDS=$val ;;
        --max-restarts) MAX_RESTARTS=$val ;;
        --max-failures) MAX_FAILURES=$val ;;
      esac
      ;;
    --spot | --queued | --wait | --delete-when-finished | --dry-run | --help | -h)
      ((!inline)) || usage_error "option $opt takes no value"
      case $opt in
        --spot) SPOT=1 ;;
        --queued) QUEUED=1 ;;
        --wait) WAIT=1 ;;
        --delete-when-finished) DELETE_WHEN_FINISHED=1 ;;
        --dry-run) DRY_RUN=1 ;;
        --help | -h) SHOW_HELP=1 ;;
      esac
      ;;
    -*) usage_error "unknown option: $arg (launcher arguments go after --)" ;;
    *)
      if [[ -z $SUBCOMMAND ]]; then
        SUBCOMMAND=$arg
      else
        usage_error "unexpected argument: $arg (launcher arguments go after --)"
      fi
      ;;
  esac
done

if ((SHOW_HELP)) || [[ $SUBCOMMAND == help ]]; then
  usage
  exit 0
fi
if [[ -z $SUBCOMMAND ]]; then
  echo "Usage: tools/$PROG SUBCOMMAND [options] [-- LAUNCHER_ARGS...]" >&2
  usage_error "no subcommand given"
fi
case $SUBCOMMAND in
  create | setup | train | status | logs | stop | delete | supervise) ;;
  *) usage_error "unknown subcommand: '$SUBCOMMAND' (expected create, setup, train, status, logs, stop, delete, supervise or help)" ;;
esac

require() { # require VALUE FLAG ENVVAR
  if [[ -z $1 ]]; then
    if [[ -n ${3:-} ]]; then
      usage_error "'$SUBCOMMAND' needs $2 (or set $3)"
    else
      usage_error "'$SUBCOMMAND' needs $2"
    fi
  fi
}
require_uint() { # require_uint VALUE FLAG
  [[ $1 =~ ^[0-9]+$ ]] || usage_error "$2 must be a non-negative integer, got '$1'"
}
default_runtime() {
  case $1 in
    v6e-* | v6e) echo v2-alpha-tpuv6e ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    *) echo "" ;;
  esac
}

require "$NAME" --name TPU_NAME
require "$ZONE" --zone TPU_ZONE
case $SUBCOMMAND in
  create | supervise)
    require "$ACCEL" --accelerator-type TPU_ACCELERATOR_TYPE
    if [[ -z $RUNTIME ]]; then
      RUNTIME=$(default_runtime "$ACCEL")
      [[ -n $RUNTIME ]] || usage_error "no default runtime version for accelerator type '$ACCEL'; pass --runtime-version"
    fi
    ;;
esac
case $SUBCOMMAND in
  train | supervise)
    require "$WORKDIR" --workdir TPU_WORKDIR
    [[ $WORKDIR == gs://?* ]] || usage_error "--workdir must be a gs://BUCKET/PATH URL that all TPU workers share, got '$WORKDIR'"
    WORKDIR=${WORKDIR%/}
    require "$CONFIG" --config TPU_CONFIG
    ;;
esac
if [[ $SUBCOMMAND == setup || $SUBCOMMAND == supervise ]]; then
  if [[ -n $TARBALL && -n $REPO_URL ]]; then usage_error "use only one of --tarball and --repo-url"; fi
  if [[ -n $TARBALL && ! -f $TARBALL ]]; then usage_error "--tarball: no such file: $TARBALL"; fi
  [[ $PYTHON_VERSION =~ ^3\.[0-9]+$ ]] || usage_error "--python-version must look like 3.12, got '$PYTHON_VERSION'"
fi
[[ $WORKER == all || $WORKER =~ ^[0-9]+$ ]] || usage_error "--worker must be a worker number or 'all', got '$WORKER'"
require_uint "$STOP_TIMEOUT" --stop-timeout
require_uint "$POLL_SECONDS" --poll-seconds
require_uint "$MAX_RESTARTS" --max-restarts
require_uint "$MAX_FAILURES" --max-failures

if ((!DRY_RUN)) && ! command -v gcloud >/dev/null 2>&1; then
  echo "$PROG: error: gcloud not found on PATH; install the Google Cloud CLI" \
    "(https://cloud.google.com/sdk/docs/install) and run 'gcloud auth login'" >&2
  exit 127
fi

GFLAGS=(--zone="$ZONE")
if [[ -n $PROJECT ]]; then GFLAGS+=(--project="$PROJECT"); fi

# ---------------------------------------------------------- remote scripts --
# Each script is run by the login shell (bash) of every worker through
# `gcloud compute tpus tpu-vm ssh --command`. The first line names it.

remote_setup_script() {
  local fetch
  if [[ -n $REPO_URL ]]; then
    fetch="git clone --quiet $(printf '%q' "$REPO_URL") \"\$src.new\""
    if [[ -n $REF ]]; then
      fetch+=$'\n'"git -C \"\$src.new\" checkout --quiet $(printf '%q' "$REF")"
    fi
  else
    fetch="mkdir -p \"\$src.new\"
tar -xzf $REMOTE_TARBALL -C \"\$src.new\"
rm -f $REMOTE_TARBALL"
  fi
  cat <<EOF
# $PROG:setup
set -euo pipefail
cd "\$HOME"
src=$REMOTE_SRC_DIR
venv=\$HOME/$REMOTE_VENV
rm -rf "\$src.new"
$fetch
rm -rf "\$src"
mv "\$src.new" "\$src"
if ! { [ -x "\$venv/bin/python" ] && "\$venv/bin/python" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; }; then
  rm -rf "\$venv"
  made=0
  for py in python3.13 python3.12 python3.11 python3; do
    if command -v "\$py" >/dev/null 2>&1 && "\$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      if "\$py" -m venv "\$venv" >/dev/null 2>&1; then made=1; break; fi
      rm -rf "\$venv"
    fi
  done
  if [ "\$made" = 0 ]; then
    echo "\$(hostname): no usable Python >= 3.11; installing Python $PYTHON_VERSION with uv"
    if ! command -v uv >/dev/null 2>&1 && [ ! -x "\$HOME/.local/bin/uv" ]; then
      curl -LsSf https://astral.sh/uv/install.sh | sh
    fi
    uv=\$(command -v uv || echo "\$HOME/.local/bin/uv")
    "\$uv" venv --seed --python $PYTHON_VERSION "\$venv"
  fi
fi
cd "\$src"
"\$venv/bin/python" -m pip install --quiet --upgrade pip
"\$venv/bin/python" -m pip install ".[tpu]"
echo "\$(hostname): setup done (\$("\$venv/bin/python" -c 'import jax; print("jax", jax.__version__)'))"
EOF
}

remote_train_script() {
  local qargs
  qargs=$(printf ' %q' "--config=$CONFIG" "--workdir=$WORKDIR" ${LAUNCHER_ARGS[@]+"${LAUNCHER_ARGS[@]}"})
  cat <<EOF
# $PROG:train
cd "\$HOME/$REMOTE_SRC_DIR" 2>/dev/null || { echo "\$(hostname): ~/$REMOTE_SRC_DIR not found; run '$PROG setup' first" >&2; exit 1; }
[ -f "\$HOME/$REMOTE_VENV/bin/activate" ] || { echo "\$(hostname): ~/$REMOTE_VENV not found; run '$PROG setup' first" >&2; exit 1; }
if pgrep -f '$LAUNCHER_PATTERN' >/dev/null; then echo "\$(hostname): the launcher is already running; use '$PROG stop' first" >&2; exit 1; fi
. "\$HOME/$REMOTE_VENV/bin/activate"
rm -f "\$HOME/$REMOTE_EXITCODE"
rm -f /tmp/libtpu_lockfile 2>/dev/null || true
{ printf '=== %s %s: python -m launch.main' "\$(date -u +%Y-%m-%dT%H:%M:%SZ)" "\$(hostname)"; printf ' %s'$qargs; echo; } >> "\$HOME/$REMOTE_LOG"
PYTHONUNBUFFERED=1 nohup bash -c 'python -m launch.main "\$@" < /dev/null; echo \$? > "\$HOME/$REMOTE_EXITCODE"' resnet-train$qargs >> "\$HOME/$REMOTE_LOG" 2>&1 < /dev/null &
echo "\$(hostname): launcher started, logging to ~/$REMOTE_LOG"
EOF
}

remote_check_script() {
  cat <<EOF
# $PROG:check
if pgrep -f '$LAUNCHER_PATTERN' >/dev/null; then exit $CHECK_RUNNING; fi
code=\$(cat "\$HOME/$REMOTE_EXITCODE" 2>/dev/null || echo none)
echo "\$(hostname): launcher not running (last exit status: \$code)"
case "\$code" in
  0) exit $CHECK_EXITED_OK ;;
  75) exit $CHECK_PREEMPTED ;;
  2) exit $CHECK_BAD_CONFIG ;;
  none) exit $CHECK_NOT_STARTED ;;
  *) exit $CHECK_FAILED ;;
esac
EOF
}

remote_stop_script() {
  cat <<EOF
# $PROG:stop
pat='$LAUNCHER_PATTERN'
if ! pgrep -f "\$pat" >/dev/null; then echo "\$(hostname): launcher not running"; exit 0; fi
pkill -TERM -f "\$pat" || true
echo "\$(hostname): sent SIGTERM; waiting up to ${STOP_TIMEOUT}s for the checkpoint"
i=0
while pgrep -f "\$pat" >/dev/null; do
  if [ "\$i" -ge $STOP_TIMEOUT ]; then
    echo "\$(hostname): still running after ${STOP_TIMEOUT}s; sending SIGKILL" >&2
    pkill -KILL -f "\$pat" || true
    exit 1
  fi
  sleep 1
  i=\$((i + 1))
done
echo "\$(hostname): launcher stopped"
EOF
}

ssh_workers() { # ssh_workers WORKER SCRIPT
  gc compute tpus tpu-vm ssh "$NAME" "${GFLAGS[@]}" --worker="$1" --command="$2"
}

# ------------------------------------------------------------------ actions --

describe_state() { # KIND FIELD: prints a resource's state, or MISSING when describe fails
  local kind=$1 field=$2 out
  if ((DRY_RUN)); then
    show_cmd gcloud compute tpus "$kind" describe "$NAME" "${GFLAGS[@]}" --format="value($field)" >&3
    echo DRY_RUN
    return 0
  fi
  if out=$(gcloud compute tpus "$kind" describe "$NAME" "${GFLAGS[@]}" --format="value($field)" 2>/dev/null 3>&-); then
    out=${out//[[:space:]]/}
    echo "${out:-UNKNOWN}"
  else
    echo MISSING
  fi
}

tpu_state() { describe_state tpu-vm state; }             # the TPU VM's state
qr_state() { describe_state queued-resources state.state; } # the queued resource's state

run_finished() { # true when WORKDIR/FINISHED exists
  [[ -n $WORKDIR ]] || return 1
  if ((DRY_RUN)); then
    run_quiet gcloud storage ls "$WORKDIR/FINISHED"
    return 1
  fi
  gcloud storage ls "$WORKDIR/FINISHED" >/dev/null 2>&1 3>&-
}

do_create() {
  local args
  if ((QUEUED)); then
    args=(compute tpus queued-resources create "$NAME" --node-id="$NAME" "${GFLAGS[@]}"
      --accelerator-type="$ACCEL" --runtime-version="$RUNTIME")
  else
    args=(compute tpus tpu-vm create "$NAME" "${GFLAGS[@]}"
      --accelerator-type="$ACCEL" --version="$RUNTIME")
  fi
  if ((SPOT)); then args+=(--spot); fi
  if [[ -n $SERVICE_ACCOUNT ]]; then args+=(--service-account="$SERVICE_ACCOUNT"); fi
  args+=(${CREATE_ARGS[@]+"${CREATE_ARGS[@]}"})
  gc "${args[@]}"
}

# Waits until a queued resource is ACTIVE (its TPU exists); fails if the
# request failed or was suspended/deleted.
wait_queued_active() {
  local qs last=""
  while :; do
    qs=$(qr_state)
    if ((DRY_RUN)); then return 0; fi
    if [[ $qs != "$last" ]]; then
      info "queued resource $NAME: $qs"
      last=$qs
    fi
    case $qs in
      ACTIVE) return 0 ;;
      FAILED | SUSPENDING | SUSPENDED | DELETING | MISSING) return 1 ;;
    esac
    sleep "$POLL_SECONDS"
  done
}

prepare_tarball() {
  TARBALL_PATH=${TARBALL_PATH:-}
  if [[ -n $TARBALL_PATH ]]; then return 0; fi # built earlier (supervise)
  if [[ -n $TARBALL ]]; then
    TARBALL_PATH=$TARBALL
    return 0
  fi
  local ref=${REF:-HEAD}
  if ((!DRY_RUN)); then
    command -v git >/dev/null 2>&1 || die "setup: git not found; use --repo-url or --tarball"
    git -C "$REPO_ROOT" rev-parse --git-dir >/dev/null 2>&1 ||
      die "setup: $REPO_ROOT is not a git checkout; use --repo-url or --tarball"
    if [[ -n $(git -C "$REPO_ROOT" status --porcelain --untracked-files=no 2>/dev/null) ]]; then
      info "warning: uncommitted changes in $REPO_ROOT are NOT deployed (git archive $ref)"
    fi
  fi
  TMP_DIR=$(mktemp -d "${TMPDIR:-/tmp}/tpu_pod.XXXXXX")
  TARBALL_PATH=$TMP_DIR/$REMOTE_TARBALL
  run git -C "$REPO_ROOT" archive --format=tar.gz -o "$TARBALL_PATH" "$ref"
}

do_setup() {
  if [[ -z $REPO_URL ]]; then
    prepare_tarball || return 1
    gc compute tpus tpu-vm scp "$TARBALL_PATH" "$NAME:$REMOTE_TARBALL" "${GFLAGS[@]}" \
      --recurse --worker=all || return 1
  fi
  ssh_workers all "$(remote_setup_script)"
}

do_train() { ssh_workers all "$(remote_train_script)"; }

do_stop() { ssh_workers all "$(remote_stop_script)"; }

do_delete() {
  if ((QUEUED)); then
    gc compute tpus queued-resources delete "$NAME" "${GFLAGS[@]}" --force --quiet
  else
    gc compute tpus tpu-vm delete "$NAME" "${GFLAGS[@]}" --quiet
  fi
}

do_status() {
  local state rc=0
  state=$(tpu_state)
  echo "TPU $NAME ($ZONE): $state"
  if ((QUEUED)); then echo "queued resource $NAME: $(qr_state)"; fi
  if [[ -n $WORKDIR ]]; then
    if run_finished; then echo "run $WORKDIR: FINISHED"; else echo "run $WORKDIR: not finished"; fi
  fi
  if [[ $state == MISSING ]] && ((!DRY_RUN)); then rc=1; fi
  return "$rc"
}

do_logs() {
  ssh_workers "$WORKER" "tail -n 200 -F \"\$HOME/$REMOTE_LOG\""
}

# --------------------------------------------------------------- supervise --

RESTARTS=0
FAILURES=0

count_restart() { # count_restart WHAT
  RESTARTS=$((RESTARTS + 1))
  if ((RESTARTS > MAX_RESTARTS)); then
    info "giving up: $1 would exceed --max-restarts=$MAX_RESTARTS"
    exit 3
  fi
  info "$1 (restart $RESTARTS of at most $MAX_RESTARTS)"
}

# Deletes what is left of the slice, creates it again, installs and starts
# training. Returns non-zero on the first failed step (the loop retries).
recreate() { # recreate CURRENT_STATE
  local state=$1
  count_restart "recreating the slice (state: $state)"
  if ((QUEUED)); then
    if [[ $(qr_state) != MISSING ]] || ((DRY_RUN)); then do_delete || return 1; fi
  elif [[ $state != MISSING ]] || ((DRY_RUN)); then
    do_delete || return 1
  fi
  do_create || return 1
  if ((QUEUED)); then
    info "waiting for queued resource $NAME to become ACTIVE"
    wait_queued_active || return 1
  fi
  do_setup || return 1
  do_train || return 1
}

# Starts the launcher again on a READY slice after stopping any leftovers;
# installs the project first if train fails (e.g. a fresh slice).
relaunch() {
  do_stop || true
  if do_train; then return 0; fi
  info "train failed; running setup and trying again"
  do_setup || return 1
  do_train
}

# Remote check: 0 running on all workers, otherwise CHECK_* or an ssh error.
training_status() {
  local rc=0
  if ((DRY_RUN)); then
    show_cmd gcloud compute tpus tpu-vm ssh "$NAME" "${GFLAGS[@]}" --worker=all \
      --command="$(remote_check_script)" >&3
    return 0
  fi
  gcloud compute tpus tpu-vm ssh "$NAME" "${GFLAGS[@]}" --worker=all \
    --command="$(remote_check_script)" >&2 2>/dev/null 3>&- || rc=$?
  return "$rc"
}

do_supervise() {
  local state qs rc check_errors=0 transition_since=-1 transition_timeout=1800 last=""
  export CLOUDSDK_CORE_DISABLE_PROMPTS=1
  local kind=on-demand
  if ((SPOT)); then kind=spot; fi
  if ((QUEUED)); then kind+=", queued"; fi
  info "supervising TPU $NAME ($ACCEL, $kind) until $WORKDIR/FINISHED exists"
  if [[ -z $REPO_URL ]]; then prepare_tarball; fi # deploy the same code on every recreation
  while :; do
    if run_finished; then
      info "run finished: $WORKDIR/FINISHED exists"
      if ((DELETE_WHEN_FINISHED)); then
        do_delete
      else
        info "the TPU still exists and is billed; run 'tools/$PROG delete' when done"
      fi
      return 0
    fi
    state=$(tpu_state)
    if [[ $state != "$last" ]]; then
      info "TPU $NAME state: $state"
      last=$state
    fi
    case $state in
      READY)
        transition_since=-1
        rc=0
        training_status || rc=$?
        case $rc in
          "$CHECK_RUNNING") check_errors=0 ;;
          "$CHECK_BAD_CONFIG")
            info "giving up: the launcher exited with status 2 (bad configuration or incompatible checkpoint); see 'tools/$PROG logs'"
            exit 3
            ;;
          "$CHECK_EXITED_OK" | "$CHECK_PREEMPTED" | "$CHECK_NOT_STARTED" | "$CHECK_FAILED")
            check_errors=0
            if run_finished; then continue; fi
            if ((rc == CHECK_FAILED)); then
              FAILURES=$((FAILURES + 1))
              if ((FAILURES > MAX_FAILURES)); then
                info "giving up: the launcher failed $FAILURES times (--max-failures=$MAX_FAILURES); see 'tools/$PROG logs'"
                exit 3
              fi
              info "the launcher failed on a worker (failure $FAILURES of at most $MAX_FAILURES)"
            fi
            count_restart "starting the launcher (check status $rc)"
            relaunch || info "starting the launcher failed; retrying after the next poll"
            ;;
          *)
            check_errors=$((check_errors + 1))
            info "could not check the launcher on the workers (gcloud ssh exit status $rc, $check_errors in a row)"
            if ((check_errors >= 10)); then
              check_errors=0
              recreate "$state (workers unreachable)" || info "recreating failed; retrying after the next poll"
            fi
            ;;
        esac
        ;;
      CREATING | STARTING | RESTARTING | REPAIRING | REIMAGING | STOPPING | DELETING | \
        HIDING | UNHIDING | UNKNOWN | STATE_UNSPECIFIED)
        if ((transition_since < 0)); then transition_since=$SECONDS; fi
        if ((SECONDS - transition_since > transition_timeout)); then
          transition_since=-1
          recreate "stuck in $state" || info "recreating failed; retrying after the next poll"
        fi
        ;;
      *) # MISSING, PREEMPTED, TERMINATED, STOPPED, HIDDEN, ...
        if ((QUEUED)) && [[ $state == MISSING ]] && ((!DRY_RUN)); then
          # A queued request still waiting for capacity keeps its place in
          # the queue; an ACTIVE one without its TPU gets the transition timeout.
          qs=$(qr_state)
          case $qs in
            ACCEPTED | WAITING_FOR_RESOURCES | PROVISIONING | CREATING)
              transition_since=-1
              info "queued resource $NAME is $qs; waiting"
              sleep "$POLL_SECONDS"
              continue
              ;;
            ACTIVE)
              if ((transition_since < 0)); then transition_since=$SECONDS; fi
              if ((SECONDS - transition_since <= transition_timeout)); then
                sleep "$POLL_SECONDS"
                continue
              fi
              ;;
          esac
        fi
        transition_since=-1
        if recreate "$state"; then
          info "slice recreated and training started"
        else
          info "recreating failed; retrying after the next poll"
        fi
        ;;
    esac
    if ((DRY_RUN)); then
      info "dry run: stopping after one supervise iteration"
      return 0
    fi
    sleep "$POLL_SECONDS"
  done
}

# --------------------------------------------------------------------- main --

case $SUBCOMMAND in
  create)
    do_create
    if ((QUEUED)); then
      if ((WAIT)); then
        wait_queued_active || die "queued resource $NAME did not become ACTIVE"
      else
        info "queued resource $NAME requested; 'tools/$PROG status --queued' shows its state (train after setup once it is ACTIVE)"
      fi
    fi
    ;;
  setup) do_setup ;;
  train)
    do_train
    info "started; follow with 'tools/$PROG logs', stop with 'tools/$PROG stop'"
    ;;
  status) do_status ;;
  logs) do_logs ;;
  stop) do_stop ;;
  delete) do_delete ;;
  supervise) do_supervise ;;
esac
