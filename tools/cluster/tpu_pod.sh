#!/usr/bin/env bash
# tpu_pod.sh: create a Cloud TPU VM pod slice, install this project on every
# worker, run the multi-host launcher, and keep it running through preemptions.
# Run `tools/cluster/tpu_pod.sh help` for usage. Only `gcloud` (Google Cloud CLI) is
# needed locally, plus `git` for the default `setup` path and `timeout`
# (GNU coreutils; `gtimeout` on macOS) to bound every ssh and scp.
set -euo pipefail

PROG=tpu_pod.sh
REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

# The launcher's exit statuses that supervise acts on (launch/status.py; a test
# checks that these equal the enum).
STATUS_FINISHED=0
STATUS_BAD_INPUT=2
STATUS_DIVERGED=3
STATUS_STALLED=5
STATUS_PREEMPTED=75

# Fixed locations on each TPU worker (relative to the login user's $HOME).
REMOTE_SRC_DIR=resnet-multihost
REMOTE_VENV=resnet-venv
REMOTE_LOG=resnet-train.log
REMOTE_EXITCODE=resnet-train.exitcode
REMOTE_TARBALL=resnet-src.tar.gz
REMOTE_URL_FILE=.resnet-repo-url # a --repo-url with credentials, read once by setup and deleted
# Matches the launcher process (`python -m launch.main ...`) but not the shells
# that start, check or stop it (their command lines start with `bash`).
LAUNCHER_PATTERN='^[^ ]*python[^ ]* -m launch[.]main( |$)'
# Each worker answers the status check with one line: this tag, then `running`,
# the launcher's last exit status, or `none`, then its hostname.
CHECK_TAG=tpu_pod-launcher:

# uv, used by setup only when the image has no Python >= 3.11: a pinned
# release, installed into ~/.local/bin without touching any shell profile.
UV_VERSION=0.9.26

# ssh/scp options on every connection: give up connecting after 30 s, and
# detect a dead peer (a preempted worker) within about 2 minutes.
SSH_OPTIONS=(-oConnectTimeout=30 -oServerAliveInterval=30 -oServerAliveCountMax=4)
API_TIMEOUT=300 # seconds for one describe or storage call
# value() output of `describe`, '|'-separated: the description comes last as it may contain anything.
DESCRIBE_FORMAT='value[separator="|"](state,health,symptoms.symptomType.list(),healthDescription)'

usage() {
  cat <<EOF
Usage: tools/cluster/$PROG SUBCOMMAND [options] [-- LAUNCHER_ARGS...]

Manage a Cloud TPU VM pod slice that runs this project's multi-host launcher
(python -m launch.main) on every worker.

Subcommands:
  create     Create the TPU VM slice (on-demand by default; --spot; --queued).
  setup      Copy this repo to every worker (git archive of --ref, default HEAD;
             or --repo-url to git clone there) and pip install '.[tpu]' into
             ~/$REMOTE_VENV (Python >= 3.11; uses uv $UV_VERSION to get one if the
             image lacks it).
  train      Start the launcher on all workers at once, in the background
             (nohup), logging to ~/$REMOTE_LOG on each worker.
  status     Print the TPU state and health (and queued-resource state / run status).
  logs       Follow the launcher log of one worker (default: worker 0); with
             --all-workers, save the end of every worker's log under --logs-dir.
  stop       Send SIGTERM to the launcher on all workers (it checkpoints and
             exits 75) and wait for it to exit (SIGKILL after --stop-timeout).
  delete     Delete the TPU (with --queued: the queued resource and its TPU).
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

Multi-worker ssh needs your key in an agent: ssh-add ~/.ssh/google_compute_engine

Examples:
  export TPU_NAME=resnet-v4-32 TPU_ZONE=us-central2-b TPU_PROJECT=my-project
  tools/cluster/$PROG create --accelerator-type=v4-32 --spot
  tools/cluster/$PROG setup
  tools/cluster/$PROG train --workdir=gs://my-bucket/resnet50 -- --config.train.num_epochs=90
  tools/cluster/$PROG logs
  tools/cluster/$PROG logs --all-workers --logs-dir=/tmp/tpu-logs
  tools/cluster/$PROG stop && tools/cluster/$PROG delete
  tools/cluster/$PROG supervise --accelerator-type=v4-32 --spot \\
      --workdir=gs://my-bucket/resnet50 \\
      --env=JAX_COMPILATION_CACHE_DIR=gs://my-bucket/xla-cache \\
      -- --config.train.num_epochs=90

Exit status: 0 success; 1 a command failed; 2 usage error; 3 supervise gave
up (--max-restarts / --max-failures / launcher exit 2 or 3); 127 gcloud not
found on PATH.
The launcher itself exits 0 when finished, 75 when preempted and 5 when stalled
(rerun the same command to resume), 2 on bad input, 3 when training diverged,
anything else on failure.
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
  echo "Run 'tools/cluster/$PROG help' for usage." >&2
  exit 2
}
is_true() {
  case "$1" in
    1 | true | TRUE | True | yes | YES | on | ON) return 0 ;;
    *) return 1 ;;
  esac
}

# URLs with credentials (scheme://user:secret@host/...): never printed, never on
# a command line. `public_url` drops the user information, `shown_url` masks it.
url_has_credentials() {
  local rest=${1#*://}
  [[ $1 == *://* && ${rest%%/*} == *@* ]]
}
url_parts() { # sets URL_SCHEME, URL_HOST (user information removed) and URL_PATH
  local rest=${1#*://} authority
  URL_SCHEME=${1%%://*}
  authority=${rest%%/*}
  URL_PATH=${rest:${#authority}}
  URL_HOST=${authority##*@}
}
public_url() {
  if url_has_credentials "$1"; then
    url_parts "$1"
    printf '%s' "$URL_SCHEME://$URL_HOST$URL_PATH"
  else
    printf '%s' "$1"
  fi
}
shown_url() {
  if url_has_credentials "$1"; then
    url_parts "$1"
    printf '%s' "$URL_SCHEME://***@$URL_HOST$URL_PATH"
  else
    printf '%s' "$1"
  fi
}

TMP_DIR=""
CHILD_PID=""
cleanup() {
  if [[ -n $TMP_DIR ]]; then rm -rf "$TMP_DIR"; fi
}
# Bounded commands run in their own process group (that of `timeout`), which a
# Ctrl-C on the terminal does not reach: forward INT/TERM to it, then exit.
on_signal() {
  local sig=$1
  if [[ -n $CHILD_PID ]]; then
    kill -TERM -- "-$CHILD_PID" 2>/dev/null || kill -TERM "$CHILD_PID" 2>/dev/null || true
  fi
  cleanup
  trap - "$sig" EXIT
  kill -s "$sig" "$$"
}
trap cleanup EXIT
trap 'on_signal INT' INT
trap 'on_signal TERM' TERM

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
gc() { run gcloud "$@"; }

TIMEOUT_BIN=$(command -v timeout || command -v gtimeout || true)
# bounded SECONDS CMD...: run CMD, and end it and everything it started (gcloud's
# ssh processes) after SECONDS: exit status 124 (137 if it ignored SIGTERM).
# It runs in the background so that a signal to this script is handled at once.
bounded() {
  local limit=$1 rc=0
  shift
  if [[ -z $TIMEOUT_BIN ]]; then
    "$@" 3>&-
    return
  fi
  "$TIMEOUT_BIN" --kill-after=30 "$limit" "$@" 3>&- &
  CHILD_PID=$!
  wait "$CHILD_PID" || rc=$?
  CHILD_PID=""
  if ((rc == 124 || rc == 137)); then info "timed out after ${limit}s: $1 ${2:-} ${3:-} ${4:-} ${5:-}"; fi
  return "$rc"
}
# Like run, with a time limit.
run_bounded() {
  local limit=$1
  shift
  if ((DRY_RUN)); then
    show_cmd "$@" >&3
    return 0
  fi
  show_cmd "$@" >&2
  bounded "$limit" "$@"
}

# gcloud_quiet ARGS...: a polling call: stdout to $OUT_FILE, stderr to
# $ERR_FILE (shown by show_error when it matters), bounded by API_TIMEOUT.
gcloud_quiet() {
  : >"$OUT_FILE"
  : >"$ERR_FILE"
  if ((DRY_RUN)); then
    show_cmd gcloud "$@" >&3
    return 0
  fi
  bounded "$API_TIMEOUT" gcloud "$@" >"$OUT_FILE" 2>"$ERR_FILE"
}
error_text() { # the last lines of the last gcloud call's stderr
  local line
  while IFS= read -r line; do
    [[ -z ${line//[[:space:]]/} ]] || printf '    | %s\n' "$line"
  done < <(tail -n 15 "$ERR_FILE" 2>/dev/null || true)
}
show_error() { error_text >&2; }
not_found() { grep -q 'NOT_FOUND' "$ERR_FILE" 2>/dev/null; }

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
ENV_VARS=()
WORKER=0
ALL_WORKERS=0
LOGS_DIR=tpu-logs
LOG_LINES=5000
STOP_TIMEOUT=300
SSH_TIMEOUT=300
SETUP_TIMEOUT=3600
POLL_SECONDS=60
MAX_RESTARTS=100
MAX_FAILURES=3
UNREACHABLE_POLLS=10
PROGRESS_TIMEOUT=3600
MAX_BACKOFF=1800
DELETE_WHEN_FINISHED=0
DELETE_ON_GIVE_UP=0
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
      --python-version | --workdir | --config | --env | --worker | --logs-dir | \
      --log-lines | --stop-timeout | --ssh-timeout | --setup-timeout | \
      --poll-seconds | --max-restarts | --max-failures | --unreachable-polls | \
      --progress-timeout | --max-backoff)
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
        --env) ENV_VARS+=("$val") ;;
        --worker) WORKER=$val ;;
        --logs-dir) LOGS_DIR=$val ;;
        --log-lines) LOG_LINES=$val ;;
        --stop-timeout) STOP_TIMEOUT=$val ;;
        --ssh-timeout) SSH_TIMEOUT=$val ;;
        --setup-timeout) SETUP_TIMEOUT=$val ;;
        --poll-seconds) POLL_SECONDS=$val ;;
        --max-restarts) MAX_RESTARTS=$val ;;
        --max-failures) MAX_FAILURES=$val ;;
        --unreachable-polls) UNREACHABLE_POLLS=$val ;;
        --progress-timeout) PROGRESS_TIMEOUT=$val ;;
        --max-backoff) MAX_BACKOFF=$val ;;
      esac
      ;;
    --spot | --queued | --wait | --all-workers | --delete-when-finished | \
      --delete-on-give-up | --dry-run | --help | -h)
      ((!inline)) || usage_error "option $opt takes no value"
      case $opt in
        --spot) SPOT=1 ;;
        --queued) QUEUED=1 ;;
        --wait) WAIT=1 ;;
        --all-workers) ALL_WORKERS=1 ;;
        --delete-when-finished) DELETE_WHEN_FINISHED=1 ;;
        --delete-on-give-up) DELETE_ON_GIVE_UP=1 ;;
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
  echo "Usage: tools/cluster/$PROG SUBCOMMAND [options] [-- LAUNCHER_ARGS...]" >&2
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
for kv in ${ENV_VARS[@]+"${ENV_VARS[@]}"}; do
  [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] ||
    usage_error "--env takes KEY=VALUE with KEY a shell variable name, got '${kv%%=*}'"
done
[[ $WORKER == all || $WORKER =~ ^[0-9]+$ ]] || usage_error "--worker must be a worker number or 'all', got '$WORKER'"
[[ -n $LOGS_DIR ]] || usage_error "--logs-dir must not be empty"
require_uint "$LOG_LINES" --log-lines
require_uint "$STOP_TIMEOUT" --stop-timeout
require_uint "$SSH_TIMEOUT" --ssh-timeout
require_uint "$SETUP_TIMEOUT" --setup-timeout
require_uint "$POLL_SECONDS" --poll-seconds
require_uint "$MAX_RESTARTS" --max-restarts
require_uint "$MAX_FAILURES" --max-failures
require_uint "$UNREACHABLE_POLLS" --unreachable-polls
require_uint "$PROGRESS_TIMEOUT" --progress-timeout
require_uint "$MAX_BACKOFF" --max-backoff

if ((!DRY_RUN)) && ! command -v gcloud >/dev/null 2>&1; then
  echo "$PROG: error: gcloud not found on PATH; install the Google Cloud CLI" \
    "(https://cloud.google.com/sdk/docs/install) and run 'gcloud auth login'" >&2
  exit 127
fi
if ((!DRY_RUN)) && [[ -z $TIMEOUT_BIN ]]; then
  info "warning: no timeout(1) on PATH (GNU coreutils; gtimeout on macOS): ssh and scp are" \
    "bounded only by ssh's ConnectTimeout/ServerAlive options"
fi

GFLAGS=(--zone="$ZONE")
if [[ -n $PROJECT ]]; then GFLAGS+=(--project="$PROJECT"); fi
SSH_FLAGS=()
SCP_FLAGS=()
for o in "${SSH_OPTIONS[@]}"; do
  SSH_FLAGS+=(--ssh-flag="$o")
  SCP_FLAGS+=(--scp-flag="$o")
done

TMP_DIR=$(mktemp -d "${TMPDIR:-/tmp}/tpu_pod.XXXXXX")
OUT_FILE=$TMP_DIR/out
ERR_FILE=$TMP_DIR/err

# ---------------------------------------------------------- remote scripts --
# Each script is run by the login shell (bash) of every worker through
# `gcloud compute tpus tpu-vm ssh --command`. The first line names it.

remote_setup_script() {
  local fetch
  if [[ -n $REPO_URL ]]; then
    # GIT_TERMINAL_PROMPT=0: a repository that needs credentials fails at once
    # instead of waiting for a password. git's errors are shown with any
    # user:secret@ part of a URL masked.
    if url_has_credentials "$REPO_URL"; then
      fetch="url=\$(cat \"\$HOME/$REMOTE_URL_FILE\")
rm -f \"\$HOME/$REMOTE_URL_FILE\""
    else
      fetch="url=$(printf '%q' "$REPO_URL")"
    fi
    fetch+="
if ! GIT_TERMINAL_PROMPT=0 git clone --quiet \"\$url\" \"\$src.new\" 2>\"\$src.err\"; then
  sed 's#://[^/@]*@#://***@#g' \"\$src.err\" >&2
  rm -f \"\$src.err\"
  exit 1
fi
rm -f \"\$src.err\"
git -C \"\$src.new\" remote set-url origin $(printf '%q' "$(public_url "$REPO_URL")")"
    if [[ -n $REF ]]; then
      fetch+=$'\n'"git -C \"\$src.new\" checkout --quiet $(printf '%q' "$REF")"
    fi
  else
    fetch="mkdir -p \"\$src.new\"
tar -xzf $REMOTE_TARBALL -C \"\$src.new\"
rm -f $REMOTE_TARBALL"
  fi
  cat <<SCRIPT
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
    echo "\$(hostname): no usable Python >= 3.11; installing Python $PYTHON_VERSION with uv $UV_VERSION"
    uv=\$(command -v uv || echo "\$HOME/.local/bin/uv")
    if [ ! -x "\$uv" ]; then
      # Pinned release; UV_UNMANAGED_INSTALL puts the binary in ~/.local/bin and
      # leaves shell profiles alone (UV_NO_MODIFY_PATH likewise).
      curl -LsSf https://astral.sh/uv/$UV_VERSION/install.sh |
        env UV_UNMANAGED_INSTALL="\$HOME/.local/bin" UV_NO_MODIFY_PATH=1 sh
      uv=\$HOME/.local/bin/uv
    fi
    "\$uv" venv --seed --python $PYTHON_VERSION "\$venv"
  fi
fi
cd "\$src"
"\$venv/bin/python" -m pip install --quiet --upgrade pip
"\$venv/bin/python" -m pip install ".[tpu]"
echo "\$(hostname): setup done (\$("\$venv/bin/python" -c 'import jax; print("jax", jax.__version__)'))"
SCRIPT
}

remote_train_script() {
  local qargs kv exports="" keys=""
  qargs=$(printf ' %q' "--config=$CONFIG" "--workdir=$WORKDIR" ${LAUNCHER_ARGS[@]+"${LAUNCHER_ARGS[@]}"})
  for kv in ${ENV_VARS[@]+"${ENV_VARS[@]}"}; do
    exports+="export ${kv%%=*}=$(printf '%q' "${kv#*=}")"$'\n'
    keys+=" ${kv%%=*}"
  done
  cat <<SCRIPT
# $PROG:train
cd "\$HOME/$REMOTE_SRC_DIR" 2>/dev/null || { echo "\$(hostname): ~/$REMOTE_SRC_DIR not found; run '$PROG setup' first" >&2; exit 1; }
[ -f "\$HOME/$REMOTE_VENV/bin/activate" ] || { echo "\$(hostname): ~/$REMOTE_VENV not found; run '$PROG setup' first" >&2; exit 1; }
if pgrep -f '$LAUNCHER_PATTERN' >/dev/null; then echo "\$(hostname): the launcher is already running; use '$PROG stop' first" >&2; exit 1; fi
. "\$HOME/$REMOTE_VENV/bin/activate"
${exports}rm -f "\$HOME/$REMOTE_EXITCODE"
rm -f /tmp/libtpu_lockfile 2>/dev/null || true
{ printf '=== %s %s: python -m launch.main' "\$(date -u +%Y-%m-%dT%H:%M:%SZ)" "\$(hostname)"; printf ' %s'$qargs; echo '${keys:+ (environment:$keys)}'; } >> "\$HOME/$REMOTE_LOG"
PYTHONUNBUFFERED=1 nohup bash -c 'python -m launch.main "\$@" < /dev/null; echo \$? > "\$HOME/$REMOTE_EXITCODE"' resnet-train$qargs >> "\$HOME/$REMOTE_LOG" 2>&1 < /dev/null &
echo "\$(hostname): launcher started, logging to ~/$REMOTE_LOG"
SCRIPT
}

# Prints one line per worker (CHECK_TAG, then running / last exit status / none,
# then the hostname) and always exits 0: a non-zero exit of the ssh call is an
# ssh or gcloud problem, never the launcher's.
remote_check_script() {
  cat <<SCRIPT
# $PROG:check
if pgrep -f '$LAUNCHER_PATTERN' >/dev/null; then echo "$CHECK_TAG running \$(hostname)"; exit 0; fi
code=\$(cat "\$HOME/$REMOTE_EXITCODE" 2>/dev/null || true)
echo "$CHECK_TAG \${code:-none} \$(hostname)"
SCRIPT
}

remote_stop_script() {
  cat <<SCRIPT
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
SCRIPT
}

remote_log_script() {
  cat <<SCRIPT
# $PROG:log
if [ -f "\$HOME/$REMOTE_LOG" ]; then tail -n $LOG_LINES "\$HOME/$REMOTE_LOG"; else echo "\$(hostname): no ~/$REMOTE_LOG yet"; fi
SCRIPT
}

ssh_workers() { # ssh_workers WORKER TIME_LIMIT SCRIPT
  run_bounded "$2" gcloud compute tpus tpu-vm ssh "$NAME" "${GFLAGS[@]}" --worker="$1" \
    "${SSH_FLAGS[@]}" --command="$3"
}
scp_to_workers() { # scp_to_workers LOCAL_FILE REMOTE_NAME
  run_bounded "$SETUP_TIMEOUT" gcloud compute tpus tpu-vm scp "$1" "$NAME:$2" "${GFLAGS[@]}" \
    --worker=all "${SCP_FLAGS[@]}"
}

# ------------------------------------------------------------------ actions --

# describe_tpu: sets TPU_STATE, TPU_HEALTH, TPU_SYMPTOMS and TPU_HEALTH_DESCRIPTION
# (the TPU API's Node.state, .health, .symptoms[].symptomType, .healthDescription).
# Returns 0 when the TPU exists, 1 when gcloud answers NOT_FOUND (the only
# answer that means "missing"), 2 on any other error (permissions, credentials,
# network, quota): see $ERR_FILE.
describe_tpu() {
  TPU_STATE="" TPU_HEALTH="" TPU_SYMPTOMS="" TPU_HEALTH_DESCRIPTION=""
  if ! gcloud_quiet compute tpus tpu-vm describe "$NAME" "${GFLAGS[@]}" --format="$DESCRIBE_FORMAT"; then
    if not_found; then return 1; fi
    return 2
  fi
  if ((DRY_RUN)); then
    TPU_STATE=DRY_RUN
    return 0
  fi
  IFS='|' read -r TPU_STATE TPU_HEALTH TPU_SYMPTOMS TPU_HEALTH_DESCRIPTION <"$OUT_FILE" || true
  TPU_STATE=${TPU_STATE//[[:space:]]/}
  TPU_STATE=${TPU_STATE:-UNKNOWN}
  TPU_HEALTH=${TPU_HEALTH//[[:space:]]/}
  TPU_SYMPTOMS=${TPU_SYMPTOMS//[[:space:]]/}
  return 0
}
health_text() { # e.g. "health TIMEOUT, symptoms EXECUTE_TIMED_OUT: ..."
  local s="health ${TPU_HEALTH:-unknown}"
  if [[ -n $TPU_SYMPTOMS ]]; then s+=", symptoms $TPU_SYMPTOMS"; fi
  if [[ -n $TPU_HEALTH_DESCRIPTION ]]; then s+=": $TPU_HEALTH_DESCRIPTION"; fi
  printf '%s' "$s"
}

# qr_state: sets QR_STATE (queued resource state.state); returns like describe_tpu.
qr_state() {
  QR_STATE=""
  if ! gcloud_quiet compute tpus queued-resources describe "$NAME" "${GFLAGS[@]}" --format="value(state.state)"; then
    if not_found; then
      QR_STATE=MISSING
      return 1
    fi
    return 2
  fi
  if ((DRY_RUN)); then
    QR_STATE=DRY_RUN
    return 0
  fi
  QR_STATE=$(tr -d '[:space:]' <"$OUT_FILE")
  QR_STATE=${QR_STATE:-UNKNOWN}
}

# gcs_ls URL: 0 when something matches, 1 when nothing does ("matched no
# objects": the bucket exists and is readable), 2 on any other error.
gcs_ls() {
  if ! gcloud_quiet storage ls "$1"; then
    if grep -q 'matched no objects' "$ERR_FILE" 2>/dev/null; then return 1; fi
    return 2
  fi
  if ((DRY_RUN)); then return 1; fi
  return 0
}

run_finished() { gcs_ls "$WORKDIR/FINISHED"; } # 0 finished, 1 not yet, 2 cannot tell

# newest_checkpoint: sets NEWEST_STEP to the newest committed checkpoint step
# (WORKDIR/checkpoints/<step>/commit_success.txt), -1 when there is none;
# returns 2 when the bucket cannot be listed.
newest_checkpoint() {
  local rc=0 line step
  NEWEST_STEP=-1
  gcs_ls "$WORKDIR/checkpoints/*/commit_success.txt" || rc=$?
  if ((rc == 2)); then return 2; fi
  while IFS= read -r line; do
    if [[ $line =~ /checkpoints/([0-9]+)/commit_success\.txt$ ]]; then
      step=$((10#${BASH_REMATCH[1]}))
      if ((step > NEWEST_STEP)); then NEWEST_STEP=$step; fi
    fi
  done <"$OUT_FILE"
  return 0
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
# request failed or was suspended/deleted. gcloud errors other than NOT_FOUND
# are shown and retried.
wait_queued_active() {
  local last="" rc
  while :; do
    rc=0
    qr_state || rc=$?
    if ((DRY_RUN)); then return 0; fi
    if ((rc == 2)); then
      info "could not read the queued resource $NAME; retrying:"
      show_error
      sleep "$POLL_SECONDS"
      continue
    fi
    if [[ $QR_STATE != "$last" ]]; then
      info "queued resource $NAME: $QR_STATE"
      last=$QR_STATE
    fi
    case $QR_STATE in
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
  TARBALL_PATH=$TMP_DIR/$REMOTE_TARBALL
  run git -C "$REPO_ROOT" archive --format=tar.gz -o "$TARBALL_PATH" "$ref"
}

# A --repo-url with credentials goes to the workers as a file (mode 600 here;
# scp keeps the mode), so that it appears on no command line and in no output.
prepare_url_file() {
  URL_FILE=$TMP_DIR/repo-url
  if [[ ! -f $URL_FILE ]]; then
    (
      umask 077
      printf '%s\n' "$REPO_URL" >"$URL_FILE"
    )
  fi
}

do_setup() {
  if [[ -z $REPO_URL ]]; then
    prepare_tarball || return 1
    scp_to_workers "$TARBALL_PATH" "$REMOTE_TARBALL" || return 1
  elif url_has_credentials "$REPO_URL"; then
    info "setup: cloning $(shown_url "$REPO_URL") (the credentials go to the workers in a file)"
    prepare_url_file
    scp_to_workers "$URL_FILE" "$REMOTE_URL_FILE" || return 1
  fi
  ssh_workers all "$SETUP_TIMEOUT" "$(remote_setup_script)"
}

do_train() { ssh_workers all "$SSH_TIMEOUT" "$(remote_train_script)"; }

do_stop() { ssh_workers all "$((STOP_TIMEOUT + SSH_TIMEOUT))" "$(remote_stop_script)"; }

do_delete() {
  if ((QUEUED)); then
    gc compute tpus queued-resources delete "$NAME" "${GFLAGS[@]}" --force --quiet
  else
    gc compute tpus tpu-vm delete "$NAME" "${GFLAGS[@]}" --quiet
  fi
}

do_status() {
  local rc=0 frc=0
  describe_tpu || rc=$?
  case $rc in
    0) echo "TPU $NAME ($ZONE): $TPU_STATE ($(health_text))" ;;
    1) echo "TPU $NAME ($ZONE): MISSING" ;;
    *)
      echo "TPU $NAME ($ZONE): could not be read:"
      error_text
      ;;
  esac
  if ((QUEUED)); then
    if qr_state || [[ $QR_STATE == MISSING ]]; then
      echo "queued resource $NAME: $QR_STATE"
    else
      echo "queued resource $NAME: could not be read:"
      error_text
      rc=2
    fi
  fi
  if [[ -n $WORKDIR ]]; then
    run_finished || frc=$?
    case $frc in
      0) echo "run $WORKDIR: FINISHED" ;;
      1) echo "run $WORKDIR: not finished" ;;
      *)
        echo "run $WORKDIR: could not be read:"
        error_text
        rc=2
        ;;
    esac
  fi
  if ((rc != 0 && !DRY_RUN)); then return 1; fi
  return 0
}

do_logs() {
  run gcloud compute tpus tpu-vm ssh "$NAME" "${GFLAGS[@]}" --worker="$WORKER" \
    "${SSH_FLAGS[@]}" --command="tail -n 200 -F \"\$HOME/$REMOTE_LOG\""
}

# collect_logs WHY: saves the end of every worker's log under
# LOGS_DIR/NAME-TIME-WHY/worker-N.log (one ssh per worker, each bounded), sets
# LAST_LOGS. The worker count comes from the TPU's network endpoints.
LAST_LOGS=""
collect_logs() {
  local why=$1 workers=1 i failed=0 dir
  if gcloud_quiet compute tpus tpu-vm describe "$NAME" "${GFLAGS[@]}" \
    --format="value(networkEndpoints.len())"; then
    if ((!DRY_RUN)); then workers=$(tr -d '[:space:]' <"$OUT_FILE"); fi
  else
    info "could not read the worker count of $NAME to collect logs:"
    show_error
    return 1
  fi
  if [[ ! $workers =~ ^[0-9]+$ ]] || ((workers < 1)); then
    info "TPU $NAME reports no workers ('$workers'); no logs collected"
    return 1
  fi
  dir=$LOGS_DIR/$NAME-$(date -u +%Y%m%dT%H%M%SZ)-$why
  if [[ -e $dir ]]; then # a second collection within the same second
    i=2
    while [[ -e $dir-$i ]]; do i=$((i + 1)); done
    dir=$dir-$i
  fi
  if ((!DRY_RUN)); then mkdir -p "$dir" || return 1; fi
  for ((i = 0; i < workers; i++)); do
    if ((DRY_RUN)); then
      ssh_workers "$i" "$SSH_TIMEOUT" "$(remote_log_script)"
      continue
    fi
    if ! bounded "$SSH_TIMEOUT" gcloud compute tpus tpu-vm ssh "$NAME" "${GFLAGS[@]}" \
      --worker="$i" "${SSH_FLAGS[@]}" --command="$(remote_log_script)" \
      >"$dir/worker-$i.log" 2>"$dir/worker-$i.ssh-errors"; then
      failed=$((failed + 1))
      info "could not fetch worker $i's log (see $dir/worker-$i.ssh-errors)"
    else
      rm -f "$dir/worker-$i.ssh-errors"
    fi
  done
  LAST_LOGS=$dir
  if ((!DRY_RUN)); then info "saved the logs of $((workers - failed)) of $workers workers in $dir"; fi
  ((failed == 0))
}

# --------------------------------------------------------------- supervise --

RESTARTS=0        # recreations and launcher restarts (--max-restarts)
FAILURES=0        # launcher failures since the last new checkpoint (--max-failures)
FAILURE_STEP=-1   # newest checkpoint step when the launcher last failed
API_ERRORS=0      # failed gcloud calls in a row (backoff)
UNREACHABLE=0     # polls in a row on which the workers could not be checked
UNREACHABLE_SINCE=-1
LAST_STEP=-1      # newest committed checkpoint step seen, and when it changed ($SECONDS)
LAST_STEP_CHANGED=-1
STEPS_LISTED=0    # whether the checkpoints were listed before
STEP_ADVANCED=0   # whether the last listing found a newer step than the one before

give_up() { # give_up REASON: exit 3, saying what happens to the slice
  info "giving up: $1"
  if ((DELETE_ON_GIVE_UP)); then
    info "deleting the TPU $NAME (--delete-on-give-up)"
    do_delete || info "deleting $NAME failed: it still exists and is billed; run 'tools/cluster/$PROG delete'"
  else
    info "the TPU $NAME is NOT deleted: it still exists and is billed until you run" \
      "'tools/cluster/$PROG delete --name=$NAME --zone=$ZONE${PROJECT:+ --project=$PROJECT}$([[ $QUEUED == 1 ]] && echo ' --queued')'" \
      "(or pass --delete-on-give-up)"
  fi
  exit 3
}

count_restart() { # count_restart WHAT
  RESTARTS=$((RESTARTS + 1))
  if ((RESTARTS > MAX_RESTARTS)); then
    give_up "$1 would exceed --max-restarts=$MAX_RESTARTS"
  fi
  info "$1 (restart $RESTARTS of at most $MAX_RESTARTS)"
}

# api_error WHAT: reports a failed gcloud call that is not NOT_FOUND (expired
# credentials, PERMISSION_DENIED, network, quota...) with gcloud's own message,
# then waits with exponential backoff. Nothing is created, deleted or counted.
api_error() {
  local delay=$POLL_SECONDS i
  API_ERRORS=$((API_ERRORS + 1))
  for ((i = 1; i < API_ERRORS && delay < MAX_BACKOFF; i++)); do delay=$((delay * 2)); done
  if ((delay > MAX_BACKOFF)); then delay=$MAX_BACKOFF; fi
  info "$1 failed ($API_ERRORS in a row; not counted as a restart, nothing changed); retrying in ${delay}s. gcloud said:"
  show_error
  sleep "$delay"
}

# observe_progress: lists the committed checkpoints; updates LAST_STEP,
# LAST_STEP_CHANGED and STEP_ADVANCED. Returns 2 when the bucket cannot be listed.
observe_progress() {
  local previous=$LAST_STEP
  STEP_ADVANCED=0
  if ! newest_checkpoint; then
    info "could not list $WORKDIR/checkpoints/:"
    show_error
    return 2
  fi
  if ((NEWEST_STEP != LAST_STEP)); then
    LAST_STEP=$NEWEST_STEP
    LAST_STEP_CHANGED=$SECONDS
    if ((STEPS_LISTED && NEWEST_STEP > previous)); then STEP_ADVANCED=1; fi
  fi
  STEPS_LISTED=1
  return 0
}

# count_failure CODE: the launcher failed; give up after more than
# --max-failures failures with no new checkpoint in between.
count_failure() {
  observe_progress || true
  if ((LAST_STEP > FAILURE_STEP)); then
    if ((FAILURES > 0)); then
      info "checkpoint step $LAST_STEP is new since the last failure: failure count reset"
    fi
    FAILURES=0
  fi
  FAILURE_STEP=$LAST_STEP
  FAILURES=$((FAILURES + 1))
  if ((FAILURES > MAX_FAILURES)); then
    give_up "the launcher failed $FAILURES times with no new checkpoint in between (--max-failures=$MAX_FAILURES)${LAST_LOGS:+; logs in $LAST_LOGS}"
  fi
  info "the launcher failed with exit status $1 (failure $FAILURES of at most $MAX_FAILURES with no new checkpoint)"
}

# Deletes what is left of the slice, creates it again, installs and starts
# training. Returns non-zero on the first failed step (the loop retries).
recreate() { # recreate WHY [MISSING]
  local why=$1 missing=${2:-} rc
  count_restart "recreating the slice ($why)"
  if ((QUEUED)); then
    rc=0
    qr_state || rc=$?
    if ((rc == 2)); then
      info "could not read the queued resource $NAME:"
      show_error
      return 1
    fi
    if ((rc == 0)); then do_delete || return 1; fi
  elif [[ -z $missing ]] || ((DRY_RUN)); then
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

# check_launcher: asks every worker about the launcher (bounded ssh) and sets
# LAUNCHER to one of
#   running      running on every worker
#   fatal        exit status 2 or 3 on some worker (LAUNCHER_CODE)
#   failed       another non-zero status on some worker (LAUNCHER_CODE)
#   retriable    75 or 5 on some worker (LAUNCHER_CODE)
#   stopped      not running on some worker, after exit 0 or never started
#   unreachable  the ssh call itself failed or timed out (CHECK_RC)
# and LAUNCHER_CODES to every worker's answer.
check_launcher() {
  local line code running=0 others=0 fatal="" failed="" retriable=""
  LAUNCHER="" LAUNCHER_CODE="" LAUNCHER_CODES="" CHECK_RC=0
  : >"$OUT_FILE"
  : >"$ERR_FILE"
  if ((DRY_RUN)); then
    show_cmd gcloud compute tpus tpu-vm ssh "$NAME" "${GFLAGS[@]}" --worker=all \
      "${SSH_FLAGS[@]}" --command="$(remote_check_script)" >&3
    LAUNCHER=running
    return 0
  fi
  bounded "$SSH_TIMEOUT" gcloud compute tpus tpu-vm ssh "$NAME" "${GFLAGS[@]}" --worker=all \
    "${SSH_FLAGS[@]}" --command="$(remote_check_script)" >"$OUT_FILE" 2>"$ERR_FILE" || CHECK_RC=$?
  while IFS= read -r line; do
    [[ $line == "$CHECK_TAG "* ]] || continue
    code=${line#"$CHECK_TAG "}
    code=${code%% *}
    LAUNCHER_CODES+="${LAUNCHER_CODES:+,}$code"
    case $code in
      running) running=$((running + 1)) ;;
      none | "$STATUS_FINISHED") others=$((others + 1)) ;;
      "$STATUS_BAD_INPUT" | "$STATUS_DIVERGED") fatal=$code ;;
      "$STATUS_PREEMPTED" | "$STATUS_STALLED") retriable=$code ;;
      *) failed=$code ;;
    esac
  done <"$OUT_FILE"
  if ((CHECK_RC != 0)) || [[ -z $LAUNCHER_CODES ]]; then
    LAUNCHER=unreachable
  elif [[ -n $fatal ]]; then
    LAUNCHER=fatal LAUNCHER_CODE=$fatal
  elif [[ -n $failed ]]; then
    LAUNCHER=failed LAUNCHER_CODE=$failed
  elif [[ -n $retriable ]]; then
    LAUNCHER=retriable LAUNCHER_CODE=$retriable
  elif ((others > 0)); then
    LAUNCHER=stopped
  else
    LAUNCHER=running
  fi
}

# A READY slice whose workers cannot be checked over ssh. The cause may be on
# our side (revoked key, OS Login, firewall, this machine's network), so the
# slice is recreated only when all of these hold:
#   - the check failed on --unreachable-polls polls in a row;
#   - the TPU API does not call the slice HEALTHY (nor under maintenance);
#   - no new checkpoint appeared for --progress-timeout seconds (counted from
#     when the workers became unreachable) nor since the previous poll;
#   - the checkpoints could be listed.
handle_unreachable() {
  local quiet since progress_ok=1
  UNREACHABLE=$((UNREACHABLE + 1))
  if ((UNREACHABLE == 1)); then UNREACHABLE_SINCE=$SECONDS; fi
  info "could not check the launcher on the workers (gcloud ssh exit status $CHECK_RC," \
    "$UNREACHABLE poll(s) in a row; TPU $TPU_STATE, $(health_text)). gcloud said:"
  show_error
  if ((UNREACHABLE == 1)); then
    info "if this persists, check ssh access from this machine: ssh-add ~/.ssh/google_compute_engine," \
      "OS Login roles, firewall rules for port 22, this machine's network"
  fi
  observe_progress || progress_ok=0
  since=$LAST_STEP_CHANGED
  if ((UNREACHABLE_SINCE > since)); then since=$UNREACHABLE_SINCE; fi
  quiet=$((SECONDS - since))
  if ((STEP_ADVANCED)); then
    info "checkpoints are still advancing (step $LAST_STEP): training runs; not touching the slice"
  elif [[ $TPU_HEALTH == HEALTHY ]]; then
    info "the TPU API reports the slice HEALTHY: not recreating it for an ssh failure"
  elif [[ $TPU_HEALTH == UNHEALTHY_MAINTENANCE ]]; then
    info "the slice is under maintenance and resumes once rescheduled: waiting"
  elif ((!progress_ok)); then
    info "the checkpoints cannot be listed: not recreating the slice on unknown progress"
  elif ((UNREACHABLE < UNREACHABLE_POLLS || quiet < PROGRESS_TIMEOUT)); then
    info "no new checkpoint for ${quiet}s (newest step: $LAST_STEP); the slice is recreated after" \
      "$UNREACHABLE_POLLS unreachable polls and ${PROGRESS_TIMEOUT}s without a new checkpoint"
  else
    UNREACHABLE=0
    recreate "READY but unreachable, $(health_text), no new checkpoint for ${quiet}s" ||
      info "recreating failed; retrying after the next poll"
  fi
}

do_supervise() {
  local rc state_rc qs transition_since=-1 transition_timeout=1800 last="" why
  export CLOUDSDK_CORE_DISABLE_PROMPTS=1
  local kind=on-demand
  if ((SPOT)); then kind=spot; fi
  if ((QUEUED)); then kind+=", queued"; fi
  info "supervising TPU $NAME ($ACCEL, $kind) until $WORKDIR/FINISHED exists"
  # Without a readable workdir the FINISHED marker cannot be seen, and a
  # finished run would be started again and again: refuse to start.
  rc=0
  gcs_ls "$WORKDIR/" || rc=$?
  if ((rc == 2)); then
    info "cannot list $WORKDIR/ (supervise reads FINISHED and checkpoints/ there). gcloud said:"
    show_error
    die "check the bucket name, 'gcloud auth login' and your storage permissions, then rerun"
  fi
  if [[ -z $REPO_URL ]]; then prepare_tarball; fi # deploy the same code on every recreation
  while :; do
    rc=0
    run_finished || rc=$?
    if ((rc == 0)); then
      info "run finished: $WORKDIR/FINISHED exists"
      if ((DELETE_WHEN_FINISHED)); then
        do_delete
      else
        info "the TPU still exists and is billed; run 'tools/cluster/$PROG delete' when done"
      fi
      return 0
    elif ((rc == 2)); then
      api_error "reading $WORKDIR/FINISHED"
      continue
    fi
    state_rc=0
    describe_tpu || state_rc=$?
    if ((state_rc == 2)); then
      api_error "describing TPU $NAME"
      continue
    fi
    API_ERRORS=0
    if ((state_rc == 1)); then TPU_STATE=MISSING; fi
    if [[ "$TPU_STATE ($TPU_HEALTH)" != "$last" ]]; then
      info "TPU $NAME: $TPU_STATE ($(health_text))"
      last="$TPU_STATE ($TPU_HEALTH)"
    fi
    case $TPU_STATE in
      READY)
        transition_since=-1
        check_launcher
        if [[ $LAUNCHER != unreachable ]]; then UNREACHABLE=0; fi
        case $LAUNCHER in
          running) ;;
          unreachable) handle_unreachable ;;
          fatal)
            why=$([[ $LAUNCHER_CODE == "$STATUS_DIVERGED" ]] && echo "training diverged" || echo "bad input: configuration, data, workdir or checkpoints")
            collect_logs "exit$LAUNCHER_CODE" || true
            give_up "the launcher exited with status $LAUNCHER_CODE ($why; workers: $LAUNCHER_CODES): retrying cannot help${LAST_LOGS:+; logs in $LAST_LOGS}"
            ;;
          *)
            # Stopped on some worker: make sure the run is not just finished.
            rc=0
            run_finished || rc=$?
            if ((rc == 0)); then continue; fi
            if ((rc == 2)); then
              api_error "reading $WORKDIR/FINISHED"
              continue
            fi
            case $LAUNCHER in
              failed)
                collect_logs "exit$LAUNCHER_CODE" || true
                count_failure "$LAUNCHER_CODE"
                ;;
              retriable)
                if [[ $LAUNCHER_CODE == "$STATUS_STALLED" ]]; then collect_logs "exit$LAUNCHER_CODE" || true; fi
                info "the launcher stopped with retriable exit status $LAUNCHER_CODE (workers: $LAUNCHER_CODES)"
                ;;
              *) info "the launcher is not running on every worker (workers: $LAUNCHER_CODES)" ;;
            esac
            count_restart "starting the launcher again"
            relaunch || info "starting the launcher failed; retrying after the next poll"
            ;;
        esac
        ;;
      CREATING | STARTING | RESTARTING | REPAIRING | REIMAGING | STOPPING | DELETING | \
        HIDING | UNHIDING | UNKNOWN | STATE_UNSPECIFIED)
        if ((transition_since < 0)); then transition_since=$SECONDS; fi
        if ((SECONDS - transition_since > transition_timeout)); then
          transition_since=-1
          recreate "stuck in $TPU_STATE for ${transition_timeout}s" || info "recreating failed; retrying after the next poll"
        fi
        ;;
      *) # MISSING (NOT_FOUND), PREEMPTED, TERMINATED, STOPPED, HIDDEN, ...
        if ((QUEUED)) && [[ $TPU_STATE == MISSING ]] && ((!DRY_RUN)); then
          # A queued request still waiting for capacity keeps its place in
          # the queue; an ACTIVE one without its TPU gets the transition timeout.
          rc=0
          qr_state || rc=$?
          if ((rc == 2)); then
            api_error "describing queued resource $NAME"
            continue
          fi
          qs=$QR_STATE
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
        if recreate "$TPU_STATE" "$([[ $TPU_STATE == MISSING ]] && echo missing)"; then
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
        info "queued resource $NAME requested; 'tools/cluster/$PROG status --queued' shows its state (train after setup once it is ACTIVE)"
      fi
    fi
    ;;
  setup) do_setup ;;
  train)
    do_train
    info "started; follow with 'tools/cluster/$PROG logs', stop with 'tools/cluster/$PROG stop'"
    ;;
  status) do_status ;;
  logs)
    if ((ALL_WORKERS)); then collect_logs logs; else do_logs; fi
    ;;
  stop) do_stop ;;
  delete) do_delete ;;
  supervise) do_supervise ;;
esac
