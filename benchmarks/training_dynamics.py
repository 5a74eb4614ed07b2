#!/usr/bin/env python
"""Training dynamics: LoRA-FA's activation memory and AdaLoRA's step overhead.

Two measurements on the Gemma-shaped model of the step-time suite (rank 8):

- **LoRA-FA activation memory vs LoRA.** LoRA-FA freezes `A`, so the
  backward pass needs the r-wide `x A` of each adapted layer instead of its
  input `x`. Measured as what the train step keeps for the backward pass:
  on JAX, the temporary buffers XLA allocates for the compiled gradient
  function (`compiled.memory_analysis().temp_size_in_bytes`); on PyTorch,
  the bytes of the distinct tensors autograd saves in the forward pass
  (`torch.autograd.graph.saved_tensors_hooks`), model variables excluded.
  TensorFlow has no CPU-side equivalent (its memory stats are GPU-only), so
  it is not measured.
- **AdaLoRA's overhead per step.** Train steps (`train_on_batch`),
  interleaved: LoRA at rank 12; AdaLoRA at rank 12 with its parametrization
  only (no allocator, no regularizer); and full AdaLoRA (the importance
  EMAs, the budget and the masking in the optimizer step, the orthogonality
  loss). The allocator's and regularizer's overhead is full / bare.

    python benchmarks/run.py training_dynamics --all [--small] [--markdown PATH]
    python benchmarks/run.py training_dynamics --backend jax
"""

import os
import sys

from _common import SHAPES
from _common import build_gemma
from _common import compile_lm
from _common import gemma_batch
from _common import per_backend_args
from _common import per_backend_main
from _common import time_interleaved

PROG = "python benchmarks/training_dynamics.py"
RANK = 8
ADA_RANK = 12


def _adapted(shape, method, **options):
    import keras_lowrank

    model = build_gemma(shape)
    keras_lowrank.enable_adapter(model, method=method, rank=options.pop("rank", RANK), **options)
    return model


def _loss():
    import keras

    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def activation_memory_jax(shape, method, x, y):
    """Bytes of XLA temporaries of the compiled gradient of the loss."""
    import jax

    model = _adapted(shape, method)
    loss = _loss()
    tv = [v.value for v in model.trainable_variables]
    ntv = [v.value for v in model.non_trainable_variables]

    def f(tv, ntv, x, y):
        logits, _ = model.stateless_call(tv, ntv, x, training=True)
        return loss(y, logits)

    compiled = jax.jit(jax.grad(f)).lower(tv, ntv, x, y).compile()
    return int(compiled.memory_analysis().temp_size_in_bytes)


def activation_memory_torch(shape, method, x, y):
    """Bytes of the distinct tensors autograd saves in one training forward
    pass, model variables excluded."""
    import torch

    model = _adapted(shape, method)
    loss = _loss()
    own = {v.value.data_ptr() for v in model.variables}
    saved = {}

    def pack(t):
        if t.data_ptr() not in own:
            saved[t.data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        value = loss(y, model(x, training=True))
    value.backward()
    return int(sum(saved.values()))


def run_keras(backend, small, steps, warmup, log):
    os.environ["KERAS_BACKEND"] = backend
    import keras

    from keras_lowrank import _compat
    from keras_lowrank import training

    assert keras.backend.backend() == backend
    shape = SHAPES["small" if small else "full"]
    x, y = gemma_batch(shape)
    out = {"shape": "small" if small else "full"}
    memory = {"jax": activation_memory_jax, "torch": activation_memory_torch}.get(backend)
    if memory is not None:
        mem = {m: memory(shape, m, x, y) for m in ("lora", "lora_fa")}
        out["memory"] = {**mem, "ratio": mem["lora_fa"] / mem["lora"]}
        log(f"activation memory: LoRA {mem['lora'] / 2**20:.1f} MiB, LoRA-FA "
            f"{mem['lora_fa'] / 2**20:.1f} MiB, ratio {mem['lora_fa'] / mem['lora']:.2f}")
    total = 10 * (warmup + steps) + 100
    variants = {
        "lora": lambda: _adapted(shape, "lora", rank=ADA_RANK),
        "adalora_bare": lambda: _adapted(shape, "adalora", rank=ADA_RANK, total_steps=total,
                                         orth_reg_weight=0.0),
        "adalora": lambda: _adapted(shape, "adalora", rank=ADA_RANK, total_steps=total),
    }
    models = {}
    for name, make in variants.items():
        model = compile_lm(make())
        if name == "adalora_bare":  # the parametrization only: no allocator
            _compat.set_optimizer(model, training.unwrap(model.optimizer))
        models[name] = model
    fns = {n: (lambda m=m: m.train_on_batch(x, y)) for n, m in models.items()}
    times = time_interleaved(fns, warmup, steps, log=log)
    t = {n: times[n]["median_ms"] for n in variants}
    out["adalora"] = {**t, "vs_lora": t["adalora"] / t["lora"], "overhead": t["adalora"] / t["adalora_bare"],
                      "bare_vs_lora": t["adalora_bare"] / t["lora"]}
    log(f"AdaLoRA {t['adalora']:.1f} ms, bare {t['adalora_bare']:.1f} ms, LoRA {t['lora']:.1f} ms")
    return out


def render(result):
    meta = result["meta"]
    parts = result.get("backends", {})
    lines = ["# Training dynamics: LoRA-FA's memory, AdaLoRA's overhead", "",
             f"Measured on {meta['machine']}, {meta['date']}; command: `{meta['command']}`.", ""]
    first = next((p for p in parts.values() if "adalora" in p), None)
    if first is None:
        return "\n".join(lines + ["No backend ran."])
    s = SHAPES[first["shape"]]
    lines += [
        f"Model: KerasHub `GemmaCausalLM`, hidden {s['hidden_dim']}, {s['num_layers']} layers, "
        f"intermediate {s['intermediate_dim']}, batch {s['batch']} x seq {s['seq_len']}, float32, CPU; "
        "adapters on every Dense/EinsumDense but the head.", "",
        f"## LoRA-FA: what the train step keeps for the backward pass (rank {RANK})", "",
        "JAX: XLA temporaries of the compiled gradient function; PyTorch: distinct tensors "
        "autograd saves in the forward pass (model variables excluded). TensorFlow: not "
        "measured (no CPU memory statistics).", "",
        "| backend | LoRA MiB | LoRA-FA MiB | LoRA-FA / LoRA |", "|---|---|---|---|",
    ]
    for b, p in parts.items():
        m = p.get("memory")
        if m:
            lines.append(f"| {b} | {m['lora'] / 2**20:.1f} | {m['lora_fa'] / 2**20:.1f} | {m['ratio']:.2f} |")
        else:
            lines.append(f"| {b} | - | - | not measured |")
    lines += [
        "", f"## AdaLoRA: time per train step (rank {ADA_RANK}, median ms of interleaved steps)", "",
        "`bare`: AdaLoRA's layers with the allocator and the regularizer off; `full`: all of "
        "AdaLoRA (importance EMAs, budget and masking in the optimizer step, orthogonality loss).", "",
        "| backend | LoRA | AdaLoRA bare | AdaLoRA full | full / LoRA | full / bare (overhead) |",
        "|---|---|---|---|---|---|",
    ]
    for b, p in parts.items():
        a = p.get("adalora")
        if a:
            lines.append(f"| {b} | {a['lora']:.1f} | {a['adalora_bare']:.1f} | {a['adalora']:.1f} | "
                         f"{a['vs_lora']:.2f} | {a['overhead']:.2f} |")
        else:
            lines.append(f"| {b} | - | - | - | - | {p.get('error', 'failed')} |")
    lines.append("")
    return "\n".join(lines)


def parse_args(argv=None, prog=PROG):
    return per_backend_args("training_dynamics", __doc__, argv, prog)


def main(argv=None, prog=PROG):
    return per_backend_main("training_dynamics", __doc__, run_keras, render, argv, prog)


if __name__ == "__main__":
    sys.exit(main())
