#!/usr/bin/env python
"""Serving many adapters: a different LoRA per example in one call.

On the Gemma-shaped model of the other suites (`_common.SHAPES`), with rank-8
LoRA adapters on every Dense/EinsumDense layer, one batch is run (forward
only, the compiled `predict_on_batch`) in three ways for k = 1, 2, 4, 8
adapters (example i takes adapter i mod k):

- `mixed`: `PerExampleAdapters` over a model holding 8 named adapters, the
  whole batch in one call;
- `single`: a model holding one adapter, the whole batch in one call (the
  baseline: one adapter for everyone);
- `separate`: that one-adapter model called k times on the k sub-batches
  (PEFT's way for a mixed batch, without even the cost of switching).

Ratios are to `single` in the same run. On torch the suite also times
PEFT's `adapter_names=` (one forward, PEFT loops over the sub-batches) on
the same shapes in `transformers`, against PEFT with one adapter. Memory
per extra adapter is the bytes of one adapter's variables (what each
named adapter adds to the model's weights).

    python benchmarks/run.py serving --all [--small] [--markdown PATH]
    python benchmarks/run.py serving --backend jax
"""

import os
import sys

from _common import RANK
from _common import SEED
from _common import SHAPES
from _common import build_gemma
from _common import gemma_batch
from _common import per_backend_args
from _common import per_backend_main
from _common import time_interleaved

PROG = "python benchmarks/serving.py"
KS = (1, 2, 4, 8)


def _moved(kl, model, scale=0.01):
    import numpy as np
    from keras import ops

    rng = np.random.default_rng(SEED)
    for _, a in kl.adapters(model):
        for v in a.trainable_variables:
            v.assign(ops.convert_to_numpy(v.value) + scale * rng.standard_normal(v.shape).astype("float32"))


def run_keras(backend, small, steps, warmup, log):
    os.environ["KERAS_BACKEND"] = backend
    import keras

    import keras_lowrank as kl

    assert keras.backend.backend() == backend
    shape = SHAPES["small" if small else "full"]
    x, _ = gemma_batch(dict(shape, batch=8))
    many = build_gemma(shape)
    weights_bytes = [sum(_nbytes(v) for v in many.weights)]
    for j in range(8):
        kl.enable_adapter(many, rank=RANK, adapter_name=f"a{j}")
        weights_bytes.append(sum(_nbytes(v) for v in many.weights))
    _moved(kl, many)
    served = kl.PerExampleAdapters(many)
    one = build_gemma(shape)
    kl.enable_adapter(one, rank=RANK)
    _moved(kl, one)
    fns = {"single": lambda: one.predict_on_batch(x)}
    for k in KS:
        sel = kl.adapter_selection(many, [f"a{i % k}" for i in range(8)])
        inputs = {"inputs": x, **sel}
        fns[f"mixed{k}"] = lambda inputs=inputs: served.predict_on_batch(inputs)
        if k > 1:
            subs = [{n: v[j::k] for n, v in x.items()} for j in range(k)]
            fns[f"separate{k}"] = lambda subs=subs: [one.predict_on_batch(s) for s in subs]
    times = time_interleaved(fns, warmup, steps, log=log)
    single = times["single"]["median_ms"]
    rows = []
    for k in KS:
        mixed = times[f"mixed{k}"]["median_ms"]
        sep = times[f"separate{k}"]["median_ms"] if k > 1 else single
        rows.append({"k": k, "mixed_ms": mixed, "separate_ms": sep,
                     "mixed_ratio": mixed / single, "separate_ratio": sep / single})
        log(f"k={k}: mixed {mixed:.1f} ms ({mixed / single:.2f}x), separate {sep:.1f} ms "
            f"({sep / single:.2f}x)")
    steps_bytes = [b - a for a, b in zip(weights_bytes, weights_bytes[1:])]
    out = {"single_ms": single, "rows": rows, "adapter_bytes": steps_bytes[0],
           "adapter_bytes_all_equal": len(set(steps_bytes)) == 1, "shape": shape}
    if backend == "torch":
        out["peft"] = run_peft(shape, steps, warmup, log)
    return out


def _nbytes(v):
    import numpy as np

    return int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize


def run_peft(shape, steps, warmup, log):
    import peft
    import torch
    import transformers

    t, vocab = shape["seq_len"], shape["vocabulary_size"]
    cfg = transformers.GemmaConfig(
        vocab_size=vocab, hidden_size=shape["hidden_dim"], num_hidden_layers=shape["num_layers"],
        num_attention_heads=shape["num_query_heads"], num_key_value_heads=shape["num_key_value_heads"],
        head_dim=shape["head_dim"], intermediate_size=shape["intermediate_dim"] // 2,
        hidden_activation="gelu_pytorch_tanh", max_position_embeddings=max(256, t))
    torch.manual_seed(SEED)
    base = transformers.GemmaForCausalLM(cfg).to(torch.float32).eval()
    lora = lambda: peft.LoraConfig(r=RANK, lora_alpha=RANK, target_modules="all-linear",  # noqa: E731
                                   init_lora_weights=False)
    model = peft.get_peft_model(base, lora(), adapter_name="a0")
    for j in range(1, 8):
        model.add_adapter(f"a{j}", lora())
    model.set_adapter("a0")
    model.eval()
    g = torch.Generator().manual_seed(SEED)
    ids = torch.randint(0, vocab, (8, t), generator=g)
    mask = torch.ones((8, t), dtype=torch.long)

    def call(**kw):
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask, **kw).logits

    fns = {"single": lambda: call()}
    for k in KS:
        names = [f"a{i % k}" for i in range(8)]
        fns[f"mixed{k}"] = lambda names=names: call(adapter_names=names)
    times = time_interleaved(fns, warmup, steps, log=log)
    single = times["single"]["median_ms"]
    rows = [{"k": k, "mixed_ms": times[f"mixed{k}"]["median_ms"],
             "mixed_ratio": times[f"mixed{k}"]["median_ms"] / single} for k in KS]
    for r in rows:
        log(f"PEFT k={r['k']}: adapter_names {r['mixed_ms']:.1f} ms ({r['mixed_ratio']:.2f}x)")
    return {"single_ms": single, "rows": rows, "version": peft.__version__}


def render(result):
    meta = result["meta"]
    lines = ["# Serving many adapters: a different LoRA per example", "",
             f"Measured on {meta['machine']}, {meta['date']}; command: `{meta['command']}`.", ""]
    parts = {b: p for b, p in result.get("backends", {}).items() if "rows" in p}
    if not parts:
        return "\n".join(lines + ["No backend ran."])
    shape = next(iter(parts.values()))["shape"]
    lines += [
        f"KerasHub `GemmaCausalLM` (hidden {shape['hidden_dim']}, {shape['num_layers']} layers, "
        f"{shape['num_query_heads']} heads, intermediate {shape['intermediate_dim']}, vocabulary "
        f"{shape['vocabulary_size']}), float32, a batch of 8 sequences of {shape['seq_len']} tokens, "
        f"rank-{RANK} LoRA on every Dense/EinsumDense layer; forward only (`predict_on_batch`), "
        "median of interleaved calls, ms. Example i takes adapter i mod k. `mixed`: one call of "
        "`PerExampleAdapters` over a model with 8 named adapters; `separate`: k calls of a "
        "one-adapter model on the k sub-batches; ratios to one call of the one-adapter model "
        "(`single`). Target: mixed with k = 4 at most 1.3x single, and faster than separate.", "",
        "| backend | single ms | " + " | ".join(f"k={k} mixed ms (x) | k={k} separate ms (x)" for k in KS) + " |",
        "|---|---|" + "---|---|" * len(KS),
    ]
    for b, p in parts.items():
        cells = []
        for r in p["rows"]:
            cells += [f"{r['mixed_ms']:.1f} ({r['mixed_ratio']:.2f})",
                      f"{r['separate_ms']:.1f} ({r['separate_ratio']:.2f})"]
        lines.append(f"| {b} | {p['single_ms']:.1f} | " + " | ".join(cells) + " |")
    lines.append("")
    for b, p in parts.items():
        k4 = next(r for r in p["rows"] if r["k"] == 4)
        ok = k4["mixed_ratio"] <= 1.3 and k4["mixed_ms"] < k4["separate_ms"]
        lines.append(f"- {b}: k=4 mixed / single = {k4['mixed_ratio']:.2f}, mixed / separate = "
                     f"{k4['mixed_ms'] / k4['separate_ms']:.2f}: target {'met' if ok else 'missed'}.")
    lines.append("")
    peft_part = next((p["peft"] for p in parts.values() if "peft" in p), None)
    if peft_part:
        lines += [
            f"PEFT {peft_part['version']} on the same shapes (`transformers.GemmaForCausalLM`, torch, "
            "eager), 8 LoRA adapters; `adapter_names=` per example in one forward, against one "
            "active adapter:", "",
            "| | single ms | " + " | ".join(f"k={k} ms (x)" for k in KS) + " |",
            "|---|---|" + "---|" * len(KS),
            f"| PEFT `adapter_names` | {peft_part['single_ms']:.1f} | "
            + " | ".join(f"{r['mixed_ms']:.1f} ({r['mixed_ratio']:.2f})" for r in peft_part["rows"]) + " |",
            "",
        ]
    first = next(iter(parts.values()))
    lines.append(f"Memory per extra adapter: {first['adapter_bytes'] / 1024:.0f} KiB of variables "
                 f"(rank {RANK}, float32; the same for each of the 8: {first['adapter_bytes_all_equal']}).")
    lines.append("")
    return "\n".join(lines)


def parse_args(argv=None, prog=PROG):
    return per_backend_args("serving", __doc__, argv, prog)


def main(argv=None, prog=PROG):
    return per_backend_main("serving", __doc__, run_keras, render, argv, prog)


if __name__ == "__main__":
    sys.exit(main())
