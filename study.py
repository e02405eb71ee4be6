"""Sweeps of one or two settings of the training scripts over seeds: each point an
ordinary run of the real script, resumable, then one figure with error bars, a CSV
with one row per run and a table of mean, standard deviation and count per point.

    python study.py data_efficiency --weights=none --epochs=5   # a preset, passing on
                                                                # settings to its runs
    python study.py scratch_cnn.py --sweep=width:16,32,64 --seeds=0,1,2 --epochs=10
    python study.py transfer_mobilenetv2.py --sweep=freeze_first:0,30 \
        --sweep=img_size:96,128                                 # a grid of two settings
    python study.py data_efficiency --dry_run    # points, which are done, time ESTIMATE
    python study.py data_efficiency --commands   # one command per unfinished point, for
                                                 # a job array or GNU parallel
    python study.py --help                       # presets, with the question each asks

Presets (each asks the question in its docstring, below): data_efficiency,
freeze_depth, resolution. Points run one at a time into OUT_DIR/study/<study>/<point>/,
each the script's own run folder with its config.json and metrics.json. Rerunning
the same command never repeats a finished point, resumes an interrupted one with the
script's --resume, and tries a failed one again; a changed sweep only adds points.
Outputs: PLOTS_DIR/study_<study>.png, .csv and .md.

A --name=value that is not a study setting below goes to every run of a script that
has that setting, and only to those (--epochs to scratch_cnn.py, --weights to
transfer_mobilenetv2.py); a name no script of the study has is an error.

Exit codes: 0 done (or nothing left to run), 1 a point failed (named; the others ran),
2 bad command line, before any run starts, 130 interrupted (rerun to go on).

Result: data_efficiency at 1,000 and 2,500 images, seeds 0 and 1, on CIFAR-10 (JPEG
copy): scratch CNN 29.4% and 51.6%, MobileNetV2 from random weights 19.9% and 37.4%
(README, Results; results/study_data_efficiency.md).
"""

import csv
import fcntl
import hashlib
import json
import math
import os
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timezone
from pathlib import Path

from settings import ConfigError, parse_value, read_script, stop_as_ctrl_c

# ---------------------------------------------------------------------------------
# Config (python study.py ... --name=value overrides any of these)

SEEDS = "0,1,2"  # seeds, comma-separated: every point runs once per seed
METRIC = "test_accuracy"  # the metrics.json key plotted and tabled; any numeric key
STUDY = ""  # study name, for its folder and outputs; "" = the preset's, or script_setting
OUT_DIR = "runs"  # points go to OUT_DIR/study/<study>/<point>/, each the run's OUT_DIR
PLOTS_DIR = "plots"  # study_<study>.png, .csv and .md go here, replacing earlier ones
DATA_LABEL = ""  # what the figure calls the data; "" = the source the runs recorded
DRY_RUN = False  # list the points, which are finished, and a time ESTIMATE; run nothing
COMMANDS = False  # print the command of every unfinished point, one a line; run nothing
POINT = ""  # run only this point (its folder name); the --commands lines set it
CONFIG = {
    name: value
    for name, value in dict(globals()).items()
    if name.isupper() and type(value) in (bool, int, float, str)
}  # the settings above: defaults for overrides

REPO = Path(__file__).resolve().parent
EXIT_FAILED, EXIT_CONFIG, EXIT_INTERRUPTED = 1, 2, 130
# Where things are and how much to print: not part of what a point measures (the
# same settings training.resumed_config lets a resumed run change).
NOT_MEASURED = ("OUT_DIR", "RESUME", "VERBOSE", "DATA_DIR")
RUN_CONTRACT = ("SEED", "OUT_DIR", "RESUME")  # a training script's config block has these
LOG_SPAN = 100  # a numeric setting whose largest/smallest positive value reaches this
# ratio (two decades) is plotted on a log axis
COLOURS = {
    "scratch_cnn": "tab:blue",
    "transfer_mobilenetv2": "tab:orange",
}  # evaluate.py's
SHADES = {
    "scratch_cnn": "Blues",
    "transfer_mobilenetv2": "Oranges",
}  # lines of one script
TF_NOTICE = re.compile(
    r"^([IWEF]\d{4} |WARNING: All log messages before absl|To enable the following)"
)


# ---------------------------------------------------------------------------------
# Presets: a function per study; its docstring is the question the figure answers

TRAINING_SCRIPTS = ("scratch_cnn.py", "transfer_mobilenetv2.py")


def data_efficiency():
    """How much data before training from scratch catches up?"""
    # 50,000 is all of CIFAR-10's training set (a larger TRAIN_IMAGES takes all).
    return TRAINING_SCRIPTS, {
        "TRAIN_IMAGES": [500, 1000, 2500, 5000, 10000, 25000, 50000]
    }


def freeze_depth():
    """How many layers should stay frozen?"""
    # MobileNetV2's base has 154 layers: 154 freezes all of it, so only the head learns.
    return ("transfer_mobilenetv2.py",), {"FREEZE_FIRST": [0, 10, 30, 60, 100, 154]}


def resolution():
    """Is 96 px enough?"""
    return ("transfer_mobilenetv2.py",), {"IMG_SIZE": [96, 128, 160]}


PRESETS = {
    preset.__name__: preset for preset in (data_efficiency, freeze_depth, resolution)
}


# ---------------------------------------------------------------------------------
# Command line: presets or scripts, sweeps, seeds, settings for the runs


def find_script(name):
    """The training script a command line names: a preset-free positional argument,
    with or without .py, next to study.py or as a path."""
    path = Path(name if name.endswith(".py") else name + ".py")
    for candidate in (path, REPO / path):
        if candidate.is_file():
            script = read_script(candidate)
            defaults = {key: item.default for key, item in script.settings.items()}
            if all(setting in defaults for setting in RUN_CONTRACT):
                return candidate.resolve(), defaults
            raise ConfigError(f"{name} is not a training script (no run settings)")
    raise ConfigError(
        f"unknown preset or script {name!r} (presets: {', '.join(PRESETS)}; "
        f"scripts: {', '.join(TRAINING_SCRIPTS)})"
    )


def split_flag(arg):
    """('name', 'value') from '--name=value'; a bare '--dry_run' is 'True'."""
    if arg.startswith("--") and "=" not in arg:
        name = arg[2:].replace("-", "_").upper()
        if type(CONFIG.get(name)) is bool:
            return name.lower(), "True"
    if not arg.startswith("--") or "=" not in arg:
        raise ConfigError(f"expected --name=value, got {arg!r}")
    flag, text = arg[2:].split("=", 1)
    return flag.replace("-", "_").lower(), text


def parse_command_line(argv):
    """The study a command line asks for, validated against the scripts' config
    blocks before anything runs: a dict of name, question, scripts (path: defaults),
    sweeps (NAME: values), seeds, settings (NAME: value, for the scripts that have
    it) and the study's own config."""
    positional = [arg for arg in argv if not arg.startswith("-")]
    flags = [arg for arg in argv if arg.startswith("-")]
    if not positional:
        raise ConfigError(
            f"name a preset ({', '.join(PRESETS)}) or a training script; see --help"
        )
    question, sweep_texts = "", []
    if positional[0] in PRESETS:
        if len(positional) > 1:
            raise ConfigError(f"a preset takes no scripts, got {positional[1:]}")
        preset = PRESETS[positional[0]]
        names, preset_sweeps = preset()
        question = preset.__doc__.strip()
        scripts = dict(find_script(name) for name in names)
    else:
        scripts = dict(find_script(name) for name in positional)
        preset_sweeps = {}
    config, given = dict(CONFIG), {}
    for arg in flags:
        flag, text = split_flag(arg)
        if flag == "sweep":
            sweep_texts.append(text)
        elif flag.upper() in CONFIG:
            config[flag.upper()] = parse_value(flag, text, CONFIG[flag.upper()])
        else:
            given[flag] = text
    if preset_sweeps and sweep_texts:
        raise ConfigError("a preset has its own sweep: drop --sweep, or name a script")
    if not preset_sweeps and not sweep_texts:
        raise ConfigError("nothing to sweep: add --sweep=setting:value1,value2,...")

    def check_name(flag, what):
        name = flag.upper()
        if name in ("SEED", "RESUME", "OUT_DIR"):
            raise ConfigError(
                f"--{what}{flag} is the study's to set (use --seeds=; a study resumes "
                f"itself; runs go to OUT_DIR/study/)"
            )
        owners = [path for path, defaults in scripts.items() if name in defaults]
        if not owners:
            valid = sorted(
                {n.lower() for d in scripts.values() for n in d}
                - {"seed", "resume", "out_dir"}
            )
            raise ConfigError(
                f"unknown setting --{what}{flag}: no script of this study has it "
                f"(settings: {', '.join(valid)})"
            )
        return name, owners

    sweeps = {}
    for name, values in preset_sweeps.items():
        sweeps[name] = values
    for text in sweep_texts:
        flag, _, values_text = text.partition(":")
        flag = flag.replace("-", "_").lower()
        if not flag or not _:
            raise ConfigError(f"--sweep takes setting:value1,value2,..., got {text!r}")
        name, owners = check_name(flag, "sweep=")
        if name == "DATA_DIR":
            raise ConfigError(
                "a sweep over data_dir is not supported: one study per data set"
            )
        if name in sweeps:
            raise ConfigError(f"--sweep={flag} given twice")
        texts = [value.strip() for value in values_text.split(",") if value.strip()]
        if not texts:
            raise ConfigError(f"--sweep={flag}: empty value list")
        sweeps[name] = []
        for value_text in texts:
            value = parse_value(flag, value_text, scripts[owners[0]][name])
            if value not in sweeps[name]:
                sweeps[name].append(value)
    settings = {}
    for flag, text in given.items():
        name, owners = check_name(flag, "")
        if name in sweeps:
            raise ConfigError(f"--{flag} is swept in this study: drop one of them")
        settings[name] = parse_value(flag, text, scripts[owners[0]][name])
    for name, values in sweeps.items():
        for path, defaults in scripts.items():
            if name in defaults:
                for value in values:
                    parse_value(name.lower(), str(value), defaults[name])
    try:
        seeds = [int(seed) for seed in config["SEEDS"].split(",") if seed.strip()]
    except ValueError:
        raise ConfigError(f"--seeds takes integers, e.g. 0,1,2; got {config['SEEDS']!r}")
    if not seeds or min(seeds) < 0:
        raise ConfigError(
            f"--seeds takes integers from 0, e.g. 0,1,2; got {config['SEEDS']!r}"
        )
    if config["METRIC"] == "":
        raise ConfigError("--metric is empty: name a key of metrics.json")
    name = config["STUDY"] or (
        positional[0]
        if question
        else "-".join([*(p.stem for p in scripts), *(n.lower() for n in sweeps)])
    )
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
        raise ConfigError(f"--study={name!r}: use letters, digits and _.+- only")
    return {
        "name": name,
        "root": Path(config["OUT_DIR"]) / "study" / name,
        "question": question,
        "scripts": scripts,
        "sweeps": sweeps,
        "seeds": list(dict.fromkeys(seeds)),
        "settings": settings,
        "config": config,
        "argv": [arg for arg in argv if split_flag_name(arg) not in STUDY_ACTIONS],
    }


STUDY_ACTIONS = ("dry_run", "commands", "point")  # flags --commands lines leave out


def split_flag_name(arg):
    return (
        arg[2:].split("=", 1)[0].replace("-", "_").lower() if arg.startswith("--") else ""
    )


# ---------------------------------------------------------------------------------
# Points: one run of one script at one combination of swept values and one seed


def format_value(value):
    """A value as a script's --name=value parses it back."""
    return value if isinstance(value, str) else repr(value)


def make_points(study):
    """Every point, seed by seed, so a full curve exists after the first seed."""
    root, points = study["root"], []
    combos = [{}]
    for name, values in study["sweeps"].items():
        combos = [{**combo, name: value} for combo in combos for value in values]
    for seed in study["seeds"]:
        for path, defaults in study["scripts"].items():
            for combo in combos:
                swept = {name: value for name, value in combo.items() if name in defaults}
                if len(swept) < len(combo) and any(
                    points_equal(p, path, swept, seed) for p in points
                ):
                    continue  # a setting this script does not have: one point will do
                settings = {
                    name: value
                    for name, value in study["settings"].items()
                    if name in defaults
                }
                settings.update(swept)
                measured = {
                    name: value
                    for name, value in {**defaults, **settings, "SEED": seed}.items()
                    if name not in NOT_MEASURED
                }
                digest = hashlib.sha256(
                    json.dumps([path.stem, measured], sort_keys=True).encode()
                ).hexdigest()[:8]
                label = "-".join(
                    f"{name.lower()}={re.sub(r'[^A-Za-z0-9.+-]', '_', str(value))[:24]}"
                    for name, value in swept.items()
                )
                point_id = "-".join(
                    filter(None, [path.stem, label, f"seed={seed}", digest])
                )
                points.append(
                    {
                        "id": point_id,
                        "dir": root / point_id,
                        "script": path,
                        "swept": swept,
                        "seed": seed,
                        "settings": settings,
                        "config": {**defaults, **settings, "SEED": seed},
                    }
                )
    return points


def points_equal(point, path, swept, seed):
    return point["script"] == path and point["swept"] == swept and point["seed"] == seed


def run_dirs(point_dir):
    """The script's run folders inside a point folder, oldest first."""
    found = [path.parent for path in Path(point_dir).glob("*/*/config.json")]
    return sorted(found, key=lambda path: path.name)


def finished_run(point):
    return next(
        (run for run in run_dirs(point["dir"]) if (run / "metrics.json").is_file()), None
    )


def read_attempts(point):
    path = point["dir"] / "attempts.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_to_resume(point, attempts):
    """The newest unfinished run folder no failed attempt left behind, or None."""
    failed = {
        attempt["run_dir"] for attempt in attempts if attempt["outcome"] == "failed"
    }
    unfinished = [
        run
        for run in run_dirs(point["dir"])
        if not (run / "metrics.json").is_file() and str(run) not in failed
    ]
    return unfinished[-1] if unfinished else None


def new_run_command(point, python=sys.executable):
    return [
        python,
        str(point["script"]),
        *[f"--{name.lower()}={format_value(v)}" for name, v in point["settings"].items()],
        f"--seed={point['seed']}",
        f"--out_dir={point['dir']}",
    ]


def resume_command(point, run_dir, python=sys.executable):
    """A resumed run keeps its saved settings: only where things are and how much
    to print may be given again."""
    kept = [
        f"--{name.lower()}={format_value(value)}"
        for name, value in point["settings"].items()
        if name in NOT_MEASURED
    ]
    return [
        python,
        str(point["script"]),
        f"--resume={run_dir}",
        f"--out_dir={point['dir']}",
        *kept,
    ]


# ---------------------------------------------------------------------------------
# Claims: an exclusive lock per point, held by the process that trains it


def claim_point(point_dir):
    """(file descriptor, None) once this process holds the point's lock, or (None,
    who holds it). The lock is flock(2) on claim.lock: the kernel drops it when the
    last process holding it ends, so a claim never outlives its trainer, and the
    training child inherits it, so it holds while the run lives even if study.py is
    killed. On a shared file system this needs working locks (NFSv4 has them)."""
    Path(point_dir).mkdir(parents=True, exist_ok=True)
    fd = os.open(Path(point_dir) / "claim.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        os.close(fd)
        return None, holder
    os.ftruncate(fd, 0)
    os.pwrite(
        fd, f"pid {os.getpid()} on {socket.gethostname()} since {now()}\n".encode(), 0
    )
    return fd, None


def claim_holder(point_dir):
    """Who holds the point's lock right now, or None; takes nothing."""
    lock = Path(point_dir) / "claim.lock"
    if not lock.is_file():
        return None
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        return os.read(fd, 200).decode(errors="replace").strip() or "another process"
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------
# Run: each point as a child process of the real script


def now():
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{os.uname().machine}, {os.cpu_count()} cores"


def last_error(path, offset):
    """The last line a failed run wrote on stderr, TensorFlow's start-up notices aside."""
    with open(path, "rb") as file:
        file.seek(offset)
        lines = file.read().decode(errors="replace").splitlines()
    lines = [line.strip() for line in lines if line.strip() and not TF_NOTICE.match(line)]
    return lines[-1][:300] if lines else "no message on stderr"


class Interrupted(Exception):
    pass


def run_point(point, fd):
    """Train (or resume) one claimed point; returns its attempt record. The child
    runs in a session of its own, so Ctrl-C reaches it once, from here, and it saves
    and stops as the script does on Ctrl-C; this then raises Interrupted."""
    attempts = read_attempts(point)
    resume = run_to_resume(point, attempts)
    command = resume_command(point, resume) if resume else new_run_command(point)
    write_json(
        point["dir"] / "point.json",
        {
            key: point[key]
            for key in ("id", "script", "swept", "seed", "settings", "config")
        },
    )
    stdout_path, stderr_path = point["dir"] / "stdout.log", point["dir"] / "stderr.log"
    before = set(run_dirs(point["dir"]))
    started, start = now(), time.perf_counter()
    with open(stdout_path, "ab") as stdout, open(stderr_path, "ab") as stderr:
        header = f"=== {started} {shlex.join(command)}\n".encode()
        stdout.write(header), stderr.write(header)
        stdout.flush(), stderr.flush()
        offset = stderr.tell()
        child = subprocess.Popen(
            command, stdout=stdout, stderr=stderr, pass_fds=(fd,), start_new_session=True
        )
        interrupted = False
        while True:
            try:
                returncode = child.wait()
                break
            except KeyboardInterrupt:
                interrupted = True
                child.send_signal(signal.SIGINT)
    new_runs = sorted(set(run_dirs(point["dir"])) - before)
    run_dir = resume or (new_runs[-1] if new_runs else None)
    if finished_run(point) and returncode == 0:
        outcome, error = "finished", ""
    elif interrupted:
        outcome, error = "interrupted", ""
    else:
        outcome = "failed"
        error = last_error(stderr_path, offset) if returncode else "no metrics.json"
    attempt = {
        "started": started,
        "seconds": round(time.perf_counter() - start, 1),
        "outcome": outcome,
        "returncode": returncode,
        "error": error,
        "run_dir": str(run_dir) if run_dir else "",
        "resumed": bool(resume),
        "command": shlex.join(command),
        "host": socket.gethostname(),
        "cpu": cpu_name(),
    }
    with open(point["dir"] / "attempts.jsonl", "a") as file:
        file.write(json.dumps(attempt) + "\n")
    if interrupted:
        raise Interrupted(point, run_dir)
    return attempt


def write_text(path, text):
    """Whole or not at all: readers never see half a file."""
    partial = Path(path).with_name(Path(path).name + f".{os.getpid()}.partial")
    partial.write_text(text)
    partial.replace(path)


def write_json(path, payload):
    write_text(path, json.dumps(payload, indent=2, default=str) + "\n")


def describe(point):
    swept = " ".join(f"{n.lower()}={format_value(v)}" for n, v in point["swept"].items())
    return f"{point['script'].stem} {swept} seed={point['seed']}".replace("  ", " ")


def run_study(study, points):
    """Run every unfinished point this process can claim; returns the failed ones."""
    todo = [p for p in points if not finished_run(p)]
    print(
        f"study {study['name']}: {len(points)} points, {len(points) - len(todo)} "
        f"finished, {len(todo)} to run, in {study['root']}"
    )
    failed, skipped = [], []
    for index, point in enumerate(todo, 1):
        fd, holder = claim_point(point["dir"])
        if fd is None:
            print(
                f"[{index}/{len(todo)}] {describe(point)}: skipped, claimed by {holder}"
            )
            skipped.append(point)
            continue
        try:
            if finished_run(point):  # finished by another process meanwhile
                continue
            print(
                f"[{index}/{len(todo)}] {describe(point)}: running "
                f"(log: {point['dir'] / 'stdout.log'})",
                flush=True,
            )
            attempt = run_point(point, fd)
        finally:
            os.close(fd)
        if attempt["outcome"] == "finished":
            metric = study["config"]["METRIC"]
            value = read_metric(finished_run(point), metric)
            print(f"    done in {attempt['seconds']:.0f} s: {metric} {value}")
        else:
            print(f"    failed (exit {attempt['returncode']}): {attempt['error']}")
            failed.append((point, attempt))
    if skipped:
        print(
            f"{len(skipped)} point(s) are being trained by other processes: "
            f"run the same command again once they end, to collect them"
        )
    return failed


# ---------------------------------------------------------------------------------
# Estimate: remaining time from the runs already done


def read_metric(run_dir, metric):
    """A metric of a finished run, as printed: 4 decimals for fractions."""
    value = json.loads((run_dir / "metrics.json").read_text()).get(metric, "missing")
    return number(value) if type(value) in (int, float) else value


def wall_seconds(point):
    """Time the finished point took, over all its attempts; None without a record."""
    attempts = read_attempts(point)
    if not attempts:
        return None
    return sum(attempt["seconds"] for attempt in attempts)


def estimate(points):
    """(seconds, unfinished points estimated, unfinished points without a basis, runs
    used): each unfinished point costs the mean of its own setting's finished seeds,
    else the mean of its script's finished runs."""
    done = [(p, wall_seconds(p)) for p in points if finished_run(p)]
    done = [(p, seconds) for p, seconds in done if seconds is not None]
    total, counted, unknown = 0.0, 0, 0
    for point in points:
        if finished_run(point):
            continue
        same = [
            s
            for p, s in done
            if p["script"] == point["script"] and p["swept"] == point["swept"]
        ]
        same = same or [s for p, s in done if p["script"] == point["script"]]
        if same:
            total += statistics.mean(same)
            counted += 1
        else:
            unknown += 1
    return total, counted, unknown, len(done)


def duration(seconds):
    minutes = round(seconds / 60)
    if minutes < 1:
        return f"{seconds:.0f} s"
    return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min"


def dry_run(study, points):
    print(f"study {study['name']}: {len(points)} points in {study['root']}")
    metric = study["config"]["METRIC"]
    for point in points:
        run = finished_run(point)
        attempts = read_attempts(point)
        holder = claim_holder(point["dir"])
        if run:
            seconds = wall_seconds(point)
            state = f"finished  {metric} {read_metric(run, metric)}"
            state += f" ({seconds:.0f} s)" if seconds else ""
        elif holder:
            state = f"running   claimed by {holder}"
        elif attempts and attempts[-1]["outcome"] == "failed":
            state = f"failed    {attempts[-1]['error']}"
        elif run_to_resume(point, attempts):
            state = f"resumes   {run_to_resume(point, attempts)}"
        else:
            state = "to run"
        print(f"  {describe(point):<50} {state}")
    seconds, counted, unknown, used = estimate(points)
    left = sum(1 for point in points if not finished_run(point))
    if not left:
        print("all points finished")
    elif not used:
        print(f"ESTIMATE: none yet for {left} points: no finished run to time")
    else:
        unknown = f"; {unknown} more with no finished run of their script" * bool(unknown)
        print(
            f"ESTIMATE (from {used} finished runs, not a measurement): about "
            f"{duration(seconds)} for {counted} of {left} unfinished points, "
            f"one at a time{unknown}"
        )


def commands(study, points):
    """The command that trains each unfinished point, claim and resume included."""
    for point in points:
        if not finished_run(point):
            print(
                shlex.join(
                    [
                        sys.executable,
                        sys.argv[0],
                        *study["argv"],
                        f"--point={point['id']}",
                    ]
                )
            )


# ---------------------------------------------------------------------------------
# Save/Report: study_<name>.csv, .md and .png from the finished runs


def check_metric(study, points):
    """Stop before any run if the finished runs already show --metric is no number."""
    for point in points:
        if finished_run(point):
            collect(study, [point])
            return


def collect(study, points):
    """One row per finished run: the point, its swept values, seed, wall time and
    every number of its metrics.json."""
    rows = []
    for point in points:
        run = finished_run(point)
        if run is None:
            continue
        metrics = json.loads((run / "metrics.json").read_text())
        config = json.loads((run / "config.json").read_text())
        rows.append(
            {
                "point": point,
                "metrics": metrics,
                "wall_seconds": wall_seconds(point),
                "run_dir": run,
                "data_source": str(config.get("data_source", "")),
            }
        )
    metric = study["config"]["METRIC"]
    numeric = lambda value: type(value) in (int, float)  # noqa: E731
    for row in rows:
        if not numeric(row["metrics"].get(metric)):
            valid = [k for k, v in row["metrics"].items() if numeric(v)]
            raise ConfigError(
                f"--metric={metric} is not a number in {row['run_dir']}/metrics.json "
                f"(numeric keys: {', '.join(valid)})"
            )
    return rows


def summarise(study, rows):
    """Per point (script and swept values): values over seeds and times per run."""
    groups = {}
    for row in rows:
        point = row["point"]
        key = (point["script"].stem, tuple(point["swept"].items()))
        groups.setdefault(key, []).append(row)
    metric = study["config"]["METRIC"]
    summary = []
    for (script, swept), group in groups.items():
        values = [row["metrics"][metric] for row in group]
        walls = [row["wall_seconds"] for row in group if row["wall_seconds"] is not None]
        summary.append(
            {
                "script": script,
                "swept": dict(swept),
                "values": values,
                "mean": statistics.mean(values),
                "std": statistics.stdev(values) if len(values) > 1 else float("nan"),
                "count": len(values),
                "wall": statistics.mean(walls) if walls else None,
                "train": statistics.mean(
                    row["metrics"].get("train_seconds", 0) for row in group
                ),
            }
        )
    return summary


def write_csv(path, study, rows):
    swept_names = list(study["sweeps"])
    metric_keys = list(dict.fromkeys(k for row in rows for k in row["metrics"]))
    with open(path.with_name(path.name + ".partial"), "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(
            ["study", "script", *[n.lower() for n in swept_names], "seed", *metric_keys,
             "wall_seconds", "point", "run_dir"]
        )  # fmt: skip
        for row in rows:
            point = row["point"]
            writer.writerow(
                [study["name"], point["script"].stem,
                 *[point["swept"].get(n, "") for n in swept_names], point["seed"],
                 *[row["metrics"].get(k, "") for k in metric_keys],
                 row["wall_seconds"] if row["wall_seconds"] is not None else "",
                 point["id"], row["run_dir"]]
            )  # fmt: skip
    path.with_name(path.name + ".partial").replace(path)


def data_label(study, rows):
    sources = sorted({row["data_source"] for row in rows if row["data_source"]})
    return study["config"]["DATA_LABEL"] or "; ".join(sources) or "unknown"


def settings_text(study):
    """The settings given to every run, where things are and how much to print aside."""
    given = ", ".join(
        f"{name.lower()}={format_value(value)}"
        for name, value in study["settings"].items()
        if name not in NOT_MEASURED
    )
    return given or "each script's defaults"


def machines(points):
    found = {
        f"{a['host']} ({a['cpu']})"
        for p in points
        for a in read_attempts(p)
        if a["outcome"] == "finished"
    }
    return "; ".join(sorted(found)) or "not recorded"


def write_markdown(path, study, summary, rows, points):
    metric = study["config"]["METRIC"]
    swept_names = [n.lower() for n in study["sweeps"]]
    lines = [
        f"# Study: {study['name']}",
        "",
        *([f"**{study['question']}**", ""] if study["question"] else []),
        f"Command: `{shlex.join(['python', 'study.py', *study['argv']])}`",
        "",
        f"- metric: `{metric}` (metrics.json), mean and standard deviation over seeds "
        f"{', '.join(map(str, study['seeds']))}",
        f"- settings given to every run: {settings_text(study)}",
        f"- data: {data_label(study, rows)}",
        f"- machine(s) that trained: {machines(points)}",
        "",
        f"| script | {' | '.join(swept_names)} | runs | mean | std "
        f"| wall s per run | train s per run |",
        "|---|" + "---|" * len(swept_names) + "---|---|---|---|---|",
    ]
    for row in sorted(
        summary, key=lambda r: (r["script"], sort_key(list(r["swept"].values())))
    ):
        cells = [format_cell(row["swept"].get(n.upper(), "-")) for n in swept_names]
        std = "-" if math.isnan(row["std"]) else number(row["std"])
        wall = "-" if row["wall"] is None else f"{row['wall']:.0f}"
        lines.append(
            f"| {row['script']} | {' | '.join(cells)} | {row['count']} | "
            f"{number(row['mean'])} | {std} | {wall} | {row['train']:.0f} |"
        )
    unfinished = [p for p in points if not finished_run(p)]
    if unfinished:
        lines += ["", f"Unfinished points ({len(unfinished)}):", ""]
        for point in unfinished:
            attempts = read_attempts(point)
            failed = attempts and attempts[-1]["outcome"] == "failed"
            error = f": failed: {attempts[-1]['error']}" if failed else ""
            lines.append(f"- `{point['id']}`{error}")
    write_text(path, "\n".join(lines) + "\n")


def number(value):
    """4 decimals for fractions such as accuracies, 1 for larger numbers."""
    if type(value) is int:
        return f"{value:,}"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:,.1f}"


def format_cell(value):
    return f"{value:,}" if type(value) is int else format_value(value)


def sort_key(values):
    return [(0, v, "") if type(v) in (int, float) else (1, 0, str(v)) for v in values]


def axis_kind(values):
    """ "log", "symlog", "linear" or "category" for a swept setting's values."""
    if not all(type(v) in (int, float) for v in values):
        return "category"
    positive = [v for v in values if v > 0]
    if (
        len(positive) > 1
        and max(positive) / min(positive) >= LOG_SPAN
        and min(values) >= 0
    ):
        return "log" if len(positive) == len(values) else "symlog"
    return "linear"


def line_colours(lines):
    """{label: colour}: each script in its colour (evaluate.py's); several lines of
    one script (a second swept setting) in shades of it."""
    import matplotlib

    cycle = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    by_script = {}
    for label, group in lines.items():
        by_script.setdefault(group[0]["script"], []).append(label)
    colours = {}
    for index, (script, labels) in enumerate(by_script.items()):
        if script not in COLOURS:
            colours.update(
                {label: cycle[(index + len(COLOURS)) % len(cycle)] for label in labels}
            )
        elif len(labels) == 1:
            colours[labels[0]] = COLOURS[script]
        else:
            shades = matplotlib.colormaps[SHADES[script]]
            for rank, label in enumerate(labels):
                colours[label] = shades(0.45 + 0.5 * rank / (len(labels) - 1))
    return colours


def plot(path, study, summary, rows):
    """The metric against the first swept setting: a line per script (and value of a
    second swept setting), the mean over seeds with a band of one standard deviation
    and a dot per run; log x where the setting spans two decades or more."""
    import matplotlib

    matplotlib.use("Agg")  # files only: never open a window
    import matplotlib.pyplot as plt

    metric = study["config"]["METRIC"]
    x_name, *other_names = study["sweeps"]
    x_values = sorted(study["sweeps"][x_name], key=lambda value: sort_key([value]))
    kind = axis_kind(x_values)
    if kind == "category":
        position = {value: index for index, value in enumerate(x_values)}
    else:
        position = {value: value for value in x_values}
    lines = {}
    for row in summary:
        others = [
            f"{name.lower()}={format_value(row['swept'][name])}"
            for name in other_names
            if name in row["swept"]
        ]
        lines.setdefault(", ".join([row["script"], *others]), []).append(row)
    figure, axes = plt.subplots(figsize=(8, 5.5))
    colours = line_colours(lines)
    for index, (label, group) in enumerate(lines.items()):
        color = colours[label]
        counts = sorted({row["count"] for row in group})
        label += f" (n={'-'.join(map(str, counts[:: max(len(counts) - 1, 1)]))})"
        if x_name not in group[0]["swept"]:
            # A script without this setting: one point per seed, drawn as a level.
            mean, std = group[0]["mean"], group[0]["std"]
            axes.axhline(
                mean, color=color, linestyle="--", label=f"{label}, no {x_name.lower()}"
            )
            if not math.isnan(std):
                axes.axhspan(mean - std, mean + std, color=color, alpha=0.15)
            continue
        group = sorted(group, key=lambda row: sort_key([row["swept"][x_name]]))
        xs = [position[row["swept"][x_name]] for row in group]
        if kind == "category":  # side by side, so the bars do not hide each other
            xs = [x + 0.08 * (index - (len(lines) - 1) / 2) for x in xs]
        means = [row["mean"] for row in group]
        stds = [0.0 if math.isnan(row["std"]) else row["std"] for row in group]
        if kind == "category":  # no line between values that have no order
            axes.errorbar(
                xs, means, yerr=stds, fmt="o", color=color, capsize=5, label=label
            )
        else:
            axes.plot(xs, means, marker="o", color=color, label=label)
            axes.fill_between(
                xs,
                [mean - std for mean, std in zip(means, stds)],
                [mean + std for mean, std in zip(means, stds)],
                color=color,
                alpha=0.2,
                linewidth=0,
            )
        for x, row in zip(xs, group):
            axes.scatter(
                [x] * len(row["values"]), row["values"], s=12, color=color,
                alpha=0.5, zorder=3, linewidths=0,
            )  # fmt: skip
    if kind == "category":
        axes.set_xlim(-0.5, len(x_values) - 0.5)
    if kind == "log":
        axes.set_xscale("log")
    elif kind == "symlog":
        axes.set_xscale("symlog", linthresh=min(value for value in x_values if value > 0))
    axes.set_xticks([position[value] for value in x_values])
    axes.set_xticklabels([format_cell(value) for value in x_values])
    axes.minorticks_off()
    scale = " (log scale)" if kind in ("log", "symlog") else ""
    axes.set_xlabel(f"{x_name.lower()}{scale}")
    axes.set_ylabel(metric)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=9)
    seeds = ", ".join(map(str, study["seeds"]))
    band = "bars" if kind == "category" else "band"
    subtitle = (
        f"mean ± standard deviation over seeds {seeds} ({band}), one dot per run; "
        f"settings: {settings_text(study)}; data: {data_label(study, rows)}"
    )
    title = study["question"] or f"{metric} against {x_name.lower()}"
    figure.text(0.01, 0.985, title, fontsize=12, fontweight="bold", va="top")
    figure.text(0.01, 0.935, textwrap.fill(subtitle, 135), fontsize=8, va="top")
    footer = f"python study.py {shlex.join(study['argv'])}; {len(rows)} runs"
    figure.text(0.01, 0.01, textwrap.fill(footer, 150), fontsize=6.5, color="0.4")
    figure.subplots_adjust(left=0.1, right=0.97, top=0.84, bottom=0.16)
    partial = path.with_name(path.stem + ".partial.png")
    figure.savefig(partial, dpi=120)
    plt.close(figure)
    partial.replace(path)


def report(study, points):
    rows = collect(study, points)
    if not rows:
        print("no finished run yet: nothing to plot")
        return
    plots_dir = Path(study["config"]["PLOTS_DIR"])
    plots_dir.mkdir(parents=True, exist_ok=True)
    base = plots_dir / f"study_{study['name']}"
    summary = summarise(study, rows)
    write_csv(base.with_suffix(".csv"), study, rows)
    write_markdown(base.with_suffix(".md"), study, summary, rows, points)
    plot(base.with_suffix(".png"), study, summary, rows)
    print(f"wrote {base}.png, .csv and .md ({len(rows)} of {len(points)} runs finished)")


# ---------------------------------------------------------------------------------
# Main


def help_text():
    presets = "\n".join(
        f"  {name:<16} {p.__doc__.strip()}" for name, p in PRESETS.items()
    )
    source = Path(__file__).read_text().split("# Config (", 1)[1].split("\nCONFIG", 1)[0]
    settings = "\n".join(
        "  --" + line.split(" = ", 1)[0].lower() + "=" + line.split(" = ", 1)[1]
        for line in source.splitlines()[1:]
        if " = " in line
    )
    return (
        f"{__doc__}\nPresets:\n{presets}\n\n"
        f"Study settings (default, meaning):\n{settings}\n"
    )


def main(argv):
    if any(arg in ("-h", "--help") for arg in argv):
        print(help_text())
        return 0
    study = parse_command_line(argv)
    points = make_points(study)
    config = study["config"]
    if config["POINT"]:
        points = [p for p in points if p["id"] == config["POINT"]]
        if not points:
            raise ConfigError(f"--point={config['POINT']}: no such point in this study")
    if config["DRY_RUN"]:
        dry_run(study, points)
        return 0
    if config["COMMANDS"]:
        commands(study, points)
        return 0
    check_metric(study, points)
    signal.signal(signal.SIGTERM, stop_as_ctrl_c)
    study["root"].mkdir(parents=True, exist_ok=True)
    if not config["POINT"]:
        write_json(
            study["root"] / "study.json",
            {
                key: study[key]
                for key in ("name", "question", "sweeps", "seeds", "settings", "argv")
            }
            | {
                "scripts": [str(p) for p in study["scripts"]],
                "points": [p["id"] for p in points],
            },
        )
    try:
        failed = run_study(study, points)
    except Interrupted as stop:
        point, run_dir = stop.args
        print(
            f"study.py: interrupted at {point['id']}"
            + (f"; its run {run_dir} is kept" if run_dir else "")
            + ". Run the same command again to go on.",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    if not config["POINT"]:
        report(study, make_points(study))
    if failed:
        for point, attempt in failed:
            print(
                f"study.py: point {point['id']} failed (exit {attempt['returncode']}): "
                f"{attempt['error']} (log: {point['dir']}/stderr.log)",
                file=sys.stderr,
            )
        print(
            f"study.py: {len(failed)} of {len(points)} points failed: "
            f"{', '.join(p['id'] for p, _ in failed)}; rerun to try them again",
            file=sys.stderr,
        )
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except ConfigError as error:
        print(f"study.py: error: {error}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    except KeyboardInterrupt:
        print(
            "study.py: interrupted. Run the same command again to go on.", file=sys.stderr
        )
        sys.exit(EXIT_INTERRUPTED)
    except BrokenPipeError:  # `study.py ... --commands | head`: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
