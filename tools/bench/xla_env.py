"""XLA_FLAGS for the benchmarks, decided before JAX starts (XLA reads them once, at start).

No jax import here: these run before any backend exists.
"""

from __future__ import annotations

import importlib.util
import os

# Added on GPU unless XLA_FLAGS already sets the same flag. The latency-hiding scheduler
# overlaps the gradient all-reduce with the backward pass on multi-GPU meshes; autotune
# level 4 pins XLA's fullest cuDNN/GEMM algorithm search so a figure does not depend on the
# XLA release's default.
GPU_XLA_FLAGS = ("--xla_gpu_enable_latency_hiding_scheduler=true", "--xla_gpu_autotune_level=4")


def gpu_expected() -> bool:
    """Whether JAX will pick a GPU backend, decided without initialising one."""
    platforms = os.environ.get("JAX_PLATFORMS", "").lower()
    if platforms:
        return any(p in ("cuda", "gpu", "rocm") for p in platforms.split(","))
    plugins = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin")
    return any(importlib.util.find_spec(p) is not None for p in plugins)


def _missing(current: str, extra) -> list[str]:
    return [f for f in extra if f.split("=")[0] not in current]


def with_flags(current: str, extra) -> str:
    """`current` XLA_FLAGS plus those of `extra` whose flag name it does not set yet."""
    return " ".join([current, *_missing(current, extra)]).strip()


def set_gpu_xla_flags() -> list[str]:
    """Adds GPU_XLA_FLAGS to os.environ's XLA_FLAGS; returns those added."""
    current = os.environ.get("XLA_FLAGS", "")
    added = _missing(current, GPU_XLA_FLAGS)
    os.environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
    return added
