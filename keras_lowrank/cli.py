"""The `keras-lowrank` command line: the commands that need Keras.

The entry point, the arguments and `--help` are in `keras_lowrank_cli`,
which answers `--help`, `methods` and `inspect` without importing Keras and
imports this module for the other commands (`cmd_<command>`); what both
use (the exit-code exceptions, tables) is in `keras_lowrank_cli_common`,
so nothing here imports `keras_lowrank_cli`. The subcommands:

- `keras-lowrank demo [ARGS]`: the main job, `examples/finetune_gemma.py`
  (installed as `keras_lowrank.examples.finetune_gemma`): train a tiny
  KerasHub Gemma on a synthetic task A, adapt it to a shifted task B with an
  adapter, save, reload, save the adapter alone, merge, and check.
- `keras-lowrank methods [NAME]`: the adapter methods, or one method's
  options with their defaults, allowed values and meaning.
- `keras-lowrank inspect FILE`: list the adapters of a `.keras` model or an
  adapter file, from its metadata, without Keras.
- `keras-lowrank merge IN.keras OUT.keras`: fold the adapters into the base
  kernels and save a plain model.
- `keras-lowrank spectrum FILE.keras [--plot OUT.png]`: the singular values
  of every Dense/EinsumDense kernel (matrix view), with the share inside a
  range (`--range 0.1 1.1`), and optionally their plot (matplotlib).
- `keras-lowrank peft-import ADAPTER_DIR MODEL_DIR OUT.keras`: a PEFT
  adapter put onto the KerasHub model converted from the Hugging Face model
  in MODEL_DIR, saved as `.keras`.
- `keras-lowrank peft-export MODEL.keras MODEL_DIR OUT_DIR`: the adapters of a
  KerasHub model as a PEFT adapter directory.

Exit codes: 0 on success, 1 when a check fails or an operation cannot be
carried out, 2 on bad input (bad arguments, a missing, unreadable or
existing file, an option the library refuses), always with one line on
stderr and no traceback.

Keras is imported inside the command functions, after `--backend` has been
applied (a different backend than the running one re-runs the command in a
fresh interpreter), so every command runs on JAX, TensorFlow and PyTorch.
"""

import argparse
import os
import subprocess
import sys

from keras_lowrank_cli_common import BACKENDS
from keras_lowrank_cli_common import CheckFailed
from keras_lowrank_cli_common import UsageError
from keras_lowrank_cli_common import table


def _library():
    """The `keras_lowrank` package with everything in it (its layers
    registered with Keras, `Model.enable_adapter` added): under `python -m
    keras_lowrank` it is loaded only when a command needs it."""
    import keras_lowrank

    keras_lowrank.enable_adapter  # noqa: B018  (loads the package if it waited)
    return keras_lowrank


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
    if not os.path.exists(path):
        raise UsageError(f"no such file: {path}")
    if os.path.isdir(path) or not str(path).endswith(".keras"):
        raise UsageError(f"expected a .keras model file, got {path}")
    _library()  # registers the adapter classes
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
    _library()
    from keras_lowrank.examples import finetune_gemma

    return finetune_gemma.main(argv, prog="keras-lowrank demo")


# ----------------------------------------------------------------------
# merge
def cmd_merge(args):
    """`keras-lowrank merge IN.keras OUT.keras`: fold the adapters into the
    kernels and save a model without keras-lowrank layers.

    OUT is written to a temporary file beside it and renamed into place, so
    a failed write keeps both files as they were; IN and OUT may be the same
    file."""
    _check_output_path(args.output)
    model = _load(args.input)
    keras_lowrank = _library()
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
    print(table(("merged layer", "method", "rank", "matrix"), rows))
    print(f"merged {len(rows)} adapters into their kernels; saved {args.output} "
          f"({_count(model.weights):,} params, plain Dense/EinsumDense layers)")
    return 0


# ----------------------------------------------------------------------
# spectrum
def cmd_spectrum(args):
    """`keras-lowrank spectrum FILE.keras [--plot OUT.png]`."""
    import numpy as np

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
    keras_lowrank = _library()
    try:
        spectra = keras_lowrank.spectrum(model, targets=args.targets)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None
    rows = []
    for path, values in spectra.items():
        v = np.ravel(values)
        rows.append((path, "x".join(str(d) for d in values.shape), f"{v.max():.4g}", f"{v.min():.4g}",
                     f"{100 * keras_lowrank.spectrum_share(values, low, high):.1f}%"))
    print(table(("layer", "values", "largest", "smallest", f"in [{low:g}, {high:g}]"), rows))
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
# The library's refusals (ValueError, TypeError, OSError: a malformed
# adapter directory, a module PEFT cannot hold) become one line and exit
# code 2 in `keras_lowrank_cli.run`.
def cmd_peft_import(args):
    """`keras-lowrank peft-import ADAPTER_DIR MODEL_DIR OUT.keras`: the
    KerasHub model converted from MODEL_DIR (a causal LM when the family has
    one, else the backbone) with the PEFT adapter on it, saved as OUT."""
    _check_output_path(args.output)
    if not os.path.isdir(args.adapter):
        raise UsageError(f"{args.adapter} is not a PEFT adapter directory")
    if not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        raise UsageError(f"{args.model_dir} is not a Hugging Face model directory (no config.json)")
    keras_lowrank = _library()
    keras_hub = _import_hub(required=True)
    try:
        model = keras_hub.models.CausalLM.from_preset(args.model_dir, preprocessor=None)
    except (ValueError, KeyError, AttributeError):
        model = keras_hub.models.Backbone.from_preset(args.model_dir)
    keras_lowrank.load_peft_adapter(model, args.adapter, args.model_dir)
    _save_atomically(model, args.output)
    found = keras_lowrank.adapters(model)
    print(f"loaded {len(found)} PEFT modules onto {type(model).__name__}; saved {args.output}")
    return 0


def cmd_peft_export(args):
    """`keras-lowrank peft-export MODEL.keras MODEL_DIR OUT_DIR`: the
    adapters of MODEL as a PEFT adapter directory for the Hugging Face model
    in MODEL_DIR (OUT_DIR is created; in an existing folder the adapter's
    two files are replaced)."""
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise UsageError(f"{args.output} already exists and is not a folder")
    if not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        raise UsageError(f"{args.model_dir} is not a Hugging Face model directory (no config.json)")
    model = _load(args.input)
    keras_lowrank = _library()
    if not keras_lowrank.adapters(model):
        raise UsageError(f"{args.input} has no adapters to export")
    keras_lowrank.save_peft_adapter(model, args.output, args.model_dir)
    print(f"wrote {len(keras_lowrank.adapters(model))} adapters as a PEFT adapter directory: {args.output}")
    return 0
