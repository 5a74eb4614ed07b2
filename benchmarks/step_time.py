#!/usr/bin/env python
"""Train-step and predict timings of keras-lowrank adapters on a KerasHub Gemma.

One process per Keras backend (`--backend jax|tensorflow|torch`): the script
sets `KERAS_BACKEND` before Keras is imported. `--all` runs itself once per
backend in a subprocess, then the PEFT (pure PyTorch) part in another, and
prints one combined table (`--markdown PATH` also writes it as markdown).

Variants (each a fresh model built from the same seed, compiled after its
trainable flags are set, Adam(1e-4), sparse CE from logits, no metrics):

- ours-lora:   keras_lowrank.enable_adapter(model, method="lora", rank=8)
- ours-dora:   keras_lowrank.enable_adapter(model, method="dora", rank=8)
- keras-lora:  Keras's built-in `layer.enable_lora(8)` on every Dense /
               EinsumDense of the backbone, every other leaf layer frozen
- floor:       no adapter; only `decoder_block_0/pre_attention_norm/scale`
               trainable, so the backward runs through every block but
               computes no weight gradient
- plain / merged predict: `predict_on_batch` of the un-adapted model vs the
               ours-lora model after `keras_lowrank.merge(model)`
- methods:     every registered method (rank 8, its defaults otherwise), a
               fresh model each, as a ratio to our LoRA, with its trainable
               parameter count

Steps of all variants of one group are interleaved round-robin (one step of
each variant per round, the order rotating each round), so slow drifts of a
shared machine hit every variant alike; the reported time is the median.

Run it as `python benchmarks/run.py step_time [options]` (or directly,
`python benchmarks/step_time.py [options]`). See benchmarks/README.md.
"""

import argparse
import os
import sys

from _common import BACKENDS
from _common import LR
from _common import RANK
from _common import SEED
from _common import add_output_args
from _common import add_run_args
from _common import backend_facts
from _common import build_gemma
from _common import command_line
from _common import compile_lm
from _common import compiled_label
from _common import count_params
from _common import exit_status
from _common import failed_target
from _common import forward_args
from _common import gemma_batch
from _common import load_span
from _common import log_times
from _common import make_log
from _common import make_meta
from _common import machine_line
from _common import print_report
from _common import ratios
from _common import resolve_run
from _common import run_backends
from _common import run_child
from _common import time_interleaved
from _common import verdict
from _common import versions
from _common import versions_section
from _common import write_json
from _common import write_markdown

SUITE = "step_time"
PROG = "python benchmarks/step_time.py"

# (numerator, denominator) variants of the ratios reported
KERAS_PAIRS = [
    ("ours_lora", "floor"),
    ("keras_lora", "floor"),
    ("ours_dora", "floor"),
    ("ours_dora", "ours_lora"),
    ("merged_predict", "plain_predict"),
]
PEFT_PAIRS = [("peft_lora", "peft_floor")]

TARGETS = [
    # (ratio key, threshold, label)
    ("ours_lora/floor", 1.08, "ours LoRA step <= 1.08x floor"),
    ("ours_dora/ours_lora", 1.30, "ours DoRA step <= 1.3x ours LoRA"),
    ("merged_predict/plain_predict", 1.02, "merged predict <= 1.02x plain predict"),
]


# ----------------------------------------------------------------------
# Keras part (one backend per process)
def run_keras(backend, shape, warmup, steps):
    os.environ["KERAS_BACKEND"] = backend
    import numpy as np

    import keras

    import keras_lowrank

    assert keras.backend.backend() == backend, keras.backend.backend()
    info = {"variants": {}, "loadavg_start": list(os.getloadavg())}
    log = make_log(backend)
    x, y = gemma_batch(shape)

    linear = (keras.layers.Dense, keras.layers.EinsumDense)

    # ours-lora / ours-dora
    models = {}
    for method in ("lora", "dora"):
        m = build_gemma(shape)
        summary = keras_lowrank.enable_adapter(m, method=method, rank=RANK)
        compile_lm(m)
        models[f"ours_{method}"] = m
        info["variants"][f"ours_{method}"] = {
            "adapted_layers": len(summary.adapted_paths),
            "trainable_params": count_params(m.trainable_variables),
            "trainable_variables": len(m.trainable_variables),
        }

    # keras-lora: Keras's built-in LoRA
    m = build_gemma(shape)
    targets = []
    for layer in m.backbone._flatten_layers(include_self=False):
        if isinstance(layer, linear):
            targets.append(layer)
        elif not list(layer._flatten_layers(include_self=False)):
            layer.trainable = False
    for layer in targets:
        layer.enable_lora(RANK)
    compile_lm(m)
    models["keras_lora"] = m
    info["variants"]["keras_lora"] = {
        "adapted_layers": len(targets),
        "trainable_params": count_params(m.trainable_variables),
        "trainable_variables": len(m.trainable_variables),
    }

    # floor: no adapter, only the first block's input norm trainable
    m = build_gemma(shape)
    floor_path = "decoder_block_0/pre_attention_norm/scale"
    for v in m.variables:
        v.trainable = v.path == floor_path
    if [v.path for v in m.trainable_variables] != [floor_path]:
        raise RuntimeError(
            f"floor: expected only {floor_path} trainable, got "
            f"{[v.path for v in m.trainable_variables]}"
        )
    compile_lm(m)
    models["floor"] = m
    info["variants"]["floor"] = {
        "adapted_layers": 0,
        "trainable_params": count_params(m.trainable_variables),
        "trainable_variables": len(m.trainable_variables),
    }

    for name, m in models.items():
        log(f"{name}: {info['variants'][name]}")

    gate = models["floor"].backbone.get_layer("decoder_block_0").gating_ffw
    info["ffw_gating_kernel_shape"] = list(gate.kernel.shape)

    train_fns = {
        name: (lambda m=m: m.train_on_batch(x, y)) for name, m in models.items()
    }
    log(f"timing train steps: warm-up {warmup}, timed {steps} (interleaved)")
    train = time_interleaved(train_fns, warmup, steps, log)
    log_times(log, train, 11)
    info["jit_compile"] = {name: bool(m.jit_compile) for name, m in models.items()}
    info["run_eagerly"] = {name: bool(m.run_eagerly) for name, m in models.items()}

    # merged predict vs plain predict
    lora = models["ours_lora"]
    before = np.asarray(lora.predict_on_batch(x))
    keras_lowrank.merge(lora)
    left = [type(l).__name__ for l in lora._flatten_layers() if isinstance(l, keras_lowrank.Adapter)]
    if left:
        raise RuntimeError(f"merge left adapter layers: {left}")
    compile_lm(lora)
    after = np.asarray(lora.predict_on_batch(x))
    info["merge_max_abs_diff"] = float(np.max(np.abs(after - before)))
    info["merge_max_abs_logit"] = float(np.max(np.abs(before)))
    plain = compile_lm(build_gemma(shape))
    for name in ("ours_dora", "keras_lora", "floor"):
        del models[name]
    predict_fns = {
        "plain_predict": lambda: plain.predict_on_batch(x),
        "merged_predict": lambda: lora.predict_on_batch(x),
    }
    log(f"timing predict: warm-up {warmup}, timed {steps} (interleaved)")
    pred = time_interleaved(predict_fns, warmup, steps, log)
    log_times(log, pred, 14)
    info["jit_compile"]["predict"] = bool(plain.jit_compile)

    info["times"] = {**train, **pred}
    del lora, plain, models
    info["methods"] = run_methods(shape, warmup, steps, log, x, y)
    info["loadavg_end"] = list(os.getloadavg())
    info["ratios"] = ratios(info["times"], KERAS_PAIRS)
    info["backend"] = backend
    info.update(backend_facts(backend))
    return info


def run_methods(shape, warmup, steps, log, x, y):
    """Every registered method (rank 8, its defaults otherwise) on the same
    model, train steps interleaved: `{method: {trainable_params, median_ms,
    vs_lora}}`."""
    import keras_lowrank
    from keras_lowrank import registry

    models, params = {}, {}
    for method in keras_lowrank.methods():
        m = build_gemma(shape)
        keras_lowrank.enable_adapter(m, method=method, rank=RANK, **registry.get(method).example_options)
        compile_lm(m)
        models[method] = m
        params[method] = count_params(m.trainable_variables)
    log(f"timing every method's train step: warm-up {warmup}, timed {steps} (interleaved)")
    fns = {name: (lambda m=m: m.train_on_batch(x, y)) for name, m in models.items()}
    times = time_interleaved(fns, warmup, steps, log)
    lora = times["lora"]["median_ms"]
    return {
        name: {"trainable_params": params[name], "median_ms": t["median_ms"],
               "p25_ms": t["p25_ms"], "p75_ms": t["p75_ms"], "vs_lora": t["median_ms"] / lora}
        for name, t in times.items()
    }


# ----------------------------------------------------------------------
# PEFT part (pure PyTorch, no Keras)
def run_peft(shape, warmup, steps):
    import torch
    import transformers
    import peft

    log = make_log("peft")
    b, t, vocab = shape["batch"], shape["seq_len"], shape["vocabulary_size"]
    intermediate = shape["intermediate_dim"] // 2

    def config():
        cfg = transformers.GemmaConfig(
            vocab_size=vocab,
            hidden_size=shape["hidden_dim"],
            num_hidden_layers=shape["num_layers"],
            num_attention_heads=shape["num_query_heads"],
            num_key_value_heads=shape["num_key_value_heads"],
            head_dim=shape["head_dim"],
            intermediate_size=intermediate,
            hidden_activation="gelu_pytorch_tanh",
            max_position_embeddings=max(256, t),
        )
        return cfg

    def build():
        torch.manual_seed(SEED)
        model = transformers.GemmaForCausalLM(config()).to(torch.float32)
        model.train()
        return model

    g = torch.Generator().manual_seed(SEED)
    ids = torch.randint(0, vocab, (b, t), generator=g)
    mask = torch.ones((b, t), dtype=torch.long)
    labels = torch.randint(0, vocab, (b, t), generator=g)

    lora = peft.get_peft_model(
        build(), peft.LoraConfig(r=RANK, lora_alpha=RANK, target_modules="all-linear")
    )
    floor = build()
    for p in floor.parameters():
        p.requires_grad_(False)
    floor.model.layers[0].input_layernorm.weight.requires_grad_(True)

    def step_fn(model):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=LR)

        def step():
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return float(out.loss.detach())

        return step, int(sum(p.numel() for p in params)), len(params)

    info = {"variants": {}, "loadavg_start": list(os.getloadavg())}
    fns = {}
    for name, model in (("peft_lora", lora), ("peft_floor", floor)):
        fn, n_params, n_vars = step_fn(model)
        fns[name] = fn
        info["variants"][name] = {"trainable_params": n_params, "trainable_variables": n_vars}
        log(f"{name}: {info['variants'][name]}")
    n_lora_modules = sum(
        1 for _, mod in lora.named_modules() if isinstance(mod, peft.tuners.lora.LoraLayer)
    )
    info["variants"]["peft_lora"]["adapted_layers"] = n_lora_modules
    info["attn_implementation"] = getattr(floor.config, "_attn_implementation", "?")
    info["intermediate_size"] = intermediate
    info["torch_num_threads"] = torch.get_num_threads()
    log(f"timing train steps: warm-up {warmup}, timed {steps} (interleaved)")
    times = time_interleaved(fns, warmup, steps, log)
    log_times(log, times, 11)
    info["times"] = times
    info["loadavg_end"] = list(os.getloadavg())
    info["ratios"] = ratios(times, PEFT_PAIRS)
    info["versions"] = versions(["torch", "transformers", "peft", "numpy"])
    return info


# ----------------------------------------------------------------------
# Report
def render(results, meta):
    """Markdown report of the results of every part that ran."""
    lines = []
    shape = meta["shape"]
    env = meta["environment"]
    lines.append("## Setup\n")
    lines.append(
        f"- model: KerasHub `GemmaBackbone` vocabulary {shape['vocabulary_size']}, "
        f"hidden {shape['hidden_dim']}, {shape['num_layers']} layers, "
        f"{shape['num_query_heads']} query / {shape['num_key_value_heads']} kv heads, "
        f"head_dim {shape['head_dim']}, intermediate_dim {shape['intermediate_dim']} "
        f"(Gemma v1 halves it per gate: each gate is "
        f"{shape['hidden_dim']}x{shape['intermediate_dim'] // 2}), in "
        f"`GemmaCausalLM(preprocessor=None)`; float32, CPU"
    )
    lines.append(
        f"- batch {shape['batch']} x seq {shape['seq_len']} random tokens; "
        f"Adam(lr={LR}); `SparseCategoricalCrossentropy(from_logits=True)`; no metrics"
    )
    lines.append(
        f"- step: `model.train_on_batch(x, y)` (Keras) / forward with labels + "
        f"backward + `Adam.step()` (PEFT); {meta['warmup']} warm-up calls per "
        f"variant, then {meta['steps']} timed calls per variant interleaved "
        f"round-robin; median reported (p25-p75 in brackets)"
    )
    lines.append(
        f"- each variant is a fresh model from seed {SEED}, compiled after its "
        f"trainable flags were set, `jit_compile=\"auto\"`"
    )
    lines.append(machine_line(env))
    lines.append("")

    keras_parts = [b for b in BACKENDS if b in results]
    if keras_parts:
        lines.append("## Keras backends: step time (ms, median [p25-p75])\n")
        cols = ["ours_lora", "ours_dora", "keras_lora", "floor", "plain_predict", "merged_predict"]
        heads = ["ours-lora", "ours-dora", "keras-lora", "floor", "plain predict", "merged predict"]
        lines.append("| backend | compiled | " + " | ".join(heads) + " |")
        lines.append("|---" * (len(heads) + 2) + "|")
        for b in keras_parts:
            r = results[b]
            if "error" in r:
                lines.append(f"| {b} | FAILED: {r['error']} |" + " |" * len(heads))
                continue
            cells = []
            for c in cols:
                s = r["times"][c]
                cells.append(f"{s['median_ms']:.1f} [{s['p25_ms']:.1f}-{s['p75_ms']:.1f}]")
            lines.append(f"| {b} | {compiled(b, r)} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append("## Keras backends: ratios (target in brackets)\n")
        rheads = [
            ("ours_lora/floor", "ours-lora / floor [<= 1.08]", 1.08),
            ("keras_lora/floor", "keras-lora / floor", None),
            ("ours_dora/floor", "ours-dora / floor", None),
            ("ours_dora/ours_lora", "ours-dora / ours-lora [<= 1.3]", 1.30),
            ("merged_predict/plain_predict", "merged / plain predict [<= 1.02]", 1.02),
        ]
        lines.append("| backend | " + " | ".join(h for _, h, _ in rheads) + " |")
        lines.append("|---" * (len(rheads) + 1) + "|")
        for b in keras_parts:
            r = results[b]
            if "error" in r:
                lines.append(f"| {b} | FAILED |" + " |" * (len(rheads) - 1))
                continue
            cells = []
            for key, _, lim in rheads:
                v = r["ratios"][key]
                cells.append(f"{v:.3f}" + (f" {verdict(v, lim)}" if lim else ""))
            lines.append(f"| {b} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append(
            "Same ratios from the fastest (min) call of each variant, less "
            "sensitive to other processes on a shared machine (information "
            "only; PASS/MISS above uses medians):\n"
        )
        lines.append("| backend | " + " | ".join(h.split(" [")[0] for _, h, _ in rheads) + " |")
        lines.append("|---" * (len(rheads) + 1) + "|")
        for b in keras_parts:
            r = results[b]
            if "error" in r:
                continue
            mins = ratios(r["times"], KERAS_PAIRS, "min_ms")
            lines.append(f"| {b} | " + " | ".join(f"{mins[k]:.3f}" for k, _, _ in rheads) + " |")
        lines.append("")
        lines.append("Trainable parameters per variant:")
        lines.append("")
        b0 = next((b for b in keras_parts if "error" not in results[b]), None)
        if b0:
            for name, v in results[b0]["variants"].items():
                lines.append(
                    f"- {name}: {v['trainable_params']:,} params in "
                    f"{v['trainable_variables']} variables, "
                    f"{v['adapted_layers']} adapted layers"
                )
            lines.append(
                f"- merge check ({b0}): max |logits after merge - before| = "
                f"{results[b0]['merge_max_abs_diff']:.2e} (max |logit| "
                f"{results[b0]['merge_max_abs_logit']:.2f})"
            )
        lines.append("")

    with_methods = [b for b in keras_parts if "methods" in results[b]]
    if with_methods:
        lines.append("## Every method: train step relative to our LoRA (same model)\n")
        lines.append(
            f"Each registered method with `rank={RANK}` and its defaults otherwise "
            "(LoRA-drop as `enable_adapter(method=\"lora_drop\")`: every layer reads "
            "its shape's tied pair; SVF's rank 8 is its top 8 singular values), a fresh "
            "model each, train steps interleaved; median step time / our LoRA's "
            "(ms in brackets).\n"
        )
        lines.append("| method | trainable params | " + " | ".join(with_methods) + " |")
        lines.append("|---|---|" + "---|" * len(with_methods))
        first = results[with_methods[0]]["methods"]
        for name in first:
            cells = []
            for b in with_methods:
                row = results[b]["methods"].get(name)
                cells.append("-" if row is None else f"{row['vs_lora']:.2f} ({row['median_ms']:.0f})")
            lines.append(f"| {name} | {first[name]['trainable_params']:,} | " + " | ".join(cells) + " |")
        lines.append("")

    if "peft" in results:
        r = results["peft"]
        lines.append("## PEFT (pure PyTorch) step time\n")
        if "error" in r:
            lines.append(f"FAILED: {r['error']}\n")
        else:
            lines.append(
                f"`transformers.GemmaForCausalLM` with the same shape, "
                f"intermediate_size={r['intermediate_size']} (= KerasHub's "
                f"intermediate_dim / 2, so each MLP gate matches Gemma v1's), "
                f"hidden_activation gelu_pytorch_tanh, attention "
                f"`{r['attn_implementation']}`, torch threads "
                f"{r['torch_num_threads']}, eager. PEFT LoRA: "
                f"`LoraConfig(r=8, lora_alpha=8, target_modules=\"all-linear\")` "
                f"({r['variants']['peft_lora']['adapted_layers']} layers, "
                f"{r['variants']['peft_lora']['trainable_params']:,} params); floor: "
                f"only `model.layers[0].input_layernorm.weight` trainable.\n"
            )
            lines.append("| variant | step ms, median [p25-p75] |")
            lines.append("|---|---|")
            for name in ("peft_lora", "peft_floor"):
                s = r["times"][name]
                lines.append(
                    f"| {name.replace('_', '-')} | {s['median_ms']:.1f} "
                    f"[{s['p25_ms']:.1f}-{s['p75_ms']:.1f}] |"
                )
            lines.append("")
            lines.append(
                f"- PEFT LoRA / PEFT floor: {r['ratios']['peft_lora/peft_floor']:.3f} "
                f"(from min: {ratios(r['times'], PEFT_PAIRS, 'min_ms')['peft_lora/peft_floor']:.3f})"
            )
            t = results.get("torch")
            if t and "error" not in t:
                v = t["times"]["ours_lora"]["median_ms"] / r["times"]["peft_lora"]["median_ms"]
                vmin = t["times"]["ours_lora"]["min_ms"] / r["times"]["peft_lora"]["min_ms"]
                lines.append(
                    f"- ours-lora (Keras torch backend) / PEFT LoRA: {v:.3f} "
                    f"(from min: {vmin:.3f})"
                )
            lines.append("")

    if keras_parts:
        lines.append("## Targets\n")
        for b in keras_parts:
            r = results[b]
            if "error" in r:
                lines.append(failed_target(b, r))
                continue
            for key, lim, label in TARGETS:
                v = r["ratios"][key]
                lines.append(f"- [{b}] {label}: {v:.3f} {verdict(v, lim)}")
        lines.append("")

    loads = [s for s in (load_span(part, r) for part, r in results.items()) if s]
    if loads:
        lines.append(
            "1-minute load average at start -> end of each part (the machine is "
            "shared; anything well above 0 means other processes competed for "
            "the cores): " + "; ".join(loads)
        )
        lines.append("")
    lines.extend(versions_section(results))
    return "\n".join(lines)


def compiled(backend, r):
    """compiled_label of a Keras backend run (train models and predict)."""
    jit = r["jit_compile"]
    return compiled_label(
        backend,
        jit.values(),
        any(r.get("run_eagerly", {}).values()),
        long=True,
        fallback=f"jit_compile={jit}, run_eagerly={r.get('run_eagerly')}",
    )


# ----------------------------------------------------------------------
# Driver
def build_parser(prog=PROG):
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    add_run_args(
        p,
        backend_help="run the Keras part on this backend",
        all_help="every backend, then PEFT, each in a subprocess",
        small_help="tiny shapes for a functional check",
    )
    p.add_argument("--peft", action="store_true", help="run the PEFT (pure PyTorch) part")
    add_output_args(p)
    return p


def parse_args(argv=None, prog=PROG):
    p = build_parser(prog)
    args = p.parse_args(argv)
    if sum([bool(args.backend), args.peft, args.all]) != 1:
        p.error("give exactly one of --backend, --peft, --all")
    return args


def main(argv=None, prog=PROG):
    args = parse_args(argv, prog)
    steps, shape_name, shape = resolve_run(args)
    meta = make_meta(shape_name, steps, args.warmup)

    results = {}
    if args.all:
        extra = forward_args(args, steps)
        results.update(run_backends(SUITE, extra))
        results["peft"] = run_child(SUITE, ["--peft", *extra], {})
    elif args.backend:
        os.environ["KERAS_BACKEND"] = args.backend
        results[args.backend] = run_keras(args.backend, shape, args.warmup, steps)
    else:
        results["peft"] = run_peft(shape, args.warmup, steps)

    if args.json_out:
        write_json(args.json_out, results, meta, whole=args.all)

    report = render(results, meta)
    print_report(report)
    if args.markdown:
        mode = "--all" if args.all else (f"--backend {args.backend}" if args.backend else "--peft")
        write_markdown(
            args.markdown,
            "Step-time benchmark",
            meta,
            shape_name,
            command_line(prog, mode, args, steps),
            report,
        )
    return exit_status(results)


if __name__ == "__main__":
    sys.exit(main())
