"""The `keras-lowrank` command line.

Subcommands:

- `keras-lowrank demo [ARGS]`: the main job, `examples/finetune_gemma.py`
  (installed as `keras_lowrank.examples.finetune_gemma`): train a tiny
  KerasHub Gemma on a synthetic task A, adapt it to a shifted task B with an
  adapter, save, reload, save the adapter alone, merge, and check.
- `keras-lowrank inspect FILE`: list the adapters of a `.keras` model or an
  adapter file, from its metadata, without Keras (`keras_lowrank_cli`).
- `keras-lowrank merge IN.keras OUT.keras`: fold the adapters into the base
  kernels and save a plain model.
- `keras-lowrank spectrum FILE.keras [--plot OUT.png]`: the singular values
  of every Dense/EinsumDense kernel (matrix view), with the share inside a
  range (`--range 0.1 1.1`), and optionally their plot (matplotlib).
- `keras-lowrank peft-import ADAPTER_DIR MODEL_DIR OUT.keras`: a PEFT LoRA/DoRA
  adapter put onto the KerasHub model converted from the Hugging Face model
  in MODEL_DIR, saved as `.keras`.
- `keras-lowrank peft-export MODEL.keras MODEL_DIR OUT_DIR`: the adapters of a
  KerasHub model as a PEFT adapter directory.

Exit codes: 0 on success, 1 when a check fails or an operation cannot be
carried out, 2 on bad input (a missing or unreadable file, a bad option).

Keras is imported inside the command functions, after `--backend` has been
applied (a different backend than the running one re-runs the command in a
fresh interpreter), so every command runs on JAX, TensorFlow and PyTorch.
"""

import argparse
import os
import subprocess
import sys

import keras_lowrank_cli

BACKENDS = ("jax", "tensorflow", "torch")


class UsageError(Exception):
    """Bad input from the user (exit code 2)."""


class CheckFailed(Exception):
    """An operation or a check failed on valid input (exit code 1)."""


# ----------------------------------------------------------------------
# Argument parsing
def build_parser():
    """The `argparse` parser of `keras-lowrank`."""
    parser = argparse.ArgumentParser(
        prog="keras-lowrank",
        description="Low-rank adapters (LoRA, DoRA, PiSSA, ...) for Keras 3.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    demo = sub.add_parser(
        "demo",
        add_help=False,
        help="the main job: adapt a tiny Gemma to a new synthetic task, save, reload, merge "
        "(keras-lowrank demo --help for its options)",
    )
    demo.set_defaults(func=None)  # main() hands every argument after "demo" to the example

    inspect = sub.add_parser(
        "inspect", help="list the adapters of a .keras model or an adapter file (no Keras needed)"
    )
    inspect.add_argument("file", metavar="FILE")
    inspect.set_defaults(func=cmd_inspect)

    merge = sub.add_parser(
        "merge", help="fold the adapters of a .keras model into its kernels and save it"
    )
    merge.add_argument("input", metavar="IN.keras")
    merge.add_argument("output", metavar="OUT.keras")
    merge.set_defaults(func=cmd_merge)

    spec = sub.add_parser(
        "spectrum", help="singular values of every Dense/EinsumDense kernel of a .keras model"
    )
    spec.add_argument("file", metavar="FILE.keras")
    spec.add_argument("--plot", metavar="OUT.png", default=None, help="also draw them (needs matplotlib)")
    spec.add_argument("--range", nargs=2, type=float, metavar=("LOW", "HIGH"), default=(0.1, 1.1),
                      help="report the share of singular values in [LOW, HIGH] (default 0.1 1.1)")
    spec.add_argument("--targets", nargs="+", default=None, metavar="PATTERN",
                      help="only these layers (names, paths, globs, re:regexes)")
    spec.set_defaults(func=cmd_spectrum)
    pimport = sub.add_parser(
        "peft-import",
        help="put a PEFT LoRA/DoRA adapter onto the KerasHub model converted from its "
        "Hugging Face checkpoint, and save it as .keras",
    )
    pimport.add_argument("adapter", metavar="ADAPTER_DIR", help="the PEFT adapter directory")
    pimport.add_argument("model_dir", metavar="MODEL_DIR", help="the Hugging Face model directory")
    pimport.add_argument("output", metavar="OUT.keras")
    pimport.set_defaults(func=cmd_peft_import)

    pexport = sub.add_parser(
        "peft-export",
        help="write the adapters of a .keras KerasHub model as a PEFT adapter directory",
    )
    pexport.add_argument("input", metavar="MODEL.keras")
    pexport.add_argument("model_dir", metavar="MODEL_DIR",
                         help="the Hugging Face model directory the model was converted from")
    pexport.add_argument("output", metavar="OUT_DIR")
    pexport.set_defaults(func=cmd_peft_export)
    return parser


def main(argv=None):
    """Run `keras-lowrank` with the arguments `argv` (default: `sys.argv[1:]`).

    Returns the exit code (0 success, 1 failed check, 2 bad input) instead
    of exiting, so the function can be called in-process.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo"]:
        return cmd_demo(argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits on --help and on bad arguments
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    try:
        return args.func(args)
    except UsageError as e:
        print(f"keras-lowrank {args.command}: error: {e}", file=sys.stderr)
        return 2
    except CheckFailed as e:
        print(f"keras-lowrank {args.command}: failed: {e}", file=sys.stderr)
        return 1


def _use_backend(backend, argv):
    """Select the Keras backend before Keras is imported.

    Returns `None` when this process can go on with `backend`, or the exit
    code of a fresh interpreter that ran the command: Keras fixes its backend
    when it is first imported, and `import keras_lowrank` (which runs before
    this module) has already imported it.
    """
    keras = sys.modules.get("keras")
    if keras is None:
        os.environ["KERAS_BACKEND"] = backend
        return None
    if keras.backend.backend() == backend:
        return None
    env = dict(os.environ, KERAS_BACKEND=backend)
    sys.stdout.flush()
    sys.stderr.flush()
    return subprocess.call([sys.executable, "-m", "keras_lowrank", *argv], env=env)


# ----------------------------------------------------------------------
# Helpers
def _table(head, rows):
    return keras_lowrank_cli.table(head, rows)


def _count(variables):
    total = 0
    for v in variables:
        n = 1
        for d in v.shape:
            n *= int(d)
        total += n
    return total


def _import_hub(required):
    try:
        import keras_hub
    except ImportError:
        if required:
            raise UsageError("this command needs keras-hub: pip install keras-hub") from None
        return None
    return keras_hub


def _load(path):
    """Load a `.keras` model (with its adapters); bad files are `UsageError`."""
    import keras

    import keras_lowrank  # noqa: F401  (registers the adapter classes)

    if not os.path.exists(path):
        raise UsageError(f"no such file: {path}")
    if os.path.isdir(path) or not str(path).endswith(".keras"):
        raise UsageError(f"expected a .keras model file, got {path}")
    _import_hub(required=False)  # registers the KerasHub classes, if any
    try:
        return _load_model(path)
    except Exception as e:
        raise UsageError(f"could not load {path}: {type(e).__name__}: {e}") from None


def _load_model(path):
    """`keras.saving.load_model` without the optimizer.

    The commands need no optimizer. KerasHub tasks compile themselves with a
    default optimizer when they are built, so Keras warns that it skips the
    saved optimizer's variables; that warning is expected here.
    """
    import warnings

    import keras

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        return keras.saving.load_model(path, compile=False)


def _check_output_path(path):
    if not str(path).endswith(".keras"):
        raise UsageError(f"the output file must end in .keras, got {path}")
    if os.path.isdir(path):
        raise UsageError(f"the output path is a folder: {path}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"the output folder does not exist: {folder}")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"the output folder is not writable: {folder}")


# ----------------------------------------------------------------------
# demo
def cmd_demo(argv):
    """`keras-lowrank demo ARGS`: `examples/finetune_gemma.py` with ARGS."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--backend", choices=BACKENDS, default=None)
    known, _ = pre.parse_known_args(argv)
    if known.backend:
        code = _use_backend(known.backend, ["demo", *argv])
        if code is not None:
            return code
    from keras_lowrank.examples import finetune_gemma

    return finetune_gemma.main(argv, prog="keras-lowrank demo")


# ----------------------------------------------------------------------
# inspect
def cmd_inspect(args):
    """`keras-lowrank inspect FILE`: list the adapters of a `.keras` model or
    an adapter file, from the file's metadata (Keras is not needed)."""
    try:
        return keras_lowrank_cli.inspect(args.file)
    except keras_lowrank_cli.FileError as e:
        raise UsageError(str(e)) from None


# ----------------------------------------------------------------------
# merge
def cmd_merge(args):
    """`keras-lowrank merge IN.keras OUT.keras`: fold the adapters into the
    kernels and save a model without keras-lowrank layers.

    OUT is written to a temporary file beside it and renamed into place, so
    a failed write keeps both files as they were; IN and OUT may be the same
    file."""
    import keras_lowrank

    _check_output_path(args.output)
    model = _load(args.input)
    found = keras_lowrank.adapters(model)
    if not found:
        raise UsageError(f"{args.input} has no adapters to merge")
    rows = [(path, a.method, str(a.summary_rank() or "-"), a.geometry.matrix_text()) for path, a in found]
    try:
        keras_lowrank.merge(model)
    except FloatingPointError as e:
        raise CheckFailed(str(e)) from None
    left = keras_lowrank.adapters(model)
    if left:
        raise CheckFailed(f"{len(left)} adapters were left after merging")
    _save_atomically(model, args.output)
    print(_table(("merged layer", "method", "rank", "matrix"), rows))
    print(f"merged {len(rows)} adapters into their kernels; saved {args.output} "
          f"({_count(model.weights):,} params, plain Dense/EinsumDense layers)")
    return 0


# ----------------------------------------------------------------------
# spectrum
def cmd_spectrum(args):
    """`keras-lowrank spectrum FILE.keras [--plot OUT.png]`."""
    import numpy as np

    import keras_lowrank

    low, high = args.range
    if not (np.isfinite(low) and np.isfinite(high) and 0 <= low < high):
        raise UsageError(f"--range needs 0 <= LOW < HIGH; got {low:g} {high:g}")
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("--plot needs matplotlib: pip install 'keras-lowrank[plot]'") from None
        folder = os.path.dirname(os.path.abspath(args.plot))
        if not os.path.isdir(folder):
            raise UsageError(f"the plot's folder does not exist: {folder}")
    model = _load(args.file)
    try:
        spectra = keras_lowrank.spectrum(model, targets=args.targets)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None
    rows = []
    for path, values in spectra.items():
        v = np.ravel(values)
        rows.append((path, "x".join(str(d) for d in values.shape), f"{v.max():.4g}", f"{v.min():.4g}",
                     f"{100 * keras_lowrank.spectrum_share(values, low, high):.1f}%"))
    print(_table(("layer", "values", "largest", "smallest", f"in [{low:g}, {high:g}]"), rows))
    share = keras_lowrank.spectrum_share(spectra, low, high)
    total = sum(int(np.size(v)) for v in spectra.values())
    print(f"{len(spectra)} kernels, {total:,} singular values, {100 * share:.1f}% in [{low:g}, {high:g}]")
    if args.plot is not None:
        keras_lowrank.plot_spectrum(spectra, args.plot, value_range=(low, high))
        print(f"plot saved to {args.plot}")
    return 0


def _save_atomically(model, path):
    """`model.save(path)` through a temporary file in the same folder."""
    import tempfile

    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".klr-", suffix=".keras", dir=folder)
        os.close(fd)
    except OSError as e:
        raise UsageError(f"cannot write in {folder}: {e.strerror or e}") from None
    try:
        model.save(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ----------------------------------------------------------------------
# peft-import / peft-export
def _peft_errors(fn, *args):
    try:
        return fn(*args)
    except (FileNotFoundError, ValueError) as e:
        raise UsageError(str(e)) from None


def cmd_peft_import(args):
    """`keras-lowrank peft-import ADAPTER_DIR MODEL_DIR OUT.keras`: the
    KerasHub model converted from MODEL_DIR (a causal LM when the family has
    one, else the backbone) with the PEFT adapter on it, saved as OUT."""
    import keras_hub

    import keras_lowrank

    _check_output_path(args.output)
    if not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        raise UsageError(f"{args.model_dir} is not a Hugging Face model directory (no config.json)")
    try:
        model = keras_hub.models.CausalLM.from_preset(args.model_dir, preprocessor=None)
    except (ValueError, KeyError, AttributeError):
        model = keras_hub.models.Backbone.from_preset(args.model_dir)
    _peft_errors(keras_lowrank.load_peft_adapter, model, args.adapter, args.model_dir)
    _save_atomically(model, args.output)
    found = keras_lowrank.adapters(model)
    print(f"loaded {len(found)} PEFT modules onto {type(model).__name__}; saved {args.output}")
    return 0


def cmd_peft_export(args):
    """`keras-lowrank peft-export MODEL.keras MODEL_DIR OUT_DIR`: the
    adapters of MODEL as a PEFT adapter directory for the Hugging Face model
    in MODEL_DIR."""
    import keras_lowrank

    model = _load(args.input)
    if not keras_lowrank.adapters(model):
        raise UsageError(f"{args.input} has no adapters to export")
    _peft_errors(keras_lowrank.save_peft_adapter, model, args.output, args.model_dir)
    print(f"wrote {len(keras_lowrank.adapters(model))} adapters as a PEFT LoRA directory: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
