#!/usr/bin/env python
"""DP-DyLoRA's utility: accuracy under user-level DP, against DP-LoRA and no DP.

A synthetic non-IID federated task on a tiny KerasHub Gemma (the one of
`examples/federated_dp_dylora.py`): the base is trained centrally on task
A (next token = token + 1); the federation fine-tunes adapters on task B
(next token = token + 3), each client holding 16 sequences over its own
window of 16 of the 64 token ids. Every federation runs in Flower's
simulation engine. Per configuration the suite reports the server's
next-token accuracy and loss on uniform task-B sequences after the last
round, and ε.

Configurations: DyLoRA (rank 8) without DP, at ε = 8 and at ε = 2; LoRA
(fixed rank 8) without DP, at ε = 8 and ε = 2 (DP-LoRA); all at the same
rounds and sampling rate, under DP the same clipping norm and server
learning rate, for each number of clients. δ = N^-1.1. Besides accuracy:
the floats a client uploads per round (mean over rounds) and, for DyLoRA,
the accuracy of the final model used at rank 4.

    python benchmarks/run.py federated [--small] [--clients 100,200,400]
        [--rounds 20] [--backend jax] [--markdown PATH] [--json-out PATH] [--plot PATH]
"""

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PROG = "python benchmarks/federated.py"
BACKENDS = ("jax", "tensorflow", "torch")

#: (label, method, ε or None) of every configuration, in table order
CONFIGS = (
    ("DyLoRA, no DP", "dylora", None),
    ("LoRA, no DP", "lora", None),
    ("DP-DyLoRA, ε = 8", "dylora", 8.0),
    ("DP-DyLoRA, ε = 2", "dylora", 2.0),
    ("DP-LoRA, ε = 8", "lora", 8.0),
    ("DP-LoRA, ε = 2", "lora", 2.0),
)
#: the configurations run at every number of clients beyond the first
TREND = ("DyLoRA, no DP", "LoRA, no DP", "DP-DyLoRA, ε = 2", "DP-LoRA, ε = 2")
RANK = 8
SAMPLING_RATE = 0.2
CLIPPING_NORM = 0.5
#: the server's step along the noised mean update under DP (no DP: 1, FedAvg)
SERVER_LR_DP = 3.0


def parse_args(argv=None, prog=PROG):
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=BACKENDS, default="jax")
    p.add_argument("--all", action="store_true", help="(every configuration: the default)")
    p.add_argument("--small", action="store_true", help="20 clients, 3 rounds, two configurations")
    p.add_argument("--clients", default="100,200,400", help="numbers of clients, comma-separated")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--warmup", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--markdown", default=None)
    p.add_argument("--json-out", default=None)
    p.add_argument("--plot", default=None, help="a PNG of accuracy against the number of clients")
    p.add_argument("--from-json", default=None, help="redraw --markdown/--plot from a --json-out file")
    args = p.parse_args(argv)
    try:
        args.client_counts = [int(c) for c in args.clients.split(",")]
    except ValueError:
        p.error(f"--clients must be comma-separated integers, got {args.clients!r}")
    if args.small:
        args.client_counts, args.rounds = [20], 3
    if min(args.client_counts) < 5 or args.rounds < 1:
        p.error("--clients must be >= 5 and --rounds >= 1")
    return args


def run(args, log=print):
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    import federated_dp_dylora as task

    import keras

    rows = []
    work = tempfile.mkdtemp(prefix="klr-bench-federated-")
    base = task.build_base(os.path.join(work, "base.weights.h5"), seed=args.seed)
    configs = CONFIGS if not args.small else (CONFIGS[0], CONFIGS[1])
    for i, n_clients in enumerate(args.client_counts):
        for label, method, epsilon in configs:
            if i > 0 and label not in TREND:
                continue
            start = time.perf_counter()
            extra = {}
            if epsilon is not None:
                extra = {"clipping_norm": CLIPPING_NORM}
            result = federate(task, base, n_clients, args.rounds, epsilon, method, args.seed,
                              **extra)
            last = result.history[-1]
            upload, at_half = _upload_and_half_rank(result, task)
            row = {
                "config": label, "method": method, "target_epsilon": epsilon,
                "clients": n_clients, "cohort": SAMPLING_RATE * n_clients, "rounds": args.rounds,
                "epsilon": result.epsilon, "delta": result.delta,
                "noise_multiplier": result.noise_multiplier,
                "noise_std": (result.noise_multiplier * CLIPPING_NORM / (SAMPLING_RATE * n_clients)
                              if epsilon is not None else 0.0),
                "accuracy": last["accuracy"], "loss": last["loss"],
                "accuracy_before": result.initial_metrics["accuracy"],
                "upload_floats": upload, "accuracy_rank_4": at_half,
                "seconds": time.perf_counter() - start,
            }
            rows.append(row)
            log(f"{label:18s} N={n_clients:4d}: accuracy {row['accuracy']:.3f} "
                f"loss {row['loss']:.3f} eps {row['epsilon']} ({row['seconds']:.0f} s)")
    return {"meta": {
        "backend": keras.backend.backend(), "date": time.strftime("%Y-%m-%d"),
        "cpus": os.cpu_count(), "rank": RANK, "sampling_rate": SAMPLING_RATE,
        "clipping_norm": CLIPPING_NORM, "server_learning_rate_dp": SERVER_LR_DP,
        "rounds": args.rounds, "seed": args.seed,
        "command": "python benchmarks/run.py federated " + " ".join(args.argv),
    }, "rows": rows}


def _upload_and_half_rank(result, task):
    """(mean floats a client sent per round, DyLoRA accuracy at rank 4)."""
    import numpy as np

    from keras_lowrank import dylora
    from keras_lowrank import federated

    model = result.model
    sizes = [sum(v.size for v in federated.adapter_arrays(model, h["rank"]).values())
             for h in result.history]
    if result.history[0]["rank"] is None:
        return float(np.mean(sizes)), None
    x, y = task.sequences(np.random.default_rng(task.Evaluate().seed), 128, task.SHIFT_B)
    metrics = dylora.evaluate_ranks(model, x, y, ranks=[RANK // 2], verbose=0, batch_size=64)
    return float(np.mean(sizes)), float(metrics[RANK // 2]["accuracy"])


def federate(task, base, n_clients, rounds, epsilon, method, seed, clipping_norm=None):
    from keras_lowrank import federated

    model_fn = task.ModelFn(base, method, RANK, 0.02, seed)
    results = []
    dp = {}
    if epsilon is not None:
        dp = {"target_epsilon": epsilon, "clipping_norm": clipping_norm,
              "server_learning_rate": SERVER_LR_DP}
    server = federated.server_app(
        model_fn, num_clients=n_clients, clients_per_round=SAMPLING_RATE * n_clients,
        rounds=rounds, seed=seed, evaluate_fn=task.Evaluate(), on_finish=results.append, **dp,
    )
    client = federated.client_app(model_fn, task.DataFn(16, seed), epochs=2, batch_size=8,
                                  seed=seed)
    federated.run_simulation(server, client, num_clients=n_clients)
    return results[0]


def markdown(result):
    meta, rows = result["meta"], result["rows"]
    out = [
        "# Federated benchmark: DP-DyLoRA vs DP-LoRA",
        "",
        f"`{meta['command']}` on {meta['backend']}, {meta['cpus']} CPUs, {meta['date']}; "
        f"one seed ({meta['seed']}). Every federation ran in Flower's simulation engine.",
        "",
        f"Task: see `benchmarks/federated.py`. Rank {meta['rank']}; sampling rate "
        f"q = {meta['sampling_rate']} (expected cohort qN); {meta['rounds']} rounds; local "
        "training 2 epochs of Adam (lr 0.02, batch 8) on 16 sequences; clipping norm "
        f"C = {meta['clipping_norm']} and server learning rate {meta['server_learning_rate_dp']} "
        "under DP (FedAvg, unclipped, without). δ = N^-1.1; ε from dp-accounting's RDP accountant.",
        "",
        "| configuration | clients N | cohort qN | ε | σ | noise std σC/n | accuracy | loss | accuracy at rank 4 | upload (floats/client/round) | time (s) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        eps = "∞" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
        out.append(
            f"| {r['config']} | {r['clients']} | {r['cohort']:.0f} | {eps} | "
            f"{r['noise_multiplier']:.3f} | {r['noise_std']:.4f} | {r['accuracy']:.3f} | "
            f"{r['loss']:.3f} | {'–' if r['accuracy_rank_4'] is None else format(r['accuracy_rank_4'], '.3f')} | "
            f"{r['upload_floats']:,.0f} | {r['seconds']:.0f} |"
        )
    if rows:
        out += ["", f"Accuracy of the base before federated training: {rows[0]['accuracy_before']:.3f}."]
    return "\n".join(out) + "\n"


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for label in dict.fromkeys(r["config"] for r in rows):
        pts = sorted((r["clients"], r["accuracy"]) for r in rows if r["config"] == label)
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xscale("log")
    counts = sorted({r["clients"] for r in rows})
    ax.set_xticks(counts, [str(c) for c in counts])
    ax.minorticks_off()
    ax.set_xlabel("clients N (cohort 0.2 N per round)")
    ax.set_ylabel("next-token accuracy (task B)")
    ax.set_title(f"Federated fine-tuning, {result['meta']['rounds']} rounds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None, prog=PROG):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv, prog)
    args.argv = argv
    os.environ["KERAS_BACKEND"] = args.backend
    if args.from_json:
        with open(args.from_json) as f:
            result = json.load(f)
    else:
        result = run(args)
    text = markdown(result)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1)
    if args.plot:
        plot(result, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
