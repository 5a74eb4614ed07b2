"""What the method examples share: a tiny KerasHub Gemma built locally (no
download), pretrained on task A (next token = token + 1), and synthetic
tasks `next token = token + shift` to fine-tune it on."""

import numpy as np

VOCAB = 32
SEQ_LEN = 8
TINY_GEMMA = {
    "vocabulary_size": VOCAB, "num_layers": 2, "num_query_heads": 4, "num_key_value_heads": 1,
    "hidden_dim": 32, "intermediate_dim": 64, "head_dim": 8,
}


def task(shift, n, seed=0):
    """`(x, y)`: `n` random sequences and their next tokens, `token + shift`."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, size=(n, SEQ_LEN)).astype("int32")
    x = {"token_ids": tokens, "padding_mask": np.ones_like(tokens)}
    return x, ((tokens + shift) % VOCAB).astype("int32")


def compile_lm(model, learning_rate):
    import keras

    model.compile(optimizer=keras.optimizers.Adam(learning_rate),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  weighted_metrics=[keras.metrics.SparseCategoricalAccuracy(name="accuracy")])


def accuracy(model, data):
    x, y = data
    return float(model.evaluate(x, y, batch_size=len(y), verbose=0, return_dict=True)["accuracy"])


def pretrained_lm(epochs, n=256, seed=0):
    """A tiny Gemma causal LM trained on task A, and its weights (to build
    the same base again)."""
    import keras
    import keras_hub

    keras.utils.set_random_seed(seed)
    model = keras_hub.models.GemmaCausalLM(
        backbone=keras_hub.models.GemmaBackbone(**TINY_GEMMA), preprocessor=None)
    compile_lm(model, 1e-2)
    model.fit(*task(1, n, seed), batch_size=32, epochs=epochs, verbose=0)
    return model, [np.array(w) for w in model.get_weights()]


def fresh_lm(weights):
    """A new tiny Gemma with the given base weights."""
    import keras_hub

    model = keras_hub.models.GemmaCausalLM(
        backbone=keras_hub.models.GemmaBackbone(**TINY_GEMMA), preprocessor=None)
    model.set_weights(weights)
    return model


def args_parser(doc, default_epochs):
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--backend", choices=("jax", "tensorflow", "torch"), default=None,
                        help="Keras backend (default: $KERAS_BACKEND or the Keras config)")
    parser.add_argument("--epochs", type=int, default=None,
                        help=f"epochs per training stage (default: {default_epochs}; fewer with --small)")
    parser.add_argument("--out", default=None, help="directory for the files (default: a temporary one)")
    parser.add_argument("--small", action="store_true", help="fewer samples and epochs (CI)")
    return parser


def setup(argv, doc, default_epochs, small_epochs):
    """Parse the common options, set the backend; `(args, epochs, n, out)`."""
    import os
    import tempfile

    args = args_parser(doc, default_epochs).parse_args(argv)
    if args.backend:
        os.environ["KERAS_BACKEND"] = args.backend
    if args.epochs is not None and args.epochs < 1:
        raise SystemExit(f"--epochs must be >= 1; received {args.epochs}")
    epochs = args.epochs or (small_epochs if args.small else default_epochs)
    out = args.out or tempfile.mkdtemp(prefix="klr-example-")
    os.makedirs(out, exist_ok=True)
    return args, epochs, (128 if args.small else 512), out
