"""Helpers shared by the benchmark scripts: machine facts, timing
statistics, verdicts, and running a script again in a child process."""

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

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


def verdict(value, limit):
    return "PASS" if value <= limit else "MISS"


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
