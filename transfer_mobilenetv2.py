"""MobileNetV2 from ImageNet weights fine-tuned on CIFAR-10 resized to 96x96, in two
phases: a new head on the frozen base, then the base but its first 10 layers.

    python transfer_mobilenetv2.py                   # full run: ImageNet weights, 96 px
    python transfer_mobilenetv2.py --train_images=2000 \
        --head_epochs=1 --fine_tune_epochs=1         # quick CPU check, a few minutes
    python transfer_mobilenetv2.py --weights=none    # random start: ImageNet's worth
    python transfer_mobilenetv2.py --weights=PATH    # offline: a weights file, such as
        # mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_96_no_top.h5
    python transfer_mobilenetv2.py --resume=last     # go on with an interrupted run

Result: a TARGET of 95%+ test accuracy at 96 px with ImageNet weights and the defaults,
not measurable here (the weights cannot be downloaded; public Keras runs at 96 px report
about 88%; the report fed MobileNetV2 [0, 1] inputs where it expects [-1, 1]). The
random-weights control on CIFAR-10 (JPEG copy): 84.67% test accuracy from all 45,000
training images in 15 epochs (`--weights=none`, seed 0; 4.6 hours on a 2-core AMD EPYC
CPU), the scratch CNN's level in 10 times its time; 19.9% from 1,000 images and 37.4%
from 2,500 in 5 epochs (mean of seeds 0 and 1; `python study.py ...`, README Results).
Speed: 87-104 images/s end to end while fine-tuning at 96 px (44 in a random start),
1.75 GB peak memory on 50,000 images (the report's resize-everything way: 17.5 GB),
from `python bench.py` on that CPU's two cores on two days, no GPU.
"""

import settings

settings.check_command_line(__name__, __file__)  # --help, bad flags: before TF loads

import warnings
from pathlib import Path

import keras

import data
import training

# ---------------------------------------------------------------------------------
# Config (python transfer_mobilenetv2.py --name=value overrides any of these)

DATA_DIR = ""  # CIFAR-10 folder or .tar.gz, or class folders (README); "" = find CIFAR-10
TRAIN_IMAGES = 0  # training images to use, stratified; 0 = all 50,000
VAL_FRACTION = 0.1  # share of the training images held out for validation
TEST_FRACTION = 0.2  # class folders without test/: share of train/ held out to test
IMG_SIZE = 96  # pixels: the side images are resized to; ImageNet weights: 96-224 by 32
BATCH_SIZE = 64  # images per step; 128 runs no faster on CPU and peaks at 2.3 GB, not 1.7
AUGMENT_FLIP = True  # random horizontal flips
AUGMENT_TRANSLATE = 0.125  # random shifts with reflect padding, fraction of the side
AUGMENT_ROTATE = 0.0  # random rotation, fraction of a full turn (0 = off)
AUGMENT_ZOOM = 0.0  # random zoom, fraction of the side (0 = off)
AUGMENT_CONTRAST = 0.0  # random contrast change, fraction (0 = off)
WEIGHTS = "imagenet"  # "imagenet" (downloaded once), a weights file path, or "none"
DROPOUT = 0.2  # dropout rate before the classifier
HEAD_EPOCHS = 3  # phase 1: epochs training the new head on the frozen base; 0 = skip
HEAD_LR = 1e-3  # phase 1 learning rate, constant (AdamW)
FINE_TUNE_EPOCHS = 15  # phase 2: epochs with the base trainable; 0 = head only
FINE_TUNE_LR = 1e-4  # phase 2 peak learning rate (AdamW), 10x lower than the head's
FREEZE_FIRST = 10  # base layers (of 154, input included) kept frozen in phase 2
RANDOM_START_LR = 2e-3  # --weights=none: peak learning rate (AdamW), all layers train
RANDOM_START_BATCHNORM_MOMENTUM = 0.9  # --weights=none: Keras MobileNetV2 has 0.999
WARMUP_EPOCHS = 1  # phase 2: linear warm-up from 0, then cosine decay to 0 at the end
WEIGHT_DECAY = 0.01  # AdamW decoupled weight decay, scaled by the learning rate
LABEL_SMOOTHING = 0.1  # 0 = plain one-hot targets
TTA_FLIP = False  # test-time augmentation: average each test image with its mirror
STEPS_PER_EPOCH = 0  # batches per epoch; 0 = the whole training set
EARLY_STOPPING_PATIENCE = 0  # phase 2 epochs without a better val_accuracy; 0 = off
MIXED_PRECISION = False  # float16 compute: faster on recent GPUs, slower on CPU
JIT_COMPILE = False  # XLA-compile the train step: try it on GPUs
SEED = 0  # seeds the split, shuffling, augmentation and the initial weights
OUT_DIR = "runs"  # run folders go to OUT_DIR/transfer_mobilenetv2/<timestamp>/
RESUME = ""  # a run folder to go on with, "last" for the newest unfinished one
VERBOSE = 1  # 0 = quiet, 1 = progress bar, 2 = a line per epoch and all TF notices
CONFIG = settings.config_block(globals())  # the settings above: defaults for overrides

SCRIPT = "transfer_mobilenetv2"
# MobileNetV2's own preprocess_input range: its ImageNet weights were trained on
# pixels / 127.5 - 1. The report fed [0, 1], which silently costs accuracy.
VALUE_RANGE = (-1.0, 1.0)
IMAGENET_SIZES = (96, 128, 160, 192, 224)  # pixels: the sizes Keras has weights for
IMAGENET_URL = (
    "https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/"
)


def check_config(config):
    """Checks of the settings alone: run before TensorFlow loads, and by main()."""
    settings.require(
        config["HEAD_EPOCHS"] >= 0 and config["FINE_TUNE_EPOCHS"] >= 0,
        "--head_epochs and --fine_tune_epochs must be 0 or more",
    )
    # A random start has one phase, FINE_TUNE_EPOCHS long: nothing to protect.
    random_start = config["WEIGHTS"] == "none"
    settings.require(
        config["FINE_TUNE_EPOCHS"] > 0
        if random_start
        else config["HEAD_EPOCHS"] + config["FINE_TUNE_EPOCHS"] > 0,
        "nothing to train: --fine_tune_epochs is 0"
        + ("" if random_start else " and so is --head_epochs"),
    )
    settings.require(config["WARMUP_EPOCHS"] >= 0, "--warmup_epochs must be 0 or more")
    settings.require(config["FREEZE_FIRST"] >= 0, "--freeze_first must be 0 or more")
    settings.check_data_settings(config)
    # Keras would warn and quietly load the 224 px weights for any other size.
    settings.require(
        config["WEIGHTS"] != "imagenet" or config["IMG_SIZE"] in IMAGENET_SIZES,
        f"--img_size={config['IMG_SIZE']}: ImageNet weights exist only for "
        f"{', '.join(map(str, IMAGENET_SIZES))} px; pick one, or use --weights=none",
    )


# ---------------------------------------------------------------------------------
# Model: weights (ImageNet through the Keras cache, a file, or none), network, phases


def imagenet_weights_name(image_size):
    """The file Keras downloads for a 1.0-width MobileNetV2 base at `image_size`."""
    return f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_{image_size}_no_top.h5"


def resolve_weights(weights, image_size):
    """The `weights` argument for MobileNetV2: None for "none", else the path of a
    weights file. "imagenet" is fetched once into the Keras cache, for a size
    check_config admits; a bad setting stops before that download."""
    choices = "--weights=imagenet|PATH|none"
    if weights == "none":
        return None
    if weights != "imagenet":
        path = Path(weights).expanduser()
        if not path.is_file():
            raise settings.DataError(
                f"--weights={weights}: no such file; expected a MobileNetV2 base "
                f"weights file (.h5 or .weights.h5). Choices: {choices}"
            )
        return str(path)
    # check_config has refused any size without ImageNet weights.
    name = imagenet_weights_name(image_size)
    models_dir = data.keras_home() / "models"
    try:
        return keras.utils.get_file(
            name,
            IMAGENET_URL + name,
            cache_dir=str(models_dir.parent),
            cache_subdir="models",
        )
    except Exception as error:  # urllib, HTTP and proxy errors all land here
        # Keras words it "URL fetch failure on <url>: <code> -- <reason>".
        reason = str(error).rsplit(" -- ", 1)[-1][:100] or type(error).__name__
        raise settings.DataError(
            f"the MobileNetV2 ImageNet weights are not cached and the download "
            f"failed ({reason}).\nPut {name} from {IMAGENET_URL} in {models_dir}/, "
            f"or pass {choices} (PATH: that file)"
        ) from None


def build_model(image_size, weights, dropout, num_classes=data.NUM_CLASSES):
    """(model, base): MobileNetV2 without its ImageNet classifier (`weights`: None,
    "imagenet" or a weights file), then global average pooling, dropout and a
    softmax over `num_classes`. Inputs are images in [-1, 1]."""
    inputs = keras.Input((image_size, image_size, 3), name="image")
    # A file of the wrong model makes Keras warn once per layer before it fails:
    # hold the warnings, and show them only if the weights did load.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            base = keras.applications.MobileNetV2(
                include_top=False,
                input_shape=(image_size, image_size, 3),
                weights=weights,
            )
        except (OSError, ValueError) as error:
            if weights is None:
                raise
            reason = (str(error).strip().splitlines() or [""])[0][:160]
            raise settings.DataError(
                f"--weights={weights}: cannot load it into MobileNetV2 without its top "
                f"({type(error).__name__}: {reason}); expected one of Keras's "
                f"mobilenet_v2_weights_*_1.0_*_no_top.h5 or a .weights.h5 saved from "
                f"such a base"
            ) from None
    for warning in caught:
        warnings.warn_explicit(
            warning.message, warning.category, warning.filename, warning.lineno
        )
    # Pretrained: training=False states the intent; Keras <= 3.15 ignores it inside
    # fit, so freeze_base and unfreeze_for_fine_tuning freeze BatchNorm themselves.
    # Random: BatchNorm must learn its statistics, so it follows fit's mode.
    x = base(inputs, training=False if weights else None)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    # Softmax in float32 even under mixed precision, for a stable loss.
    outputs = keras.layers.Dense(
        num_classes, activation="softmax", dtype="float32", name="classes"
    )(x)
    return keras.Model(inputs, outputs, name="mobilenetv2_transfer"), base


def freeze_base(base):
    """Phase 1: the whole base frozen, BatchNorm included; only the head learns."""
    base.trainable = False


def unfreeze_for_fine_tuning(base, freeze_first):
    """Phase 2: the base trainable except its first `freeze_first` layers and every
    BatchNormalization layer. A frozen BatchNorm layer runs in inference mode: it
    normalizes with its moving statistics and leaves them as they are."""
    base.trainable = True
    for layer in base.layers[:freeze_first]:
        layer.trainable = False
    for layer in base.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False


def unfreeze_all(base, batchnorm_momentum):
    """A random start: every layer trainable, BatchNorm included, from the first
    step, as a network trained from scratch. Freezing random layers, or BatchNorm
    statistics set at initialisation, would only handicap it. MobileNetV2's
    BatchNorm momentum of 0.999 suits ImageNet's long runs: on a few thousand
    images its moving statistics would still be mostly the placeholders (0 and 1)
    when training ends, and the evaluated network would guess at chance."""
    base.trainable = True
    for layer in base.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = batchnorm_momentum


def make_fine_tune_optimizer(learning_rate, weight_decay, warmup_steps, total_steps):
    """AdamW under a linear warm-up from 0 to `learning_rate`, then cosine decay to
    0 at `total_steps`: the first steps stay small, so the pretrained features are
    not thrown off before the optimizer's moment estimates settle."""
    warmup_steps = min(warmup_steps, total_steps)
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0,
        decay_steps=max(total_steps - warmup_steps, 1),
        warmup_target=learning_rate,
        warmup_steps=warmup_steps,
    )
    return keras.optimizers.AdamW(schedule, weight_decay=weight_decay)


# ---------------------------------------------------------------------------------
# Train


def main(argv):
    config, run_dir = training.configure_run(CONFIG, argv, SCRIPT)
    check_config(config)
    strategy = training.distribution_strategy()  # before any tensor exists
    random_start = config["WEIGHTS"] == "none"
    weights = resolve_weights(config["WEIGHTS"], config["IMG_SIZE"])
    training.seed_everything(config["SEED"])
    replicas = strategy.num_replicas_in_sync
    training.set_precision(config["MIXED_PRECISION"], replicas)
    config["BATCH_SIZE"] = training.global_batch_size(config["BATCH_SIZE"], replicas)

    # Data: uint8 in memory; each batch is augmented, resized and scaled on its own
    pipelines = data.pipelines_for(config, VALUE_RANGE)
    print(f"data: {pipelines.source}; images per split: {pipelines.sizes}")

    # Model. Pretrained: a head on the frozen base, then fine-tuning. Random: one
    # phase in which everything learns; the head-first phase protects nothing there.
    with strategy.scope():
        model, base = build_model(
            config["IMG_SIZE"],
            weights,
            config["DROPOUT"],
            num_classes=len(pipelines.class_names),
        )
        settings.require(
            config["FREEZE_FIRST"] <= len(base.layers),
            f"--freeze_first must be at most {len(base.layers)}, the base's layer count",
        )
    if random_start:
        plan = {
            "phases": ["train"],
            "frozen_first_layers": [],
            "batchnorm": (
                "trained from the start (batch statistics while training), "
                f"momentum {config['RANDOM_START_BATCHNORM_MOMENTUM']}"
            ),
            "learning_rate": config["RANDOM_START_LR"],
            "ignored_for_random_start": ["HEAD_EPOCHS", "HEAD_LR", "FREEZE_FIRST"],
        }
    else:
        plan = {
            "phases": ["head", "fine_tune"],
            "frozen_first_layers": [
                layer.name for layer in base.layers[: config["FREEZE_FIRST"]]
            ],
            "batchnorm": "from the weights, frozen",
            "learning_rate": config["FINE_TUNE_LR"],
        }
    print(
        f"model: {model.name}, {model.count_params():,} parameters; weights "
        f"{weights or 'random'}; BatchNorm {plan['batchnorm']}"
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
            weights_file=weights,
            training_plan=plan,
        )
    print(f"run folder: {run_dir}")
    fit_settings = {
        "steps_per_epoch": pipelines.fit_steps,
        "images_per_epoch": pipelines.images_per_epoch,
        "verbose": config["VERBOSE"],
    }
    head_epochs = 0 if random_start else config["HEAD_EPOCHS"]
    if head_epochs:
        with strategy.scope():
            freeze_base(base)
            training.compile_model(
                model,
                keras.optimizers.AdamW(
                    config["HEAD_LR"], weight_decay=config["WEIGHT_DECAY"]
                ),
                config["LABEL_SMOOTHING"],
                config["JIT_COMPILE"],
            )
        print(
            f"phase 1, head: {head_epochs} epochs, base frozen, "
            f"{training.count_trainable(model):,} trainable parameters"
        )
        # On a resumed run whose head phase is done, this restores its last epoch
        # from backup/head and trains no further.
        training.fit(
            model, pipelines.train, pipelines.validation, run_dir, phase="head",
            epochs=head_epochs, **fit_settings,
        )  # fmt: skip
    if config["FINE_TUNE_EPOCHS"]:
        with strategy.scope():
            if random_start:
                unfreeze_all(base, config["RANDOM_START_BATCHNORM_MOMENTUM"])
            else:
                unfreeze_for_fine_tuning(base, config["FREEZE_FIRST"])
            training.compile_model(
                model,
                make_fine_tune_optimizer(
                    plan["learning_rate"],
                    config["WEIGHT_DECAY"],
                    warmup_steps=config["WARMUP_EPOCHS"] * pipelines.steps_per_epoch,
                    total_steps=config["FINE_TUNE_EPOCHS"] * pipelines.steps_per_epoch,
                ),
                config["LABEL_SMOOTHING"],
                config["JIT_COMPILE"],
            )
        if random_start:
            print(
                f"random start: {config['FINE_TUNE_EPOCHS']} epochs, every layer "
                f"trainable, {training.count_trainable(model):,} trainable parameters"
            )
        else:
            print(
                f"phase 2, fine-tune: {config['FINE_TUNE_EPOCHS']} epochs, first "
                f"{config['FREEZE_FIRST']} base layers and BatchNorm frozen, "
                f"{training.count_trainable(model):,} trainable parameters"
            )
        training.fit(
            model, pipelines.train, pipelines.validation, run_dir,
            phase=plan["phases"][-1],
            epochs=head_epochs + config["FINE_TUNE_EPOCHS"],
            initial_epoch=head_epochs,
            early_stopping_patience=config["EARLY_STOPPING_PATIENCE"], **fit_settings,
        )  # fmt: skip

    # Save/Report
    training.finish(
        run_dir,
        model,
        pipelines.test,
        label_smoothing=config["LABEL_SMOOTHING"],
        tta_flip=config["TTA_FLIP"],
    )
    return run_dir


if __name__ == "__main__":
    training.cli(main)
