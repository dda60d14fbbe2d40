"""Config for the scripts: module-global defaults, overridden by config files, then --key=value.

A script declares each key once, as `key = default  # one-line meaning` at module level (lowercase
name, literal value). Keys that several scripts share, or that another module owns, are fields of a
dataclass declared the same way (`name: type = default  # meaning`), such as devices.DeviceConfig or
model.GPTConfig, named in the script's load_config call. This module reads them from the source, so
`--help` lists exactly the keys, defaults and meanings the code uses: no second list to sync.

A meaning may end in a tag, `{allowed; resume class}`, either part optional: the allowed values are
a bound (`> 0`, `>= 0`, `< 1`, `<= 1`), an interval (`[0, 1)`, `(0, 1]`) or choices (`cosine|wsd`),
and load_config refuses any other value in one line; the resume class is one of RESUME_CLASSES'
words (what train.py's resume may do with the key, checks.resume_changes); a key without one is
fixed. Scripts with positional arguments (export, plot, compare, prepare) use ArgumentParser.
"""

import argparse
import ast
import dataclasses
import inspect
import io
import operator
import re
import sys
import textwrap
import tokenize
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

RESUME_CLASSES = {  # a key's class in its tag: what a resume of a train.py run may do with it
    "changeable": "may change",
    "optimizer": "may change, set in the resumed optimizer",
    "val batches": "may change with --allow_new_eval_batches=True (new fixed val batches)",
    "control": "is how a start goes, not compared",
    "fixed": "may not change (every key without a class)",
}
TAG = re.compile(r"\s*\{([^{}]*)\}$")  # `{allowed; class}` ending a meaning
BOUND = re.compile(r"(>=|>|<=|<) *(-?[\d.e+-]+)$")
INTERVAL = re.compile(r"([\[(]) *(-?[\d.e+-]+) *, *(-?[\d.e+-]+) *([\])])$")
COMPARE = {">": operator.gt, ">=": operator.ge, "<": operator.lt, "<=": operator.le}


class ConfigError(Exception):
    """A config problem the user can fix; the message is one sentence naming the key or file."""


class Key(NamedTuple):
    """One key as declared: its default, the default as written, its meaning (tag included), the
    heading of its group, its allowed values ("" for any of its type) and its resume class."""

    default: bool | int | float | str
    written: str
    meaning: str
    heading: str
    allowed: str
    resume: str


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, but a usage error is one line, `error: ...`, and exit status 2, as every
    script's bad input is (argparse's own prints the usage first)."""

    def error(self, message):
        print(f"error: {message}; see --help", file=sys.stderr)
        sys.exit(2)


def declared_keys(script_path):
    """{key: Key} for each `key = literal  # meaning` at module level; the heading is the first line
    of the whole-line comments right above the key (`# batches`), where there are some: --help
    prints it before the key, so the keys read in the groups of the config block."""
    source = Path(script_path).read_text()
    return literal_assignments(source, ast.parse(source).body)


def dataclass_keys(cls):
    """The same for a dataclass's fields (`name: type = literal  # meaning`), its bases' first."""
    keys = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        source = textwrap.dedent(inspect.getsource(klass))
        keys.update(literal_assignments(source, ast.parse(source).body[0].body))
    return keys


def literal_assignments(source, statements):
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    comments = {tok.start[0]: tok.string.lstrip("# ").strip() for tok in tokens
                if tok.type == tokenize.COMMENT}
    whole_lines = {tok.start[0] for tok in tokens
                   if tok.type == tokenize.COMMENT and tok.line.lstrip().startswith("#")}
    keys = {}
    for node in statements:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target = node.target
        else:
            continue
        if not isinstance(target, ast.Name):
            continue
        try:
            default = ast.literal_eval(node.value)
        except ValueError:
            continue
        name = target.id
        if (name.islower() and not name.startswith("_")
                and isinstance(default, (bool, int, float, str))):
            # shown as typed on a command line: strings bare, numbers as written (1e-3, not 0.001)
            written = ((default or '""') if isinstance(default, str)
                       else ast.get_source_segment(source, node.value))
            meaning, head = (comments.get(node.lineno, ""),
                             heading(node.lineno, comments, whole_lines))
            keys[name] = Key(default, written, meaning, head, *tag(name, meaning))
    return keys


def tag(key, meaning):
    """(allowed, resume class) of the tag ending `meaning`; ValueError for a part that's neither."""
    found = TAG.search(meaning)
    allowed, resume = "", "fixed"
    for part in (p.strip() for p in found.group(1).split(";")) if found else ():
        if part in RESUME_CLASSES:
            resume = part
        elif BOUND.match(part) or INTERVAL.match(part) or "|" in part:
            allowed = part
        else:
            raise ValueError(f"{key}'s tag part {part!r} is neither allowed values (> 0, [0, 1), "
                             f"a|b) nor a resume class ({', '.join(RESUME_CLASSES)})")
    return allowed, resume


def allows(allowed, value):
    """Whether `value` is among a tag's allowed values (an empty tag allows any)."""
    if bound := BOUND.match(allowed):
        return COMPARE[bound[1]](value, float(bound[2]))
    if interval := INTERVAL.match(allowed):
        low, high = float(interval[2]), float(interval[3])
        return (COMPARE[">=" if interval[1] == "[" else ">"](value, low)
                and COMPARE["<=" if interval[4] == "]" else "<"](value, high))
    return not allowed or value in allowed.split("|")


def check_allowed(key, value, allowed):
    if not allows(allowed, value):
        if "|" in allowed:
            *first, last = allowed.split("|")
            allowed = f"{', '.join(first)} or {last}"
        elif INTERVAL.match(allowed):
            allowed = f"in {allowed}"
        raise ConfigError(f"{key} must be {allowed}, got {value!r}")


def heading(line, comments, whole_lines):
    """The first line of the whole-line comments right above `line`, `# ----` markers left out."""
    above = line - 1
    while above in whole_lines:
        above -= 1
    texts = [comments[n] for n in range(above + 1, line) if not comments[n].startswith("----")]
    return texts[0] if texts else ""


def coerce(key, value, default):
    """`value` as `default`'s type, or ConfigError naming the key. Ints are accepted for floats."""
    kind = type(default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not kind:
        raise ConfigError(f"{key} must be {kind.__name__} (like its default {default!r}), "
                          f"got {value!r}")
    return value


def parse_cli_value(key, text, default):
    """Text after `--key=` read as the type of the key's default."""
    if isinstance(default, str):
        return text
    if isinstance(default, bool):
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
    else:
        try:
            return coerce(key, ast.literal_eval(text), default)
        except (ValueError, SyntaxError):
            pass
    raise ConfigError(f"--{key}={text} is not a valid {type(default).__name__}")


def run_config_file(path, keys):
    """Values set by a config file: a Python file of plain assignments to known keys."""
    namespace = {}
    try:
        source = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read ({e.strerror}); give a path such as "
                          "config/shakespeare_char_cpu.py") from None
    try:
        exec(compile(source, path, "exec"), namespace)  # noqa: S102 -- configs are Python by design
    except Exception as e:  # noqa: BLE001 -- any config file error becomes one line naming the file
        raise ConfigError(f"config file {path} failed: {type(e).__name__}: {e}") from None
    values = {}
    for key, value in namespace.items():
        if key.startswith("_") or type(value).__name__ == "module":
            continue
        if key not in keys:
            raise ConfigError(f"config file {path} sets unknown key '{key}'; "
                              "see --help for the keys")
        values[key] = coerce(key, value, keys[key].default)
    return values


def usage(script_path, keys):
    """--help: every key with its default and meaning. Resume classes are told only by a script
    whose own keys name them (train.py): one that takes shared keys (devices.DeviceConfig's
    {changeable}) but resumes nothing shows their allowed values alone."""
    lines = [f"usage: python {Path(script_path).name} [config_file.py ...] [--key=value ...]", "",
             "Config files run first, in order, then --key=value; every key with its default:"]
    resumes = any(key.resume != "fixed" for key in declared_keys(script_path).values())
    if resumes:
        lines += ["A meaning may end in {allowed values; resume class}; "
                  "on resume a key of each class"]
        lines += [f"  {word:<12}{what}" for word, what in RESUME_CLASSES.items()]
    elif any(key.allowed for key in keys.values()):
        lines += ["A meaning may end in {allowed values}"]
    width = max(len(k) + len(key.written) for k, key in keys.items()) + 4
    for k, key in keys.items():
        meaning = key.meaning if resumes else TAG.sub(f" {{{key.allowed}}}" if key.allowed else "",
                                                      key.meaning)
        lines += ["", key.heading] if key.heading else []
        lines.append(f"  --{k}={key.written}".ljust(width + 2) + f"  {meaning}")
    return "\n".join(lines)


def run_main(function, script_path, argv, *shared, errors=()):
    """A script's main: `function` on its config (argv None: the command line's), its result
    returned; ConfigError and the `errors` given end in one line `error: ...` and exit status 2."""
    try:
        return function(load_config(script_path, sys.argv[1:] if argv is None else argv, *shared))
    except (ConfigError, *errors) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def all_keys(script_path, *shared):
    """{key: Key} of a script: its own, then the fields of the `shared` dataclasses that it does not
    declare itself (a key the script declares keeps the script's default and meaning)."""
    keys = declared_keys(script_path)
    for cls in shared:  # the class name heads its keys (devices.RuntimeConfig) if no comment does
        added = {key: value for key, value in dataclass_keys(cls).items() if key not in keys}
        first = next(iter(added), None)
        if first and not added[first].heading:
            added[first] = added[first]._replace(heading=f"{cls.__module__}.{cls.__name__}")
        keys |= added
    return keys


def load_config(script_path, argv, *shared):
    """Resolved config: defaults <- config files (in order) <- --key=value, as a namespace.

    `shared` names dataclasses whose fields are keys too (all_keys); a true/false key given bare
    (--chat) is true. Prints the key list and exits on -h/--help. Raises ConfigError for anything
    unknown, mistyped or not among its tag's allowed values.
    """
    keys = all_keys(script_path, *shared)
    if "-h" in argv or "--help" in argv:
        print(usage(script_path, keys))
        sys.exit(0)
    values = {k: key.default for k, key in keys.items()}
    for arg in argv:
        if not arg.startswith("--"):
            values.update(run_config_file(arg, keys))
            continue
        key, eq, text = arg[2:].partition("=")
        if key not in keys:
            raise ConfigError(f"unknown key --{key}; see --help for the keys")
        if not eq and not isinstance(keys[key].default, bool):
            raise ConfigError(f"--{key} needs a value, as --{key}=VALUE")
        values[key] = parse_cli_value(key, text, keys[key].default) if eq else True  # bare --flag
    for k, value in values.items():
        check_allowed(k, value, keys[k].allowed)
    return SimpleNamespace(**values)
