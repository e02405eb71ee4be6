"""bench.py end to end: `--quick` runs, prints the table and writes bench.json with
every row measured, each case's peak memory from a process of its own; a case past
the memory limit is stopped, not left to exhaust the machine. No timing is asserted:
bench.py measures speed, tests check that it does."""

import json
import math

import pytest
from conftest import own_stderr_lines, run_script

import bench

ROW_IDS = {
    "pipeline_32px",
    "pipeline_96px",
    *(
        f"{measure}_{script}"
        for script in ("scratch_cnn", "transfer_mobilenetv2")
        for measure in (
            "compute",
            "end_to_end",
            "end_to_end_share",
            "peak_memory",
            "naive_rate",
            "naive_peak_memory",
            "speedup",
            "memory_saving",
        )
    ),
    "compute_random_start_transfer_mobilenetv2",
    "end_to_end_random_start_transfer_mobilenetv2",
    "peak_memory_random_start_transfer_mobilenetv2",
}
CASES = {
    f"{kind}:{script}"
    for kind in ("streaming", "naive")
    for script in ("scratch_cnn", "transfer_mobilenetv2")
} | {"random_start:transfer_mobilenetv2"}
TARGETED = {
    "end_to_end_scratch_cnn",
    "end_to_end_share_scratch_cnn",
    "end_to_end_share_transfer_mobilenetv2",
    "peak_memory_transfer_mobilenetv2",
    "speedup_transfer_mobilenetv2",
    "memory_saving_transfer_mobilenetv2",
}


@pytest.fixture(scope="module")
def quick_bench(tmp_path_factory):
    """`python bench.py --quick` run from an empty folder: (result, folder, bench.json)."""
    folder = tmp_path_factory.mktemp("bench")
    result = run_script("bench.py", "--quick", cwd=folder, timeout=300)
    report = (
        json.loads((folder / "bench.json").read_text())
        if (folder / "bench.json").is_file()
        else None
    )
    return result, folder, report


def test_quick_run_prints_the_table_and_writes_only_bench_json(quick_bench):
    result, folder, report = quick_bench
    assert result.returncode == 0, result.stderr[-3000:]
    assert [path.name for path in folder.iterdir()] == ["bench.json"]
    assert (
        "| # | measure | model | px | batch | result | target | status |" in result.stdout
    )
    table_lines = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert len(table_lines) == 1 + len(ROW_IDS)
    assert report["command"] == "python bench.py --quick"
    assert report["quick"] is True and report["config"]["QUICK"] is True
    assert report["table"] in result.stdout
    machine = report["machine"]
    assert machine["cpu"] and machine["cores"] > 0 and machine["tensorflow"]
    assert "no GPU" in report["gpu"] or machine["gpus"]


def test_every_row_is_measured_with_a_positive_number(quick_bench):
    _, _, report = quick_bench
    rows = {row["id"]: row for row in report["rows"]}
    gpu_rows = {name for name in rows if name.startswith("gpu_")}
    assert set(rows) - gpu_rows == ROW_IDS
    for name, row in rows.items():
        assert isinstance(row["value"], float), name
        assert math.isfinite(row["value"]) and row["value"] > 0, name
    assert {name for name, row in rows.items() if row["target"]} == TARGETED
    # --quick measures tiny sets: it judges no target.
    assert all(row["status"] == "" for row in rows.values())
    assert [row["step"] for row in report["rows"]] == sorted(
        row["step"] for row in report["rows"]
    )


def test_peak_memory_comes_from_one_child_process_per_case(quick_bench):
    _, _, report = quick_bench
    cases = report["cases"]
    assert set(cases) == CASES
    for name, case in cases.items():
        # Reported by the child itself, which ran this case and nothing else.
        assert case["case"] == name
        assert case["stopped_at_limit"] is False
        assert case["peak_rss_bytes"] > 100e6, name
        assert case["images"] == report["sizes"]["images"]
    rows = {row["id"]: row for row in report["rows"]}
    for script in ("scratch_cnn", "transfer_mobilenetv2"):
        ours, naive = cases[f"streaming:{script}"], cases[f"naive:{script}"]
        assert rows[f"peak_memory_{script}"]["value"] == ours["peak_rss_bytes"] / 1e9
        assert (
            rows[f"naive_peak_memory_{script}"]["value"] == naive["peak_rss_bytes"] / 1e9
        )
        assert ours["peak_rss_bytes"] != naive["peak_rss_bytes"]
    # The naive way holds the set as float32 at 96 px (and Keras's copy of it); ours
    # holds uint8 at 32 px.
    naive = cases["naive:transfer_mobilenetv2"]
    assert naive["array_bytes"] == report["sizes"]["images"] * 96 * 96 * 3 * 4
    # The random start trains what fine-tuning keeps frozen: the first layers and
    # BatchNorm's scale and shift; only BatchNorm's moving statistics stay out.
    random_start = cases["random_start:transfer_mobilenetv2"]
    fine_tuning = cases["streaming:transfer_mobilenetv2"]
    assert random_start["params"] == fine_tuning["params"]
    assert random_start["trainable_params"] > fine_tuning["trainable_params"]
    moving_statistics = random_start["params"] - random_start["trainable_params"]
    assert 0 < moving_statistics < 0.02 * random_start["params"]
    assert (
        rows["peak_memory_random_start_transfer_mobilenetv2"]["value"]
        == random_start["peak_rss_bytes"] / 1e9
    )
    assert (
        naive["peak_rss_bytes"]
        > cases["streaming:transfer_mobilenetv2"]["peak_rss_bytes"]
    )


def test_a_case_past_the_memory_limit_is_stopped(tmp_path):
    # 0.3 GB is less than TensorFlow takes to start: every case is stopped early.
    output = tmp_path / "out" / "bench.json"
    result = run_script(
        "bench.py",
        "--quick",
        "--memory_limit_gb=0.3",
        f"--output={output}",
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(output.read_text())
    assert all(case["stopped_at_limit"] for case in report["cases"].values())
    for case in report["cases"].values():
        assert case["peak_rss_bytes"] > 0.3e9
    rows = {row["id"]: row for row in report["rows"]}
    assert rows["naive_rate_transfer_mobilenetv2"]["value"] is None
    assert rows["speedup_transfer_mobilenetv2"]["value"] is None
    assert "at least" in rows["naive_peak_memory_transfer_mobilenetv2"]["measure"]
    assert "not measured" in result.stdout


@pytest.mark.parametrize(
    "flag, message",
    [("--stepz=3", "unknown setting --stepz"), ("--steps=0", "must be positive")],
)
def test_bad_settings_stop_with_exit_2(tmp_path, flag, message):
    result = run_script("bench.py", flag, cwd=tmp_path, timeout=120)
    assert result.returncode == 2
    lines = own_stderr_lines(result.stderr)
    assert len(lines) == 1 and message in lines[0]
    assert not any(tmp_path.iterdir())


def test_targets_are_judged_in_full_runs_only():
    assert bench.judge(0.97, 0.95, True, quick=False) == "met"
    assert bench.judge(2.4, 2.0, False, quick=False) == "open"
    assert bench.judge(None, 3.0, True, quick=False) == "open (not measured)"
    assert bench.judge(0.5, 0.95, True, quick=True) == ""
    assert bench.judge(123.0, None, True, quick=False) == ""
    # A lower bound: at least 9x meets ">= 8x"; at least 5x decides nothing.
    assert bench.judge(9.0, 8.0, True, quick=False, lower_bound=True) == "met"
    assert bench.judge(5.0, 8.0, True, quick=False, lower_bound=True).startswith(
        "open (undecided"
    )
    assert bench.judge(2.5, 2.0, False, quick=False, lower_bound=True) == "open"
    assert bench.format_value(0.953, "%") == "95%"
    assert bench.format_value(18.94, "GB") == "18.94 GB"
    assert bench.format_value(None, "x") == "not measured"


def test_quick_and_full_sizes_come_from_the_config_block():
    full = bench.sizes(bench.CONFIG)
    assert full["images"] == bench.FULL_IMAGES == 50000
    assert full["batch_size"] == {
        "scratch_cnn": bench.scratch_cnn.CONFIG["BATCH_SIZE"],
        "transfer_mobilenetv2": bench.transfer_mobilenetv2.CONFIG["BATCH_SIZE"],
    }
    quick = bench.sizes({**bench.CONFIG, "QUICK": True})
    assert quick["images"] == bench.QUICK_IMAGES < full["images"]
    assert quick["steps"] == bench.QUICK_STEPS
    # The naive way trains at most one pass over its arrays.
    for run in (full, quick):
        assert run["images"] >= max(run["batch_size"].values()) * bench.total_steps(run)


def test_rows_judge_full_runs_and_use_the_naive_fallback_rate():
    """A full run whose naive MobileNetV2 case passed the memory limit: its peak is a
    lower bound, its rate comes from the smaller set, and targets are judged."""
    run = bench.sizes(bench.CONFIG)

    def ours(compute, end_to_end, peak_gb):
        return {
            "stopped_at_limit": False,
            "peak_rss_bytes": peak_gb * 1e9,
            "compute": {"images_per_second": compute},
            "end_to_end": {"images_per_second": end_to_end},
        }

    cases = {
        "streaming:scratch_cnn": ours(1000.0, 960.0, 1.0),
        "streaming:transfer_mobilenetv2": ours(100.0, 90.0, 2.5),
        "naive:scratch_cnn": {
            "stopped_at_limit": False,
            "peak_rss_bytes": 2e9,
            "naive": {"images_per_second": 800.0},
        },
        "naive:transfer_mobilenetv2": {
            "stopped_at_limit": True,
            "peak_rss_bytes": 20e9,
            "fallback": {
                "stopped_at_limit": False,
                "images": 10000,
                "naive": {"images_per_second": 30.0},
            },
        },
        "random_start:transfer_mobilenetv2": {
            "stopped_at_limit": True,
            "peak_rss_bytes": 3e9,
        },
    }
    pipeline = {"scratch_cnn": 9000.0, "transfer_mobilenetv2": 5000.0}
    rows = {
        row["id"]: row for row in bench.make_rows(bench.CONFIG, run, pipeline, cases, {})
    }
    assert set(rows) == ROW_IDS
    assert rows["end_to_end_scratch_cnn"]["status"] == "met"  # 960 >= 300
    assert rows["end_to_end_share_scratch_cnn"]["status"] == "met"  # 96%
    assert rows["end_to_end_share_transfer_mobilenetv2"]["status"] == "open"  # 90%
    assert rows["peak_memory_transfer_mobilenetv2"]["status"] == "open"  # 2.5 GB
    assert rows["naive_rate_transfer_mobilenetv2"]["value"] == 30.0
    assert "10,000 images" in rows["naive_rate_transfer_mobilenetv2"]["measure"]
    assert rows["speedup_transfer_mobilenetv2"]["value"] == 3.0
    assert rows["speedup_transfer_mobilenetv2"]["status"] == "met"
    assert "at least" in rows["naive_peak_memory_transfer_mobilenetv2"]["measure"]
    assert rows["memory_saving_transfer_mobilenetv2"]["value"] == 8.0
    assert rows["memory_saving_transfer_mobilenetv2"]["status"] == "met"
    assert rows["memory_saving_scratch_cnn"]["status"] == ""  # no target set
    # The random start, stopped at the limit: no rates, a peak that is a lower bound.
    assert rows["end_to_end_random_start_transfer_mobilenetv2"]["value"] is None
    peak = rows["peak_memory_random_start_transfer_mobilenetv2"]
    assert peak["value"] == 3.0 and peak["lower_bound"] and "at least" in peak["measure"]
    assert "| 5 | ours / naive, training rate | MobileNetV2 | 96 |" in bench.format_table(
        list(rows.values())
    )
