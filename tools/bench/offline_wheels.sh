#!/usr/bin/env bash
# Downloads, into .whl/ at the repository root, the Python 3.12 x86-64 wheels of this
# project's dependencies that a prebuilt JAX image usually lacks (such images ship jax, flax,
# optax and orbax), for a benchmark machine that cannot reach a package registry. Copy .whl
# there and pass --wheels=.whl to tools.bench.suite. What these packages need besides
# (absl-py, etils, cloudpickle, numpy, protobuf, PyYAML, psutil) comes with such images.
# OpenCV (a 58 MB wheel) is left out: it would not fit a 64 MiB transfer beside the tree, and
# without it the input pipeline resizes with PIL (same crops); simplejpeg is small.
set -euo pipefail
cd "$(dirname "$0")/../.."

WHEELS=(grain==0.2.18 array-record==0.8.6 tensorboardX==2.6.5 ml-collections==1.1.0
        portpicker==1.6.0 simplejpeg==1.9.0)
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64
           manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)

mkdir -p .whl
grep -qxF "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
args=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .whl)
for platform in "${PLATFORMS[@]}"; do args+=(--platform "$platform"); done
python3 -m pip download -q "${args[@]}" "${WHEELS[@]}"
ls -l .whl
