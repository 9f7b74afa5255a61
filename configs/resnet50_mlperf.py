"""ResNet-50 v1.5 with the MLPerf Training reference hyperparameters, global batch 4,096.

Every value below comes from the MLCommons training reference for image classification
(github.com/mlcommons/training, image_classification/):
  [README]  README_tensorflow2.md, "On TPU-V3-64": the published batch-4,096 command line
  [SCHED]   tensorflow2/lars_util.py, PolynomialDecayWithWarmup (power, end learning rate)
  [OPT]     tensorflow2/common.py get_optimizer and tensorflow2/lars_optimizer.py (LARS
            arguments, skip_list ['batch_normalization', 'bias', 'bn'])
The run stops at train.num_epochs; the benchmark's quality target is 75.9% top-1 [README,
"Quality target"]. The reference evaluates every 4 epochs [README, "Evaluation frequency"].
Ghost batch norm, EMA and the reference's exact preprocessing are not reproduced here.
"""

from configs import resnet50_imagenet

GLOBAL_BATCH = 4096  # [README] --batch_size=4096
PEAK_LEARNING_RATE = 10.0  # [README] --base_learning_rate=10.0, the absolute peak for LARS [SCHED]


def get_config():
    config = resnet50_imagenet.get_config()
    train = config.train
    train.global_batch_size = GLOBAL_BATCH
    # Here the peak is base x batch / 256: 0.625 x 4096 / 256 = 10.0.
    train.base_learning_rate = PEAK_LEARNING_RATE * 256 / GLOBAL_BATCH
    train.optimizer = "lars"  # [README] --optimizer=LARS
    train.lars_epsilon = 0.0  # [README] --lars_epsilon=0
    train.lars_trust_coefficient = 0.001  # [OPT] eeta=0.001 (get_optimizer keeps the default)
    train.momentum = 0.9  # [README] --momentum=0.9
    train.nesterov = False  # [OPT] use_nesterov defaults to False; get_optimizer keeps it
    train.weight_decay = 2e-4  # [README] --weight_decay=0.0002 (kernels only [OPT] skip_list)
    train.lr_schedule = "polynomial"  # [README] --lr_schedule=polynomial
    train.polynomial_power = 2.0  # [SCHED] power=2.0
    train.end_learning_rate = 1e-4  # [SCHED] end_learning_rate defaults to 0.0001
    train.warmup_epochs = 5.0  # [README] --warmup_epochs=5
    train.label_smoothing = 0.1  # [README] --label_smoothing=0.1
    train.num_epochs = 42.0  # [README] --train_epochs=42 (to the 75.9% target)
    config.eval.every_epochs = 4.0  # [README] --epochs_between_evals=4
    return config
