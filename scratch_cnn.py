"""A CNN trained from scratch on CIFAR-10 at 32 px with airbench94's recipe, in Keras.

    python scratch_cnn.py                                   # full run (defaults below)
    python scratch_cnn.py --width=32 --epochs=10            # half width: a few times faster
    python scratch_cnn.py --epochs=3 --train_images=5000    # quick CPU check
    python scratch_cnn.py --resume=last                     # go on with an interrupted run

The recipe is airbench94's (Keller Jordan, arXiv 2404.00498): a frozen whitening first
layer computed from the training images, identity-initialised convolutions, BatchNorm
biases that learn 64x faster than the weights, Nesterov SGD with coupled L2 under a
linear warm-up and decay, lookahead towards a moving average of the weights, label
smoothing, alternating flips and 6-view test-time augmentation. README, Results, gives
what it reaches; docs/scratch-recipe.md what each ingredient adds.
"""

import settings

settings.check_command_line(__name__, __file__)  # --help, bad flags: before TF loads

import keras
import numpy as np

import data
import training

# ---------------------------------------------------------------------------------
# Config (python scratch_cnn.py --name=value overrides any of these)

DATA_DIR = ""  # CIFAR-10 folder or .tar.gz, or class folders (README); "" = find CIFAR-10
TRAIN_IMAGES = 0  # training images to use, stratified; 0 = all 50,000
VAL_FRACTION = 0.1  # share of the training images held out for validation
TEST_FRACTION = 0.2  # class folders without test/: share of train/ held out to test
IMG_SIZE = 32  # pixels: the side images are resized to; 32 = native
BATCH_SIZE = 1024  # images per step, fewer on a small set (MIN_STEPS)
MIN_STEPS = 40  # an epoch has at least this many steps: smaller batches (not below 32)
AUGMENT_FLIP = "alternate"  # horizontal flips: "random", "alternate" (airbench) or "none"
AUGMENT_TRANSLATE = 0.0625  # random shifts with reflect padding, fraction of the side
AUGMENT_ROTATE = 0.0  # random rotation, fraction of a full turn (0 = off)
AUGMENT_ZOOM = 0.0  # random zoom, fraction of the side (0 = off)
AUGMENT_CONTRAST = 0.0  # random contrast change, fraction (0 = off)
WIDTH = 64  # filters of block 1; blocks 2 and 3 have 4x as many (airbench94: 64)
WHITEN = True  # first layer: frozen 2x2 whitening filters from the training images
WHITEN_IMAGES = 5000  # training images the whitening filters are computed from
WHITEN_EPSILON = 5e-4  # added to each eigenvalue before its inverse square root
DIRAC_INIT = True  # convolutions start as identities on their first input channels
BATCHNORM_MOMENTUM = 0.6  # moving-average momentum (Keras's sense; PyTorch's 0.4)
BIAS_RATE_FACTOR = 64.0  # BatchNorm biases learn this many times faster than weights
LOGIT_SCALE = 0.111  # logits times this before the softmax (airbench94: 1/9)
EPOCHS = 10  # passes over the training images
LEARNING_RATE = 1.5  # SGD peak rate for a batch of 1,024 (mean loss), scaled by batch
MOMENTUM = 0.85  # Nesterov momentum
L2 = 1.33e-3  # coupled L2: lambda x weight added to each gradient (airbench's decay)
WARMUP_FRACTION = 0.23  # share of the steps the rate rises over, linearly
START_RATE = 0.2  # the warm-up starts at this fraction of the peak rate
END_RATE = 0.07  # then the rate falls linearly to this fraction of the peak
LOOKAHEAD = True  # every 5 steps, weights move to their moving average (airbench)
LABEL_SMOOTHING = 0.2  # 0 = plain one-hot targets
TTA = "crops"  # test-time augmentation: "none", "flip" (mean with the mirror image) or
# "crops" (flip, plus 1-pixel shifts each mirrored: 6 views)
STEPS_PER_EPOCH = 0  # batches per epoch; 0 = the whole training set
EARLY_STOPPING_PATIENCE = 0  # epochs without a better val_accuracy; 0 = off
MIXED_PRECISION = "auto"  # "off", "on" (float16 on a GPU, else bfloat16) or "auto"
# (on for GPUs and for CPUs with AMX bfloat16 units)
JIT_COMPILE = False  # XLA-compile the train step
SEED = 0  # seeds the split, shuffling, augmentation and initial weights
OUT_DIR = "runs"  # run folders go to OUT_DIR/scratch_cnn/<timestamp>/
RESUME = ""  # a run folder to go on with, "last" for the newest unfinished one
VERBOSE = 1  # 0 = quiet, 1 = progress bar, 2 = a line per epoch and all TF notices
CONFIG = settings.config_block(globals())  # the settings above: defaults for overrides

SCRIPT = "scratch_cnn"
VALUE_RANGE = (0.0, 1.0)  # inputs the pipeline hands over: pixels / 255
LOOKAHEAD_EVERY = 5  # steps between lookahead moves
LOOKAHEAD_DECAY = 0.95**5  # the moving average's decay at the end of training


def check_config(config):
    """Checks of the settings alone: run before TensorFlow loads, and by main()."""
    for name in ("EPOCHS", "WIDTH", "WHITEN_IMAGES", "MIN_STEPS"):
        settings.require(config[name] > 0, f"--{name.lower()} must be positive")
    settings.require(config["IMG_SIZE"] >= 16, "--img_size must be 16 or more")
    settings.require(
        0 <= config["WARMUP_FRACTION"] < 1, "--warmup_fraction must lie in [0, 1)"
    )
    settings.check_data_settings(config)


# ---------------------------------------------------------------------------------
# Model


def whitening_filters(images, epsilon, patch=2):
    """A Conv2D kernel (2, 2, C, 2 x 4C) that whitens the patches of `images` (float,
    N x H x W x C): the eigenvectors of their uncentered covariance, each over the square
    root of its eigenvalue plus `epsilon`, and their negatives (GELU keeps both signs)."""
    channels = images.shape[-1]
    windows = np.lib.stride_tricks.sliding_window_view(
        images, (patch, patch), axis=(1, 2)
    )
    patches = windows.transpose(0, 1, 2, 4, 5, 3).reshape(-1, patch * patch * channels)
    covariance = (patches.T @ patches) / len(patches)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance.astype(np.float64))
    filters = eigenvectors[:, ::-1] / np.sqrt(eigenvalues[::-1] + epsilon)
    kernel = filters.reshape(patch, patch, channels, -1)
    return np.concatenate([kernel, -kernel], axis=-1).astype(np.float32)


def dirac_kernel(kernel):
    """`kernel` (k, k, C_in, C_out) with its first C_in filters set to identities:
    each passes its own input channel through, unchanged, at the start."""
    kernel = np.array(kernel)
    size, _, channels_in, channels_out = kernel.shape
    count = min(channels_in, channels_out)
    kernel[:, :, :, :count] = 0.0
    kernel[size // 2, size // 2, np.arange(count), np.arange(count)] = 1.0
    return kernel


def build_model(
    image_size, width, num_classes, mean, std, whitening=None, dirac=True,
    batchnorm_momentum=0.6, bias_rate_factor=64.0, logit_scale=1 / 9, l2=0.0,
):  # fmt: skip
    """airbench94's network: inputs in [0, 1] standardised with the training images'
    `mean` and `std`, a 2x2 convolution (frozen `whitening` filters, or trained when
    None), blocks of `width`, 4x and 4x filters, global max pooling, a linear layer and
    logits times `logit_scale`; BatchNorm biases learn `bias_rate_factor` times faster."""
    # Every kernel: no bias, PyTorch's default initialisation as airbench has it
    # (uniform within 1/sqrt(fan_in)) and coupled L2 (d/dw of l2/2 w^2 = l2 w).
    kernels = dict(
        use_bias=False,
        kernel_initializer=keras.initializers.VarianceScaling(1 / 3, "fan_in", "uniform"),
        kernel_regularizer=keras.regularizers.L2(l2 / 2) if l2 else None,
    )
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = keras.layers.Normalization(
        mean=mean, variance=np.square(std), name="standardise"
    )(inputs)
    x = keras.layers.Conv2D(
        24, 2, trainable=whitening is None, name="whiten", **kernels
    )(x)  # fmt: skip
    x = training.Bias(name="whiten_bias", l2=l2)(x)
    x = keras.layers.Activation("gelu", name="whiten_gelu")(x)
    for block, filters in enumerate((width, 4 * width, 4 * width), start=1):
        for conv in (1, 2):
            x = keras.layers.Conv2D(
                filters, 3, padding="same", name=f"block{block}_conv{conv}", **kernels
            )(x)
            if conv == 1:
                x = keras.layers.MaxPooling2D(name=f"block{block}_pool")(x)
            # BatchNorm in float32 under mixed precision; its bias is a Bias layer.
            x = keras.layers.BatchNormalization(
                momentum=batchnorm_momentum, epsilon=1e-12, center=False, scale=False,
                dtype="float32", name=f"block{block}_bn{conv}",
            )(x)  # fmt: skip
            x = training.Bias(
                rate_factor=bias_rate_factor, l2=l2, dtype="float32",
                name=f"block{block}_bias{conv}",
            )(x)  # fmt: skip
            x = keras.layers.Activation("gelu", name=f"block{block}_gelu{conv}")(x)
    x = keras.layers.GlobalMaxPooling2D(name="pool")(x)
    x = keras.layers.Dense(num_classes, name="linear", **kernels)(x)
    x = keras.layers.Rescaling(logit_scale, dtype="float32", name="logit_scale")(x)
    outputs = keras.layers.Softmax(dtype="float32", name="classes")(x)
    model = keras.Model(inputs, outputs, name="scratch_cnn")
    if whitening is not None:
        model.get_layer("whiten").kernel.assign(whitening)
    for layer in model.layers:
        if dirac and layer.name.startswith("block") and "_conv" in layer.name:
            layer.kernel.assign(dirac_kernel(layer.kernel.numpy()))
    return model


class Lookahead(keras.callbacks.Callback):
    """airbench's lookahead: every `every` steps, a moving average of every weight
    (BatchNorm statistics included) steps towards the weights, which are set to it. Its
    decay grows as (step / total)^3 to `decay`; the last step keeps the average."""

    def __init__(self, total_steps, every=LOOKAHEAD_EVERY, decay=LOOKAHEAD_DECAY):
        super().__init__()
        self.total_steps, self.every, self.decay = total_steps, every, decay

    def on_train_begin(self, logs=None):
        self.average = [variable.numpy() for variable in self.model.weights]

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations.numpy())
        last = step >= self.total_steps
        if step % self.every and not last:
            return
        decay = 1.0 if last else self.decay * (step / self.total_steps) ** 3
        for average, variable in zip(self.average, self.model.weights):
            average *= decay
            average += (1 - decay) * variable.numpy()
            variable.assign(average)


def compiled_model(config, train_images, num_classes, steps_per_epoch):
    """The network compiled for a run of `config`, `steps_per_epoch` steps an epoch;
    `train_images` (uint8) give its standardisation and whitening (bench.py times it)."""
    sample = np.random.default_rng(config["SEED"]).permutation(len(train_images))
    sample = train_images[sample[: config["WHITEN_IMAGES"]]].astype(np.float32) / 255
    mean, std = sample.mean(axis=(0, 1, 2)), sample.std(axis=(0, 1, 2)) + 1e-6
    whitening = None
    if config["WHITEN"]:
        whitening = whitening_filters((sample - mean) / std, config["WHITEN_EPSILON"])
    model = build_model(
        config["IMG_SIZE"], config["WIDTH"], num_classes, mean, std, whitening,
        config["DIRAC_INIT"], config["BATCHNORM_MOMENTUM"], config["BIAS_RATE_FACTOR"],
        config["LOGIT_SCALE"], config["L2"],
    )  # fmt: skip
    total_steps = config["EPOCHS"] * steps_per_epoch
    schedule = training.WarmupThenDecay(
        config["LEARNING_RATE"] * config["BATCH_SIZE"] / 1024,
        warmup_steps=round(config["WARMUP_FRACTION"] * total_steps), decay="linear",
        total_steps=total_steps, start=config["START_RATE"], end=config["END_RATE"],
    )  # fmt: skip
    optimizer = keras.optimizers.SGD(schedule, momentum=config["MOMENTUM"], nesterov=True)
    training.compile_model(
        model, optimizer, config["LABEL_SMOOTHING"], config["JIT_COMPILE"]
    )
    return model


# ---------------------------------------------------------------------------------
# Train


def main(argv):
    config, run_dir = training.configure_run(CONFIG, argv, SCRIPT)
    check_config(config)
    strategy = training.distribution_strategy()  # before any tensor exists
    keras.utils.set_random_seed(config["SEED"])
    precision = training.set_precision(config["MIXED_PRECISION"], strategy)

    # Data: uint8 in memory; each batch is augmented, resized and scaled on its own
    pipelines = data.pipelines_for(config, VALUE_RANGE, strategy.num_replicas_in_sync)
    config["BATCH_SIZE"] = pipelines.batch_size
    print(f"data: {pipelines.source}; images per split: {pipelines.sizes}")

    # Model
    with strategy.scope():
        model = compiled_model(
            config, pipelines.train_images, len(pipelines.class_names),
            pipelines.steps_per_epoch,
        )  # fmt: skip
    total_steps = config["EPOCHS"] * pipelines.steps_per_epoch
    print(
        f"model: {model.name}, {model.count_params():,} parameters, "
        f"{strategy.num_replicas_in_sync} replica(s), batch {config['BATCH_SIZE']}, "
        f"{total_steps:,} steps"
    )

    # Train
    if run_dir is None:
        run_dir = training.new_run_dir(config["OUT_DIR"], SCRIPT)
        training.save_run_config(
            run_dir, SCRIPT, config, pipelines.source, value_range=VALUE_RANGE,
            class_names=list(pipelines.class_names), precision=precision,
        )  # fmt: skip
    print(f"run folder: {run_dir}")
    training.fit(
        model, pipelines, run_dir, phase="train", epochs=config["EPOCHS"],
        early_stopping_patience=config["EARLY_STOPPING_PATIENCE"],
        callbacks=[Lookahead(total_steps)] if config["LOOKAHEAD"] else [],
        verbose=config["VERBOSE"],
    )  # fmt: skip

    # Save/Report
    training.finish(
        run_dir, model, pipelines.test, config["LABEL_SMOOTHING"], config["TTA"]
    )
    return run_dir


if __name__ == "__main__":
    settings.cli(main)
