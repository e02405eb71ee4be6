"""Runs that survive interruption, crashes, divergence, resumes and several devices.

Real runs on the tiny data sets of conftest.py: Ctrl-C is SIGINT (or `kill`'s
SIGTERM) sent to a child process once its run folder shows the chosen epoch
finished, a crash is a file-size limit put on a running child (a full disk),
divergence an absurd learning rate, and several GPUs are logical CPU devices in a
child process.
"""

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import h5py
import keras
import numpy as np
import pytest
from conftest import OFFLINE_ENV, REPO, TINY_RUN, own_stderr_lines, run_script

import scratch_cnn
import settings
import training
import transfer_mobilenetv2 as transfer



def transfer_tiny(base_weights):
    """Two phases need pretrained weights: conftest's stand-in, at 32 px."""
    return [f"--weights={base_weights}", "--img_size=32"]

SHORT_EPOCHS = ["--steps_per_epoch=2"]  # 2 batches of 32 a training epoch


# Runs a training script as __main__, as `python script.py ...` would, except that
# once its first epoch is backed up it waits there: the test's Ctrl-C (SIGINT) lands
# in that wait, never after a tiny run has already finished on a busy machine.
PAUSE_AFTER_FIRST_EPOCH = textwrap.dedent("""
    import runpy, sys, time
    sys.path.insert(0, sys.argv[1])
    import training
    back_up_epoch = training.Backup.on_epoch_end
    def back_up_then_wait(self, epoch, logs=None):
        back_up_epoch(self, epoch, logs)
        if epoch == 0:
            time.sleep(600)
    training.Backup.on_epoch_end = back_up_then_wait
    sys.argv = sys.argv[2:]
    runpy.run_path(sys.argv[0], run_name="__main__")
    """)


def start(script, out_dir, *args, pause_after_first_epoch=False):
    """A training script as a child process, its output going to files in out_dir
    (a full pipe would stall it); paused after its first epoch if asked."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pause = ["-c", PAUSE_AFTER_FIRST_EPOCH, str(REPO)] if pause_after_first_epoch else []
    return subprocess.Popen(
        [sys.executable, *pause, str(REPO / script), f"--out_dir={out_dir}", *args,
         *TINY_RUN],  # fmt: skip
        cwd=REPO,
        env={**os.environ, **OFFLINE_ENV},
        stdout=(out_dir / "stdout.txt").open("w"),
        stderr=(out_dir / "stderr.txt").open("w"),
    )  # Python ignores SIGXFSZ: past a file-size limit a write fails with EFBIG


def wait_for_epochs(process, out_dir, script, count, timeout=600):
    """The child's run folder once `count` epochs are in its history and its
    backup: the state a Ctrl-C between two epochs leaves."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, (out_dir / "stderr.txt").read_text()[-2000:]
        for run_dir in (out_dir / script).glob("*"):
            backed_up = [
                json.loads(path.read_text())["epoch"]
                for path in (run_dir / "backup").glob("*/training_metadata.json")
            ]
            rows = len(training.read_history(run_dir))
            if rows >= count and max(backed_up, default=0) >= count:
                return run_dir
        time.sleep(0.05)
    process.kill()
    raise AssertionError(f"no epoch {count} within {timeout} s")


def interrupt(process, out_dir, signum=signal.SIGINT):
    """Ctrl-C, as a terminal sends it (or SIGTERM, as `kill` and schedulers send
    it, which must stop the same way); the child must exit 130, resumable."""
    process.send_signal(signum)
    assert process.wait(timeout=300) == 130, (out_dir / "stderr.txt").read_text()
    assert "--resume=" in (out_dir / "stderr.txt").read_text()


def epochs_and_phases(run_dir):
    return [(row["epoch"], row["phase"]) for row in training.read_history(run_dir)]


def fingerprint(folder):
    return {
        path.relative_to(folder): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def backup_weights(run_dir):
    return sorted((run_dir / "backup").glob("*/latest.weights.h5"))


def float_arrays(path):
    """Every floating-point array in an .h5 weights file (h5py raises if the file
    is truncated)."""
    arrays = []
    with h5py.File(path, "r") as file:
        file.visititems(
            lambda name, item: arrays.append(item)
            if isinstance(item, h5py.Dataset) and item.dtype.kind == "f"
            else None
        )
        return [array[()] for array in arrays]


def all_finite(arrays):
    return all(np.isfinite(np.asarray(array)).all() for array in arrays)


# ---------------------------------------------------------------------------------
# 1. A resume in the head phase must not train extra fine-tuning epochs


def test_resume_in_the_head_phase_starts_fine_tuning_at_its_own_epoch(
    cifar_dir, tmp_path, base_weights
):
    """Ctrl-C in the head phase (4 epochs), once its first epoch is backed up; the
    resumed run finishes the head and trains the one fine-tuning epoch as epoch 5,
    each epoch once (Keras's BackupAndRestore leaves the head's restored epoch in
    model._initial_epoch, which fit would use for fine-tuning)."""
    child = start(
        "transfer_mobilenetv2.py", tmp_path, f"--data_dir={cifar_dir}",
        "--head_epochs=4", "--fine_tune_epochs=1", *transfer_tiny(base_weights),
        *SHORT_EPOCHS, pause_after_first_epoch=True,
    )  # fmt: skip
    run_dir = wait_for_epochs(child, tmp_path, transfer.SCRIPT, 1)
    interrupt(child, tmp_path)
    assert not (run_dir / "backup" / "fine_tune").exists()

    assert transfer.main([f"--resume={run_dir}", "--verbose=0"]) == run_dir
    assert epochs_and_phases(run_dir) == [
        (0, "head"), (1, "head"), (2, "head"), (3, "head"), (4, "fine_tune"),
    ]  # fmt: skip
    history = training.read_history(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 5
    assert metrics["train_seconds"] == pytest.approx(
        sum(row["epoch_seconds"] for row in history), abs=0.1
    )


# ---------------------------------------------------------------------------------
# 2. A crash while an epoch's files are written loses nothing


def test_a_crash_writing_an_epoch_keeps_checkpoint_and_backup_whole(
    cifar_dir, tmp_path
):
    """Once epoch 1 is saved, the disk 'fills up' (a file-size limit smaller than
    the checkpoint and the backup, put on the running child): epoch 2's writes
    fail. Checkpoint and backup stay whole, and the resumed run ends with every
    epoch in the history exactly once."""
    child = start(
        "scratch_cnn.py", tmp_path, f"--data_dir={cifar_dir}", "--epochs=4",
        "--width=8",
    )  # fmt: skip
    run_dir = wait_for_epochs(child, tmp_path, scratch_cnn.SCRIPT, 1)
    limit = min(
        (run_dir / "model.keras").stat().st_size,
        (run_dir / "backup" / "train" / "latest.weights.h5").stat().st_size,
    ) // 2
    resource.prlimit(child.pid, resource.RLIMIT_FSIZE, (limit, limit))
    assert child.wait(timeout=300) not in (0, 130)
    stderr = (tmp_path / "stderr.txt").read_text()
    assert "File too large" in stderr, stderr[-2000:]
    assert not (run_dir / "metrics.json").exists()

    keras.models.load_model(run_dir / "model.keras")  # whole, not cut short
    assert all_finite(float_arrays(run_dir / "backup/train/latest.weights.h5"))

    assert scratch_cnn.main([f"--resume={run_dir}", "--verbose=0"]) == run_dir
    assert [row["epoch"] for row in training.read_history(run_dir)] == [0, 1, 2, 3]
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == 4
    assert not list(run_dir.glob("*partial*"))


# ---------------------------------------------------------------------------------
# 3. A diverged run keeps its last finite state and never resumes from NaN


def test_divergence_keeps_the_last_finite_state_and_resume_starts_from_it(
    cifar_dir, tmp_path, base_weights
):
    """The head trains normally; fine-tuning at a learning rate of 1e30 turns the
    weights to inf within a step. The run stops naming the epoch, with no NaN in
    its history, checkpoint or backups; a resume starts again from the head's
    finite state (and diverges again at the same epoch: same settings)."""
    args = [
        f"--data_dir={cifar_dir}", f"--out_dir={tmp_path}", "--head_epochs=1",
        "--fine_tune_epochs=2", "--fine_tune_lr=1e30", *transfer_tiny(base_weights),
        *SHORT_EPOCHS,
        *TINY_RUN,
    ]  # fmt: skip
    with pytest.raises(settings.ConfigError, match="diverged in epoch 2") as error:
        transfer.main(args)
    assert "after epoch 1, the last finite one" in str(error.value)
    assert "lower learning rate" in str(error.value)
    (run_dir,) = (tmp_path / transfer.SCRIPT).iterdir()

    def assert_last_finite_state():
        assert epochs_and_phases(run_dir) == [(0, "head")]
        row = training.read_history(run_dir)[0]
        assert np.isfinite([row["loss"], row["val_loss"]]).all()
        model = keras.models.load_model(run_dir / "model.keras")
        assert all_finite(model.get_weights())
        assert [path.parent.name for path in backup_weights(run_dir)] == ["head"]
        assert all_finite(float_arrays(backup_weights(run_dir)[0]))
        assert not (run_dir / "metrics.json").exists()

    assert_last_finite_state()
    with pytest.raises(settings.ConfigError, match="diverged in epoch 2"):
        transfer.main([f"--resume={run_dir}", "--verbose=0"])
    assert_last_finite_state()


# ---------------------------------------------------------------------------------
# 4. Early stopping remembers the epochs before a resume


def test_early_stopping_counts_the_epochs_before_a_resume(cifar_dir, tmp_path):
    """With a learning rate of 0 and frozen BatchNorm statistics the model never
    changes, so val_accuracy never improves after epoch 1 and a patience of 3 ends
    the run after epoch 4. A stop after epoch 1 must not restart the count; the stop
    here is SIGTERM (`kill`), which must act as Ctrl-C does."""
    child = start(
        "scratch_cnn.py", tmp_path, f"--data_dir={cifar_dir}", "--epochs=10",
        "--width=8", "--learning_rate=0.0", "--batchnorm_momentum=1.0",
        "--early_stopping_patience=3", pause_after_first_epoch=True,
    )  # fmt: skip
    run_dir = wait_for_epochs(child, tmp_path, scratch_cnn.SCRIPT, 1)
    interrupt(child, tmp_path, signal.SIGTERM)
    assert len(training.read_history(run_dir)) < 4

    assert scratch_cnn.main([f"--resume={run_dir}", "--verbose=0"]) == run_dir
    history = training.read_history(run_dir)
    assert len({row["val_accuracy"] for row in history}) == 1  # never improved
    assert [row["epoch"] for row in history] == [0, 1, 2, 3]
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == 4


# ---------------------------------------------------------------------------------
# 5-6. Several replicas: bfloat16 instead of loss scaling, an even batch split


@pytest.mark.parametrize(
    "batch_size, replicas, global_batch",
    [(64, 1, 64), (64, 2, 64), (64, 3, 63), (32, 3, 33), (64, 5, 65), (64, 6, 66),
     (64, 7, 63), (2, 4, 4), (0, 3, 0)],
)  # fmt: skip
def test_global_batch_is_a_multiple_of_the_replicas(batch_size, replicas, global_batch):
    assert training.global_batch_size(batch_size, replicas) == global_batch


def test_mixed_precision_is_bfloat16_on_several_replicas():
    assert training.precision_policy(False, 1) == "float32"
    assert training.precision_policy(False, 4) == "float32"
    assert training.precision_policy(True, 1) == "mixed_float16"
    assert training.precision_policy(True, 2) == "mixed_bfloat16"


def test_three_replicas_train_in_bfloat16_on_an_even_batch_split(cifar_dir, tmp_path):
    """The several-GPU path on a CPU split into three logical devices: a batch of
    32 becomes 33 (11 each), said at start and saved, and MIXED_PRECISION trains
    in mixed_bfloat16, not with float16 loss scaling."""
    script = textwrap.dedent(f"""
        import sys
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 3
        )
        sys.path.insert(0, {str(REPO)!r})
        import training, scratch_cnn
        devices = [device.name for device in tf.config.list_logical_devices("CPU")]
        training.distribution_strategy = lambda: tf.distribute.MirroredStrategy(devices)
        scratch_cnn.main(sys.argv[1:])
        """)
    result = subprocess.run(
        [sys.executable, "-c", script, f"--data_dir={cifar_dir}", f"--out_dir={tmp_path}",
         "--epochs=1", "--width=8", "--steps_per_epoch=2", "--mixed_precision=True",
         *TINY_RUN],
        env={**os.environ, **OFFLINE_ENV}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "3 replica(s)" in result.stdout
    assert "batch_size = 33  (rounded from 32" in result.stdout
    assert "mixed_bfloat16 on 3 replicas" in result.stdout
    (run_dir,) = (tmp_path / "scratch_cnn").iterdir()
    config = json.loads((run_dir / "config.json").read_text())["config"]
    assert config["BATCH_SIZE"] == 33
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert np.isfinite(metrics["test_loss"])
    assert training.read_history(run_dir)[0]["images_per_second"] > 0
    model = keras.models.load_model(run_dir / "model.keras")
    assert model.get_layer("block1_conv1").dtype_policy.name == "mixed_bfloat16"
    assert model.get_layer("block1_conv1").compute_dtype == "bfloat16"


# ---------------------------------------------------------------------------------
# --resume refuses a run folder it cannot safely go on with, and changes nothing


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def fill_with_nan(path):
    """One weight array of the file set to NaN, as a diverged run saved it."""
    with h5py.File(path, "r+") as file:
        arrays = []
        file.visititems(
            lambda name, item: arrays.append(name)
            if isinstance(item, h5py.Dataset) and item.dtype.kind == "f"
            else None
        )
        file[arrays[0]][...] = np.nan


DAMAGE = {
    "another script's run": (
        "config.json",
        lambda path: path.write_text(
            path.read_text().replace('"scratch_cnn"', '"transfer_mobilenetv2"', 1)
        ),
        "a run of transfer_mobilenetv2.py, not scratch_cnn.py",
    ),
    "damaged config.json": ("config.json", truncate, "damaged"),
    "truncated model.keras": ("model.keras", truncate, "damaged or truncated"),
    "truncated backup": ("backup/train/latest.weights.h5", truncate, "truncated"),
    "damaged backup epoch": (
        "backup/train/training_metadata.json",
        lambda path: path.write_text('{"epo'),
        "damaged",
    ),
    "NaN in the backup": ("backup/train/latest.weights.h5", fill_with_nan, "NaN"),
}


@pytest.fixture
def unfinished_run(scratch_run, tmp_path):
    """A copy of the session's finished scratch run as an interrupted run looks:
    no metrics.json, and a backup of its last epoch, saved by Keras."""
    run_dir = tmp_path / "scratch_cnn" / scratch_run.name
    shutil.copytree(scratch_run, run_dir)
    (run_dir / "metrics.json").unlink()
    backup = run_dir / "backup" / "train"
    backup.mkdir(parents=True)
    model = keras.models.load_model(run_dir / "model.keras")
    model.save_weights(backup / "latest.weights.h5")
    training.write_json(backup / "training_metadata.json", {"epoch": 3, "batch": 0})
    training.check_resumable(run_dir, scratch_cnn.SCRIPT)  # whole, it passes
    return run_dir


@pytest.mark.parametrize("damage", DAMAGE)
def test_resume_refuses_a_damaged_run_naming_the_file(damage, unfinished_run):
    name, spoil, says = DAMAGE[damage]
    spoil(unfinished_run / name)
    before = fingerprint(unfinished_run)
    for resume in (unfinished_run, "last"):
        with pytest.raises(settings.DataError, match=says) as error:
            scratch_cnn.main(
                [f"--resume={resume}", f"--out_dir={unfinished_run.parent.parent}"]
            )
        assert str(unfinished_run / name) in str(error.value)
    assert fingerprint(unfinished_run) == before


def test_resume_of_a_damaged_run_exits_3_with_one_line(unfinished_run):
    truncate(unfinished_run / "model.keras")
    before = fingerprint(unfinished_run)
    result = run_script("scratch_cnn.py", f"--resume={unfinished_run}")
    assert result.returncode == 3, result.stderr[-2000:]
    lines = own_stderr_lines(result.stderr)
    assert len(lines) == 1 and str(unfinished_run / "model.keras") in lines[0], lines
    assert fingerprint(unfinished_run) == before
