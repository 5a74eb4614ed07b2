"""The `keras-lowrank` command: its arguments, and what it can answer without Keras.

`keras-lowrank --help` and `keras-lowrank inspect FILE` import neither
Keras nor a backend, so they answer in well under a second: `inspect`
reads an adapter file (`.safetensors`) or a `.keras` model from its
metadata alone. `methods` reads the registry, which is declared on the
methods' layer classes and so imports Keras; every other command runs in
`keras_lowrank.cli`.

This module sits beside the `keras_lowrank` package, not in it: importing
the package imports Keras and a backend (except while `python -m
keras_lowrank` starts, see `keras_lowrank/__init__.py`). It imports
`keras_lowrank.cli` when a command needs it; what both use (the exit-code
exceptions, tables) is in `keras_lowrank_cli_common`, which imports
neither, so the dependency goes one way.

Exit codes: 0 on success, 1 when a check fails or an operation cannot be
carried out, 2 on bad input (bad arguments, a missing, unreadable or
existing file, an option the library refuses), with one line on stderr and
no traceback. When the reader of the output goes away (`... | head`), the
command stops quietly with exit code 2.
"""

import argparse
import json
import os
import sys
import zipfile

from keras_lowrank_cli_common import CheckFailed
from keras_lowrank_cli_common import FileError
from keras_lowrank_cli_common import PROG
from keras_lowrank_cli_common import UsageError
from keras_lowrank_cli_common import format_method
from keras_lowrank_cli_common import table

ADAPTER_FORMAT = "keras_lowrank.adapter"


def _rows_from_plan(plan):
    rows = []
    layers = plan.get("layers", {})
    if not isinstance(layers, dict):
        raise FileError("the adapter plan's layers are malformed")
    for key, cfg in layers.items():
        if not isinstance(cfg, dict):
            raise FileError(f"the adapter plan's entry {key!r} is malformed")
        options = cfg.get("options")
        if not isinstance(options, dict):  # format 1: options beside the fields
            options = cfg
        trainable = cfg.get("trainable")
        rows.append(
            {
                # the layer's key, as adapter files and error messages name
                # it (the path of names, with the names Keras made up
                # replaced by positions: `dense[1]`, not `dense_3`)
                "layer": str(key),
                "method": str(cfg.get("method", "?")),
                "rank": options.get("rank"),
                "alpha": options.get("alpha"),
                "matrix": cfg.get("matrix", "?"),
                "base": cfg.get("base", "float"),
                "trainable": trainable,
            }
        )
    return rows


def describe_adapter_file(path):
    """What an adapter file holds, from its metadata (no tensor is read)."""
    try:
        from safetensors import safe_open
    except ImportError:
        raise FileError("reading adapter files needs safetensors: pip install safetensors") from None
    try:
        with safe_open(path, framework="np") as f:
            meta = f.metadata() or {}
            stored = 0
            for k in f.keys():
                n = 1
                for d in f.get_slice(k).get_shape():
                    n *= int(d)
                stored += n
    except Exception as e:
        raise FileError(f"could not read {path}: {type(e).__name__}: {e}") from None
    if meta.get("format") != ADAPTER_FORMAT:
        raise FileError(f"{path} is a safetensors file but not a keras_lowrank adapter file")
    try:
        plan = json.loads(meta.get("plan", ""))
    except ValueError:
        raise FileError(f"{path}: the adapter plan is not valid JSON") from None
    if not isinstance(plan, dict):
        raise FileError(f"{path}: the adapter plan is malformed")
    return {
        "kind": "adapter file",
        "model": meta.get("model", "?"),
        "format": meta.get("version", "?"),
        "rows": _rows_from_plan(plan),
        "stored_values": stored,
        "trainable_layers": plan.get("trainable_layers"),
        "total_params": plan.get("total_params"),
        "trainable_params": plan.get("trainable_params"),
    }


def _find_plans(node, found):
    if isinstance(node, dict):
        if node.get("registered_name") == "keras_lowrank>AdaptedModel":
            cfg = node.get("config", {})
            if isinstance(cfg, dict) and isinstance(cfg.get("adapters"), dict):
                found.append((node, cfg["adapters"]))
        for value in node.values():
            _find_plans(value, found)
    elif isinstance(node, list):
        for value in node:
            _find_plans(value, found)


def describe_keras_file(path):
    """What a `.keras` model holds, from its `config.json` (no Keras)."""
    try:
        with zipfile.ZipFile(path) as z:
            config = json.loads(z.read("config.json"))
            meta = json.loads(z.read("metadata.json")) if "metadata.json" in z.namelist() else {}
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as e:
        raise FileError(f"could not load {path}: {type(e).__name__}: {e}") from None
    found = []
    _find_plans(config, found)
    rows = []
    total = trainable = None
    for _, plan in found:
        rows.extend(_rows_from_plan(plan))
        total = plan.get("total_params", total)
        trainable = plan.get("trainable_params", trainable)
    model = config.get("class_name", "?")
    return {
        "kind": ".keras model",
        "model": model,
        "name": config.get("config", {}).get("name") if isinstance(config.get("config"), dict) else None,
        "keras_version": meta.get("keras_version"),
        "rows": rows,
        "total_params": total,
        "trainable_params": trainable,
    }


def describe(path):
    """`describe_keras_file` or `describe_adapter_file`, by the file's kind."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileError(f"no such file: {path}")
    if os.path.isdir(path):
        raise FileError(f"expected a file, got the folder {path}")
    if zipfile.is_zipfile(path):
        return describe_keras_file(path)
    if str(path).endswith(".keras"):
        raise FileError(f"could not load {path}: not a .keras (zip) file")
    return describe_adapter_file(path)


def _fmt(value, spec=""):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return format(value, spec) if spec else str(value)


def inspect(path, out=None):
    """Print the adapters of a `.keras` model or an adapter file."""
    out = sys.stdout if out is None else out
    info = describe(path)
    size = os.path.getsize(path)
    head = f"{path}: {info['kind']}"
    if info["kind"] == "adapter file":
        head += f" (format {info['format']}) for a {info['model']}"
    else:
        head += f", {info['model']}"
        if info.get("name"):
            head += f" {info['name']!r}"
        if info.get("keras_version"):
            head += f", saved by Keras {info['keras_version']}"
    print(f"{head}; {size:,} bytes", file=out)
    rows = info["rows"]
    if not rows:
        print("no adapters in this model", file=out)
        return 0
    body = [
        (r["layer"], r["method"], _fmt(r["rank"]), _fmt(r["alpha"]), str(r["matrix"]),
         str(r["base"]), _fmt(r["trainable"], ","))
        for r in rows
    ]
    print(table(("layer", "method", "rank", "alpha", "matrix", "base", "trainable"), body), file=out)
    methods = sorted({r["method"] for r in rows})
    known = [r["trainable"] for r in rows if isinstance(r["trainable"], int)]
    line = f"adapters: {len(rows)} ({', '.join(methods)})"
    if len(known) == len(rows):
        line += f"   adapter params: {sum(known):,}"
    if info.get("trainable_params") is not None and info.get("total_params"):
        t, n = info["trainable_params"], info["total_params"]
        line += f"   trainable params: {t:,} / {n:,} ({100 * t / n:.3f}%)"
    print(line, file=out)
    return 0


# ----------------------------------------------------------------------
# keras-lowrank methods [NAME]
def methods(name=None, out=None):
    """Print every method with its one-line description, or one method's
    options (`name`), from the registry (this imports Keras: the methods
    are declared on their layer classes)."""
    out = sys.stdout if out is None else out
    import keras_lowrank

    names = keras_lowrank.methods()
    if name is None:
        rows = [(n, keras_lowrank.method_info(n).description) for n in names]
        print(table(("method", "description"), rows), file=out)
        print(f"\n{len(names)} methods; `{PROG} methods NAME` lists a method's options.", file=out)
        return 0
    if name not in names:
        raise UsageError(f"unknown method {name!r}; available methods: {', '.join(names)}")
    print(format_method(keras_lowrank.method_info(name).to_dict()), file=out)
    return 0


# ----------------------------------------------------------------------
# Arguments
class _Parser(argparse.ArgumentParser):
    """An `ArgumentParser` whose errors are one line on stderr (exit 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


#: what each command takes, in the order `--help` and the README list them
COMMANDS = {
    "demo": ("[OPTIONS]", "the main job: adapt a tiny Gemma to a new synthetic task, save, reload, "
             f"merge ({PROG} demo --help lists its options)"),
    "methods": ("[NAME]", "list the adapter methods, or one method's options with their "
                "defaults"),
    "inspect": ("FILE", "list the adapters of a .keras model or an adapter file (no Keras needed)"),
    "merge": ("IN.keras OUT.keras", "fold the adapters of a .keras model into its kernels and save it"),
    "spectrum": ("FILE.keras [--plot OUT.png] [--range LOW HIGH] [--targets PATTERN ...]",
                 "singular values of every Dense/EinsumDense kernel of a .keras model"),
    "peft-import": ("ADAPTER_DIR MODEL_DIR OUT.keras",
                    "put a PEFT adapter onto the KerasHub model converted from its Hugging Face "
                    "checkpoint, and save it as .keras"),
    "peft-export": ("MODEL.keras MODEL_DIR OUT_DIR",
                    "write the adapters of a .keras KerasHub model as a PEFT adapter directory"),
}


def synopsis():
    """`keras-lowrank COMMAND ARGS` for every command (what `--help` and the
    README show)."""
    return [f"{PROG} {name} {args}" for name, (args, _) in COMMANDS.items()]


def build_parser():
    """The `argparse` parser of `keras-lowrank`."""
    parser = _Parser(
        prog=PROG,
        description="Low-rank adapters (LoRA, DoRA, PiSSA, ...) for Keras 3.",
        epilog="commands:\n" + "\n".join(f"  {line}" for line in synopsis())
        + f"\n\n`{PROG} COMMAND --help` describes a command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    helps = {name: help_ for name, (_, help_) in COMMANDS.items()}

    sub.add_parser("demo", add_help=False, help=helps["demo"])  # main() passes its arguments on

    methods_ = sub.add_parser("methods", help=helps["methods"])
    methods_.add_argument("name", metavar="NAME", nargs="?", default=None,
                          help="a method: list its options, defaults, allowed values and meaning")

    inspect_ = sub.add_parser("inspect", help=helps["inspect"])
    inspect_.add_argument("file", metavar="FILE")

    merge = sub.add_parser("merge", help=helps["merge"])
    merge.add_argument("input", metavar="IN.keras")
    merge.add_argument("output", metavar="OUT.keras")

    spec = sub.add_parser("spectrum", help=helps["spectrum"])
    spec.add_argument("file", metavar="FILE.keras")
    spec.add_argument("--plot", metavar="OUT.png", default=None, help="also draw them (needs matplotlib)")
    spec.add_argument("--range", nargs=2, type=float, metavar=("LOW", "HIGH"), default=(0.1, 1.1),
                      help="report the share of singular values in [LOW, HIGH] (default 0.1 1.1)")
    spec.add_argument("--targets", nargs="+", default=None, metavar="PATTERN",
                      help="only these layers (names, paths, globs, re:regexes)")

    pimport = sub.add_parser("peft-import", help=helps["peft-import"])
    pimport.add_argument("adapter", metavar="ADAPTER_DIR", help="the PEFT adapter directory")
    pimport.add_argument("model_dir", metavar="MODEL_DIR", help="the Hugging Face model directory")
    pimport.add_argument("output", metavar="OUT.keras")

    pexport = sub.add_parser("peft-export", help=helps["peft-export"])
    pexport.add_argument("input", metavar="MODEL.keras")
    pexport.add_argument("model_dir", metavar="MODEL_DIR",
                         help="the Hugging Face model directory the model was converted from")
    pexport.add_argument("output", metavar="OUT_DIR", help="the folder to write (created if needed)")
    return parser


# ----------------------------------------------------------------------
# Running a command
def _one_line(error):
    text = " ".join(str(error).split())
    return text or type(error).__name__


def _stdout_gone():
    """The reader of stdout went away: send what is left to /dev/null, so
    that Python's own flush at exit does not complain either."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass  # not a real file (a test's capture): nothing is flushed at exit


def run(command, fn, *args):
    """`fn(*args)` as the command `command`: its refusals become one line on
    stderr and an exit code (2: bad input, including the library's
    `ValueError`/`TypeError`/`OSError`; 1: a failed check); a closed stdout
    ends it quietly (2)."""
    label = f"{PROG} {command}" if command else PROG
    try:
        code = fn(*args)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        _stdout_gone()
        return 2
    except CheckFailed as e:
        print(f"{label}: failed: {_one_line(e)}", file=sys.stderr)
        return 1
    except FileExistsError as e:
        what = f"{e.filename} already exists" if e.filename else _one_line(e)
        print(f"{label}: error: {what}", file=sys.stderr)
        return 2
    except OSError as e:
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"{label}: error: {where}{_one_line(e.strerror or e)}", file=sys.stderr)
        return 2
    except (UsageError, FileError, ValueError, TypeError) as e:
        print(f"{label}: error: {_one_line(e)}", file=sys.stderr)
        return 2


def main(argv=None):
    """Run `keras-lowrank` with the arguments `argv` (default: `sys.argv[1:]`).

    `--help` and `inspect` run here, without Keras; `methods` reads the
    registry (Keras); the other
    commands run in `keras_lowrank.cli`, which imports it. Returns the exit
    code (0 success, 1 failed check, 2 bad input) instead of exiting.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:  # every argument after "demo" goes to the example
        return run("demo", _keras_command("demo"), argv[1:])
    parsed = []

    def parse():
        try:
            parsed.append(build_parser().parse_args(argv))
            return 0
        except SystemExit as e:  # argparse exits on --help and on bad arguments
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)

    code = run(None, parse)
    if not parsed:
        return code
    args = parsed[0]
    if args.command == "methods":
        return run(args.command, methods, args.name)
    if args.command == "inspect":
        return run(args.command, inspect, args.file)
    return run(args.command, _keras_command(args.command), args)


def _keras_command(name):
    """`keras_lowrank.cli.cmd_<name>`: imported here, not at the top, since
    everything in keras_lowrank imports Keras."""
    from keras_lowrank import cli

    return getattr(cli, "cmd_" + name.replace("-", "_"))


if __name__ == "__main__":
    sys.exit(main())
