"""transfer_mobilenetv2.py on tiny data, offline: the run folder, the two phases and
resume, the frozen layers and BatchNorm statistics, the [-1, 1] input range, weights
files, and the errors for ImageNet weights that cannot be had.

Stand-in pretrained weights (conftest's base_weights) or random ones (--weights=none)
at 32 px keep it fast; ImageNet weights are never downloaded here (conftest points
KERAS_HOME at an empty folder).
"""

import json
import re

import keras
import numpy as np
import pytest
from conftest import TINY_RUN, own_stderr_lines, run_script

import data
import settings
import training
import transfer_mobilenetv2 as transfer


def tiny_batches(cifar_dir, image_size=32, batch_size=32):
    """The training images through the script's own pipeline: [-1, 1], one-hot."""
    images, labels, _, _, _ = data.load_cifar10(cifar_dir)
    return data.make_dataset(
        images,
        labels,
        batch_size=batch_size,
        image_size=image_size,
        value_range=transfer.VALUE_RANGE,
        shuffle=True,
    )


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
    assert saved["config"]["FREEZE_FIRST"] == transfer.FREEZE_FIRST
    plan = saved["training_plan"]
    assert plan["phases"] == ["head", "fine_tune"]
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
    model, base = transfer.build_model(32, 1.0, None, dropout=0.2)
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

    def capture(model, train_data, validation_data, run_dir, **settings):
        seen["input_shape"] = model.input_shape
        seen["train"] = next(iter(train_data))
        seen["validation"] = next(iter(validation_data))
        raise StopBeforeTraining

    monkeypatch.setattr(training, "fit", capture)
    with pytest.raises(StopBeforeTraining):
        transfer.main(
            [f"--data_dir={cifar_dir}", f"--out_dir={tmp_path}", "--weights=none",
             "--img_size=48"] + TINY_RUN
        )  # fmt: skip
    for name in ("train", "validation"):
        images, labels = (tensor.numpy() for tensor in seen[name])
        assert images.shape[1:] == (48, 48, 3) == seen["input_shape"][1:], name
        assert images.dtype == np.float32
        assert images.min() >= -1.0 and images.max() <= 1.0, name
        assert images.min() < -0.8 and images.max() > 0.8, name
        assert labels.shape[1] == data.NUM_CLASSES


# ---------------------------------------------------------------------------------
# Weights: files, the ImageNet cache, and the errors


def test_weights_file_saved_from_one_model_loads_into_another(tmp_path):
    keras.utils.set_random_seed(1)
    _, saved_base = transfer.build_model(32, 1.0, None, dropout=0.2)
    path = tmp_path / "base.weights.h5"
    saved_base.save_weights(path)

    keras.utils.set_random_seed(2)
    _, other_base = transfer.build_model(32, 1.0, None, dropout=0.2)
    assert not all(
        np.array_equal(a.numpy(), b.numpy())
        for a, b in zip(saved_base.weights, other_base.weights)
    ), "two random bases should differ, or the comparison below proves nothing"

    # Same seed as other_base: whatever equals saved_base came from the file.
    keras.utils.set_random_seed(2)
    weights = transfer.resolve_weights(str(path), 1.0, 32)
    _, loaded_base = transfer.build_model(32, 1.0, weights, dropout=0.2)
    assert len(loaded_base.weights) == len(saved_base.weights)
    for saved, loaded in zip(saved_base.weights, loaded_base.weights):
        assert saved.path == loaded.path
        np.testing.assert_array_equal(saved.numpy(), loaded.numpy())


def test_bad_weights_files_exit_3(tmp_path):
    choices = re.escape("--weights=imagenet|PATH|none")
    with pytest.raises(settings.DataError, match=choices):
        transfer.resolve_weights(str(tmp_path / "missing.h5"), 1.0, 96)
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not an HDF5 file")
    with pytest.raises(settings.DataError, match="cannot load it into MobileNetV2"):
        transfer.build_model(32, 1.0, str(garbage), dropout=0.2)


def test_imagenet_weights_come_from_the_keras_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    cached = tmp_path / "models" / transfer.imagenet_weights_name(128)
    cached.parent.mkdir()
    cached.write_bytes(b"stand-in")
    assert transfer.resolve_weights("imagenet", image_size=128) == str(cached)
    assert transfer.resolve_weights("none", image_size=32) is None


def test_imagenet_size_is_checked_before_any_download(cifar_dir, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("downloaded or loaded before checking --img_size")

    monkeypatch.setattr(keras.utils, "get_file", no_download)
    monkeypatch.setattr(data, "load_cifar10", no_download)
    with pytest.raises(settings.ConfigError, match="96, 128, 160, 192, 224"):
        transfer.main([f"--data_dir={cifar_dir}", "--weights=imagenet", "--img_size=100"])


def test_offline_imagenet_without_cache_exits_3_naming_the_file(cifar_dir, tmp_path):
    keras_home = tmp_path / "keras-home"
    keras_home.mkdir()
    result = run_script(
        "transfer_mobilenetv2.py",
        f"--data_dir={cifar_dir}",
        "--weights=imagenet",
        f"--out_dir={tmp_path / 'runs'}",
        env={"KERAS_HOME": str(keras_home)},
    )
    assert result.returncode == settings.EXIT_DATA, result.stderr
    lines = own_stderr_lines(result.stderr)
    assert 1 <= len(lines) <= 2, lines
    message = "\n".join(lines)
    assert "Traceback" not in result.stderr
    assert transfer.imagenet_weights_name(96) in message
    assert str(keras_home / "models") in message
    assert "--weights=imagenet|PATH|none" in message
    assert not (tmp_path / "runs").exists()


def test_settings_that_cannot_work_exit_2():
    with pytest.raises(settings.ConfigError, match="nothing to train"):
        transfer.main(["--head_epochs=0", "--fine_tune_epochs=0"])
    with pytest.raises(settings.ConfigError, match="--img_size"):
        transfer.main(["--weights=none", "--img_size=16"])


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
    assert_fine_tuning_kept_batchnorm_and_first_layers(transfer_resume["backup"])

    run_dir = transfer_resume["run_dir"]
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


def assert_fine_tuning_kept_batchnorm_and_first_layers(backup):
    """Compare the weights the run backed up after its head epoch with those after
    its first fine-tuning epoch (a real fit): BatchNorm moving statistics and the
    first FREEZE_FIRST layers unchanged, every other base kernel moved."""
    bases = {}
    for phase in ("head", "fine_tune"):
        model, bases[phase] = transfer.build_model(32, 1.0, None, dropout=0.2)
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
