"""Several named adapters on one KerasHub Gemma: train, switch, combine, save.

A tiny Gemma causal LM is built locally (no download) and trained on task A
(next token = token + 1). Two named adapters are then trained on it, each
on its own task: `"plus3"` (a LoRA, next token = token + 3) and `"plus5"`
(a DoRA on the attention only, next token = token + 5). The compiled model
then switches between them with `set_active` (no retrace) and is scored on
every task with every adapter; the two are combined into a third adapter
(`combine`, SVD); the model is saved as `.keras` and reloaded (every name
and the active set come back), and one adapter is saved alone.

    python examples/named_adapters.py [--backend jax|tensorflow|torch]
        [--epochs 6] [--out DIR] [--small]

The last line printed is a JSON summary. Exit codes: 0 success, 1 a check
failed, 2 bad input.
"""

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny_tasks as tt  # noqa: E402

BACKENDS = ("jax", "tensorflow", "torch")
TASKS = {"base": 1, "plus3": 3, "plus5": 5}
MATCH_TOL = 1e-5


class CheckFailed(Exception):
    """A check failed (exit code 1)."""


def build_parser(prog=None):
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=BACKENDS, default=None,
                        help="Keras backend (default: $KERAS_BACKEND or the Keras config)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per task (default: 6; 3 with --small)")
    parser.add_argument("--out", default=None, help="directory for the files (default: a temporary one)")
    parser.add_argument("--small", action="store_true", help="fewer samples and epochs (CI)")
    return parser


def run(args):
    import warnings

    import keras
    import numpy as np

    import keras_lowrank as kl

    n = 128 if args.small else 512
    epochs = args.epochs or (3 if args.small else 6)
    data = {task: tt.task(shift, n, seed=i) for i, (task, shift) in enumerate(TASKS.items())}
    out = args.out or tempfile.mkdtemp(prefix="klr-named-")
    os.makedirs(out, exist_ok=True)

    model, _ = tt.pretrained_lm(2 * epochs, n)  # trained on task "base" (token + 1)

    # one named adapter per task, each trained while it is the active one
    kl.enable_adapter(model, method="lora", rank=4, adapter_name="plus3")
    tt.compile_lm(model, 2e-2)
    model.fit(*data["plus3"], batch_size=32, epochs=epochs, verbose=0)
    kl.enable_adapter(model, method="dora", rank=4, targets=["*/attention/*"], adapter_name="plus5")
    tt.compile_lm(model, 2e-2)
    model.fit(*data["plus5"], batch_size=32, epochs=epochs, verbose=0)
    print(f"adapters: {kl.adapter_names(model)}, active: {kl.active_adapters(model)}")

    # switch on the compiled model: every adapter on every task
    scores = {}
    predict_function = None
    for active in (None, "plus3", "plus5"):
        kl.set_active(model, active, trainable=False)
        scores[active or "none"] = {task: round(tt.accuracy(model, d), 4) for task, d in data.items()}
        model.predict(data["base"][0], batch_size=n, verbose=0)
        if predict_function is None:
            predict_function = model.predict_function
        elif model.predict_function is not predict_function:
            raise CheckFailed("set_active retraced the compiled predict function")
    for active, row in scores.items():
        print(f"active={active:6s} " + "  ".join(f"{t}: {a:.3f}" for t, a in row.items()))
    for task in ("plus3", "plus5"):
        others = [scores[a][task] for a in scores if a != task]
        if not scores[task][task] > max(others):
            raise CheckFailed(f"adapter {task!r} is not the best on its own task: {scores}")

    # a combination of the two (PEFT's add_weighted_adapter, SVD)
    kl.combine(model, {"plus3": 0.5, "plus5": 0.5}, "mix", method="svd")
    scores["mix"] = {task: round(tt.accuracy(model, d), 4) for task, d in data.items()}
    print("active=mix    " + "  ".join(f"{t}: {a:.3f}" for t, a in scores["mix"].items()))

    # save everything, reload, switch the reloaded model
    kl.set_active(model, ["plus3"], trainable=False)
    path = os.path.join(out, "named.keras")
    model.save(path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        loaded = keras.saving.load_model(path, compile=False)
    x = {k: v[:4] for k, v in data["base"][0].items()}
    diffs = []
    for active in ("plus3", "plus5", "mix"):
        kl.set_active(model, active, trainable=False)
        kl.set_active(loaded, active, trainable=False)
        diffs.append(float(np.max(np.abs(keras.ops.convert_to_numpy(model(x)) -
                                         keras.ops.convert_to_numpy(loaded(x))))))
    if max(diffs) > MATCH_TOL:
        raise CheckFailed(f"the reloaded model differs by {max(diffs):.3g}")
    adapter_file = os.path.join(out, "plus5.safetensors")
    kl.save_adapter(model, adapter_file, adapter_name="plus5")
    summary = {
        "backend": keras.backend.backend(),
        "adapters": kl.adapter_names(loaded),
        "accuracy": scores,
        "reload_diff": max(diffs),
        "adapter_file_bytes": os.path.getsize(adapter_file),
        "keras_file_bytes": os.path.getsize(path),
    }
    print(json.dumps(summary))
    return 0


def main(argv=None, prog=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or os.path.basename(sys.argv[0] or "named_adapters.py")
    try:
        args = build_parser(prog).parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if args.epochs is not None and args.epochs < 1:
        print(f"{prog}: error: --epochs must be >= 1; received {args.epochs}", file=sys.stderr)
        return 2
    if args.backend:
        os.environ["KERAS_BACKEND"] = args.backend
    try:
        return run(args)
    except CheckFailed as e:
        print(f"{prog}: failed: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
