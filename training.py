"""Plumbing the scripts share: the effective configuration and exit codes (the
command line itself is settings.py's), run folders, seeding, distribution (several
GPUs or several workers), and the Keras callbacks that train, checkpoint, log and
resume a run.

Nothing here holds a hyperparameter: each script's config block does.
"""

import atexit
import csv
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

import settings

# The command line lives in settings.py (no TensorFlow there, so it answers first);
# these names stay here too, for the scripts and tests that use them as training.*.
from settings import (  # noqa: F401
    EXIT_CONFIG,
    EXIT_DATA,
    ConfigError,
    DataError,
    article,
    config_block,
    parse_overrides,
    require,
)

EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports it


class Interrupted(Exception):
    """Training stopped by Ctrl-C; the message says how to resume."""


# ---------------------------------------------------------------------------------
# Configuration: the UPPER_CASE block at the top of a script, overridden per run


def configure(defaults, argv, verbose=True):
    """A script's effective configuration: its config block with `argv` applied.
    Prints it, one setting a line, marking the overridden ones."""
    config = parse_overrides(defaults, argv)
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
    stderr and the documented exit code, never a traceback."""
    program = Path(sys.argv[0]).name
    try:
        main(sys.argv[1:])
    except ConfigError as error:
        settings.fail(error, EXIT_CONFIG)
    except DataError as error:
        settings.fail(error, EXIT_DATA)
    except (Interrupted, KeyboardInterrupt) as error:
        print(f"{program}: {error or 'interrupted'}", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)


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
    raise ConfigError(f"cannot create a new run folder in {parent}")


def worker_dir(script, copy_of=None):
    """A temporary folder for a worker that is not the chief (a copy of the run
    folder `copy_of`, when resuming), removed when the process exits. Keras's
    callbacks write on every worker; this keeps their files off the chief's."""
    folder = Path(tempfile.mkdtemp(prefix=f"{script}-worker-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    if copy_of is not None:
        shutil.copytree(copy_of, folder, dirs_exist_ok=True)
    return folder


def list_runs(out_dir, script, finished):
    """Run folders of `script`, oldest first; finished ones hold metrics.json."""
    parent = Path(out_dir) / script
    if not parent.is_dir():
        return []
    runs = [
        path
        for path in parent.iterdir()
        if (path / "config.json").is_file()
        and (path / "metrics.json").is_file() == finished
    ]
    return sorted(runs, key=lambda path: (path.stat().st_mtime, path.name))


def run_to_resume(resume, out_dir, script):
    """The run folder that `--resume` names: a path, or "last" for the newest
    unfinished run of `script`."""
    if resume == "last":
        unfinished = list_runs(out_dir, script, finished=False)
        if not unfinished:
            raise ConfigError(
                f"--resume=last: no unfinished run in {Path(out_dir) / script}"
            )
        return unfinished[-1]
    run_dir = Path(resume)
    if not (run_dir / "config.json").is_file():
        raise ConfigError(f"--resume={resume}: not a run folder (no config.json in it)")
    if (run_dir / "metrics.json").is_file():
        raise ConfigError(
            f"--resume={resume}: that run has finished (metrics.json exists)"
        )
    return run_dir


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
    require(
        not changed,
        f"a resumed run keeps its saved settings; drop --{', --'.join(changed).lower()}",
    )
    given = {name: config[name] for name in may_change if config[name] != defaults[name]}
    return {**saved, **given, "RESUME": config["RESUME"]}


def configure_run(defaults, argv, script):
    """(config, run_dir) for a training script: its configuration with `argv`
    applied and, with --resume, the saved configuration of the run folder to go
    on with; run_dir is None for a new run, made once the data and model are ready."""
    config = configure(defaults, argv)
    if not config["RESUME"]:
        return config, None
    run_dir = run_to_resume(config["RESUME"], config["OUT_DIR"], script)
    print(f"resuming {run_dir}")
    config = resumed_config(run_dir, config, defaults)
    if not cluster_task()[1]:  # a worker goes on from a copy; the chief writes
        run_dir = worker_dir(script, copy_of=run_dir)
    return config, run_dir


def write_text(path, text):
    """Write a text file whole or not at all: a reader never sees half of it, and a
    failed write leaves the earlier file as it was. Returns the path."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)
    return path


def write_json(path, payload):
    write_text(path, json.dumps(payload, indent=2, default=str) + "\n")


def save_run_config(run_dir, script, config, data_source, **extra):
    """config.json: the effective configuration, what the data was, library versions,
    and `extra` facts evaluate.py needs (e.g. the input range the model expects)."""
    write_json(
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


def cpu_name():
    """This machine's CPU model, as /proc/cpuinfo names it where there is one."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
        raise ConfigError(
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


def set_precision(mixed_precision):
    """float16 compute with float32 weights on GPUs; float32 everywhere otherwise."""
    keras.mixed_precision.set_global_policy(
        "mixed_float16" if mixed_precision else "float32"
    )


# ---------------------------------------------------------------------------------
# Training: Keras callbacks for checkpoint, history, NaN guard and resume


def compile_model(model, optimizer, label_smoothing, jit_compile):
    """Compile for training on one-hot labels; a phase that changes what is
    trainable must compile again."""
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing),
        metrics=["accuracy"],
        jit_compile=jit_compile,
    )


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
    return [{key: _number(value) for key, value in row.items()} for row in rows]


def _number(text):
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return text


def fit(
    model,
    train_data,
    validation_data,
    run_dir,
    *,
    phase,
    epochs,
    initial_epoch=0,
    steps_per_epoch=None,
    images_per_epoch,
    early_stopping_patience=0,
    verbose=1,
):
    """`model.fit` with the run's callbacks. Safe to call again on the same run
    folder: it restores the last finished epoch (weights and optimizer state) from
    `backup/<phase>` and goes on to `epochs`. Ctrl-C keeps the best checkpoint,
    the history and the backup, and raises `Interrupted` with the resume command."""
    history_rows = read_history(run_dir)
    best = max((row["val_accuracy"] for row in history_rows), default=None)
    callbacks = [
        keras.callbacks.BackupAndRestore(
            str(run_dir / "backup" / phase), delete_checkpoint=False
        ),
        keras.callbacks.TerminateOnNaN(),
        keras.callbacks.ModelCheckpoint(
            str(run_dir / "model.keras"),
            monitor="val_accuracy",
            mode="max",
            save_best_only=True,
            initial_value_threshold=best,
        ),
        History(run_dir / "history.csv", phase, images_per_epoch),
    ]
    if early_stopping_patience:
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor="val_accuracy", mode="max", patience=early_stopping_patience
            )
        )
    try:
        model.fit(
            train_data,
            validation_data=validation_data,
            epochs=epochs,
            initial_epoch=initial_epoch,
            steps_per_epoch=steps_per_epoch,
            callbacks=callbacks,
            shuffle=False,  # the tf.data pipeline shuffles
            verbose=verbose,
        )
    except KeyboardInterrupt:
        raise Interrupted(
            f"interrupted; best checkpoint and history kept in {run_dir}. "
            f"Resume with: python {Path(run_dir).parent.name}.py --resume={run_dir}"
        ) from None
    losses = model.history.history.get("loss", [])
    if losses and not np.isfinite(losses[-1]):
        raise ConfigError(
            f"training diverged (loss became NaN); lower the learning rate. "
            f"History kept in {run_dir}"
        )


def finish(run_dir, model, test_data):
    """Evaluate the best checkpoint once on the test set and write metrics.json,
    which marks the run finished; the resume backup is then removed."""
    checkpoint = run_dir / "model.keras"
    if not checkpoint.is_file():
        model.save(checkpoint)
    best = keras.models.load_model(checkpoint)
    test_loss, test_accuracy = best.evaluate(test_data, verbose=0)
    history_rows = read_history(run_dir)
    metrics = {
        "test_accuracy": float(test_accuracy),
        "test_loss": float(test_loss),
        "best_val_accuracy": max(row["val_accuracy"] for row in history_rows),
        "epochs": len(history_rows),
        "train_seconds": round(sum(row["epoch_seconds"] for row in history_rows), 1),
        # The median epoch, so the first epoch's graph tracing does not count.
        "images_per_second": float(
            np.median([row["images_per_second"] for row in history_rows])
        ),
        "params": int(best.count_params()),
    }
    write_json(run_dir / "metrics.json", metrics)
    shutil.rmtree(run_dir / "backup", ignore_errors=True)
    print(
        f"test accuracy {metrics['test_accuracy']:.4f}, test loss "
        f"{metrics['test_loss']:.4f}, {metrics['epochs']} epochs in "
        f"{metrics['train_seconds']:.0f} s ({metrics['images_per_second']:.0f} "
        f"images/s); run folder {run_dir}"
    )
    return metrics
