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

Steps of all variants of one group are interleaved round-robin (one step of
each variant per round, the order rotating each round), so slow drifts of a
shared machine hit every variant alike; the reported time is the median.

See benchmarks/README.md.
"""

import argparse
import datetime
import json
import os
import sys
import time

from _common import environment  # noqa: E402
from _common import BACKENDS  # noqa: E402
from _common import LR  # noqa: E402
from _common import RANK  # noqa: E402
from _common import SEED  # noqa: E402
from _common import SHAPES  # noqa: E402
from _common import run_script  # noqa: E402
from _common import summarize_times  # noqa: E402
from _common import verdict  # noqa: E402
from _common import versions  # noqa: E402


def run_child(argv_extra, env_extra):
    return run_script(__file__, argv_extra, env_extra)


TARGETS = [
    # (ratio key, threshold, label)
    ("ours_lora/floor", 1.08, "ours LoRA step <= 1.08x floor"),
    ("ours_dora/ours_lora", 1.30, "ours DoRA step <= 1.3x ours LoRA"),
    ("merged_predict/plain_predict", 1.02, "merged predict <= 1.02x plain predict"),
]


# ----------------------------------------------------------------------
# Environment
# ----------------------------------------------------------------------
# Timing
def time_interleaved(fns, warmup, steps, log=print):
    """Warm every callable up, then time them round-robin; medians in ms."""
    for name, fn in fns.items():
        t0 = time.perf_counter()
        for _ in range(warmup):
            fn()
        log(f"  warm-up {name}: {warmup} calls in {time.perf_counter() - t0:.1f}s")
    names = list(fns)
    times = {n: [] for n in names}
    for i in range(steps):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {n: summarize_times(t) for n, t in times.items()}


# ----------------------------------------------------------------------
# Keras part (one backend per process)
def run_keras(backend, shape, warmup, steps):
    os.environ["KERAS_BACKEND"] = backend
    import numpy as np

    import keras
    import keras_hub

    import keras_lowrank

    assert keras.backend.backend() == backend, keras.backend.backend()
    info = {"variants": {}, "loadavg_start": list(os.getloadavg())}
    log = lambda *a: print(f"[{backend}]", *a, flush=True)  # noqa: E731

    b, t, vocab = shape["batch"], shape["seq_len"], shape["vocabulary_size"]
    rng = np.random.default_rng(SEED)
    x = {
        "token_ids": rng.integers(0, vocab, (b, t)).astype("int32"),
        "padding_mask": np.ones((b, t), "int32"),
    }
    y = rng.integers(0, vocab, (b, t)).astype("int32")

    def build():
        keras.utils.set_random_seed(SEED)
        bb = keras_hub.models.GemmaBackbone(
            vocabulary_size=vocab,
            num_layers=shape["num_layers"],
            num_query_heads=shape["num_query_heads"],
            num_key_value_heads=shape["num_key_value_heads"],
            hidden_dim=shape["hidden_dim"],
            intermediate_dim=shape["intermediate_dim"],
            head_dim=shape["head_dim"],
            dtype="float32",
        )
        return keras_hub.models.GemmaCausalLM(backbone=bb, preprocessor=None)

    def compile_(model):
        model.compile(
            optimizer=keras.optimizers.Adam(LR),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            weighted_metrics=[],
            jit_compile="auto",
        )
        return model

    def n_trainable(model):
        return int(sum(np.prod(v.shape) for v in model.trainable_variables))

    linear = (keras.layers.Dense, keras.layers.EinsumDense)

    # ours-lora / ours-dora
    models = {}
    for method in ("lora", "dora"):
        m = build()
        summary = keras_lowrank.enable_adapter(m, method=method, rank=RANK)
        compile_(m)
        models[f"ours_{method}"] = m
        info["variants"][f"ours_{method}"] = {
            "adapted_layers": len(summary.adapted_paths),
            "trainable_params": n_trainable(m),
            "trainable_variables": len(m.trainable_variables),
        }

    # keras-lora: Keras's built-in LoRA
    m = build()
    targets = []
    for layer in m.backbone._flatten_layers(include_self=False):
        if isinstance(layer, linear):
            targets.append(layer)
        elif not list(layer._flatten_layers(include_self=False)):
            layer.trainable = False
    for layer in targets:
        layer.enable_lora(RANK)
    compile_(m)
    models["keras_lora"] = m
    info["variants"]["keras_lora"] = {
        "adapted_layers": len(targets),
        "trainable_params": n_trainable(m),
        "trainable_variables": len(m.trainable_variables),
    }

    # floor: no adapter, only the first block's input norm trainable
    m = build()
    floor_path = "decoder_block_0/pre_attention_norm/scale"
    for v in m.variables:
        v.trainable = v.path == floor_path
    if [v.path for v in m.trainable_variables] != [floor_path]:
        raise RuntimeError(
            f"floor: expected only {floor_path} trainable, got "
            f"{[v.path for v in m.trainable_variables]}"
        )
    compile_(m)
    models["floor"] = m
    info["variants"]["floor"] = {
        "adapted_layers": 0,
        "trainable_params": n_trainable(m),
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
    for name, s in train.items():
        log(f"  {name:11s} {s['median_ms']:9.1f} ms  (min {s['min_ms']:.1f})")
    info["jit_compile"] = {name: bool(m.jit_compile) for name, m in models.items()}
    info["run_eagerly"] = {name: bool(m.run_eagerly) for name, m in models.items()}

    # merged predict vs plain predict
    lora = models["ours_lora"]
    before = np.asarray(lora.predict_on_batch(x))
    keras_lowrank.merge(lora)
    left = [type(l).__name__ for l in lora._flatten_layers() if isinstance(l, keras_lowrank.Adapter)]
    if left:
        raise RuntimeError(f"merge left adapter layers: {left}")
    compile_(lora)
    after = np.asarray(lora.predict_on_batch(x))
    info["merge_max_abs_diff"] = float(np.max(np.abs(after - before)))
    info["merge_max_abs_logit"] = float(np.max(np.abs(before)))
    plain = compile_(build())
    for name in ("ours_dora", "keras_lora", "floor"):
        del models[name]
    predict_fns = {
        "plain_predict": lambda: plain.predict_on_batch(x),
        "merged_predict": lambda: lora.predict_on_batch(x),
    }
    log(f"timing predict: warm-up {warmup}, timed {steps} (interleaved)")
    pred = time_interleaved(predict_fns, warmup, steps, log)
    for name, s in pred.items():
        log(f"  {name:14s} {s['median_ms']:9.1f} ms  (min {s['min_ms']:.1f})")
    info["jit_compile"]["predict"] = bool(plain.jit_compile)

    info["times"] = {**train, **pred}
    info["loadavg_end"] = list(os.getloadavg())
    info["ratios"] = keras_ratios(info["times"])
    info["backend"] = backend
    info["versions"] = versions(["keras", "keras_hub", "keras_lowrank", "numpy", backend])
    if backend == "jax":
        info["versions"].update(versions(["jaxlib"]))
    if backend == "torch":
        import torch

        info["torch_num_threads"] = torch.get_num_threads()
    return info


def keras_ratios(times, stat="median_ms"):
    med = {k: v[stat] for k, v in times.items()}
    return {
        "ours_lora/floor": med["ours_lora"] / med["floor"],
        "keras_lora/floor": med["keras_lora"] / med["floor"],
        "ours_dora/floor": med["ours_dora"] / med["floor"],
        "ours_dora/ours_lora": med["ours_dora"] / med["ours_lora"],
        "merged_predict/plain_predict": med["merged_predict"] / med["plain_predict"],
    }


# ----------------------------------------------------------------------
# PEFT part (pure PyTorch, no Keras)
def run_peft(shape, warmup, steps):
    import torch
    import transformers
    import peft

    log = lambda *a: print("[peft]", *a, flush=True)  # noqa: E731
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
    for name, s in times.items():
        log(f"  {name:11s} {s['median_ms']:9.1f} ms  (min {s['min_ms']:.1f})")
    info["times"] = times
    info["loadavg_end"] = list(os.getloadavg())
    info["ratios"] = {
        "peft_lora/peft_floor": times["peft_lora"]["median_ms"] / times["peft_floor"]["median_ms"]
    }
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
    lines.append(
        f"- machine: {env['cpu_model']}, os.cpu_count()={env['cpu_count']}, "
        f"{env['platform']}, Python {env['python']}"
    )
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
            lines.append(f"| {b} | {compiled_label(b, r)} | " + " | ".join(cells) + " |")
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
            mins = keras_ratios(r["times"], "min_ms")
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
                f"(from min: {r['times']['peft_lora']['min_ms'] / r['times']['peft_floor']['min_ms']:.3f})"
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
                lines.append(f"- [{b}] MISS: backend run failed ({r['error']})")
                continue
            for key, lim, label in TARGETS:
                v = r["ratios"][key]
                lines.append(f"- [{b}] {label}: {v:.3f} {verdict(v, lim)}")
        lines.append("")

    loads = [
        f"{part} {r['loadavg_start'][0]:.2f} -> {r['loadavg_end'][0]:.2f}"
        for part, r in results.items()
        if "loadavg_start" in r and "loadavg_end" in r
    ]
    if loads:
        lines.append(
            "1-minute load average at start -> end of each part (the machine is "
            "shared; anything well above 0 means other processes competed for "
            "the cores): " + "; ".join(loads)
        )
        lines.append("")
    lines.append("## Versions\n")
    seen = {}
    for part, r in results.items():
        for k, v in r.get("versions", {}).items():
            seen.setdefault(k, v)
    lines.append(", ".join(f"{k} {v}" for k, v in sorted(seen.items())))
    lines.append("")
    return "\n".join(lines)


def compiled_label(backend, r):
    jit = r["jit_compile"]
    eager = any(r.get("run_eagerly", {}).values())
    if backend == "torch" and not any(jit.values()) and not eager:
        return "eager torch (Keras: auto -> no jit on torch)"
    if backend == "tensorflow" and not any(jit.values()) and not eager:
        return "tf.function graph, no XLA (Keras: auto -> no XLA on CPU-only TF)"
    if backend == "jax" and all(jit.values()):
        return "jax.jit (XLA)"
    return f"jit_compile={jit}, run_eagerly={r.get('run_eagerly')}"


# ----------------------------------------------------------------------
# Driver
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backend", choices=BACKENDS, help="run the Keras part on this backend")
    p.add_argument("--peft", action="store_true", help="run the PEFT (pure PyTorch) part")
    p.add_argument("--all", action="store_true", help="every backend, then PEFT, each in a subprocess")
    p.add_argument("--small", action="store_true", help="tiny shapes for a functional check")
    p.add_argument("--steps", type=int, default=None, help="timed steps per variant (default 15; 10 with --small)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up steps per variant (default 3)")
    p.add_argument("--markdown", help="write the report as markdown to this path")
    p.add_argument("--json-out", help="write raw results as JSON to this path")
    args = p.parse_args(argv)
    if sum([bool(args.backend), args.peft, args.all]) != 1:
        p.error("give exactly one of --backend, --peft, --all")
    steps = args.steps or (10 if args.small else 15)
    if steps < 10 or args.warmup < 3:
        print("note: fewer than 10 timed / 3 warm-up steps", flush=True)
    shape_name = "small" if args.small else "full"
    shape = SHAPES[shape_name]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    meta = {
        "shape_name": shape_name,
        "shape": shape,
        "steps": steps,
        "warmup": args.warmup,
        "environment": environment(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }

    results = {}
    if args.all:
        extra = ["--steps", str(steps), "--warmup", str(args.warmup)]
        if args.small:
            extra.append("--small")
        for b in BACKENDS:
            results[b] = run_child(["--backend", b, *extra], {"KERAS_BACKEND": b})
        results["peft"] = run_child(["--peft", *extra], {})
    elif args.backend:
        os.environ["KERAS_BACKEND"] = args.backend
        results[args.backend] = run_keras(args.backend, shape, args.warmup, steps)
    else:
        results["peft"] = run_peft(shape, args.warmup, steps)

    if args.json_out:
        part = next(iter(results.values()))
        with open(args.json_out, "w") as f:
            json.dump(part if not args.all else {"meta": meta, "results": results}, f, indent=1)

    report = render(results, meta)
    print()
    print(report, flush=True)
    if args.markdown:
        header = [
            "# Step-time benchmark",
            "",
            f"Measured {meta['date']} on a {meta['environment']['cpu_count']}-core CPU VM "
            f"({meta['environment']['cpu_model']}), shapes `{shape_name}`, with",
            "`python benchmarks/step_time.py --all"
            + (" --small" if args.small else "")
            + (f" --steps {steps}" if args.steps else "")
            + f" --markdown {args.markdown}`.",
            "",
        ]
        os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
        with open(args.markdown, "w") as f:
            f.write("\n".join(header) + "\n" + report)
        print(f"wrote {args.markdown}", flush=True)
    missing = [k for k, r in results.items() if "error" in r]
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
