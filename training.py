"""Plumbing the scripts share: the effective configuration and exit codes (the
command line itself is settings.py's), run folders, seeding, distribution (several
GPUs or several workers), and the Keras callbacks that train, checkpoint, log and
resume a run.

Nothing here holds a hyperparameter: each script's config block does.
"""

import atexit
import csv
import io
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import zipfile
from datetime import datetime
from pathlib import Path

import h5py
import keras
import numpy as np
import tensorflow as tf

import settings

# ---------------------------------------------------------------------------------
# Configuration: the UPPER_CASE block at the top of a script, overridden per run


def configure(defaults, argv, verbose=True):
    """A script's effective configuration: its config block with `argv` applied.
    Prints it, one setting a line, marking the overridden ones."""
    config = settings.parse_overrides(defaults, argv)
    if verbose:
        print_config(config, defaults)
    return config


def print_config(config, defaults=None):
    width = max(len(name) for name in config)
    for name, value in config.items():
        changed = defaults is not None and defaults.get(name) != value
        print(f"  {name.lower():<{width}} = {value!r}{'  (set)' if changed else ''}")


def cli(main):
    """Run `main(argv)` as a command: expected failures become one plain line on
    stderr and the documented exit code, never a traceback. SIGTERM (`kill`, a
    scheduler's or `timeout`'s stop) stops the way Ctrl-C does."""
    program = Path(sys.argv[0]).name
    signal.signal(signal.SIGTERM, settings.stop_as_ctrl_c)
    try:
        main(sys.argv[1:])
    except settings.ConfigError as error:
        settings.fail(error, settings.EXIT_CONFIG)
    except settings.DataError as error:
        settings.fail(error, settings.EXIT_DATA)
    except (settings.Interrupted, KeyboardInterrupt) as error:
        print(f"{program}: {error or 'interrupted'}", file=sys.stderr)
        sys.exit(settings.EXIT_INTERRUPTED)


# ---------------------------------------------------------------------------------
# Run folders: OUT_DIR/<script>/<timestamp>/, never reused


def new_run_dir(out_dir, script):
    """Create and return a fresh run folder; an existing one is never reused. In a
    multi-worker run only the chief writes the run folder; every other worker gets
    a throwaway one, removed when it exits."""
    if not cluster_task()[1]:
        return worker_dir(script)
    parent = Path(out_dir) / script
    parent.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for attempt in range(1, 1000):
        run_dir = parent / (stamp if attempt == 1 else f"{stamp}-{attempt}")
        try:
            run_dir.mkdir()
            return run_dir
        except FileExistsError:
            continue
    raise settings.ConfigError(f"cannot create a new run folder in {parent}")


def worker_dir(script, copy_of=None):
    """A temporary folder for a worker that is not the chief (a copy of the run
    folder `copy_of`, when resuming), removed when the process exits. Keras's
    callbacks write on every worker; this keeps their files off the chief's."""
    folder = Path(tempfile.mkdtemp(prefix=f"{script}-worker-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    if copy_of is not None:
        shutil.copytree(copy_of, folder, dirs_exist_ok=True)
    return folder


def run_to_resume(resume, out_dir, script):
    """The run folder that `--resume` names: a path, or "last" for the newest
    unfinished run of `script`. Checked before any work: a run of another script,
    a damaged config.json, a truncated model.keras or a damaged or NaN backup stops
    with exit 3 naming the file, and the folder is left as it is."""
    if resume == "last":
        unfinished = settings.list_runs(out_dir, script, finished=False)
        if not unfinished:
            raise settings.ConfigError(
                f"--resume=last: no unfinished run in {Path(out_dir) / script}"
            )
        run_dir = unfinished[-1]
    else:
        run_dir = Path(resume)
        if not (run_dir / "config.json").is_file():
            raise settings.ConfigError(
                f"--resume={resume}: not a run folder (no config.json in it)"
            )
        if (run_dir / "metrics.json").is_file():
            raise settings.ConfigError(
                f"--resume={resume}: that run has finished (metrics.json exists)"
            )
    check_resumable(run_dir, script)
    return run_dir


def check_resumable(run_dir, script):
    """Raise DataError naming the first file of `run_dir` that a resume of `script`
    could not safely go on from."""
    cannot = "this run cannot be resumed; start a new one"
    path = run_dir / "config.json"
    try:
        saved = json.loads(path.read_text())
        owner, saved_config = saved["script"], saved["config"]
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise settings.DataError(
            f"{path}: damaged ({type(error).__name__}); {cannot}"
        ) from None
    if owner != script or not isinstance(saved_config, dict):
        raise settings.DataError(
            f"{path}: a run of {owner}.py, not {script}.py; resume it with: "
            f"python {owner}.py --resume={run_dir}"
        )
    path = run_dir / "model.keras"
    if path.exists():
        try:  # a .keras file is a zip: a truncated one has no central directory
            with zipfile.ZipFile(path) as archive:
                damaged = archive.testzip()
        except (OSError, zipfile.BadZipFile):
            damaged = "the archive"
        if damaged:
            raise settings.DataError(
                f"{path}: damaged or truncated ({damaged} unreadable); {cannot}"
            )
    for path in sorted((run_dir / "backup").glob("*/training_metadata.json")):
        try:
            int(json.loads(path.read_text())["epoch"])
        except (OSError, ValueError, TypeError, KeyError):
            raise settings.DataError(f"{path}: damaged; {cannot}") from None
    for path in sorted((run_dir / "backup").glob("*/latest.weights.h5")):
        finite = weights_file_is_finite(path)
        if finite is None:
            raise settings.DataError(f"{path}: damaged or truncated; {cannot}")
        if not finite:
            raise settings.DataError(
                f"{path}: holds NaN or inf weights (the run diverged); resuming would "
                f"train on from them. Start a new run with a lower learning rate"
            )


def weights_file_is_finite(path):
    """True if every floating-point array in the .weights.h5 file at `path` is
    finite, False if one is not, None if the file cannot be read."""
    arrays = []
    try:
        with h5py.File(path, "r") as file:
            file.visititems(
                lambda name, item: arrays.append(item[()])
                if isinstance(item, h5py.Dataset) and item.dtype.kind == "f"
                else None
            )
    except (OSError, ValueError, KeyError):
        return None
    return all(np.isfinite(array).all() for array in arrays)


def resumed_config(
    run_dir, config, defaults, may_change=("RESUME", "VERBOSE", "OUT_DIR", "DATA_DIR")
):
    """The saved configuration of `run_dir`, so a resumed run ends as it began.
    Only the settings in `may_change` (where things are, how much to print) may
    be overridden on resume."""
    saved = json.loads((run_dir / "config.json").read_text())["config"]
    changed = [
        name
        for name in config
        if name not in may_change and config[name] != defaults[name]
    ]
    settings.require(
        not changed,
        f"a resumed run keeps its saved settings; drop --{', --'.join(changed).lower()}",
    )
    given = {name: config[name] for name in may_change if config[name] != defaults[name]}
    return {**saved, **given, "RESUME": config["RESUME"]}


def configure_run(defaults, argv, script):
    """(config, run_dir) for a training script: its configuration with `argv`
    applied and, with --resume, the saved configuration of the run folder to go
    on with; run_dir is None for a new run, made once the data and model are ready.
    Prints the settings that apply: on a resume, the run's saved ones."""
    config = configure(defaults, argv, verbose=False)
    if not config["RESUME"]:
        print_config(config, defaults)
        return config, None
    run_dir = run_to_resume(config["RESUME"], config["OUT_DIR"], script)
    config = resumed_config(run_dir, config, defaults)
    print(f"resuming {run_dir} with its saved settings:")
    print_config(config, defaults)
    if not cluster_task()[1]:  # a worker goes on from a copy; the chief writes
        run_dir = worker_dir(script, copy_of=run_dir)
    return config, run_dir


def save_run_config(run_dir, script, config, data_source, **extra):
    """config.json: the effective configuration, what the data was, library versions,
    and `extra` facts evaluate.py needs (e.g. the input range the model expects)."""
    settings.write_json(
        run_dir / "config.json",
        {
            "script": script,
            "config": config,
            "data_source": data_source,
            **extra,
            "versions": {
                "python": platform.python_version(),
                "tensorflow": tf.__version__,
                "keras": keras.__version__,
                "numpy": np.__version__,
            },
            "devices": [device.name for device in tf.config.list_logical_devices()],
        },
    )


# ---------------------------------------------------------------------------------
# Set-up: seeds, devices, precision


def gpu_names():
    """The GPUs TensorFlow sees, by their device names."""
    return [
        tf.config.experimental.get_device_details(gpu).get("device_name", gpu.name)
        for gpu in tf.config.list_physical_devices("GPU")
    ]


def seed_everything(seed):
    """Seed Python, NumPy and TensorFlow so a run can be repeated."""
    keras.utils.set_random_seed(seed)


def cluster_task():
    """(workers, chief) from TF_CONFIG: how many chief and worker tasks its cluster
    names (0 without TF_CONFIG), and whether this process is the chief: the "chief"
    task, else worker 0, as TensorFlow decides it."""
    try:
        tf_config = json.loads(os.environ.get("TF_CONFIG") or "{}")
        cluster, task = tf_config.get("cluster", {}), tf_config.get("task", {})
        workers = len(cluster.get("chief", [])) + len(cluster.get("worker", []))
    except (ValueError, AttributeError, TypeError) as error:
        raise settings.ConfigError(
            f"TF_CONFIG must be JSON with a cluster and a task, as the README's "
            f"'Training on several machines' shows ({error})"
        ) from None
    chief = task.get("type") == "chief" or (
        task.get("type") == "worker" and task.get("index") == 0 and "chief" not in cluster
    )
    return workers, chief or workers <= 1


HEARTBEAT_TIMEOUT_MS = 300_000  # a worker silent this long is taken for dead


def allow_slow_heartbeats():
    """Set up the coordination service as MultiWorkerMirroredStrategy would, with a
    longer heartbeat timeout: with TensorFlow's 10 s, a worker slowed by other work
    on its machine (or a long first step) is taken for dead and the run aborts."""
    from tensorflow.compiler.xla.tsl.protobuf import coordination_config_pb2
    from tensorflow.python.eager import context

    cluster = json.loads(os.environ["TF_CONFIG"])["cluster"]
    jobs = [job for job in ("chief", "worker") if cluster.get(job)]
    context.context().configure_coordination_service(
        service_type="standalone",
        service_leader=f"/job:{jobs[0]}/replica:0/task:0",
        heartbeat_timeout_in_ms=HEARTBEAT_TIMEOUT_MS,
        coordinated_jobs=[
            coordination_config_pb2.CoordinatedJob(name=job, num_tasks=len(cluster[job]))
            for job in jobs
        ],
    )


class MultiWorkerStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """MultiWorkerMirroredStrategy as Keras 3's fit calls it (keras-team/keras#20585):
    fit reduces its first (images, labels) batch in one call, which this strategy
    cannot do for a nest, and each step's metrics, one scalar per replica, "over axis
    0", which a scalar has not. Here a nest is reduced one tensor at a time, and
    scalars over the replicas, as MirroredStrategy does it for fit."""

    def reduce(self, reduce_op, value, axis=None):
        def reduce_one(one):
            local = self.experimental_local_results(one)[0]
            scalar = getattr(local, "shape", None) is not None and local.shape.rank == 0
            return super(MultiWorkerStrategy, self).reduce(
                reduce_op, one, None if scalar else axis
            )

        return tf.nest.map_structure(reduce_one, value)


def distribution_strategy():
    """MultiWorkerMirroredStrategy when TF_CONFIG names several workers, else
    MirroredStrategy over all GPUs when there are several, else the default. Call it
    first thing: a multi-worker strategy must exist before any tensor does."""
    workers, _ = cluster_task()
    if workers > 1:
        allow_slow_heartbeats()
        return MultiWorkerStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy([gpu.name for gpu in gpus])
    return tf.distribute.get_strategy()


def precision_policy(mixed_precision, replicas, gpus, cpu_flags=()):
    """The Keras dtype policy for MIXED_PRECISION ("off", "on" or "auto"): "on" is
    mixed_float16 on one GPU and mixed_bfloat16 on several replicas or a CPU; "auto"
    is "on" on GPUs and on a CPU with AMX (amx_bf16), where bfloat16 matrix units
    pay, else float32. Keras 3.15.1's LossScaleOptimizer judges whether a step
    overflowed from the first replica's gradients alone, so an overflow on another
    GPU reaches the weights as inf; bfloat16 needs no loss scaling."""
    if mixed_precision == "off" or (
        mixed_precision == "auto" and not gpus and "amx_bf16" not in cpu_flags
    ):
        return "float32"
    return "mixed_float16" if gpus and replicas == 1 else "mixed_bfloat16"


def set_precision(mixed_precision, strategy):
    """Set and return the global dtype policy (see precision_policy), once the
    strategy exists and before the model is built. BatchNorm and the softmax
    output keep float32 under either mixed policy, and so does the loss."""
    policy = precision_policy(
        mixed_precision, strategy.num_replicas_in_sync,
        tf.config.list_logical_devices("GPU"), settings.cpu_flags(),
    )  # fmt: skip
    keras.mixed_precision.set_global_policy(policy)
    if policy != "float32":
        print(f"precision: {policy}")
    return policy


class WarmupThenDecay(keras.optimizers.schedules.LearningRateSchedule):
    """A linear warm-up from `start` x `peak` to `peak` over `warmup_steps`, then a
    cosine or linear decay to `end` x `peak` at `total_steps`."""

    def __init__(self, peak, warmup_steps, total_steps, start=0.0, end=0.0, decay="cosine"):
        self.peak, self.start, self.end, self.decay = peak, start, end, decay
        self.warmup_steps = min(warmup_steps, total_steps)
        self.total_steps = total_steps

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        warmup = keras.ops.maximum(float(self.warmup_steps), 1.0)
        rising = self.start + (1 - self.start) * step / warmup
        progress = keras.ops.clip(
            (step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1), 0, 1
        )
        if self.decay == "cosine":
            falling = self.end + (1 - self.end) * 0.5 * (1 + keras.ops.cos(np.pi * progress))
        else:
            falling = self.end + (1 - self.end) * (1 - progress)
        return self.peak * keras.ops.where(step < self.warmup_steps, rising, falling)

    def get_config(self):
        return {
            "peak": self.peak, "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps, "start": self.start, "end": self.end,
            "decay": self.decay,
        }  # fmt: skip


def global_batch_size(batch_size, replicas):
    """BATCH_SIZE, the global batch, rounded to the nearest multiple of `replicas`
    (at least one image each) so every step splits evenly; says so when it
    changes. A batch size of 0 or less is returned as it is, for data.py to refuse."""
    if batch_size <= 0 or batch_size % replicas == 0:
        return batch_size
    rounded = max(round(batch_size / replicas), 1) * replicas
    print(
        f"  batch_size = {rounded}  (rounded from {batch_size} to a multiple of "
        f"{replicas} replicas: {rounded // replicas} images each)"
    )
    return rounded


# ---------------------------------------------------------------------------------
# Training: Keras callbacks for checkpoint, history, divergence and resume


def compile_model(model, optimizer, label_smoothing, jit_compile):
    """Compile for training on one-hot labels; a phase that changes what is
    trainable must compile again."""
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing),
        # A metric object, not the string "accuracy", and the optimizer built
        # here: Keras 3.15 (with no distribution strategy) creates both their
        # variables inside the first trace of the train step, and TensorFlow then
        # traces it a second time (MobileNetV2 on one CPU core: about 15 s a phase).
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
        jit_compile=jit_compile,
    )
    model.optimizer.build(model.trainable_variables)


class Diverged(Exception):
    """The loss, or a weight, became NaN or inf in epoch `epoch` (0-based)."""

    def __init__(self, epoch):
        super().__init__(epoch)
        self.epoch = epoch


def count_trainable(model):
    """Parameters the optimizer updates: those of the model's trainable weights."""
    return sum(int(keras.ops.size(weight)) for weight in model.trainable_weights)


def all_finite(variables):
    return all(np.isfinite(keras.ops.convert_to_numpy(v)).all() for v in variables)


class DivergenceGuard(keras.callbacks.Callback):
    """Raise Diverged at the first NaN or inf loss, and at an epoch's end whose
    validation loss, weights or optimizer state are not finite. First in the list,
    so a diverged epoch writes no checkpoint, history row or backup and the run
    folder keeps its last finite state. (Keras 3.15.1's TerminateOnNaN only stops
    after the epoch ends, and BackupAndRestore then saves the NaN weights.)"""

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not np.isfinite(float(loss)):
            raise Diverged(self.epoch)

    def on_epoch_end(self, epoch, logs=None):
        losses = [(logs or {}).get(name) for name in ("loss", "val_loss")]
        if not all_finite(
            [loss for loss in losses if loss is not None]
            + self.model.weights
            + self.model.optimizer.variables
        ):
            raise Diverged(epoch)


class Checkpoint(keras.callbacks.ModelCheckpoint):
    """model.keras, the best epoch by val_accuracy, written whole or not at all:
    Keras 3.15.1 writes it in place, so a crash or Ctrl-C mid-write would leave a
    truncated file where the best model was. Saved as model.partial.keras, then
    renamed over it."""

    def __init__(self, path, best):
        self.path = Path(path)
        super().__init__(
            str(self.path.with_suffix(".partial.keras")),
            monitor="val_accuracy",
            mode="max",
            save_best_only=True,
            initial_value_threshold=best,
        )

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        # What a crash left half-written must never be renamed into place.
        Path(self.filepath).unlink(missing_ok=True)

    def on_epoch_end(self, epoch, logs=None):
        super().on_epoch_end(epoch, logs)
        if Path(self.filepath).exists():
            Path(self.filepath).replace(self.path)


class Backup(keras.callbacks.BackupAndRestore):
    """Keras's resume state (weights, optimizer state, epoch) in backup/<phase>,
    written whole or not at all: Keras 3.15.1 writes latest.weights.h5 and
    training_metadata.json in place, so a crash mid-write leaves a backup no
    resume can load. Each is written under a temporary name and renamed, weights
    first: a crash between the two renames repeats one epoch, no more. Last in
    the list, so an epoch counts as done only once its checkpoint and history row
    are on disk."""

    def __init__(self, backup_dir):
        super().__init__(str(backup_dir), delete_checkpoint=False)

    def on_epoch_end(self, epoch, logs=None):
        weights = Path(self._weights_path)
        weights.parent.mkdir(parents=True, exist_ok=True)
        partial = weights.with_name("partial.weights.h5")
        self.model.save_weights(str(partial), overwrite=True)
        partial.replace(weights)
        settings.write_json(self._training_metadata_path, {"epoch": epoch + 1, "batch": 0})


def backed_up_epoch(backup_dir):
    """The number of epochs the backup in `backup_dir` holds, None without one."""
    path = Path(backup_dir) / "training_metadata.json"
    return json.loads(path.read_text())["epoch"] if path.is_file() else None


class EarlyStopping(keras.callbacks.EarlyStopping):
    """Keras's early stopping on val_accuracy that survives a resume: Keras 3.15.1
    resets the best value and the patience count in on_train_begin, so a resumed
    run would wait `patience` epochs afresh. This one replays `earlier_rows`, the
    phase's epochs already in history.csv, whenever training begins."""

    def __init__(self, patience, earlier_rows):
        super().__init__(monitor="val_accuracy", mode="max", patience=patience)
        self.earlier_rows = earlier_rows

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        for row in self.earlier_rows:
            self.on_epoch_end(row["epoch"], row)


class History(keras.callbacks.CSVLogger):
    """history.csv, one row per epoch written as it ends, with the training phase,
    the epoch's wall time and its training throughput (validation excluded)."""

    def __init__(self, filename, phase, images_per_epoch):
        super().__init__(str(filename), append=True)
        self.phase = phase
        self.images_per_epoch = images_per_epoch

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch_start = self.validation_start = time.perf_counter()

    def on_test_begin(self, logs=None):
        self.validation_start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        end = time.perf_counter()
        train_seconds = (self.validation_start - self.epoch_start) or (
            end - self.epoch_start
        )
        logs = {
            **(logs or {}),
            "phase": self.phase,
            "epoch_seconds": round(end - self.epoch_start, 3),
            "images_per_second": round(self.images_per_epoch / train_seconds, 1),
        }
        super().on_epoch_end(epoch, logs)


def read_history(run_dir):
    """history.csv as a list of dicts with numbers parsed; empty before epoch 1."""
    path = Path(run_dir) / "history.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as file:
        rows = list(csv.DictReader(file))
    return [
        {key: _number(value) for key, value in row.items()}
        for row in rows
        if None not in row.values()  # a row a crash cut short
    ]


def _number(text):
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return text


def drop_history_rows(run_dir, phase, start):
    """Remove from history.csv the rows of `phase` from epoch `start` on, and any
    half-written row: epochs the backup does not hold, which a resume repeats."""
    path = Path(run_dir) / "history.csv"
    if not path.is_file():
        return
    with path.open(newline="") as file:
        reader = csv.DictReader(file)
        rows = list(reader)
    kept = [
        row
        for row in rows
        if None not in row.values()
        and (row["phase"] != phase or _number(row["epoch"]) < start)
    ]
    if len(kept) < len(rows):
        text = io.StringIO()
        writer = csv.DictWriter(text, reader.fieldnames)  # CSVLogger's dialect
        writer.writeheader()
        writer.writerows(kept)
        settings.write_text(path, text.getvalue())


def fit(
    model, pipelines, run_dir, *, phase, epochs, initial_epoch=0,
    early_stopping_patience=0, verbose=1,
):  # fmt: skip
    """`model.fit` from epoch `initial_epoch` to `epochs` with the run's callbacks.
    Safe to call again on the same run folder: it restores the last finished
    epoch (weights and optimizer state) from `backup/<phase>`, drops history rows
    the backup does not hold, and goes on to `epochs`; early stopping remembers
    the phase's earlier epochs. Each epoch writes its checkpoint, then its history
    row, then its backup, each file whole or not at all. Ctrl-C raises
    `Interrupted` with the resume command; divergence raises ConfigError and
    leaves the last finite state."""
    run_dir = Path(run_dir)
    backup_dir = run_dir / "backup" / phase
    start = backed_up_epoch(backup_dir) or initial_epoch
    # model.keras may come from a row about to be dropped (the checkpoint is
    # written before the row): a later epoch must beat that row too.
    best = max((row["val_accuracy"] for row in read_history(run_dir)), default=None)
    drop_history_rows(run_dir, phase, start)
    callbacks = [
        DivergenceGuard(),
        Checkpoint(run_dir / "model.keras", best),
        History(run_dir / "history.csv", phase, pipelines.images_per_epoch),
    ]
    if early_stopping_patience:
        earlier = [row for row in read_history(run_dir) if row["phase"] == phase]
        stopper = EarlyStopping(early_stopping_patience, earlier)
        stopper.set_model(model)
        stopper.on_train_begin()
        if stopper.stopped_epoch:
            print(
                f"{phase}: early stopping ended this phase after epoch "
                f"{stopper.stopped_epoch + 1}; nothing more to train"
            )
            return
        callbacks.append(stopper)
    callbacks.append(Backup(backup_dir))
    # Keras 3.15.1: BackupAndRestore sets model._initial_epoch, nothing clears it
    # and fit prefers it to `initial_epoch`, so a later phase without a backup of
    # its own would start at the epoch the previous phase was restored to.
    model._initial_epoch = None
    try:
        model.fit(
            pipelines.train,
            validation_data=pipelines.validation,
            epochs=epochs,
            initial_epoch=initial_epoch,
            steps_per_epoch=pipelines.fit_steps,
            callbacks=callbacks,
            shuffle=False,  # the tf.data pipeline shuffles
            verbose=verbose,
        )
    except KeyboardInterrupt:
        raise settings.Interrupted(
            f"interrupted; best checkpoint and history kept in {run_dir}. "
            f"Resume with: python {run_dir.parent.name}.py --resume={run_dir}"
        ) from None
    except Diverged as diverged:
        done = len(read_history(run_dir))
        kept = (
            f"its state after epoch {done}, the last finite one, is kept in {run_dir}"
            if done
            else f"it had finished no epoch ({run_dir})"
        )
        raise settings.ConfigError(
            f"training diverged in epoch {diverged.epoch + 1} (NaN or inf); {kept}. "
            f"Start a new run with a lower learning rate"
        ) from None


def load_checkpoint(run_dir):
    """A finished run's model.keras, for predictions (not compiled); a missing or
    unreadable file is a settings.DataError naming it, in one line."""
    path = Path(run_dir) / "model.keras"
    if not path.is_file():
        raise settings.DataError(f"{path}: missing; train that run again")
    try:
        return keras.models.load_model(path, compile=False)
    except Exception as error:  # zip, HDF5 and deserialisation errors all land here
        reason = str(error).splitlines()[0] if str(error) else ""
        raise settings.DataError(
            f"{path}: cannot be loaded ({type(error).__name__}: {reason})"
        ) from None


TTA_LEVELS = ("none", "flip", "crops")  # test-time augmentation, each adding views


def predict_tta(model, dataset, tta="none"):
    """({level: probabilities}, one-hot labels) over a whole (images, labels) dataset
    for each test-time augmentation level up to `tta`: "none", the images; "flip",
    the mean with their mirror images; "crops" (airbench's), half that and half the
    mean of two 1-pixel shifts (reflect-padded, up-left and down-right), each mirrored
    too. The model trained on flips and shifts, so every view is its own."""
    images = dataset.map(lambda images, labels: images)

    def mirrored(views):
        plain = model.predict(views, verbose=0)
        return (plain + model.predict(views.map(lambda x: tf.reverse(x, [2])), verbose=0)) / 2

    levels = {"none": model.predict(images, verbose=0)}
    if tta in ("flip", "crops"):
        levels["flip"] = (levels["none"] + model.predict(
            images.map(lambda x: tf.reverse(x, [2])), verbose=0)) / 2  # fmt: skip
    if tta == "crops":
        padded = images.map(lambda x: tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]], "REFLECT"))
        shifts = [
            mirrored(padded.map(lambda x: x[:, :-2, :-2])),
            mirrored(padded.map(lambda x: x[:, 2:, 2:])),
        ]
        levels["crops"] = levels["flip"] / 2 + (shifts[0] + shifts[1]) / 4
    labels = np.concatenate([labels.numpy() for _, labels in dataset])
    return levels, labels


def predict_probabilities(model, dataset, tta="none"):
    """(probabilities, one-hot labels) over a whole dataset, at test-time augmentation
    level `tta` (see predict_tta)."""
    levels, labels = predict_tta(model, dataset, tta)
    return levels[tta], labels


def finish(run_dir, model, test_data, label_smoothing=0.0, tta="none"):
    """Evaluate the best checkpoint once on the test set and write metrics.json, which
    marks the run finished; the resume backup is then removed. test_accuracy is at
    the run's `tta` level, and the accuracy at each lower level is kept beside it, so
    runs of different settings can be compared alike."""
    checkpoint = run_dir / "model.keras"
    if not checkpoint.is_file():
        model.save(checkpoint)
    best = keras.models.load_model(checkpoint, compile=False)
    levels, labels = predict_tta(best, test_data, tta)
    loss = keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing)
    accuracy = {
        level: float(np.mean(probabilities.argmax(1) == labels.argmax(1)))
        for level, probabilities in levels.items()
    }
    history_rows = read_history(run_dir)
    metrics = {
        "test_accuracy": accuracy[tta],
        "test_loss": float(loss(labels, levels[tta])),
        "tta": tta,
        **{f"test_accuracy_tta_{level}": value for level, value in accuracy.items()},
        "best_val_accuracy": max(row["val_accuracy"] for row in history_rows),
        "epochs": len(history_rows),
        "train_seconds": round(sum(row["epoch_seconds"] for row in history_rows), 1),
        # The median epoch, so the first epoch's graph tracing does not count.
        "images_per_second": float(
            np.median([row["images_per_second"] for row in history_rows])
        ),
        "params": int(best.count_params()),
    }
    settings.write_json(run_dir / "metrics.json", metrics)
    shutil.rmtree(run_dir / "backup", ignore_errors=True)
    print(
        f"test accuracy {metrics['test_accuracy']:.4f} (test-time augmentation: {tta}), "
        f"test loss {metrics['test_loss']:.4f}, {metrics['epochs']} epochs in "
        f"{metrics['train_seconds']:.0f} s ({metrics['images_per_second']:.0f} "
        f"images/s); run folder {run_dir}"
    )
    return metrics
