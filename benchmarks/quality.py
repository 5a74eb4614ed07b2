#!/usr/bin/env python
"""Method comparison: every registered method fine-tunes one pretrained tiny
KerasHub Gemma on a shifted task, at comparable trainable-parameter budgets.

    python benchmarks/quality.py [--backend B] [--small] [--seeds N]
        [--methods lora,dora,...] [--markdown docs/quality.md]
        [--plot docs/quality.png] [--json-out quality.json]

The data is a synthetic language, made here: sequences of a first-order
Markov chain over 64 tokens in which each token has two likely successors
(70% / 20%, the rest spread over the vocabulary). The base model is trained
on chain A; the task is chain B, whose successor table is another random
one. The eval loss is the next-token cross-entropy on held-out chain-B
sequences (the chain's own entropy is its floor).

For each seed the base is pretrained once (in this process) and saved;
then each method runs in its own child process (so its peak RSS is its
own): it loads the base, adapts every Dense/EinsumDense but the head, and
trains a fixed number of steps of Adam at the method's learning rate
(`1e-2 x min(5, lr_scale)`). Rank methods take the rank, among 1, 2, 4, 8,
16 and 32, whose trainable-parameter count is nearest (in log ratio) to
LoRA's at rank 4; the others keep their defaults (SVD-training at
`rank_fraction=0.25`: the blog's 0.1 keeps no singular value of the
8-wide key kernels here). Full fine-tuning (every weight,
`3e-3`) and the untouched base bound the table; QLoRA is LoRA over an NF4
base. Reported per method: trainable parameters, final eval loss (mean and
spread over seeds), the fraction of full fine-tuning's loss reduction
recovered, wall time per step (median, after the first epoch) and the
child's peak RSS.

`--small`: one seed, fewer steps, every method, all in this process (a
few minutes; no per-method peak RSS).
"""

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _common  # noqa: E402

VOCAB = 64
SEQ = 16
CONFIG = dict(vocabulary_size=VOCAB, num_layers=2, num_query_heads=4, num_key_value_heads=1,
              hidden_dim=32, intermediate_dim=64, head_dim=8)
BATCH = 32
LR = 1e-2
LR_FULL = 3e-3
BUDGET_RANK = 4
RANKS = (1, 2, 4, 8, 16, 32)
SIZES = {
    "small": dict(pretrain_steps=200, train_steps=60, epochs=3, seeds=1, eval_n=256),
    "full": dict(pretrain_steps=600, train_steps=240, epochs=6, seeds=3, eval_n=1024),
}
#: PEFT's own method comparison (MetaMathQA, Llama-3.2-3B, GSM8K test
#: accuracy in %, huggingface/peft `method_comparison/MetaMathQA/results`,
#: read at commit 5d602fdb): the file each number comes from. PEFT has no
#: run of the other methods.
PEFT_METAMATHQA = {
    "lora": (47.8, "lora--llama-3.2-3B-rank32"),
    "dora": (46.9, "lora--llama-3.2-3B-rank32-dora"),
    "lora_fa": (40.4, "lora--llama-3.2-3B-rank32-lorafa"),
    "adalora": (37.3, "adalora--llama-3.2-3B-rank32"),
    "loha": (39.3, "loha--llama-3.2-3B-rank32"),
    "lokr": (46.6, "lokr--llama-3.2-3B-rank32-factor4-lr0.003"),
    "vera": (35.4, "vera--llama-3.2-3B-default"),
    "gralora": (49.5, "gralora--llama-3.2-3B-rank32"),
    "hira": (51.3, "hira--llama-3.2-3B-rank32-lr4.5e-3"),
    "lily": (52.6, "lily--llama-3.2-3B-rank140-mlp-a2-b2-s8.0"),
    "miss": (48.7, "miss--llama-3.2-3B-default"),
    "shira": (51.0, "shira--llama-3.2-3B-lr_0.0003-random_seed_42"),
    "randlora": (47.8, "randlora--llama-3.2-3B-default"),
    "delora": (46.8, "delora--llama-3.2-3B-rank32"),
    "full": (47.2, "full-finetuning--llama-3.2-3B-lr_0.00001"),
}
#: rows that are not registered methods
EXTRA = ("base", "full", "qlora", "lora_orthogonal")


# ----------------------------------------------------------------------
# Data
def chain(seed):
    """A successor table: `p[t]` is the next-token distribution after `t`."""
    import numpy as np

    rng = np.random.default_rng(seed)
    p = np.full((VOCAB, VOCAB), 0.1 / (VOCAB - 2))
    for t in range(VOCAB):
        a, b = rng.choice(VOCAB, 2, replace=False)
        p[t] = 0.1 / (VOCAB - 2)
        p[t, a], p[t, b] = 0.7, 0.2
    return p / p.sum(1, keepdims=True)


def sample(p, n, seed):
    import numpy as np

    rng = np.random.default_rng(seed)
    tokens = np.zeros((n, SEQ + 1), "int32")
    tokens[:, 0] = rng.integers(0, VOCAB, n)
    cum = p.cumsum(1)
    for i in range(1, SEQ + 1):
        u = rng.random(n)[:, None]
        tokens[:, i] = (u > cum[tokens[:, i - 1]]).sum(1).clip(max=VOCAB - 1)
    x = {"token_ids": tokens[:, :-1], "padding_mask": np.ones((n, SEQ), "int32")}
    return x, tokens[:, 1:]


def entropy_floor(p):
    import numpy as np

    # the chain's entropy rate under its stationary distribution
    w, v = np.linalg.eig(p.T)
    pi = np.real(v[:, np.argmin(np.abs(w - 1))])
    pi = pi / pi.sum()
    return float(-(pi[:, None] * p * np.log(p)).sum())


def task_data(seed, size):
    pa, pb = chain(1000 + seed), chain(2000 + seed)
    n_train = BATCH * 8
    return {
        "pretrain": sample(pa, n_train, 10 + seed),
        "train": sample(pb, n_train, 20 + seed),
        "eval": sample(pb, size["eval_n"], 30 + seed),
        "floor": entropy_floor(pb),
    }


# ----------------------------------------------------------------------
# Models
def build():
    import keras_hub

    return keras_hub.models.GemmaCausalLM(backbone=keras_hub.models.GemmaBackbone(**CONFIG),
                                          preprocessor=None)


def compile_(model, lr):
    import keras

    model.compile(optimizer=keras.optimizers.Adam(lr),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))


def eval_loss(model, data):
    x, y = data
    return float(model.evaluate(x, y, batch_size=256, verbose=0, return_dict=True)["loss"])


def pretrain(seed, size, path):
    import keras

    keras.utils.set_random_seed(seed)
    data = task_data(seed, size)
    model = build()
    compile_(model, 3e-3)
    steps_per_epoch = len(data["pretrain"][1]) // BATCH
    model.fit(*data["pretrain"], batch_size=BATCH, verbose=0,
              epochs=max(1, size["pretrain_steps"] // steps_per_epoch))
    model.save_weights(path)
    return {"pretrain_eval_loss_on_task": eval_loss(model, data["eval"]), "floor": data["floor"]}


def method_options(method, size, data=None):
    """The method's options for a run of `size`: schedules fitted to the
    run's length (AdaLoRA's budget schedule over every step, Delta-LoRA's
    kernel updates from a quarter of the way on, not at its default step
    500), SVD-training at `rank_fraction=0.25` (the blog's 0.1 keeps
    no singular value of this model's 8-wide key kernels); the inits that
    read sample data (EVA, CorDA, LoRA-GA) get the training set (`data`);
    LoftQ, an init for quantized bases, runs over NF4 (5 rounds)."""
    import keras_lowrank as kl

    spec = kl.registry.get(method)
    options = dict(spec.example_options)
    if spec.calibration:
        options["data"] = data
    if method == "loftq":
        options.update(base="nf4", loftq_iter=5)
    steps = max(2, size["train_steps"] // (BATCH * 8 // BATCH)) * (BATCH * 8 // BATCH)
    if method == "svd_training":
        options["rank_fraction"] = 0.25  # 0.1 keeps no value of an 8-wide kernel
    elif method == "adalora":
        options["total_steps"] = steps
    elif method == "delta_lora":
        options["start_step"] = steps // 4
    return spec, options


def pick_rank(method, base_path, size, data=None):
    """The rank whose trainable count is nearest LoRA's at BUDGET_RANK."""
    import keras_lowrank as kl

    def count(m, rank, **options):
        model = build()
        model.load_weights(base_path)
        if kl.registry.get(m).calibration == "gradients":
            compile_(model, LR)
        try:
            return kl.enable_adapter(model, method=m, rank=rank, **options).adapter_params
        except ValueError:
            return None

    budget = count("lora", BUDGET_RANK)
    spec, options = method_options(method, size, data)
    if "rank" not in {o.name for o in spec.options} or method == "svd_training":
        return None, budget
    best = None
    for r in RANKS:
        n = count(method, r, **options)
        if n is None:
            continue
        gap = abs(math.log(n / budget))
        if best is None or gap < best[0]:
            best = (gap, r)
    return best[1], budget


class _StepTimer:
    def __init__(self):
        import keras

        class T(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.times, self.epoch = [], 0

            def on_epoch_begin(self, epoch, logs=None):
                self.epoch = epoch

            def on_train_batch_begin(self, batch, logs=None):
                self.t0 = time.perf_counter()

            def on_train_batch_end(self, batch, logs=None):
                if self.epoch > 0:  # the first epoch traces and compiles
                    self.times.append(time.perf_counter() - self.t0)

        self.callback = T()


def run_method(method, seeds, size, workdir):
    """One method over every seed (in a child process)."""
    import keras

    import keras_lowrank as kl

    out = {"method": method, "seeds": []}
    for seed in seeds:
        base_path = os.path.join(workdir, f"base_{seed}.weights.h5")
        data = task_data(seed, size)
        keras.utils.set_random_seed(seed)
        model = build()
        model.load_weights(base_path)
        row = {"seed": seed}
        if method == "base":
            row.update(eval_loss=eval_loss(model, data["eval"]), trainable=0, step_ms=None)
            out["seeds"].append(row)
            continue
        if method == "full":
            lr, rank = LR_FULL, None
            trainable = int(sum(math.prod(v.shape) for v in model.trainable_variables))
        else:
            name = "lora" if method in ("qlora", "lora_orthogonal") else method
            rank, _ = (pick_rank(name, base_path, size, data["train"]) if name == method
                       else (BUDGET_RANK, None))
            keras.utils.set_random_seed(seed)
            model = build()
            model.load_weights(base_path)
            spec, options = method_options(name, size, data["train"])
            if rank is not None:
                options["rank"] = rank
            if method == "qlora":
                options["base"] = "nf4"
            if method == "lora_orthogonal":
                options["init"] = "orthogonal"
            if spec.calibration == "gradients":
                compile_(model, LR)
            summary = kl.enable_adapter(model, method=name, seed=seed, **options)
            trainable = int(summary.adapter_params)
            lr = LR * min(5.0, spec.lr_scale)
        compile_(model, lr)
        timer = _StepTimer()
        steps_per_epoch = len(data["train"][1]) // BATCH
        epochs = max(2, size["train_steps"] // steps_per_epoch)
        model.fit(*data["train"], batch_size=BATCH, epochs=epochs, verbose=0,
                  callbacks=[timer.callback])
        row.update(eval_loss=eval_loss(model, data["eval"]), trainable=trainable, rank=rank,
                   step_ms=1000 * statistics.median(timer.callback.times))
        out["seeds"].append(row)
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


# ----------------------------------------------------------------------
# Report
def aggregate(result):
    rows = {}
    for r in result["runs"]:
        losses = [s["eval_loss"] for s in r["seeds"]]
        steps = [s["step_ms"] for s in r["seeds"] if s["step_ms"] is not None]
        rows[r["method"]] = {
            "trainable": r["seeds"][0]["trainable"],
            "rank": r["seeds"][0].get("rank"),
            "loss": statistics.mean(losses),
            "spread": statistics.stdev(losses) if len(losses) > 1 else 0.0,
            "losses": losses,
            "step_ms": statistics.median(steps) if steps else None,
            "peak_rss_mib": r["peak_rss_mib"],
        }
    base, full = rows["base"]["loss"], rows["full"]["loss"]
    for row in rows.values():
        row["recovered"] = (base - row["loss"]) / (base - full) if base != full else float("nan")
    return rows


def render(result, plot_name=None):
    rows = aggregate(result)
    meta = result["meta"]
    order = sorted(rows, key=lambda m: rows[m]["loss"])
    lines = [
        "# Method comparison (quality benchmark)",
        "",
        f"`python benchmarks/quality.py{' --small' if meta['small'] else ''} --backend {meta['backend']}` "
        f"on {meta['machine']}, {meta['date']}; Keras {meta['versions'].get('keras')}, "
        f"{len(meta['seeds'])} seed(s) ({', '.join(map(str, meta['seeds']))}), "
        f"{meta['train_steps']} training steps of batch {BATCH}, the task's entropy floor "
        f"{meta['floor']:.3f} nats. Budget: LoRA rank {BUDGET_RANK} "
        f"({rows.get('lora', {}).get('trainable', '?'):,} trainable parameters).",
        "",
        "| method | rank | trainable params | eval loss (mean ± sd) | recovered of full FT | step (ms) | peak RSS (MiB) | PEFT MetaMathQA (%) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for m in order:
        r = rows[m]
        step = "-" if r["step_ms"] is None else f"{r['step_ms']:.1f}"
        rank = "-" if r["rank"] is None else str(r["rank"])
        lines.append(
            f"| {m} | {rank} | {r['trainable']:,} | {r['loss']:.3f} ± {r['spread']:.3f} | "
            f"{100 * r['recovered']:.0f}% | {step} | "
            f"{'-' if r['peak_rss_mib'] is None else format(r['peak_rss_mib'], '.0f')} | "
            f"{PEFT_METAMATHQA[m][0] if m in PEFT_METAMATHQA else '-'} |"
        )
    if plot_name:
        lines += ["", f"![eval loss against trainable parameters]({plot_name})"]
    return "\n".join(lines) + "\n", rows


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m, r in rows.items():
        if m == "base":
            ax.axhline(r["loss"], color="grey", ls="--", lw=1)
            ax.annotate("base (untouched)", (1, r["loss"]), fontsize=7, color="grey")
            continue
        x = max(r["trainable"], 1)
        ax.errorbar(x, r["loss"], yerr=r["spread"], fmt="o", ms=4, capsize=2)
        ax.annotate(m, (x, r["loss"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("eval loss (nats)")
    ax.set_title("Fine-tuning a tiny Gemma on a shifted synthetic language")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse_args(argv=None, prog=None):
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=_common.BACKENDS, default=None)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--methods", default=None, help="comma-separated subset (base and full always run)")
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--plot", default=None)
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--child", nargs=3, metavar=("METHOD", "SEEDS", "WORKDIR"), help=argparse.SUPPRESS)
    return parser, parser.parse_args(argv)


def main(argv=None, prog=None):
    parser, args = parse_args(argv, prog)
    backend = args.backend or os.environ.get("KERAS_BACKEND", "jax")
    _common.use_backend(backend)
    size = dict(SIZES["small" if args.small else "full"])
    if args.child:
        method, seeds, workdir = args.child
        print(json.dumps(run_method(method, [int(s) for s in seeds.split(",")], size, workdir)))
        return 0
    import keras_lowrank as kl

    seeds = list(range(args.seeds or size["seeds"]))
    methods = list(EXTRA) + [m for m in kl.methods()]
    if args.methods:
        wanted = set(args.methods.split(","))
        unknown = wanted - set(methods)
        if unknown:
            parser.error(f"unknown methods {sorted(unknown)}; known: {methods}")
        methods = [m for m in methods if m in wanted or m in ("base", "full")]
    workdir = tempfile.mkdtemp(prefix="klr-quality-")
    t0 = time.time()
    floors = []
    for seed in seeds:
        info = pretrain(seed, size, os.path.join(workdir, f"base_{seed}.weights.h5"))
        floors.append(info["floor"])
        print(f"[quality] seed {seed}: base pretrained ({time.time() - t0:.0f} s)", flush=True)
    runs = []
    env = dict(os.environ, KERAS_BACKEND=backend)
    for method in methods:
        if args.small:  # in this process: no child start-ups, no per-method peak
            run = dict(run_method(method, seeds, size, workdir), peak_rss_mib=None)
        else:
            cmd = [sys.executable, __file__, "--child", method, ",".join(map(str, seeds)), workdir]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"[quality] {method} failed")
            run = json.loads(proc.stdout.strip().splitlines()[-1])
        runs.append(run)
        losses = ", ".join(f"{s['eval_loss']:.3f}" for s in run["seeds"])
        print(f"[quality] {method}: eval loss {losses}, trainable {run['seeds'][0]['trainable']:,} "
              f"({time.time() - t0:.0f} s)", flush=True)
    result = {
        "meta": {
            "backend": backend, "small": args.small, "seeds": seeds,
            "train_steps": size["train_steps"], "floor": statistics.mean(floors),
            "machine": f"{_common.cpu_model()}, {os.cpu_count()} CPUs",
            "date": _common.utc_now(), "versions": _common.versions(["keras", "keras_hub", backend]),
            "seconds": time.time() - t0,
        },
        "runs": runs,
    }
    plot_name = None
    text, rows = render(result)
    if args.plot:
        plot(rows, args.plot)
        plot_name = os.path.basename(args.plot)
        text, rows = render(result, plot_name)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
