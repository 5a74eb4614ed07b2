#!/usr/bin/env python
"""LoHa's two forward forms: where the Khatri–Rao form stops paying.

LoHa's update `ΔK = s (A1ᵀ B1) ⊙ (A2ᵀ B2)` can be applied without building
`ΔK` (the factorized Khatri–Rao form, `r²`-wide factors: about
`N r² (n_in + n_out)` multiply-adds per step for `N` rows) or by building it
(`2 r n_in n_out` to build, `N n_in n_out` to apply, PEFT's way). `form="auto"`
takes the factorized form when `2 r² < min(n_in, n_out)`, where this suite
measured the crossover. This suite times one
LoHa-adapted square Dense layer's train step in both forms over a range of
ranks, interleaved, and reports factorized / materialized per rank: the
crossover the rule should sit near.

    python benchmarks/run.py loha_forms --all [--small] [--markdown PATH]
    python benchmarks/run.py loha_forms --backend jax
"""

import os
import sys

from _common import per_backend_args
from _common import per_backend_main
from _common import time_interleaved

PROG = "python benchmarks/loha_forms.py"
FULL = {"n": 1024, "rows": 1024, "ranks": (4, 8, 16, 24, 32, 40, 48, 64)}
SMALL = {"n": 128, "rows": 256, "ranks": (2, 4, 8, 11, 12, 16)}


def run_keras(backend, small, steps, warmup, log):
    os.environ["KERAS_BACKEND"] = backend
    import keras
    import numpy as np

    import keras_lowrank

    assert keras.backend.backend() == backend
    cfg = SMALL if small else FULL
    n, rows = cfg["n"], cfg["rows"]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows // 8, 8, n)).astype("float32")
    y = rng.standard_normal((rows // 8, 8, n)).astype("float32")
    out = []
    for r in cfg["ranks"]:
        models = {}
        for form in ("factorized", "materialized"):
            keras.utils.set_random_seed(0)
            inp = keras.Input((8, n))
            model = keras.Model(inp, keras.layers.Dense(n, name="proj")(inp))
            keras_lowrank.enable_adapter(model, method="loha", rank=r, form=form, targets=["proj"])
            model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="mse")
            models[form] = model
        fns = {f: (lambda m=m: m.train_on_batch(x, y)) for f, m in models.items()}
        times = time_interleaved(fns, warmup, steps, log=log)
        fac, mat = times["factorized"]["median_ms"], times["materialized"]["median_ms"]
        auto = "factorized" if 2 * r * r < n else "materialized"
        out.append({"rank": r, "factorized_ms": fac, "materialized_ms": mat,
                    "ratio": fac / mat, "auto": auto})
        log(f"r={r}: factorized {fac:.1f} ms, materialized {mat:.1f} ms, ratio {fac / mat:.2f}")
    return {"n": n, "rows": rows, "rows_table": out}


def render(result):
    meta = result["meta"]
    lines = ["# LoHa: factorized (Khatri–Rao) vs materialized forward", "",
             f"Measured on {meta['machine']}, {meta['date']}; command: `{meta['command']}`.", ""]
    parts = result.get("backends", {})
    first = next((p for p in parts.values() if "rows_table" in p), None)
    if first is None:
        return "\n".join(lines + ["No backend ran."])
    lines += [
        f"One Dense {first['n']}x{first['n']} layer with LoHa, train step (`train_on_batch`, Adam, "
        f"MSE) on {first['rows']} rows; median of interleaved steps, ms. The ratio is "
        f"factorized / materialized (below 1: the Khatri–Rao form is faster). `auto` is what "
        f"`form=\"auto\"` picks (factorized when 2r² < {first['n']}).", "",
        "| rank | r² | auto | " + " | ".join(f"{b} fact. / mat. ms | {b} ratio" for b in parts) + " |",
        "|---|---|---|" + "---|---|" * len(parts),
    ]
    for i, row in enumerate(first["rows_table"]):
        cells = []
        for b, p in parts.items():
            if "rows_table" not in p:
                cells += ["-", "-"]
                continue
            q = p["rows_table"][i]
            cells += [f"{q['factorized_ms']:.1f} / {q['materialized_ms']:.1f}", f"{q['ratio']:.2f}"]
        lines.append(f"| {row['rank']} | {row['rank'] ** 2} | {row['auto']} | " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


def parse_args(argv=None, prog=PROG):
    return per_backend_args("loha_forms", __doc__, argv, prog)


def main(argv=None, prog=PROG):
    return per_backend_main("loha_forms", __doc__, run_keras, render, argv, prog)


if __name__ == "__main__":
    sys.exit(main())
