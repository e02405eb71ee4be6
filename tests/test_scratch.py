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

    def recording_fit(model, train_data, validation_data, run_dir, **kwargs):
        seen["schedule"] = model.optimizer.get_config()["learning_rate"]["config"]
        seen["train"] = next(iter(train_data))[0].numpy()
        seen["validation"] = next(iter(validation_data))[0].numpy()
        return real_fit(model, train_data, validation_data, run_dir, **kwargs)

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
    assert ["epochs", "=", "3", "(set)"] in shown and ["width", "=", "8", "(set)"] in shown
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


def test_a_short_run_peaks_at_a_proportionally_lower_rate(second_run):
    """The 1,000-image regression: 64 steps, 16 of them warm-up to 0.05, blew the run
    up (13.9% test accuracy on CIFAR-10). A run of fewer than FULL_RATE_STEPS steps
    peaks at LEARNING_RATE x its steps / FULL_RATE_STEPS; config.json says which."""
    run_dir, schedule = second_run[2], second_run[3]["schedule"]
    # One epoch (9 steps): the 2-epoch warm-up is capped at the run's length.
    steps = schedule["warmup_steps"]
    assert steps == 9 and schedule["decay_steps"] == 1
    assert steps < scratch_cnn.FULL_RATE_STEPS
    expected = scratch_cnn.LEARNING_RATE * steps / scratch_cnn.FULL_RATE_STEPS
    assert schedule["warmup_target"] == pytest.approx(expected)
    config = json.loads((run_dir / "config.json").read_text())
    assert config["peak_learning_rate"] == pytest.approx(expected)
    # A full CIFAR-10 run (8 epochs of 352 steps) peaks at LEARNING_RATE; 0 = off.
    assert scratch_cnn.peak_learning_rate(0.05, 8 * 352, 256) == 0.05
    assert scratch_cnn.peak_learning_rate(0.05, 64, 0) == 0.05
