"""bench.py end to end: `--quick` runs, prints the table and writes bench.json with
every row measured, each case's peak memory from a process of its own, precision and
XLA timed; a case past the memory limit is stopped, not left to exhaust the machine.
No timing is asserted: bench.py measures speed, tests check that it does."""

import json
import math

import pytest
from conftest import own_stderr_lines, run_script

import bench
import settings

MODELS = ("scratch_cnn", "transfer_mobilenetv2", "random_start")
NAIVE = ("scratch_cnn", "transfer_mobilenetv2")
ROW_IDS = {
    "pipeline_32px",
    "pipeline_96px",
    *(
        f"{measure}_{model}"
        for model in MODELS
        for measure in ("compute", "end_to_end", "end_to_end_share", "peak_memory")
    ),
    *(
        f"{measure}_{model}"
        for model in NAIVE
        for measure in ("naive_rate", "naive_peak_memory", "speedup", "memory_saving")
    ),
}
QUICK_ROW_IDS = ROW_IDS | {"mixed_precision_scratch_cnn", "xla_scratch_cnn"}
QUICK_CASES = (
    {f"streaming:{model}" for model in MODELS}
    | {f"naive:{model}" for model in NAIVE}
    | {"precision:scratch_cnn"}
)
TARGETED = {
    "end_to_end_scratch_cnn",
    *(f"end_to_end_share_{model}" for model in MODELS),
    "peak_memory_transfer_mobilenetv2",
    "speedup_transfer_mobilenetv2",
    "memory_saving_transfer_mobilenetv2",
}


@pytest.fixture(scope="module")
def quick_bench(tmp_path_factory):
    """`python bench.py --quick` run from an empty folder: (result, folder, bench.json)."""
    folder = tmp_path_factory.mktemp("bench")
    result = run_script("bench.py", "--quick", cwd=folder, timeout=600)
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
    assert len(table_lines) == 2 + len(QUICK_ROW_IDS)  # header, rule, rows
    assert report["command"] == "python bench.py --quick"
    assert report["quick"] is True and report["config"]["QUICK"] is True
    assert report["table"] in result.stdout
    machine = report["machine"]
    assert machine["cpu"] and machine["cores"] > 0 and machine["tensorflow"]
    # The machine's bfloat16 units, as the CPU reports them, are named in the heading.
    flags = settings.cpu_flags() & {"amx_bf16", "avx512_bf16"}
    assert machine["bfloat16_units"] == sorted(flags)
    assert f"bfloat16 units: {', '.join(sorted(flags)) or 'none'}" in result.stdout
    assert "GPU: none" in result.stdout or machine["gpus"]


def test_every_row_is_measured_with_a_positive_number(quick_bench):
    _, _, report = quick_bench
    rows = {row["id"]: row for row in report["rows"]}
    assert set(rows) == QUICK_ROW_IDS
    for name, row in rows.items():
        assert isinstance(row["value"], float), name
        assert math.isfinite(row["value"]) and row["value"] > 0, name
    assert {name for name, row in rows.items() if row["target"]} == TARGETED
    # --quick measures tiny sets: it judges no target.
    assert all(row["status"] == "" for row in rows.values())
    assert [row["step"] for row in report["rows"]] == sorted(
        row["step"] for row in report["rows"]
    )
    # Models are named as the other tools name them.
    assert rows["compute_scratch_cnn"]["model"] == "CNN from scratch"
    assert (
        rows["compute_transfer_mobilenetv2"]["model"] == "MobileNetV2, ImageNet weights"
    )
    assert rows["compute_random_start"]["model"] == "MobileNetV2, random start"


def test_precision_and_xla_rows_are_present_and_positive(quick_bench):
    """Float32 against mixed precision (bfloat16 on a CPU) and XLA off against on, each
    a model of its own timed in one child process; the rows are their rate ratios."""
    _, _, report = quick_bench
    rows = {row["id"]: row for row in report["rows"]}
    case = report["cases"]["precision:scratch_cnn"]
    policy = "mixed_float16" if report["machine"]["gpus"] else "mixed_bfloat16"
    assert case["mixed_policy"] == policy
    for name in ("float32", "mixed", "xla"):
        assert case[name]["images_per_second"] > 0, name
    mixed, xla = rows["mixed_precision_scratch_cnn"], rows["xla_scratch_cnn"]
    assert policy in mixed["measure"] and "XLA" in xla["measure"]
    assert mixed["step"] == xla["step"] == 6 and mixed["unit"] == xla["unit"] == "x"
    rate = case["mixed"]["images_per_second"] / case["float32"]["images_per_second"]
    assert mixed["value"] == pytest.approx(rate) and mixed["value"] > 0
    assert xla["value"] > 0


def test_peak_memory_comes_from_one_child_process_per_case(quick_bench):
    _, _, report = quick_bench
    cases = report["cases"]
    assert set(cases) == QUICK_CASES
    for name, case in cases.items():
        # Reported by the child itself, which ran this case and nothing else.
        assert case["case"] == name
        assert case["stopped_at_limit"] is False
        assert case["peak_rss_bytes"] > 100e6, name
        assert case["images"] == report["sizes"]["images"] == bench.QUICK_IMAGES
    rows = {row["id"]: row for row in report["rows"]}
    for model in MODELS:
        ours = cases[f"streaming:{model}"]
        assert rows[f"peak_memory_{model}"]["value"] == ours["peak_rss_bytes"] / 1e9
    for model in NAIVE:
        ours, naive = cases[f"streaming:{model}"], cases[f"naive:{model}"]
        assert (
            rows[f"naive_peak_memory_{model}"]["value"] == naive["peak_rss_bytes"] / 1e9
        )
        assert ours["peak_rss_bytes"] != naive["peak_rss_bytes"]
    # The naive way holds the set as float32 at 96 px (and Keras's copy of it); ours
    # holds uint8 at 32 px.
    naive = cases["naive:transfer_mobilenetv2"]
    assert naive["array_bytes"] == bench.QUICK_IMAGES * 96 * 96 * 3 * 4
    assert (
        naive["peak_rss_bytes"]
        > cases["streaming:transfer_mobilenetv2"]["peak_rss_bytes"]
    )
    # The random start trains what fine-tuning keeps frozen: the first layers and
    # BatchNorm's scale and shift; only BatchNorm's moving statistics stay out.
    random_start = cases["streaming:random_start"]
    fine_tuning = cases["streaming:transfer_mobilenetv2"]
    assert random_start["params"] == fine_tuning["params"]
    assert random_start["trainable_params"] > fine_tuning["trainable_params"]
    moving_statistics = random_start["params"] - random_start["trainable_params"]
    assert 0 < moving_statistics < 0.02 * random_start["params"]


def test_a_case_past_the_memory_limit_is_stopped(quick_bench):
    """A real child stopped at 0.3 GB, less than TensorFlow takes to start; in the
    table, its rate is not measured and its peak is a lower bound."""
    _, _, report = quick_bench
    config = {**bench.CONFIG, "QUICK": True, "MEMORY_LIMIT_GB": 0.3}
    stopped = bench.run_children(["naive:transfer_mobilenetv2"], config, 1)
    case = stopped["naive:transfer_mobilenetv2"]
    assert case["stopped_at_limit"] is True and case["peak_rss_bytes"] > 0.3e9
    cases = {**report["cases"], **stopped}
    rows = {
        row["id"]: row
        for row in bench.make_rows(report["config"], report["sizes"], cases)
    }
    assert rows["naive_rate_transfer_mobilenetv2"]["value"] is None
    assert rows["speedup_transfer_mobilenetv2"]["value"] is None
    peak = rows["naive_peak_memory_transfer_mobilenetv2"]
    assert "at least" in peak["measure"] and peak["lower_bound"]
    assert peak["value"] == case["peak_rss_bytes"] / 1e9
    assert "not measured" in bench.format_table(list(rows.values()))


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
    assert full["images"] == bench.IMAGES == 50000
    transfer = bench.transfer_mobilenetv2.CONFIG["BATCH_SIZE"]
    assert full["batch_size"] == {
        "scratch_cnn": bench.scratch_cnn.CONFIG["BATCH_SIZE"],
        "transfer_mobilenetv2": transfer,
        "random_start": transfer,
    }
    quick_config = {**bench.CONFIG, "QUICK": True}
    quick = bench.sizes(quick_config)
    assert quick["images"] == bench.QUICK_IMAGES < full["images"]
    assert quick["steps"] == bench.QUICK_STEPS
    # The naive way trains at most one pass over its arrays: the defaults fit it.
    bench.check_config(bench.CONFIG)
    bench.check_config(quick_config)
    with pytest.raises(settings.ConfigError, match="quick_batch_size"):
        bench.check_config({**quick_config, "QUICK_IMAGES": 16})


def test_models_are_built_with_the_scripts_settings_and_the_bench_alpha():
    config = {**bench.CONFIG, "TRANSFER_ALPHA": 0.35, "SEED": 3}
    fine_tuning = bench.model_config("transfer_mobilenetv2", config)
    random_start = bench.model_config("random_start", config)
    assert fine_tuning["ALPHA"] == random_start["ALPHA"] == 0.35
    assert (fine_tuning["WEIGHTS"], random_start["WEIGHTS"]) == ("imagenet", "none")
    assert fine_tuning["SEED"] == 3
    assert fine_tuning["IMG_SIZE"] == bench.transfer_mobilenetv2.CONFIG["IMG_SIZE"]
    scratch = bench.model_config("scratch_cnn", {**config, "QUICK": True})
    assert scratch["BATCH_SIZE"] == bench.QUICK_BATCH_SIZE
    assert scratch["AUGMENT_FLIP"] == bench.scratch_cnn.CONFIG["AUGMENT_FLIP"]
    assert settings.model_name("transfer_mobilenetv2", random_start) == (
        "MobileNetV2 (alpha 0.35), random start"
    )


def test_rows_judge_full_runs_and_use_the_naive_fallback_rate():
    """A full run whose naive MobileNetV2 case passed the memory limit: its peak is a
    lower bound, its rate comes from the smaller set, and targets are judged."""
    run = bench.sizes(bench.CONFIG)

    def ours(compute, end_to_end, peak_gb, pipeline=5000.0):
        return {
            "stopped_at_limit": False,
            "peak_rss_bytes": peak_gb * 1e9,
            "compute": {"images_per_second": compute},
            "end_to_end": {"images_per_second": end_to_end},
            "pipeline": {"images_per_second": pipeline},
        }

    def precision(float32, mixed, xla=None):
        rates = {"float32": float32, "mixed": mixed, **({"xla": xla} if xla else {})}
        result = {name: {"images_per_second": rate} for name, rate in rates.items()}
        return {"stopped_at_limit": False, "mixed_policy": "mixed_bfloat16", **result}

    cases = {
        "streaming:scratch_cnn": ours(1000.0, 960.0, 1.0, 9000.0),
        "streaming:transfer_mobilenetv2": ours(100.0, 90.0, 2.5),
        # The random start, stopped at the limit: no rates, a peak that is a lower bound.
        "streaming:random_start": {"stopped_at_limit": True, "peak_rss_bytes": 3e9},
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
        "precision:scratch_cnn": precision(400.0, 680.0, 500.0),
        "precision:transfer_mobilenetv2": precision(100.0, 84.0),
        "precision:random_start": precision(90.0, 72.0),
    }
    rows = {row["id"]: row for row in bench.make_rows(bench.CONFIG, run, cases)}
    assert set(rows) == ROW_IDS | {
        *(f"mixed_precision_{model}" for model in MODELS),
        "xla_scratch_cnn",
    }
    assert rows["pipeline_32px"]["value"] == 9000.0
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
    assert rows["end_to_end_random_start"]["value"] is None
    assert rows["end_to_end_share_random_start"]["status"] == "open (not measured)"
    peak = rows["peak_memory_random_start"]
    assert peak["value"] == 3.0 and peak["lower_bound"] and "at least" in peak["measure"]
    assert rows["mixed_precision_scratch_cnn"]["value"] == pytest.approx(1.7)
    assert rows["xla_scratch_cnn"]["value"] == pytest.approx(1.25)
    assert rows["mixed_precision_transfer_mobilenetv2"]["value"] == pytest.approx(0.84)
    assert "mixed_bfloat16 / float32" in rows["mixed_precision_random_start"]["measure"]
    table = bench.format_table(list(rows.values()))
    assert (
        "| 5 | ours / naive, training rate | MobileNetV2, ImageNet weights | 96 |"
        in table
    )
    assert "| 6 | compute only, XLA on / off (float32) | CNN from scratch | 32 |" in table
