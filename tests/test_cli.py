"""The command line as a user meets it: --help from the config block, a bad command
line stopped in one line before TensorFlow loads, TensorFlow's start-up notices
filtered (and shown with --verbose=2), and training on two workers under
MultiWorkerMirroredStrategy."""

import io
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import OFFLINE_ENV, REPO, TINY_RUN, run_script

import bench
import data
import evaluate
import export
import scratch_cnn
import settings
import study
import training
import transfer_mobilenetv2

SCRIPTS = {
    "data.py": data,
    "scratch_cnn.py": scratch_cnn,
    "transfer_mobilenetv2.py": transfer_mobilenetv2,
    "evaluate.py": evaluate,
    "bench.py": bench,
    "export.py": export,
    "study.py": study,
}

# Runs a script as __main__ and reports on stderr, as it exits, whether TensorFlow
# was imported by then.
TRACE_IMPORTS = textwrap.dedent("""
    import atexit, runpy, sys
    def report():
        print("tensorflow imported:", "tensorflow" in sys.modules, file=sys.stderr)
    atexit.register(report)
    sys.argv = sys.argv[1:]
    sys.path.insert(0, sys.argv[0].rpartition("/")[0])
    runpy.run_path(sys.argv[0], run_name="__main__")
    """)


def run_traced(script, *args, env=None):
    """(result, tensorflow imported?) for `python script args...`."""
    result = subprocess.run(
        [sys.executable, "-c", TRACE_IMPORTS, str(REPO / script), *args],
        cwd=REPO,
        env={**os.environ, **OFFLINE_ENV, **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )
    *stderr, trace = result.stderr.splitlines() or [""]
    assert trace.startswith("tensorflow imported: "), result.stderr
    return result, "\n".join(stderr), trace.endswith("True")


def block_comments(module):
    """{NAME: comment} of a script's config block, read line by line from its source:
    the text after '# ' from the NAME line to the line that closes its value."""
    lines = Path(module.__file__).read_text().splitlines()
    comments = {}
    for name in module.CONFIG:
        start = next(i for i, line in enumerate(lines) if line.startswith(f"{name} = "))
        end, depth = start, 0
        while True:
            code = lines[end].split("  #")[0]
            depth += code.count("(") - code.count(")")
            if depth <= 0:
                break
            end += 1
        comments[name] = " ".join(
            line.split("# ", 1)[1].strip()
            for line in lines[start : end + 1]
            if "# " in line
        )
    return comments


# ---------------------------------------------------------------------------------
# --help


@pytest.fixture(scope="module")
def helps():
    """Each script's --help, run side by side: (result, stderr, imported TF?)."""
    with ThreadPoolExecutor(len(SCRIPTS)) as pool:
        futures = {
            script: pool.submit(run_traced, script, "--help" if i % 2 else "-h")
            for i, script in enumerate(SCRIPTS)
        }
        return {script: future.result() for script, future in futures.items()}


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_every_setting_with_its_default_and_comment(script, helps):
    result, stderr, imported_tensorflow = helps[script]
    assert result.returncode == 0 and stderr == "", stderr
    assert not imported_tensorflow
    module = SCRIPTS[script]
    out = result.stdout
    # The docstring's purpose and its usage lines come first, each example command
    # on a line of its own, as the docstring has it.
    assert module.__doc__.splitlines()[0] in out
    examples = [line for line in out.splitlines() if line.startswith("    python ")]
    assert examples and all(line.count("python ") == 1 for line in examples)
    assert all(line in module.__doc__.splitlines() for line in examples)
    comments = block_comments(module)
    help_lines = out.splitlines()
    for name, default in module.CONFIG.items():
        flag = f"--{name.lower()}="
        shown = f'"{default}"' if isinstance(default, str) else repr(default)
        at = next(i for i, line in enumerate(help_lines) if line.strip().startswith(flag))
        # The comment sits on the flag's line, or on the next when the flag is long.
        text = " ".join(help_lines[at : at + 2])
        assert f"{flag}{shown}" in help_lines[at], name
        assert comments[name] and comments[name] in text, name
    assert len([line for line in help_lines if line.startswith("  --")]) == len(
        module.CONFIG
    )


def test_a_setting_added_to_a_block_is_in_the_help_with_no_other_edit(tmp_path):
    (tmp_path / "other.py").write_text("BATCH_SIZE = 64  # images per step\n")
    script = tmp_path / "tool.py"
    script.write_text(textwrap.dedent('''\
            """Do a thing.

                python tool.py --rate 0.5    # usage line

            Result: not shown.
            """

            import settings

            settings.check_command_line(__name__, __file__)

            NAME = "x"  # a name
            RATE = (
                0.25  # a rate, in (0, 1)
            )
            LOUD = False  # say more
            # goes on with LOUD's
            BATCH = other.CONFIG["BATCH_SIZE"]  # as other.py's
            # which goes on here
            #   and here
            CONFIG = settings.config_block(globals())  # not a setting
            AFTER = 3  # not a setting either
            '''))
    text = settings.help_text(script)
    assert "Do a thing." in text and "# usage line" in text and "Result" not in text
    assert '--name="x"' in text and "a name" in text
    assert re.search(r"--rate=0\.25 +a rate, in \(0, 1\)", text)
    assert re.search(r"--loud=False +say more", text)
    more = r"--batch=64 +as other.py's\n +which goes on here\n +and here\n"
    assert re.search(more, text)
    assert re.search(r"say more\n +goes on with LOUD's\n  --batch", text)
    assert "--config" not in text and "--after" not in text
    read = settings.read_script(script)
    assert list(read.settings) == ["NAME", "RATE", "LOUD", "BATCH"] and read.complete


# ---------------------------------------------------------------------------------
# A bad command line: one line, exit 2, TensorFlow never imported

BAD_COMMAND_LINES = [
    (
        "scratch_cnn.py",
        ["--epochz=3"],
        "unknown setting --epochz; did you mean --epochs?",
    ),
    ("scratch_cnn.py", ["--epochs=three"], "--epochs takes an int (default 10)"),
    ("scratch_cnn.py", ["epochs=3"], "expected --name=value"),
    ("scratch_cnn.py", ["--epochs"], "--epochs needs a value"),
    (
        "scratch_cnn.py",
        ["--augment_flip", "up"],
        "--augment_flip must be random, alternate",
    ),
    ("scratch_cnn.py", ["--epochs", "0"], "--epochs must be positive"),
    ("scratch_cnn.py", ["--whiten_images=0"], "--whiten_images must be positive"),
    ("scratch_cnn.py", ["--batchnorm_momentum=1.5"], "must lie in [0, 1]: 1.5"),
    ("transfer_mobilenetv2.py", ["--alpha", "0.3"], "ImageNet weights exist for alpha"),
    (
        "transfer_mobilenetv2.py",
        ["--head_epochs=0", "--fine_tune_epochs=0"],
        "nothing to train",
    ),
    ("transfer_mobilenetv2.py", ["--augment_flip=yes"], "--augment_flip must be"),
    ("data.py", ["--augment_flip=yes"], "must be random, alternate or none"),
    ("data.py", ["--val_fraction=1.5"], "--val_fraction must lie in (0, 1)"),
    ("evaluate.py", ["--dpi", "0"], "--dpi must be positive"),
    ("bench.py", ["--quick", "--quick_steps", "0"], "--quick_steps must be positive"),
    ("bench.py", ["--quick", "yes"], "expected --name=value"),
]


@pytest.fixture(scope="module")
def bad_runs():
    with ThreadPoolExecutor(4) as pool:
        futures = [
            pool.submit(run_traced, script, *argv)
            for script, argv, _ in BAD_COMMAND_LINES
        ]
        return [future.result() for future in futures]


@pytest.mark.parametrize("case", range(len(BAD_COMMAND_LINES)))
def test_a_bad_command_line_is_one_line_and_exit_2_before_tensorflow(case, bad_runs):
    script, argv, needle = BAD_COMMAND_LINES[case]
    result, stderr, imported_tensorflow = bad_runs[case]
    assert result.returncode == 2, stderr
    assert not imported_tensorflow, argv
    assert result.stdout == ""
    lines = stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{script}: error: ") and needle in lines[0]


def test_the_same_checks_stop_main_when_it_is_called_in_process():
    with pytest.raises(settings.ConfigError, match="--augment_flip must be random"):
        scratch_cnn.main(["--augment_flip", "up"])
    with pytest.raises(settings.ConfigError, match="ImageNet weights exist for alpha"):
        transfer_mobilenetv2.main(["--alpha=0.3"])


def test_ctrl_c_before_training_says_interrupted_and_exits_130(monkeypatch, capsys):
    """A Ctrl-C while data loads (no run to resume yet) still says what happened."""

    def main(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(sys, "argv", ["scratch_cnn.py"])
    sigterm = signal.getsignal(signal.SIGTERM)  # cli() makes SIGTERM a Ctrl-C
    try:
        with pytest.raises(SystemExit) as stop:
            settings.cli(main)
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    assert stop.value.code == settings.EXIT_INTERRUPTED
    assert capsys.readouterr().err == "scratch_cnn.py: interrupted\n"


def test_check_command_line_does_nothing_when_imported(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["pytest", "--no-such-setting"])
    assert settings.check_command_line("scratch_cnn", scratch_cnn.__file__) is None


# ---------------------------------------------------------------------------------
# TensorFlow's start-up notices

ABSL_INFO = re.compile(r"^I\d{4} ")


def test_forward_messages_drops_notices_and_keeps_warnings_and_errors():
    lines = [
        b"WARNING: All log messages before absl::InitializeLog() is called are "
        b"written to STDERR\n",
        b"I0000 00:00:1.5 42 cpu_feature_guard.cc:227] This TensorFlow binary is "
        b"optimized\n",
        b"To enable the following instructions: AVX2 FMA, in other operations\n",
        b"W0000 00:00:2.5 42 dataset.cc:997] a real warning\n",
        b"E0000 00:00:3.5 42 gpu_device.cc:1] GPU 0 failed to initialise\n",
        b"/x.py:1: UserWarning: a Python warning\n",
        b"E0000 00:00:4.5 42 cuda_platform.cc:52] failed call to cuInit: UNKNOWN\n",
    ]
    kept = _forwarded(lines)
    assert kept == lines[3:]  # a machine with a driver: cuInit failing is news
    no_driver = [
        b"I0000 00:00:0.5 42 cudart_stub.cc:31] Could not find cuda drivers on your "
        b"machine, GPU will not be used.\n"
    ]
    assert _forwarded(no_driver + lines) == lines[3:6]


def _forwarded(lines):
    sink = io.BytesIO()
    settings.forward_messages(iter(lines), sink)
    return sink.getvalue().splitlines(keepends=True)


def test_an_error_printed_during_the_quiet_import_survives_an_abort():
    """C-level writes to descriptor 2, then the process dies: the filter process
    still passes the error on, and still drops the notice."""
    work = (
        "lambda: (os.write(2, b'I0000 00:00:1.0 1 x.cc:1] a notice\\n"
        "F0000 00:00:2.0 1 x.cc:2] Check failed: the GPU is gone\\n'), os.abort())"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import os, settings; settings.quietly({work})",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "Check failed: the GPU is gone" in result.stderr
    assert "a notice" not in result.stderr


@pytest.fixture(scope="module")
def missing_data_runs(tmp_path_factory):
    """scratch_cnn.py with no data (exit 3 once TensorFlow is loaded), quiet and
    with --verbose=2, side by side."""
    missing = tmp_path_factory.mktemp("empty") / "nothing-here"
    argvs = {"quiet": [], "verbose": ["--verbose", "2"]}
    with ThreadPoolExecutor(2) as pool:
        futures = {
            key: pool.submit(run_script, "scratch_cnn.py", f"--data_dir={missing}", *argv)
            for key, argv in argvs.items()
        }
        return {key: future.result() for key, future in futures.items()}


def test_tensorflow_start_up_notices_are_quiet_and_verbose_2_shows_them(
    missing_data_runs,
):
    quiet, verbose = missing_data_runs["quiet"], missing_data_runs["verbose"]
    assert quiet.returncode == verbose.returncode == 3
    # Only our line: no absl notice, no INFO line, no CPU-feature notice.
    assert quiet.stderr.splitlines() == [
        line for line in quiet.stderr.splitlines() if line.startswith("scratch_cnn.py:")
    ]
    assert len(quiet.stderr.splitlines()) == 1
    # --verbose=2 leaves TensorFlow to print what it prints (TF 2.21: absl notices).
    shown = verbose.stderr.splitlines()
    assert any(ABSL_INFO.match(line) for line in shown), shown
    assert shown[-1] == quiet.stderr.splitlines()[0]


# ---------------------------------------------------------------------------------
# Two workers under MultiWorkerMirroredStrategy, on loopback ports, CPU only


def free_ports(count):
    """Loopback ports free now, below Linux's ephemeral range (32768 up): the
    outgoing connections of the tests running alongside (pytest-xdist) cannot take
    one in the seconds before the workers listen on it, as a port bound to 0 and
    closed again could be taken."""
    rng = random.SystemRandom()
    ports = []
    while len(ports) < count:
        port = rng.randrange(20000, 32768)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        if port not in ports:
            ports.append(port)
    return ports


def test_two_workers_train_like_one(cifar_dir, tmp_path, scratch_run):
    out_dir = tmp_path / "runs"
    cluster = {"worker": [f"127.0.0.1:{port}" for port in free_ports(2)]}
    # The settings of the session's single-worker scratch_run.
    args = [
        f"--data_dir={cifar_dir}",
        f"--out_dir={out_dir}",
        "--epochs=4",
        "--width=16",
        *TINY_RUN,
    ]
    workers = [
        subprocess.Popen(
            [sys.executable, str(REPO / "scratch_cnn.py"), *args],
            cwd=tmp_path,
            env={
                **os.environ,
                **OFFLINE_ENV,
                # gRPC honours the proxy that keeps the tests offline: not for peers.
                "no_proxy": "127.0.0.1",
                "NO_PROXY": "127.0.0.1",
                "CUDA_VISIBLE_DEVICES": "",
                "TF_CONFIG": json.dumps(
                    {"cluster": cluster, "task": {"type": "worker", "index": index}}
                ),
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for index in range(2)
    ]
    try:
        outputs = [worker.communicate(timeout=900) for worker in workers]
    finally:
        for worker in workers:
            worker.kill()
    for worker, (out, err) in zip(workers, outputs):
        assert worker.returncode == 0, err[-3000:]
        assert "2 replica(s)" in out
    # The chief (worker 0) wrote the one run folder; worker 1 wrote elsewhere and
    # cleaned up after itself.
    (run_dir,) = (out_dir / "scratch_cnn").iterdir()
    assert sorted(path.name for path in run_dir.iterdir()) == [
        "config.json",
        "history.csv",
        "metrics.json",
        "model.keras",
    ]
    worker_folder = Path(re.search(r"run folder: (\S+)", outputs[1][0]).group(1))
    assert worker_folder != run_dir and not worker_folder.exists()
    assert f"run folder: {run_dir}" in outputs[0][0]

    # The same training as one worker's, within the noise of a 4-epoch run on 270
    # images (measured on a busy 2-core machine: last-epoch training loss 0.666
    # against 0.577). Each worker's BatchNorm sees half of each batch, and keeps its
    # own moving statistics. Test accuracy on 100 images is too noisy to compare the
    # two (0.80 against 0.99 once, 1.0 against 0.67 another time): it only has to show
    # that the two workers learned.
    multi = json.loads((run_dir / "metrics.json").read_text())
    single = json.loads((scratch_run / "metrics.json").read_text())
    assert multi["epochs"] == single["epochs"] == 4
    assert multi["params"] == single["params"]
    multi_loss = _last_loss(run_dir)
    single_loss = _last_loss(scratch_run)
    assert abs(multi_loss - single_loss) <= 0.3 * single_loss, (multi_loss, single_loss)
    assert multi["test_accuracy"] >= 0.5, (multi, single)  # chance: 0.1


def _last_loss(run_dir):
    return training.read_history(run_dir)[-1]["loss"]
