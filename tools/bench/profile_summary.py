r"""Where device time goes, from a `jax.profiler` trace: time per op and per op kind.

  python -m tools.bench.profile_summary TRACE_DIR [--top=25]

Reads the newest `*.xplane.pb` (or `.xplane.pb.gz`) under TRACE_DIR with
`jax.profiler.ProfileData` (no TensorBoard plugin needed). On GPU the device plane has an
"XLA Ops" line, one event per HLO op execution; ops are grouped by name and by kind
(convolution, fusion kind, copy, all-reduce, ...), so the table says whether convolutions,
BatchNorm fusions, pooling or the optimizer dominate. Where there is no device plane (CPU),
the XLA ops on host threads are summarised.
"""

from __future__ import annotations

import collections
import glob
import gzip
import os
import re
import sys

from absl import app, flags

# Event stats that name an op's kind, in order of preference (XLA GPU profiler names).
_KIND_STATS = ("hlo_category", "category")


def newest_trace(trace_dir: str) -> str:
    pattern = os.path.join(trace_dir, "**", "*.xplane.pb")
    paths = glob.glob(pattern, recursive=True) + glob.glob(pattern + ".gz", recursive=True)
    if not paths:
        raise FileNotFoundError(f"no *.xplane.pb(.gz) under {trace_dir}")
    return max(paths, key=os.path.getmtime)


def _kind(name: str, stats: dict) -> str:
    for key in _KIND_STATS:
        if stats.get(key):
            return str(stats[key])
    long_name = str(stats.get("long_name", ""))
    match = re.search(r"kind=k(\w+)", long_name)
    if match:
        return f"{match.group(1).lower()} fusion"
    return re.sub(r"[.\d]+$", "", name)  # "fusion.123" -> "fusion"


def _is_host_op(name: str) -> bool:
    # Leaves only XLA's own ops: Python frames start with "$", runtime wrappers (which
    # contain the ops and would count them twice) have "::" or "(" in their names.
    return not (name.startswith("$") or "::" in name or "(" in name)


def _device_events(plane):
    """Per-op events of one device plane: the 'XLA Ops' line if there is one, else streams."""
    lines = {line.name: line for line in plane.lines}
    if "XLA Ops" in lines:
        return list(lines["XLA Ops"].events)
    return [e for name, line in lines.items() if "Stream" in name for e in line.events]


def summarize(path: str, top: int = 25) -> str:
    from jax.profiler import ProfileData  # imported late: the module parses flags without jax

    if path.endswith(".gz"):
        with gzip.open(path, "rb") as f:
            data = ProfileData.from_serialized_xspace(f.read())
    else:
        data = ProfileData.from_file(path)
    devices = [p for p in data.planes if p.name.startswith("/device:")]
    by_name, by_kind = collections.Counter(), collections.Counter()
    counts = collections.Counter()
    source = ", ".join(p.name for p in devices) or "/host:CPU (no device plane)"
    if devices:
        events = [e for p in devices for e in _device_events(p)]
    else:
        host = data.find_plane_with_name("/host:CPU")
        events = [e for line in host.lines for e in line.events if _is_host_op(e.name)]
    for event in events:
        stats = dict(event.stats)
        ns = float(event.duration_ns)
        by_name[event.name] += ns
        by_kind[_kind(event.name, stats)] += ns
        counts[event.name] += 1
    total = sum(by_name.values()) or 1.0
    out = [f"trace {path}", f"events from {source}: {len(events)}, {total / 1e6:.2f} ms in all"]
    out.append(f"{'kind':<40} {'ms':>10} {'share':>7}")
    for kind, ns in by_kind.most_common(top):
        out.append(f"{kind[:40]:<40} {ns / 1e6:>10.3f} {100 * ns / total:>6.1f}%")
    out.append(f"{'op':<60} {'calls':>6} {'ms':>10} {'share':>7}")
    for name, ns in by_name.most_common(top):
        out.append(f"{name[:60]:<60} {counts[name]:>6} {ns / 1e6:>10.3f} {100 * ns / total:>6.1f}%")
    return "\n".join(out)


def main(argv):
    if len(argv) != 2:
        raise app.UsageError("usage: python -m tools.bench.profile_summary TRACE_DIR")
    try:
        print(summarize(newest_trace(argv[1]), flags.FLAGS.top))
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    flags.DEFINE_integer("top", 25, "Rows per table.")
    app.run(main)
