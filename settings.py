"""The command line every script shares, in the standard library only, so it answers
before TensorFlow loads: --help from the config block, overrides checked against it,
one-line errors, and a quiet TensorFlow start-up.

A script calls it on its first lines, before it imports anything heavy:

    import settings

    settings.check_command_line(__name__, __file__)  # --help, bad flags: no TF yet

    import keras

Run as a program, that line answers `--help` and `-h` from the script's config block
(each UPPER_CASE setting with its default and its trailing comment), stops a bad
command line with one line on stderr and exit code 2 (an unknown or malformed flag, a
wrong type, or a failed check of the script's `check_config(config)`), and then
imports TensorFlow with its start-up notices filtered out. Imported as a module (by a
test, or by bench.py), it does nothing.
"""

import ast
import io
import os
import re
import subprocess
import sys
import tokenize
from pathlib import Path
from typing import NamedTuple

EXIT_CONFIG = 2  # bad command line or configuration
EXIT_DATA = 3  # data or weights missing, unreadable or invalid
SCALARS = (bool, int, float, str)  # the types a setting may have
HELP_FLAGS = ("-h", "--help")


class ConfigError(Exception):
    """A setting that cannot work: exit 2 with this message."""


class DataError(Exception):
    """Data or weights missing, unreadable or invalid: exit 3 with this message."""


def require(condition, message):
    """Stop with exit code 2 unless `condition` holds."""
    if not condition:
        raise ConfigError(message)


def check_data_settings(config):
    """The data settings every script shares, checked before TensorFlow loads:
    VAL_FRACTION, TRAIN_IMAGES and, in the scripts that batch, BATCH_SIZE."""
    require(
        0 < config["VAL_FRACTION"] < 1,
        f"--val_fraction must lie in (0, 1), got {config['VAL_FRACTION']}",
    )
    require(
        config["TRAIN_IMAGES"] >= 0,
        f"--train_images must be 0 (all) or positive, got {config['TRAIN_IMAGES']}",
    )
    if "BATCH_SIZE" in config:
        require(config["BATCH_SIZE"] > 0, "--batch_size must be positive")


def fail(message, exit_code):
    """The one way a script stops on an expected failure: `<script>: error: ...`
    on stderr, no traceback, the documented exit code."""
    print(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr)
    sys.exit(exit_code)


def stop_as_ctrl_c(signum, frame):
    """A SIGTERM handler: `kill`, a scheduler's or `timeout`'s stop raises
    KeyboardInterrupt, so a run stops the way Ctrl-C stops it."""
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


def parse_overrides(defaults, argv):
    """Apply `--name=value` and `--name value` arguments to `defaults` (a config block)
    and return the effective configuration; a bare `--flag` sets a boolean to True.
    Values are Python literals checked against the type of the default; strings may
    be given bare (`--data_dir=/data/cifar`)."""
    config = dict(defaults)
    valid = ", ".join(f"--{name.lower()}" for name in defaults)
    argv = list(argv)
    index = 0
    while index < len(argv):
        arg = argv[index]
        index += 1
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(
                f"expected --name=value, --name value or --flag, got {arg!r} "
                f"(valid names: {valid})"
            )
        flag, has_value, text = arg[2:].partition("=")
        name = flag.replace("-", "_").upper()
        if name not in defaults:
            raise ConfigError(f"unknown setting --{flag} (valid names: {valid})")
        if not has_value:
            following = argv[index] if index < len(argv) else None
            if type(defaults[name]) is bool:
                # A bare --flag means True; --flag true and --flag false also work.
                text = "True"
                if following is not None and following.lower() in ("true", "false"):
                    text, index = following, index + 1
            elif following is None or following.startswith("--"):
                raise ConfigError(
                    f"--{flag} needs a value: --{flag}=VALUE or --{flag} VALUE "
                    f"(default {defaults[name]!r})"
                )
            else:
                text, index = following, index + 1
        config[name] = parse_value(flag, text, defaults[name])
    return config


def parse_value(flag, text, default):
    """`text` as a value of the default's type: a Python literal, a bare string,
    true/false for a boolean; anything else is a ConfigError."""
    expected = type(default)
    try:
        value = ast.literal_eval(text)
    except Exception:  # not a literal (or one too deep to parse): keep the text
        value = text
    if expected is str:
        return value if isinstance(value, str) else text
    if expected is bool and text.lower() in ("true", "false"):
        return text.lower() == "true"
    if expected is float and type(value) is int:
        return float(value)
    if type(value) is not expected:
        raise ConfigError(
            f"--{flag} takes {article(expected.__name__)} (default {default!r}), "
            f"got {text!r}"
        )
    return value


def article(noun):
    return f"{'an' if noun[0] in 'aeiou' else 'a'} {noun}"


# ---------------------------------------------------------------------------------
# A script read from its source, without running it


class Setting(NamedTuple):
    default: object
    comment: str  # the trailing comment of its lines in the config block
    more: tuple = ()  # the comment lines right below it, which go on with it


class Script(NamedTuple):
    doc: str  # the module docstring
    settings: dict  # {NAME: Setting}, in the order of the config block
    check: object  # its check_config(config) function, or None
    complete: bool  # False if a setting's default is known only by running it


def read_script(path):
    """The docstring, config block and check_config of the script at `path`, read
    from its source. The block is every UPPER_CASE scalar assigned before the line
    `CONFIG = ...config_block(globals())`, as config_block sees it when the script
    runs; a default of another script's setting (`scratch_cnn.CONFIG["BATCH_SIZE"]`)
    is read from that script's block."""
    path = Path(path)
    source = path.read_text()
    tree = ast.parse(source, str(path))
    comment_tokens = [
        token
        for token in tokenize.generate_tokens(io.StringIO(source).readline)
        if token.type == tokenize.COMMENT
    ]
    comments = {
        token.start[0]: token.string.lstrip("#").strip() for token in comment_tokens
    }
    comment_lines = {  # lines holding nothing but a comment
        token.start[0]
        for token in comment_tokens
        if not token.line[: token.start[1]].strip()
    }
    settings, constants, check, complete = {}, {}, None, True
    in_block = True
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "check_config":
            check = node
        if not (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
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
            more, line = [], node.end_lineno + 1  # comment lines right below go on
            while line in comment_lines:
                more.append(comments[line])
                line += 1
            settings[name] = Setting(value, comment, tuple(more))
    if check is not None:
        check = _compile_function(check, path, constants)
    return Script(ast.get_docstring(tree) or "", settings, check, complete)


def _literal(node, folder):
    """The value of a literal, or of `other_script.CONFIG["NAME"]` read from
    other_script.py's block; ValueError for anything else."""
    if (
        isinstance(node, ast.Subscript)
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "CONFIG"
        and isinstance(node.value.value, ast.Name)
        and isinstance(node.slice, ast.Constant)
    ):
        other = folder / f"{node.value.value.id}.py"
        if other.is_file():
            setting = read_script(other).settings.get(node.slice.value)
            if setting is not None:
                return setting.default
        raise ValueError("not a setting of a sibling script")
    return ast.literal_eval(node)


def _compile_function(node, path, constants):
    """The function `node` defines, compiled on its own with this module as
    `settings` and the script's literal constants in scope: enough for checks of
    settings, which need neither data nor TensorFlow."""
    code = compile(ast.Module(body=[node], type_ignores=[]), str(path), "exec")
    namespace = {**constants, "settings": sys.modules[__name__]}
    exec(code, namespace)
    return namespace[node.name]


def help_text(path):
    """--help: the docstring's purpose and usage lines, then every setting of the
    config block with its default and its comment."""
    script = read_script(path)
    program = Path(path).name
    lines = [f"usage: python {program} [--name=value | --name value | --flag] ...", ""]
    # The docstring up to the end of its first indented block: purpose, then usage.
    seen_usage = False
    for line in script.doc.splitlines():
        indented = line.startswith((" ", "\t"))
        if seen_usage and not indented:
            break
        seen_usage = seen_usage or indented
        lines.append(line)
    lines += ["", f"settings (the config block of {program}; a bare --flag sets True):"]
    flags = {
        name: f"--{name.lower()}={_shown(setting.default)}"
        for name, setting in script.settings.items()
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


def _shown(value):
    return '"' + value + '"' if isinstance(value, str) else repr(value)


# ---------------------------------------------------------------------------------
# The early check


def check_command_line(name, path, argv=None):
    """Run by a script on its first lines as `check_command_line(__name__, __file__)`.
    Run as a program (`name == "__main__"`), it answers --help and -h (exit 0), stops a
    bad command line with one line on stderr (exit 2), both before TensorFlow is
    imported, and then imports TensorFlow quietly. Imported, it does nothing."""
    if name != "__main__":
        return
    argv = sys.argv[1:] if argv is None else argv
    if any(arg in HELP_FLAGS for arg in argv):
        sys.stdout.write(help_text(path))
        sys.exit(0)
    script = read_script(path)
    config = {}
    if script.complete:  # else main() checks it all, once TensorFlow is loaded
        defaults = {name: setting.default for name, setting in script.settings.items()}
        try:
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
# TensorFlow logs from C++ through absl straight to file descriptor 2. Most of it obeys
# TF_CPP_MIN_LOG_LEVEL; the notices printed while `import tensorflow` runs (before absl
# is initialised) do not. So the import runs with descriptor 2 connected to a small
# filter process that drops those known notices and passes every other line on at
# once: a real warning or error gets through, even if TensorFlow then aborts.

# Lines absl prints as "<severity><mmdd> <time> <thread> <file>:<line>] <message>".
ABSL_LINE = re.compile(rb"^([IWEF])\d{4} ")
STARTUP_NOTICES = (
    b"WARNING: All log messages before absl::InitializeLog() is called",
    b"To enable the following instructions:",  # the rest of an I line (CPU features)
)
NO_CUDA_DRIVER = b"Could not find cuda drivers on your machine"
CUDA_INIT_FAILED = b"failed call to cuInit"


def forward_messages(source, sink):
    """Copy the lines of `source` to `sink` (binary files), one at a time, less the
    start-up notices: absl's INFO lines and its notice about them, and the failed
    CUDA initialisation of a machine that has no CUDA driver to initialise."""
    no_cuda_driver = False
    for line in source:
        no_cuda_driver = no_cuda_driver or NO_CUDA_DRIVER in line
        match = ABSL_LINE.match(line)
        if (
            line.startswith(STARTUP_NOTICES)
            or (match and match.group(1) == b"I")
            or (no_cuda_driver and CUDA_INIT_FAILED in line)
        ):
            continue
        sink.write(line)
        sink.flush()


def import_tensorflow_quietly(show_everything=False):
    """Import TensorFlow and Keras, initialising the devices, without the start-up
    notices; `show_everything` (--verbose=2, or TF_CPP_MIN_LOG_LEVEL=0 set by the
    user) leaves TensorFlow to print all it prints."""
    if show_everything or os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0":
        return
    # INFO lines after start-up (such as "Local rendezvous is aborting") go too;
    # warnings and errors stay. A level the user set is theirs.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    quietly(_import_tensorflow)


def _import_tensorflow():
    import keras  # noqa: F401
    import tensorflow as tf

    # CUDA is initialised here, not at the first operation: so is its notice.
    tf.config.list_physical_devices()


def quietly(work):
    """Run `work()` with file descriptor 2 passed through forward_messages."""
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    command = [
        sys.executable,
        "-S",
        "-c",
        "import sys; sys.path.insert(0, sys.argv[1]); import settings; "
        "settings.forward_messages(sys.stdin.buffer, sys.stderr.buffer)",
        str(Path(__file__).resolve().parent),
    ]
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
