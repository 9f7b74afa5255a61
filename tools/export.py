r"""Exports a run's parameters for inference: no optimizer state, float32 or bfloat16.

    python -m tools.export --workdir=/runs/r50 --output=/models/r50 [--step=N] [--dtype=bfloat16] \
        [--ema]

Reads the newest trustworthy checkpoint of the run (or `--step`), checked against its digest
as a resume would, and writes a `resnet.weights` directory: model.json (the model, its input
preprocessing, class names and a SHA-256 of every array, checked on every load) and the
arrays. `--ema` writes the moving average of the parameters and BatchNorm statistics that a
run with train.ema_decay > 0 keeps, instead of the weights themselves. Use it from Python:

    import resnet.from_weights
    predict = resnet.from_weights.load_for_inference("/models/r50")
    logits = predict(images)  # uint8 (N, H, W, C), prepared like the eval transform

or with `python -m tools.predict --weights=/models/r50 IMAGE...`. The output must be a new
folder outside any run's checkpoints folder. Expected failures (no trustworthy checkpoint, an
existing output, an output among checkpoints, `--ema` for a run without an average) print one
`error: ...` line, write nothing and exit 2 (bad input).
"""

from __future__ import annotations

from absl import app, flags

from tools import cli

FLAGS = flags.FLAGS


def _define_flags() -> None:
    flags.DEFINE_string("workdir", None, "The run's workdir (or its checkpoints folder).")
    flags.DEFINE_string("output", None, "New weights directory (must not exist).")
    flags.DEFINE_integer("step", None, "Export this step (default: the newest trustworthy one).")
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Stored dtype of the arrays.")
    flags.DEFINE_bool("ema", False, "Export the moving average (train.ema_decay) of the weights.")
    flags.mark_flags_as_required(["workdir", "output"])


def export(
    workdir: str, output: str, step: int | None = None, dtype: str = "float32", ema: bool = False
) -> int:
    """The command: exports, prints what it wrote or one error line; returns the exit status."""
    from launch import checkpoint_weights, checkpointing  # pylint: disable=g-import-not-at-top

    with cli.quiet_libraries():
        try:
            weights = checkpoint_weights.export(workdir, output, step, dtype, ema=ema)
        except (
            checkpointing.NoUsableCheckpoint,
            checkpointing.IncompatibleCheckpoint,
            FileExistsError,
            ValueError,
        ) as e:
            return cli.fail(e)
    source = weights.metadata["step"]
    what = ", moving average" if ema else ""
    print(
        f"exported step {source} of {workdir} ({weights.model['name']}, {dtype}{what}) to {output}"
    )
    return 0


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    return export(FLAGS.workdir, FLAGS.output, FLAGS.step, FLAGS.dtype, FLAGS.ema)


if __name__ == "__main__":
    _define_flags()
    cli.run(main)
