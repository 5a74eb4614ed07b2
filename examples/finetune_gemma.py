"""The main job: fine-tune a tiny KerasHub Gemma with an adapter.

A tiny Gemma causal LM is built locally (no download) and trained on task A
(next token = token + 1); an adapter is put on every Dense/EinsumDense and
fine-tuned on task B (next token = token + 3); the model is saved as
`.keras`, reloaded (the outputs must match), saved as an adapter-only file,
merged into plain Keras layers (the outputs must match again), and the
merged model continues a prompt with `generate()`.

    python examples/finetune_gemma.py [--backend jax|tensorflow|torch]
        [--method lora] [--rank 8] [--alpha A] [--base float|nf4|int8|int4]
        [--epochs-a 4] [--epochs-b 4] [--preset HANDLE_OR_DIR] [--small]

The same script is `keras-lowrank demo ...` and `bash scripts/demo.sh ...`.
Exit codes: 0 success, 1 a check failed, 2 bad input.
"""

import argparse
import os
import sys
import time

BACKENDS = ("jax", "tensorflow", "torch")

#: the built-in tiny Gemma
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
BATCH_SIZE = 32
#: task A: target = (token + SHIFT_A) % V; task B: target = (token + SHIFT_B) % V
SHIFT_A = 1
SHIFT_B = 3
LR_BASE = 3e-3
LR_ADAPTER = 1e-2
#: largest |output difference| that counts as equal after a round trip
MATCH_TOL = 1e-5
#: largest |output difference| between the merged and the adapted model
MERGE_TOL = 1e-4


class UsageError(Exception):
    """Bad input from the user (exit code 2)."""


class CheckFailed(Exception):
    """A check failed on valid input (exit code 1)."""


def build_parser(prog=None):
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "Train a tiny KerasHub Gemma on task A (next token = token + "
            f"{SHIFT_A}), add an adapter, fine-tune it on task B (next token "
            f"= token + {SHIFT_B}), save, reload, save the adapter alone, merge."
        ),
    )
    parser.add_argument("--method", default="lora", help="adapter method (default: lora)")
    parser.add_argument("--rank", type=int, default=8, help="adapter rank (default: 8)")
    parser.add_argument("--alpha", type=float, default=None, help="scaling numerator (default: rank)")
    parser.add_argument(
        "--base", choices=("float", "nf4", "int8", "int4"), default="float",
        help="storage of the frozen kernels: float, nf4 (QLoRA), int8 or int4 (default: float)",
    )
    parser.add_argument(
        "--backend", choices=BACKENDS, default=None,
        help="Keras backend (default: $KERAS_BACKEND or the Keras config)",
    )
    parser.add_argument(
        "--preset", default=None, metavar="HANDLE_OR_DIR",
        help=("load GemmaCausalLM.from_preset(HANDLE_OR_DIR) instead of the built-in tiny "
              "model (real weights; task A training is then skipped unless --epochs-a is given)"),
    )
    parser.add_argument("--epochs-a", type=int, default=None, help="epochs on task A (default: 4)")
    parser.add_argument("--epochs-b", type=int, default=4, help="adapter epochs on task B (default: 4)")
    parser.add_argument("--small", action="store_true", help="a quarter of the data (quick checks, CI)")
    parser.add_argument("--out", default=os.path.join("runs", "demo"), help="output folder (default: runs/demo)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    return parser


def _synthetic(rng, n, vocab, shift):
    tokens = rng.integers(0, vocab, size=(n, SEQ_LEN)).astype("int32")
    x = {"token_ids": tokens, "padding_mask": (tokens * 0 + 1).astype("int32")}
    return x, ((tokens + shift) % vocab).astype("int32")


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


def _size(path):
    n = os.path.getsize(path)
    return f"{n:,} B" if n < 1024 else f"{n / 1024:.1f} KB" if n < 1024**2 else f"{n / 1024**2:.1f} MB"


def _load_model(path):
    """`keras.saving.load_model` without the optimizer (KerasHub tasks
    compile themselves when built, so Keras warns that it skips the saved
    optimizer's variables; expected here)."""
    import warnings

    import keras

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        return keras.saving.load_model(path, compile=False)


def _build_model(preset):
    try:
        import keras_hub
    except ImportError:
        raise UsageError("this example needs keras-hub: pip install keras-hub") from None
    if preset:
        try:
            return keras_hub.models.GemmaCausalLM.from_preset(preset, preprocessor=None)
        except Exception as e:
            raise UsageError(f"could not load preset {preset!r}: {type(e).__name__}: {e}") from None
    backbone = keras_hub.models.GemmaBackbone(**TINY_GEMMA)
    return keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)


def _max_diff(a, b):
    from keras import ops

    return float(ops.convert_to_numpy(ops.max(ops.abs(ops.cast(a, "float32") - ops.cast(b, "float32")))))


def run(args):
    """The job (see the module docstring); returns 0 or raises."""
    import warnings

    import keras
    import numpy as np

    import keras_lowrank

    if args.method not in keras_lowrank.methods():
        raise UsageError(f"unknown method {args.method!r}; available: {', '.join(keras_lowrank.methods())}")
    if args.rank < 1:
        raise UsageError(f"--rank must be a positive integer, got {args.rank}")
    epochs_a = args.epochs_a if args.epochs_a is not None else (0 if args.preset else 4)
    if epochs_a < 0 or args.epochs_b < 0:
        raise UsageError("--epochs-a and --epochs-b must be >= 0")
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create the output folder {args.out}: {e}") from None
    n_train, n_eval = (128, 32) if args.small else (512, 128)

    start = time.perf_counter()
    keras.utils.set_random_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    model = _build_model(args.preset)
    vocab = min(int(model.backbone.vocabulary_size), TINY_GEMMA["vocabulary_size"])
    print(f"keras {keras.__version__} on {keras.backend.backend()}; model: "
          f"{args.preset or 'built-in tiny Gemma'}, {model.count_params():,} params")
    print(f"task A: next token = (token + {SHIFT_A}) mod {vocab}; "
          f"task B: next token = (token + {SHIFT_B}) mod {vocab}")
    xa, ya = _synthetic(rng, n_train, vocab, SHIFT_A)
    xb, yb = _synthetic(rng, n_train, vocab, SHIFT_B)
    xb_eval, yb_eval = _synthetic(rng, n_eval, vocab, SHIFT_B)

    # 1. Train the base on task A (all its weights).
    if epochs_a:
        print(f"\n[1/5] training the base model on task A ({epochs_a} epochs)")
        _compile(model, LR_BASE)
        history = model.fit(xa, ya, batch_size=BATCH_SIZE, epochs=epochs_a, shuffle=False, verbose=1).history
        print(f"task-A training loss: {history['loss'][-1]:.4f}  accuracy: {history['accuracy'][-1]:.3f}")
    else:
        print("\n[1/5] task A training skipped")

    # 2. Adapters on every Dense/EinsumDense; only they train from here on.
    print(f"\n[2/5] enable_adapter(method={args.method!r}, rank={args.rank}, "
          f"alpha={args.alpha}, base={args.base!r})")
    with warnings.catch_warnings():
        # KerasHub tasks override compile(); we compile again just below.
        warnings.filterwarnings("ignore", message=".*compile\\(\\)` was not called.*")
        try:
            summary = keras_lowrank.enable_adapter(
                model, method=args.method, rank=args.rank, alpha=args.alpha, base=args.base,
                **_schedule_options(args.method, len(yb), args.epochs_b),
            )
        except (ValueError, TypeError) as e:
            raise UsageError(str(e)) from None
    print(summary)
    _compile(model, LR_ADAPTER)

    # 3. Fine-tune the adapters on task B.
    loss_before, acc_before = _evaluate(model, xb_eval, yb_eval)
    print(f"\n[3/5] training the adapters on task B ({args.epochs_b} epochs)")
    print(f"loss before: {loss_before:.4f}")
    print(f"accuracy before: {acc_before:.3f}")
    if args.epochs_b:
        model.fit(xb, yb, batch_size=BATCH_SIZE, epochs=args.epochs_b, shuffle=False, verbose=1)
    loss_after, acc_after = _evaluate(model, xb_eval, yb_eval)
    print(f"loss after: {loss_after:.4f}")
    print(f"accuracy after: {acc_after:.3f}")

    # 4. Save, reload (needs `import keras_lowrank`), compare; the adapter alone.
    print("\n[4/5] saving and reloading")
    keras_path = os.path.join(args.out, "adapted.keras")
    model.save(keras_path)
    reloaded = _load_model(keras_path)
    sample = {k: v[:8] for k, v in xb_eval.items()}
    # predict_on_batch runs the compiled predict step (much faster than an
    # eager call on JAX, which compiles every op on first use).
    y_adapted = model.predict_on_batch(sample)
    diff = _max_diff(y_adapted, reloaded.predict_on_batch(sample))
    n_adapters = len(keras_lowrank.adapters(reloaded))
    print(f"saved {keras_path}; reloaded with {n_adapters} adapters")
    print(f"max abs difference of the outputs: {diff:.3g}")
    match = diff <= MATCH_TOL and n_adapters == len(summary.rows)
    print(f"outputs match: {'yes' if match else 'no'}")
    adapter_path = os.path.join(args.out, "adapter.safetensors")
    keras_lowrank.save_adapter(model, adapter_path)
    ratio = os.path.getsize(adapter_path) / os.path.getsize(keras_path)
    print(f"adapter only: {adapter_path} ({_size(adapter_path)}) vs full model: "
          f"{keras_path} ({_size(keras_path)}), {100 * ratio:.1f}% of its size")

    # 5. Merge into plain Keras layers, for serving.
    print("\n[5/5] merging the adapters into the kernels")
    keras_lowrank.merge(reloaded)
    merged_diff = _max_diff(y_adapted, reloaded.predict_on_batch(sample))
    left = len(keras_lowrank.adapters(reloaded))
    print(f"adapters left: {left}; max abs difference merged vs adapted: {merged_diff:.3g}")
    # generate() on the merged model: task B continues a prompt by + SHIFT_B
    prompt = xb_eval["token_ids"][:1, :4]
    length = 8
    padded = np.zeros((1, length), "int32")
    padded[:, :4] = prompt
    mask = np.zeros((1, length), "int32")
    mask[:, :4] = 1
    generated = keras.ops.convert_to_numpy(reloaded.generate(
        {"token_ids": padded, "padding_mask": mask}, max_length=length, stop_token_ids=None)["token_ids"])[0]
    expected = [(int(prompt[0, -1]) + SHIFT_B * (i + 1)) % vocab for i in range(length - 4)]
    hits = sum(int(g) == e for g, e in zip(generated[4:], expected))
    print(f"generate: prompt {prompt[0].tolist()} -> {generated[4:].tolist()} "
          f"(task B would give {expected}: {hits}/{len(expected)})")
    print(f"done in {time.perf_counter() - start:.1f} s")
    if not match:
        raise CheckFailed("the reloaded model does not reproduce the outputs")
    scale = max(1.0, float(np.max(np.abs(keras.ops.convert_to_numpy(y_adapted)))))
    if left or merged_diff > MERGE_TOL * scale:
        raise CheckFailed("the merged model does not reproduce the outputs")
    return 0


def _schedule_options(method, n_examples, epochs):
    """The train-step count for methods whose schedule needs it (AdaLoRA's
    `total_steps`): this run's steps on task B."""
    from keras_lowrank import registry

    if "total_steps" not in registry.get(method).defaults:
        return {}
    return {"total_steps": max(2, -(-n_examples // BATCH_SIZE) * max(epochs, 1))}


def main(argv=None, prog=None):
    """Run the job with `argv`; returns the exit code (0, 1 or 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or os.path.basename(sys.argv[0] or "finetune_gemma.py")
    try:
        args = build_parser(prog).parse_args(argv)
    except SystemExit as e:  # argparse exits on --help and on bad arguments
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if args.backend and "keras" not in sys.modules:
        os.environ["KERAS_BACKEND"] = args.backend
    elif args.backend:
        import keras

        if keras.backend.backend() != args.backend:
            print(f"{prog}: error: Keras is already running on {keras.backend.backend()}; "
                  f"set KERAS_BACKEND={args.backend} before it is imported", file=sys.stderr)
            return 2
    try:
        return run(args)
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except CheckFailed as e:
        print(f"{prog}: failed: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
