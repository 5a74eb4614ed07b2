"""Code shared by the benchmark suites (`step_time`, `quantized`) and their
driver `run.py`: constants and the Gemma model both suites train, machine
facts, the interleaved timing loop and its statistics, ratios and verdicts,
the command-line options every suite has, running a suite again in a child
process (one per backend), and writing the JSON / markdown outputs."""

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DRIVER = os.path.join(HERE, "run.py")

BACKENDS = ("jax", "tensorflow", "torch")
RANK = 8
SEED = 1234
LR = 1e-4

# The Gemma-shaped model both benchmarks train. Gemma v1 (KerasHub) splits
# `intermediate_dim` in two gates of intermediate_dim // 2 each; the PEFT
# model of step_time.py uses intermediate_size = that half.
SHAPES = {
    "full": dict(
        vocabulary_size=1000,
        hidden_dim=512,
        num_layers=4,
        num_query_heads=8,
        num_key_value_heads=8,
        head_dim=64,
        intermediate_dim=2048,
        seq_len=128,
        batch=8,
    ),
    "small": dict(
        vocabulary_size=1000,
        hidden_dim=64,
        num_layers=2,
        num_query_heads=4,
        num_key_value_heads=4,
        head_dim=16,
        intermediate_dim=256,
        seq_len=16,
        batch=4,
    ),
}


# ----------------------------------------------------------------------
# Machine facts
def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions(names):
    out = {}
    for name in names:
        try:
            mod = __import__(name)
            out[name] = getattr(mod, "__version__", "?")
        except Exception as e:  # informational only
            out[name] = f"n/a ({type(e).__name__})"
    return out


def environment():
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def utc_now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def backend_facts(backend, extra_modules=()):
    """`versions` (and `torch_num_threads` on torch) of a Keras backend run."""
    out = {
        "versions": versions(["keras", "keras_hub", "keras_lowrank", "numpy", *extra_modules, backend])
    }
    if backend == "jax":
        out["versions"].update(versions(["jaxlib"]))
    if backend == "torch":
        import torch

        out["torch_num_threads"] = torch.get_num_threads()
    return out


def make_log(tag):
    """print() prefixed with `[tag]`, flushed (the parent interleaves children)."""
    return lambda *a: print(f"[{tag}]", *a, flush=True)


# ----------------------------------------------------------------------
# Timing, statistics, ratios, verdicts
def summarize_times(seconds):
    ms = sorted(1000.0 * s for s in seconds)
    q = statistics.quantiles(ms, n=4) if len(ms) >= 2 else [ms[0]] * 3
    return {
        "median_ms": statistics.median(ms),
        "min_ms": ms[0],
        "p25_ms": q[0],
        "p75_ms": q[2],
        "n": len(ms),
    }


def time_interleaved(fns, warmup, steps, log=print, record_warmup=False):
    """Warm every callable up, then time them round-robin; medians in ms.

    `warmup` calls of each callable first (logged), then `steps` rounds of one
    call of each, the order rotating by one every round, so slow drifts of a
    shared machine hit every callable alike. Returns `summarize_times` per
    name, plus `warmup_s` (seconds of the warm-up calls) if `record_warmup`.
    """
    warm = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        for _ in range(warmup):
            fn()
        warm[name] = time.perf_counter() - t0
        log(f"  warm-up {name}: {warmup} calls in {warm[name]:.1f}s")
    names = list(fns)
    times = {n: [] for n in names}
    for i in range(steps):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    out = {n: summarize_times(t) for n, t in times.items()}
    if record_warmup:
        for n in names:
            out[n]["warmup_s"] = warm[n]
    return out


def log_times(log, times, width):
    for name, s in times.items():
        log(f"  {name:{width}s} {s['median_ms']:9.1f} ms  (min {s['min_ms']:.1f})")


def ratios(times, pairs, stat="median_ms"):
    """{"a/b": times[a][stat] / times[b][stat]} for each (a, b) in `pairs`."""
    return {f"{a}/{b}": times[a][stat] / times[b][stat] for a, b in pairs}


def verdict(value, limit):
    return "PASS" if value <= limit else "MISS"


# ----------------------------------------------------------------------
# The KerasHub Gemma both suites train (Keras imported lazily: the caller
# sets KERAS_BACKEND first)
def gemma_batch(shape):
    """Random (x, y) of batch x seq_len tokens, from SEED."""
    import numpy as np

    b, t, vocab = shape["batch"], shape["seq_len"], shape["vocabulary_size"]
    rng = np.random.default_rng(SEED)
    x = {
        "token_ids": rng.integers(0, vocab, (b, t)).astype("int32"),
        "padding_mask": np.ones((b, t), "int32"),
    }
    y = rng.integers(0, vocab, (b, t)).astype("int32")
    return x, y


def build_gemma(shape, dtype="float32", lm_dtype=None):
    """A fresh `GemmaCausalLM(preprocessor=None)` built from SEED.

    `dtype` goes to the backbone; `lm_dtype`, if given, to the task model.
    """
    import keras
    import keras_hub

    keras.utils.set_random_seed(SEED)
    bb = keras_hub.models.GemmaBackbone(
        vocabulary_size=shape["vocabulary_size"],
        num_layers=shape["num_layers"],
        num_query_heads=shape["num_query_heads"],
        num_key_value_heads=shape["num_key_value_heads"],
        hidden_dim=shape["hidden_dim"],
        intermediate_dim=shape["intermediate_dim"],
        head_dim=shape["head_dim"],
        dtype=dtype,
    )
    kwargs = {} if lm_dtype is None else {"dtype": lm_dtype}
    return keras_hub.models.GemmaCausalLM(backbone=bb, preprocessor=None, **kwargs)


def compile_lm(model):
    """Adam(LR), sparse CE from logits, no metrics, jit_compile="auto"."""
    import keras

    model.compile(
        optimizer=keras.optimizers.Adam(LR),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[],
        jit_compile="auto",
    )
    return model


def count_params(variables):
    import numpy as np

    return int(sum(np.prod(v.shape) for v in variables))


# What `jit_compile="auto"` became, per backend: (short label, long label).
_COMPILED = {
    "torch": ("eager torch", "eager torch (Keras: auto -> no jit on torch)"),
    "tensorflow": (
        "tf.function, no XLA",
        "tf.function graph, no XLA (Keras: auto -> no XLA on CPU-only TF)",
    ),
    "jax": ("jax.jit (XLA)", "jax.jit (XLA)"),
}


def compiled_label(backend, jit, eager, long=False, fallback=None):
    """How the models of a backend run were compiled, for the report.

    `jit`: the `jit_compile` flag of each model; `eager`: whether any model
    ran eagerly. `fallback` (default "jit_compile=[...], run_eagerly=...")
    for a combination the labels do not describe.
    """
    jit = list(jit)
    label = _COMPILED.get(backend, (None, None))[1 if long else 0]
    if backend in ("torch", "tensorflow") and not any(jit) and not eager:
        return label
    if backend == "jax" and all(jit):
        return label
    return fallback if fallback is not None else f"jit_compile={jit}, run_eagerly={eager}"


# ----------------------------------------------------------------------
# Command line
def add_run_args(p, backend_help, all_help, small_help):
    """The options every suite has for what to run (before its own ones)."""
    p.add_argument("--backend", choices=BACKENDS, help=backend_help)
    p.add_argument("--all", action="store_true", help=all_help)
    p.add_argument("--small", action="store_true", help=small_help)
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps per variant (default 15; 10 with --small)")
    p.add_argument("--warmup", type=int, default=3, help="warm-up steps per variant (default 3)")


def add_output_args(p):
    p.add_argument("--markdown", help="write the report as markdown to this path")
    p.add_argument("--json-out", help="write raw results as JSON to this path")


def resolve_run(args, note=True):
    """(steps, shape name, shape) of parsed args; sets TF_CPP_MIN_LOG_LEVEL."""
    steps = args.steps or (10 if args.small else 15)
    if note and (steps < 10 or args.warmup < 3):
        print("note: fewer than 10 timed / 3 warm-up steps", flush=True)
    shape_name = "small" if args.small else "full"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return steps, shape_name, SHAPES[shape_name]


def make_meta(shape_name, steps, warmup, **extra):
    return {
        "shape_name": shape_name,
        "shape": SHAPES[shape_name],
        "steps": steps,
        "warmup": warmup,
        **extra,
        "environment": environment(),
        "date": utc_now(),
    }


def forward_args(args, steps, *extra):
    """The options a parent passes on to its per-backend children."""
    out = ["--steps", str(steps), "--warmup", str(args.warmup), *extra]
    if args.small:
        out.append("--small")
    return out


# ----------------------------------------------------------------------
# Child processes
def run_script(script, argv_extra, env_extra):
    """Run `script` again in a child process; return its --json-out result."""
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    env = dict(os.environ)
    env.update(env_extra)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    cmd = [sys.executable, os.path.abspath(script), *argv_extra, "--json-out", path]
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env)
    wall = time.perf_counter() - t0
    try:
        if proc.returncode != 0:
            return {"error": f"exit status {proc.returncode}"}
        with open(path) as f:
            out = json.load(f)
        out["wall_s"] = wall
        return out
    finally:
        os.unlink(path)


def run_child(suite, argv_extra, env_extra):
    """`python benchmarks/run.py SUITE ARGV...` in a child process."""
    return run_script(DRIVER, [suite, *argv_extra], env_extra)


def run_backends(suite, extra):
    """The suite once per Keras backend, each in its own child process."""
    return {b: run_child(suite, ["--backend", b, *extra], {"KERAS_BACKEND": b}) for b in BACKENDS}


# ----------------------------------------------------------------------
# Outputs
def write_json(path, results, meta, whole):
    """The results of every part with `meta` if `whole`, else the one part."""
    part = next(iter(results.values()))
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": results} if whole else part, f, indent=1)


def command_line(prog, mode, args, steps):
    """The command that wrote a markdown report, for its header."""
    return (
        f"{prog} {mode}"
        + (" --small" if args.small else "")
        + (f" --steps {steps}" if args.steps else "")
        + f" --markdown {args.markdown}"
    )


def write_markdown(path, title, meta, shape_name, cmd, report, verb="Measured", extra_header=()):
    env = meta["environment"]
    header = [
        f"# {title}",
        "",
        f"{verb} {meta['date']} on a {env['cpu_count']}-core CPU VM "
        f"({env['cpu_model']}), shapes `{shape_name}`, with",
        f"`{cmd}`.",
        "",
        *extra_header,
    ]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(header) + "\n" + report)
    print(f"wrote {path}", flush=True)


def machine_line(env):
    return (
        f"- machine: {env['cpu_model']}, os.cpu_count()={env['cpu_count']}, "
        f"{env['platform']}, Python {env['python']}"
    )


def load_span(name, part):
    """"name start -> end" of a part's 1-minute load average, or None.

    The load is stored either as one float or as os.getloadavg()'s list.
    """
    if "loadavg_start" not in part or "loadavg_end" not in part:
        return None
    start, end = part["loadavg_start"], part["loadavg_end"]
    if isinstance(start, (list, tuple)):
        start, end = start[0], end[0]
    return f"{name} {start:.2f} -> {end:.2f}"


def failed_target(backend, r):
    return f"- [{backend}] MISS: backend run failed ({r['error']})"


def versions_section(results, extra=()):
    """The report's "## Versions" lines: the first version seen of each module."""
    seen = {}
    for r in results.values():
        for k, v in r.get("versions", {}).items():
            seen.setdefault(k, v)
    line = ", ".join(f"{k} {v}" for k, v in sorted(seen.items()))
    if extra:
        line += "; " + ", ".join(extra)
    return ["## Versions\n", line, ""]


def print_report(report):
    print()
    print(report, flush=True)


def exit_status(results):
    return 1 if any("error" in r for r in results.values()) else 0


# ----------------------------------------------------------------------
# A suite that runs one function per backend and renders one report
def per_backend_args(suite, doc, argv=None, prog=None):
    """Parse the command line of a per-backend suite (see `per_backend_main`)."""
    import argparse

    p = argparse.ArgumentParser(prog=prog or f"python benchmarks/{suite}.py", description=doc.split("\n\n")[0])
    p.add_argument("--backend", choices=BACKENDS, default=None)
    p.add_argument("--all", action="store_true", help="every backend, each in a child process")
    p.add_argument("--small", action="store_true", help="small shapes (a quick check)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--markdown", default=None)
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    if bool(args.all) == bool(args.backend):
        p.error("give exactly one of --all, --backend")
    return args


def use_backend(backend):
    """Make Keras load `backend` (it reads KERAS_BACKEND once, at import)."""
    os.environ["KERAS_BACKEND"] = backend
    keras = sys.modules.get("keras")
    if keras is not None and keras.backend.backend() != backend:
        raise SystemExit(
            f"--backend {backend}: Keras was already imported with the "
            f"{keras.backend.backend()} backend; run KERAS_BACKEND={backend} python ..."
        )


def per_backend_main(suite, doc, run, render, argv=None, prog=None):
    """The command line of a suite made of `run(backend, small, steps,
    warmup, log) -> dict` and `render(result) -> markdown`: `--backend B`
    runs it here, `--all` once per backend in child processes; `--small`,
    `--steps`, `--warmup`, `--markdown PATH`, `--json-out PATH`. Returns the
    exit status (1 if a backend failed)."""
    import json
    import platform
    import sys
    import time

    args = per_backend_args(suite, doc, argv, prog)
    log = make_log(args.backend or suite)
    result = {"meta": {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "date": time.strftime("%Y-%m-%d"),
        "command": f"python benchmarks/run.py {suite} " + " ".join(argv if argv is not None else sys.argv[1:]),
    }}
    if args.backend:
        use_backend(args.backend)
        result.update(run(args.backend, args.small, args.steps, args.warmup, log))
        result["backends"] = {args.backend: dict(result)}
    else:
        extra = ["--steps", str(args.steps), "--warmup", str(args.warmup)] + (["--small"] if args.small else [])
        result["backends"] = {
            b: run_child(suite, ["--backend", b, *extra], {"KERAS_BACKEND": b}) for b in BACKENDS
        }
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({k: v for k, v in result.items() if k != "backends" or args.all}, f, indent=1)
    text = render(result)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    return 1 if any("error" in r for r in result["backends"].values()) else 0
