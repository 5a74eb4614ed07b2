#!/usr/bin/env python
"""GPU figures: LoRA and QLoRA train steps at a Gemma-2B shape, ours vs PEFT.

Run by `benchmarks/gpu.sh` on a machine with an NVIDIA GPU (it installs what
this needs). Three child processes, one after the other:

- `--backend jax` and `--backend torch`: a KerasHub `GemmaCausalLM` built
  from Gemma 2B's config (random weights, `dtype="bfloat16"`), LoRA r=8 on
  every Dense/EinsumDense over a bfloat16 base and over an NF4 base
  (`enable_adapter(..., base="nf4")`), `train_on_batch` with Adam;
- `--backend peft`: `transformers.GemmaForCausalLM` of the same shape in
  bfloat16 with PEFT's `LoraConfig(r=8, target_modules="all-linear")`, and,
  when bitsandbytes has CUDA, PEFT over a bitsandbytes NF4 base (QLoRA).

Each process warms every variant up, then times them interleaved; medians.
Reports tokens/s (batch x sequence / step time), peak device memory, and
the targets: our LoRA tokens/s >= PEFT's (jax and torch), our NF4 step <=
1.3x our bfloat16 step. `--small` runs a tiny shape on whatever device is
there (a check of the script itself, e.g. on a CPU).

    python benchmarks/gpu.py --all --markdown docs/benchmarks_gpu.md
"""

import argparse
import json
import os
import sys
import time

from _common import LR
from _common import RANK
from _common import SEED
from _common import build_gemma
from _common import compile_lm
from _common import gemma_batch
from _common import make_log
from _common import run_script
from _common import time_interleaved
from _common import utc_now
from _common import versions

GEMMA_2B = dict(vocabulary_size=256000, hidden_dim=2048, num_layers=18, num_query_heads=8,
                num_key_value_heads=1, head_dim=256, intermediate_dim=32768, seq_len=512, batch=4)
SMALL = dict(vocabulary_size=1000, hidden_dim=64, num_layers=2, num_query_heads=4,
             num_key_value_heads=1, head_dim=16, intermediate_dim=256, seq_len=16, batch=2)
CHILDREN = ("jax", "torch", "peft")
NF4_LIMIT = 1.3


def device_name(backend):
    if backend == "jax":
        import jax

        d = jax.devices()[0]
        return f"{d.platform}: {getattr(d, 'device_kind', d)}"
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def peak_device_mib(backend):
    try:
        if backend == "jax":
            import jax

            stats = jax.devices()[0].memory_stats() or {}
            return stats.get("peak_bytes_in_use", 0) / 2**20 or None
        import torch

        return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
    except Exception:  # informational only
        return None


def run_keras(backend, shape, warmup, steps, log):
    import keras_lowrank

    x, y = gemma_batch(shape)
    models = {}
    for variant, base in (("lora_bf16", None), ("lora_nf4", "nf4")):
        t0 = time.perf_counter()
        lm = build_gemma(shape, dtype="bfloat16", lm_dtype="bfloat16")
        keras_lowrank.enable_adapter(lm, method="lora", rank=RANK, base=base)
        compile_lm(lm)
        models[variant] = lm
        log(f"{variant}: built and adapted in {time.perf_counter() - t0:.1f}s")
    fns = {v: (lambda m=m: m.train_on_batch(x, y)) for v, m in models.items()}
    times = time_interleaved(fns, warmup, steps, log)
    return {"times": times, "peak_device_mib": peak_device_mib(backend)}


def run_peft(shape, warmup, steps, log):
    import peft
    import torch
    import transformers

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    b, t, vocab = shape["batch"], shape["seq_len"], shape["vocabulary_size"]
    cfg = transformers.GemmaConfig(
        vocab_size=vocab, hidden_size=shape["hidden_dim"], num_hidden_layers=shape["num_layers"],
        num_attention_heads=shape["num_query_heads"], num_key_value_heads=shape["num_key_value_heads"],
        head_dim=shape["head_dim"], intermediate_size=shape["intermediate_dim"] // 2,
        hidden_activation="gelu_pytorch_tanh", max_position_embeddings=max(256, t),
        torch_dtype=torch.bfloat16,
    )
    g = torch.Generator().manual_seed(SEED)
    ids = torch.randint(0, vocab, (b, t), generator=g).to(dev)
    labels = torch.randint(0, vocab, (b, t), generator=g).to(dev)
    lora_config = peft.LoraConfig(r=RANK, lora_alpha=RANK, target_modules="all-linear")

    def build(quantized=False):
        torch.manual_seed(SEED)
        model = transformers.GemmaForCausalLM(cfg).to(torch.bfloat16).to(dev)
        if quantized:
            import bitsandbytes as bnb

            for name, mod in list(model.model.named_modules()):
                for child_name, child in list(mod.named_children()):
                    if isinstance(child, torch.nn.Linear):
                        q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                              compute_dtype=torch.bfloat16, quant_type="nf4",
                                              compress_statistics=True)
                        q.weight = bnb.nn.Params4bit(child.weight.data.cpu(), requires_grad=False,
                                                     quant_type="nf4", compress_statistics=True)
                        setattr(mod, child_name, q.to(dev))
        model.train()
        return peft.get_peft_model(model, lora_config)

    def step_fn(model):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=LR)

        def step():
            out = model(input_ids=ids, labels=labels)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if dev == "cuda":
                torch.cuda.synchronize()
            return float(out.loss.detach())

        return step

    fns = {"peft_lora_bf16": step_fn(build())}
    qlora = None
    if dev == "cuda":
        try:
            fns["peft_qlora_nf4"] = step_fn(build(quantized=True))
        except Exception as e:  # reported, not hidden
            qlora = f"{type(e).__name__}: {e}"
            log(f"PEFT over bitsandbytes NF4 not measured: {qlora}")
    times = time_interleaved(fns, warmup, steps, log)
    return {"times": times, "peak_device_mib": peak_device_mib("torch"), "qlora_error": qlora}


def child(args):
    shape = SMALL if args.small else GEMMA_2B
    log = make_log(args.backend)
    out = {"backend": args.backend, "shape": shape, "date": utc_now()}
    if args.backend == "peft":
        out.update(run_peft(shape, args.warmup, args.steps, log))
        out["device"] = device_name("torch")
        out["versions"] = versions(["torch", "transformers", "peft", "bitsandbytes"])
    else:
        out.update(run_keras(args.backend, shape, args.warmup, args.steps, log))
        out["device"] = device_name(args.backend)
        out["versions"] = versions(["keras", "keras_hub", args.backend])
    return out


def render(results, small):
    shape = SMALL if small else GEMMA_2B
    tokens = shape["batch"] * shape["seq_len"]
    first = next((r for r in results.values() if "error" not in r), {})
    lines = [
        "# GPU benchmark: LoRA and QLoRA at a Gemma-2B shape",
        "",
        f"Measured {first.get('date', '?')} on {first.get('device', '?')} with "
        f"`python benchmarks/gpu.py --all{' --small' if small else ''}` (from `benchmarks/gpu.sh`).",
        "",
        f"Shape: {shape}; random weights, bfloat16; LoRA r={RANK} on every linear layer; "
        f"Adam({LR}); {tokens} tokens per step. Medians of interleaved steps after warm-up.",
        "",
        "| run | variant | step ms (median) | tokens/s | peak device MiB |",
        "|---|---|---|---|---|",
    ]
    tps = {}
    for run, r in results.items():
        if "error" in r:
            lines.append(f"| {run} | error: {r['error']} | | | |")
            continue
        for variant, t in r["times"].items():
            if not isinstance(t, dict) or "median_ms" not in t:
                continue
            tps[(run, variant)] = tokens / (t["median_ms"] / 1000.0)
            peak = r.get("peak_device_mib")
            lines.append(f"| {run} | {variant} | {t['median_ms']:.1f} | {tps[(run, variant)]:,.0f} | "
                         f"{'-' if peak is None else f'{peak:,.0f}'} |")
        if r.get("qlora_error"):
            lines.append(f"| {run} | peft_qlora_nf4 not measured: {r['qlora_error']} | | | |")
    lines += ["", "## Targets", ""]
    peft_tps = tps.get(("peft", "peft_lora_bf16"))
    for backend in ("jax", "torch"):
        ours = tps.get((backend, "lora_bf16"))
        if ours and peft_tps:
            ratio = ours / peft_tps
            lines.append(f"- [{backend}] our LoRA tokens/s / PEFT's >= 1.0: {ratio:.3f} "
                         f"{'PASS' if ratio >= 1.0 else 'MISS'}")
        nf4, bf16 = tps.get((backend, "lora_nf4")), tps.get((backend, "lora_bf16"))
        if nf4 and bf16:
            ratio = bf16 / nf4  # step-time ratio NF4 / bf16
            lines.append(f"- [{backend}] NF4 step / bfloat16 step <= {NF4_LIMIT}: {ratio:.3f} "
                         f"{'PASS' if ratio <= NF4_LIMIT else 'MISS'}")
    versions_seen = {}
    for r in results.values():
        versions_seen.update(r.get("versions", {}))
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in sorted(versions_seen.items())), ""]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python benchmarks/gpu.py", description=__doc__.split("\n")[0])
    p.add_argument("--backend", choices=CHILDREN)
    p.add_argument("--all", action="store_true")
    p.add_argument("--small", action="store_true")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--markdown")
    p.add_argument("--json-out")
    args = p.parse_args(argv)
    if bool(args.all) == bool(args.backend):
        p.error("give exactly one of --all, --backend")
    if args.backend:
        out = child(args)
        if args.json_out:
            with open(args.json_out, "w") as f:
                json.dump(out, f, indent=1)
        return 0
    extra = ["--steps", str(args.steps), "--warmup", str(args.warmup)] + (["--small"] if args.small else [])
    results = {}
    for name in CHILDREN:
        env = {"KERAS_BACKEND": name} if name != "peft" else {}
        results[name] = run_script(os.path.abspath(__file__), ["--backend", name, *extra], env)
    text = render(results, args.small)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
