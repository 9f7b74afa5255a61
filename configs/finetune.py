"""Fine-tunes an ImageNet ResNet-50 (torchvision's weights, imported) on a small ImageFolder.

    # once: torchvision's weights into this project's format, and the data into ArrayRecord
    python -m tools.import_torchvision --model=resnet50 --weights=resnet50-11ad3fa6.pth \
        --output=/models/resnet50-imagenet --class_names=imagenet
    python -m tools.make_arrayrecord --format=imagefolder --input=/data/flowers/train \
        --output=/data/flowers_ar/train --shorter_side=256
    python -m tools.make_arrayrecord --format=imagefolder --input=/data/flowers/val \
        --output=/data/flowers_ar/val --shorter_side=256

    python -m launch.main --config=configs/finetune.py --workdir=/runs/flowers \
        --config.model.init_from=/models/resnet50-imagenet --config.model.num_classes=102 \
        --config.data.train_dir=/data/flowers_ar/train --config.data.eval_dir=/data/flowers_ar/val

`model.init_from` brings the parameters and BatchNorm statistics; the classifier head is
initialised afresh when `model.num_classes` differs from the weights' 1000 (the log says so).
Nothing else of the source is carried over: the optimizer starts fresh at step 0. The first
evaluation (`eval.at_start`) shows where the fine-tuning starts from. Usual overrides: the
learning rate (`train.base_learning_rate`, per 256 images), `train.num_epochs`,
`train.global_batch_size`, `data.num_workers`. The input normalisation must stay torchvision's
(the defaults below), since the imported weights were trained with it.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model.name = "resnet50"
    config.model.num_classes = 102  # the new dataset's classes (must match its metadata)
    config.model.init_from = "/models/resnet50-imagenet"
    config.model.zero_init_residual = (
        False  # irrelevant: every variable is initialised from the weights
    )
    config.data.train_dir = "/data/flowers_ar/train"
    config.data.eval_dir = "/data/flowers_ar/val"
    config.data.num_workers = 8
    config.train.global_batch_size = 64
    config.train.num_epochs = 20.0
    config.train.base_learning_rate = 0.04  # 0.01 at batch 64: a tenth of training from scratch
    config.train.warmup_epochs = 1.0
    config.train.weight_decay = 1e-4
    config.train.label_smoothing = 0.1
    config.eval.at_start = True
    config.eval.every_epochs = 2.0
    return config
