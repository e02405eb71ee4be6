"""study.py end to end: a tiny sweep of a copy of scratch_cnn.py (and the modules it
imports) on the session's small data, interrupted and resumed, rerun, extended, with a
failing point, claimed points, a code change and bad command lines."""

import csv
import json
import math
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time

import pytest
from conftest import OFFLINE_ENV, REPO

import settings
import study

TINY = ["--epochs=1", "--steps_per_epoch=1", "--batch_size=16", "--verbose=0"]
ENV = {**os.environ, **OFFLINE_ENV}


def run_study(args, timeout=600):
    return subprocess.run(
        [sys.executable, str(REPO / "study.py"), *args],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def point_dirs(root):
    return sorted(path for path in (root / "runs/study/tiny").iterdir() if path.is_dir())


def attempts(point_dir):
    path = point_dir / "attempts.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(line) for line in lines]


def runs_in(point_dir):
    return sorted(path.parent for path in point_dir.glob("scratch_cnn/*/config.json"))


def read_csv(path):
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory, cifar_dir):
    """Three seeds of one point of a copy of the repository's scripts (so a test can
    change their code), given as `--sweep value`; interrupted (Ctrl-C) while its second
    point trains, then run again to the end. Returns a dict: root, script, args (all
    but the sweep and seeds), the interrupted process's (code, stdout, stderr), rerun."""
    root = tmp_path_factory.mktemp("study")
    copy = root / "repo"
    copy.mkdir()
    for path in REPO.glob("*.py"):
        shutil.copy(path, copy)
    script = copy / "scratch_cnn.py"
    args = [
        f"--data_dir={cifar_dir}",
        *TINY,
        f"--out_dir={root / 'runs'}",
        f"--plots_dir={root / 'plots'}",
        "--study=tiny",
    ]
    command = [str(script), "--sweep", "train_images:100", "--seeds", "0,1,2", *args]
    process = subprocess.Popen(
        [sys.executable, str(REPO / "study.py"), *command],
        cwd=REPO,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Points run seed by seed: the second is seed 1. Its run folder appears once its
    # data and model are ready, just before training.
    pattern = (
        "runs/study/tiny/scratch_cnn-train_images=100-seed=1-*/scratch_cnn/*/config.json"
    )
    deadline = time.monotonic() + 1200  # generous: a busy machine is slow, not wrong
    while not list(root.glob(pattern)) and process.poll() is None:
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("the second point never started")
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    interrupted = (process.wait(timeout=300), *process.communicate())
    rerun = run_study(command)
    return {
        "root": root,
        "script": script,
        "args": args,
        "command": command,
        "interrupted": interrupted,
        "rerun": rerun,
    }


def test_interrupted_study_resumes_its_run_and_completes(tiny_study):
    returncode, _, stderr = tiny_study["interrupted"]
    rerun = tiny_study["rerun"]
    assert returncode == settings.EXIT_INTERRUPTED, stderr
    assert "interrupted at scratch_cnn-train_images=100-seed=1-" in stderr
    assert "Run the same command again" in stderr
    assert rerun.returncode == 0, rerun.stderr
    assert "3 points, 1 finished, 2 to run" in rerun.stdout

    points = point_dirs(tiny_study["root"])
    assert len(points) == 3
    for point in points:
        runs = runs_in(point)
        assert len(runs) == 1, point  # the interrupted run went on, no second one
        assert (runs[0] / "metrics.json").is_file()
        assert attempts(point)[-1]["outcome"] == "finished"
    second = next(p for p in points if "-seed=1-" in p.name)
    first_try, second_try = attempts(second)
    assert first_try["outcome"] == "interrupted"
    assert second_try["resumed"] and second_try["run_dir"] == first_try["run_dir"]
    assert "--resume=" in second_try["command"]
    config = json.loads((runs_in(second)[0] / "config.json").read_text())["config"]
    assert config["TRAIN_IMAGES"] == 100 and config["SEED"] == 1 and config["EPOCHS"] == 1


def test_outputs_say_what_was_measured_with_confidence_intervals(tiny_study):
    """A row per run in the CSV, readable names, the code that made each run; the table's
    interval is mean ± t((1 + INTERVAL) / 2, n - 1)·sd/√n at two levels, here for a
    second metric, test loss (which varies between seeds where accuracy does not)."""
    root, plots = tiny_study["root"], tiny_study["root"] / "plots"
    rows = read_csv(plots / "study_tiny.csv")
    assert sorted(row["seed"] for row in rows) == ["0", "1", "2"]
    for row in rows:
        assert row["model"] == "CNN from scratch" and row["training images"] == "100"
        metrics = json.loads(
            (root / "runs/study/tiny" / row["run"] / "metrics.json").read_text()
        )
        assert float(row["test accuracy"]) == metrics["test_accuracy"]
        assert float(row["wall seconds"]) > 0 and len(row["code"]) == 8
        assert row["point"].endswith(f"-code={row['code']}")

    table = (plots / "study_tiny.md").read_text()
    assert "| model | training images | n | mean test accuracy | sd | 95% CI |" in table
    assert "Reproduce: `python study.py " in table and "--study=tiny" in table
    assert str(root) not in table and "_dir=" not in table  # no paths of this machine
    assert "- data: cifar-10-batches-py" in table
    given = (
        "- settings given to every run: --epochs=1 --steps_per_epoch=1 --batch_size=16;"
    )
    assert given in table
    assert (plots / "study_tiny.png").read_bytes().startswith(b"\x89PNG")
    assert "- code: hash of the script and modules it imports" in table

    for level, folder in ((0.95, "plots-two"), (0.9, "plots-90")):
        other = root / folder
        result = run_study(
            [
                *tiny_study["command"],
                "--metric=test_accuracy,test_loss",
                f"--plots_dir={other}",
                f"--interval={level}",
            ]
        )
        assert result.returncode == 0, result.stderr
        assert "3 points, 3 finished, 0 to run" in result.stdout
        losses = [float(row["test loss"]) for row in read_csv(other / "study_tiny.csv")]
        mean, sd = statistics.mean(losses), statistics.stdev(losses)
        assert sd > 0
        t = level * math.sqrt(2 / (1 - level**2))  # Student's t, 2 degrees of freedom
        half = t * sd / math.sqrt(3)
        cells = f"| {mean:.4f} | {sd:.4f} | {mean - half:.4f} to {mean + half:.4f} |"
        table = (other / "study_tiny.md").read_text()
        assert cells in table and f"| sd | {level:.0%} CI |" in table
        assert f"and the {level:.0%} confidence interval of the mean" in table
        png = (other / "study_tiny.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_figure_names_its_axes_lines_and_error_bars(tiny_study):
    args = [str(tiny_study["script"]), "--sweep=train_images:100", *tiny_study["args"]]
    parsed = study.parse_command_line(args)
    points = study.make_points(parsed)
    runs, summary = study.tables(parsed, points)
    figure = study.draw(parsed, runs, summary)
    axes = figure.axes[0]
    assert axes.get_xlabel() == "training images"
    assert axes.get_ylabel() == "test accuracy"
    assert [text.get_text() for text in axes.get_legend().get_texts()] == [
        "CNN from scratch (n=3)"
    ]
    words = " ".join(text.get_text() for text in figure.texts)
    assert "error bars: 95% confidence interval of the mean (Student's t)" in words
    assert "python study.py" in words and "Data: cifar-10-batches-py" in words


def test_rerun_of_a_finished_study_runs_nothing(tiny_study):
    root = tiny_study["root"]
    before = {point: attempts(point) for point in point_dirs(root)}
    result = run_study(tiny_study["command"])
    assert result.returncode == 0, result.stderr
    assert "3 points, 3 finished, 0 to run" in result.stdout
    assert {point: attempts(point) for point in point_dirs(root)} == before


def test_report_of_an_exporting_study_skips_runs_not_exported_yet(tiny_study, tmp_path):
    """With --export a point is done once export.py has measured it: a report written
    while another point trains or exports shows the exported runs and fails on none."""
    shutil.copytree(tiny_study["root"] / "runs", tmp_path / "runs")
    exported = runs_in(point_dirs(tmp_path)[0])[0] / "export"
    exported.mkdir()
    (exported / "export.json").write_text('{"int8_ms_one_thread": 1.5}')
    args = [
        a for a in tiny_study["command"] if not a.startswith(("--out_dir", "--plots"))
    ]
    args += [f"--out_dir={tmp_path / 'runs'}", f"--plots_dir={tmp_path / 'plots'}"]
    metric = "--metric=test_accuracy,int8_ms_one_thread"
    result = run_study([*args, "--export", metric, "--report"], timeout=120)
    assert result.returncode == 0, result.stderr
    assert "(1 of 3 runs finished)" in result.stdout
    rows = read_csv(tmp_path / "plots" / "study_tiny.csv")
    assert [row["int8 ms per image (1 thread)"] for row in rows] == ["1.5"]


def test_a_study_name_with_a_dot_names_its_own_outputs(tiny_study, tmp_path):
    """--study=tiny.v2 writes study_tiny.v2.*, never over another study's study_tiny.*."""
    shutil.copytree(
        tiny_study["root"] / "runs/study/tiny", tmp_path / "runs/study/tiny.v2"
    )
    args = [
        a for a in tiny_study["command"] if not a.startswith(("--out_dir", "--plots"))
    ]
    args = [a.replace("--study=tiny", "--study=tiny.v2") for a in args]
    args += [f"--out_dir={tmp_path / 'runs'}", f"--plots_dir={tmp_path / 'plots'}"]
    result = run_study([*args, "--report"], timeout=120)
    assert result.returncode == 0, result.stderr
    written = sorted(path.name for path in (tmp_path / "plots").iterdir())
    assert written == [f"study_tiny.v2.{kind}" for kind in ("csv", "md", "png")]
    assert len(read_csv(tmp_path / "plots" / "study_tiny.v2.csv")) == 3


def test_claimed_points_are_skipped_and_dead_claims_taken_over(tiny_study):
    """A wider sweep adds points; --dry_run lists them with an estimate; --commands
    prints one line per unfinished point; --report writes the outputs of the finished
    ones and runs nothing; a point another process holds is skipped,
    and is free again once that process is killed; then a --commands line runs its
    point and updates the study's outputs."""
    root, script = tiny_study["root"], str(tiny_study["script"])
    args = [script, "--sweep=train_images:100,200", *tiny_study["args"]]
    listing = run_study([*args, "--dry_run"])
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert sum("finished  test accuracy" in line for line in lines) == 3
    assert sum(line.endswith("to run") for line in lines) == 3
    assert "ESTIMATE (from 3 finished points, not a measurement)" in lines[-1]
    assert "for 3 of 3 unfinished points" in lines[-1]

    commands = run_study([*args, "--commands"]).stdout.splitlines()
    assert len(commands) == 3
    assert all(
        "train_images=200" in line and "--dry_run" not in line for line in commands
    )
    point_id = shlex.split(commands[0])[-1].split("=", 1)[1]
    point_dir = root / "runs/study/tiny" / point_id
    report = run_study([*args, "--report", f"--plots_dir={root / 'plots-report'}"])
    assert report.returncode == 0 and "(3 of 6 runs finished)" in report.stdout
    assert len(read_csv(root / "plots-report/study_tiny.csv")) == 3
    assert not point_dir.exists()  # --report runs nothing

    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time, study; fd, _ = study.claim_point(sys.argv[1]); "
         "print('held', flush=True); time.sleep(120)", str(point_dir)],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        fd, who = study.claim_point(point_dir)
        assert fd is None and f"pid {holder.pid} " in who
        result = subprocess.run(
            shlex.split(commands[0]), cwd=REPO, env=ENV, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr
        assert f"skipped, claimed by pid {holder.pid} " in result.stdout
        assert runs_in(point_dir) == [] and attempts(point_dir) == []
        listing = run_study([*args, "--dry_run"]).stdout
        assert f"running   claimed by pid {holder.pid} " in listing
    finally:
        holder.kill()
        holder.wait()
    fd, who = study.claim_point(point_dir)  # the holder died: its claim went with it
    assert fd is not None and who is None
    assert study.claim_point(point_dir) == (None, who_line(point_dir))
    assert study.claim_point(point_dir, take=False) == (None, who_line(point_dir))
    os.close(fd)
    assert study.claim_point(point_dir, take=False) == (None, None)

    # A --commands line runs its point and rewrites the study's outputs from every
    # finished point, so points run apart (or in parallel) still make one figure.
    result = subprocess.run(
        shlex.split(commands[0]), cwd=REPO, env=ENV, capture_output=True, text=True,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert len(runs_in(point_dir)) == 1 and "(4 of 6 runs finished)" in result.stdout
    rows = read_csv(root / "plots" / "study_tiny.csv")
    assert sorted(row["training images"] for row in rows) == ["100"] * 3 + ["200"]


def who_line(point_dir):
    return (point_dir / "claim.lock").read_text().strip()


def test_changed_code_makes_finished_points_run_again(tiny_study):
    """After a change to a module the script imports, the finished points are not
    reused: each becomes a new point (its code hash in its name), to run."""
    data = tiny_study["script"].parent / "data.py"
    names = {path.name for path in study.code_files(tiny_study["script"])}
    assert {"scratch_cnn.py", "settings.py", "training.py", "data.py"} <= names
    source = data.read_text()
    args = [str(tiny_study["script"]), "--sweep=train_images:100", *tiny_study["args"]]
    try:
        data.write_text(source + "\n# a change\n")
        listing = run_study([*args, "--dry_run"])
        commands = run_study([*args, "--commands"]).stdout.splitlines()
    finally:
        data.write_text(source)
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert sum(line.endswith("to run (finished with other code)") for line in lines) == 3
    assert "0 finished, 3 to run (3 with other code, rerun)" in listing.stdout
    old = [
        path.name for path in point_dirs(tiny_study["root"]) if "images=100-" in path.name
    ]
    old = {tuple(point.rsplit("-code=", 1)) for point in old}
    new = [shlex.split(line)[-1].split("=", 1)[1] for line in commands]
    new = {tuple(point.rsplit("-code=", 1)) for point in new}
    assert len(new) == 3 and {key for key, _ in new} == {key for key, _ in old}
    assert {code for _, code in new}.isdisjoint(code for _, code in old)
    unchanged = run_study([*args, "--dry_run"]).stdout  # the same code again: all done
    assert "3 finished, 0 to run" in unchanged


def test_failing_point_is_recorded_and_the_study_goes_on(tiny_study):
    root = tiny_study["root"]
    args = [str(tiny_study["script"]), "--sweep=train_images:-5,100", "--seeds=0"]
    result = run_study([*args, *tiny_study["args"]])
    assert result.returncode == study.EXIT_FAILED
    failed = [line for line in result.stderr.splitlines() if line.startswith("study.py:")]
    assert "1 of 2 points failed: scratch_cnn-train_images=-5-seed=0-" in failed[-1]
    assert "--train_images must be 0 (all) or positive" in failed[0]
    # train_images=100, seed 0 is a finished point of the earlier sweep: not rerun.
    assert "2 points, 1 finished, 1 to run" in result.stdout
    point = next(p for p in point_dirs(root) if "train_images=-5" in p.name)
    (attempt,) = attempts(point)
    assert attempt["outcome"] == "failed" and attempt["returncode"] == 2
    assert "--train_images must be 0 (all) or positive" in attempt["error"]
    table = (root / "plots" / "study_tiny.md").read_text()
    assert f"- `{point.name}`: failed: " in table


def test_presets_name_models_and_give_small_sets_a_fair_budget(tmp_path):
    """data_efficiency: weights swept only where the script has them (scratch one line,
    MobileNetV2 two), models named for readers, and below MIN_STEP_IMAGES as many
    images an epoch as that many (less the validation share) would give, counted in
    the batches the run really uses (an eighth of a small set), not in BATCH_SIZE."""
    out = f"--out_dir={tmp_path}"
    listing = run_study(["data_efficiency", "--dry_run", out], timeout=60)
    assert listing.returncode == 0, listing.stderr
    lines = [line for line in listing.stdout.splitlines() if line.startswith("  ")]
    assert len(lines) == 6 * 3 * 3  # sizes x (scratch + two starts) x seeds
    for model in ("CNN from scratch", "ImageNet weights", "random start"):
        assert sum(model in line for line in lines) == 18
    assert "ESTIMATE: cannot estimate yet: no finished point to time" in listing.stdout
    train = 5000 - math.ceil(0.1 * 5000)
    for script, model in (
        ("scratch_cnn.py", "CNN from"),
        ("transfer_mobilenetv2.py", "ImageNet"),
    ):
        batch = settings.read_script(REPO / script).settings["BATCH_SIZE"].default
        batch = min(batch, (250 - math.ceil(0.1 * 250)) // 8)  # 28 of 225 images
        steps = math.ceil(train / batch)
        small = [line for line in lines if model in line and "images 250," in line]
        assert len(small) == 3 and all(
            f"steps per epoch {steps}," in line for line in small
        )
        large = [line for line in lines if model in line and "images all," in line]
        assert len(large) == 3 and not any("steps per epoch" in line for line in large)
    budget = study.fair_budget
    run = {"TRAIN_IMAGES": 250, "VAL_FRACTION": 0.2, "BATCH_SIZE": 100}
    assert budget(run, {"MIN_STEP_IMAGES": 1000}) == {"STEPS_PER_EPOCH": 32}  # 800 / 25
    assert budget(run | {"BATCH_SIZE": 10}, {"MIN_STEP_IMAGES": 1000}) == {
        "STEPS_PER_EPOCH": 80
    }
    assert budget(run | {"TRAIN_IMAGES": 1000}, {"MIN_STEP_IMAGES": 1000}) == {}
    assert budget(run | {"TRAIN_IMAGES": 0}, {"MIN_STEP_IMAGES": 1000}) == {}
    # A setting given on the command line wins over the budget.
    points = study.make_points(
        study.parse_command_line(["data_efficiency", "--steps_per_epoch=2"])
    )
    assert len(points) == 54
    assert all(point["settings"]["STEPS_PER_EPOCH"] == 2 for point in points)

    sweep = [
        "transfer_mobilenetv2.py",
        "--sweep",
        "weights:none,imagenet",
        "--seeds",
        "0",
    ]
    listing = run_study([*sweep, "--dry_run", out], timeout=60)
    assert "  MobileNetV2, random start, seed 0 " in listing.stdout
    assert "  MobileNetV2, ImageNet weights, seed 0 " in listing.stdout
    sweep = ["transfer_mobilenetv2.py", "--sweep=weights:none,imagenet", "--seeds=0"]
    same = run_study([*sweep, "--dry_run", out], timeout=60)
    assert same.stdout == listing.stdout


def test_a_presets_fixed_settings_yield_to_the_command_line():
    """data_efficiency fixes MobileNetV2's ALPHA at 0.35: --alpha=1.0 replaces it in its
    runs, their names and the settings the outputs state, and reaches no other script;
    a preset's study settings (width_and_size's METRIC) yield the same way."""
    preset = study.make_points(study.parse_command_line(["data_efficiency"]))
    given = study.parse_command_line(["data_efficiency", "--alpha=1.0"])
    points = study.make_points(given)
    assert len(points) == len(preset) == 54
    for before, after in zip(preset, points):
        if after["script"].name == "scratch_cnn.py":
            assert "ALPHA" not in after["settings"] and after["id"] == before["id"]
            continue
        assert before["settings"]["ALPHA"] == 0.35 and after["settings"]["ALPHA"] == 1.0
        assert after["config"]["ALPHA"] == 1.0 and after["id"] != before["id"]
        assert "(alpha 0.35)" in before["title"] and "alpha" not in after["title"]
    assert "--alpha=1.0" in given["flags"] and "0.35" not in given["flags"]
    metric = study.parse_command_line(["width_and_size", "--metric=test_loss"])
    assert metric["metrics"] == ["test_loss"] and metric["config"]["EXPORT"] is True
    # Models evaluated alike: the scratch CNN's default test is 6 views, MobileNetV2's
    # one, so data_efficiency compares the one view every run records.
    assert study.parse_command_line(["data_efficiency"])["metrics"] == [
        "test_accuracy_tta_none"
    ]
    assert study.label("test_accuracy_tta_none") == "test accuracy, one view"


def test_metric_may_come_from_export_json(tmp_path):
    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    (run / "metrics.json").write_text('{"test_accuracy": 0.5, "tta": "none"}')
    (run / "export" / "export.json").write_text(
        '{"int8_ms_one_thread": 1.5, "test_accuracy": 0.1, "int8_test_accuracy": 0.49}'
    )
    found = study.read_metrics(run)
    assert found == {
        "test_accuracy": 0.5,
        "int8_ms_one_thread": 1.5,
        "int8_test_accuracy": 0.49,
    }
    assert study.label("int8_ms_one_thread") == "int8 ms per image (1 thread)"
    assert study.label("best_val_accuracy") == "best validation accuracy"
    assert study.label("TRAIN_IMAGES") == "training images"


def test_help_has_the_shared_format_and_the_presets():
    result = run_study(["--help"], timeout=60)
    assert result.returncode == 0
    assert result.stdout.startswith("usage: python study.py PRESET | SCRIPT...")
    assert "settings (the config block of study.py" in result.stdout
    assert "  --seeds=" in result.stdout and "\\" not in result.stdout
    assert "presets (the question each answers):" in result.stdout
    for name, preset in study.PRESETS.items():
        assert f"  {name:<16} {preset.__doc__}" in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["data_efficiencyy"], "unknown preset or script 'data_efficiencyy'"),
        (
            ["evaluate.py", "--sweep=batch_size:1,2"],
            "evaluate.py is not a training script",
        ),
        (
            ["scratch_cnn.py", "--sweep=train_imagez:1,2"],
            "unknown setting --train_imagez in --sweep; did you mean --train_images",
        ),
        (
            ["scratch_cnn.py", "--sweep", "train_images:100,1e3"],
            "--train_images takes an int",
        ),
        (
            ["scratch_cnn.py", "--sweep=batch_size:"],
            "--sweep=batch_size: empty value list",
        ),
        (["scratch_cnn.py"], "nothing to sweep"),
        (
            ["scratch_cnn.py", "train_images:1,2"],
            "unknown preset or script 'train_images:1,2'",
        ),
        (
            ["data_efficiency", "--epochz=3"],
            "unknown setting --epochz; did you mean --epochs",
        ),
        (["data_efficiency", "--epochs", "many"], "--epochs takes an int"),
        (["data_efficiency", "--seeds="], "--seeds takes integers"),
        (["data_efficiency", "--sweep=epochs:1,2"], "a preset has its own sweep"),
        (["data_efficiency", "--train_images=5"], "--train_images: swept in this study"),
        (["freeze_depth", "--seed=1"], "--seed is the study's to set"),
        (["freeze_depth", "--interval=95"], "--interval must lie in (0, 1)"),
    ],
)
def test_bad_command_line_exits_2_in_one_line_before_any_run(tmp_path, args, message):
    result = run_study([*args, f"--out_dir={tmp_path / 'runs'}"], timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert not (tmp_path / "runs").exists()
