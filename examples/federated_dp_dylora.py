"""DP-DyLoRA: a differentially private federation fine-tunes a tiny KerasHub Gemma.

A tiny Gemma causal LM (built locally, no download) is trained centrally
on task A (next token = token + 1) and saved: it is the shared base every
client and the server load. A federation of clients then fine-tunes DyLoRA
adapters on task B (next token = token + 3) in Flower's simulation engine,
under user-level differential privacy (DP-FedAvg: clipping on the clients,
Gaussian noise on the server, ε from dp-accounting). The clients' data is
non-IID: each client's sequences use only its own window of the
vocabulary. The server's model is then an ordinary keras-lowrank model:
evaluated at every DyLoRA rank, saved as `.keras` and reloaded, merged.

    python examples/federated_dp_dylora.py [--backend jax|tensorflow|torch]
        [--clients 40] [--cohort 10] [--rounds 10] [--epsilon 8 | --no-dp]
        [--method dylora] [--rank 8] [--small] [--out DIR] [--base-only]

The last line it prints is a JSON summary. Exit codes: 0 success, 1 a
check failed, 2 bad input.
"""

import argparse
import json
import os
import sys
import tempfile
import time

BACKENDS = ("jax", "tensorflow", "torch")
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
SHIFT_A = 1
SHIFT_B = 3
#: each client's tokens come from a window of this many consecutive ids
WINDOW = 16


class UsageError(Exception):
    """Bad input from the user (exit code 2)."""


class CheckFailed(Exception):
    """A check failed on valid input (exit code 1)."""


def sequences(rng, n, shift, low=0, width=None):
    """`(x, y)` of `n` sequences whose tokens lie in `[low, low + width)`
    (mod V); the target of each token is `(token + shift) mod V`."""
    vocab = TINY_GEMMA["vocabulary_size"]
    width = vocab if width is None else width
    tokens = ((low + rng.integers(0, width, size=(n, SEQ_LEN))) % vocab).astype("int32")
    x = {"token_ids": tokens, "padding_mask": (tokens * 0 + 1).astype("int32")}
    return x, ((tokens + shift) % vocab).astype("int32")


def build_base(path, seed=0, epochs=6, n=512):
    """Train the tiny Gemma on task A and save its weights to `path`."""
    import keras
    import keras_hub
    import numpy as np

    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.GemmaBackbone(**TINY_GEMMA)
    model = keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)
    model.compile(optimizer=keras.optimizers.Adam(3e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = sequences(np.random.default_rng(seed), n, SHIFT_A)
    model.fit(x, y, batch_size=32, epochs=epochs, verbose=0)
    model.save_weights(path)
    return path


class ModelFn:
    """`() -> model`: the shared base with adapters, compiled (what every
    client and the server build). A class, so that it pickles by reference
    into simulation workers."""

    def __init__(self, base_path, method="dylora", rank=8, learning_rate=0.02, seed=0):
        self.base_path = base_path
        self.method = method
        self.rank = rank
        self.learning_rate = learning_rate
        self.seed = seed

    def __call__(self):
        import warnings

        import keras
        import keras_hub

        import keras_lowrank

        keras.utils.set_random_seed(self.seed)
        backbone = keras_hub.models.GemmaBackbone(**TINY_GEMMA)
        model = keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)
        options = {"frozen": False} if self.method == "dylora" else {}
        with warnings.catch_warnings():
            # KerasHub tasks compile themselves: Keras notes it skips the
            # saved optimizer, and that compile() is called again below
            warnings.simplefilter("ignore")
            model.load_weights(self.base_path)
            keras_lowrank.enable_adapter(model, method=self.method, rank=self.rank, **options)
        model.compile(
            optimizer=keras.optimizers.Adam(self.learning_rate),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            weighted_metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        )
        return model


class DataFn:
    """`(partition_id, num_partitions) -> (x, y)`: client `i` holds
    `examples` task-B sequences over its own vocabulary window (non-IID)."""

    def __init__(self, examples=16, seed=0):
        self.examples = examples
        self.seed = seed

    def __call__(self, partition_id, num_partitions):
        import numpy as np

        rng = np.random.default_rng([self.seed, partition_id])
        vocab = TINY_GEMMA["vocabulary_size"]
        low = int(np.random.default_rng([self.seed, 10_000, partition_id]).integers(0, vocab))
        return sequences(rng, self.examples, SHIFT_B, low=low, width=WINDOW)


class Evaluate:
    """Server-side evaluation on uniform task-B sequences."""

    def __init__(self, n=128, seed=123):
        self.n = n
        self.seed = seed

    def __call__(self, model, server_round):
        import numpy as np

        x, y = sequences(np.random.default_rng(self.seed), self.n, SHIFT_B)
        return model.evaluate(x, y, batch_size=64, verbose=0, return_dict=True)


def federate(base_path, clients, cohort, rounds, epsilon=None, method="dylora", rank=8,
             examples=16, local_epochs=2, batch_size=8, clipping_norm=0.5, seed=0,
             learning_rate=0.02, delta=None, evaluate=True, cpus_per_client=1):
    """Run one federation in Flower's simulation engine; returns its
    `FederatedResult` (`epsilon=None`: no DP)."""
    from keras_lowrank import federated

    model_fn = ModelFn(base_path, method, rank, learning_rate, seed)
    results = []
    dp = {} if epsilon is None else {"target_epsilon": epsilon, "clipping_norm": clipping_norm}
    server = federated.server_app(
        model_fn, num_clients=clients, clients_per_round=cohort, rounds=rounds, seed=seed,
        delta=delta, evaluate_fn=Evaluate() if evaluate else None, on_finish=results.append, **dp,
    )
    client = federated.client_app(model_fn, DataFn(examples, seed), epochs=local_epochs,
                                  batch_size=batch_size, seed=seed)
    federated.run_simulation(server, client, num_clients=clients, cpus_per_client=cpus_per_client)
    if not results:
        raise CheckFailed("the federation did not finish (see Flower's log above)")
    return results[0]


def build_parser(prog=None):
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=BACKENDS)
    p.add_argument("--clients", type=int, default=40)
    p.add_argument("--cohort", type=float, default=10, help="expected clients per round")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--epsilon", type=float, default=8.0, help="target ε at δ = clients^-1.1")
    p.add_argument("--no-dp", action="store_true", help="no clipping, no noise")
    p.add_argument("--clipping-norm", type=float, default=0.5)
    p.add_argument("--method", default="dylora")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--small", action="store_true", help="20 clients, 3 rounds (a quick check)")
    p.add_argument("--out", default=None, help="folder for the base and the final model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base-only", action="store_true",
                   help="only train the shared base into --out (for a `flwr run` deployment)")
    return p


def run(args):
    import warnings

    import keras
    import numpy as np

    import keras_lowrank

    if args.small:
        args.clients, args.cohort, args.rounds = 20, 5, 3
    if args.clients < 1 or args.rounds < 1 or not 0 < args.cohort <= args.clients:
        raise UsageError("--clients and --rounds must be >= 1 and 0 < --cohort <= --clients")
    out = args.out or tempfile.mkdtemp(prefix="klr-federated-")
    os.makedirs(out, exist_ok=True)
    start = time.perf_counter()
    print(f"keras {keras.__version__} on {keras.backend.backend()}")
    print(f"[1/4] training the shared base on task A (next token = token + {SHIFT_A})")
    base = build_base(os.path.join(out, "base.weights.h5"), seed=args.seed,
                      epochs=3 if args.small else 6)
    if args.base_only:
        print(f"base saved: {base}")
        return 0
    epsilon = None if args.no_dp else args.epsilon
    privacy = "no DP" if epsilon is None else f"target epsilon {epsilon}"
    print(f"[2/4] federation: {args.clients} clients, ~{args.cohort} per round, "
          f"{args.rounds} rounds, {args.method} rank {args.rank}, {privacy}")
    try:
        result = federate(base, args.clients, args.cohort, args.rounds, epsilon=epsilon,
                          method=args.method, rank=args.rank, clipping_norm=args.clipping_norm,
                          seed=args.seed)
    except ValueError as e:
        raise UsageError(str(e)) from None
    for h in result.history:
        eps = f"  epsilon {h['epsilon']:.3f}" if "epsilon" in h else ""
        print(f"round {h['round']}: rank {h['rank']}  clients {h['clients']}  "
              f"train loss {h['train-loss']:.3f}  eval accuracy {h.get('accuracy', float('nan')):.3f}{eps}")
    if result.stopped:
        print(f"stopped early: {result.stopped}")
    model = result.model
    print("[3/4] the server's model at every DyLoRA rank" if args.method == "dylora"
          else "[3/4] the server's model")
    x, y = sequences(np.random.default_rng(123), 128, SHIFT_B)
    by_rank = {}
    if args.method == "dylora":
        by_rank = {r: round(m["accuracy"], 4) for r, m in
                   keras_lowrank.dylora.evaluate_ranks(model, x, y, verbose=0).items()}
        print("accuracy by rank:", by_rank)
    print("[4/4] save as .keras, reload, merge")
    path = os.path.join(out, "federated.keras")
    model.save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = keras.saving.load_model(path, compile=False)
    sample = {k: v[:4] for k, v in x.items()}
    expected = keras.ops.convert_to_numpy(model.predict_on_batch(sample))
    diff = float(np.max(np.abs(expected - keras.ops.convert_to_numpy(reloaded.predict_on_batch(sample)))))
    keras_lowrank.merge(reloaded)
    merged = float(np.max(np.abs(expected - keras.ops.convert_to_numpy(reloaded.predict_on_batch(sample)))))
    print(f"reloaded: max |diff| {diff:.2g}; merged: max |diff| {merged:.2g}; "
          f"adapters left after merge: {len(keras_lowrank.adapters(reloaded))}")
    summary = {
        "backend": keras.backend.backend(), "clients": args.clients, "rounds": len(result.history),
        "epsilon": result.epsilon, "noise_multiplier": result.noise_multiplier,
        "accuracy_before": (result.initial_metrics or {}).get("accuracy"),
        "accuracy_after": result.history[-1].get("accuracy") if result.history else None,
        "accuracy_by_rank": by_rank, "ranks": [h["rank"] for h in result.history],
        "max_update_norm": max((h["max-update-norm"] for h in result.history), default=0.0),
        "reload_diff": diff, "merge_diff": merged, "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(summary))
    scale = max(1.0, float(np.max(np.abs(expected))))
    if diff > 1e-5 * scale or merged > 1e-4 * scale or keras_lowrank.adapters(reloaded):
        raise CheckFailed("the reloaded or merged model does not reproduce the server's outputs")
    return 0


def main(argv=None, prog=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = prog or os.path.basename(sys.argv[0] or "federated_dp_dylora.py")
    try:
        args = build_parser(prog).parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    if args.backend:
        os.environ["KERAS_BACKEND"] = args.backend
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
