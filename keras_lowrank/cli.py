"""The `keras-lowrank` command line.

Subcommands:

- `keras-lowrank demo`: train a tiny KerasHub Gemma on a synthetic task A,
  adapt it to a shifted task B with an adapter, save, reload and check.
- `keras-lowrank inspect FILE.keras`: list the adapters a saved model holds.
- `keras-lowrank merge IN.keras OUT.keras`: fold the adapters into the base
  kernels and save a plain model.

Exit codes: 0 on success, 1 when a check fails or an operation cannot be
carried out, 2 on bad input (a missing or unreadable file, a bad option).

Keras is imported inside the command functions, after `--backend` has been
applied, and only `keras.ops` is used, so every command runs on JAX,
TensorFlow and PyTorch alike.
"""

import argparse
import os
import subprocess
import sys
import time

BACKENDS = ("jax", "tensorflow", "torch")

#: the built-in tiny Gemma of `demo`
TINY_GEMMA = {
    "vocabulary_size": 64,
    "num_layers": 2,
    "num_query_heads": 4,
    "num_key_value_heads": 1,
    "hidden_dim": 32,
    "intermediate_dim": 64,
    "head_dim": 8,
}
SEQ_LEN = 16
#: sequences per training set, and in the held-out task-B set
N_TRAIN = 512
N_EVAL = 128
BATCH_SIZE = 32
#: task A: target = (token + SHIFT_A) % V; task B: target = (token + SHIFT_B) % V
SHIFT_A = 1
SHIFT_B = 3
LR_BASE = 3e-3
LR_ADAPTER = 1e-2
#: largest |output difference| after a save/load round trip that counts as equal
MATCH_TOL = 1e-5


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
        help="adapt a tiny Gemma to a new synthetic task, save and reload it",
        description=(
            "Train a tiny KerasHub Gemma on task A (next token = token + "
            f"{SHIFT_A}), add an adapter, fine-tune it on task B (next token "
            f"= token + {SHIFT_B}), then save, reload and compare outputs."
        ),
    )
    demo.add_argument("--method", default="lora", help="adapter method (default: lora)")
    demo.add_argument("--rank", type=int, default=8, help="adapter rank (default: 8)")
    demo.add_argument(
        "--alpha", type=float, default=None, help="adapter scaling numerator (default: rank)"
    )
    demo.add_argument(
        "--base",
        choices=("float", "nf4", "int8", "int4"),
        default="float",
        help="storage of the frozen kernels: float (as they are), nf4 (QLoRA), int8 or int4 (default: float)",
    )
    demo.add_argument(
        "--backend",
        choices=BACKENDS,
        default=None,
        help="Keras backend (default: $KERAS_BACKEND or the Keras config)",
    )
    demo.add_argument(
        "--preset",
        default=None,
        metavar="HANDLE_OR_DIR",
        help=(
            "load GemmaCausalLM.from_preset(HANDLE_OR_DIR) instead of the "
            "built-in tiny model (real weights; task A training is then "
            "skipped unless --epochs-a is given)"
        ),
    )
    demo.add_argument(
        "--epochs-a", type=int, default=None, help="epochs of base training on task A (default: 4)"
    )
    demo.add_argument(
        "--epochs-b", type=int, default=4, help="epochs of adapter training on task B (default: 4)"
    )
    demo.add_argument("--out", default=os.path.join("runs", "demo"), help="output folder (default: runs/demo)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.set_defaults(func=cmd_demo)

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
    return parser


def main(argv=None):
    """Run `keras-lowrank` with the arguments `argv` (default: `sys.argv[1:]`).

    Returns the exit code (0 success, 1 failed check, 2 bad input) instead
    of exiting, so the function can be called in-process.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits on --help and on bad arguments
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    backend = getattr(args, "backend", None)
    if backend:
        code = _use_backend(backend, argv)
        if code is not None:
            return code
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
    import keras_lowrank_cli

    return keras_lowrank_cli.table(head, rows)


def _count(variables):
    total = 0
    for v in variables:
        n = 1
        for d in v.shape:
            n *= int(d)
        total += n
    return total


def _size(path):
    n = os.path.getsize(path)
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


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
def _synthetic(rng, n, vocab, shift):
    """`n` random token sequences; the target of each token is
    `(token + shift) % vocab`."""
    tokens = rng.integers(0, vocab, size=(n, SEQ_LEN)).astype("int32")
    x = {"token_ids": tokens, "padding_mask": (tokens * 0 + 1).astype("int32")}
    y = ((tokens + shift) % vocab).astype("int32")
    return x, y


def _compile(model, learning_rate):
    import keras

    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
    )


def _evaluate(model, x, y):
    result = model.evaluate(x, y, batch_size=BATCH_SIZE, verbose=0, return_dict=True)
    return float(result["loss"]), float(result["accuracy"])


def _build_model(preset):
    keras_hub = _import_hub(required=True)
    if preset:
        try:
            model = keras_hub.models.GemmaCausalLM.from_preset(preset, preprocessor=None)
        except Exception as e:
            raise UsageError(f"could not load preset {preset!r}: {type(e).__name__}: {e}") from None
    else:
        backbone = keras_hub.models.GemmaBackbone(**TINY_GEMMA)
        model = keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)
    return model


def cmd_demo(args):
    """`keras-lowrank demo`: adapt a tiny Gemma from task A to task B.

    Prints the adapter table, `loss before: X` / `loss after: Y` on held-out
    task-B data, saves `OUT/adapted.keras` and `OUT/adapter.safetensors`,
    reloads the `.keras` file and checks that the outputs match.
    """
    import warnings

    import keras
    import numpy as np
    from keras import ops

    import keras_lowrank

    if args.method not in keras_lowrank.methods():
        raise UsageError(
            f"unknown method {args.method!r}; available: {', '.join(keras_lowrank.methods())}"
        )
    if args.rank < 1:
        raise UsageError(f"--rank must be a positive integer, got {args.rank}")
    epochs_a = args.epochs_a if args.epochs_a is not None else (0 if args.preset else 4)
    if epochs_a < 0 or args.epochs_b < 0:
        raise UsageError("--epochs-a and --epochs-b must be >= 0")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create the output folder {args.out}: {e}") from None

    start = time.perf_counter()
    keras.utils.set_random_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model = _build_model(args.preset)
    vocab = min(int(model.backbone.vocabulary_size), TINY_GEMMA["vocabulary_size"])
    name = args.preset or "built-in tiny Gemma"
    print(f"keras {keras.__version__} on {keras.backend.backend()}; model: {name}, "
          f"{model.count_params():,} params")
    print(f"task A: next token = (token + {SHIFT_A}) mod {vocab}; "
          f"task B: next token = (token + {SHIFT_B}) mod {vocab}")
    xa, ya = _synthetic(rng, N_TRAIN, vocab, SHIFT_A)
    xb, yb = _synthetic(rng, N_TRAIN, vocab, SHIFT_B)
    xb_eval, yb_eval = _synthetic(rng, N_EVAL, vocab, SHIFT_B)

    # 1. Fully train the base on task A.
    if epochs_a:
        print(f"\n[1/4] training the base model on task A ({epochs_a} epochs)")
        _compile(model, LR_BASE)
        history = model.fit(
            xa, ya, batch_size=BATCH_SIZE, epochs=epochs_a, shuffle=False, verbose=1
        ).history
        print(f"task-A training loss: {history['loss'][-1]:.4f}  "
              f"accuracy: {history['accuracy'][-1]:.3f}")
    else:
        print("\n[1/4] task A training skipped")

    # 2. Add the adapters; only they train from here on.
    print(f"\n[2/4] enable_adapter(method={args.method!r}, rank={args.rank}, alpha={args.alpha}, "
          f"base={args.base!r})")
    with warnings.catch_warnings():
        # KerasHub tasks override compile(); Keras warns that it cannot
        # recompile them from their config. We compile again just below.
        warnings.filterwarnings("ignore", message=".*compile\\(\\)` was not called.*")
        try:
            summary = keras_lowrank.enable_adapter(
                model, method=args.method, rank=args.rank, alpha=args.alpha, base=args.base
            )
        except (ValueError, TypeError) as e:
            raise UsageError(str(e)) from None
    print(summary)
    _compile(model, LR_ADAPTER)

    # 3. Fine-tune the adapters on task B.
    loss_before, acc_before = _evaluate(model, xb_eval, yb_eval)
    print(f"\n[3/4] training the adapters on task B ({args.epochs_b} epochs)")
    print(f"loss before: {loss_before:.4f}")
    print(f"accuracy before: {acc_before:.3f}")
    if args.epochs_b:
        model.fit(xb, yb, batch_size=BATCH_SIZE, epochs=args.epochs_b, shuffle=False, verbose=1)
    loss_after, acc_after = _evaluate(model, xb_eval, yb_eval)
    print(f"loss after: {loss_after:.4f}")
    print(f"accuracy after: {acc_after:.3f}")

    # 4. Save, reload, compare.
    print("\n[4/4] saving and reloading")
    keras_path = os.path.join(args.out, "adapted.keras")
    model.save(keras_path)
    reloaded = _load_model(keras_path)
    sample = {k: v[:8] for k, v in xb_eval.items()}
    # predict_on_batch runs the compiled predict step (much faster than an
    # eager call on JAX, which compiles every op on first use).
    y0 = ops.cast(model.predict_on_batch(sample), "float32")
    y1 = ops.cast(reloaded.predict_on_batch(sample), "float32")
    diff = float(ops.convert_to_numpy(ops.max(ops.abs(y0 - y1))))
    n_adapters = len(keras_lowrank.adapters(reloaded))
    print(f"saved {keras_path}; reloaded with {n_adapters} adapters")
    print(f"max abs difference of the outputs: {diff:.3g}")
    match = diff <= MATCH_TOL and n_adapters == len(summary.rows)
    print(f"outputs match: {'yes' if match else 'no'}")

    adapter_path = os.path.join(args.out, "adapter.safetensors")
    try:
        keras_lowrank.save_adapter(model, adapter_path)
    except ImportError:
        print("adapter-only file skipped (pip install safetensors)")
    else:
        ratio = os.path.getsize(adapter_path) / os.path.getsize(keras_path)
        print(f"adapter only: {adapter_path} ({_size(adapter_path)}) vs full model: "
              f"{keras_path} ({_size(keras_path)}), {100 * ratio:.1f}% of its size")
    print(f"done in {time.perf_counter() - start:.1f} s")
    if not match:
        raise CheckFailed("the reloaded model does not reproduce the outputs")
    return 0


# ----------------------------------------------------------------------
# inspect
def cmd_inspect(args):
    """`keras-lowrank inspect FILE`: list the adapters of a `.keras` model or
    an adapter file, from the file's metadata (Keras is not needed)."""
    import keras_lowrank_cli

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
    rows = [(path, a.method, str(getattr(a, "rank", "-")), a.geometry.matrix_text()) for path, a in found]
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


if __name__ == "__main__":
    sys.exit(main())
