"""scratch_cnn.py end to end on small learnable data in the CIFAR-10 format."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from conftest import OFFLINE_ENV, REPO, TINY_RUN, own_stderr_lines, run_script

import scratch_cnn
import settings
import training


def fingerprint(folder):
    """Every file's content hash, so any change to an earlier run shows."""
    return {
        path.relative_to(folder): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def test_run_learns_and_leaves_a_complete_run_folder(scratch_run, cifar_dir):
    metrics = json.loads((scratch_run / "metrics.json").read_text())
    assert metrics["test_accuracy"] > 0.4  # chance is 0.1
    for key in ("test_loss", "train_seconds", "epochs", "params", "images_per_second"):
        assert metrics[key] > 0, key
    assert metrics["epochs"] == 4

    history = training.read_history(scratch_run)
    assert [row["epoch"] for row in history] == [0, 1, 2, 3]
    assert {row["phase"] for row in history} == {"train"}
    assert history[-1]["loss"] < history[0]["loss"]

    config = json.loads((scratch_run / "config.json").read_text())
    assert config["config"]["EPOCHS"] == 4 and config["config"]["WIDTH"] == 16
    assert config["value_range"] == [0.0, 1.0]
    assert config["data_source"].startswith(str(cifar_dir))
    assert config["versions"]["keras"] == keras.__version__

    model = keras.models.load_model(scratch_run / "model.keras")
    assert model.count_params() == metrics["params"]
    assert model.output_shape == (None, 10)
    assert not (scratch_run / "backup").exists()  # removed once the run finished


def test_checkpoint_is_the_best_validation_epoch(scratch_run):
    """metrics.json comes from the best checkpoint, and the checkpoint scores the
    best validation accuracy seen in the history."""
    import data

    history = training.read_history(scratch_run)
    config = json.loads((scratch_run / "config.json").read_text())["config"]
    train_images, train_labels, *_ = data.load_cifar10(config["DATA_DIR"])
    _, _, x_val, y_val = data.split(
        train_images, train_labels, config["VAL_FRACTION"], config["SEED"]
    )
    model = keras.models.load_model(scratch_run / "model.keras")
    val_data = data.make_dataset(
        x_val, y_val, batch_size=32, image_size=32, value_range=scratch_cnn.VALUE_RANGE
    )
    _, val_accuracy = model.evaluate(val_data, verbose=0)
    assert val_accuracy == pytest.approx(
        max(row["val_accuracy"] for row in history), abs=1e-6
    )


@pytest.fixture(scope="module")
def second_run(scratch_run, cifar_dir, tmp_path_factory):
    """A second, 1-epoch run into an OUT_DIR that already holds a copy of the
    session's finished run, recording the first batches main() hands to fit.
    Returns (the earlier run's copy, its fingerprint before, the new run folder,
    {"train": images, "validation": images, "schedule": its learning-rate schedule's
    config})."""
    out_dir = tmp_path_factory.mktemp("second-run")
    earlier = out_dir / "scratch_cnn" / scratch_run.name
    shutil.copytree(scratch_run, earlier)
    before = fingerprint(earlier)
    seen = {}
    real_fit = training.fit

    def recording_fit(model, pipelines, run_dir, **kwargs):
        schedule = model.optimizer.get_config()["learning_rate"]["config"]
        seen["schedule"] = training.WarmupThenDecay(**schedule)
        seen["steps"] = pipelines.steps_per_epoch
        seen["batch_size"] = pipelines.batch_size
        seen["train"] = next(iter(pipelines.train))[0].numpy()
        seen["validation"] = next(iter(pipelines.validation))[0].numpy()
        return real_fit(model, pipelines, run_dir, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training, "fit", recording_fit)
        run_dir = scratch_cnn.main(
            [f"--data_dir={cifar_dir}", f"--out_dir={out_dir}", "--epochs=1"]
            + ["--width=8", *TINY_RUN]
        )
    return earlier, before, run_dir, seen


def test_second_run_leaves_the_first_untouched(second_run):
    earlier, before, run_dir, _ = second_run
    assert run_dir != earlier and run_dir.parent == earlier.parent
    assert (run_dir / "metrics.json").is_file()
    assert fingerprint(earlier) == before


def test_failing_run_creates_nothing(tmp_path):
    with pytest.raises(settings.DataError):
        scratch_cnn.main([f"--data_dir={tmp_path / 'nowhere'}", f"--out_dir={tmp_path}"])
    assert not (tmp_path / "scratch_cnn").exists() or not any(
        (tmp_path / "scratch_cnn").iterdir()
    )


def test_interrupted_run_resumes_at_the_next_epoch(
    cifar_dir, tmp_path, monkeypatch, capsys
):
    """Ctrl-C after epoch 2 of 3 keeps checkpoint and history; --resume runs only
    epoch 3, ends at the same total, and prints the saved settings it goes on with."""
    end_of_epoch = training.History.on_epoch_end

    def interrupt_after_second_epoch(self, epoch, logs=None):
        end_of_epoch(self, epoch, logs)
        if epoch == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(training.History, "on_epoch_end", interrupt_after_second_epoch)
    args = [f"--data_dir={cifar_dir}", f"--out_dir={tmp_path}", "--epochs=3", "--width=8"]
    with pytest.raises(settings.Interrupted, match="--resume="):
        scratch_cnn.main(args + TINY_RUN)
    (run_dir,) = (tmp_path / "scratch_cnn").iterdir()
    assert (run_dir / "model.keras").is_file()
    assert [row["epoch"] for row in training.read_history(run_dir)] == [0, 1]
    assert not (run_dir / "metrics.json").exists()

    monkeypatch.undo()
    with pytest.raises(settings.ConfigError, match="keeps its saved settings"):
        scratch_cnn.main(["--resume=last", f"--out_dir={tmp_path}", "--epochs=5"])
    capsys.readouterr()
    resumed = scratch_cnn.main(["--resume=last", f"--out_dir={tmp_path}", "--verbose=0"])
    assert resumed == run_dir
    shown = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["epochs", "=", "3", "(set)"] in shown
    assert ["width", "=", "8", "(set)"] in shown
    assert [row["epoch"] for row in training.read_history(run_dir)] == [0, 1, 2]
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == 3
    with pytest.raises(settings.ConfigError, match="finished"):
        scratch_cnn.main([f"--resume={run_dir}"])


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--epochz=3", "unknown setting --epochz"),
        ("--epochs=abc", "--epochs takes an int"),
        ("--train_images=-5", "--train_images must be 0 (all) or positive"),
    ],
)
def test_bad_flags_exit_2_with_one_line(flag, message, tmp_path):
    result = run_script("scratch_cnn.py", flag, f"--out_dir={tmp_path}")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = own_stderr_lines(result.stderr)
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "scratch_cnn").exists()


def test_mirrored_strategy_trains_on_two_logical_cpus(cifar_dir, tmp_path):
    """The several-GPU path, on a CPU split into two logical devices."""
    script = textwrap.dedent(f"""
        import sys
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2
        )
        sys.path.insert(0, {str(REPO)!r})
        import training, scratch_cnn
        devices = [device.name for device in tf.config.list_logical_devices("CPU")]
        training.distribution_strategy = lambda: tf.distribute.MirroredStrategy(devices)
        scratch_cnn.main(sys.argv[1:])
        """)
    result = subprocess.run(
        [sys.executable, "-c", script, f"--data_dir={cifar_dir}", f"--out_dir={tmp_path}"]
        + ["--epochs=1", "--width=8", *TINY_RUN],
        env={**os.environ, **OFFLINE_ENV},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "2 replica(s)" in result.stdout
    (run_dir,) = (tmp_path / "scratch_cnn").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert np.isfinite(metrics["test_loss"]) and metrics["epochs"] == 1


def test_batches_reaching_the_model_lie_in_zero_one(second_run):
    """The scratch CNN is trained on pixels / 255: check the batches main() feeds."""
    seen = {name: second_run[3][name] for name in ("train", "validation")}
    for images in seen.values():
        assert images.shape[1:] == (32, 32, 3)
        assert images.min() >= 0.0 and images.max() <= 1.0
        assert images.min() < 0.1 and images.max() > 0.9  # uses the range, not a sliver


def test_the_schedule_is_airbench_s_scaled_to_the_batch(second_run):
    """A linear rise from 0.2 of the peak over 23% of the steps, then a linear fall to
    0.07 of it; the peak is LEARNING_RATE for a batch of 1,024, scaled by the batch."""
    schedule, steps, batch = (
        second_run[3][key] for key in ("schedule", "steps", "batch_size")
    )
    peak = scratch_cnn.LEARNING_RATE * batch / 1024
    assert schedule.total_steps == steps  # one epoch
    rates = [float(schedule(step)) for step in range(steps + 1)]
    assert rates[0] == pytest.approx(0.2 * peak)
    assert max(rates) == pytest.approx(peak)
    assert rates[-1] == pytest.approx(0.07 * peak)
    assert schedule.warmup_steps == round(0.23 * steps)


def test_whitening_filters_whiten_the_patches_they_come_from():
    rng = np.random.default_rng(0)
    # Correlated channels and neighbours, as in real images.
    base = rng.normal(size=(64, 9, 9, 1)).astype(np.float32)
    images = np.concatenate([base, 0.8 * base + 0.2 * rng.normal(size=base.shape)], -1)
    images = images + np.roll(images, 1, axis=1)
    kernel = scratch_cnn.whitening_filters(images, epsilon=1e-6)
    assert kernel.shape == (2, 2, 2, 16)
    np.testing.assert_allclose(kernel[..., 8:], -kernel[..., :8])  # and their negatives
    windows = np.lib.stride_tricks.sliding_window_view(images, (2, 2), axis=(1, 2))
    patches = windows.transpose(0, 1, 2, 4, 5, 3).reshape(-1, 8)
    whitened = patches @ kernel[..., :8].reshape(8, 8)
    covariance = whitened.T @ whitened / len(whitened)
    np.testing.assert_allclose(covariance, np.eye(8), atol=1e-3)


def test_dirac_init_passes_the_first_channels_through():
    kernel = scratch_cnn.dirac_kernel(np.ones((3, 3, 4, 6), np.float32))
    x = np.random.default_rng(0).normal(size=(1, 5, 5, 4)).astype(np.float32)
    y = keras.ops.conv(x, kernel, padding="same").numpy()
    np.testing.assert_allclose(y[..., :4], x, atol=1e-6)
    assert not np.allclose(y[..., 4:], 0)  # the other filters keep their start


def test_a_fast_bias_moves_rate_factor_times_as_far_under_sgd():
    moves = []
    for factor in (1.0, 64.0):
        layer = training.Bias(rate_factor=factor)
        inputs = keras.Input((3,))
        model = keras.Model(inputs, layer(inputs))
        model.compile(keras.optimizers.SGD(0.01, momentum=0.85, nesterov=True), "mse")
        x, y = np.zeros((8, 3), np.float32), np.ones((8, 3), np.float32)
        model.fit(x, y, epochs=1, batch_size=8, verbose=0)
        moves.append(layer.bias.numpy())
        np.testing.assert_allclose(model(x).numpy(), x + layer.bias.numpy(), atol=1e-6)
    np.testing.assert_allclose(moves[1], 64 * moves[0], rtol=1e-5)


def test_lookahead_ends_on_its_moving_average():
    """Every 5 steps the weights jump to their moving average; after the last step
    they are that average, not the last step's weights."""
    inputs = keras.Input((2,))
    model = keras.Model(inputs, keras.layers.Dense(1)(inputs))
    model.compile(keras.optimizers.SGD(0.1), "mse")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 2)), rng.normal(size=(64, 1))
    lookahead = scratch_cnn.Lookahead(total_steps=8, every=5, decay=0.5)
    seen = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append([w.numpy().copy() for w in self.model.weights])

    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[lookahead, Record()])
    assert len(seen) == 8
    for weights, average in zip(seen[-1], lookahead.average):
        np.testing.assert_allclose(weights, average)
    # Between the jumps the weights train freely: step 6 differs from its average.
    assert not np.allclose(seen[5][0], seen[4][0])
