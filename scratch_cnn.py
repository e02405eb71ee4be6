"""A wide, shallow CNN (airbench-style) trained from scratch on CIFAR-10 at 32x32.

    python scratch_cnn.py                                   # full run (defaults below)
    python scratch_cnn.py --epochs=3 --train_images=5000    # quick CPU check
    python scratch_cnn.py --resume=last                     # go on with an interrupted run

Result: 84.7% test accuracy on CIFAR-10 (JPEG copy) with the defaults, mean of seeds 0,
1 and 2 (84.65%, 84.40%, 84.92%; 83.5% without flip averaging; the report's CNN: ~72%),
8 epochs in 1,591 s on both cores of a 2-core AMD EPYC CPU (seed 2, 234 images/s;
seeds 0 and 1: 2,774 s and 2,564 s on one core; `python scratch_cnn.py --data_dir=...
--seed=S`). README, Results: the recipe change by change, and 5,000 training images.
"""

import settings

settings.check_command_line(__name__, __file__)  # --help, bad flags: before TF loads

import keras

import data
import training

# ---------------------------------------------------------------------------------
# Config (python scratch_cnn.py --name=value overrides any of these)

DATA_DIR = ""  # CIFAR-10 folder or .tar.gz, or class folders (README); "" = find CIFAR-10
TRAIN_IMAGES = 0  # training images to use, stratified; 0 = all 50,000
VAL_FRACTION = 0.1  # share of the training images held out for validation
TEST_FRACTION = 0.2  # class folders without test/: share of train/ held out to test
IMG_SIZE = 32  # pixels: the side images are resized to; 32 = native
BATCH_SIZE = 128  # images per step
AUGMENT_FLIP = True  # random horizontal flips
AUGMENT_TRANSLATE = 0.125  # random shifts with reflect padding, fraction of the side
AUGMENT_ROTATE = 0.0  # random rotation, fraction of a full turn (0 = off)
AUGMENT_ZOOM = 0.0  # random zoom, fraction of the side (0 = off)
AUGMENT_CONTRAST = 0.0  # random contrast change, fraction (0 = off)
STEM_WIDTH = 24  # filters of the 3x3 convolution before the blocks
WIDTH = 40  # filters in the first block, doubled in each next one; 40 = 0.46M params
DROPOUT = 0.0  # dropout rate after each block; short runs underfit, so off
BATCHNORM_MOMENTUM = 0.9  # moving-average momentum; Keras's 0.99 settles too slowly
EPOCHS = 8  # passes over the training images: about 27 min on a 2-core CPU, 45 on one core
STEPS_PER_EPOCH = 0  # batches per epoch; 0 = the whole training set
OPTIMIZER = "sgd"  # "sgd" (with Nesterov momentum) or "adamw"
MOMENTUM = 0.9  # SGD's Nesterov momentum; unused by adamw
LEARNING_RATE = 0.05  # peak, after warm-up; 2e-3 for adamw
# 0.05 after 16 warm-up steps blew 1,000-image runs (64 steps) up: short runs peak lower
FULL_RATE_STEPS = 256  # fewer steps: peak at LEARNING_RATE x steps / this; 0 = off
WARMUP_EPOCHS = 2  # linear warm-up from 0 (at most the whole run), then cosine to 0
WEIGHT_DECAY = 5e-3  # decoupled, times the learning rate; = coupled L2 5e-4 under
# momentum 0.9 (Keras applies it outside the momentum); about 0.05 suits adamw
LABEL_SMOOTHING = 0.1  # 0 = plain one-hot targets
TTA = "flip"  # test-time augmentation: "none", "flip" (mean with the mirror image) or
# "crops" (flip, plus 1-pixel shifts each mirrored: 6 views)
EARLY_STOPPING_PATIENCE = 0  # epochs without a better val_accuracy; 0 = off
MIXED_PRECISION = "auto"  # "off", "on" (float16 on a GPU, else bfloat16) or "auto"
# (on for GPUs and for CPUs with AMX bfloat16 units)
JIT_COMPILE = False  # XLA-compile the train step: try it on GPUs
SEED = 0  # seeds the split, shuffling, augmentation and initial weights
OUT_DIR = "runs"  # run folders go to OUT_DIR/scratch_cnn/<timestamp>/
RESUME = ""  # a run folder to go on with, "last" for the newest unfinished one
VERBOSE = 1  # 0 = quiet, 1 = progress bar, 2 = a line per epoch and all TF notices
CONFIG = settings.config_block(globals())  # the settings above: defaults for overrides

SCRIPT = "scratch_cnn"
VALUE_RANGE = (0.0, 1.0)  # inputs the network is trained on: pixels / 255


def check_config(config):
    """Checks of the settings alone: run before TensorFlow loads, and by main()."""
    settings.require(
        config["OPTIMIZER"] in ("sgd", "adamw"), "--optimizer must be sgd or adamw"
    )
    settings.require(config["EPOCHS"] > 0, "--epochs must be positive")
    settings.check_data_settings(config)
    settings.require(
        config["TTA"] in ("none", "flip", "crops"), "--tta must be none, flip or crops"
    )


# ---------------------------------------------------------------------------------
# Model


def build_model(
    image_size,
    stem_width,
    width,
    dropout,
    batchnorm_momentum,
    num_classes=data.NUM_CLASSES,
):
    """airbench-style, wide and shallow: a cheap 3x3 stem of `stem_width` filters,
    then three blocks at `width`, 2x and 4x filters of conv, max-pool, BatchNorm,
    ReLU, conv, BatchNorm, ReLU (pooling first, so each block's second conv runs at
    a quarter of the cost), then global max pooling and softmax. Dropout after each
    block if `dropout` > 0."""

    def conv_bn_relu(x, filters, name, suffix="", pool=False):
        # No bias: the BatchNorm right after has its own.
        x = keras.layers.Conv2D(
            filters, 3, padding="same", use_bias=False, name=f"{name}_conv{suffix}"
        )(x)
        if pool:
            x = keras.layers.MaxPooling2D(name=f"{name}_pool")(x)
        x = keras.layers.BatchNormalization(
            momentum=batchnorm_momentum, name=f"{name}_bn{suffix}"
        )(x)
        return keras.layers.ReLU(name=f"{name}_relu{suffix}")(x)

    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = conv_bn_relu(inputs, stem_width, "stem")
    for block in range(3):
        filters = width * 2**block
        x = conv_bn_relu(x, filters, f"block{block + 1}", "1", pool=True)
        x = conv_bn_relu(x, filters, f"block{block + 1}", "2")
        if dropout:
            x = keras.layers.Dropout(dropout, name=f"block{block + 1}_dropout")(x)
    x = keras.layers.GlobalMaxPooling2D(name="pool")(x)
    # Softmax in float32 even under mixed precision, for a stable loss.
    outputs = keras.layers.Dense(
        num_classes, activation="softmax", dtype="float32", name="classes"
    )(x)
    return keras.Model(inputs, outputs, name="scratch_cnn")


def peak_learning_rate(learning_rate, total_steps, full_rate_steps):
    """`learning_rate`, or a proportionally lower peak for a run of fewer than
    `full_rate_steps` steps: a warm-up that short reaches a high rate before the
    network has settled, and can blow the run up (0 = always `learning_rate`)."""
    if not full_rate_steps:
        return learning_rate
    return learning_rate * min(1.0, total_steps / full_rate_steps)


def make_optimizer(
    name, learning_rate, momentum, weight_decay, warmup_steps, total_steps
):
    """SGD with Nesterov momentum or AdamW, under a linear warm-up then cosine decay.
    The warm-up is capped at the run's length, so a short run still reaches the peak."""
    warmup_steps = min(warmup_steps, total_steps)
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0,
        decay_steps=max(total_steps - warmup_steps, 1),
        warmup_target=learning_rate,
        warmup_steps=warmup_steps,
    )
    if name == "sgd":
        return keras.optimizers.SGD(
            schedule, momentum=momentum, nesterov=True, weight_decay=weight_decay
        )
    return keras.optimizers.AdamW(schedule, weight_decay=weight_decay)


def compiled_model(config, train_images, num_classes, steps_per_epoch):
    """The network compiled for a run of `config` over `steps_per_epoch` steps an
    epoch (bench.py times what this returns)."""
    total_steps = config["EPOCHS"] * steps_per_epoch
    peak_rate = peak_learning_rate(
        config["LEARNING_RATE"], total_steps, config["FULL_RATE_STEPS"]
    )
    model = build_model(
        config["IMG_SIZE"],
        config["STEM_WIDTH"],
        config["WIDTH"],
        config["DROPOUT"],
        config["BATCHNORM_MOMENTUM"],
        num_classes=num_classes,
    )
    training.compile_model(
        model,
        make_optimizer(
            config["OPTIMIZER"],
            peak_rate,
            config["MOMENTUM"],
            config["WEIGHT_DECAY"],
            warmup_steps=config["WARMUP_EPOCHS"] * steps_per_epoch,
            total_steps=total_steps,
        ),
        config["LABEL_SMOOTHING"],
        config["JIT_COMPILE"],
    )
    return model


# ---------------------------------------------------------------------------------
# Train


def main(argv):
    config, run_dir = training.configure_run(CONFIG, argv, SCRIPT)
    check_config(config)
    strategy = training.distribution_strategy()  # before any tensor exists
    training.seed_everything(config["SEED"])
    precision = training.set_precision(config["MIXED_PRECISION"], strategy)
    config["BATCH_SIZE"] = training.global_batch_size(
        config["BATCH_SIZE"], strategy.num_replicas_in_sync
    )

    # Data: uint8 in memory; each batch is augmented, resized and scaled on its own
    pipelines = data.pipelines_for(config, VALUE_RANGE)
    print(f"data: {pipelines.source}; images per split: {pipelines.sizes}")

    # Model
    with strategy.scope():
        model = compiled_model(
            config, pipelines.train_images, len(pipelines.class_names),
            pipelines.steps_per_epoch,
        )  # fmt: skip
    total_steps = config["EPOCHS"] * pipelines.steps_per_epoch
    peak_rate = peak_learning_rate(
        config["LEARNING_RATE"], total_steps, config["FULL_RATE_STEPS"]
    )
    print(
        f"model: {model.name}, {model.count_params():,} parameters, "
        f"{strategy.num_replicas_in_sync} replica(s); "
        f"peak learning rate {peak_rate:.3g} over {total_steps:,} steps"
    )

    # Train
    if run_dir is None:
        run_dir = training.new_run_dir(config["OUT_DIR"], SCRIPT)
        training.save_run_config(
            run_dir,
            SCRIPT,
            config,
            pipelines.source,
            value_range=VALUE_RANGE,
            class_names=list(pipelines.class_names),
            peak_learning_rate=peak_rate,
            precision=precision,
        )
    print(f"run folder: {run_dir}")
    training.fit(
        model, pipelines, run_dir, phase="train", epochs=config["EPOCHS"],
        early_stopping_patience=config["EARLY_STOPPING_PATIENCE"], verbose=config["VERBOSE"],
    )  # fmt: skip

    # Save/Report
    training.finish(
        run_dir,
        model,
        pipelines.test,
        label_smoothing=config["LABEL_SMOOTHING"],
        tta=config["TTA"],
    )
    return run_dir


if __name__ == "__main__":
    training.cli(main)
