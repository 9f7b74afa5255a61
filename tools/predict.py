r"""Top-5 classes for images, from a run's checkpoint or an exported weights directory.

    python -m tools.predict --workdir=/runs/r50 photo.jpg more/ [--step=N] [--top=5] [--json]
    python -m tools.predict --weights=/models/r50 photo.jpg

Images (files, or folders searched recursively for image files) get the eval transform the
model was trained with (centre crop of `eval_crop_fraction`, resized to `image_size`) and are
classified in batches. Each line names the image and its top classes with probabilities,
class names from the dataset's metadata; `--json` prints one JSON object per image instead.
Expected failures print one line and exit 1.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

from pipeline.conversion.images import IMAGE_EXTENSIONS  # what the converter reads

flags.DEFINE_string("workdir", None, "A run's workdir: its newest trustworthy checkpoint.")
flags.DEFINE_string(
    "weights", None, "A weights directory (tools.export, tools.import_torchvision)."
)
flags.DEFINE_integer("step", None, "With --workdir: this step.")
flags.DEFINE_integer("top", 5, "Classes shown per image.", lower_bound=1)
flags.DEFINE_integer("batch_size", 64, "Images classified at once.", lower_bound=1)
flags.DEFINE_bool("json", False, "One JSON object per image instead of text.")
FLAGS = flags.FLAGS


def image_files(paths: list[str]) -> list[str]:
    files = []
    for path in paths:
        if os.path.isdir(path):
            for root, _, names in sorted(os.walk(path)):
                files += [
                    os.path.join(root, n)
                    for n in sorted(names)
                    if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS
                ]
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise FileNotFoundError(f"{path} does not exist")
    return files


def prepare(path: str, preprocessing: dict, channels: int):
    """The eval transform of training, from an image file."""
    from pipeline import transforms  # pylint: disable=g-import-not-at-top

    with open(path, "rb") as f:
        image = transforms.decode_image(f.read(), channels)
    return transforms.center_crop(
        image, preprocessing["image_size"], channels, preprocessing["eval_crop_fraction"]
    )


def predict(weights, files: list[str], top: int, batch_size: int) -> list[dict]:
    # pylint: disable=g-import-not-at-top
    import numpy as np

    import resnet.weights

    predictor = resnet.weights.Predictor(weights)
    names = weights.class_names or tuple(str(i) for i in range(weights.model["num_classes"]))
    channels = weights.model["in_channels"]
    results = []
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        images = np.stack([prepare(f, weights.preprocessing, channels) for f in chunk])
        logits = np.asarray(predictor(images), np.float64)
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        for path, p in zip(chunk, probs):
            best = np.argsort(-p, kind="stable")[:top]
            results.append(
                {
                    "image": path,
                    "top": [
                        {"class": names[i], "index": int(i), "probability": float(p[i])}
                        for i in best
                    ],
                }
            )
    return results


def main(argv):
    if (FLAGS.workdir is None) == (FLAGS.weights is None):
        raise app.UsageError("give exactly one of --workdir and --weights")
    from launch import checkpointing, inference  # pylint: disable=g-import-not-at-top

    try:
        files = image_files(argv[1:])
        if not files:
            raise FileNotFoundError("no images given (files or folders after the flags)")
        weights = inference.load_weights(FLAGS.workdir or FLAGS.weights, FLAGS.step)
        results = predict(weights, files, FLAGS.top, FLAGS.batch_size)
    except (
        FileNotFoundError,
        ValueError,
        OSError,
        checkpointing.NoUsableCheckpoint,
        checkpointing.IncompatibleCheckpoint,
    ) as e:
        print(f"predict: error: {e}", file=sys.stderr)
        return 1
    for r in results:
        if FLAGS.json:
            print(json.dumps(r))
        else:
            tops = ", ".join(f"{t['class']} {t['probability']:.3f}" for t in r["top"])
            print(f"{r['image']}: {tops}")
    return 0


if __name__ == "__main__":
    app.run(main)
