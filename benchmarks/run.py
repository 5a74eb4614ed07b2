#!/usr/bin/env python
"""The benchmark driver: one entry point for every benchmark suite.

    python benchmarks/run.py step_time [options]   # train-step / predict time
    python benchmarks/run.py quantized [options]   # quantized frozen bases
    python benchmarks/run.py quantized_scale [options]  # NF4 from a 0.5B bfloat16 model: peak memory
    python benchmarks/run.py svd_family [options]  # SVD engine, init and step time of the SVD family
    python benchmarks/run.py loha_forms [options]  # LoHa's Khatri-Rao vs materialized forward, per rank
    python benchmarks/run.py training_dynamics [options]  # LoRA-FA's memory, AdaLoRA's overhead
    python benchmarks/run.py federated [options]   # DP-DyLoRA's accuracy in Flower's simulation engine
    python benchmarks/run.py moe_experts [options] # LoRA on MoE expert stacks: cost, and the loss reached
    python benchmarks/run.py serving [options]     # a different adapter per example in one call, vs PEFT
    python benchmarks/run.py quality [options]     # every method's eval loss on one task (not in `all`)
    python benchmarks/run.py all [options]         # every suite but quality, one after the other

`python benchmarks/run.py SUITE --help` lists a suite's options. With `all`,
the options are given to both suites, so only the ones both have are
accepted (`--backend`, `--all`, `--small`, `--steps`, `--warmup`,
`--markdown`, `--json-out`), and `--markdown DIR` / `--json-out DIR` name a
folder that receives `benchmarks_<suite>.md` / `<suite>.json`. Each suite of
`all` runs in its own process (the quantized suite measures peak memory,
which must not include another suite's). Exit status: 0 if every part ran.

The suites are `step_time.py`, `quantized.py`, `quantized_scale.py`, `svd_family.py`, `loha_forms.py`, `moe_experts.py`,
`training_dynamics.py`, `federated.py` and `serving.py` next to this file (each still
runnable directly); their shared code is in `_common.py`. See README.md.
"""

import argparse
import importlib
import os
import subprocess
import sys

SUITES = ("step_time", "quantized", "quantized_scale", "svd_family", "loha_forms", "training_dynamics", "federated",
          "moe_experts", "serving")
#: suites with their own options, run alone (not by `all`)
ALONE = ("quality",)
HERE = os.path.dirname(os.path.abspath(__file__))


def suite_module(name):
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    return importlib.import_module(name)


def prog(name):
    return f"python benchmarks/run.py {name}"


def split_outputs(argv):
    """(--markdown DIR, --json-out DIR, the other args) of `all`'s args."""
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    p.add_argument("--markdown")
    p.add_argument("--json-out")
    known, rest = p.parse_known_args(argv)
    return known.markdown, known.json_out, rest


def run_all(argv):
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0
    markdown_dir, json_dir, rest = split_outputs(argv)
    plan = []
    for name in SUITES:
        sargv = list(rest)
        if markdown_dir:
            sargv += ["--markdown", os.path.join(markdown_dir, f"benchmarks_{name}.md")]
        if json_dir:
            sargv += ["--json-out", os.path.join(json_dir, f"{name}.json")]
        # check both command lines before running anything (exits on error)
        suite_module(name).parse_args(sargv, prog(name))
        plan.append((name, sargv))
    status = 0
    for name, sargv in plan:
        cmd = [sys.executable, os.path.abspath(__file__), name, *sargv]
        print("$", " ".join(cmd), flush=True)
        rc = subprocess.run(cmd).returncode
        if rc != 0:
            print(f"{name}: exit status {rc}", flush=True)
            status = 1
    return status


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name == "all":
        return run_all(rest)
    if name not in SUITES + ALONE:
        print(f"unknown suite {name!r}: give one of {', '.join(SUITES + ALONE)}, all", file=sys.stderr)
        return 2
    return suite_module(name).main(rest, prog=prog(name))


if __name__ == "__main__":
    sys.exit(main())
