"""ResNet-50 on ImageNet: the standard 90-epoch recipe (Goyal et al. 2017 scaling rule).

Global batch 1024, peak LR 0.1 x 1024/256 = 0.4 after 5 warmup epochs, cosine decay,
label smoothing 0.1, weight decay 5e-5, bf16 compute. Point data.train_dir/eval_dir at
ImageNet converted with `tools.make_arrayrecord --format=imagefolder`. ArrayRecord is read
with random access from a local path: put the shards on local SSD, or mount the bucket with
gcsfuse; the workdir itself may be gs://.
"""

from configs import default


def get_config():
    config = default.get_config()
    config.model.name = "resnet50"
    config.model.num_classes = 1000
    config.data.train_dir = "/mnt/disks/imagenet/train"
    config.data.eval_dir = "/mnt/disks/imagenet/validation"
    config.data.num_workers = 16
    config.train.global_batch_size = 1024
    config.train.num_epochs = 90.0
    config.train.warmup_epochs = 5.0
    config.eval.every_epochs = 5.0
    return config
