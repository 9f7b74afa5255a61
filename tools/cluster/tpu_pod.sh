#!/usr/bin/env bash
# tpu_pod.sh: Cloud TPU VM slices for the multi-host launcher. The tool itself is Python
# (python -m tools.cluster.tpu_pod, standard library only); this runs it from any folder.
# `tools/cluster/tpu_pod.sh help` shows the usage. $TPU_POD_PYTHON picks the interpreter.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" exec "${TPU_POD_PYTHON:-python3}" -m tools.cluster.tpu_pod "$@"
