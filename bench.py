"""Speed and memory of both training scripts on this machine, measured side by side
with the naive way (the whole dataset converted to float32 and resized up front,
then `fit` on the arrays).

    python bench.py            # full run, 5-10 minutes on a 2-core CPU; writes bench.json
    python bench.py --quick    # smoke check, about a minute: code paths, not numbers

It makes its own CIFAR-10-shaped data (random uint8, no download) and measures:
1. the input pipeline alone (data.make_dataset: augment, resize, scale) at 32 and 96 px;
2. compute-only training rate per model: one fixed batch repeated from memory;
3. end-to-end training rate per model through data.make_dataset, and its share of (2);
4. peak memory of a training process holding a full-size 50,000-image set;
5. the naive way for the same model: its rate, peak memory and the ratios to ours.
MobileNetV2 is timed in its fine-tuning phase (the base trainable but its first layers
and BatchNorm), from random weights, and in its random start (--weights=none: every
layer and BatchNorm's batch statistics train). On a GPU it is also timed with mixed
precision and XLA on and off.

Each training case runs in a child process of its own. Its peak memory is the kernel's
high-water mark of that process's resident set (VmHWM in /proc/self/status), read by
the child as it ends. getrusage's ru_maxrss is not used: Linux carries it across exec,
so a child's figure would include the parent's resident set when it was started.
A case that passes the memory limit (90% of the memory free when it starts) is stopped
before it can take the machine down; its peak is then a lower bound, and the naive
rate is timed on a smaller set. --quick runs two cases at once: its rates are no
measurement, its peaks still each process's own.

Result: README, Performance, has the table of a full run and the machine it ran on.
"""

import settings

settings.check_command_line(__name__, __file__)  # --help, bad flags: before TF loads

import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

import data
import scratch_cnn
import training
import transfer_mobilenetv2

# ---------------------------------------------------------------------------------
# Config (python bench.py --name=value overrides any of these)

QUICK = False  # smoke check: QUICK_* sizes below, no target judged (also --quick)
FULL_IMAGES = 50000  # images in every training set: CIFAR-10's training set
STEPS = 15  # training steps timed per round, after the warm-up steps
ROUNDS = 3  # timed rounds per rate, the median counts; compute and end to end alternate
WARMUP_STEPS = 5  # untimed steps before each round: tracing, oneDNN, tf.data autotuning
PIPELINE_BATCHES = 100  # batches timed for the input pipeline alone
QUICK_IMAGES = 2048  # images in every set under --quick
QUICK_STEPS = 2  # timed steps per round under --quick
QUICK_WARMUP_STEPS = 1  # untimed steps under --quick
QUICK_PIPELINE_BATCHES = 3  # pipeline batches timed under --quick
QUICK_BATCH_SIZE = 16  # images per step under --quick, both models
QUICK_CASES_AT_ONCE = 2  # child processes run together under --quick; full runs: 1
SCRATCH_BATCH_SIZE = scratch_cnn.CONFIG["BATCH_SIZE"]  # images per step: its script's
TRANSFER_BATCH_SIZE = transfer_mobilenetv2.CONFIG["BATCH_SIZE"]  # images per step: same
MEMORY_LIMIT_GB = 0.0  # stop a case past this resident GB (10^9 B); 0 = 90% of free
NAIVE_FALLBACK_IMAGES = 10000  # naive set timed instead if the full one hit the limit
TARGET_SCRATCH_RATE = 300.0  # images/s: scratch CNN end to end at 32 px
TARGET_END_TO_END_SHARE = 0.95  # end-to-end rate over compute-only rate, both models
TARGET_MEMORY_GB = 2.0  # peak resident GB (10^9 B): MobileNetV2 at 96 px, full set
TARGET_SPEEDUP = 3.0  # our end-to-end rate over the naive rate, MobileNetV2
TARGET_MEMORY_SAVING = 8.0  # the naive way's peak memory over ours, MobileNetV2
SEED = 0  # seeds the random images, shuffling, augmentation and weights
OUTPUT = "bench.json"  # where the table and every number go, as JSON
CASE = ""  # internal: the one case a child process runs, set by bench.py itself
CONFIG = settings.config_block(globals())  # the settings above: defaults for overrides

GB = 1e9  # bytes: the unit the figures are in (5.5 GB = 50,000 x 96x96x3 x 4 B)
RESULT_MARK = "BENCH_CASE_RESULT "  # a child's last stdout line: this, then its JSON
SCRIPTS = {module.SCRIPT: module for module in (scratch_cnn, transfer_mobilenetv2)}
MODEL_NAMES = {
    scratch_cnn.SCRIPT: "scratch CNN",
    transfer_mobilenetv2.SCRIPT: "MobileNetV2",
}


def sizes(config):
    """What this run uses, full or --quick: images, steps, warm-up, pipeline batches
    and the batch size of each script."""
    quick = config["QUICK"]
    prefix = "QUICK_" if quick else ""
    return {
        "images": config["QUICK_IMAGES"] if quick else config["FULL_IMAGES"],
        "steps": config[prefix + "STEPS"],
        "rounds": config["ROUNDS"],
        "warmup_steps": config[prefix + "WARMUP_STEPS"],
        "pipeline_batches": config[prefix + "PIPELINE_BATCHES"],
        "batch_size": {
            scratch_cnn.SCRIPT: (
                config["QUICK_BATCH_SIZE"] if quick else config["SCRATCH_BATCH_SIZE"]
            ),
            transfer_mobilenetv2.SCRIPT: (
                config["QUICK_BATCH_SIZE"] if quick else config["TRANSFER_BATCH_SIZE"]
            ),
        },
    }


def total_steps(run):
    """Steps of the naive way's one fit: as many untimed as ours has before its first
    timed step (a warm-up fit, then a round's warm-up), then every round's."""
    return 2 * run["warmup_steps"] + run["rounds"] * run["steps"]


# ---------------------------------------------------------------------------------
# Machine and memory


def machine_info():
    """CPU, cores, memory, GPUs and library versions, for the table's heading."""
    cpu = training.cpu_name()
    gpus = training.gpu_names()
    return {
        "cpu": cpu,
        "cores": (
            len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        ),
        "memory_gb": round(meminfo("MemTotal") / GB, 1) if meminfo("MemTotal") else None,
        "gpus": gpus,
        "load_average_at_start": [round(load, 2) for load in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
    }


def meminfo(field):
    """A /proc/meminfo field in bytes, or None off Linux."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def process_memory(field, pid="self"):
    """VmHWM (peak) or VmRSS (now) of a process in bytes, from /proc; None if gone
    or off Linux."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def own_peak_memory():
    """This process's peak resident set in bytes, as the kernel counts it."""
    peak = process_memory("VmHWM")
    if peak is None:  # macOS: ru_maxrss in bytes (it includes what the parent held)
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak


# ---------------------------------------------------------------------------------
# Data


def random_cifar(count, seed):
    """(images uint8 (count, 32, 32, 3), labels int32 (count,)), CIFAR-10-shaped."""
    rng = np.random.default_rng(seed)
    images = rng.integers(
        0, 256, (count, data.NATIVE_SIZE, data.NATIVE_SIZE, 3), np.uint8
    )
    labels = rng.integers(0, data.NUM_CLASSES, count, dtype=np.int32)
    return images, labels


def training_pipeline(script, images, labels, batch_size, seed):
    """The script's own training pipeline: its augmentation, image size and input
    range, shuffled, repeated."""
    config = script.CONFIG
    augmenter = data.augmenter_for({**config, "SEED": seed})
    return data.make_dataset(
        images, labels, batch_size=batch_size, image_size=config["IMG_SIZE"],
        value_range=script.VALUE_RANGE, augmenter=augmenter, shuffle=True, seed=seed,
        repeat=True,
    )  # fmt: skip


def pipeline_rate(dataset, batch_size, warmup_batches, batches):
    """Images/s drawn from `dataset` alone, after `warmup_batches`."""
    iterator = iter(dataset)
    for _ in range(warmup_batches):
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch_size / (time.perf_counter() - start)


# ---------------------------------------------------------------------------------
# Model: each script's own builder, optimizer and loss


def build_for_training(script, schedule_steps, jit_compile, random_start=False):
    """The script's model compiled as its (most expensive) training phase trains it:
    all of the scratch CNN; MobileNetV2 fine-tuning, from random weights, or with
    `random_start` as --weights=none trains it. The learning-rate schedule spans
    `schedule_steps`; its shape costs no time."""
    config = script.CONFIG
    if script is scratch_cnn:
        model = scratch_cnn.build_model(
            config["IMG_SIZE"],
            config["STEM_WIDTH"],
            config["WIDTH"],
            config["DROPOUT"],
            config["BATCHNORM_MOMENTUM"],
        )
        training.compile_model(
            model,
            scratch_cnn.make_optimizer(
                config["OPTIMIZER"],
                config["LEARNING_RATE"],
                config["MOMENTUM"],
                config["WEIGHT_DECAY"],
                warmup_steps=0,
                total_steps=schedule_steps,
            ),
            config["LABEL_SMOOTHING"],
            jit_compile,
        )
        return model
    model, base = transfer_mobilenetv2.build_model(
        config["IMG_SIZE"], None, config["DROPOUT"]
    )
    if random_start:
        transfer_mobilenetv2.unfreeze_all(
            base, config["RANDOM_START_BATCHNORM_MOMENTUM"]
        )
    else:
        transfer_mobilenetv2.unfreeze_for_fine_tuning(base, config["FREEZE_FIRST"])
    training.compile_model(
        model,
        transfer_mobilenetv2.make_fine_tune_optimizer(
            config["RANDOM_START_LR" if random_start else "FINE_TUNE_LR"],
            config["WEIGHT_DECAY"],
            warmup_steps=0,
            total_steps=schedule_steps,
        ),
        config["LABEL_SMOOTHING"],
        jit_compile,
    )
    return model


# ---------------------------------------------------------------------------------
# Timing training steps


class StepTimes(keras.callbacks.Callback):
    """When each training step ends. Reading the loss waits for the step itself: on
    a GPU, work is queued and a call returns before it is done."""

    def on_train_begin(self, logs=None):
        self.times = [time.perf_counter()]

    def on_train_batch_end(self, batch, logs=None):
        if logs and "loss" in logs:
            float(logs["loss"])
        self.times.append(time.perf_counter())


def step_seconds(model, x, y=None, *, steps, batch_size=None, **fit_args):
    """Seconds of each of `steps` training steps of one `model.fit` call."""
    step_times = StepTimes()
    model.fit(
        x,
        y,
        batch_size=batch_size,
        epochs=1,
        steps_per_epoch=steps,
        callbacks=[step_times],
        verbose=0,
        **fit_args,
    )
    return np.diff(step_times.times)


def summary(round_seconds, batch_size, first_step_seconds):
    """Images/s of each timed round (its steps' total time), their median, and
    what a step took."""
    rates = [
        len(seconds) * batch_size / float(np.sum(seconds)) for seconds in round_seconds
    ]
    return {
        "images_per_second": float(np.median(rates)),
        "round_images_per_second": [round(rate, 1) for rate in rates],
        "median_step_seconds": round(float(np.median(np.concatenate(round_seconds))), 4),
        # The first step traces the graph: only the first fit on a model has one.
        "first_step_seconds": (
            None if first_step_seconds is None else round(first_step_seconds, 3)
        ),
    }


def measure_rates(model, datasets, batch_size, timing):
    """Images/s of training `model` on each of `datasets` (name: repeated tf.data
    dataset). One untimed fit on the first traces the step and settles the first
    slow steps; then `rounds` rounds time each dataset in turn, order reversed every
    other round so a drift in machine load favours none."""
    first_dataset = next(iter(datasets.values()))
    warmup = step_seconds(
        model, first_dataset, steps=timing["warmup_steps"], shuffle=False
    )
    seconds = {name: [] for name in datasets}
    order = list(datasets)
    for round_index in range(timing["rounds"]):
        for name in order if round_index % 2 == 0 else reversed(order):
            this_round = step_seconds(
                model,
                datasets[name],
                steps=timing["warmup_steps"] + timing["steps"],
                shuffle=False,  # the datasets are shuffled or fixed already
            )
            seconds[name].append(this_round[timing["warmup_steps"] :])
    return {
        name: summary(rounds, batch_size, float(warmup[0]) if index == 0 else None)
        for index, (name, rounds) in enumerate(seconds.items())
    }


# ---------------------------------------------------------------------------------
# Cases, each run by a child process: python bench.py --case=KIND:SCRIPT[:MIXED:XLA]


def streaming_case(script, config, random_start=False):
    """Ours: the full-size uint8 set in memory and the model trained through the
    script's data.make_dataset pipeline (end to end), and on one batch of it
    repeated from memory (compute only). `random_start`: MobileNetV2 as
    --weights=none trains it."""
    run = sizes(config)
    batch_size = run["batch_size"][script.SCRIPT]
    images, labels = random_cifar(run["images"], config["SEED"])
    pipeline = training_pipeline(script, images, labels, batch_size, config["SEED"])
    fixed = tf.data.Dataset.from_tensors(next(iter(pipeline))).repeat()
    model = build_for_training(
        script, total_steps(run), script.CONFIG["JIT_COMPILE"], random_start
    )
    # The pipeline first: the step is traced once for its batch of unknown size,
    # and the fixed batch, of known size, runs that same traced step.
    rates = measure_rates(
        model, {"end_to_end": pipeline, "compute": fixed}, batch_size, run
    )
    return {
        "images": len(images),
        "image_size": script.CONFIG["IMG_SIZE"],
        "batch_size": batch_size,
        "compute": rates["compute"],
        "end_to_end": rates["end_to_end"],
        "params": int(model.count_params()),
        "trainable_params": training.count_trainable(model),
    }


def naive_case(script, config):
    """The naive way, as the report did it: the whole set converted to float32,
    scaled and resized at once, then one `fit` on the arrays (which Keras copies
    into a tensor). No augmentation: arrays made up front cannot have it."""
    run = sizes(config)
    batch_size = run["batch_size"][script.SCRIPT]
    image_size = script.CONFIG["IMG_SIZE"]
    images, labels = random_cifar(run["images"], config["SEED"])
    start = time.perf_counter()
    low, high = script.VALUE_RANGE
    x = images.astype("float32") / 255.0 * (high - low) + low
    if image_size != data.NATIVE_SIZE:
        x = tf.image.resize(x, (image_size, image_size)).numpy()
    y = keras.utils.to_categorical(labels, data.NUM_CLASSES)
    prepare_seconds = time.perf_counter() - start
    model = build_for_training(script, total_steps(run), script.CONFIG["JIT_COMPILE"])
    seconds = step_seconds(
        model,
        x,
        y,
        steps=total_steps(run),
        batch_size=batch_size,
        shuffle=True,
    )
    timed = seconds[2 * run["warmup_steps"] :]
    return {
        "images": len(images),
        "image_size": image_size,
        "batch_size": batch_size,
        "prepare_seconds": round(prepare_seconds, 2),
        "array_bytes": int(x.nbytes),
        "naive": summary(np.split(timed, run["rounds"]), batch_size, float(seconds[0])),
    }


def precision_case(script, config, mixed_precision, jit_compile):
    """Compute-only rate with mixed precision and XLA set as given (GPU only)."""
    training.set_precision(mixed_precision)
    run = sizes(config)
    batch_size = run["batch_size"][script.SCRIPT]
    images, labels = random_cifar(batch_size, config["SEED"])
    batch = next(
        iter(training_pipeline(script, images, labels, batch_size, config["SEED"]))
    )
    fixed = tf.data.Dataset.from_tensors(batch).repeat()
    model = build_for_training(script, total_steps(run), jit_compile)
    return {
        "batch_size": batch_size,
        "mixed_precision": mixed_precision,
        "jit_compile": jit_compile,
        "compute": measure_rates(model, {"compute": fixed}, batch_size, run)["compute"],
    }


def run_case(case, config):
    """Child side: run one case and print its result as the last stdout line."""
    kind, script_name, *options = case.split(":")
    settings.require(
        kind in ("streaming", "naive", "precision", "random_start")
        and script_name in SCRIPTS,
        f"--case={case}: expected streaming|naive|precision|random_start:SCRIPT, "
        f"SCRIPT one of {', '.join(SCRIPTS)}",
    )
    settings.require(
        kind != "random_start" or script_name == transfer_mobilenetv2.SCRIPT,
        f"--case={case}: a random start is MobileNetV2's (--weights=none) alone",
    )
    script = SCRIPTS[script_name]
    # Memory as it is needed, not all of it at once: under --quick two cases share
    # the GPU. (Set before TensorFlow touches a device.)
    for gpu in tf.config.list_physical_devices("GPU"):
        tf.config.experimental.set_memory_growth(gpu, True)
    training.seed_everything(config["SEED"])
    start = time.perf_counter()
    if kind in ("streaming", "random_start"):
        result = streaming_case(script, config, random_start=kind == "random_start")
    elif kind == "naive":
        result = naive_case(script, config)
    else:
        result = precision_case(script, config, *(option == "1" for option in options))
    result.update(
        case=case,
        case_seconds=round(time.perf_counter() - start, 1),
        peak_rss_bytes=own_peak_memory(),
        devices=[device.name for device in tf.config.list_logical_devices()],
    )
    print(RESULT_MARK + json.dumps(result), flush=True)


def start_child(case, config, defaults):
    """Start `case` in a fresh process with this run's settings; its output goes to
    temporary files, read when it ends."""
    overrides = [
        f"--{name.lower()}={value!r}"
        for name, value in config.items()
        if value != defaults[name] and name != "CASE"
    ]
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        f"--case={case}",
        *overrides,
    ]
    # Files, not pipes: a child that writes a lot cannot block; poll_child closes them.
    stdout = tempfile.TemporaryFile("w+")  # noqa: SIM115
    stderr = tempfile.TemporaryFile("w+")  # noqa: SIM115
    return {
        "case": case,
        "process": subprocess.Popen(command, stdout=stdout, stderr=stderr, text=True),
        "stdout": stdout,
        "stderr": stderr,
        "start": time.perf_counter(),
        "limit": config["MEMORY_LIMIT_GB"] * GB or 0.9 * (meminfo("MemAvailable") or 0),
        "sampled_peak": 0,
    }


def poll_child(child):
    """None while `child` runs; its result once it has ended. A child whose resident
    memory passes its limit is stopped, and its result says so."""
    case, process = child["case"], child["process"]
    resident = process_memory("VmRSS", process.pid) or 0
    child["sampled_peak"] = max(child["sampled_peak"], resident)
    over_limit = child["limit"] and resident > child["limit"]
    if over_limit:
        process.kill()
    if process.poll() is None and not over_limit:
        return None
    process.wait()
    seconds = round(time.perf_counter() - child["start"], 1)
    child["stdout"].seek(0), child["stderr"].seek(0)
    out, err = child["stdout"].read(), child["stderr"].read()
    child["stdout"].close(), child["stderr"].close()
    # SIGKILL that is not ours: the kernel's out-of-memory killer got there first.
    if over_limit or process.returncode == -signal.SIGKILL:
        print(
            f"  {case}: stopped at {child['sampled_peak'] / GB:.1f} GB "
            + ("past the memory limit" if over_limit else "by the system, out of memory")
        )
        return {
            "case": case,
            "stopped_at_limit": True,
            "memory_limit_bytes": int(child["limit"]),
            "peak_rss_bytes": child["sampled_peak"],
            "wall_seconds": seconds,
        }
    results = [line for line in out.splitlines() if line.startswith(RESULT_MARK)]
    if process.returncode != 0 or not results:
        tail = "\n".join(err.strip().splitlines()[-15:])
        raise RuntimeError(f"case {case} failed (exit {process.returncode}):\n{tail}")
    result = json.loads(results[-1][len(RESULT_MARK) :])
    result.update(stopped_at_limit=False, wall_seconds=seconds)
    print(f"  {case}: {seconds:.0f} s, peak {result['peak_rss_bytes'] / GB:.2f} GB")
    return result


def run_cases(cases, config, defaults, at_once):
    """Run each case in a process of its own, `at_once` at a time, in order; their
    results by case."""
    pending, running, results = list(cases), [], {}
    try:
        while pending or running:
            while pending and len(running) < at_once:
                running.append(start_child(pending.pop(0), config, defaults))
            time.sleep(0.1)
            for child in list(running):
                result = poll_child(child)
                if result is not None:
                    results[child["case"]] = result
                    running.remove(child)
    except BaseException:  # a failed case or Ctrl-C: leave no child behind
        for child in running:
            child["process"].kill()
        raise
    return {case: results[case] for case in cases}


# ---------------------------------------------------------------------------------
# Report: one table, printed and written with every number to OUTPUT


def judge(value, target, at_least, quick, lower_bound=False):
    """met/open for a row with a target; '' without one or under --quick. A lower
    bound (a case stopped at the memory limit) decides only one way."""
    if target is None or quick:
        return ""
    if value is None:
        return "open (not measured)"
    met = value >= target if at_least else value <= target
    if lower_bound and met != at_least:
        return "open (undecided: a lower bound)"
    return "met" if met else "open"


def rate(result, key):
    """A case's images/s for `key`, or None for a case stopped at the memory limit
    (the naive way's: from its run on a smaller set, if that one finished)."""
    if key in result:
        return result[key]["images_per_second"]
    if "fallback" in result:
        return rate(result["fallback"], key)
    return None


def ratio(numerator, denominator):
    return None if numerator is None or denominator is None else numerator / denominator


def make_rows(config, run, pipeline, cases, gpu_cases):
    """The table's rows, in the issue's order (1-5, then the GPU options). A case
    stopped at the memory limit has no rates and a peak memory that is a lower bound."""
    rows = []

    def row(
        step, measure, script_name, value, unit, target=None, at_least=True,
        lower_bound=False, **facts,
    ):  # fmt: skip
        rows.append(
            {
                "id": facts.pop("id"),
                "step": step,
                "measure": measure,
                "model": MODEL_NAMES.get(script_name, "-"),
                "value": value,
                "unit": unit,
                "target": (
                    None
                    if target is None
                    else (">= " if at_least else "<= ") + format_value(target, unit)
                ),
                "status": judge(value, target, at_least, config["QUICK"], lower_bound),
                "lower_bound": lower_bound,
                **facts,
            }
        )

    for script_name, images_per_second in pipeline.items():
        size = SCRIPTS[script_name].CONFIG["IMG_SIZE"]
        row(
            1, "input pipeline alone, augmented", "-", images_per_second, "images/s",
            id=f"pipeline_{size}px", image_size=size,
            batch_size=run["batch_size"][script_name], images=run["images"],
        )  # fmt: skip
    for step in (2, 3, 4, 5):
        for script_name, script in SCRIPTS.items():
            transfer = script is transfer_mobilenetv2
            ours, naive = cases[f"streaming:{script_name}"], cases[f"naive:{script_name}"]
            # MobileNetV2 from random weights, as --weights=none trains it.
            random_start = cases.get(f"random_start:{script_name}")
            facts = {
                "image_size": script.CONFIG["IMG_SIZE"],
                "batch_size": run["batch_size"][script_name],
            }
            stopped = {
                "ours": ours["stopped_at_limit"],
                "naive": naive["stopped_at_limit"],
            }
            at_least = {
                case: " (at least: stopped at the memory limit)" if was_stopped else ""
                for case, was_stopped in stopped.items()
            }
            if step == 2:
                row(
                    2, "training, compute only (one batch from memory)", script_name,
                    rate(ours, "compute"), "images/s", id=f"compute_{script_name}", **facts,
                )  # fmt: skip
                if random_start:
                    row(
                        2, "random start (--weights=none), compute only", script_name,
                        rate(random_start, "compute"), "images/s",
                        id=f"compute_random_start_{script_name}", **facts,
                    )  # fmt: skip
            elif step == 3:
                row(
                    3, "training, end to end (data.py pipeline)", script_name,
                    rate(ours, "end_to_end"), "images/s",
                    None if transfer else config["TARGET_SCRATCH_RATE"],
                    id=f"end_to_end_{script_name}", **facts,
                )  # fmt: skip
                row(
                    3, "end to end / compute only", script_name,
                    ratio(rate(ours, "end_to_end"), rate(ours, "compute")), "%",
                    config["TARGET_END_TO_END_SHARE"],
                    id=f"end_to_end_share_{script_name}", **facts,
                )  # fmt: skip
                if random_start:
                    row(
                        3, "random start (--weights=none), end to end", script_name,
                        rate(random_start, "end_to_end"), "images/s",
                        id=f"end_to_end_random_start_{script_name}", **facts,
                    )  # fmt: skip
            elif step == 4:
                row(
                    4, f"peak memory, training on {run['images']:,} images"
                    + at_least["ours"], script_name, ours["peak_rss_bytes"] / GB, "GB",
                    config["TARGET_MEMORY_GB"] if transfer else None, at_least=False,
                    lower_bound=stopped["ours"], id=f"peak_memory_{script_name}", images=run["images"], **facts,
                )  # fmt: skip
                if random_start:
                    row(
                        4, "random start (--weights=none), peak memory"
                        + (" (at least)" if random_start["stopped_at_limit"] else ""),
                        script_name, random_start["peak_rss_bytes"] / GB, "GB",
                        lower_bound=random_start["stopped_at_limit"],
                        id=f"peak_memory_random_start_{script_name}",
                        images=run["images"], **facts,
                    )  # fmt: skip
            else:
                fallback = naive.get("fallback", {})
                row(
                    5, "naive: training rate (float32 arrays, fit)"
                    + (f", on {fallback['images']:,} images" if "naive" in fallback else ""),
                    script_name, rate(naive, "naive"), "images/s",
                    id=f"naive_rate_{script_name}", **facts,
                )  # fmt: skip
                row(
                    5, f"naive: peak memory, {run['images']:,} images" + at_least["naive"],
                    script_name, naive["peak_rss_bytes"] / GB, "GB",
                    lower_bound=stopped["naive"], id=f"naive_peak_memory_{script_name}", images=run["images"], **facts,
                )  # fmt: skip
                row(
                    5, "ours / naive, training rate", script_name,
                    ratio(rate(ours, "end_to_end"), rate(naive, "naive")), "x",
                    config["TARGET_SPEEDUP"] if transfer else None,
                    id=f"speedup_{script_name}", **facts,
                )  # fmt: skip
                row(
                    5, "naive / ours, peak memory" + at_least["naive"], script_name,
                    None if ours["stopped_at_limit"]
                    else naive["peak_rss_bytes"] / ours["peak_rss_bytes"],
                    "x", config["TARGET_MEMORY_SAVING"] if transfer else None,
                    lower_bound=stopped["naive"], id=f"memory_saving_{script_name}",
                    **facts,
                )  # fmt: skip
    for case, result in gpu_cases.items():
        _, script_name, mixed, xla = case.split(":")
        row(
            6, f"compute only, mixed precision {'on' if mixed == '1' else 'off'}, "
            f"XLA {'on' if xla == '1' else 'off'}", script_name, rate(result, "compute"),
            "images/s", id=f"gpu_mixed{mixed}_xla{xla}_{script_name}",
            image_size=SCRIPTS[script_name].CONFIG["IMG_SIZE"],
            batch_size=run["batch_size"][script_name],
        )  # fmt: skip
    return rows


def format_value(value, unit):
    if value is None:
        return "not measured"
    if unit == "%":
        return f"{value:.0%}"
    if unit == "x":
        return f"{value:.2f}x"
    if unit == "GB":
        return f"{value:.2f} GB"
    return f"{value:,.0f} {unit}"


def format_table(rows):
    """A Markdown table: readable in a terminal and pasted as is into the README."""
    header = ["#", "measure", "model", "px", "batch", "result", "target", "status"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [
            str(row["step"]),
            row["measure"],
            row["model"],
            str(row.get("image_size", "")),
            str(row.get("batch_size", "")),
            format_value(row["value"], row["unit"]),
            row["target"] or "",
            row["status"],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------
# Main


def check_config(config):
    """Checks of the settings alone: run before TensorFlow loads, and by main()."""
    quick = "QUICK_" if config["QUICK"] else ""
    settings.require(
        config[quick + "STEPS"] > 0, "--steps and --quick_steps must be positive"
    )
    settings.require(config["ROUNDS"] > 0, "--rounds must be positive")
    settings.require(
        config[quick + "WARMUP_STEPS"] > 0,
        "--warmup_steps and --quick_warmup_steps must be 1 or more: the first step traces",
    )
    settings.require(
        config[quick + "PIPELINE_BATCHES"] > 0,
        "--pipeline_batches and --quick_pipeline_batches must be positive",
    )
    settings.require(
        config["MEMORY_LIMIT_GB"] >= 0, "--memory_limit_gb must be 0 or more"
    )
    settings.require(
        config["QUICK_CASES_AT_ONCE"] > 0, "--quick_cases_at_once must be positive"
    )


def main(argv):
    command = " ".join(["python bench.py", *argv])
    config = training.configure(CONFIG, argv, verbose=False)
    if config["CASE"]:
        run_case(config["CASE"], config)
        return None
    training.print_config(config, CONFIG)
    check_config(config)
    run = sizes(config)
    largest_batch = max(run["batch_size"].values())
    settings.require(
        min(run["batch_size"].values()) > 0
        and run["images"] >= largest_batch * total_steps(run),
        f"{run['images']} images are too few for {total_steps(run)} steps of "
        f"{largest_batch}: the naive way trains at most one pass over its arrays",
    )
    started = time.perf_counter()
    machine = machine_info()
    # The parent measures the pipeline on the CPU and keeps off the GPU, whose memory
    # TensorFlow would otherwise take whole, leaving none to the children.
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:
        pass
    print(
        f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gb']} GB, "
        f"GPU: {', '.join(machine['gpus']) or 'none'}; load average "
        f"{machine['load_average_at_start'][0]} (other work skews the numbers)"
    )

    # 1. The input pipeline alone
    training.seed_everything(config["SEED"])
    images, labels = random_cifar(run["images"], config["SEED"])
    pipeline = {}
    for script_name, script in SCRIPTS.items():
        batch_size = run["batch_size"][script_name]
        dataset = training_pipeline(script, images, labels, batch_size, config["SEED"])
        pipeline[script_name] = pipeline_rate(
            dataset, batch_size, run["warmup_steps"], run["pipeline_batches"]
        )
        print(
            f"  pipeline at {script.CONFIG['IMG_SIZE']} px: "
            f"{pipeline[script_name]:,.0f} images/s"
        )
    del images, labels, dataset

    # 2-5. Each training case in a process of its own
    # One at a time, so no case slows another, but under --quick, whose rates are
    # not measurements: each process's peak memory is its own either way.
    at_once = config["QUICK_CASES_AT_ONCE"] if config["QUICK"] else 1
    # The MobileNetV2 cases first: under --quick the slow ones then run side by side.
    cases = run_cases(
        [f"random_start:{transfer_mobilenetv2.SCRIPT}"]
        + [
            f"{kind}:{script_name}"
            for script_name in reversed(SCRIPTS)
            for kind in ("streaming", "naive")
        ],
        config,
        CONFIG,
        at_once,
    )
    # The naive way on the full set needs about 19 GB at 96 px. Where that passes the
    # limit, its peak is known only as a lower bound; its rate is then timed on a
    # smaller set, which changes what it holds, not what a step computes.
    for script_name in SCRIPTS:
        naive = cases[f"naive:{script_name}"]
        fallback_images = min(config["NAIVE_FALLBACK_IMAGES"], run["images"])
        if naive["stopped_at_limit"] and fallback_images < run["images"]:
            smaller = {
                **config,
                "FULL_IMAGES": fallback_images,
                "QUICK_IMAGES": fallback_images,
            }
            naive["fallback"] = run_cases([f"naive:{script_name}"], smaller, CONFIG, 1)[
                f"naive:{script_name}"
            ]
    gpu_cases = {}
    if machine["gpus"]:
        gpu_cases = run_cases(
            [
                f"precision:{transfer_mobilenetv2.SCRIPT}:{mixed}:{xla}"
                for mixed in (0, 1)
                for xla in (0, 1)
            ],
            config,
            CONFIG,
            at_once,
        )
        gpu_note = "mixed precision and XLA: timed on the GPU, MobileNetV2 compute only"
    else:
        gpu_note = "mixed precision and XLA: not timed, no GPU on this machine"

    # Save/Report
    rows = make_rows(config, run, pipeline, cases, gpu_cases)
    table = format_table(rows)
    heading = (
        f"`{command}` on {machine['cpu']} ({machine['cores']} cores, "
        f"{machine['memory_gb']} GB), TensorFlow {machine['tensorflow']}, "
        f"Keras {machine['keras']}; {gpu_note}."
    )
    if config["QUICK"]:
        heading += " --quick: a smoke check on tiny sets, so no target is judged."
    print("\n" + heading + "\n\n" + table)
    output = Path(config["OUTPUT"])
    output.parent.mkdir(parents=True, exist_ok=True)
    training.write_json(
        output,
        {
            "command": command,
            "quick": config["QUICK"],
            "machine": machine,
            "gpu": gpu_note,
            "config": config,
            "sizes": run,
            "seconds": round(time.perf_counter() - started, 1),
            "rows": rows,
            "table": table,
            "cases": {**cases, **gpu_cases},
        },
    )
    print(f"\nwrote {output} ({time.perf_counter() - started:.0f} s)")
    return rows


if __name__ == "__main__":
    training.cli(main)
