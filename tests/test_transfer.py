"""transfer_mobilenetv2.py on tiny data, offline: the run folder, the two phases and
resume, the frozen layers and BatchNorm statistics, the [-1, 1] input range, ALPHA,
weights files and ImageNet's found in the Keras cache, --dry_run, and the errors for
weights that cannot be had or do not fit.

The pretrained weights are stand-ins made here at 32 px: conftest's base_weights, and
alpha-0.35 files in the legacy .h5 layout of Keras's own ImageNet downloads. ImageNet
weights are never downloaded (conftest points KERAS_HOME at an empty folder, and the
tests that fill a Keras cache make every download attempt fail).
"""

import json
import re
import shutil
import subprocess
import sys

import h5py
import keras
import numpy as np
import pytest
from conftest import REPO, TINY_RUN, own_stderr_lines, run_script
from keras.src.applications.mobilenet_v2 import BASE_WEIGHT_PATH
from keras.src.legacy.saving import legacy_h5_format

import data
import settings
import training
import transfer_mobilenetv2 as transfer

ALPHA = 0.35  # the stand-in ImageNet files' width: the smallest and fastest base
# The name Keras 3.15's MobileNetV2 gives its download of a base without the top.
KERAS_FILE = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{alpha}_{size}_no_top.h5"
# Images a step in a tiny run: it divides the 30 validation and 100 test images, so no
# partial last batch makes TensorFlow trace the whole network a second time.
EVEN_BATCH = 10


def save_imagenet_style_weights(path, alpha=ALPHA, image_size=32, seed=0):
    """A MobileNetV2 base of width `alpha` (random kernels) saved as Keras's ImageNet
    files are: the legacy .h5 layout (layer_names, a group per layer) that
    keras.applications.MobileNetV2(weights=PATH) reads. Returns the base."""
    keras.utils.set_random_seed(seed)
    _, base = transfer.build_model(image_size, alpha, None, dropout=0.0)
    with h5py.File(path, "w") as file:
        legacy_h5_format.save_weights_to_hdf5_group(file, base)
    return base


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    """An alpha-0.35 base, saved twice: "imagenet", as Keras publishes the 224-px file,
    and "weights", as model.save_weights writes it (.weights.h5); "values", its
    weights in order."""
    folder = tmp_path_factory.mktemp("published")
    imagenet = folder / KERAS_FILE.format(alpha=ALPHA, size=224)
    base = save_imagenet_style_weights(imagenet)
    base.save_weights(folder / "base.weights.h5")
    return {
        "imagenet": imagenet,
        "weights": folder / "base.weights.h5",
        "values": [weight.numpy() for weight in base.weights],
    }


def refuse_download(*args, **kwargs):
    raise OSError("offline (the test refuses downloads)")


@pytest.fixture
def keras_cache(tmp_path, monkeypatch):
    """An empty Keras cache (KERAS_HOME) on a machine without network: its models/."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))
    monkeypatch.setattr(keras.utils, "get_file", refuse_download)
    models = tmp_path / "keras-home" / "models"
    models.mkdir(parents=True)
    return models


def assert_weights_equal(expected, base):
    assert len(base.weights) == len(expected)
    for value, weight in zip(expected, base.weights):
        np.testing.assert_array_equal(value, weight.numpy(), err_msg=weight.path)


def batchnorm_layers(base):
    return [
        layer
        for layer in base.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    ]


def layers_with_weights(model, base):
    """The head's layers and the base's, the base itself left out."""
    return [
        layer
        for layer in list(model.layers) + list(base.layers)
        if layer.weights and layer is not base
    ]


def frozen_layers(model, base):
    """Names of the layers whose weights training leaves alone."""
    return {
        layer.name for layer in layers_with_weights(model, base) if not layer.trainable
    }


def base_of(model):
    """The MobileNetV2 base inside a loaded transfer model."""
    return next(layer for layer in model.layers if isinstance(layer, keras.Model))


# ---------------------------------------------------------------------------------
# The run folder of a finished two-phase run


def test_run_folder_holds_model_history_config_and_metrics(transfer_run):
    model = keras.models.load_model(transfer_run / "model.keras")
    assert model.input_shape == (None, 32, 32, 3)
    assert model.output_shape == (None, data.NUM_CLASSES)

    history = training.read_history(transfer_run)
    assert [row["phase"] for row in history] == ["head", "fine_tune", "fine_tune"]
    assert [row["epoch"] for row in history] == [0, 1, 2]

    saved = json.loads((transfer_run / "config.json").read_text())
    assert saved["script"] == transfer.SCRIPT
    assert saved["value_range"] == [-1.0, 1.0]
    assert saved["config"]["WEIGHTS"].endswith("base.weights.h5")
    assert saved["weights_file"] == "base.weights.h5"  # the name, never a path
    assert saved["weights_resolution"] is None  # not a Keras file name: unknown
    assert saved["config"]["FREEZE_FIRST"] == transfer.FREEZE_FIRST
    plan = saved["training_plan"]
    assert plan["phases"] == {"head": 1, "fine_tune": 2}
    assert len(plan["frozen_first_layers"]) == transfer.FREEZE_FIRST

    metrics = json.loads((transfer_run / "metrics.json").read_text())
    for key in ("test_accuracy", "test_loss", "train_seconds", "images_per_second"):
        assert isinstance(metrics[key], float), key
    assert 0 <= metrics["test_accuracy"] <= 1
    assert metrics["epochs"] == 3
    assert metrics["params"] == model.count_params()
    assert not (transfer_run / "backup").exists()


# ---------------------------------------------------------------------------------
# The traps: frozen layers, BatchNorm statistics, input range


def test_fine_tuning_freezes_exactly_the_first_layers_and_batchnorm():
    """Phase 1 trains the head alone; phase 2 freezes base.layers[:FREEZE_FIRST] and
    every BatchNorm layer and trains every other layer that has weights. (That a
    real fine-tuning epoch leaves them alone: see the resume test.)"""
    model, base = transfer.build_model(32, ALPHA, None, dropout=0.2)
    transfer.freeze_base(base)
    assert frozen_layers(model, base) == {
        layer.name for layer in base.layers if layer.weights
    }
    assert [layer.name for layer in model.layers if layer.trainable_weights] == [
        "classes"
    ]

    transfer.unfreeze_for_fine_tuning(base, transfer.FREEZE_FIRST)
    first = [layer for layer in base.layers[: transfer.FREEZE_FIRST] if layer.weights]
    assert first, "the first layers hold weights, so the check below means something"
    expected = {layer.name for layer in first + batchnorm_layers(base)}
    assert frozen_layers(model, base) == expected
    for layer in layers_with_weights(model, base):
        if layer.name not in expected:
            assert all(weight.trainable for weight in layer.weights), layer.name
    assert len(model.trainable_weights) == sum(
        len(layer.weights)
        for layer in layers_with_weights(model, base)
        if layer.name not in expected
    )


def test_fine_tuned_batchnorm_takes_the_momentum_given_zero_included():
    _, base = transfer.build_model(32, ALPHA, None, dropout=0.2)
    transfer.unfreeze_for_fine_tuning(base, 0, batchnorm_momentum=0.0)
    assert {layer.momentum for layer in batchnorm_layers(base)} == {0.0}
    assert all(layer.trainable for layer in batchnorm_layers(base))


# --weights=none, the random start: test_folders.py checks it on its class-folder
# run, which trains the same MobileNetV2 path from random weights.


class StopBeforeTraining(Exception):
    pass


def test_batches_reaching_the_model_fill_minus_one_to_one(
    cifar_dir, tmp_path, monkeypatch
):
    """What main hands to fit, resized from 32 to 48 px: MobileNetV2's [-1, 1], not
    the report's [0, 1]."""
    seen = {}

    def capture(model, pipelines, run_dir, **settings):
        seen["input_shape"] = model.input_shape
        seen["train"] = next(iter(pipelines.train))
        seen["validation"] = next(iter(pipelines.validation))
        raise StopBeforeTraining

    monkeypatch.setattr(training, "fit", capture)
    with pytest.raises(StopBeforeTraining):
        transfer.main(
            [f"--data_dir={cifar_dir}", f"--out_dir={tmp_path}", "--weights=none",
             "--img_size=48", f"--alpha={ALPHA}"] + TINY_RUN
        )  # fmt: skip
    for name in ("train", "validation"):
        images, labels = (tensor.numpy() for tensor in seen[name])
        assert images.shape[1:] == (48, 48, 3) == seen["input_shape"][1:], name
        assert images.dtype == np.float32
        assert images.min() >= -1.0 and images.max() <= 1.0, name
        assert images.min() < -0.8 and images.max() > 0.8, name
        assert labels.shape[1] == data.NUM_CLASSES


# ---------------------------------------------------------------------------------
# Weights: files, ImageNet's in the Keras cache, ALPHA, and the errors


def test_weights_file_saved_from_one_model_loads_into_another(stand_in):
    keras.utils.set_random_seed(2)
    _, other_base = transfer.build_model(32, ALPHA, None, dropout=0.2)
    assert not all(
        np.array_equal(value, weight.numpy())
        for value, weight in zip(stand_in["values"], other_base.weights)
    ), "two random bases should differ, or the comparison below proves nothing"

    # Same seed as other_base: whatever equals the saved base came from the file.
    keras.utils.set_random_seed(2)
    weights = transfer.resolve_weights(str(stand_in["weights"]), ALPHA, 32)
    _, loaded_base = transfer.build_model(32, ALPHA, weights, dropout=0.2)
    assert_weights_equal(stand_in["values"], loaded_base)


def test_bad_weights_files_exit_3(tmp_path):
    choices = re.escape("--weights=imagenet|PATH|none")
    with pytest.raises(settings.DataError, match=choices):
        transfer.resolve_weights(str(tmp_path / "missing.h5"), ALPHA, 96)
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not an HDF5 file")
    with pytest.raises(settings.DataError, match="cannot load it into MobileNetV2"):
        transfer.build_model(32, ALPHA, str(garbage), dropout=0.2)


def test_imagenet_weights_come_from_the_keras_cache_at_any_size(stand_in, keras_cache):
    """Offline, --weights=imagenet takes Keras's file for (alpha, size) from the
    cache, else the same alpha's file at another size (224 px first for a size Keras
    does not publish); another alpha's file never stands in. What it finds loads."""

    def cache(size, alpha=ALPHA):
        path = keras_cache / KERAS_FILE.format(alpha=alpha, size=size)
        shutil.copy(stand_in["imagenet"], path)
        return str(path)

    cache(224, alpha=0.5)
    with pytest.raises(settings.DataError, match="alpha 0.35 are not in the Keras"):
        transfer.resolve_weights("imagenet", ALPHA, 96)

    at_160 = cache(160)
    assert transfer.resolve_weights("imagenet", ALPHA, 96) == at_160
    assert transfer.resolve_weights("imagenet", ALPHA, 32) == at_160
    at_224 = cache(224)
    assert transfer.resolve_weights("imagenet", ALPHA, 32) == at_224
    at_96 = cache(96)
    assert transfer.resolve_weights("imagenet", ALPHA, 96) == at_96
    assert transfer.resolve_weights("imagenet", ALPHA, 32) == at_224
    assert transfer.resolve_weights("none", ALPHA, 32) is None
    assert [transfer.weights_resolution(path) for path in (at_96, at_224)] == [96, 224]
    assert transfer.weights_resolution(stand_in["weights"]) is None

    keras.utils.set_random_seed(2)  # not the stand-in's seed: equal means loaded
    _, base = transfer.build_model(32, ALPHA, at_224, dropout=0.2)
    assert_weights_equal(stand_in["values"], base)


def test_a_run_from_cached_imagenet_weights_records_alpha_and_the_file(
    stand_in, keras_cache, cifar_dir, tmp_path
):
    """A head-only run at 32 px, offline, with the cache holding the 0.35-wide base's
    96-px file alone: config.json records ALPHA, the file and the size it was trained
    at; the network is 0.35 wide (fewer parameters than 1.0) and its frozen base
    holds the file's weights."""
    name = KERAS_FILE.format(alpha=ALPHA, size=96)
    shutil.copy(stand_in["imagenet"], keras_cache / name)
    run_dir = transfer.main(
        [f"--data_dir={cifar_dir}", f"--out_dir={tmp_path / 'runs'}", "--weights=imagenet",
         f"--alpha={ALPHA}", "--img_size=32", "--head_epochs=1", "--fine_tune_epochs=0",
         "--steps_per_epoch=1", f"--batch_size={EVEN_BATCH}", "--verbose=0"]
    )  # fmt: skip
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["config"]["ALPHA"] == ALPHA
    assert saved["weights_file"] == name
    assert saved["weights_resolution"] == 96
    assert saved["training_plan"]["phases"] == {"head": 1}
    assert [row["phase"] for row in training.read_history(run_dir)] == ["head"]

    model = keras.models.load_model(run_dir / "model.keras")
    assert_weights_equal(stand_in["values"], base_of(model))
    params = json.loads((run_dir / "metrics.json").read_text())["params"]
    assert params == model.count_params()
    full_width, _ = transfer.build_model(32, 1.0, None, dropout=0.2)
    assert params < full_width.count_params()


def test_dry_run_finds_data_and_weights_and_trains_nothing(
    stand_in, keras_cache, cifar_dir, tmp_path, monkeypatch, capsys
):
    """--dry_run (a bare flag) loads the data and the weights from the cache, prints
    the model and its plan, and returns without training or making a run folder."""

    def never(*args, **kwargs):
        raise AssertionError("a dry run trained or made a run folder")

    monkeypatch.setattr(training, "fit", never)
    monkeypatch.setattr(training, "new_run_dir", never)
    shutil.copy(stand_in["imagenet"], keras_cache)
    out_dir = tmp_path / "runs"
    argv = [f"--data_dir={cifar_dir}", f"--out_dir={out_dir}", f"--alpha={ALPHA}",
            "--img_size=32", "--dry_run", "--verbose=0"]  # fmt: skip
    assert transfer.main(argv) is None
    assert not out_dir.exists()
    printed = capsys.readouterr().out
    assert stand_in["imagenet"].name in printed and "trained at 224 px" in printed
    assert f"'head': {transfer.HEAD_EPOCHS}" in printed and "dry run" in printed


def test_weights_of_another_alpha_exit_3_naming_the_file_and_the_alpha(
    stand_in, cifar_dir, tmp_path
):
    """The 0.35-wide files, in either layout, for a 0.5-wide network: exit 3 before a
    run folder exists, naming the file and the alpha the network expected."""
    path = stand_in["imagenet"]
    with pytest.raises(settings.DataError) as error:
        transfer.main(
            [f"--data_dir={cifar_dir}", f"--out_dir={tmp_path / 'runs'}",
             f"--weights={path}", "--alpha=0.5", "--img_size=32"] + TINY_RUN
        )  # fmt: skip
    assert str(path) in str(error.value) and "alpha 0.5" in str(error.value)
    assert not (tmp_path / "runs").exists()

    path = stand_in["weights"]
    with pytest.raises(settings.DataError) as error:
        transfer.build_model(32, 0.5, str(path), dropout=0.2)
    assert str(path) in str(error.value) and "alpha 0.5" in str(error.value)


def test_offline_imagenet_without_cache_exits_3_naming_the_file(cifar_dir, tmp_path):
    """Offline with an empty cache: exit 3 with Keras's file name for the run's alpha
    (224 px: Keras publishes no 32-px file), its download address and the folder to
    put it in; no run folder."""
    keras_home = tmp_path / "keras-home"
    keras_home.mkdir()
    result = run_script(
        "transfer_mobilenetv2.py", f"--data_dir={cifar_dir}", "--weights=imagenet",
        f"--alpha={ALPHA}", "--img_size=32", f"--out_dir={tmp_path / 'runs'}",
        env={"KERAS_HOME": str(keras_home)},
    )  # fmt: skip
    assert result.returncode == settings.EXIT_DATA, result.stderr
    lines = own_stderr_lines(result.stderr)
    assert 1 <= len(lines) <= 2, lines
    message = "\n".join(lines)
    assert "Traceback" not in result.stderr
    # The whole download address, as Keras itself would fetch it, and where to put it.
    assert BASE_WEIGHT_PATH + KERAS_FILE.format(alpha=ALPHA, size=224) in message
    assert str(keras_home / "models") in message
    assert "--weights=PATH or none" in message
    assert not (tmp_path / "runs").exists()


def test_alpha_is_checked_before_tensorflow_loads():
    """--alpha=0.6 has no ImageNet weights: exit 2 naming the widths that do, from
    a Python in which importing TensorFlow or Keras would fail."""
    code = (
        "import runpy, sys; sys.modules['tensorflow'] = sys.modules['keras'] = None; "
        "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(REPO / "transfer_mobilenetv2.py"), "--alpha=0.6"],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == settings.EXIT_CONFIG, result.stderr
    assert "0.35, 0.5, 0.75, 1.0, 1.3, 1.4" in result.stderr


def test_settings_that_cannot_work_exit_2():
    with pytest.raises(settings.ConfigError, match="nothing to train"):
        transfer.main(["--head_epochs=0", "--fine_tune_epochs=0"])
    with pytest.raises(settings.ConfigError, match="--img_size"):
        transfer.main(["--weights=none", "--img_size=16"])
    with pytest.raises(settings.ConfigError, match="--alpha=0.6: ImageNet weights"):
        transfer.main(["--alpha=0.6"])
    with pytest.raises(settings.ConfigError, match="--batchnorm_momentum must lie"):
        transfer.main(["--batchnorm_momentum=1.5"])
    # A random start is any width.
    transfer.check_config({**transfer.CONFIG, "ALPHA": 0.6, "WEIGHTS": "none"})


# ---------------------------------------------------------------------------------
# Resume across the two phases


def test_interrupted_fine_tuning_resumes_where_it_stopped(transfer_resume):
    """Ctrl-C after the first fine-tuning epoch (conftest's transfer_resume, the
    session's transfer run); the resumed run restores the head phase without
    training it again and goes on with epoch 2 of fine-tuning."""
    assert "--resume=" in transfer_resume["error"]
    assert [row["phase"] for row in transfer_resume["history"]] == [
        "head",
        "fine_tune",
    ]
    assert not transfer_resume["metrics_written"]
    run_dir = transfer_resume["run_dir"]
    alpha = json.loads((run_dir / "config.json").read_text())["config"]["ALPHA"]
    assert_fine_tuning_kept_batchnorm_and_first_layers(transfer_resume["backup"], alpha)

    assert transfer_resume["resumed"] == run_dir
    history = training.read_history(run_dir)
    assert [(row["epoch"], row["phase"]) for row in history] == [
        (0, "head"),
        (1, "fine_tune"),
        (2, "fine_tune"),
    ]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 3
    assert not (run_dir / "backup").exists()


def assert_fine_tuning_kept_batchnorm_and_first_layers(backup, alpha):
    """Compare the weights the run backed up after its head epoch with those after
    its first fine-tuning epoch (a real fit): BatchNorm moving statistics and the
    first FREEZE_FIRST layers unchanged, every other base kernel moved."""
    bases = {}
    for phase in ("head", "fine_tune"):
        model, bases[phase] = transfer.build_model(32, alpha, None, dropout=0.2)
        model.load_weights(backup / phase / "latest.weights.h5")
    head, fine_tuned = bases["head"], bases["fine_tune"]
    for layer in batchnorm_layers(head):
        tuned = fine_tuned.get_layer(layer.name)
        # The weights file's statistics, not the placeholders: a BatchNorm layer in
        # training mode would have pulled these towards its batch statistics.
        assert not np.allclose(layer.moving_variance.numpy(), 1.0), layer.name
        np.testing.assert_array_equal(
            tuned.moving_mean.numpy(), layer.moving_mean.numpy()
        )
        np.testing.assert_array_equal(
            tuned.moving_variance.numpy(), layer.moving_variance.numpy()
        )
    first = {layer.name for layer in head.layers[: transfer.FREEZE_FIRST]}
    kernels = [
        layer.name
        for layer in head.layers
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D))
    ]
    changed = {
        name
        for name in kernels
        if not np.array_equal(
            head.get_layer(name).weights[0].numpy(),
            fine_tuned.get_layer(name).weights[0].numpy(),
        )
    }
    assert first & set(kernels), "some of the first layers hold kernels"
    assert changed == set(kernels) - first
