#!/usr/bin/env python
"""Quantized frozen bases: storage bits, dequantization error, LoRA step time and memory.

One process per Keras backend (`--backend jax|tensorflow|torch`): the script
sets `KERAS_BACKEND` before Keras is imported. `--all` runs itself once per
backend in a subprocess and prints one combined report (`--markdown PATH`
also writes it as markdown). Each backend run has three parts:

1. storage: a 1024x1024 Dense kernel (Gaussian, std 0.02) stored as NF4
   (double quantization), NF4 (no double quantization), Keras int8, Keras
   int4 (default: grouped, block_size 128) and Keras int4 per-channel
   (`Int4QuantizationConfig(block_size=-1)`); float32 and bfloat16 as
   references. Bits per base parameter are counted from the arrays stored by
   `model.save_weights(...weights.h5)` (every array of the layer except the
   bias, over the kernel's parameter count).
2. error: max / mean absolute error and relative Frobenius error of the
   dequantized kernel vs the float32 kernel, for each storage. NF4:
   `NF4Linear.dequantized_kernel()`; Keras int8/int4: the quantized layer
   called on the identity matrix (each identity row quantizes exactly, so the
   output rows are the dequantized kernel rows), cross-checked against a
   manual dequantization of the stored integers.
3. train step: LoRA r=8 (`model.train_on_batch`) on a KerasHub
   GemmaCausalLM over a float32, a bfloat16 and an NF4 base (NF4 on the
   bfloat16 model: it computes in bfloat16). Step times: the
   three models in one process, 3 warm-up steps each, then timed steps
   interleaved round-robin; medians. Memory: each variant again in its own
   subprocess, which reports its RSS after imports, after building /
   adapting / compiling the model, and its peak RSS
   (`getrusage(RUSAGE_SELF).ru_maxrss`) at the end of its training steps.

Run it as `python benchmarks/run.py quantized [options]` (or directly,
`python benchmarks/quantized.py [options]`). See benchmarks/README.md.
"""

import argparse
import importlib
import json
import os
import resource
import sys
import tempfile
import time

from _common import BACKENDS
from _common import LR
from _common import RANK
from _common import SEED
from _common import SHAPES
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
from _common import summarize_times
from _common import time_interleaved
from _common import utc_now
from _common import verdict
from _common import versions_section
from _common import write_json
from _common import write_markdown

SUITE = "quantized"
PROG = "python benchmarks/quantized.py"

VARIANTS = ("f32", "bf16", "nf4")
VARIANT_LABEL = {"f32": "float32 base", "bf16": "bfloat16 base", "nf4": "NF4 base"}
KERNEL_N = 1024
KERNEL_STD = 0.02
NF4_VS_BF16_LIMIT = 1.25


# storage key -> (label, target bits or None)
STORAGES = {
    "float32": ("float32 (reference)", None),
    "bfloat16": ("bfloat16 (reference)", None),
    "nf4_dq": ("NF4, double quant", 4.127),
    "nf4": ("NF4, no double quant", 4.5),
    "int8": ("Keras int8 (per-channel)", None),
    "int4": ("Keras int4 (default: grouped, block 128)", None),
    "int4_pc": ("Keras int4 per-channel (block_size=-1)", None),
}
BITS_TOLERANCE = 5e-4
# (numerator, denominator) variants of the step-time ratios reported
TIMING_PAIRS = [("nf4", "bf16"), ("nf4", "f32"), ("bf16", "f32")]


# ----------------------------------------------------------------------
# Environment
def load1():
    return os.getloadavg()[0]


def rss_now_mib():
    """Current resident set size (VmRSS) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def hwm_mib():
    """VmHWM: the peak RSS of this process's own address space, in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def rss_peak_mib():
    """Peak RSS of this process so far (ru_maxrss is in KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def dtype_bytes(dtype):
    import numpy as np

    name = str(getattr(dtype, "name", dtype))
    if name == "bfloat16":
        return 2
    return np.dtype(name).itemsize


# ----------------------------------------------------------------------
# Part 1 + 2: storage bits and dequantization error
def stored_arrays(path):
    """{group path: {name: array}} of every h5 group holding datasets."""
    import h5py
    import numpy as np

    groups = {}
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                parent, _, key = name.rpartition("/")
                groups.setdefault(parent, {})[key] = np.asarray(obj)
        f.visititems(visit)
    return groups


def keras_stored_names(layer):
    """Names of the arrays `Dense.save_own_variables` writes, in its index order.

    Replays Keras's own rule (the spec of the layer's mode, minus the bias if
    there is none, minus `kernel_zero`/`g_idx` where the layer has none) so
    the bias can be told apart from the other `vars/<i>` entries.
    """
    mode = layer.quantization_mode
    names = []
    for name in layer.variable_serialization_spec[mode]:
        if name == "bias" and layer.bias is None:
            continue
        if name in ("kernel_zero", "g_idx") and getattr(layer, name, None) is None:
            continue
        names.append(name)
    return names


def run_storage(backend, log):
    import numpy as np

    import keras
    from keras import ops

    import keras_lowrank

    info = {"loadavg_start": load1(), "kernel": [KERNEL_N, KERNEL_N], "std": KERNEL_STD}
    rng = np.random.default_rng(SEED)
    kernel = rng.normal(0.0, KERNEL_STD, (KERNEL_N, KERNEL_N)).astype("float32")
    bias = np.zeros((KERNEL_N,), "float32")
    n_params = kernel.size
    eye = np.eye(KERNEL_N, dtype="float32")
    rows = {}
    tmp = tempfile.mkdtemp(prefix="kl_quant_")

    def make_model(dtype="float32"):
        inp = keras.Input((KERNEL_N,), dtype=dtype)
        dense = keras.layers.Dense(KERNEL_N, name="proj", dtype=dtype)
        model = keras.Model(inp, dense(inp))
        dense.kernel.assign(kernel)
        dense.bias.assign(bias)
        return model, dense

    def saved(model, key):
        path = os.path.join(tmp, f"{key}.weights.h5")
        model.save_weights(path)
        groups = {g: a for g, a in stored_arrays(path).items() if a}
        size = os.path.getsize(path)
        os.unlink(path)
        return groups, size

    def errors(deq):
        d = np.asarray(deq, dtype=np.float64) - kernel.astype(np.float64)
        return {
            "max_abs": float(np.max(np.abs(d))),
            "mean_abs": float(np.mean(np.abs(d))),
            "rel_frobenius": float(np.linalg.norm(d) / np.linalg.norm(kernel.astype(np.float64))),
        }

    def row(key, arrays, deq, extra=None):
        bits = sum(a.size * a.dtype.itemsize * 8 for a in arrays.values()) / n_params
        r = {
            "arrays": {k: [list(a.shape), str(a.dtype) if a.dtype.kind != "V"
                           else f"opaque {a.dtype.itemsize}-byte (bfloat16)"]
                       for k, a in arrays.items()},
            "bits_saved": bits,
            **errors(deq),
        }
        r.update(extra or {})
        rows[key] = r
        log(f"  {key:9s} {bits:7.4f} bits  max {r['max_abs']:.3e}  mean {r['mean_abs']:.3e}  "
            f"relF {r['rel_frobenius']:.3e}")

    # float32 / bfloat16 references
    for key, dtype in (("float32", "float32"), ("bfloat16", "bfloat16")):
        model, dense = make_model(dtype)
        groups, _ = saved(model, key)
        (group, arrays), = groups.items()
        names = keras_stored_names(dense)
        arrays = {names[int(k)]: a for k, a in arrays.items()}
        arrays.pop("bias")
        deq = ops.convert_to_numpy(ops.cast(dense.kernel, "float32"))
        row(key, arrays, deq, {"group": group})

    # NF4 through enable_adapter (the way a model gets it)
    for key, dq in (("nf4_dq", True), ("nf4", False)):
        model, dense = make_model()
        keras_lowrank.enable_adapter(model, method="lora", rank=RANK, targets=["proj"],
                                     base="nf4", double_quant=dq)
        (_, adapter), = keras_lowrank.adapters(model)
        q = adapter.layer
        groups, _ = saved(model, key)
        base_groups = {g: a for g, a in groups.items() if "codes" in a}
        (group, arrays), = base_groups.items()
        arrays = {k: a for k, a in arrays.items() if k != "bias"}
        deq = ops.convert_to_numpy(q.dequantized_kernel())
        row(key, arrays, deq, {"group": group, "bits_per_parameter()": float(q.bits_per_parameter())})

    # Keras's own int8 / int4
    configs = {"int8": ("int8", None), "int4": ("int4", None)}
    pc_config = None
    try:
        pc_config = keras.quantizers.Int4QuantizationConfig(block_size=-1)
        configs["int4_pc"] = ("int4", pc_config)
    except Exception as e:  # noqa: BLE001
        info["int4_pc_skipped"] = f"Int4QuantizationConfig(block_size=-1) failed: {type(e).__name__}: {e}"
    for key, (mode, config) in configs.items():
        model, dense = make_model()
        try:
            if config is None:
                dense.quantize(mode)
            else:
                dense.quantize(mode, config=config)
        except Exception as e:  # noqa: BLE001
            info[f"{key}_skipped"] = f"layer.quantize({mode!r}, config=...) failed: {type(e).__name__}: {e}"
            log(f"  {key}: skipped ({info[f'{key}_skipped']})")
            continue
        groups, _ = saved(model, key)
        (group, arrays), = groups.items()
        names = keras_stored_names(dense)
        if len(names) != len(arrays):
            raise RuntimeError(f"{key}: stored {sorted(arrays)} vs expected names {names}")
        arrays = {names[int(k)]: a for k, a in arrays.items()}
        arrays.pop("bias")
        # dequantized kernel: the quantized layer on the identity, minus the (zero) bias
        deq = ops.convert_to_numpy(dense(eye)).astype("float32") - bias
        manual = manual_dequant(dense, mode, arrays)
        extra = {"group": group,
                 "block_size": getattr(dense, "_int4_block_size", None) if mode == "int4" else None,
                 "identity_vs_manual_max_abs": float(np.max(np.abs(manual - deq)))}
        row(key, arrays, deq, extra)
    info["rows"] = rows
    info["loadavg_end"] = load1()
    return info


def manual_dequant(dense, mode, arrays):
    """Dequantize the stored Keras int8 / int4 arrays by hand (cross-check)."""
    import numpy as np

    from keras import ops
    from keras import quantizers

    n_out = dense.units
    if mode == "int8":
        return arrays["kernel"].astype("float32") / arrays["kernel_scale"].astype("float32")
    q = ops.convert_to_numpy(quantizers.unpack_int4(arrays["kernel"], n_out, axis=-1)).astype("float32")
    scale = arrays["kernel_scale"].astype("float32")
    if "kernel_zero" not in arrays:  # per-channel, symmetric
        return q / scale
    from keras.src.quantizers.quantizers import dequantize_with_sz_map

    return np.asarray(ops.convert_to_numpy(dequantize_with_sz_map(
        q, scale, arrays["kernel_zero"], arrays["g_idx"], group_axis=0)), "float32")


# ----------------------------------------------------------------------
# Part 3: Gemma LoRA train step over three bases
def gemma_setup(shape):
    import keras_lowrank

    x, y = gemma_batch(shape)

    def build(variant):
        # NF4 sits on the bfloat16 model: it dequantizes into bfloat16 and
        # multiplies in bfloat16, like the bfloat16 base it is compared to
        dtype = "float32" if variant == "f32" else "bfloat16"
        lm = build_gemma(shape, dtype=dtype, lm_dtype=dtype)
        summary = keras_lowrank.enable_adapter(
            lm, method="lora", rank=RANK, base="nf4" if variant == "nf4" else None
        )
        compile_lm(lm)
        return lm, describe(lm, summary)

    return x, y, build


def describe(lm, summary):
    import numpy as np

    import keras_lowrank

    def nbytes(v):
        return int(np.prod(v.shape)) * dtype_bytes(v.dtype)

    ads = keras_lowrank.adapters(lm)
    base_bytes = 0
    base_params = 0
    base_dtypes = set()
    for _, a in ads:
        base = a.layer
        for v in base.non_trainable_weights:
            base_bytes += nbytes(v)
            base_dtypes.add(str(v.dtype))
        kshape = getattr(base, "kernel_shape", None) or tuple(base.kernel.shape)
        base_params += int(np.prod(kshape))
    trainable = lm.trainable_variables
    return {
        "adapted_layers": len(summary.adapted_paths),
        "adapters": len(ads),
        "base_class": sorted({type(a.layer).__name__ for _, a in ads}),
        "base_bytes": base_bytes,
        "base_params": base_params,
        "base_bits_per_param": 8.0 * base_bytes / max(base_params, 1),
        "base_dtypes": sorted(base_dtypes),
        "trainable_params": count_params(trainable),
        "trainable_variables": len(trainable),
        "trainable_dtypes": sorted({str(v.dtype) for v in trainable}),
        "compute_dtype": lm.compute_dtype,
        "model_weight_bytes": int(sum(nbytes(v) for v in lm.weights)),
        "jit_compile": bool(lm.jit_compile),
        "run_eagerly": bool(lm.run_eagerly),
    }


def run_timing(backend, shape, warmup, steps, log):
    info = {"loadavg_start": load1()}
    x, y, build = gemma_setup(shape)
    models, variants = {}, {}
    for v in VARIANTS:
        t0 = time.perf_counter()
        models[v], variants[v] = build(v)
        variants[v]["build_s"] = time.perf_counter() - t0
        log(f"{v}: {variants[v]}")
    fns = {v: (lambda m=models[v]: m.train_on_batch(x, y)) for v in VARIANTS}
    log(f"timing train steps: warm-up {warmup}, timed {steps} (interleaved)")
    times = time_interleaved(fns, warmup, steps, log, record_warmup=True)
    log_times(log, times, 5)
    losses = {v: float(m.train_on_batch(x, y)) for v, m in models.items()}
    info.update(
        variants=variants,
        times=times,
        final_loss=losses,
        ratios=ratios(times, TIMING_PAIRS),
        loadavg_end=load1(),
    )
    return info


def run_memory_child(backend, shape, variant, warmup, steps):
    """One variant alone in this process: RSS after build, peak RSS at the end."""
    info = {"loadavg_start": load1()}
    # import what a model needs (keras imports the backend) before measuring
    for module in ("keras", "keras_hub", "keras_lowrank"):
        importlib.import_module(module)
    info["rss_after_imports_mib"] = rss_now_mib()
    info["peak_after_imports_mib"] = rss_peak_mib()
    info["hwm_after_imports_mib"] = hwm_mib()
    x, y, build = gemma_setup(shape)
    lm, info["variant"] = build(variant)
    info["rss_after_build_mib"] = rss_now_mib()
    info["peak_after_build_mib"] = rss_peak_mib()
    info["hwm_after_build_mib"] = hwm_mib()
    t = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        lm.train_on_batch(x, y)
        if i >= warmup:
            t.append(time.perf_counter() - t0)
    info["times"] = summarize_times(t) if t else None
    info["rss_end_mib"] = rss_now_mib()
    info["peak_end_mib"] = rss_peak_mib()
    info["hwm_end_mib"] = hwm_mib()
    info["loadavg_end"] = load1()
    return info


def run_backend(backend, shape, shape_name, warmup, steps, mem_steps):
    log = make_log(backend)
    info = {"backend": backend, "loadavg_start": load1(),
            "date": utc_now(),
            "steps": steps, "warmup": warmup, "mem_steps": mem_steps, "shape_name": shape_name}

    # The memory subprocesses are started before this process imports Keras:
    # Linux counts the RSS high-water mark of the process that exec()s into
    # `ru_maxrss` (Python spawns with vfork), so a child started from a
    # process that already holds a backend (~0.8-1 GiB) would inherit that
    # peak. `VmHWM` (the child's own address space) is recorded alongside.
    log("part 3a: peak memory, one subprocess per variant")
    info["rss_when_spawning_mib"] = rss_now_mib()
    info["memory"] = {}
    for v in VARIANTS:
        argv = ["--backend", backend, "--memory-variant", v, "--warmup", str(warmup),
                "--steps", str(mem_steps)]
        if shape_name == "small":
            argv.append("--small")
        info["memory"][v] = run_child(SUITE, argv, {"KERAS_BACKEND": backend})
        m = info["memory"][v]
        if "error" not in m:
            log(f"  {v}: rss after build {m['rss_after_build_mib']:.0f} MiB, "
                f"peak end {m['peak_end_mib']:.0f} MiB")

    os.environ["KERAS_BACKEND"] = backend
    import keras

    assert keras.backend.backend() == backend, keras.backend.backend()
    log("part 1+2: storage bits and dequantization error")
    info["storage"] = run_storage(backend, log)

    log("part 3b: step time, the three variants interleaved in this process")
    try:
        info["timing"] = run_timing(backend, shape, warmup, steps, log)
    except Exception as e:  # noqa: BLE001 - reported as a MISS, never hidden
        import traceback

        traceback.print_exc()
        info["timing"] = {"error": f"{type(e).__name__}: {e}"}

    info["loadavg_end"] = load1()
    info.update(backend_facts(backend, extra_modules=("h5py",)))
    return info


# ----------------------------------------------------------------------
# Report
def compiled(backend, variants):
    """compiled_label of the timed models of a backend run."""
    return compiled_label(
        backend,
        [v["jit_compile"] for v in variants.values()],
        any(v["run_eagerly"] for v in variants.values()),
    )


def fmt_bytes(n):
    return f"{n / 2**20:.2f} MiB"


def render(results, meta):
    lines = []
    shape = meta["shape"]
    env = meta["environment"]
    ok = [b for b in BACKENDS if b in results and "error" not in results[b]]
    lines.append("## Setup\n")
    lines.append(machine_line(env))
    lines.append(
        f"- storage / error: one {KERNEL_N}x{KERNEL_N} `Dense` kernel drawn from "
        f"N(0, {KERNEL_STD}^2) (seed {SEED}), bias zero; bits = sum of "
        f"`size * itemsize * 8` of the arrays `model.save_weights(*.weights.h5)` "
        f"stores for the layer, bias excluded, / {KERNEL_N * KERNEL_N:,}"
    )
    lines.append(
        f"- train step: KerasHub `GemmaBackbone` vocabulary {shape['vocabulary_size']}, "
        f"hidden {shape['hidden_dim']}, {shape['num_layers']} layers, "
        f"{shape['num_query_heads']} query / {shape['num_key_value_heads']} kv heads, "
        f"head_dim {shape['head_dim']}, intermediate_dim {shape['intermediate_dim']}, in "
        f"`GemmaCausalLM(preprocessor=None)`; batch {shape['batch']} x seq "
        f"{shape['seq_len']} random tokens; LoRA r={RANK} on every Dense/EinsumDense "
        f"(`enable_adapter(lm, method=\"lora\", rank={RANK}[, base=\"nf4\"])`); "
        f"Adam({LR}); `SparseCategoricalCrossentropy(from_logits=True)`; no metrics; "
        f"`jit_compile=\"auto\"`"
    )
    lines.append(
        f"- step time: the three models in one process, {meta['warmup']} warm-up "
        f"`train_on_batch` calls each, then {meta['steps']} timed calls each, "
        f"interleaved round-robin (order rotating); median [p25-p75] in ms"
    )
    lines.append(
        f"- memory: each variant alone in a fresh subprocess: RSS (`VmRSS`) after "
        f"importing keras/keras_hub/keras_lowrank, RSS after build + enable_adapter "
        f"+ compile, and `getrusage(RUSAGE_SELF).ru_maxrss` after build and at the end "
        f"of {meta['warmup']} + {meta['mem_steps']} train steps"
    )
    lines.append(
        "- bfloat16 base: backbone and task model built with `dtype=\"bfloat16\"`, "
        "so the LoRA variables (and Adam's slots) are bfloat16 too and the loss is "
        "computed from bfloat16 logits; the NF4 variant is the bfloat16 model with "
        "`base=\"nf4\"`: each forward dequantizes its kernels into bfloat16 (a float32 product "
        "rounded once, as bitsandbytes does) and multiplies in bfloat16; the float32 variant "
        "computes in float32"
    )
    lines.append("")

    # --- Part 1: bits
    if ok:
        lines.append("## 1. Bits per base parameter, counted from the saved variables\n")
        lines.append("| storage | stored arrays (bias excluded) | " + " | ".join(ok) + " | target |")
        lines.append("|---|---|" + "---|" * len(ok) + "---|")
        first = results[ok[0]]["storage"]
        for key, (label, target) in STORAGES.items():
            if key not in first["rows"]:
                continue
            r0 = first["rows"][key]
            arrays = ", ".join(
                f"`{n}` {dt}{tuple(s) if s else '()'}" for n, (s, dt) in r0["arrays"].items()
            )
            cells = []
            for b in ok:
                r = results[b]["storage"]["rows"].get(key)
                cells.append("n/a" if r is None else f"{r['bits_saved']:.4f}")
            tcell = "-"
            if target is not None:
                worst = max(abs(results[b]["storage"]["rows"][key]["bits_saved"] - target) for b in ok)
                tcell = f"{target} {'PASS' if worst < BITS_TOLERANCE else 'MISS'}"
            lines.append(f"| {label} | {arrays} | " + " | ".join(cells) + f" | {tcell} |")
        lines.append("")
        skipped = {k: v for b in ok for k, v in results[b]["storage"].items() if k.endswith("_skipped")}
        for k, v in skipped.items():
            lines.append(f"- skipped {k[:-len('_skipped')]}: {v}")
        for key in ("nf4_dq", "nf4"):
            if key in first["rows"]:
                lines.append(
                    f"- {STORAGES[key][0]}: `NF4Linear.bits_per_parameter()` = "
                    f"{first['rows'][key]['bits_per_parameter()']:.4f} ({ok[0]})"
                )
        lines.append(
            "- Keras int4 grouped stores, besides the packed codes, a float32 scale and "
            "an int8 zero point per (group of 128 inputs, output) and a float32 `g_idx` "
            "per input row; int8 and int4 per-channel store one float32 scale per output"
        )
        lines.append("")

        # --- Part 2: error
        lines.append(
            f"## 2. Dequantization error vs the float32 kernel (N(0, {KERNEL_STD}^2), "
            f"{KERNEL_N}x{KERNEL_N})\n"
        )
        lines.append("| storage | backends | max abs | mean abs | relative Frobenius | dequantization |")
        lines.append("|---|---|---|---|---|---|")
        for key, (label, _) in STORAGES.items():
            # one row per distinct result; backends that agree share a row
            groups = {}
            for b in ok:
                r = results[b]["storage"]["rows"].get(key)
                if r is None:
                    continue
                cells = (f"{r['max_abs']:.3e}", f"{r['mean_abs']:.3e}", f"{r['rel_frobenius']:.4f}")
                groups.setdefault(cells, []).append((b, r))
            for cells, members in groups.items():
                if key.startswith("nf4"):
                    how = "`dequantized_kernel()`"
                elif key in ("float32", "bfloat16"):
                    how = "cast to float32"
                else:
                    worst = max(r["identity_vs_manual_max_abs"] for _, r in members)
                    how = f"layer(eye) - bias; vs manual dequantization: max diff {worst:.1e}"
                lines.append(
                    f"| {label} | {', '.join(b for b, _ in members)} | " + " | ".join(cells)
                    + f" | {how} |"
                )
        lines.append("")

    # --- Part 3: step time
    timed = [b for b in ok if "error" not in results[b]["timing"]]
    if timed:
        lines.append("## 3. LoRA r=8 train step over three bases\n")
        lines.append("### Step time (ms, median [p25-p75], interleaved in one process)\n")
        lines.append(
            "| backend | compiled | float32 base | bfloat16 base | NF4 base | "
            f"NF4 / bf16 [<= {NF4_VS_BF16_LIMIT}] | NF4 / f32 | bf16 / f32 |"
        )
        lines.append("|---|---|---|---|---|---|---|---|")
        for b in timed:
            t = results[b]["timing"]
            cells = [
                f"{t['times'][v]['median_ms']:.1f} [{t['times'][v]['p25_ms']:.1f}-"
                f"{t['times'][v]['p75_ms']:.1f}]"
                for v in VARIANTS
            ]
            r = t["ratios"]
            lines.append(
                f"| {b} | {compiled(b, t['variants'])} | " + " | ".join(cells) + " | "
                f"{r['nf4/bf16']:.3f} {verdict(r['nf4/bf16'], NF4_VS_BF16_LIMIT)} | "
                f"{r['nf4/f32']:.3f} | {r['bf16/f32']:.3f} |"
            )
        lines.append("")
        lines.append(
            "Same ratios from the fastest (min) step of each variant (information "
            "only; PASS/MISS uses medians):\n"
        )
        lines.append("| backend | NF4 / bf16 | NF4 / f32 | bf16 / f32 |")
        lines.append("|---|---|---|---|")
        for b in timed:
            r = ratios(results[b]["timing"]["times"], TIMING_PAIRS, "min_ms")
            lines.append(f"| {b} | {r['nf4/bf16']:.3f} | {r['nf4/f32']:.3f} | {r['bf16/f32']:.3f} |")
        lines.append("")
        lines.append("Warm-up (first calls include tracing / compilation), seconds for "
                     f"{meta['warmup']} calls:\n")
        lines.append("| backend | " + " | ".join(VARIANT_LABEL[v] for v in VARIANTS) + " |")
        lines.append("|---" * (len(VARIANTS) + 1) + "|")
        for b in timed:
            t = results[b]["timing"]["times"]
            lines.append(f"| {b} | " + " | ".join(f"{t[v]['warmup_s']:.1f}" for v in VARIANTS) + " |")
        lines.append("")

    # --- Part 3: memory
    if ok:
        lines.append("### Memory (MiB, each variant alone in its own subprocess)\n")
        lines.append(
            "| backend | base | RSS after imports | RSS after build | build delta | "
            "ru_maxrss after build | ru_maxrss at end | VmHWM at end | "
            "peak at end - RSS after build | step ms (median, not interleaved) |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        for b in ok:
            for v in VARIANTS:
                m = results[b]["memory"].get(v, {"error": "not run"})
                if "error" in m:
                    lines.append(f"| {b} | {VARIANT_LABEL[v]} | FAILED: {m['error']} |" + " |" * 7)
                    continue
                st = m["times"]["median_ms"] if m.get("times") else float("nan")
                lines.append(
                    f"| {b} | {VARIANT_LABEL[v]} | {m['rss_after_imports_mib']:.0f} | "
                    f"{m['rss_after_build_mib']:.0f} | "
                    f"{m['rss_after_build_mib'] - m['rss_after_imports_mib']:+.0f} | "
                    f"{m['peak_after_build_mib']:.0f} | {m['peak_end_mib']:.0f} | "
                    f"{m['hwm_end_mib']:.0f} | "
                    f"{m['peak_end_mib'] - m['rss_after_build_mib']:+.0f} | {st:.1f} |"
                )
        lines.append("")
        lines.append(
            "RSS after imports includes the backend and TensorFlow (imported by "
            "keras_hub); \"build delta\" is the model (weights, adapters, quantization "
            "transients still held by the allocator, optimizer not yet built); "
            "\"peak at end - RSS after build\" is what the train steps (compilation, "
            "activations, gradients, Adam slots) added on top. `ru_maxrss` and `VmHWM` "
            "agree when the child did not inherit a parent's high-water mark (the "
            "children are spawned before the parent imports Keras).\n"
        )

        # --- stored base bytes
        lines.append("### Stored base bytes per variant\n")
        lines.append(
            "Sum over the adapted layers of the bytes of their bases' non-trainable "
            f"weights (`adapter.layer.non_trainable_weights`) [{ok[0]}; identical on "
            "every backend unless noted]:\n"
        )
        lines.append(
            "| base | adapted layers | base class | base bytes | bits / base param | "
            "base dtypes | trainable params | trainable dtypes | all model weights |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|")
        src = results[ok[0]]
        vinfo = (src["timing"].get("variants") if "error" not in src["timing"] else None) or {
            v: src["memory"][v]["variant"] for v in VARIANTS if "error" not in src["memory"].get(v, {"error": 1})
        }
        for v in VARIANTS:
            d = vinfo.get(v)
            if d is None:
                continue
            lines.append(
                f"| {VARIANT_LABEL[v]} | {d['adapted_layers']} | {', '.join(d['base_class'])} | "
                f"{d['base_bytes']:,} ({fmt_bytes(d['base_bytes'])}) | "
                f"{d['base_bits_per_param']:.3f} | {', '.join(d['base_dtypes'])} | "
                f"{d['trainable_params']:,} | {', '.join(d['trainable_dtypes'])} | "
                f"{fmt_bytes(d['model_weight_bytes'])} |"
            )
        diffs = []
        for b in ok[1:]:
            t = results[b]["timing"]
            if "error" in t:
                continue
            for v in VARIANTS:
                if t["variants"][v]["base_bytes"] != vinfo[v]["base_bytes"]:
                    diffs.append(f"{b}/{v}: {t['variants'][v]['base_bytes']:,}")
        if diffs:
            lines.append("")
            lines.append("Differs on: " + "; ".join(diffs))
        lines.append("")

    # --- targets
    if results:
        lines.append("## Targets\n")
        for b in BACKENDS:
            if b not in results:
                continue
            r = results[b]
            if "error" in r:
                lines.append(failed_target(b, r))
                continue
            for key in ("nf4_dq", "nf4"):
                label, target = STORAGES[key]
                bits = r["storage"]["rows"][key]["bits_saved"]
                lines.append(
                    f"- [{b}] {label}: {bits:.4f} bits/param (target {target}) "
                    f"{'PASS' if abs(bits - target) < BITS_TOLERANCE else 'MISS'}"
                )
            t = r["timing"]
            if "error" in t:
                lines.append(f"- [{b}] NF4 step <= {NF4_VS_BF16_LIMIT}x bf16 step: MISS (timing failed)")
            else:
                v = t["ratios"]["nf4/bf16"]
                lines.append(
                    f"- [{b}] NF4-base step <= {NF4_VS_BF16_LIMIT}x bfloat16-base step: "
                    f"{v:.3f} {verdict(v, NF4_VS_BF16_LIMIT)}"
                )
        lines.append("")

    # --- load
    loads = []
    for b in BACKENDS:
        r = results.get(b)
        if not r or "error" in r:
            continue
        parts = [("storage", r["storage"])]
        parts += [(f"memory {v}", r["memory"][v]) for v in VARIANTS if v in r["memory"]]
        parts.append(("timing", r["timing"]))
        cells = [c for c in (load_span(name, p) for name, p in parts) if c]
        loads.append(f"- {b}: " + "; ".join(cells))
    if loads:
        lines.append(
            "1-minute load average at start -> end of each part (the machine is shared; "
            f"with {env['cpu_count']} cores, anything well above the benchmark's own ~1-2 "
            "means other processes competed for the cores):\n"
        )
        lines.extend(loads)
        lines.append("")
    extra = [f"torch threads {results[b]['torch_num_threads']}"
             for b in ok if "torch_num_threads" in results[b]]
    lines.extend(versions_section(results, extra))
    return "\n".join(lines)


# ----------------------------------------------------------------------
# Driver
def build_parser(prog=PROG):
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    add_run_args(
        p,
        backend_help="run every part on this backend",
        all_help="every backend, each in a subprocess",
        small_help="tiny Gemma shapes for a functional check",
    )
    p.add_argument("--mem-steps", type=int, default=5,
                   help="steps after warm-up in each memory subprocess (default 5)")
    p.add_argument("--memory-variant", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--combine", nargs="+", metavar="JSON",
                   help="render one report from the --json-out files of earlier --backend "
                        "(or --all) runs, e.g. to replace a backend whose run was disturbed")
    add_output_args(p)
    return p


def parse_args(argv=None, prog=PROG):
    p = build_parser(prog)
    args = p.parse_args(argv)
    if sum([bool(args.backend), args.all, bool(args.combine)]) != 1:
        p.error("give exactly one of --backend, --all, --combine")
    if args.memory_variant and not args.backend:
        p.error("--memory-variant needs --backend")
    return args


def combine(paths, shape_name, meta, error):
    """Results and meta of an earlier run's --json-out files (--combine)."""
    results = {}
    sources = []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        if "results" in data:  # an --all file
            results.update(data["results"])
            meta.update({k: v for k, v in data["meta"].items() if k != "date"})
            sources.append(f"{path} ({data['meta']['date']}: {', '.join(data['results'])})")
        else:
            results[data["backend"]] = data
            shape_name = data.get("shape_name", shape_name)
            meta.update({k: data[k] for k in ("steps", "warmup", "mem_steps") if k in data})
            sources.append(f"{path} ({data.get('date', '?')}: {data['backend']})")
        if "meta" in data:
            shape_name = data["meta"]["shape_name"]
    if len({json.dumps(r.get("shape_name", shape_name)) for r in results.values()}) > 1:
        error("--combine: the files were measured with different shapes")
    meta["combined_from"] = sources
    meta["shape_name"] = shape_name
    meta["shape"] = SHAPES[shape_name]
    return {b: results[b] for b in BACKENDS if b in results}, shape_name


def main(argv=None, prog=PROG):
    args = parse_args(argv, prog)
    steps, shape_name, shape = resolve_run(args, note=not args.memory_variant)

    if args.memory_variant:
        os.environ["KERAS_BACKEND"] = args.backend
        out = run_memory_child(args.backend, shape, args.memory_variant, args.warmup, steps)
        print(f"[{args.backend}/{args.memory_variant}] " + json.dumps(
            {k: v for k, v in out.items() if k != "variant"}), flush=True)
        if args.json_out:
            with open(args.json_out, "w") as f:
                json.dump(out, f, indent=1)
        return 0

    meta = make_meta(shape_name, steps, args.warmup, mem_steps=args.mem_steps)
    if args.combine:
        results, shape_name = combine(args.combine, shape_name, meta, build_parser(prog).error)
    elif args.all:
        results = run_backends(SUITE, forward_args(args, steps, "--mem-steps", str(args.mem_steps)))
    else:
        results = {args.backend: run_backend(
            args.backend, shape, shape_name, args.warmup, steps, args.mem_steps
        )}

    if args.json_out:
        write_json(args.json_out, results, meta, whole=args.all)

    report = render(results, meta)
    print_report(report)
    if args.markdown:
        if args.combine:
            cmd = f"{prog} --combine " + " ".join(args.combine) + f" --markdown {args.markdown}"
        else:
            mode = "--all" if args.all else f"--backend {args.backend}"
            cmd = command_line(prog, mode, args, steps)
        extra_header = []
        if meta.get("combined_from"):
            extra_header += ["Combined from these runs (per-backend results, each measured "
                             "in its own process at the time given):", ""]
            extra_header += [f"- {src}" for src in meta["combined_from"]] + [""]
        write_markdown(
            args.markdown,
            "Quantized-base benchmark",
            meta,
            shape_name,
            cmd,
            report,
            verb="Report rendered" if meta.get("combined_from") else "Measured",
            extra_header=extra_header,
        )
    return exit_status(results)


if __name__ == "__main__":
    sys.exit(main())
