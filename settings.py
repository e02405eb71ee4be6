"""What every script shares before TensorFlow loads, in the standard library only: the
config block and its --name=value overrides, --help, one-line errors and exit codes, a
quiet TensorFlow start-up, atomic files, Markdown tables and finding run folders.

A script calls it on its first lines, before it imports anything heavy:

    import settings

    settings.check_command_line(__name__, __file__)  # --help, bad flags: no TF yet

Run as a program, that line answers --help from the script's config block, stops a bad
command line with one line and exit code 2 (checking the script's check_config too),
then imports TensorFlow without its start-up notices. Imported, it does nothing.
"""

import ast
import difflib
import io
import json
import os
import platform
import re
import subprocess
import sys
import tokenize
from pathlib import Path
from typing import NamedTuple

EXIT_CONFIG = 2  # bad command line or configuration
EXIT_DATA = 3  # data or weights missing, unreadable or invalid
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM, as a shell reports Ctrl-C
SCALARS = (bool, int, float, str)  # the types a setting may have


class ConfigError(Exception):
    """A setting that cannot work: exit 2 with this message."""


class DataError(Exception):
    """Data or weights missing, unreadable or invalid: exit 3 with this message."""


class Interrupted(Exception):
    """Stopped by Ctrl-C or SIGTERM; the message says how to go on."""


def require(condition, message):
    """Stop with exit code 2 unless `condition` holds."""
    if not condition:
        raise ConfigError(message)


def check_data_settings(config):
    """The data settings the training scripts share, checked before TensorFlow loads."""
    for name in ("VAL_FRACTION", "TEST_FRACTION"):
        if name in config:
            require(
                0 < config[name] < 1,
                f"--{name.lower()} must lie in (0, 1), got {config[name]}",
            )
    require(
        config.get("TRAIN_IMAGES", 0) >= 0,
        f"--train_images must be 0 (all) or positive, got {config.get('TRAIN_IMAGES')}",
    )
    if "BATCH_SIZE" in config:
        require(config["BATCH_SIZE"] > 0, "--batch_size must be positive")


def fail(message, exit_code):
    """The one way a script stops on an expected failure: `<script>: error: ...` on
    stderr, no traceback, the documented exit code."""
    print(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr)
    sys.exit(exit_code)


def stop_as_ctrl_c(signum, frame):
    """SIGTERM handler: `kill`, a scheduler's or `timeout`'s stop acts as Ctrl-C."""
    raise KeyboardInterrupt


# ---------------------------------------------------------------------------------
# Overrides: --name=value, --name value, or a bare --flag for a boolean


def config_block(module_globals):
    """The scalar UPPER_CASE globals defined so far: called right after a script's
    config block, it captures that block as the defaults for overrides."""
    return {
        name: value
        for name, value in module_globals.items()
        if name.isupper() and type(value) in SCALARS
    }


def split_arguments(argv, booleans=()):
    """[(flag, text)] from `--name=value`, `--name value` and, for a name in
    `booleans` (lower case), a bare `--flag` (text "True") or `--flag true|false`."""
    pairs, index = [], 0
    while index < len(argv):
        arg = argv[index]
        index += 1
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(
                f"expected --name=value, --name value or --flag, got {arg!r}"
            )
        flag, has_value, text = arg[2:].partition("=")
        flag = flag.replace("-", "_").lower()
        following = argv[index] if index < len(argv) else None
        if not has_value and flag in booleans:
            text = "True"
            if following is not None and following.lower() in ("true", "false"):
                text, index = following, index + 1
        elif not has_value:
            if following is None or following.startswith("--"):
                raise ConfigError(
                    f"--{flag} needs a value: --{flag}=VALUE or --{flag} VALUE"
                )
            text, index = following, index + 1
        pairs.append((flag, text))
    return pairs


def unknown_setting(flag, names, where=""):
    """The ConfigError for an unknown --flag: the closest valid names, if any."""
    valid = [name.lower() for name in names]
    close = difflib.get_close_matches(flag, valid, n=3, cutoff=0.6)
    hint = f"did you mean --{', --'.join(close)}?" if close else "see --help"
    return ConfigError(f"unknown setting --{flag}{where}; {hint}")


def parse_overrides(defaults, argv):
    """`defaults` (a config block) with the `argv` overrides applied; values are Python
    literals checked against the default's type, strings may be given bare."""
    config = dict(defaults)
    booleans = [name.lower() for name, value in defaults.items() if type(value) is bool]
    for flag, text in split_arguments(argv, booleans):
        if flag.upper() not in defaults:
            raise unknown_setting(flag, defaults)
        config[flag.upper()] = parse_value(flag, text, defaults[flag.upper()])
    return config


def parse_value(flag, text, default):
    """`text` as a value of the default's type, or a ConfigError."""
    expected = type(default)
    try:
        value = ast.literal_eval(text)
    except Exception:  # not a literal (or too deep to parse): keep the text
        value = text
    if expected is str:
        return value if isinstance(value, str) else text
    if expected is bool and text.lower() in ("true", "false"):
        return text.lower() == "true"
    if expected is float and type(value) is int:
        return float(value)
    if type(value) is not expected:
        article = "an" if expected.__name__[0] in "aeiou" else "a"
        raise ConfigError(
            f"--{flag} takes {article} {expected.__name__} (default {default!r}), "
            f"got {text!r}"
        )
    return value


def print_config(config, defaults=None):
    """The effective configuration, a setting a line, the overridden ones marked."""
    width = max(len(name) for name in config)
    for name, value in config.items():
        changed = defaults is not None and defaults.get(name) != value
        print(f"  {name.lower():<{width}} = {value!r}{'  (set)' if changed else ''}")


# ---------------------------------------------------------------------------------
# A script read from its source, without running it: --help and the early check


class Setting(NamedTuple):
    default: object
    comment: str  # the trailing comment of its lines in the config block
    more: tuple = ()  # comment lines right below it, which go on with it


class Script(NamedTuple):
    doc: str  # the module docstring
    settings: dict  # {NAME: Setting}, in the order of the config block
    check: object  # its check_config(config) function, or None
    complete: bool  # False if a setting's default is known only by running it


def read_script(path):
    """The docstring, config block and check_config of the script at `path`. The block
    is every UPPER_CASE scalar assigned before `CONFIG = ...`; a default taken from a
    sibling script (`scratch_cnn.CONFIG["BATCH_SIZE"]`) is read from its block."""
    path = Path(path)
    source = path.read_text()
    tree = ast.parse(source, str(path))
    tokens = [
        token
        for token in tokenize.generate_tokens(io.StringIO(source).readline)
        if token.type == tokenize.COMMENT
    ]
    comments = {token.start[0]: token.string.lstrip("#").strip() for token in tokens}
    alone = {
        token.start[0] for token in tokens if not token.line[: token.start[1]].strip()
    }
    found, constants, check, complete, in_block = {}, {}, None, True, True
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "check_config":
            check = node
        if not (
            isinstance(node, ast.Assign)
            and isinstance(node.targets[0], ast.Name)
            and node.targets[0].id.isupper()
        ):
            continue
        name = node.targets[0].id
        if name == "CONFIG":
            in_block = False
            continue
        try:
            value = _literal(node.value, path.parent)
        except ValueError:
            complete = complete and not in_block
            continue
        constants[name] = value
        if in_block and type(value) in SCALARS:
            lines = range(node.lineno, node.end_lineno + 1)
            comment = " ".join(comments[line] for line in lines if line in comments)
            more, line = [], node.end_lineno + 1
            while line in alone:
                more.append(comments[line])
                line += 1
            found[name] = Setting(value, comment, tuple(more))
    if check is not None:  # compiled alone, with the literal constants in scope
        code = compile(ast.Module(body=[check], type_ignores=[]), str(path), "exec")
        namespace = {**constants, "settings": sys.modules[__name__]}
        exec(code, namespace)
        check = namespace["check_config"]
    return Script(ast.get_docstring(tree) or "", found, check, complete)


def _literal(node, folder):
    """A literal's value, or `other_script.CONFIG["NAME"]` read from other_script.py."""
    if (
        isinstance(node, ast.Subscript)
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "CONFIG"
        and isinstance(node.value.value, ast.Name)
        and isinstance(node.slice, ast.Constant)
    ):
        other = folder / f"{node.value.value.id}.py"
        setting = (
            read_script(other).settings.get(node.slice.value) if other.is_file() else None
        )
        if setting is None:
            raise ValueError("not a setting of a sibling script")
        return setting.default
    return ast.literal_eval(node)


def help_text(path, usage="[--name=value | --name value | --flag] ..."):
    """--help: the docstring up to the end of its first indented block (purpose, then
    the commands), then each setting with its default and its comment."""
    script = read_script(path)
    program = Path(path).name
    lines, seen_usage = [f"usage: python {program} {usage}", ""], False
    for line in script.doc.splitlines():
        indented = line.startswith((" ", "\t"))
        if seen_usage and not indented:
            break
        seen_usage = seen_usage or indented
        lines.append(line)
    lines += ["", f"settings (the config block of {program}; a bare --flag sets True):"]
    flags = {
        name: f"--{name.lower()}="
        + (f'"{s.default}"' if isinstance(s.default, str) else repr(s.default))
        for name, s in script.settings.items()
    }
    width = min(max(map(len, flags.values()), default=0), 36)
    for name, setting in script.settings.items():
        flag = flags[name]
        if len(flag) > width:
            lines.append(f"  {flag}")
            flag = ""
        lines.append(f"  {flag:<{width}}  {setting.comment}".rstrip())
        lines += [f"  {'':<{width}}  {comment}".rstrip() for comment in setting.more]
    return "\n".join(lines) + "\n"


def check_command_line(name, path, argv=None):
    """Run by a script on its first lines as `check_command_line(__name__, __file__)`.
    As a program, it answers --help and -h (exit 0) and stops a bad command line (exit
    2), both before TensorFlow is imported, then imports TensorFlow quietly."""
    if name != "__main__":
        return
    argv = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in argv):
        sys.stdout.write(help_text(path))
        sys.exit(0)
    script = read_script(path)
    config = {}
    if script.complete:  # else main() checks it all, once TensorFlow is loaded
        try:
            defaults = {
                name: setting.default for name, setting in script.settings.items()
            }
            config = parse_overrides(defaults, argv)
            if script.check is not None:
                try:
                    script.check(config)
                except NameError:  # it needs more than settings: main() runs it
                    pass
        except ConfigError as error:
            fail(error, EXIT_CONFIG)
    import_tensorflow_quietly(show_everything=config.get("VERBOSE", 0) >= 2)


# ---------------------------------------------------------------------------------
# A quiet TensorFlow start-up
#
# TensorFlow logs from C++ through absl straight to file descriptor 2, and the notices
# printed while `import tensorflow` runs ignore TF_CPP_MIN_LOG_LEVEL. So the import runs
# with descriptor 2 connected to a small filter process that drops those known notices
# and passes every other line on at once: a real error gets through, even on an abort.

ABSL_LINE = re.compile(rb"^([IWEF])\d{4} ")  # "<severity><mmdd> <time> <thread> ..."
STARTUP_NOTICES = (
    b"WARNING: All log messages before absl::InitializeLog() is called",
    b"To enable the following instructions:",  # the rest of an I line (CPU features)
)
NO_CUDA_DRIVER = b"Could not find cuda drivers on your machine"
CUDA_INIT_FAILED = b"failed call to cuInit"


def forward_messages(source, sink, drop=()):
    """Copy the lines of `source` to `sink` (binary files) less the start-up notices:
    absl's INFO lines, its notice about them, a failed CUDA initialisation on a machine
    with no CUDA driver to initialise, and lines holding any of `drop` (bytes)."""
    no_cuda_driver = False
    for line in source:
        no_cuda_driver = no_cuda_driver or NO_CUDA_DRIVER in line
        match = ABSL_LINE.match(line)
        if (
            line.startswith(STARTUP_NOTICES)
            or (match and match.group(1) == b"I")
            or (no_cuda_driver and CUDA_INIT_FAILED in line)
            or any(text in line for text in drop)
        ):
            continue
        sink.write(line)
        sink.flush()


def import_tensorflow_quietly(show_everything=False):
    """Import TensorFlow and Keras and initialise the devices without the start-up
    notices; `show_everything` (--verbose=2, or TF_CPP_MIN_LOG_LEVEL=0) shows them."""
    if show_everything or os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0":
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # later INFO lines go too

    def work():
        import keras  # noqa: F401
        import tensorflow as tf

        tf.config.list_physical_devices()  # CUDA starts here, and so does its notice

    quietly(work)


def quietly(work, drop=()):
    """Run `work()` with file descriptor 2 passed through forward_messages (which also
    drops the lines holding any of `drop`, bytes)."""
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    command = [
        sys.executable, "-S", "-c",
        "import sys; sys.path.insert(0, sys.argv[1]); import settings; settings."
        "forward_messages(sys.stdin.buffer, sys.stderr.buffer, [a.encode() for a in sys.argv[2:]])",
        str(Path(__file__).resolve().parent),
        *(text.decode() for text in drop),
    ]  # fmt: skip
    forwarder = subprocess.Popen(command, stdin=read_end)
    os.close(read_end)
    saved = os.dup(2)
    os.dup2(write_end, 2)
    os.close(write_end)
    try:
        return work()
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        try:
            forwarder.wait(timeout=10)
        except subprocess.TimeoutExpired:  # a copy of the pipe is still open
            pass


# ---------------------------------------------------------------------------------
# Files, tables and run folders


def write_text(path, text):
    """Write a text file whole or not at all: a reader never sees half of it, and a
    failed write leaves the earlier file as it was. Returns the path."""
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)
    return path


def write_json(path, payload):
    return write_text(path, json.dumps(payload, indent=2, default=str) + "\n")


def read_json(path):
    """A JSON file's contents; unreadable or damaged is a DataError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise DataError(f"{path}: unreadable ({type(error).__name__})") from None


def markdown_table(header, rows):
    """A GitHub Markdown table; cells are shown with str()."""
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join(
        "| " + " | ".join(str(cell) for cell in line) + " |" for line in lines
    )


def cpu_name():
    """This machine's CPU model, as /proc/cpuinfo names it where there is one."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags():
    """The CPU's feature flags (/proc/cpuinfo), empty where there is no such file."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def list_runs(out_dir, script, finished):
    """Run folders of `script` in OUT_DIR, oldest first by name (a timestamp: a folder's
    modification time changes when a later tool writes into it); finished ones hold
    metrics.json."""
    parent = Path(out_dir) / script
    if not parent.is_dir():
        return []
    return sorted(
        (
            path
            for path in parent.iterdir()
            if (path / "config.json").is_file()
            and (path / "metrics.json").is_file() == finished
        ),
        key=lambda path: path.name,
    )


def finished_run(path, flag):
    """The finished run folder that `flag` (e.g. "--run=...") names; else exit 2."""
    run_dir = Path(path).expanduser()
    require(
        (run_dir / "config.json").is_file(),
        f"{flag}: not a run folder (no config.json); runs are in OUT_DIR/<script>/<timestamp>/",
    )
    script = read_json(run_dir / "config.json").get("script", "the training script")
    require(
        (run_dir / "metrics.json").is_file(),
        f"{flag}: that run has not finished (no metrics.json); finish it with: "
        f"python {script}.py --resume={run_dir}",
    )
    return run_dir


def model_name(script, config):
    """What a run trained, as tables and legends name it: "CNN from scratch",
    "MobileNetV2, ImageNet weights", "MobileNetV2 (alpha 0.35), random start", ..."""
    if script == "scratch_cnn":
        return "CNN from scratch"
    alpha = config.get("ALPHA", 1.0)
    name = "MobileNetV2" + ("" if alpha == 1.0 else f" (alpha {alpha})")
    weights = config.get("WEIGHTS", "imagenet")
    # Keras's own ImageNet file, passed by path, is still ImageNet weights.
    if weights == "imagenet" or re.match(
        r"mobilenet_v2_weights_tf_dim_ordering", Path(weights).name
    ):
        return f"{name}, ImageNet weights"
    if weights == "none":
        return f"{name}, random start"
    return f"{name}, weights from {Path(weights).name}"
