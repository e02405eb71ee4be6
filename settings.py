"""What every script shares before TensorFlow loads, standard library only: the config
block and its overrides, --help, errors and exit codes, a quiet TensorFlow start-up,
files, tables and run folders. Scripts start with `settings.check_command_line(...)`."""

import ast
import contextlib
import difflib
import io
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tokenize
from collections import namedtuple
from pathlib import Path

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


CHOICES = {  # settings that take one of a few words, in every script that has them
    "AUGMENT_FLIP": ("random", "alternate", "none"),
    "TTA": ("none", "flip", "crops"),
    "MIXED_PRECISION": ("off", "on", "auto"),
}


def check_data_settings(config):
    """The settings the training scripts share, those `config` has, checked."""
    for name, words in CHOICES.items():
        if name in config:
            listed = f"{', '.join(words[:-1])} or {words[-1]}"
            require(config[name] in words, f"--{name.lower()} must be {listed}")
    for name in ("VAL_FRACTION", "TEST_FRACTION"):
        if name in config:
            value = config[name]
            require(0 < value < 1, f"--{name.lower()} must lie in (0, 1), got {value}")
    images = config.get("TRAIN_IMAGES", 0)
    require(images >= 0, f"--train_images must be 0 (all) or positive, got {images}")
    require(config.get("BATCH_SIZE", 1) > 0, "--batch_size must be positive")
    momentum = config.get("BATCHNORM_MOMENTUM", 0)  # 1: the statistics never move
    require(0 <= momentum <= 1, f"--batchnorm_momentum must lie in [0, 1]: {momentum}")


def batch_size(config, train_images, replicas=1):
    """The batch a run uses: BATCH_SIZE, made smaller so that an epoch of `train_images`
    has the config's MIN_STEPS steps (8 if it has none), though not below 32 images
    unless that is more than an eighth of the set; a multiple of `replicas`."""
    steps, smallest = config.get("MIN_STEPS", 8), min(32, train_images // 8)
    size = min(config["BATCH_SIZE"], max(train_images // steps, smallest, 1))
    return max(round(size / replicas), 1) * replicas


def fail(message, exit_code):
    """Stop on an expected failure: `<script>: error: ...` on stderr, no traceback."""
    print(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr)
    sys.exit(exit_code)


def cli(main, interrupted_hint="interrupted"):
    """Run `main(argv)` as a command, exiting with its return value if an int: an expected
    failure is one line on stderr and its exit code; SIGTERM stops as Ctrl-C does."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # raises KeyboardInterrupt
    try:
        code = main(sys.argv[1:])
        sys.exit(code if isinstance(code, int) else 0)
    except (ConfigError, DataError) as error:
        fail(error, EXIT_CONFIG if isinstance(error, ConfigError) else EXIT_DATA)
    except (Interrupted, KeyboardInterrupt) as error:
        hint = str(error) or interrupted_hint  # a bare Ctrl-C has no message
        print(f"{Path(sys.argv[0]).name}: {hint}", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    except BrokenPipeError:  # `... | head`: no error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


# ---------------------------------------------------------------------------------
# Overrides: --name=value, --name value, or a bare --flag for a boolean


def config_block(module_globals):
    """The scalar UPPER_CASE globals so far: called right after the config block."""
    return {n: v for n, v in module_globals.items() if n.isupper() and type(v) in SCALARS}


def split_arguments(argv, booleans=()):
    """[(flag, text)] from `--name=value`, `--name value` and, for a name in
    `booleans` (lower case), a bare `--flag` (text "True") or `--flag true|false`."""
    pairs, rest = [], list(argv)
    while rest:
        arg = rest.pop(0)
        expected = f"expected --name=value, --name value or --flag, got {arg!r}"
        require(arg.startswith("--") and arg != "--", expected)
        flag, has_value, text = arg[2:].partition("=")
        flag = flag.replace("-", "_").lower()
        following = rest[0] if rest else "--"  # "--": nothing follows
        if not has_value and flag in booleans:
            text = rest.pop(0) if following.lower() in ("true", "false") else "True"
        elif not has_value:
            needs = f"--{flag} needs a value: --{flag}=VALUE or --{flag} VALUE"
            require(not following.startswith("--"), needs)
            text = rest.pop(0)
        pairs.append((flag, text))
    return pairs


def unknown_setting(flag, names, where=""):
    """The ConfigError for an unknown --flag: the closest valid names, if any."""
    close = difflib.get_close_matches(flag, [name.lower() for name in names])
    hint = f"did you mean --{', --'.join(close)}?" if close else "see --help"
    return ConfigError(f"unknown setting --{flag}{where}; {hint}")


def parse_overrides(defaults, argv):
    """`defaults` (a config block) with the `argv` overrides applied."""
    config = dict(defaults)
    booleans = [name.lower() for name, value in defaults.items() if type(value) is bool]
    for flag, text in split_arguments(argv, booleans):
        if flag.upper() not in defaults:
            raise unknown_setting(flag, defaults)
        config[flag.upper()] = parse_value(flag, text, defaults[flag.upper()])
    return config


def parse_value(flag, text, default):
    """`text` as a literal of the default's type (or a bare string), else ConfigError."""
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
    name = expected.__name__
    article = "an" if name[0] in "aeiou" else "a"
    wrong = f"--{flag} takes {article} {name} (default {default!r}), got {text!r}"
    require(type(value) is expected, wrong)
    return value


def print_config(config, defaults=None):
    """The effective configuration, a setting a line, the overridden ones marked."""
    width = max(len(name) for name in config)
    for name, value in config.items():
        changed = defaults is not None and defaults.get(name) != value
        print(f"  {name.lower():<{width}} = {value!r}{'  (set)' if changed else ''}")


# ---------------------------------------------------------------------------------
# A script read from its source, without running it: --help and the early check

Setting = namedtuple("Setting", "default comment more")  # more: comment lines below it
Script = namedtuple("Script", "doc settings check complete")  # see read_script


def read_script(path):
    """The docstring, config block {NAME: Setting}, check_config (or a no-op) of a script
    at `path`, and whether every default is known without running it. A default taken
    from a sibling script (`scratch_cnn.CONFIG["BATCH_SIZE"]`) is read from its block."""
    path = Path(path)
    source = path.read_text()
    tree = ast.parse(source, str(path))
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    tokens = [token for token in tokens if token.type == tokenize.COMMENT]
    comments = {token.start[0]: token.string.lstrip("#").strip() for token in tokens}
    alone = {token.start[0] for token in tokens if token.line.lstrip().startswith("#")}
    checks = [node for node in tree.body if getattr(node, "name", "") == "check_config"]
    found, constants, complete, in_block = {}, {}, True, True
    for node in tree.body:
        target = node.targets[0] if isinstance(node, ast.Assign) else None
        if not (isinstance(target, ast.Name) and target.id.isupper()):
            continue
        in_block = in_block and target.id != "CONFIG"  # `CONFIG = ...` ends the block
        try:
            value = _literal(node.value, path.parent)
        except ValueError:
            complete = complete and not in_block
            continue
        constants[target.id] = value
        if in_block and type(value) in SCALARS:
            lines = range(node.lineno, node.end_lineno + 1)
            comment = " ".join(comments[line] for line in lines if line in comments)
            more, line = [], node.end_lineno + 1
            while line in alone:  # comment lines right below it
                more.append(comments[line])
                line += 1
            found[target.id] = Setting(value, comment, tuple(more))
    namespace = {**constants, "settings": sys.modules[__name__]}
    code = compile(ast.Module(body=checks, type_ignores=[]), str(path), "exec")
    exec(code, namespace)  # check_config alone, with the literal constants in scope
    check = namespace.get("check_config", lambda config: None)
    return Script(ast.get_docstring(tree) or "", found, check, complete)


def _literal(node, folder):
    """A literal's value, or `other_script.CONFIG["NAME"]` read from other_script.py."""
    sibling = re.fullmatch(r"(\w+)\.CONFIG\['(\w+)'\]", ast.unparse(node))
    if sibling is None:
        return ast.literal_eval(node)
    other = folder / f"{sibling[1]}.py"
    setting = read_script(other).settings.get(sibling[2]) if other.is_file() else None
    if setting is None:
        raise ValueError("not a setting of a sibling script")
    return setting.default


def help_text(path, usage="[--name=value | --name value | --flag] ..."):
    """--help: the docstring to the end of its first indented block (the commands), then
    each setting with its default and its comment."""
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
    flags = [
        f"--{name.lower()}="
        + (f'"{s.default}"' if isinstance(s.default, str) else repr(s.default))
        for name, s in script.settings.items()
    ]
    width = min(max(map(len, flags), default=0), 36)
    for flag, setting in zip(flags, script.settings.values()):
        if len(flag) > width:
            lines.append(f"  {flag}")
            flag = ""
        lines.append(f"  {flag:<{width}}  {setting.comment}".rstrip())
        lines += [f"  {'':<{width}}  {comment}".rstrip() for comment in setting.more]
    return "\n".join(lines) + "\n"


def check_command_line(name, path, argv=None):
    """Run as a program: answer --help and -h (exit 0) and stop a bad command line (one
    line, exit 2), before TensorFlow loads; then import TensorFlow without its notices."""
    if name != "__main__":
        return
    argv = sys.argv[1:] if argv is None else argv
    if any(arg in ("-h", "--help") for arg in argv):
        sys.stdout.write(help_text(path))
        sys.exit(0)
    script = read_script(path)
    config = {}
    if script.complete:  # else main() checks it all, once TensorFlow is loaded
        defaults = {name: setting.default for name, setting in script.settings.items()}
        try:
            config = parse_overrides(defaults, argv)
            with contextlib.suppress(NameError):  # needs more names: main() runs it
                script.check(config)
        except ConfigError as error:
            fail(error, EXIT_CONFIG)
    if config.get("VERBOSE", 0) < 2 and os.environ.get("TF_CPP_MIN_LOG_LEVEL") != "0":
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")  # later INFO lines go too
        quietly(_import_tensorflow)


# ---------------------------------------------------------------------------------
# A quiet TensorFlow start-up
#
# TensorFlow logs from C++ through absl straight to file descriptor 2, and its notices
# during `import tensorflow` ignore TF_CPP_MIN_LOG_LEVEL. So the import runs with
# descriptor 2 piped to a small filter process that drops those known notices and passes
# every other line on at once: a real error gets through, even on an abort.

ABSL_INFO = re.compile(rb"^I\d{4} ")  # absl's INFO lines: "I<mmdd> <time> <thread> ..."
STARTUP_NOTICES = (
    b"WARNING: All log messages before absl::InitializeLog() is called",
    b"To enable the following instructions:",  # the rest of an I line (CPU features)
)
NO_CUDA_DRIVER = b"Could not find cuda drivers on your machine"
CUDA_INIT_FAILED = b"failed call to cuInit"


def forward_messages(source, sink, drop=()):
    """Copy `source`'s lines to `sink` (binary files) less absl's INFO lines and its
    notice about them, a failed CUDA start with no CUDA driver, and lines with `drop`."""
    no_cuda_driver = False
    for line in source:
        no_cuda_driver = no_cuda_driver or NO_CUDA_DRIVER in line
        noise = line.startswith(STARTUP_NOTICES) or ABSL_INFO.match(line)
        noise = noise or (no_cuda_driver and CUDA_INIT_FAILED in line)
        if not (noise or any(text in line for text in drop)):
            sink.write(line)
            sink.flush()


def _import_tensorflow():
    import keras  # noqa: F401
    import tensorflow as tf

    tf.config.list_physical_devices()  # CUDA starts here, and so does its notice


def quietly(work, drop=()):
    """Run `work()` with file descriptor 2 passed through forward_messages(drop=drop)."""
    sys.stderr.flush()
    this_file = str(Path(__file__).resolve())  # run as the filter: see the end
    command = [sys.executable, "-S", this_file, *map(bytes.decode, drop)]
    forwarder = subprocess.Popen(command, stdin=subprocess.PIPE)
    saved = os.dup(2)
    os.dup2(forwarder.stdin.fileno(), 2)
    forwarder.stdin.close()  # descriptor 2 is now the pipe's only write end
    try:
        return work()
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        with contextlib.suppress(subprocess.TimeoutExpired):  # a child holds the pipe
            forwarder.wait(timeout=10)


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
    return "\n".join("| " + " | ".join(map(str, line)) + " |" for line in lines)


def _cpuinfo(field):
    """The value of `field` in /proc/cpuinfo (its first line), or "" if none."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    return ""


def cpu_name():
    """This machine's CPU model, as /proc/cpuinfo names it where there is one."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def cpu_flags():
    """The CPU's feature flags (/proc/cpuinfo), empty where there is no such file."""
    return set(_cpuinfo("flags").split())


ABSOLUTE_PATH = re.compile(r"(?<![\w.~:])/[\w.~-]+/[^\s,;()'\"`|]*")  # not /device:0


def shown(path):
    """A path as reports show it: relative, below the current folder; else its name."""
    path, here = Path(path).expanduser().resolve(), Path.cwd().resolve()
    return str(path.relative_to(here)) if path.is_relative_to(here) else path.name


def without_paths(text, *known):
    """`text` with each absolute path, and each `known` one (spaces and all), shown."""
    for path in known:
        text = str(text).replace(str(path), shown(path))
    return ABSOLUTE_PATH.sub(lambda match: shown(match.group()), str(text))


def list_runs(out_dir, script, finished):
    """Run folders of `script` (with metrics.json if `finished`), oldest first by name, a
    timestamp: a folder's modification time changes when a later tool writes into it."""
    configs = (Path(out_dir) / script).glob("*/config.json")
    runs = [path.parent for path in configs if path.is_file()]
    return sorted(path for path in runs if (path / "metrics.json").is_file() == finished)


def finished_run(path, flag):
    """The finished run folder that `flag` (e.g. "--run=...") names; else exit 2."""
    run_dir = Path(path).expanduser()
    require(
        (run_dir / "config.json").is_file(),
        f"{flag}: not a run folder (no config.json); "
        "runs are in OUT_DIR/<script>/<timestamp>/",
    )
    script = read_json(run_dir / "config.json").get("script", "the training script")
    require(
        (run_dir / "metrics.json").is_file(),
        f"{flag}: that run has not finished (no metrics.json); finish it with: "
        f"python {script}.py --resume={run_dir}",
    )
    return run_dir


def model_name(script, config):
    """What a run trained, as tables and legends name it ("MobileNetV2, random start")."""
    if script == "scratch_cnn":
        return "CNN from scratch"
    alpha = config.get("ALPHA", 1.0)
    name = "MobileNetV2" + ("" if alpha == 1.0 else f" (alpha {alpha})")
    weights = config.get("WEIGHTS", "imagenet")
    keras_file = Path(weights).name.startswith("mobilenet_v2_weights_tf_dim_ordering")
    if weights == "imagenet" or keras_file:  # Keras's own file, passed by path
        return f"{name}, ImageNet weights"
    if weights == "none":
        return f"{name}, random start"
    return f"{name}, weights from {Path(weights).name}"


if __name__ == "__main__":  # the filter process that quietly() starts
    drop = [text.encode() for text in sys.argv[1:]]
    forward_messages(sys.stdin.buffer, sys.stderr.buffer, drop)
