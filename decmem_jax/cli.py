"""What the command-line tools share, so that every input problem ends the same way: one line on stderr,
`error: <file or field>: <what is wrong and what to do>`, and a non-zero exit status. A traceback is left for real
bugs.

- `ArgumentParser`: argparse with a one-line `error()` (argparse prints a usage block and the program name first).
- Argument types that refuse impossible numbers while the command line is parsed (`non_negative_int`,
  `positive_int`, `frame_size`), before any file is read.
- `output_problem`: whether an output path can be written (a file in the way, a read-only file system, no
  permission), checked before any model is loaded or tensor read.
- `define_config_flag` / `configs_importable`: how a run config file (configs/*.py) is loaded, by every config-file
  CLI and by `rollout.session.load_config`: with the folder above its configs/ on sys.path, so the file's
  `from configs import common` works from any working directory.
- `parse_flags`: the absl flag parser for the tools configured by ml_collections files (`python -m decmem_jax.train`,
  `python -m decmem_jax.rollout`); an unknown `--config.x` field gets a "did you mean" instead of a traceback.
- The console-script entry points of the absl tools (`decmem-rollout`, `decmem-train`, `decmem-train-vae`), which run
  the module exactly as `python -m` does.

Only the standard library is imported at module level: every tool imports this before deciding anything.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import errno
import os
import re
import runpy
import sys
import tempfile
from pathlib import Path

EXIT_INPUT = 2  # a bad input or setting (argparse's status for usage errors); 1 stays "the work itself failed"


# ----- one-line errors -----

def one_line(message) -> str:
    """The lines of a message joined with "; " (an error that spans lines would read as several errors)."""
    return "; ".join(part.strip() for part in str(message).splitlines() if part.strip())


def fail(message, status: int = EXIT_INPUT) -> int:
    """Prints `error: <message>` as one line on stderr and returns `status`, for `return fail(e)` in a main()."""
    print(f"error: {one_line(message)}", file=sys.stderr)
    return status


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line: `error: --flag: what is wrong (see PROG --help)`. Subparsers made
    by `add_subparsers` are of this class too (argparse uses the parent's class)."""

    def error(self, message):
        text = message
        m = re.match(r"argument (\S+?)(?:/\S+)?: (.*)", message, re.S)
        if m:  # "argument --clips: invalid int value: 'x'" -> "--clips: invalid int value: 'x'"
            text = f"{m.group(1)}: {m.group(2)}"
        m = re.match(r"the following arguments are required: (.*)", message)
        if m:
            text = f"{m.group(1)}: required"
        self.exit(EXIT_INPUT, f"error: {one_line(text)} (see {self.prog} --help)\n")


# ----- argument types: impossible numbers fail while parsing -----

def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is negative; it must be >= 0")
    return value


def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def frame_size(text: str) -> tuple[int, int]:
    """'HxW' -> (H, W), both positive."""
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: write HxW, e.g. 64x64 or 352x640") from None
    if h < 1 or w < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: height and width must be >= 1")
    return h, w


# ----- output locations -----

def output_problem(path, *, inside: bool = True) -> str | None:
    """Why `path` cannot be written, or None when it can.

    inside=True: `path` is a folder the tool writes into (created if missing); inside=False: `path` itself is
    created or replaced next to its siblings (a file, or a folder renamed into place), so its parent must be
    writable. The nearest existing folder is probed by creating and removing a hidden empty folder in it: that is
    what the write will do, and it answers for a read-only file system and for root, where permission bits do not.
    """
    p = Path(path).expanduser().absolute()
    if inside and p.exists() and not p.is_dir():
        return f"{p} is a file, not a folder; pass a folder"
    start = p if inside else p.parent
    existing = start
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, so nothing can be created below it; choose another location"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".decmem-write-check-", dir=existing))
    except OSError as e:
        why = {errno.EROFS: "it is on a read-only file system", errno.EACCES: "no write permission",
               errno.EPERM: "no write permission", errno.ENOSPC: "the disk is full"}.get(e.errno, e.strerror or str(e))
        return f"cannot write in {existing}: {why}; choose another location"
    return None


# ----- absl tools configured by ml_collections files -----

@contextlib.contextmanager
def configs_importable(config_file):
    """While a run config file loads, puts the folder that holds its configs/ folder first on sys.path, so that its
    `from configs import common` finds the common.py next to it: configs/ is no installed package, and a tool may run
    from any working directory. sys.path is restored afterwards (the loaded modules stay in sys.modules)."""
    root = str(Path(config_file).expanduser().absolute().parent.parent)
    added = root not in sys.path
    if added:
        sys.path.insert(0, root)
    try:
        yield
    finally:
        if added:
            sys.path.remove(root)


def define_config_flag(name: str, default: str | None, help_string: str, *, lock_config: bool = True):
    """`ml_collections.config_flags.DEFINE_config_file` whose file (`path/to/config.py[:arg]`) is loaded under
    `configs_importable`; returns the flag holder."""
    from absl import flags
    from ml_collections import config_flags

    class ConfigFileParser(flags.ArgumentParser):  # ml_collections' own parser (not exported), run inside the context
        def __init__(self, inner):
            self.inner = inner

        def parse(self, argument):
            with configs_importable(str(argument).split(":", 1)[0]):
                return self.inner.parse(argument)

        def flag_type(self):
            return self.inner.flag_type()

    # Defined without a default, given our parser, then the default: a default is loaded as soon as it is set.
    holder = config_flags.DEFINE_config_file(name, None, help_string, lock_config=lock_config)
    flags.FLAGS[name].parser = ConfigFileParser(flags.FLAGS[name].parser)
    if default is not None:
        flags.FLAGS.set_default(name, default)
    # absl's --help lists the flags of the module that defined them, which is this one: make it a key flag of the
    # calling CLI too (absl names a __main__ module by sys.argv[0]), or `--help` would not show --config at all.
    caller = sys._getframe(1).f_globals.get("__name__", "")
    flags.FLAGS.register_key_flag_for_module(sys.argv[0] if caller == "__main__" else caller, flags.FLAGS[name])
    return holder


def _config_fields(node) -> list[str] | None:
    """The field names of a config node, or None where `--config.x` overrides are not checked (a leaf, a dataclass,
    a list)."""
    keys = getattr(node, "keys", None)
    if keys is None or isinstance(node, (str, bytes)):
        return None
    try:
        return [str(k) for k in keys()]
    except Exception:  # noqa: BLE001 -- e.g. an unloadable config; the caller reports that instead
        return None


def _all_paths(node, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for name in _config_fields(node) or ():
        path = prefix + (name,)
        out.append(path)
        out += _all_paths(node[name], path)
    return out


def unknown_field(config, field_path: str, flag: str = "config") -> str | None:
    """A one-line message for `--{flag}.{field_path}` when the config has no such field (with the closest field
    names as "did you mean"), or None when the field exists or the path cannot be checked."""
    node, walked = config, []
    for part in field_path.split("."):
        if "[" in part:  # indexing into a list field: ml_collections checks it
            return None
        fields = _config_fields(node)
        if fields is None:
            return None
        if part not in fields:
            where = ".".join([flag, *walked])
            # The right name at another level first (--config.steps for --config.train.steps), then near spellings
            # here, then near spellings anywhere.
            paths = _all_paths(config)
            near = [f"--{flag}." + ".".join(p) for p in paths if p[-1] == part]
            near += [f"--{where}.{f}" for f in difflib.get_close_matches(part, fields, n=3, cutoff=0.6)]
            if not near:
                near = [f"--{flag}." + ".".join(p) for p in paths
                        if difflib.get_close_matches(part, [p[-1]], cutoff=0.8)]
            near = list(dict.fromkeys(near))[:3]
            hint = (f"did you mean {' or '.join(near)}?" if near else
                    f"its fields are {', '.join(sorted(fields)[:12])}{', ...' if len(fields) > 12 else ''}")
            return f"--{flag}.{field_path}: {where} has no field {part!r}; {hint}"
        node = node[part]
        walked.append(part)
    return None


def config_override_problems(argv, flag_values=None) -> list[str]:
    """One message per `--NAME.x=...` argument that names a field the config loaded by `--NAME=FILE` does not have
    (NAME: every flag given such overrides, e.g. `config`). The config file is loaded again, without overrides."""
    from absl import flags

    flag_values = flag_values or flags.FLAGS
    problems = []
    for name in list(flag_values):
        overrides = [m.group(1) for m in (re.match(rf"^--?(?:no)?{re.escape(name)}\.([^=]+)", a) for a in argv) if m]
        value = _flag_argument(argv, name)
        if not overrides or value is None:
            continue
        try:
            config = flag_values[name].parser.parse(value)
            _config_fields(config)
        except Exception:  # noqa: BLE001 -- a broken config file is reported by the normal parse
            continue
        for field_path in overrides:
            problem = unknown_field(config, field_path, name)
            if problem and problem not in problems:
                problems.append(problem)
    return problems


def _flag_argument(argv, name: str) -> str | None:
    for i, arg in enumerate(argv):
        m = re.match(rf"^--?{re.escape(name)}(=(.*))?$", arg)
        if m:
            if m.group(1) is not None:
                return m.group(2)
            return argv[i + 1] if i + 1 < len(argv) else None
    return None


def _flag_error(message: str) -> str:
    """absl's wording -> `--flag: what is wrong`."""
    m = re.match(r"flag --(\S+?)=None: Flag --\S+ must have a value other than None\.?$", message)
    if m:
        return f"--{m.group(1)}: required (see --helpshort)"
    m = re.match(r"Unknown command line flag '([^']+)'(?:\. Did you mean: (.+?) \?)?$", message)
    if m:
        near = ", ".join(f"--{n.strip()}" for n in m.group(2).split(",")) if m.group(2) else None
        return f"--{m.group(1)}: unknown flag" + (f"; did you mean {near}?" if near else " (see --helpshort)")
    m = re.match(r"flag (--\S+?)(=\S*)?: (.*)", message, re.S)
    if m:
        return f"{m.group(1)}{m.group(2) or ''}: {m.group(3)}"
    return message


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parser for `app.run(main, flags_parser=parse_flags)`: absl's own parsing, but a bad flag or an
    unknown `--config.x` field ends in one line (`error: --config.train.stpes: config.train has no field 'stpes';
    did you mean --config.train.steps?`) and exit status 2 instead of a usage block or a traceback."""
    from absl import flags

    try:
        rest = flags.FLAGS(argv)
    except flags.Error as e:
        problems = config_override_problems(argv)
        sys.exit(fail(problems[0] if problems else _flag_error(str(e))))
    except (AttributeError, KeyError) as e:  # what ml_collections raises for an override of a missing field
        problems = config_override_problems(argv)
        if not problems:
            raise
        sys.exit(fail(problems[0]))
    for name in list(flags.FLAGS):  # a config file that could not be read is only reported when it is used
        value = flags.FLAGS[name].value
        if value is not None and type(value).__name__ == "_ErrorConfig":
            arg = _flag_argument(argv, name) or ""
            if not os.path.isfile(arg.split(":", 1)[0]):
                sys.exit(fail(f"--{name}={arg}: no such config file (the run configs are in configs/)"))
            try:
                value.keys()
            except OSError as e:
                sys.exit(fail(f"--{name}={arg}: cannot read the config file: {e.strerror or e}"))
    return rest


def check_data_csvs(config) -> None:
    """Checks, before a training run builds anything, that the CSVs a config reads are the kind it needs:
    `data.csv` and `data.eval_csv` must be latents CSVs (`format.check_index_csv`) when `data.source` is
    "latents". Raises ValueError naming the field and the file (e.g. a video CSV from build_csv passed by mistake,
    found otherwise only after the model was set up)."""
    data = config.get("data") if hasattr(config, "get") else None
    if data is None or data.get("source", "latents") != "latents":
        return
    from decmem_jax.format import check_index_csv

    for field in ("csv", "eval_csv"):
        path = data.get(field)
        if path:
            try:
                check_index_csv(path, "latents")
            except ValueError as e:
                raise ValueError(f"--config.data.{field}: {e}") from None


# ----- console scripts (pyproject.toml [project.scripts]) -----

def _run_as_main(module: str) -> None:
    """Runs `module` as `python -m module` does (its `if __name__ == "__main__":` block included)."""
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def rollout() -> None:
    _run_as_main("decmem_jax.rollout")


def train() -> None:
    _run_as_main("decmem_jax.train")


def train_vae() -> None:
    _run_as_main("decmem_jax.train.vae")


def evaluate() -> None:
    _run_as_main("decmem_jax.eval")


def play() -> None:
    _run_as_main("decmem_jax.play")
