"""Speed and memory of both training scripts, side by side with the naive way (the whole
set converted to float32 and resized up front, then `fit` on the arrays).

    python bench.py            # full run: prints the table, writes bench.json
    python bench.py --quick    # smoke check on tiny sets: code paths, not numbers

Each case runs on random data in a process of its own. What it shows: README, Speed.
"""

import settings

settings.check_command_line(__name__, __file__)  # --help, bad flags: before TF loads

import concurrent.futures
import json
import os
import resource
import shlex
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
IMAGES = 50000  # images in every training set: CIFAR-10's training set
STEPS = 15  # training steps timed per round, after the warm-up steps
ROUNDS = 3  # timed rounds per rate, the median counts; the rates of a case alternate
WARMUP_STEPS = 5  # untimed steps before each round: tracing, oneDNN, tf.data autotuning
PIPELINE_BATCHES = 100  # batches timed for the input pipeline alone
QUICK_IMAGES = 2048  # images in every set under --quick
QUICK_STEPS = 2  # timed steps per round under --quick
QUICK_ROUNDS = 1  # timed rounds under --quick
QUICK_WARMUP_STEPS = 1  # untimed steps under --quick
QUICK_PIPELINE_BATCHES = 3  # pipeline batches timed under --quick
QUICK_BATCH_SIZE = 16  # images per step under --quick, every model
QUICK_CASES_AT_ONCE = 2  # child processes run together under --quick; full runs: 1
SCRATCH_BATCH_SIZE = scratch_cnn.CONFIG["BATCH_SIZE"]  # images per step: the CNN's own
TRANSFER_BATCH_SIZE = transfer_mobilenetv2.CONFIG["BATCH_SIZE"]  # MobileNetV2's own
TRANSFER_ALPHA = transfer_mobilenetv2.CONFIG["ALPHA"]  # MobileNetV2's width, its own
MEMORY_LIMIT_GB = 0.0  # stop a case past this resident GB (10^9 B); 0 = 90% of free
NAIVE_FALLBACK_IMAGES = 10000  # naive set timed instead if the full one hit the limit
TARGET_SCRATCH_RATE = 300.0  # images/s: CNN from scratch end to end at 32 px
TARGET_END_TO_END_SHARE = 0.95  # end-to-end rate over compute-only rate, every model
TARGET_MEMORY_GB = 2.0  # peak resident GB (10^9 B): MobileNetV2 fine-tuning, full set
TARGET_SPEEDUP = 3.0  # our end-to-end rate over the naive rate, MobileNetV2
TARGET_MEMORY_SAVING = 8.0  # the naive way's peak memory over ours, MobileNetV2
SEED = 0  # seeds the random images, shuffling, augmentation and weights
OUTPUT = "bench.json"  # where the table and every number go, as JSON
CASE = ""  # internal: the one case a child process runs, set by bench.py itself
CONFIG = settings.config_block(globals())  # the settings above: defaults for overrides

GB = 1e9  # bytes: the unit of the design's figures (50,000 x 96x96x3 x 4 B = 5.5 GB)
RESULT_MARK = "BENCH_CASE_RESULT "  # a child's last stdout line: this, then its JSON
NAIVE_MODELS = {"scratch_cnn": scratch_cnn, "transfer_mobilenetv2": transfer_mobilenetv2}
MODELS = NAIVE_MODELS | {"random_start": transfer_mobilenetv2}  # as --weights=none
BATCH = {scratch_cnn: "SCRATCH_BATCH_SIZE", transfer_mobilenetv2: "TRANSFER_BATCH_SIZE"}
TARGETS = {  # row id: the setting that holds its target; the other rows have none
    "end_to_end_scratch_cnn": "TARGET_SCRATCH_RATE",
    "peak_memory_transfer_mobilenetv2": "TARGET_MEMORY_GB",
    "speedup_transfer_mobilenetv2": "TARGET_SPEEDUP",
    "memory_saving_transfer_mobilenetv2": "TARGET_MEMORY_SAVING",
} | {f"end_to_end_share_{model}": "TARGET_END_TO_END_SHARE" for model in MODELS}


def sizes(config):
    """What this run uses, full or --quick, and each model's batch size and image side."""
    quick = "QUICK_" if config["QUICK"] else ""
    names = ("IMAGES", "STEPS", "ROUNDS", "WARMUP_STEPS", "PIPELINE_BATCHES")
    run = {name.lower(): config[quick + name] for name in names}
    own = {model: config[BATCH[script]] for model, script in MODELS.items()}
    run["batch_size"] = dict.fromkeys(own, config["QUICK_BATCH_SIZE"]) if quick else own
    run["image_size"] = {model: MODELS[model].CONFIG["IMG_SIZE"] for model in MODELS}
    return run


def model_config(model, config, **changes):
    """`model`'s script's config at this run's batch size, SEED and TRANSFER_ALPHA."""
    built = {**MODELS[model].CONFIG, "SEED": config["SEED"]}
    built["BATCH_SIZE"] = sizes(config)["batch_size"][model]
    if MODELS[model] is transfer_mobilenetv2:  # fine-tuning as an ImageNet run has it
        built["ALPHA"] = config["TRANSFER_ALPHA"]
        built["WEIGHTS"] = "none" if model == "random_start" else "imagenet"
    return {**built, **changes}


def build(model, config, train_images, **changes):
    """The model as its script compiles it for a run (MobileNetV2 from random weights)."""
    built = model_config(model, config, **changes)
    steps = max(sizes(config)["images"] // built["BATCH_SIZE"], 1)
    return MODELS[model].compiled_model(built, train_images, data.NUM_CLASSES, steps)


def step_seconds(model, x, y=None, *, steps, batch_size=None, shuffle=False):
    """Seconds of each of `steps` training steps of one `model.fit` call."""
    times = []  # a batch-end callback gets its logs as numbers: Keras waits for the step
    model.fit(
        x, y, batch_size=batch_size, epochs=1, steps_per_epoch=steps, verbose=0,
        shuffle=shuffle, callbacks=[keras.callbacks.LambdaCallback(
            on_train_begin=lambda logs: times.append(time.perf_counter()),
            on_train_batch_end=lambda batch, logs: times.append(time.perf_counter()))],
    )  # fmt: skip
    return np.diff(times)


def summary(rounds, batch_size):
    """Images/s of each timed round (its steps' total time) and their median."""
    rates = [len(seconds) * batch_size / float(np.sum(seconds)) for seconds in rounds]
    return {"images_per_second": float(np.median(rates)), "rounds": rates}


# ---------------------------------------------------------------------------------
# Cases, each run by a child process: python bench.py --case=KIND:MODEL


def training_case(kind, model, config, images, labels):
    """Our way, the uint8 set in memory: `kind` "streaming" times the pipeline alone, end
    to end and compute alone; "precision" one batch in float32, mixed and XLA."""
    run, built = sizes(config), model_config(model, config)  # its own augmentation
    batch_size, warmup = built["BATCH_SIZE"], run["warmup_steps"]
    pipeline = data.make_dataset(
        images, labels, batch_size=batch_size, image_size=built["IMG_SIZE"],
        value_range=MODELS[model].VALUE_RANGE, augmenter=data.augmenter_for(built),
        flip=built["AUGMENT_FLIP"], shuffle=True, seed=config["SEED"], repeat=True,
    )  # fmt: skip
    fixed = tf.data.Dataset.from_tensors(next(iter(pipeline))).repeat()
    if kind == "streaming":
        batches = pipeline.take(warmup + run["pipeline_batches"])
        ends = [time.perf_counter() for _ in batches]
        facts = {"pipeline": summary([np.diff(ends[warmup - 1 :])], batch_size)}
        network = build(model, config, images)  # end to end first: its trace fits both
        runs = {"end_to_end": (network, pipeline), "compute": (network, fixed)}
        trainable = training.count_trainable(network)
        facts.update(params=network.count_params(), trainable_params=trainable)
    else:
        runs, strategy = {}, tf.distribute.get_strategy()
        variants = {"float32": "off", "xla": "off", "mixed": "on"}  # its MIXED_PRECISION
        if model != "scratch_cnn" and not tf.config.list_logical_devices("GPU"):
            del variants["xla"]  # XLA on a CPU: the CNN's small graph alone
        for name, mixed_precision in variants.items():
            policy = training.set_precision(mixed_precision, strategy)  # mixed: the last
            runs[name] = (build(model, config, images, JIT_COMPILE=name == "xla"), fixed)
        keras.mixed_precision.set_global_policy("float32")
        facts = {"mixed_policy": policy}
    # Round 0 traces, untimed; later rounds alternate their order: a drift favours none.
    seconds = {name: [] for name in runs}
    for round_index in range(run["rounds"] + 1):
        for name in list(runs)[:: -1 if round_index % 2 else 1]:
            steps = warmup + (run["steps"] if round_index else 0)
            seconds[name].append(step_seconds(*runs[name], steps=steps)[warmup:])
    return {name: summary(seconds[name][1:], batch_size) for name in runs} | facts


def naive_case(kind, model, config, images, labels):
    """The report's naive way: the whole set scaled and resized in float32, then `fit`."""
    run = sizes(config)
    batch_size, image_size = run["batch_size"][model], run["image_size"][model]
    low, high = MODELS[model].VALUE_RANGE
    x = images.astype("float32") / 255.0 * (high - low) + low
    if image_size != data.NATIVE_SIZE:
        x = tf.image.resize(x, (image_size, image_size)).numpy()
    y = keras.utils.to_categorical(labels, data.NUM_CLASSES)
    untimed = 2 * run["warmup_steps"]  # as ours: a warm-up fit, then a round's warm-up
    steps = min(run["steps"], (run["images"] // batch_size - untimed) // run["rounds"])
    seconds = step_seconds(
        build(model, config, images), x, y, steps=untimed + run["rounds"] * steps,
        batch_size=batch_size, shuffle=True,
    )  # fmt: skip
    naive = summary(np.split(seconds[untimed:], run["rounds"]), batch_size)
    return {"array_bytes": x.nbytes, "naive": naive}


def run_case(case, config):
    """Child side: one case on random CIFAR-10-shaped images, its result printed last."""
    kind, _, model = case.partition(":")
    kinds = {"streaming": training_case, "precision": training_case, "naive": naive_case}
    expected = f"--case={case}: expected {'|'.join(kinds)}:{'|'.join(MODELS)}"
    settings.require(kind in kinds and model in MODELS, expected)
    for gpu in tf.config.list_physical_devices("GPU"):  # --quick: two cases share it
        tf.config.experimental.set_memory_growth(gpu, True)
    keras.utils.set_random_seed(config["SEED"])
    start, run = time.perf_counter(), sizes(config)
    rng, side = np.random.default_rng(config["SEED"]), data.NATIVE_SIZE
    images = rng.integers(0, 256, (run["images"], side, side, 3), np.uint8)
    labels = rng.integers(0, data.NUM_CLASSES, run["images"], dtype=np.int32)
    result = kinds[kind](kind, model, config, images, labels)
    result.update(
        case=case, images=run["images"], image_size=run["image_size"][model],
        batch_size=run["batch_size"][model], case_seconds=time.perf_counter() - start,
        # VmHWM, as Linux's ru_maxrss keeps the parent's over exec (macOS's is in bytes).
        peak_rss_bytes=proc_bytes("self/status", "VmHWM")
        or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    )  # fmt: skip
    print(RESULT_MARK + json.dumps(result, default=float), flush=True)


def proc_bytes(file, field):
    """A field of /proc/<file> ("meminfo", "<pid>/status") in bytes, None if absent."""
    try:
        lines = Path("/proc", file).read_text().splitlines()
    except OSError:  # the process has ended, or this is not Linux
        return None
    found = [line.split()[1] for line in lines if line.startswith(field + ":")]
    return int(found[0]) * 1024 if found else None


def run_child(case, config, started):
    """Parent side: `case` in a fresh process, stopped past MEMORY_LIMIT_GB."""
    flags = [f"--{n.lower()}={v!r}" for n, v in config.items() if v != CONFIG[n]]
    free = proc_bytes("meminfo", "MemAvailable") or float("inf")  # off Linux: unknown
    limit = config["MEMORY_LIMIT_GB"] * GB or 0.9 * free
    start, peak, over_limit = time.perf_counter(), 0, False
    with tempfile.TemporaryFile() as output:  # not a pipe: a full one blocks the child
        command = [sys.executable, __file__, *flags, f"--case={case}"]
        started.append(process := subprocess.Popen(command, stdout=output, stderr=output))
        while process.poll() is None and not over_limit:
            peak = max(peak, proc_bytes(f"{process.pid}/status", "VmRSS") or 0)
            if over_limit := peak > limit:
                process.kill()
            time.sleep(0.1)
        code, seconds = process.wait(), round(time.perf_counter() - start, 1)
        output.seek(0)
        lines = output.read().decode(errors="replace").splitlines()
    # SIGKILL that is not ours: the kernel's out-of-memory killer got there first.
    if over_limit or code == -signal.SIGKILL:
        print(f"  {case}: stopped at {peak / GB:.1f} GB, its limit {limit / GB:.1f} GB")
        return {"case": case, "stopped_at_limit": True, "peak_rss_bytes": peak,
                "memory_limit_bytes": limit, "wall_seconds": seconds}  # fmt: skip
    results = [line for line in lines if line.startswith(RESULT_MARK)]
    if code != 0 or not results:
        tail = "\n".join(lines[-15:])
        raise RuntimeError(f"case {case} failed (exit {code}):\n{tail}")
    result = json.loads(results[-1][len(RESULT_MARK) :])
    result.update(stopped_at_limit=False, wall_seconds=seconds)
    print(f"  {case}: {seconds:.0f} s, peak {result['peak_rss_bytes'] / GB:.2f} GB")
    return result


def run_children(cases, config, at_once):
    """Each case run by run_child, `at_once` at a time, in order; results by case."""
    started = []  # every child process, to stop them all on a failure or Ctrl-C
    with concurrent.futures.ThreadPoolExecutor(at_once) as pool:
        try:
            results = pool.map(lambda case: run_child(case, config, started), cases)
            return dict(zip(cases, results))
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            for process in started:
                process.kill()
            raise


# ---------------------------------------------------------------------------------
# Report: one table, printed and written with every number to OUTPUT


def judge(value, target, at_least, quick, lower_bound=False):
    """met/open for a row with a target; '' without one or under --quick."""
    if target is None or quick:
        return ""
    if value is None:
        return "open (not measured)"
    met = value >= target if at_least else value <= target
    if lower_bound and met != at_least:  # a case stopped at the limit: one way only
        return "open (undecided: a lower bound)"
    return "met" if met else "open"


def rate(result, key, over=None):
    """A case's images/s for `key`, over `over`'s if given; None if not measured."""
    if over is not None:
        numerator, denominator = rate(result, key), rate(*over)
        return numerator and denominator and numerator / denominator
    result = result if key in result else result.get("fallback", {})  # smaller set
    return result[key]["images_per_second"] if key in result else None


def format_value(value, unit):
    formats = {"%": "{:.0%}", "x": "{:.2f}x", "GB": "{:.2f} GB"}
    if value is None:
        return "not measured"
    return formats.get(unit, "{:,.0f} " + unit).format(value)


def make_rows(config, run, cases):
    """The rows by step: pipeline, compute, end to end, memory, naive, precision."""
    rows, images, quick = [], run["images"], config["QUICK"]

    def row(step, name, measure, of, value, unit, lower_bound=False, **facts):
        key = facts.pop("id", f"{name}_{of}")
        target, at_least = config.get(TARGETS.get(key)), unit != "GB"  # memory: at most
        shown = target and (">= " if at_least else "<= ") + format_value(target, unit)
        bound = " (at least: stopped at the limit)" if lower_bound else ""
        rows.append({
            "id": key, "step": step, "measure": measure + bound, "value": value,
            "model": settings.model_name(MODELS[of].SCRIPT, model_config(of, config)),
            "unit": unit, "target": shown, "lower_bound": lower_bound, **facts,
            "status": judge(value, target, at_least, quick, lower_bound),
            "image_size": run["image_size"][of], "batch_size": run["batch_size"][of],
        })  # fmt: skip

    ours = {model: cases[f"streaming:{model}"] for model in MODELS}
    for model in NAIVE_MODELS:  # the pipelines at 32 and 96 px
        row(1, "pipeline", "input pipeline alone", model, rate(ours[model], "pipeline"),
            "images/s", model="-",
            id=f"pipeline_{run['image_size'][model]}px")  # fmt: skip
    for model, case in ours.items():
        row(2, "compute", "training, compute only (one batch from memory)", model,
            rate(case, "compute"), "images/s")  # fmt: skip
        row(3, "end_to_end", "training, end to end (data.py pipeline)", model,
            rate(case, "end_to_end"), "images/s")  # fmt: skip
        row(3, "end_to_end_share", "end to end / compute only", model,
            rate(case, "end_to_end", (case, "compute")), "%")  # fmt: skip
        row(4, "peak_memory", f"peak memory, training on {images:,} images", model,
            case["peak_rss_bytes"] / GB, "GB", case["stopped_at_limit"])  # fmt: skip
    for model in NAIVE_MODELS:
        naive, mine = cases[f"naive:{model}"], ours[model]
        smaller = naive.get("fallback", {})
        on = f", on {smaller['images']:,} images" if "naive" in smaller else ""
        row(5, "naive_rate", "naive: training rate (float32 arrays, fit)" + on, model,
            rate(naive, "naive"), "images/s")  # fmt: skip
        row(5, "naive_peak_memory", f"naive: peak memory, {images:,} images", model,
            naive["peak_rss_bytes"] / GB, "GB", naive["stopped_at_limit"])  # fmt: skip
        row(5, "speedup", "ours / naive, training rate", model,
            rate(mine, "end_to_end", (naive, "naive")), "x")  # fmt: skip
        stopped = mine["stopped_at_limit"]  # then ours is a lower bound: no ratio
        saving = None if stopped else naive["peak_rss_bytes"] / mine["peak_rss_bytes"]
        row(5, "memory_saving", "naive / ours, peak memory", model, saving, "x",
            naive["stopped_at_limit"])  # fmt: skip
    for model in [model for model in MODELS if f"precision:{model}" in cases]:
        case = cases[f"precision:{model}"]  # --quick: the CNN's alone
        policy = case.get("mixed_policy", "mixed precision")  # none if stopped
        row(6, "mixed_precision", f"compute only, {policy} / float32",
            model, rate(case, "mixed", (case, "float32")), "x")  # fmt: skip
        if "xla" in case or model == "scratch_cnn":
            row(6, "xla", "compute only, XLA on / off (float32)", model,
                rate(case, "xla", (case, "float32")), "x")  # fmt: skip
    return sorted(rows, key=lambda row: row["step"])  # stable: each step's own order


def format_table(rows):
    """A Markdown table: readable in a terminal and pasted as is into the README."""
    header = ["#", "measure", "model", "px", "batch", "result", "target", "status"]
    return settings.markdown_table(header, [
        [row["step"], row["measure"], row["model"], row["image_size"], row["batch_size"],
         format_value(row["value"], row["unit"]), row["target"] or "", row["status"]]
        for row in rows
    ])  # fmt: skip


def check_config(config):
    """Checks of the settings alone: run before TensorFlow loads, and by main()."""
    quick = "QUICK_" if config["QUICK"] else ""
    for name in ("STEPS", "ROUNDS", "WARMUP_STEPS", "PIPELINE_BATCHES"):
        flags = f"--{name.lower()} and --quick_{name.lower()}"  # a warm-up step traces
        settings.require(config[quick + name] > 0, f"{flags} must be positive")
    settings.require(config["MEMORY_LIMIT_GB"] >= 0, "--memory_limit_gb must be >= 0")
    settings.require(config["QUICK_CASES_AT_ONCE"] > 0, "--quick_cases_at_once: >= 1")
    # The naive way's one fit passes over its arrays at most once.
    steps = 2 * config[quick + "WARMUP_STEPS"] + config[quick + "ROUNDS"]
    own = ["SCRATCH_BATCH_SIZE", "TRANSFER_BATCH_SIZE"]
    for name in ["QUICK_BATCH_SIZE"] if quick else own:
        wrong = f"--{name.lower()}: must be positive, {steps} batches at most the images"
        settings.require(0 < config[name] * steps <= config[quick + "IMAGES"], wrong)


def main(argv):
    command = shlex.join(["python", "bench.py", *argv])
    config = settings.parse_overrides(CONFIG, argv)
    if config["CASE"]:
        return run_case(config["CASE"], config)
    settings.print_config(config, CONFIG)
    check_config(config)
    run, started, quick = sizes(config), time.perf_counter(), config["QUICK"]
    machine = {
        "cpu": settings.cpu_name(),
        "bfloat16_units": sorted(settings.cpu_flags() & {"amx_bf16", "avx512_bf16"}),
        "cores": len(os.sched_getaffinity(0)), "gpus": training.gpu_names(),
        "memory_gb": round((proc_bytes("meminfo", "MemTotal") or 0) / GB, 1) or None,
        "load_average_at_start": round(os.getloadavg()[0], 2),
        "platform": sys.platform, "python": sys.version.split()[0],
        "tensorflow": tf.__version__, "keras": keras.__version__, "numpy": np.__version__,
    }  # fmt: skip
    units, gpus = (", ".join(machine[k]) or "none" for k in ("bfloat16_units", "gpus"))
    heading = f"`{command}` on {machine['cpu']} ({machine['cores']} cores, "
    heading += f"{machine['memory_gb']} GB, bfloat16 units: {units}), GPU: {gpus}, load "
    heading += f"average {machine['load_average_at_start']} at the start; TensorFlow "
    heading += f"{machine['tensorflow']}, Keras {machine['keras']}"
    heading += ". --quick: no target judged." if quick else "."

    # One case at a time, so none slows another; under --quick, whose rates are no
    # measurement, two at once, and of the precision cases only the CNN's.
    cases = [f"{kind}:{model}" for kind in ("streaming", "precision") for model in MODELS]
    cases += [f"naive:{model}" for model in NAIVE_MODELS]
    cases = [c for c in cases if not quick or "precision" not in c or "scratch" in c]
    cases.sort(key=lambda case: "scratch" in case)  # the slow MobileNetV2 cases first
    cases = run_children(cases, config, config["QUICK_CASES_AT_ONCE"] if quick else 1)
    # A naive case past the limit (many GB at 96 px): its rate from a smaller set.
    fallback = config["NAIVE_FALLBACK_IMAGES"]
    smaller = {**config, "IMAGES": fallback, "QUICK_IMAGES": fallback}
    for case, result in cases.items() if fallback < run["images"] else ():
        if case.startswith("naive:") and result["stopped_at_limit"]:
            result["fallback"] = run_children([case], smaller, 1)[case]

    rows = make_rows(config, run, cases)
    table = format_table(rows)
    print("\n" + heading + "\n\n" + table)
    output = Path(config["OUTPUT"])
    output.parent.mkdir(parents=True, exist_ok=True)
    settings.write_json(output, {
        "command": command, "quick": quick, "machine": machine, "config": config,
        "sizes": run, "seconds": time.perf_counter() - started, "rows": rows,
        "table": table, "cases": cases,
    })  # fmt: skip
    print(f"\nwrote {output} ({time.perf_counter() - started:.0f} s)")
    return rows


if __name__ == "__main__":
    settings.cli(main)
