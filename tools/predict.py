r"""Top-5 classes for images, from a run's checkpoint or an exported weights directory.

    python -m tools.predict --workdir=/runs/r50 photo.jpg more/ [--step=N] [--top=5] [--json]
    python -m tools.predict --weights=/models/r50 photo.jpg

Images (files, or folders searched recursively for image files) get the eval transform the
model was trained with (centre crop of `eval_crop_fraction`, resized to `image_size`) and are
classified in batches. Each line names the image and its top classes with probabilities,
class names from the dataset's metadata; `--json` prints one JSON object per image instead.
An image that cannot be classified (unreadable, not an image, too many pixels to decode
safely) is named on stderr with the reason, the others are classified, and the tool exits 1
(failed) at the end. Other expected failures print one `error: ...` line: an array that does
not match its SHA-256 exits 1 (failed); no weights folder, no trustworthy checkpoint or bad
flags exit 2 (bad input).
"""

from __future__ import annotations

import json
import os
import sys
import warnings

from absl import app, flags

from launch.status import ExitStatus
from pipeline.conversion.images import IMAGE_EXTENSIONS  # what the converter reads
from tools import cli

FLAGS = flags.FLAGS


def _define_flags() -> None:
    flags.DEFINE_string("workdir", None, "A run's workdir: its newest trustworthy checkpoint.")
    flags.DEFINE_string(
        "weights", None, "A weights directory (tools.export, tools.import_torchvision)."
    )
    flags.DEFINE_integer("step", None, "With --workdir: this step.")
    flags.DEFINE_integer("top", 5, "Classes shown per image.", lower_bound=1)
    flags.DEFINE_integer("batch_size", 64, "Images classified at once.", lower_bound=1)
    flags.DEFINE_bool("json", False, "One JSON object per image instead of text.")


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
        else:  # a missing or unreadable file is named with the images that fail
            files.append(path)
    return files


class ImageError(Exception):
    """One image cannot be classified; the message says why (the path is added by the caller)."""


def _open_image(path: str, channels: int):
    """The whole image decoded in the model's mode (as `pipeline.transforms.decode_image`)."""
    from PIL import Image  # pylint: disable=g-import-not-at-top

    try:
        with warnings.catch_warnings():
            # Above PIL's pixel limit decoding could take gigabytes: refuse it for that image.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                image = opened.convert("L" if channels == 1 else "RGB")
                image.load()
                return image
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"too many pixels to decode safely ({e})") from None
    except Image.UnidentifiedImageError:
        raise ImageError("not an image file that PIL can read") from None
    except OSError as e:
        if e.strerror:  # the file itself could not be read
            raise ImageError(f"cannot read the file ({e.strerror})") from None
        raise ImageError(f"cannot decode the image ({e})") from None
    except Exception as e:  # PIL raises many exception types for damaged files
        raise ImageError(f"cannot decode the image ({type(e).__name__}: {e})") from None


def prepare(path: str, preprocessing: dict, channels: int):
    """The eval transform of training, from an image file; ImageError says why not."""
    from pipeline import transforms  # pylint: disable=g-import-not-at-top

    image = _open_image(path, channels)
    return transforms.center_crop(
        image, preprocessing["image_size"], channels, preprocessing["eval_crop_fraction"]
    )


def _batches(files: list[str], weights, batch_size: int, failures: list[tuple[str, str]]):
    """Batches of (path, pixels) of the images that decode, in `files` order; each one that does
    not is appended to `failures` as (path, why)."""
    batch = []
    for path in files:
        try:
            batch.append((path, prepare(path, weights.preprocessing, weights.model["in_channels"])))
        except ImageError as e:
            failures.append((path, str(e)))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _top_classes(path: str, probs, names, top: int) -> dict:
    import numpy as np  # pylint: disable=g-import-not-at-top

    best = np.argsort(-probs, kind="stable")[:top]
    return {
        "image": path,
        "top": [{"class": names[i], "index": int(i), "probability": float(probs[i])} for i in best],
    }


def predict(weights, files: list[str], top: int, batch_size: int):
    """(results, failures): the top classes of every image that decodes, in `files` order,
    and (path, why) for every image that does not."""
    # pylint: disable=g-import-not-at-top
    import numpy as np

    import resnet.from_weights

    names = weights.class_names or tuple(str(i) for i in range(weights.model["num_classes"]))
    predictor = None  # built (and compiled) once an image has decoded
    results: list[dict] = []
    failures: list[tuple[str, str]] = []
    for batch in _batches(files, weights, batch_size, failures):
        if predictor is None:
            predictor = resnet.from_weights.Predictor(weights)
        logits = np.asarray(predictor(np.stack([pixels for _, pixels in batch])), np.float64)
        probs = np.exp(logits - logits.max(1, keepdims=True))
        probs /= probs.sum(1, keepdims=True)
        results += [_top_classes(path, p, names, top) for (path, _), p in zip(batch, probs)]
    return results, failures


def _load(path: str, is_workdir: bool, step: int | None):
    """The weights of `--weights`, or of `--workdir` (its checkpoint, or a weights folder)."""
    # pylint: disable=g-import-not-at-top
    import resnet.weights
    from launch import checkpoint_weights

    if is_workdir:
        return checkpoint_weights.load_weights(path, step)
    if step is not None:
        raise ValueError("--step chooses a checkpoint of --workdir; a weights folder has one")
    return resnet.weights.load(path)


def _report(results: list[dict], as_json: bool) -> None:
    for r in results:
        if as_json:
            print(json.dumps(r))
        else:
            tops = ", ".join(f"{t['class']} {t['probability']:.3f}" for t in r["top"])
            print(f"{r['image']}: {tops}")


def predict_command(
    paths: list[str],
    *,
    workdir: str | None = None,
    weights: str | None = None,
    step: int | None = None,
    top: int = 5,
    batch_size: int = 64,
    as_json: bool = False,
) -> int:
    """The command: prints the classes of every image it can classify, names the others (and
    why) on stderr, then one error line if any failed; returns the exit status."""
    from launch import checkpointing  # pylint: disable=g-import-not-at-top

    with cli.quiet_libraries():
        try:
            files = image_files(paths)
            if not files:
                raise FileNotFoundError("no images given (files or folders after the flags)")
            loaded = _load(workdir or weights or "", workdir is not None, step)
            results, failures = predict(loaded, files, top, batch_size)
        except (
            FileNotFoundError,
            ValueError,
            OSError,
            checkpointing.NoUsableCheckpoint,
            checkpointing.IncompatibleCheckpoint,
        ) as e:
            return cli.fail(e)
    _report(results, as_json)
    sys.stdout.flush()
    for path, why in failures:
        print(f"{path}: not classified: {why}", file=sys.stderr)
    if failures:
        named = ", ".join(path for path, _ in failures[:5])
        more = f" and {len(failures) - 5} more" if len(failures) > 5 else ""
        return cli.fail(
            f"{len(failures)} of {len(files)} images could not be classified: {named}{more} "
            "(why: the lines above)",
            ExitStatus.FAILED,
        )
    return 0


def main(argv):
    if (FLAGS.workdir is None) == (FLAGS.weights is None):
        raise app.UsageError("give exactly one of --workdir and --weights")
    return predict_command(
        argv[1:],
        workdir=FLAGS.workdir,
        weights=FLAGS.weights,
        step=FLAGS.step,
        top=FLAGS.top,
        batch_size=FLAGS.batch_size,
        as_json=FLAGS.json,
    )


if __name__ == "__main__":
    _define_flags()
    cli.run(main)
