"""Sweeps of one or two training settings over seeds into a figure with confidence
intervals, a CSV and a Markdown table. Each point is a run of the real script keyed on
its settings, seed and code, which a rerun skips, resumes or retries (README, Studies).

    python study.py data_efficiency                   # a preset (listed below)
    python study.py data_efficiency --alpha=1.0 --epochs=5   # settings for its runs
    python study.py data_efficiency --dry_run         # points, which are done, ESTIMATE
    python study.py data_efficiency --commands        # a command per unfinished point
    python study.py scratch_cnn.py --sweep=train_images:1000,5000 --seeds=0,1,2
    python study.py transfer_mobilenetv2.py --sweep alpha:0.35,1.0 --sweep img_size:96,128
"""

import fcntl
import hashlib
import io
import json
import math
import modulefinder
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from itertools import product
from pathlib import Path

import settings
from settings import require

# ---------------------------------------------------------------------------------
# Config (python study.py ... --name=value overrides any of these)

SEEDS = "0,1,2"  # seeds, comma-separated: every point runs once per seed
METRIC = "test_accuracy"  # a metrics.json (or export.json) key; two (a,b): a against b
STUDY = ""  # study name (folder and outputs); "" = the preset's, or script-setting
OUT_DIR = "runs"  # points go to OUT_DIR/study/<study>/<point>/, each the run's OUT_DIR
PLOTS_DIR = "plots"  # study_<study>.png, .csv and .md go here, replacing earlier ones
DATA_LABEL = ""  # what the outputs call the data; "" = the folder the runs recorded
EXPORT = False  # after each finished point, run export.py --run=<run> --forms=int8
INTERVAL = 0.95  # confidence level of the Student-t interval of each point's mean
MIN_STEP_IMAGES = 5000  # fair budget: a smaller training set gets this many images' steps
DRY_RUN = False  # list the points, which are finished, and a time ESTIMATE; run nothing
COMMANDS = False  # print the command of every unfinished point, one a line; run nothing
REPORT = False  # write the outputs from the points finished so far; run nothing
POINT = ""  # run only this point (its folder name), then report all finished ones
CONFIG = settings.config_block(globals())  # the settings above: defaults for overrides

REPO = Path(__file__).resolve().parent
EXIT_FAILED = 1  # a point failed; the others ran
AGAIN = "Run the same command again to go on."
USAGE = "PRESET | SCRIPT... [--sweep=setting:v1,v2,...] [--name=value | --name value]"
NOT_MEASURED = ("OUT_DIR", "RESUME", "VERBOSE", "DATA_DIR")  # where, how loud: not keys
STUDY_ACTIONS = ("dry_run", "commands", "report", "point")  # --commands lines drop these
PLACES = ("data_dir", "out_dir", "plots_dir")  # machine paths: not in a published line
EXPORTED = "export/export.json"  # in a run folder, once export.py has measured it
MODELS = ("WEIGHTS", "ALPHA")  # settings.model_name names these
LABELS = {"TRAIN_IMAGES": "training images", "FREEZE_FIRST": "frozen base layers"}
LABELS |= {"IMG_SIZE": "image size (px)", "ALPHA": "width (alpha)", "val": "validation"}
LABELS |= {"int8_ms_one_thread": "int8 ms per image (1 thread)"}  # names for readers
LABELS |= {"test_accuracy_tta_none": "test accuracy, one view"}
ZERO_MEANS = {"TRAIN_IMAGES": "all", "STEPS_PER_EPOCH": "full"}  # 0 of these settings
UNSAFE = "[^A-Za-z0-9.+-]"  # characters of a value a point's folder name replaces
LOG_SPAN = 20  # swept numbers whose largest/smallest reaches this ratio: a log axis


def label(name):
    """A setting's or metric's name for readers: LABELS, or words ("test accuracy")."""
    words = LABELS.get(name, name.lower()).split("_")
    return " ".join(LABELS.get(word, word) for word in words)


def show(name, value):
    """A setting's value for readers: 1,000 for 1000, "all" for TRAIN_IMAGES=0."""
    text = f"{value:,}" if type(value) is int else str(value)
    return ZERO_MEANS.get(name, text) if text == "0" else text


def as_flag(name, value):
    """--name=value as a script's command line parses it back."""
    return f"--{name.lower()}={value if isinstance(value, str) else repr(value)}"


# ---------------------------------------------------------------------------------
# Presets: a function per study, its docstring the question the figure answers


def fair_budget(run, study):
    """A training set smaller than MIN_STEP_IMAGES sees as many images an epoch as that
    many (less the validation share) would, in batches of the size the run will use."""
    least, given = study["MIN_STEP_IMAGES"], run["TRAIN_IMAGES"]
    train = [count - math.ceil(run["VAL_FRACTION"] * count) for count in (least, given)]
    steps = math.ceil(train[0] / settings.batch_size(run, train[1]))
    return {"STEPS_PER_EPOCH": steps} if 0 < given < least else {}


def data_efficiency():
    """How many training images before a CNN from scratch catches up with MobileNetV2?"""
    sizes = [250, 1000, 2500, 5000, 10000, 0]  # 0 = all
    sweeps = {"TRAIN_IMAGES": sizes, "WEIGHTS": ["imagenet", "none"]}
    fixed = {"scratch_cnn.py": {}, "transfer_mobilenetv2.py": {"ALPHA": 0.35}}  # fast
    study = {"METRIC": "test_accuracy_tta_none"}  # alike: the CNN's default is 6 views
    return {"fixed": fixed, "sweeps": sweeps, "budget": fair_budget, "study": study}


def freeze_depth():
    """How many of MobileNetV2's base layers should stay frozen while fine-tuning?"""
    layers = [0, 10, 30, 60, 100, 154]  # the base has 154 (input included): head only
    sweeps = {"FREEZE_FIRST": layers, "TRAIN_IMAGES": [2500, 0]}
    fixed = {"transfer_mobilenetv2.py": {"ALPHA": 0.35}}
    return {"fixed": fixed, "sweeps": sweeps, "budget": fair_budget}


def width_and_size():
    """Which width and image size buy the most accuracy per int8 millisecond?"""
    sweeps = {"IMG_SIZE": [96, 128, 160], "ALPHA": [0.35, 0.5, 1.0]}
    fixed = {"transfer_mobilenetv2.py": {"TRAIN_IMAGES": 5000}}  # a subset, to fit
    study = {"EXPORT": True, "METRIC": "test_accuracy,int8_ms_one_thread", "SEEDS": "0"}
    return {"fixed": fixed, "sweeps": sweeps, "study": study}


PRESETS = {p.__name__: p for p in (data_efficiency, freeze_depth, width_and_size)}


# ---------------------------------------------------------------------------------
# Command line, and its points: a run of one script per combination of swept values, seed


def find_script(name):
    """(path, defaults) of a training script named with or without .py, or a path."""
    path = Path(name if name.endswith(".py") else name + ".py")
    path = next((p for p in (path, REPO / path) if p.is_file()), None)
    require(path, f"unknown preset or script {name!r}; presets: {', '.join(PRESETS)}")
    defaults = {n: s.default for n, s in settings.read_script(path).settings.items()}
    require("RESUME" in defaults, f"{name} is not a training script: no RESUME")
    return path.resolve(), defaults


def code_files(script):
    """The script and the modules of its folder it imports, directly or not."""
    finder = modulefinder.ModuleFinder([str(Path(script).parent)])  # that folder only
    finder.run_script(str(script))
    return sorted(Path(m.__file__) for m in finder.modules.values() if m.__file__)


def parse_command_line(argv):
    """The study a command line asks for, checked against the scripts' config blocks."""
    count = next((i for i, arg in enumerate(argv) if arg.startswith("-")), len(argv))
    names = argv[:count]
    require(names, f"name a preset ({', '.join(PRESETS)}) or a training script")
    preset = PRESETS.get(names[0], dict)()
    require(not preset or len(names) == 1, f"a preset takes no scripts, got {names[1:]}")
    scripts = dict(find_script(name) for name in preset.get("fixed", names))
    defaults = list(scripts.values())
    owners = {n: [d for d in defaults if n in d] for d in defaults for n in d}
    booleans = [n.lower() for d in (CONFIG, *defaults) for n in d if type(d[n]) is bool]
    config, sweeps, given = {**CONFIG, **preset.get("study", {})}, {}, {}
    for flag, text in (pairs := settings.split_arguments(argv[count:], booleans)):
        if sweep := flag == "sweep":
            require(not preset, "a preset has its own sweep: drop --sweep")
            flag, colon, text = text.partition(":")
            flag = flag.replace("-", "_").lower()
            require(colon, f"--sweep takes setting:value1,value2,..., got {flag!r}")
        if (name := flag.upper()) in CONFIG and not sweep:
            config[name] = settings.parse_value(flag, text, CONFIG[name])
            continue
        require(name not in ("SEED", "RESUME"), f"--{flag} is the study's to set")
        if name not in owners:
            where = " in --sweep" if sweep else ""
            raise settings.unknown_setting(flag, [*CONFIG, *owners, "SWEEP"], where)
        texts = [v.strip() for v in text.split(",") if v.strip()] if sweep else [text]
        require(texts, f"--sweep={flag}: empty value list")
        taken = name in sweeps or name in NOT_MEASURED
        require(not (sweep and taken), f"--sweep={flag}: swept twice, or not sweepable")
        parse = settings.parse_value  # each script that has the setting must take it
        values = [parse(flag, text, d[name]) for d in owners[name] for text in texts]
        if sweep:
            sweeps[name] = list(dict.fromkeys(values[: len(texts)]))
        else:
            given[name] = values[0]  # over a preset's fixed value and a budget's
    sweeps = sweeps or preset.get("sweeps", {})
    require(sweeps, "nothing to sweep: add --sweep=setting:value1,value2,...")
    both = [f"--{name.lower()}" for name in given if name in sweeps]
    require(not both, f"{', '.join(both)}: swept in this study, so not a setting too")
    seeds = config["SEEDS"].replace(" ", "").split(",")
    require(all(map(str.isdigit, seeds)), f"--seeds takes integers, e.g. 0,1,2: {seeds}")
    metrics = config["METRIC"].replace(" ", "").split(",")
    require(len(metrics) < 3 and all(metrics), "--metric takes one or two metric names")
    require(0 < config["INTERVAL"] < 1, "--interval must lie in (0, 1), e.g. 0.95")
    stems = [path.stem for path in scripts] + [name.lower() for name in sweeps]
    name = config["STUDY"] or (names[0] if preset else "-".join(stems))
    require(re.fullmatch(r"[\w.+-]+", name), f"--study={name}: letters, digits, _.+-")
    code = {p: b"".join(map(Path.read_bytes, code_files(p))) for p in scripts}
    fixed = {path: preset.get("fixed", {}).get(path.name, {}) for path in scripts}
    shown = {n: v for path in scripts for n, v in fixed[path].items()} | given
    flags = [as_flag(n, v) for n, v in shown.items() if n not in NOT_MEASURED]
    study = {"name": name, "root": Path(config["OUT_DIR"]) / "study" / name}
    study |= {"question": PRESETS[names[0]].__doc__ if preset else "", "config": config}
    study |= {"scripts": scripts, "sweeps": sweeps, "given": given, "metrics": metrics}
    study |= {"codes": {p: hashlib.sha256(code[p]).hexdigest()[:8] for p in scripts}}
    study |= {"fixed": fixed, "flags": " ".join(flags) or "each script's defaults"}
    argv = names + [f"--{f}={t}" for f, t in pairs if f not in STUDY_ACTIONS]
    study |= {"seeds": list(dict.fromkeys(map(int, seeds))), "argv": argv}
    public = [f"--{f}={t}" for f, t in pairs if f not in (*STUDY_ACTIONS, *PLACES)]
    public = [Path(name).name for name in names] + public  # no paths of this machine
    study["command"] = shlex.join(["python", "study.py", *public])
    return study | {"budget": preset.get("budget"), "level": f"{config['INTERVAL']:.0%}"}


def make_points(study):
    """Every point, seed by seed: a whole curve exists after the first seed."""
    points, scripts, sweeps = {}, study["scripts"].items(), study["sweeps"]
    combos = [dict(zip(sweeps, values)) for values in product(*sweeps.values())]
    for seed, (path, defaults), combo in product(study["seeds"], scripts, combos):
        swept = {name: value for name, value in combo.items() if name in defaults}
        given = {n: v for n, v in study["given"].items() if n in defaults}
        run_settings = {**study["fixed"][path], **given, **swept}
        config = {**defaults, **run_settings, "SEED": seed}
        extra = study["budget"](config, study["config"]) if study["budget"] else {}
        extra = {name: value for name, value in extra.items() if name not in given}
        config, run_settings = config | extra, run_settings | extra
        measured = {n: v for n, v in config.items() if n not in NOT_MEASURED}
        key = hashlib.sha256(json.dumps([path.stem, measured], sort_keys=True).encode())
        key, code = key.hexdigest()[:8], study["codes"][path]
        values = {n.lower(): re.sub(UNSAFE, "_", str(v))[:24] for n, v in swept.items()}
        values = [f"{name}={value}" for name, value in values.items()]
        point_id = "-".join([path.stem, *values, f"seed={seed}", key, f"code={code}"])
        point = {"id": point_id, "dir": study["root"] / point_id, "script": path}
        point |= {"key": key, "code": code, "swept": swept, "extra": extra, "seed": seed}
        shown = {**swept, **extra}.items()  # for the terminal: model, values, seed
        shown = [f"{label(n)} {show(n, v)}" for n, v in shown if n not in MODELS]
        shown = [settings.model_name(path.stem, config), *shown, f"seed {seed}"]
        point |= {"title": ", ".join(shown)}
        points[point_id] = point | {"config": config, "settings": run_settings}
    return list(points.values())


def state(point, export=False):
    """What a point's folder holds: its runs, its attempts, and whether it is done."""
    stem, log = point["script"].stem, point["dir"] / "attempts.jsonl"
    lines = log.read_text().splitlines() if log.is_file() else []
    attempts = [json.loads(line) for line in lines]
    failed = {a["run_dir"] for a in attempts if a["outcome"] == "failed"}
    finished, unfinished = (settings.list_runs(point["dir"], stem, f) for f in (1, 0))
    resume = ([None] + [run for run in unfinished if str(run) not in failed])[-1]
    run = (finished + [None])[0]
    others = point["dir"].parent.glob(f"*-{point['key']}-code=*")
    others = [f for f in others if f != point["dir"] and settings.list_runs(f, stem, 1)]
    done = run is not None and (not export or (run / EXPORTED).is_file())
    found = {"run": run, "done": done, "resume": resume, "other_code": bool(others)}
    found["error"] = attempts[-1]["error"] if attempts else ""  # "" unless it failed
    spent = sum(attempt["seconds"] for attempt in attempts)
    return found | {"runs": finished + unfinished, "attempts": attempts, "seconds": spent}


# ---------------------------------------------------------------------------------
# Run: each point a child process of the real script, under a claim


def claim_point(point_dir, take=True):
    """(fd, None) once this process holds the point's flock(2) lock, else (None, holder);
    take=False only looks. The trainer inherits the lock, dropped with its last holder."""
    lock = Path(point_dir) / "claim.lock"
    if not take and not lock.is_file():
        return None, None
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if take else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        return os.close(fd), holder
    if not take:
        return os.close(fd), None
    os.ftruncate(fd, 0)
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    os.write(fd, f"pid {os.getpid()} on {os.uname().nodename} since {since}\n".encode())
    return fd, None


def attempt(point, fd, step):
    """Train (or resume) a claimed point's run, or export it, recorded in attempts.jsonl.
    In a session of its own, Ctrl-C reaches the child once, from here: it saves, stops."""
    before = state(point)
    run, resume = before["run"], before["resume"] if step == "train" else None
    given = point["settings"].items()  # a resumed run keeps its own but where, how loud
    flags = [as_flag(n, v) for n, v in given if not resume or n in NOT_MEASURED]
    flags += [f"--resume={resume}"] if resume else [f"--seed={point['seed']}"]
    command = [point["script"], *flags, f"--out_dir={point['dir']}"]
    if step == "export":
        command = [REPO / "export.py", f"--run={run}", "--forms=int8"]
    command, start = [sys.executable, *map(str, command)], time.time()
    started, interrupted = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), False
    logs = [point["dir"] / f"{name}.log" for name in ("stdout", "stderr")]
    with open(logs[0], "ab", 0) as out, open(logs[1], "ab", 0) as err:  # unbuffered
        for log in (out, err):
            log.write(f"=== {started} {shlex.join(command)}\n".encode())
        offset, session = err.tell(), {"pass_fds": (fd,), "start_new_session": True}
        child = subprocess.Popen(command, stdout=out, stderr=err, **session)
        while child.returncode is None:
            try:
                child.wait()
            except KeyboardInterrupt:
                interrupted = True
                child.send_signal(signal.SIGINT)
    with open(logs[1], "rb") as file, io.BytesIO() as kept:  # less TensorFlow's notices
        file.seek(offset)  # this attempt's stderr only: the log holds every attempt's
        settings.forward_messages(file, kept)
        lines = kept.getvalue().decode(errors="replace").strip().splitlines()
    after = state(point, export=step == "export")
    new = [folder for folder in after["runs"] if folder not in before["runs"]]
    run_dir = run or resume or ([""] + new)[-1]
    done = after["done"] and not child.returncode
    outcome = "finished" if done else "interrupted" if interrupted else "failed"
    error = lines[-1].strip()[:300] if lines else ""
    error = (error or f"{step}: no results") if outcome == "failed" else ""
    record = {"step": step, "started": started, "outcome": outcome, "error": error}
    record |= {"seconds": round(time.time() - start, 1), "resumed": bool(resume)}
    record |= {"returncode": child.returncode, "run_dir": str(run_dir)}
    record |= {"command": shlex.join(command), "code": point["code"]}
    record["cpu"] = f"{settings.cpu_name()}, {os.cpu_count()} cores"
    with open(point["dir"] / "attempts.jsonl", "a") as file:
        file.write(json.dumps(record) + "\n")
    if interrupted:
        kept = f"; its run {run_dir} is kept" if run_dir else ""
        raise settings.Interrupted(f"interrupted at {point['id']}{kept}. {AGAIN}")
    return record


def run_study(study, points, todo):
    """Run each unfinished point this process can claim; returns the failed ones."""
    export, metrics, failed = study["config"]["EXPORT"], study["metrics"], []
    left, done = len(todo), len(points) - len(todo)
    print(f"study {study['name']}: {len(points)} points, {done} finished, {left} to run")
    for index, point in enumerate(todo, 1):
        fd, holder = claim_point(point["dir"])
        print(f"[{index}/{len(todo)}] {point['title']}: ", end="")
        if fd is None:
            print(f"skipped, claimed by {holder}; rerun once it ends to collect it")
            continue
        try:
            print("running", flush=True)
            record = None if state(point)["run"] else attempt(point, fd, "train")
            if state(point)["run"] and not state(point, export)["done"]:
                record = attempt(point, fd, "export")
        finally:
            os.close(fd)
        if record and record["outcome"] == "finished":
            found = read_metrics(state(point)["run"])
            shown = ", ".join(f"{label(m)} {number(found.get(m))}" for m in metrics)
            print(f"    done in {record['seconds']:.0f} s: {shown}")
        elif record:
            print(f"    failed (exit {record['returncode']}): {record['error']}")
            failed.append((point, record))
    return failed


def dry_run(study, points):
    """Each point's state, and a time ESTIMATE from the finished points' wall times."""
    metric = study["metrics"][0]
    states = [state(point, study["config"]["EXPORT"]) for point in points]
    timed = [(p, s["seconds"]) for p, s in zip(points, states) if s["done"]]
    total, counted = 0.0, 0
    print(f"study {study['name']}: {len(points)} points in {study['root']}")
    for point, found in zip(points, states):
        text = "to export" if found["run"] else "to run"
        text += " (finished with other code)" * found["other_code"]
        if found["done"]:
            value = number(read_metrics(found["run"]).get(metric))
            text = f"finished  {label(metric)} {value} ({found['seconds']:.0f} s)"
        elif holder := claim_point(point["dir"], take=False)[1]:
            text = f"running   claimed by {holder}"
        elif found["error"]:
            text = f"failed    {found['error']}"
        elif found["resume"]:
            text = f"resumes   {found['resume'].name}"
        print(f"  {point['title']:<64} {text}")
        mine = [(p["swept"], s) for p, s in timed if p["script"] == point["script"]]
        same = [s for swept, s in mine if swept == point["swept"]] or [s for _, s in mine]
        if not found["done"] and same:  # the mean time of like points
            total, counted = total + sum(same) / len(same), counted + 1
    unfinished = [found["other_code"] for found in states if not found["done"]]
    left, redo = len(unfinished), sum(unfinished)
    print(f"{len(points) - left} finished, {left} to run ({redo} with other code, rerun)")
    hours = f"{total / 3600:.1f} h" if total > 3600 else f"{total / 60:.1f} min"
    if left and not timed:
        print("ESTIMATE: cannot estimate yet: no finished point to time")
    elif left:
        basis = f"ESTIMATE (from {len(timed)} finished points, not a measurement): about "
        print(f"{basis}{hours} for {counted} of {left} unfinished points, one at a time")


# ---------------------------------------------------------------------------------
# Save/Report: study_<name>.csv (a row per run), .md (a row per point) and .png


def read_metrics(run):
    """The numbers of a run's metrics.json, and of export/export.json where it has one."""
    found = settings.read_json(run / EXPORTED) if (run / EXPORTED).is_file() else {}
    found |= settings.read_json(run / "metrics.json")
    return {key: value for key, value in found.items() if type(value) in (int, float)}


def number(value):
    """4 decimals for fractions such as accuracies, 1 for larger numbers; - for none."""
    if value is None or math.isnan(value):
        return "-"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:,.1f}"


def tables(study, points):
    """(runs, summary): a row per finished run; per point n, mean, sd, "ci" half-width."""
    import pandas as pd
    from scipy import stats

    rows, x_name = [], next(iter(study["sweeps"]))
    names = [*study["sweeps"], *{n: 0 for point in points for n in point["extra"]}]
    others = [name for name in list(study["sweeps"])[1:] if name not in MODELS]
    for point in points:  # finished, and exported where the study exports
        if not (found := state(point, study["config"]["EXPORT"]))["done"]:
            continue
        run = found["run"]
        metrics, saved = read_metrics(run), settings.read_json(run / "config.json")
        missing = ",".join(metric for metric in study["metrics"] if metric not in metrics)
        numbers = f"numbers there: {', '.join(metrics)}; --export adds int8_*"
        require(not missing, f"--metric={missing}: not in {run}/metrics.json ({numbers})")
        config, stem = saved["config"], point["script"].stem
        at_x = {x_name: study["scripts"][point["script"]].get(x_name)}  # x shows it
        line = [settings.model_name(stem, config | at_x if x_name in MODELS else config)]
        line += [f"{label(n)} {show(n, config[n])}" for n in others if n in config]
        row = {"model": settings.model_name(stem, config), "line": ", ".join(line)}
        row |= {name: config.get(name, "-") for name in names}
        row |= {"seed": point["seed"], "code": point["code"], "script": stem, **metrics}
        row |= {"wall seconds": found["seconds"], "point": point["id"]}
        data = study["config"]["DATA_LABEL"] or Path(saved.get("data_source") or "?").name
        rows.append(row | {"run": str(run.relative_to(study["root"])), "data": data})
    runs = pd.DataFrame(rows)
    if runs.empty:
        return runs, runs
    codes = ("code", lambda codes: " ".join(sorted(set(codes))))
    columns = {"n": ("seed", "count"), "code": codes, "wall": ("wall seconds", "mean")}
    for metric in study["metrics"]:
        columns |= {metric: (metric, "mean"), metric + " sd": (metric, "std")}
    groups = runs.groupby(["line", "model", *names], sort=False)
    summary = groups.agg(**columns).reset_index()
    t = stats.t.ppf((1 + study["config"]["INTERVAL"]) / 2, summary["n"] - 1)  # n - 1 d.f.
    for metric in study["metrics"]:
        summary[metric + " ci"] = t * summary[metric + " sd"] / summary["n"] ** 0.5
    return runs, summary.sort_values("line", kind="stable")


def markdown(study, runs, summary, points):
    """study_<name>.md: what was measured and how, the table, unfinished points."""
    metrics, name, level = study["metrics"], study["name"], study["level"]
    names = [n for n in summary if n.isupper() and n not in MODELS]  # settings' columns
    header = ["model", *map(label, names), "n"]
    header += [h for m in metrics for h in (f"mean {label(m)}", "sd", f"{level} CI")]
    rows = []
    for row in summary.to_dict("records"):
        cells = [row["model"], *(show(n, row[n]) for n in names), row["n"]]
        for m in metrics:
            low, high = number(row[m] - row[m + " ci"]), number(row[m] + row[m + " ci"])
            cells += [number(row[m]), number(row[m + " sd"]), f"{low} to {high}"]
        rows.append(cells + [row["code"], f"{row['wall']:.0f}"])
    states = [state(point, study["config"]["EXPORT"]) for point in points]
    cpus = {a["cpu"] for s in states for a in s["attempts"] if a["outcome"] == "finished"}
    budget = " ".join((study["budget"].__doc__ or "").split()) if study["budget"] else "-"
    seeds = ", ".join(map(str, study["seeds"]))
    stats = f"the mean over seeds {seeds}, standard deviation (sd), number of runs (n)"
    stats += f" and the {level} confidence interval of the mean (Student's t, n - 1 d.f.)"
    unfinished = [(p["id"], s["error"]) for p, s in zip(points, states) if not s["done"]]
    lines = [
        f"# Study: {name}\n\n**{study['question'] or ', '.join(map(label, metrics))}**\n",
        f"Reproduce: `{study['command']}` (with --data_dir for the data)\n",
        f"- data: {'; '.join(sorted(set(runs['data'])))}",
        f"- per point: {stats}",
        f"- settings given to every run: {study['flags']}; budget: {budget}",
        "- code: hash of the script and modules it imports; other code reruns a point",
        f"- CPU: {'; '.join(sorted(cpus)) or 'not recorded'}",
        f"- every run: study_{name}.csv; figure: study_{name}.png\n",
        settings.markdown_table(header + ["code", "wall s per run"], rows),
    ]
    if unfinished:
        lines.append(f"\nUnfinished points ({len(unfinished)}):\n")
    for point, error in unfinished:
        lines.append(f"- `{point}`" + f": failed: {error}" * bool(error))
    return "\n".join(lines) + "\n"


def draw(study, runs, summary):
    """The first metric against the first swept setting (or the second metric)."""
    from matplotlib.figure import Figure  # no pyplot: files only, never a window

    metrics, x_name = study["metrics"], next(iter(study["sweeps"]))
    values, two = study["sweeps"][x_name], len(metrics) > 1
    numeric = all(type(value) in (int, float) for value in values)
    position = {v: i for i, v in enumerate(values)}  # categories, in the sweep's order
    if numeric:  # 0 = all training images: right of the largest size
        largest = max([value for value in values if value] or [1])
        position = {v: v or 2 * largest if x_name in ZERO_MEANS else v for v in values}
    spots = list(position.values())
    log = numeric and min(spots) > 0 and max(spots) / min(spots) >= LOG_SPAN
    figure = Figure(figsize=(8, 5.5))
    axes = figure.subplots()
    for index, (line, group) in enumerate(summary.groupby("line", sort=False)):
        dots, colour = runs[runs["line"] == line], f"C{index}"
        n = "-".join(map(str, sorted(set(group["n"]))))
        if (group[x_name] == "-").all():  # a script without the x setting: a level
            group = group.loc[group.index.repeat(len(values))]
            group[x_name] = values
        y = group[metrics[0]]
        x = group[metrics[1]] if two else group[x_name].map(position)
        dots_x = dots[metrics[1]] if two else dots[x_name].map(position)
        x_error = group[metrics[1] + " ci"].fillna(0) if two else None
        bars = {"color": colour, "capsize": 4, "label": f"{line} (n={n})"}
        style = "o-" if numeric or two else "o"
        axes.errorbar(x, y, group[metrics[0] + " ci"].fillna(0), x_error, style, **bars)
        axes.scatter(dots_x, dots[metrics[0]], 12, colour, alpha=0.5, linewidths=0)
        for xy, value in zip(zip(x, y), group[x_name]) if two else []:
            axes.annotate(show(x_name, value), xy, (4, 4), textcoords="offset points")
    if not two:
        axes.set_xscale("log" if log else "linear")
        axes.set_xticks([position[v] for v in values], [show(x_name, v) for v in values])
        axes.minorticks_off()
    x_label = label(metrics[1]) if two else label(x_name) + " (log)" * log
    axes.set(ylabel=label(metrics[0]), xlabel=x_label)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    subtitle = f"Points labelled by {label(x_name)}. " * two + (
        f"Mean over seeds {', '.join(map(str, study['seeds']))}; error bars: "
        f"{study['level']} confidence interval of the mean (Student's t); dots: "
        f"single runs. Data: {'; '.join(sorted(set(runs['data'])))}. "
        f"Settings: {study['flags']}."
    )
    title = study["question"] or f"{label(metrics[0])} against {x_label}"
    footer = f"{study['command']}; {len(runs)} runs; "
    footer += f"code {' '.join(sorted(set(runs['code'])))}"
    figure.text(0.01, 0.985, title, fontsize=10.5, fontweight="bold", va="top")
    figure.text(0.01, 0.935, textwrap.fill(subtitle, 135), fontsize=8, va="top")
    figure.text(0.01, 0.01, textwrap.fill(footer, 150), fontsize=6.5, color="0.4")
    figure.subplots_adjust(left=0.1, right=0.97, top=0.84, bottom=0.16)
    return figure


def report(study, points):
    """Write study_<name>.csv, .md and .png into PLOTS_DIR from the finished points."""
    runs, summary = tables(study, points)
    if runs.empty:
        return print("no finished run yet: nothing to plot")
    base = Path(study["config"]["PLOTS_DIR"]) / f"study_{study['name']}"
    base.parent.mkdir(parents=True, exist_ok=True)  # f"{base}.csv": names may hold dots
    settings.write_text(f"{base}.csv", runs.rename(columns=label).to_csv(index=False))
    settings.write_text(f"{base}.md", markdown(study, runs, summary, points))
    draw(study, runs, summary).savefig(f"{base}.partial.png", dpi=120)
    Path(f"{base}.partial.png").replace(f"{base}.png")
    print(f"wrote {base}.png, .csv and .md ({len(runs)} of {len(points)} runs finished)")


def main(argv):
    if any(arg in ("-h", "--help") for arg in argv):
        presets = [f"  {name:<16} {preset.__doc__}" for name, preset in PRESETS.items()]
        print(settings.help_text(__file__, usage=USAGE), end="")
        return print("\npresets (the question each answers):", *presets, sep="\n")
    study = parse_command_line(argv)
    points, config = make_points(study), study["config"]
    chosen = [p for p in points if config["POINT"] in ("", p["id"])]
    require(chosen, f"--point={config['POINT']}: no such point in this study now")
    if config["DRY_RUN"]:
        return dry_run(study, chosen)
    if config["REPORT"]:
        return report(study, points)
    todo = [point for point in chosen if not state(point, config["EXPORT"])["done"]]
    if config["COMMANDS"]:
        for point in todo:
            argv = [sys.executable, sys.argv[0], *study["argv"], "--point=" + point["id"]]
            print(shlex.join(argv))
        return 0
    tables(study, [point for point in points if point not in todo][:1])  # --metric
    failed = run_study(study, chosen, todo)
    report(study, points)  # from every finished point, whichever process ran them
    for point, record in failed:  # its folder has the whole log
        print(f"study.py: {point['id']} failed: {record['error']}", file=sys.stderr)
    if failed:
        ids = ", ".join(point["id"] for point, _ in failed)
        tally = f"{len(failed)} of {len(points)} points failed"
        print(f"study.py: {tally}: {ids}", file=sys.stderr)
    return EXIT_FAILED if failed else 0


if __name__ == "__main__":
    settings.cli(main, "interrupted. " + AGAIN)
