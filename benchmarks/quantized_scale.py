#!/usr/bin/env python
"""QLoRA-sized memory: an NF4 base made layer by layer from a bfloat16 model.

One process per Keras backend. Each builds a Gemma backbone from a config
(random weights, no download) in bfloat16: Gemma-2B's layer shape (hidden
2048, 8 query heads and 1 kv head of 256, intermediate 32768, i.e. gates of
16384), 4 layers and a 32,768-token vocabulary, 507.5M parameters. Then
`enable_adapter(backbone, method="lora", rank=8, base="nf4")`, which
quantizes the kernels one layer at a time and lets go of each float kernel.

Measured in the process (`/proc/self/status`): RSS after the imports, the
peak (VmHWM) and RSS after building the bfloat16 model (on JAX after its
asynchronous random inits have finished), then, with the peak reset to the
current RSS (`/proc/self/clear_refs`), the peak during the conversion, the
RSS after it (and after `malloc_trim`, which hands freed heap pages back),
and the bytes of the stored NF4 arrays against the bfloat16 kernels they
replace. Targets: the conversion's peak at most the bfloat16 model's RSS
plus the largest kernel; the stored NF4 arrays about 4.127/16 of the
bfloat16 kernel bytes. From the measured per-parameter
figures the report works out what Gemma 2B and 7B would need.

    python benchmarks/run.py quantized_scale --all --markdown docs/benchmarks_quantized_scale.md
    python benchmarks/run.py quantized_scale --backend jax --small   # a quick check
"""

import ctypes
import gc
import math
import sys
import time

from _common import per_backend_args
from _common import per_backend_main

#: Gemma 1 configs (KerasHub's `intermediate_dim` is twice each gate's width)
GEMMA = {
    "Gemma 2B": dict(vocabulary_size=256000, hidden_dim=2048, num_layers=18, num_query_heads=8,
                     num_key_value_heads=1, head_dim=256, intermediate_dim=32768),
    "Gemma 7B": dict(vocabulary_size=256000, hidden_dim=3072, num_layers=28, num_query_heads=16,
                     num_key_value_heads=16, head_dim=256, intermediate_dim=49152),
}
MEASURED = dict(GEMMA["Gemma 2B"], num_layers=4, vocabulary_size=32768)
SMALL = dict(vocabulary_size=4096, hidden_dim=256, num_layers=2, num_query_heads=4,
             num_key_value_heads=1, head_dim=64, intermediate_dim=2048)
NF4_BITS = 4.127
MIB = 1 << 20


def counts(cfg):
    """(adapted kernel parameters, other parameters, largest kernel) of a Gemma 1 backbone."""
    d, heads, kv, hd = cfg["hidden_dim"], cfg["num_query_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    gate = cfg["intermediate_dim"] // 2
    kernels = [d * heads * hd, d * kv * hd, d * kv * hd, heads * hd * d, d * gate, d * gate, gate * d]
    layers = cfg["num_layers"]
    other = cfg["vocabulary_size"] * d + layers * 2 * d + d  # embedding, two norms per block, final norm
    return layers * sum(kernels), other, max(kernels)


def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def reset_peak():
    """Reset VmHWM to the current RSS (Linux: `5 > /proc/self/clear_refs`)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def trim():
    """gc, then glibc's malloc_trim (returns freed heap pages); False elsewhere."""
    gc.collect()
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0) or True)
    except (OSError, AttributeError):
        return False


def run(backend, small, steps, warmup, log):
    import keras
    import keras_hub
    import numpy as np

    import keras_lowrank

    cfg = SMALL if small else MEASURED
    out = {"backend": backend, "keras": keras.__version__, "config": cfg}
    out["rss_imports"] = status("VmRSS")
    t0 = time.perf_counter()
    keras.utils.set_random_seed(0)
    bb = keras_hub.models.GemmaBackbone(**cfg, dtype="bfloat16")
    if backend == "jax":  # random inits run asynchronously: let them finish
        import jax

        jax.block_until_ready([v.value for v in bb.weights])
    out["build_s"] = time.perf_counter() - t0
    gc.collect()
    out["params"] = int(bb.count_params())
    adapted, other, largest = counts(cfg)
    if adapted + other != out["params"]:
        raise AssertionError(f"parameter formula {adapted + other:,} != model {out['params']:,}")
    out.update(adapted_params=adapted, other_params=other, largest_kernel_params=largest)
    out["peak_build"] = status("VmHWM")
    out["rss_build"] = status("VmRSS")
    log(f"bfloat16 model: {out['params']:,} params, RSS {out['rss_build']:.0f} MiB, "
        f"peak {out['peak_build']:.0f} MiB ({out['build_s']:.1f} s)")

    out["peak_reset"] = reset_peak()
    t0 = time.perf_counter()
    summary = keras_lowrank.enable_adapter(bb, method="lora", rank=8, base="nf4")
    out["convert_s"] = time.perf_counter() - t0
    out["peak_convert"] = status("VmHWM")
    gc.collect()
    out["rss_convert"] = status("VmRSS")
    out["trimmed"] = trim()
    out["rss_trimmed"] = status("VmRSS")
    nf4_bytes = 0
    for _, a in keras_lowrank.adapters(bb):
        for v in a.layer.storage_variables():
            nf4_bytes += math.prod(v.shape) * np.dtype(str(v.dtype)).itemsize
    out["nf4_bytes"] = nf4_bytes
    out["lora_params"] = int(summary.adapter_params)
    out["adapted_layers"] = len(summary.rows)
    log(f"NF4: peak {out['peak_convert']:.0f} MiB, RSS {out['rss_convert']:.0f} MiB "
        f"({out['rss_trimmed']:.0f} after malloc_trim), {out['convert_s']:.1f} s")
    return out


def render(result):
    meta = result["meta"]
    rows = result["backends"]
    first = next((r for r in rows.values() if "error" not in r), {})
    lines = [
        "# NF4 base from a bfloat16 model: memory",
        "",
        f"Measured {meta['date']} on {meta['machine']} with `{meta['command']}`.",
        "",
        f"Model: a KerasHub `GemmaBackbone` in bfloat16 built from the config `{first.get('config')}` "
        f"({first.get('params', 0):,} parameters, {first.get('adapted_params', 0):,} of them in "
        "the adapted kernels), random weights; `enable_adapter(backbone, method=\"lora\", rank=8, "
        "base=\"nf4\")` on every Dense/EinsumDense. MiB of the process (`VmRSS` / `VmHWM`).",
        "",
        "| backend | RSS after imports | bf16 model: RSS / peak while building | conversion peak | "
        "conversion peak - bf16 model RSS [<= largest kernel] | RSS after | after malloc_trim | "
        "NF4 bytes / bf16 kernel bytes "
        "[~ 4.127/16 = 0.258] | conversion s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for b, r in rows.items():
        if "error" in r:
            lines.append(f"| {b} | error: {r['error']} |||||||||")
            continue
        largest_mib = r["largest_kernel_params"] * 2 / MIB
        over = r["peak_convert"] - (r["rss_build"] if r.get("peak_reset") else r["peak_build"])
        ratio = r["nf4_bytes"] / (2.0 * r["adapted_params"])
        lines.append(
            f"| {b} | {r['rss_imports']:.0f} | {r['rss_build']:.0f} / {r['peak_build']:.0f} | "
            f"{r['peak_convert']:.0f} | {over:+.0f} [{largest_mib:.0f}] "
            f"{'PASS' if over <= largest_mib else 'MISS'} | {r['rss_convert']:.0f} | "
            f"{r['rss_trimmed']:.0f} | {ratio:.4f} "
            f"{'PASS' if abs(ratio - NF4_BITS / 16) < 2e-3 else 'MISS'} | {r['convert_s']:.1f} |"
        )
    lines += ["", "## What Gemma 2B and 7B would need (from the figures above)", ""]
    lines += [
        "Per parameter, from the measurements: the bfloat16 model's RSS over the imports "
        "per parameter (`(RSS after build - RSS after imports) / params`), the stored NF4 "
        "bytes per adapted kernel parameter, 2 bytes per other (bfloat16) parameter, and the "
        "conversion's overshoot above the bfloat16 model taken as it was measured (a "
        "per-layer working set, not a per-parameter cost). The peak while building (random "
        "initializers in float32) is not included: a model loaded from a checkpoint does not "
        "have it. Arithmetic, not a run:",
        "",
        "| backend | model | params | bf16 model (GiB) | conversion peak (GiB) | NF4 model at rest (GiB) |",
        "|---|---|---|---|---|---|",
    ]
    for b, r in rows.items():
        if "error" in r:
            continue
        per_param = (r["rss_build"] - r["rss_imports"]) * MIB / r["params"]
        nf4_per = r["nf4_bytes"] / r["adapted_params"]
        over = max(0.0, r["peak_convert"] - r["rss_build"]) * MIB
        for name, cfg in GEMMA.items():
            adapted, other, _ = counts(cfg)
            base = r["rss_imports"] * MIB
            bf16 = base + per_param * (adapted + other)
            peak = bf16 + over
            rest = base + nf4_per * adapted + 2 * other
            lines.append(
                f"| {b} | {name} | {(adapted + other) / 1e9:.2f}B | {bf16 / 2**30:.2f} | "
                f"{peak / 2**30:.2f} | {rest / 2**30:.2f} |"
            )
    lines.append("")
    return "\n".join(lines)


def parse_args(argv=None, prog=None):
    return per_backend_args("quantized_scale", __doc__, argv, prog)


def main(argv=None, prog=None):
    return per_backend_main("quantized_scale", __doc__, run, render, argv, prog)


if __name__ == "__main__":
    sys.exit(main())
