"""Run by tests in several processes (via launch.local_cluster): feeds the real pipeline into
global arrays and writes what this host loaded and what the global arrays hold as JSON."""

import json
import os

import numpy as np
from absl import app, flags

from tests import probe_cluster

flags.DEFINE_string("train_dir", None, "Train dataset.")
flags.DEFINE_string("eval_dir", None, "Eval dataset.")
flags.DEFINE_string("out", None, "Folder for process_<i>.json.")
flags.DEFINE_integer("global_batch_size", 8, "")
flags.DEFINE_integer("num_steps", 6, "")
flags.DEFINE_integer("start_step", 0, "First global step read (a resumed run's position).")
FLAGS = flags.FLAGS


def main(_):
    probe_cluster.join(heartbeat_timeout_seconds=10)
    import jax  # pylint: disable=g-import-not-at-top
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    from launch import distributed  # pylint: disable=g-import-not-at-top
    from pipeline import dataset, global_batches, transforms  # pylint: disable=g-import-not-at-top

    mesh = distributed.make_mesh()
    sharding = distributed.batch_sharding(mesh)
    batch = FLAGS.global_batch_size
    rows = global_batches.host_rows(sharding, batch)
    info = dataset.load_info(FLAGS.train_dir)
    aug = transforms.Augmentation(
        image_size=12, channels=1, crop_scale=(0.5, 1.0), random_flip=False
    )
    train = dataset.train_dataset(
        info,
        rows=rows,
        global_batch_size=batch,
        num_steps=FLAGS.num_steps,
        seed=3,
        augmentation=aug,
        start_step=FLAGS.start_step,
    )
    loaded = [b["example_id"].tolist() for b in train]  # what this host read, per step
    global_ids, shapes, specs = [], [], []
    for b in global_batches.DeviceIterator(train, sharding, batch):
        shapes.append(list(b["image"].shape))
        specs.append(list(b["image"].sharding.spec))
        global_ids.append(
            np.asarray(multihost_utils.process_allgather(b["example_id"], tiled=True)).tolist()
        )

    eval_info = dataset.load_info(FLAGS.eval_dir)
    eval_data = dataset.eval_dataset(
        eval_info, rows=rows, global_batch_size=batch, image_size=12, crop_fraction=1.0
    )
    eval_ids, mask_total = [], 0.0
    for b in global_batches.DeviceIterator(eval_data, sharding, batch):
        ids = np.asarray(multihost_utils.process_allgather(b["example_id"], tiled=True))
        mask = np.asarray(multihost_utils.process_allgather(b["mask"], tiled=True))
        eval_ids += ids[mask > 0].tolist()
        mask_total += float(jax.jit(lambda m: m.sum())(b["mask"]))

    result = {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "rows": rows.tolist(),
        "loaded": loaded,
        "global_ids": global_ids,
        "shapes": shapes,
        "specs": specs,
        "eval_ids": eval_ids,
        "mask_total": mask_total,
        "steps_per_epoch": dataset.steps_per_epoch(info.num_examples, batch),
    }
    os.makedirs(FLAGS.out, exist_ok=True)
    with open(os.path.join(FLAGS.out, f"process_{jax.process_index()}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    app.run(main)
