#!/usr/bin/env python
"""LoftQ: how close the quantized base and the initial LoRA start to the
float kernel.

For each kernel `W` (matrix view, `(n_in, n_out)`) and each frozen-base
storage (NF4 with double quantization, Keras int8, Keras int4), the
relative error at init `‖W − (Q + s A B)‖_F / ‖W‖_F`, with `Q` the
dequantized frozen base and `s A B` the initial update, for:

- `lora`: plain LoRA over the quantized base (`B = 0`: the base's own error);
- `pissa`: QPiSSA (the top-r SVD, the residual quantized);
- `loftq`, `loftq_iter=1` and `5`.

Kernels: a Gaussian one, and three "real-ish" ones: heavy-tailed
(Student t, 3 degrees of freedom), low-rank plus noise, and Gaussian with a
few large-magnitude input rows (outlier features). Rank 8, scale 1.

    KERAS_BACKEND=torch python benchmarks/loftq.py [--markdown docs/benchmarks_loftq.md]
"""

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import keras  # noqa: E402

import keras_lowrank as kl  # noqa: E402
from keras_lowrank import bases  # noqa: E402

RANK = 8
BASES = ("nf4", "int8", "int4")
INITS = (("lora", {}), ("pissa", {}), ("loftq", {"loftq_iter": 1}), ("loftq", {"loftq_iter": 5}))


def kernels():
    rng = np.random.RandomState(0)
    out = {}
    out["gaussian 512x128"] = rng.normal(size=(512, 128)) * 0.02
    out["heavy-tailed t(3) 256x256"] = rng.standard_t(3, size=(256, 256)) * 0.02
    low = rng.normal(size=(256, 16)) @ rng.normal(size=(16, 256)) / 4.0
    out["low-rank 16 + noise 256x256"] = 0.02 * (low + 0.3 * rng.normal(size=(256, 256)))
    w = rng.normal(size=(256, 256)) * 0.02
    w[rng.choice(256, 4, replace=False)] *= 20.0  # outlier input features
    out["outlier rows 256x256"] = w
    return {k: v.astype("float32") for k, v in out.items()}


def init_error(w, method, base, options):
    inp = keras.Input((w.shape[0],))
    model = keras.Model(inp, keras.layers.Dense(w.shape[1], name="target")(inp))
    model.get_layer("target").kernel.assign(w)
    start = time.perf_counter()
    kl.enable_adapter(model, method=method, rank=RANK, targets=["target"], base=base, **options)
    seconds = time.perf_counter() - start
    a = model.get_layer("target")
    approx = keras.ops.convert_to_numpy(bases.read_kernel(a.layer) + a.delta_matrix())
    return float(np.linalg.norm(w - approx) / np.linalg.norm(w)), seconds


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--markdown", help="write the table to this Markdown file")
    args = p.parse_args()
    labels = [m if not o else f"{m} iter={o['loftq_iter']}" for m, o in INITS]
    rows, times = [], {}
    total = time.perf_counter()
    for name, w in kernels().items():
        for base in BASES:
            errs = []
            for (method, options), label in zip(INITS, labels):
                err, seconds = init_error(w, method, base, options)
                errs.append(err)
                times.setdefault((label, base), []).append(seconds)
            rows.append((name, base, errs))
            print(f"{name:28s} {base:5s} " + " ".join(f"{e:.4f}" for e in errs), flush=True)
    total = time.perf_counter() - total
    lines = [
        "# LoftQ: error at init over quantized bases",
        "",
        "Made by `benchmarks/loftq.py` (`KERAS_BACKEND="
        f"{keras.backend.backend()} python benchmarks/loftq.py --markdown docs/benchmarks_loftq.md`, "
        f"{total:.0f} s on 2 shared CPU cores).",
        "",
        "Relative error at init, `‖W − (Q + s A B)‖_F / ‖W‖_F` (`Q` the dequantized "
        f"frozen base, `s A B` the initial update), rank {RANK}, scale 1. `lora`: plain "
        "LoRA, `B = 0`, so the base's own quantization error; `pissa`: QPiSSA (top-r "
        "SVD, residual quantized); `loftq iter=k`: LoftQ with `loftq_iter=k`. NF4 with "
        "double quantization (the default); int8/int4 are Keras's own quantizers. "
        "The last column is LoftQ (5 rounds) against plain LoRA.",
        "",
        "| kernel | base | " + " | ".join(labels) + " | loftq 5 / lora |",
        "|---|---|" + "---:|" * (len(labels) + 1),
    ]
    for name, base, errs in rows:
        lines.append(
            f"| {name} | {base} | " + " | ".join(f"{e:.4f}" for e in errs)
            + f" | {errs[-1] / errs[0]:.2f} |"
        )
    lines += [
        "",
        "Init time (`enable_adapter` on one layer, median over the kernels, seconds; noisy on shared cores; Keras's own int8/int4 quantization of a layer costs most of a LoftQ round):",
        "",
        "| init | " + " | ".join(BASES) + " |",
        "|---|" + "---:|" * len(BASES),
    ]
    for label in labels:
        lines.append(f"| {label} | " + " | ".join(f"{np.median(times[(label, b)]):.3f}" for b in BASES) + " |")
    lines += [
        "",
        "Reading it: LoftQ starts closer to `W` than plain LoRA over the same base on "
        "every kernel and base, and more rounds help (`iter=5` below `iter=1`). On the "
        "kernels without structure (Gaussian, heavy-tailed) one round is about as close "
        "as QPiSSA and five rounds are the closest of all. On the kernels with a "
        "dominant low-rank part or outlier rows, QPiSSA is much closer: taking the top-r "
        "part out before quantizing shrinks every block's range, while LoftQ quantizes "
        "(nearly) the whole kernel and a rank-r fit recovers only part of that error.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(text)


if __name__ == "__main__":
    main()
