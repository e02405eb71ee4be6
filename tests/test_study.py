"""study.py end to end: a tiny sweep of scratch_cnn.py on the session's small data,
interrupted and resumed, rerun, extended, with a failing point, claimed points and
bad command lines."""

import csv
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
from conftest import OFFLINE_ENV, REPO

import study

TINY = [
    "--epochs=1",
    "--steps_per_epoch=1",
    "--width=8",
    "--batch_size=32",
    "--verbose=0",
]
SWEEP = ["scratch_cnn.py", "--sweep=train_images:100,200", "--seeds=0,1", "--study=tiny"]
ENV = {**os.environ, **OFFLINE_ENV}


def study_args(root, cifar_dir, *args):
    return [
        *args,
        f"--data_dir={cifar_dir}",
        *TINY,
        f"--out_dir={root / 'runs'}",
        f"--plots_dir={root / 'plots'}",
    ]


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
    return sorted(
        path for path in (root / "runs" / "study" / "tiny").iterdir() if path.is_dir()
    )


def attempts(point_dir):
    path = point_dir / "attempts.jsonl"
    return (
        [json.loads(line) for line in path.read_text().splitlines()]
        if path.is_file()
        else []
    )


def runs_in(point_dir):
    return sorted(path.parent for path in point_dir.glob("scratch_cnn/*/config.json"))


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory, cifar_dir):
    """The 4-point study, interrupted (Ctrl-C) while its second point trains, then
    run again to the end. Returns (root, args, interrupted process, the rerun)."""
    root = tmp_path_factory.mktemp("study")
    args = study_args(root, cifar_dir, *SWEEP)
    process = subprocess.Popen(
        [sys.executable, str(REPO / "study.py"), *args],
        cwd=REPO,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Points run seed by seed: the second is train_images=200, seed 0. Its run
    # folder appears once its data and model are ready, just before training.
    pattern = (
        "runs/study/tiny/scratch_cnn-train_images=200-seed=0-*/scratch_cnn/*/config.json"
    )
    deadline = time.monotonic() + 1200  # generous: a busy machine is slow, not wrong
    while not list(root.glob(pattern)) and process.poll() is None:
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("the second point never started")
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    interrupted = process.communicate(timeout=300)
    interrupted = (process.returncode, *interrupted)
    rerun = run_study(args)
    return root, args, interrupted, rerun


def test_interrupted_study_resumes_its_run_and_completes(tiny_study):
    root, args, (returncode, stdout, stderr), rerun = tiny_study
    assert returncode == study.EXIT_INTERRUPTED, stderr
    assert "interrupted at scratch_cnn-train_images=200-seed=0" in stderr
    assert "Run the same command again" in stderr
    assert rerun.returncode == 0, rerun.stderr
    assert "4 points, 1 finished, 3 to run" in rerun.stdout

    points = point_dirs(root)
    assert len(points) == 4
    for point in points:
        runs = runs_in(point)
        assert len(runs) == 1, point  # the interrupted run went on, no second one
        assert (runs[0] / "metrics.json").is_file()
        assert attempts(point)[-1]["outcome"] == "finished"
    second = next(p for p in points if "train_images=200-seed=0" in p.name)
    first_try, second_try = attempts(second)
    assert first_try["outcome"] == "interrupted"
    assert second_try["resumed"] and second_try["run_dir"] == first_try["run_dir"]
    assert "--resume=" in second_try["command"]
    config = json.loads((runs_in(second)[0] / "config.json").read_text())["config"]
    assert config["TRAIN_IMAGES"] == 200 and config["SEED"] == 0 and config["EPOCHS"] == 1


def test_outputs_have_every_run_and_the_spread_over_seeds(tiny_study):
    root = tiny_study[0]
    with open(root / "plots" / "study_tiny.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert sorted((row["train_images"], row["seed"]) for row in rows) == [
        ("100", "0"), ("100", "1"), ("200", "0"), ("200", "1"),
    ]  # fmt: skip
    for row in rows:
        metrics = json.loads((root / row["run_dir"] / "metrics.json").read_text())
        assert float(row["test_accuracy"]) == metrics["test_accuracy"]
        assert float(row["wall_seconds"]) > 0

    table = (root / "plots" / "study_tiny.md").read_text()
    for images in ("100", "200"):
        values = [float(r["test_accuracy"]) for r in rows if r["train_images"] == images]
        mean, std = sum(values) / 2, abs(values[0] - values[1]) / 2**0.5
        assert f"| scratch_cnn | {images} | 2 | {mean:.4f} | {std:.4f} |" in table
    assert "epochs=1, steps_per_epoch=1, width=8, batch_size=32" in table

    png = (root / "plots" / "study_tiny.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_rerun_of_a_finished_study_runs_nothing(tiny_study):
    root, args = tiny_study[:2]
    before = {point: attempts(point) for point in point_dirs(root)}
    result = run_study(args)
    assert result.returncode == 0, result.stderr
    assert "4 points, 4 finished, 0 to run" in result.stdout
    assert {point: attempts(point) for point in point_dirs(root)} == before


def test_claimed_points_are_skipped_and_dead_claims_taken_over(tiny_study, cifar_dir):
    """A wider sweep adds points; --dry_run lists them with an estimate; --commands
    prints one line per unfinished point; a point another process holds is skipped,
    and is free again once that process is killed."""
    root = tiny_study[0]
    args = study_args(
        root, cifar_dir, "scratch_cnn.py", "--sweep=train_images:100,200,300",
        "--seeds=0,1", "--study=tiny",
    )  # fmt: skip
    listing = run_study([*args, "--dry_run"])
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert sum("finished  test_accuracy" in line for line in lines) == 4
    assert sum(line.endswith("to run") for line in lines) == 2
    assert "ESTIMATE (from 4 finished runs" in lines[-1]
    assert "for 2 of 2 unfinished points" in lines[-1]

    commands = run_study([*args, "--commands"]).stdout.splitlines()
    assert len(commands) == 2
    assert all(
        "train_images=300" in line and "--dry_run" not in line for line in commands
    )
    point_id = shlex.split(commands[0])[-1].split("=", 1)[1]
    point_dir = root / "runs" / "study" / "tiny" / point_id

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
    os.close(fd)


def who_line(point_dir):
    return (point_dir / "claim.lock").read_text().strip()


def test_failing_point_is_recorded_and_the_study_goes_on(tiny_study, cifar_dir):
    root = tiny_study[0]
    args = study_args(
        root, cifar_dir, "scratch_cnn.py", "--sweep=train_images:-5,100", "--seeds=0",
        "--study=tiny",
    )  # fmt: skip
    result = run_study(args)
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
            "unknown setting --sweep=train_imagez",
        ),
        (["scratch_cnn.py", "--sweep=train_images:100,1e3"], "--train_images takes an int"),
        (["scratch_cnn.py", "--sweep=optimizer:"], "--sweep=optimizer: empty value list"),
        (["scratch_cnn.py"], "nothing to sweep"),
        (["data_efficiency", "--epochz=3"], "unknown setting --epochz"),
        (["data_efficiency", "--epochs=many"], "--epochs takes an int"),
        (["data_efficiency", "--seeds="], "--seeds takes integers"),
        (["freeze_depth", "--seed=1"], "--seed is the study's to set"),
    ],
)
def test_bad_command_line_exits_2_in_one_line_before_any_run(tmp_path, args, message):
    result = run_study([*args, f"--out_dir={tmp_path / 'runs'}"], timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert not (tmp_path / "runs").exists()
