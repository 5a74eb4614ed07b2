#!/usr/bin/env python
"""LoRA on a mixture-of-experts model's expert stacks (`keras_lowrank.experts`).

A Mixtral-shaped KerasHub backbone, four variants trained on the same task,
one needing the experts: match a teacher (the same model with its expert
stacks changed) on its hidden states (MSE).

- `floor`: LoRA (rank 1) on the routers only, the frozen step's floor (the
  backward still runs through every layer);
- `attention`: LoRA on attention only (what "all-linear" gave MoE models
  before expert stacks were adaptable, less the routers);
- `experts+attention`: LoRA on the expert stacks and attention, the expert
  update applied as the factored einsum over experts (no `(E, in, out)`
  update per step);
- `experts+attention, materialized`: the same adapters, the expert update
  formed per step (`einsum(x, W + ΔW)`), for the comparison.

Reported: trainable parameters, the train step's median time and its ratio
to the floor, and the loss each reaches after the same number of steps.

    python benchmarks/run.py moe_experts --backend torch [--small] [--markdown PATH]
    python benchmarks/run.py moe_experts --all
"""

import os
import sys
import types

from _common import per_backend_args
from _common import per_backend_main
from _common import time_interleaved

PROG = "python benchmarks/moe_experts.py"
#: two shapes: many tokens through narrow experts, and few tokens through
#: wide ones (where forming the update per step costs the most)
FULL = [{"hidden": 64, "inter": 128, "experts": 8, "layers": 2, "batch": 8, "seq": 32, "train_steps": 80},
        {"hidden": 256, "inter": 1024, "experts": 8, "layers": 1, "batch": 2, "seq": 16, "train_steps": 40}]
SMALL = [{"hidden": 16, "inter": 32, "experts": 4, "layers": 1, "batch": 4, "seq": 8, "train_steps": 20}]
ATTENTION = ["query", "key", "value", "attention_output"]


def _materialize(model, ops):
    """Apply each expert adapter's update by forming `W + ΔW` every step."""
    from keras_lowrank.experts import ExpertLinear

    def adapter_output(self, x, y, training):
        kernel = self.geometry.matrix_to_kernel(self.merged_matrix(self.base_matrix()))
        return ops.einsum(self.layer.equation, x, ops.cast(kernel, x.dtype))

    import keras_lowrank

    for _, a in keras_lowrank.adapters(model):
        if isinstance(a.layer, ExpertLinear):
            a.adapter_output = types.MethodType(adapter_output, a)


def run_keras(backend, small, steps, warmup, log):
    return {"shapes": [run_shape(cfg, steps, warmup, log) for cfg in (SMALL if small else FULL)]}


def run_shape(cfg, steps, warmup, log):
    import keras
    import keras_hub
    import numpy as np
    from keras import ops

    import keras_lowrank
    from keras_lowrank import bases

    def backbone():
        keras.utils.set_random_seed(0)
        return keras_hub.models.MixtralBackbone(
            vocabulary_size=128, num_layers=cfg["layers"], num_query_heads=4, num_key_value_heads=2,
            hidden_dim=cfg["hidden"], intermediate_dim=cfg["inter"], num_experts=cfg["experts"],
            top_k=2, sliding_window=cfg["seq"])

    rng = np.random.default_rng(0)
    ids = rng.integers(1, 128, (cfg["batch"], cfg["seq"])).astype("int32")
    x = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    teacher = backbone()
    for v in teacher.weights:  # the task: the teacher's experts differ
        if len(v.shape) == 3:
            value = ops.convert_to_numpy(v)
            v.assign(value + 0.5 * value.std() * rng.standard_normal(value.shape).astype("float32"))
    target = ops.convert_to_numpy(teacher(x))

    variants = {
        "floor": dict(rank=1, targets="router"),
        "attention": dict(rank=4, targets=ATTENTION),
        "experts+attention": dict(rank=4, targets=["experts"] + ATTENTION),
        "experts+attention, materialized": dict(rank=4, targets=["experts"] + ATTENTION),
    }
    models, rows = {}, {}
    for name, options in variants.items():
        model = backbone()
        keras_lowrank.enable_adapter(model, **options)
        if name.endswith("materialized"):
            _materialize(model, ops)
        model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
        models[name] = model
        rows[name] = {"trainable": bases.count_params(model, trainable_only=True)}
    fns = {n: (lambda m=m: m.train_on_batch(x, target)) for n, m in models.items()}
    times = time_interleaved(fns, warmup, steps, log=log)
    for name, model in models.items():
        for _ in range(cfg["train_steps"]):
            loss = model.train_on_batch(x, target)
        rows[name]["loss"] = float(np.asarray(loss).reshape(-1)[0])
        rows[name]["ms"] = times[name]["median_ms"]
    floor = rows["floor"]["ms"]
    for name, row in rows.items():
        row["ratio"] = row["ms"] / floor
        log(f"{name}: {row['trainable']:,} trainable, {row['ms']:.1f} ms ({row['ratio']:.2f}x floor), "
            f"loss {row['loss']:.4f}")
    start = float(np.mean((ops.convert_to_numpy(backbone()(x)) - target) ** 2))
    return {"config": cfg, "rows": rows, "start_loss": start}


def render(result):
    meta = result["meta"]
    lines = ["# LoRA on MoE expert stacks", "",
             f"Measured on {meta['machine']}, {meta['date']}; command: `{meta['command']}`.", ""]
    parts = {b: p for b, p in result.get("backends", {}).items() if "shapes" in p}
    if not parts:
        return "\n".join(lines + ["No backend ran."])
    lines += [
        "A Mixtral-shaped KerasHub backbone (top-2 routing). The task is to match a teacher whose "
        "expert stacks differ (MSE on hidden states); each variant trains the same steps (Adam "
        "1e-2) from the same start. Step time: median of interleaved `train_on_batch` calls; the "
        "ratio is to the floor (rank-1 LoRA on the routers only). LoRA rank 4.", "",
    ]
    for backend, p in parts.items():
        for shape in p["shapes"]:
            cfg = shape["config"]
            lines += [
                f"## {backend}: hidden {cfg['hidden']}, {cfg['experts']} experts of {cfg['inter']}, "
                f"{cfg['layers']} layer(s), {cfg['batch']} x {cfg['seq']} tokens", "",
                f"Loss before training: {shape['start_loss']:.4f}; {cfg['train_steps']} steps.", "",
                "| variant | trainable | step ms | / floor | loss after training |", "|---|---|---|---|---|"]
            for name, row in shape["rows"].items():
                lines.append(f"| {name} | {row['trainable']:,} | {row['ms']:.1f} | {row['ratio']:.2f} | "
                             f"{row['loss']:.4f} |")
            lines.append("")
    return "\n".join(lines)


def parse_args(argv=None, prog=PROG):
    return per_backend_args("moe_experts", __doc__, argv, prog)


def main(argv=None, prog=PROG):
    return per_backend_main("moe_experts", __doc__, run_keras, render, argv, prog)


if __name__ == "__main__":
    sys.exit(main())
