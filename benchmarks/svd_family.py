#!/usr/bin/env python
"""The SVD family: the SVD engine's speed, each method's init time, and each
method's train-step time relative to LoRA.

Parts:

- engine (no Keras): the full reduced SVD of a 4096x4096 and a 2048x16384
  float32 matrix by `keras_lowrank.svd.decompose` against
  `numpy.linalg.svd` and `torch.linalg.svd` in the same process, with the
  relative reconstruction error `‖W − U diag(s) Vᵀ‖ / ‖W‖`, the
  orthogonality error `max |QᵀQ − I|` of both sides, and the largest
  relative error of the 16 smallest singular values against a float64 SVD
  (the triplets MiLoRA uses). Target: ≤ 0.5x the faster of the two.
- keras (one process per backend): `enable_adapter` time of every
  registered method on the Gemma-shaped benchmark model (rank 8, each
  method's defaults otherwise), then train-step times of the SVD-family
  methods interleaved with LoRA's, as ratios to LoRA.

    python benchmarks/run.py svd_family --all [--small] [--markdown PATH]
    python benchmarks/run.py svd_family --part engine
    python benchmarks/run.py svd_family --part keras --backend jax
"""

import argparse
import json
import os
import sys
import time

from _common import BACKENDS
from _common import SHAPES
from _common import build_gemma
from _common import compile_lm
from _common import gemma_batch
from _common import make_log
from _common import run_child
from _common import time_interleaved

PROG = "python benchmarks/svd_family.py"
STEP_METHODS = ("lora", "pissa", "milora", "lora_xs", "svf", "svft", "svd_training")
ENGINE_TARGET = 0.5


# ----------------------------------------------------------------------
def _errors(w, u, s, v):
    import numpy as np

    w64 = w.astype(np.float64)
    rec = (u.astype(np.float64) * s.astype(np.float64)) @ v.T.astype(np.float64)
    k = s.shape[-1]
    orth = max(
        float(np.abs(q.T.astype(np.float64) @ q.astype(np.float64) - np.eye(k)).max()) for q in (u, v)
    )
    return float(np.linalg.norm(rec - w64) / np.linalg.norm(w64)), orth


def run_engine(small, log):
    import numpy as np

    from keras_lowrank import svd

    shapes = [(512, 512), (256, 2048)] if small else [(4096, 4096), (2048, 16384)]
    rows = []
    for m, n in shapes:
        rng = np.random.default_rng(0)
        w = (rng.standard_normal((m, n)) / np.sqrt(m)).astype(np.float32)
        out = {"shape": f"{m}x{n}"}
        t0 = time.perf_counter()
        u, s, v = svd.decompose(w)
        out["engine_s"] = time.perf_counter() - t0
        out["engine_rec"], out["engine_orth"] = _errors(w, u, s, v)
        log(f"{m}x{n}: engine {out['engine_s']:.1f}s")
        t0 = time.perf_counter()
        un, sn, vh = np.linalg.svd(w, full_matrices=False)
        out["numpy_s"] = time.perf_counter() - t0
        out["numpy_rec"], out["numpy_orth"] = _errors(w, un, sn, vh.T)
        log(f"{m}x{n}: numpy {out['numpy_s']:.1f}s")
        try:
            import torch

            t0 = time.perf_counter()
            ut, st, vht = torch.linalg.svd(torch.from_numpy(w), full_matrices=False)
            out["torch_s"] = time.perf_counter() - t0
            out["torch_rec"], out["torch_orth"] = _errors(w, ut.numpy(), st.numpy(), vht.numpy().T)
            log(f"{m}x{n}: torch {out['torch_s']:.1f}s")
        except ImportError:
            out["torch_s"] = None
        best = min(t for t in (out["numpy_s"], out["torch_s"]) if t is not None)
        out["ratio"] = out["engine_s"] / best
        rows.append(out)
    # minor triplets against float64, on a matrix with a decaying spectrum
    rng = np.random.default_rng(1)
    k = 256 if small else 1024
    qa, _ = np.linalg.qr(rng.standard_normal((k, k)))
    qb, _ = np.linalg.qr(rng.standard_normal((k, k)))
    sig = np.geomspace(1.0, 1e-3, k)
    w = ((qa * sig) @ qb.T).astype(np.float32)
    _, s_bottom, _ = svd.decompose(w, rank=16, part="bottom")
    s64 = np.linalg.svd(w.astype(np.float64), compute_uv=False)[-16:]
    minor = float(np.max(np.abs(s_bottom - s64) / s64))
    return {"rows": rows, "minor_rel_err": minor, "minor_shape": f"{k}x{k}, σ from 1 to 1e-3"}


# ----------------------------------------------------------------------
def run_keras(backend, small, steps, warmup, log):
    os.environ["KERAS_BACKEND"] = backend
    import keras

    import keras_lowrank

    assert keras.backend.backend() == backend
    shape = SHAPES["small" if small else "full"]
    x, y = gemma_batch(shape)
    init = {}
    for method in keras_lowrank.methods():
        model = build_gemma(shape)
        t0 = time.perf_counter()
        keras_lowrank.enable_adapter(model, method=method, rank=8)
        init[method] = time.perf_counter() - t0
        log(f"init {method}: {init[method]:.2f}s")
        del model
    models = {}
    for method in STEP_METHODS:
        model = build_gemma(shape)
        keras_lowrank.enable_adapter(model, method=method, rank=8)
        compile_lm(model)
        models[method] = model
    fns = {m: (lambda mm=mm: mm.train_on_batch(x, y)) for m, mm in models.items()}
    times = time_interleaved(fns, warmup, steps, log=log)
    step = {m: t["median_ms"] for m, t in times.items()}
    return {"init_s": init, "step_ms": step, "step_vs_lora": {m: step[m] / step["lora"] for m in step}}


# ----------------------------------------------------------------------
def render(result):
    lines = ["# SVD family benchmarks", ""]
    meta = result["meta"]
    lines += [f"Measured on {meta['machine']}, {meta['date']}; command: `{meta['command']}`.", ""]
    eng = result.get("engine")
    if eng:
        lines += ["## SVD engine: full reduced SVD (float32 in, float32 out)", "",
                  "| matrix | engine s | numpy.linalg.svd s | torch.linalg.svd s | engine / faster | "
                  "engine rec. err | engine orth. err | numpy rec. / orth. | torch rec. / orth. |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in eng["rows"]:
            torch_s = "-" if r["torch_s"] is None else f"{r['torch_s']:.1f}"
            torch_e = "-" if r["torch_s"] is None else f"{r['torch_rec']:.1e} / {r['torch_orth']:.1e}"
            lines.append(
                f"| {r['shape']} | {r['engine_s']:.1f} | {r['numpy_s']:.1f} | {torch_s} | "
                f"**{r['ratio']:.2f}** (target ≤ {ENGINE_TARGET}) | {r['engine_rec']:.1e} | "
                f"{r['engine_orth']:.1e} | {r['numpy_rec']:.1e} / {r['numpy_orth']:.1e} | {torch_e} |"
            )
        lines += ["", f"The 16 smallest singular values of a {eng['minor_shape']} matrix: largest "
                  f"relative error against a float64 SVD {eng['minor_rel_err']:.1e}.", ""]
    parts = result.get("backends", {})
    if parts:
        methods = sorted({m for p in parts.values() if "init_s" in p for m in p["init_s"]})
        lines += ["## `enable_adapter` time per method (seconds, Gemma-shaped benchmark model, rank 8)", "",
                  "| method | " + " | ".join(parts) + " |", "|---|" + "---|" * len(parts)]
        for m in methods:
            cells = [f"{parts[b]['init_s'][m]:.2f}" if "init_s" in parts[b] else "-" for b in parts]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines += ["", "## Train step relative to LoRA (median of interleaved steps)", "",
                  "| method | " + " | ".join(parts) + " |", "|---|" + "---|" * len(parts)]
        for m in STEP_METHODS:
            cells = [f"{parts[b]['step_vs_lora'][m]:.2f} ({parts[b]['step_ms'][m]:.0f} ms)"
                     if "step_vs_lora" in parts[b] else "-" for b in parts]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def parse_args(argv=None, prog=PROG):
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("engine", "keras"), default=None)
    p.add_argument("--backend", choices=BACKENDS, default=None)
    p.add_argument("--all", action="store_true", help="the engine, then every backend")
    p.add_argument("--small", action="store_true", help="small matrices and model (a quick check)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--markdown", default=None)
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    if args.backend and args.part is None and not args.all:
        args.part = "keras"  # `run.py all --backend B` gives every suite the same options
    if not args.all and args.part is None:
        p.error("give --all or --part engine|keras")
    if args.part == "keras" and args.backend is None:
        p.error("--part keras needs --backend")
    return args


def main(argv=None, prog=PROG):
    import platform

    args = parse_args(argv, prog)
    log = make_log(args.backend or "svd")
    result = {"meta": {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "date": time.strftime("%Y-%m-%d"),
        "command": "python benchmarks/run.py svd_family " + " ".join(argv if argv is not None else sys.argv[1:]),
    }}
    if args.all or args.part == "engine":
        result["engine"] = run_engine(args.small, log)
    if args.part == "keras":
        result.update(run_keras(args.backend, args.small, args.steps, args.warmup, log))
    if args.all:
        extra = ["--part", "keras", "--steps", str(args.steps), "--warmup", str(args.warmup)]
        if args.small:
            extra.append("--small")
        result["backends"] = {
            b: run_child("svd_family", ["--backend", b, *extra], {"KERAS_BACKEND": b}) for b in BACKENDS
        }
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1)
    if args.all or args.part == "engine":
        text = render(result)
        print(text)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(text)
    failed = [b for b, r in result.get("backends", {}).items() if "error" in r]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
