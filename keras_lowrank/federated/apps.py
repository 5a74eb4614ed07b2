"""Flower apps for (DP-)DyLoRA federations of Keras models.

`client_app(model_fn, data_fn)` is a Flower `ClientApp`; `server_app(...)`
a Flower `ServerApp`. Their strategy is three Flower strategies nested:

- `RankBroadcast` (outermost, ours): holds the full adapter arrays, draws
  the round's DyLoRA rank `ℓ` from its own seeded generator, sends the
  rank-`ℓ` slice, writes the aggregated slice back, and keeps the privacy
  ledger (ε after each round; it stops before a round that would exceed
  `max_epsilon`).
- Flower's `DifferentialPrivacyClientSideFixedClipping` (under DP): puts
  the clipping norm into each round's config (clients clip with Flower's
  `fixedclipping_mod`) and adds Gaussian noise of standard deviation
  `σ C / n` to the aggregate.
- `PoissonFedAvg` (ours, a Flower `FedAvg`): samples each client with
  probability `q = n / N` (Poisson sampling, what the accountant assumes;
  Flower's `FedAvg` draws a fixed number without replacement) and, under
  DP, divides the sum of clipped updates by the fixed expected cohort size
  `n` (sensitivity `C / n`; `FedAvg` divides by the number of replies,
  which depends on the sample).
"""

import logging
import os
import threading
import time
import uuid
import warnings
import weakref

import keras
import numpy as np

from keras_lowrank import arguments
from keras_lowrank.federated import accounting
from keras_lowrank.federated import exchange
from keras_lowrank.methods import dylora

from flwr.app import Array
from flwr.app import ArrayRecord
from flwr.app import ConfigRecord
from flwr.app import Message
from flwr.app import MessageType
from flwr.app import MetricRecord
from flwr.app import RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.serverapp import ServerApp
from flwr.serverapp.exception import PrivacyBudgetExhausted
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy import Strategy

logger = logging.getLogger("keras_lowrank.federated")


class _ExpectedWarnings(logging.Filter):
    """Two of Flower's warnings that are expected here: its DP wrapper warns
    whenever a round's cohort differs from its `num_sampled_clients`, which
    under Poisson sampling it may (the denominator is the expected size,
    which is what the accounting needs); `FedAvg` warns that there is no
    client-side evaluation (the server evaluates)."""

    def filter(self, record):
        text = str(record.msg)
        return not (text.startswith("The number of clients returning parameters")
                    or text.startswith("fraction_evaluate is set to 0.0"))


class _NoDeprecation(logging.Filter):
    """Flower's note that its Python `run_simulation` is deprecated in favour
    of `flwr run`, shown while ours runs it (the same apps run under `flwr
    run`, see docs/federated.md)."""

    def filter(self, record):
        return "The `run_simulation` function is deprecated" not in record.getMessage()


logging.getLogger("flwr").addFilter(_ExpectedWarnings())

#: config keys of a training round
KEY_RANK = "klr-rank"
KEY_BASE = "klr-base-fingerprint"
KEY_CLIP = "clipping_norm"  # Flower's fixedclipping_mod reads this key
#: metric keys of a client's reply
KEY_EXAMPLES = "num-examples"
KEY_WEIGHT = "klr-weight"
KEY_LOSS = "train-loss"

NAIVE_RANKS = (
    "DP-DyLoRA needs the server to draw one rank per round for every client "
    "(rank_sampling='server'). If each client drew its own rank, the set of "
    "adapter coordinates a client changes (and hence what its update reveals, "
    "the per-coordinate sensitivity and where noise must go) would depend on "
    "the client, so the Gaussian mechanism on the clipped sum and the privacy "
    "accounting of DP-FedAvg would no longer hold; the server could also tell "
    "clients apart by the coordinates they touch."
)


def _record(arrays):
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def _arrays(record):
    return {k: v.numpy() for k, v in record.items()}


# ---------------------------------------------------------------------------
# Client


_MODELS = {}
_MODELS_LOCK = threading.Lock()


def _client_model(model_fn, key):
    """One model per client app and process (clients of a simulation share
    worker processes; each message reloads every exchanged array and resets
    the optimizer, so nothing carries over from one client to the next)."""
    with _MODELS_LOCK:
        entry = _MODELS.get(key)
        if entry is None:
            model = model_fn()
            if not getattr(model, "compiled", False) or model.optimizer is None:
                raise ValueError(
                    "client_app: model_fn must return a compiled Keras model with "
                    "adapters (enable_adapter, then compile); model "
                    f"{getattr(model, 'name', model)!r} is not compiled."
                )
            _fresh_optimizer(model)
            entry = (model, exchange.base_fingerprint(model))
            _MODELS[key] = entry
        return entry


_FRESH = weakref.WeakKeyDictionary()


def _fresh_optimizer(model):
    """The optimizer's state before any training (built if need be): put
    back after every local training, so no client inherits another's."""
    if model not in _FRESH:
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        _FRESH[model] = [np.array(keras.ops.convert_to_numpy(v)) for v in model.optimizer.variables]
    return _FRESH[model]


def _reset_optimizer(model):
    for v, value in zip(model.optimizer.variables, _fresh_optimizer(model)):
        v.assign(value)


def _count(data):
    x = data[0] if isinstance(data, tuple) else data
    if isinstance(x, dict):
        x = next(iter(x.values()))
    try:
        return int(len(x))
    except TypeError:
        return 1


def train_client(model, fingerprint, content, data, epochs=1, batch_size=32):
    """One client's round: load the server's arrays at the round's rank,
    `fit` on `data` (a tuple of fit's `x, y[, sample_weight]` or a dataset),
    and return `(arrays, metrics)`: the trained rank-`ℓ` adapter arrays
    (unclipped: `fixedclipping_mod` clips them) and the reply's metrics.
    `epochs` and `batch_size` are ints >= 1."""
    epochs = arguments.number("train_client", "epochs", epochs, 1, None, integer=True)
    batch_size = arguments.number("train_client", "batch_size", batch_size, 1, None, integer=True)
    config = content["config"]
    rank = config.get(KEY_RANK)
    has_dylora = exchange.max_rank(model) is not None
    if has_dylora and rank is None:
        raise ValueError(
            f"Model {model.name!r} has DyLoRA adapters but the server sent no rank: "
            + NAIVE_RANKS
        )
    rank = None if rank is None else int(rank)
    base = config.get(KEY_BASE)
    if base is not None and base != fingerprint:
        raise ValueError(
            f"Model {model.name!r}: this client's base weights differ from the "
            "server's (fingerprints differ); build the same base model on both sides."
        )
    exchange.set_adapter_arrays(model, _arrays(content["arrays"]), rank)
    _fresh_optimizer(model)
    if has_dylora:
        dylora.fix_train_rank(model, rank)
    if not isinstance(data, tuple):
        data = (data,)
    try:
        history = _fit(model, data, epochs, batch_size)
    finally:
        _reset_optimizer(model)
        if has_dylora:
            dylora.fix_train_rank(model, None)
    losses = history.history.get("loss") or [float("nan")]
    metrics = {KEY_EXAMPLES: _count(data), KEY_WEIGHT: 1, KEY_LOSS: float(losses[-1])}
    return exchange.adapter_arrays(model, rank), metrics


def _sliceable(data):
    """Whether `data` (fit's positional arguments) is arrays (or dicts of
    arrays) of one length, which `_fit` can shuffle itself."""
    n = None
    for part in data:
        for leaf in (part.values() if isinstance(part, dict) else [part]):
            if not isinstance(leaf, np.ndarray) or (n is not None and len(leaf) != n):
                return False
            n = len(leaf)
    return n is not None


def _take(part, index):
    if isinstance(part, dict):
        return {k: v[index] for k, v in part.items()}
    return part[index]


def _fit(model, data, epochs, batch_size):
    """`model.fit` on the client's data. NumPy data is shuffled here, each
    epoch from NumPy's global generator: Keras's own shuffle draws one more
    permutation on a model's first `fit` (to trace it), so a seeded client
    would train differently the first time a worker runs it."""
    if not _sliceable(data):
        return model.fit(*data, epochs=epochs, batch_size=batch_size, verbose=0)
    n = _count(data)
    history = None
    for _ in range(epochs):
        order = np.random.permutation(n)
        history = model.fit(*[_take(part, order) for part in data], epochs=1,
                            batch_size=batch_size, shuffle=False, verbose=0)
    return history if history is not None else model.fit(
        *data, epochs=0, batch_size=batch_size, verbose=0)


def _clip_when_asked(msg, context, call_next):
    """Flower's `fixedclipping_mod` on rounds that carry a clipping norm."""
    config = msg.content.config_records.get("config")
    if config is None or KEY_CLIP not in config:
        return call_next(msg, context)
    replies = []

    def keep(m, c):
        replies.append(call_next(m, c))
        return replies[-1]

    try:
        return fixedclipping_mod(msg, context, keep)
    except ZeroDivisionError:  # Flower's clip divides by the update's norm
        return replies[-1]  # a zero update: within any norm as it is


def client_app(model_fn, data_fn, epochs=1, batch_size=32, seed=None):
    """A Flower `ClientApp` that trains the adapters of a Keras model.

    Args:
        model_fn: `() -> model`: the base model with adapters
            (`enable_adapter`), compiled (optimizer, loss). Every client and
            the server must build the same base weights.
        data_fn: `(partition_id, num_partitions) -> data`: the client's
            local data, as a tuple `(x, y)` for `model.fit` or a dataset.
            Flower's simulation sets the node config keys `partition-id`
            and `num-partitions`; a SuperNode gets them from
            `--node-config`.
        epochs, batch_size: local training per round: ints >= 1.
        seed: `None`, or an int >= 0: each local training then starts from
            `keras.utils.set_random_seed` of (seed, round, partition), so a
            client's shuffling (and any draw from NumPy's or Keras's global
            generators) repeats whichever worker runs it. Layers' own seed
            generators (dropout with `seed=None`) live in the model and
            move on from round to round.

    Each training message carries the round's adapter arrays (the rank-ℓ
    slice for DyLoRA), the rank and, under DP, the clipping norm. The
    client loads them, trains at that rank with `model.fit`, and replies
    with the same arrays trained, clipped to the norm by Flower's
    `fixedclipping_mod`: adapter slices only, never a base weight.

    Bad arguments are refused before anything is built, with a `TypeError`
    (a value of the wrong kind: `"5"`, `True`, `2.5` for an int) or a
    `ValueError` (out of range) naming the argument and the value.
    """
    where = "client_app"
    arguments.function(where, "model_fn", model_fn)
    arguments.function(where, "data_fn", data_fn)
    epochs = arguments.number(where, "epochs", epochs, 1, None, integer=True)
    batch_size = arguments.number(where, "batch_size", batch_size, 1, None, integer=True)
    seed = arguments.number(where, "seed", seed, 0, None, integer=True, none=True)
    app = ClientApp(mods=[_clip_when_asked])
    # the key of this app's model in a worker process (the app travels to
    # simulation workers pickled: `model_fn` arrives as a new object)
    key = uuid.uuid4().hex

    @app.train()
    def train(msg, context):
        model, fingerprint = _client_model(model_fn, key)
        node = context.node_config
        partition = int(node.get("partition-id", 0))
        data = data_fn(partition, int(node.get("num-partitions", 1)))
        if seed is not None:
            server_round = int(msg.content["config"].get("server-round", 0))
            keras.utils.set_random_seed(int(np.random.SeedSequence(
                [seed, server_round, partition]).generate_state(1)[0] % (2**31 - 1)))
        arrays, metrics = train_client(
            model, fingerprint, msg.content, data, epochs=epochs, batch_size=batch_size
        )
        content = RecordDict({"arrays": _record(arrays), "metrics": MetricRecord(metrics)})
        return Message(content=content, reply_to=msg)

    return app


# ---------------------------------------------------------------------------
# Server strategies


class PoissonFedAvg(FedAvg):
    """FedAvg over Poisson-sampled clients.

    Each round every connected client takes part with probability
    `sampling_rate`, drawn from this strategy's own generator (`seed`). With
    `fixed_denominator` (DP-FedAvg) the new arrays are
    `current + η Σ_i Δ_i / expected_cohort`; without, the mean update of
    the replies weighted by their example counts, times η (the server
    learning rate, 1 by default: plain FedAvg).
    """

    def __init__(self, sampling_rate, expected_cohort, fixed_denominator, seed=None,
                 server_learning_rate=1.0):
        where = "PoissonFedAvg"
        sampling_rate = accounting.check_sampling_rate(where, sampling_rate)
        expected_cohort = arguments.number(where, "expected_cohort", expected_cohort, 0, None,
                                         low_open=True)
        fixed_denominator = arguments.flag(where, "fixed_denominator", fixed_denominator)
        seed = arguments.number(where, "seed", seed, 0, None, integer=True, none=True)
        server_learning_rate = arguments.number(where, "server_learning_rate", server_learning_rate,
                                              0, None, low_open=True)
        super().__init__(fraction_train=1.0, fraction_evaluate=0.0, weighted_by_key=KEY_WEIGHT)
        self.server_learning_rate = server_learning_rate
        self.sampling_rate = sampling_rate
        self.expected_cohort = expected_cohort
        self.fixed_denominator = fixed_denominator
        self.rng = np.random.default_rng(seed)
        self.current = None
        self.last_cohort = 0

    def configure_train(self, server_round, arrays, config, grid):
        nodes = sorted(grid.get_node_ids())
        chosen = [n for n, u in zip(nodes, self.rng.random(len(nodes))) if u < self.sampling_rate]
        self.current = _arrays(arrays)
        self.last_cohort = len(chosen)
        config["server-round"] = server_round
        record = RecordDict({"arrays": arrays, "config": config})
        logger.info("round %d: %d of %d clients sampled", server_round, len(chosen), len(nodes))
        return self._construct_messages(record, chosen, MessageType.TRAIN)

    def aggregate_train(self, server_round, replies):
        replies = [r for r in replies if not r.has_error()]
        total = {k: np.zeros_like(v, dtype=np.float64) for k, v in self.current.items()}
        weights, losses = 0.0, []
        for reply in replies:
            new = _arrays(reply.content["arrays"])
            metrics = reply.content["metrics"]
            w = 1.0 if self.fixed_denominator else float(metrics.get(KEY_EXAMPLES, 1))
            for k in total:
                total[k] += w * (np.asarray(new[k], np.float64) - self.current[k])
            weights += w
            losses.append(float(metrics.get(KEY_LOSS, np.nan)))
        denom = self.expected_cohort if self.fixed_denominator else max(weights, 1.0)
        denom /= self.server_learning_rate
        out = {k: (self.current[k] + total[k] / denom).astype(np.float32) for k in total}
        metrics = MetricRecord({
            "clients": len(replies),
            KEY_LOSS: float(np.nanmean(losses)) if np.isfinite(losses).any() else float("nan"),
        })
        return _record(out), metrics


class RankBroadcast(Strategy):
    """The outer strategy of a (DP-)DyLoRA federation (see the module).

    Args:
        strategy: the strategy that samples and aggregates (the slices).
        full_arrays: the adapter arrays at full rank (`adapter_arrays`).
        max_rank: the model's largest DyLoRA rank `R` (`None`: no DyLoRA,
            every round sends everything).
        layer_ranks: `{array key: the layer's rank r}` of the DyLoRA
            factors; at round rank `ℓ` each is cut to `ceil(ℓ r / R)`.
        fingerprint: the server's `base_fingerprint`.
        ledger: an `accounting.Ledger` (`None` without DP).
        max_epsilon: stop before a round that would spend more.
        seed: the seed of the rank generator.
    """

    def __init__(self, strategy, full_arrays, max_rank, layer_ranks, fingerprint, ledger=None,
                 max_epsilon=None, seed=None):
        where = "RankBroadcast"
        max_rank = arguments.number(where, "max_rank", max_rank, 1, None, integer=True, none=True)
        max_epsilon = arguments.number(where, "max_epsilon", max_epsilon, 0, None, low_open=True,
                                     none=True)
        seed = arguments.number(where, "seed", seed, 0, None, integer=True, none=True)
        super().__init__()
        self.strategy = strategy
        self.full = {k: np.array(v, np.float32) for k, v in full_arrays.items()}
        self.max_rank = max_rank
        self.layer_ranks = dict(layer_ranks)
        self.fingerprint = fingerprint
        self.ledger = ledger
        self.max_epsilon = max_epsilon
        self.rng = np.random.default_rng(seed)
        self.history = []
        self._rank = None

    def cut(self, key, rank):
        """How many components of array `key` the round at `rank` uses
        (`None`: the whole array)."""
        r = self.layer_ranks.get(key)
        if r is None or rank is None:
            return None
        return rank if r == self.max_rank else min(r, -(-rank * r // self.max_rank))

    def slice(self, rank):
        """The full arrays cut to DyLoRA rank `rank`."""
        out = {}
        for k, v in self.full.items():
            cut = self.cut(k, rank)
            out[k] = v if cut is None else v[..., :cut, :]
        return out

    def configure_train(self, server_round, arrays, config, grid):
        if self.ledger is not None and self.max_epsilon is not None:
            after = self.ledger.epsilon_after(1)
            if after > self.max_epsilon:
                raise PrivacyBudgetExhausted(
                    f"round {server_round} would bring epsilon to {after:.4f} > "
                    f"max_epsilon={self.max_epsilon} (delta={self.ledger.delta}); "
                    f"training stops after {self.ledger.rounds} rounds at "
                    f"epsilon={self.ledger.epsilon:.4f}."
                )
        self.full = _arrays(arrays)
        self._rank = None if self.max_rank is None else int(self.rng.integers(1, self.max_rank + 1))
        config = ConfigRecord(dict(config))
        config[KEY_BASE] = self.fingerprint
        if self._rank is not None:
            config[KEY_RANK] = self._rank
        self._sent = self.slice(self._rank)
        return self.strategy.configure_train(server_round, _record(self._sent), config, grid)

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        failed = [r for r in replies if r.has_error()]
        for r in failed:
            logger.warning("round %d: client %s failed: %s", server_round,
                           r.metadata.src_node_id, r.error.reason)
        if replies and len(failed) == len(replies):
            raise RuntimeError(
                f"round {server_round}: every client failed; the first said: {failed[0].error.reason}"
            )
        # the largest update a client sent (after its clipping): the server
        # sees every update anyway under central DP
        norms = [exchange.update_norm(_arrays(r.content["arrays"]), self._sent)
                 for r in replies if not r.has_error()]
        agg, metrics = self.strategy.aggregate_train(server_round, replies)
        if agg is None:
            return None, metrics
        for k, v in _arrays(agg).items():
            cut = self.cut(k, self._rank)
            if cut is not None:
                self.full[k][..., :cut, :] = v
            else:
                self.full[k] = np.asarray(v, np.float32)
        entry = {"round": server_round, "rank": self._rank,
                 "clients": int(metrics.get("clients", 0)) if metrics else 0,
                 KEY_LOSS: float(metrics.get(KEY_LOSS, np.nan)) if metrics else float("nan"),
                 "max-update-norm": max(norms, default=0.0)}
        if self.ledger is not None:
            entry["epsilon"] = self.ledger.release()
            logger.info("round %d: rank %s, epsilon %.4f at delta %g", server_round,
                        self._rank, entry["epsilon"], self.ledger.delta)
        self.history.append(entry)
        metrics = MetricRecord(dict(metrics or {}))
        if self._rank is not None:
            metrics["rank"] = self._rank
        if self.ledger is not None:
            metrics["epsilon"] = entry["epsilon"]
        return _record(self.full), metrics

    def configure_evaluate(self, server_round, arrays, config, grid):
        return []

    def aggregate_evaluate(self, server_round, replies):
        return None

    def summary(self):
        logger.info("RankBroadcast: max rank %s, DP %s", self.max_rank, self.ledger is not None)


# ---------------------------------------------------------------------------
# Server


class Settings:
    """The server's settings, checked before anything runs; the keys of a
    Flower run config (`--run-config "rounds=10 noise-multiplier=1.1"`)
    override them."""

    RUN_CONFIG = {
        "rounds": "rounds", "clients-per-round": "clients_per_round",
        "num-clients": "num_clients", "noise-multiplier": "noise_multiplier",
        "clipping-norm": "clipping_norm", "target-epsilon": "target_epsilon",
        "delta": "delta", "max-epsilon": "max_epsilon", "seed": "seed",
        "accountant": "accountant", "save-path": "save_path",
        "server-learning-rate": "server_learning_rate",
    }

    def __init__(self, num_clients, clients_per_round, rounds, noise_multiplier=0.0,
                 clipping_norm=None, target_epsilon=None, delta=None, max_epsilon=None,
                 accountant="rdp", seed=0, rank_sampling="server", save_path=None,
                 server_learning_rate=1.0):
        self.given = dict(
            server_learning_rate=server_learning_rate,
            num_clients=num_clients, clients_per_round=clients_per_round, rounds=rounds,
            noise_multiplier=noise_multiplier, clipping_norm=clipping_norm,
            target_epsilon=target_epsilon, delta=delta, max_epsilon=max_epsilon,
            accountant=accountant, seed=seed, rank_sampling=rank_sampling, save_path=save_path,
        )
        self.num_clients = num_clients
        self.clients_per_round = clients_per_round
        self.rounds = rounds
        self.noise_multiplier = noise_multiplier
        self.clipping_norm = clipping_norm
        self.target_epsilon = target_epsilon
        self.delta = delta
        self.max_epsilon = max_epsilon
        self.accountant = accountant
        self.seed = seed
        self.rank_sampling = rank_sampling
        self.save_path = save_path
        self.server_learning_rate = server_learning_rate
        self.check()

    def with_run_config(self, run_config):
        values = dict(self.given)
        changed = []
        for key, attr in self.RUN_CONFIG.items():
            if key in run_config:
                value = run_config[key]
                values[attr] = None if isinstance(value, str) and value in ("", "none", "None") else value
                changed.append(key)
        if not changed:
            return self
        try:
            return Settings(**values)
        except (TypeError, ValueError) as e:
            raise type(e)(f"{e} (the run config set {', '.join(changed)})") from None

    def check(self):
        """Every setting checked (type, finiteness, range), then how they
        combine; σ derived from `target_epsilon`; the whole run's privacy
        accounted once, so that an accountant that cannot account it
        refuses now rather than after some rounds."""
        w = "server_app"
        number = arguments.number
        self.num_clients = number(w, "num_clients", self.num_clients, 1, None, integer=True)
        self.rounds = accounting.check_rounds(w, self.rounds, low=1)
        self.clients_per_round = number(w, "clients_per_round", self.clients_per_round, 0,
                                        self.num_clients, low_open=True)
        self.noise_multiplier = number(w, "noise_multiplier", self.noise_multiplier, 0, None)
        self.clipping_norm = number(w, "clipping_norm", self.clipping_norm, 0, None, low_open=True,
                                    none=True)
        self.target_epsilon = number(w, "target_epsilon", self.target_epsilon, 0, None,
                                     low_open=True, none=True)
        if self.delta is not None:
            self.delta = accounting.check_delta(w, self.delta)
        self.max_epsilon = number(w, "max_epsilon", self.max_epsilon, 0, None, low_open=True,
                                  none=True)
        self.seed = number(w, "seed", self.seed, 0, None, integer=True, none=True)
        self.server_learning_rate = number(w, "server_learning_rate", self.server_learning_rate,
                                           0, None, low_open=True)
        arguments.path(w, "save_path", self.save_path, (".keras",), none=True)
        if self.rank_sampling != "server":
            if self.rank_sampling == "client":
                raise ValueError(f"server_app: rank_sampling='client' is refused. {NAIVE_RANKS}")
            raise ValueError(
                f"server_app: rank_sampling must be 'server'; received rank_sampling={self.rank_sampling!r}."
            )
        accounting.check_accountant(w, self.accountant)
        if self.noise_multiplier:
            accounting.check_noise(w, self.noise_multiplier)
        if self.target_epsilon is not None and self.noise_multiplier:
            raise ValueError(
                "server_app: give noise_multiplier or target_epsilon, not both; received "
                f"noise_multiplier={self.noise_multiplier!r}, target_epsilon={self.target_epsilon!r}."
            )
        if not self.private:
            if self.clipping_norm is not None or self.max_epsilon is not None:
                raise ValueError(
                    "server_app: clipping_norm and max_epsilon belong to differential privacy: "
                    "give noise_multiplier > 0 or target_epsilon too; received "
                    f"clipping_norm={self.clipping_norm!r}, max_epsilon={self.max_epsilon!r}."
                )
            if self.delta is None:
                self.delta = float(self.num_clients) ** -1.1
            return
        if self.clipping_norm is None:
            raise ValueError("server_app: differential privacy needs a clipping_norm (C > 0); "
                             "received clipping_norm=None.")
        if self.delta is None:
            self.delta = float(self.num_clients) ** -1.1
        try:
            if self.target_epsilon is not None:
                self.noise_multiplier = accounting.noise_for_epsilon(
                    self.target_epsilon, self.sampling_rate, self.rounds, self.delta, self.accountant
                )
                self.target_epsilon = None
            accounting.compute_epsilon(w, self.noise_multiplier, self.sampling_rate, self.rounds,
                                self.delta, self.accountant)
        except (TypeError, ValueError) as e:
            if str(e).startswith(f"{w}:"):
                raise
            raise type(e)(f"{w}: {e}") from None

    @property
    def private(self):
        return bool(self.noise_multiplier) or self.target_epsilon is not None

    @property
    def sampling_rate(self):
        return self.clients_per_round / self.num_clients


class FederatedResult:
    """What a federation leaves: the server's `model` (an ordinary
    keras-lowrank model), its per-round `history` (rank, clients, train
    loss, ε, evaluation metrics), the privacy spent (`epsilon`, `delta`),
    and `stopped` (the reason it stopped early, or `None`)."""

    def __init__(self, model, history, epsilon, delta, noise_multiplier, stopped):
        self.model = model
        self.history = history
        self.epsilon = epsilon
        self.delta = delta
        self.noise_multiplier = noise_multiplier
        self.stopped = stopped


def _wait_for_clients(grid, n, timeout):
    start = time.time()
    while len(list(grid.get_node_ids())) < n:
        if time.time() - start > timeout:
            raise TimeoutError(
                f"server_app: {len(list(grid.get_node_ids()))} of num_clients={n} clients "
                f"connected within {timeout} s."
            )
        time.sleep(0.5)


#: how long a server started in Flower's simulation engine without
#: `run_simulation` waits for Ray to start before it builds its model
ENGINE_START_TIMEOUT = 300.0


def _is_simulation_grid(grid):
    try:
        from flwr.superlink.grid import InMemoryGrid
    except ImportError:  # pragma: no cover - another Flower layout
        return type(grid).__name__ == "InMemoryGrid"
    return isinstance(grid, InMemoryGrid)


def _wait_for_simulation_engine(grid, timeout):
    """In Flower's simulation engine, wait until Ray has started.

    The engine runs the ServerApp in a thread while its main thread starts
    Ray, and Ray's start-up draws from Python's global `random`, which every
    thread shares and from which Keras seeds the initializers of a model
    built without explicit seeds. A `model_fn` seeded with
    `keras.utils.set_random_seed` then builds other weights than the
    clients' if Ray draws in the middle of it. `run_simulation` builds the
    server's model before the engine starts; a server started by the
    engine in another way (Flower's own `run_simulation`, `flwr run` on a
    simulation federation) builds it once Ray is up."""
    if not _is_simulation_grid(grid):
        return
    try:
        import ray
    except ImportError:  # pragma: no cover - the engine needs Ray
        return
    limit = min(float(timeout), ENGINE_START_TIMEOUT)
    start = time.time()
    while not ray.is_initialized():
        if time.time() - start > limit:
            logger.warning("Ray has not started within %.0f s; the server builds its model now.",
                           limit)
            return
        time.sleep(0.05)


def _build_server_model(model_fn):
    """`model_fn()` in a thread of its own, as the server's main would run it
    (Keras keeps its global state, e.g. a dtype policy, per thread)."""
    out = {}

    def build():
        try:
            out["model"] = model_fn()
        except BaseException as e:  # re-raised in the caller's thread
            out["error"] = e

    thread = threading.Thread(target=build, name="keras-lowrank-server-model")
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["model"]


class _ServerModel:
    """The model of a `server_app`: built by `prepare` before Flower's
    simulation engine starts (`run_simulation` calls it), so that nothing
    else in the process draws from Python's global `random` while
    `model_fn` runs; otherwise built by the server's main, after the
    engine has started (see `_wait_for_simulation_engine`)."""

    def __init__(self, model_fn):
        self.model_fn = model_fn
        self._lock = threading.Lock()
        self._ready = None

    def prepare(self):
        """Build the model now, for the next run of the server."""
        model = _build_server_model(self.model_fn)
        with self._lock:
            self._ready = model

    def discard(self):
        with self._lock:
            self._ready = None

    def take(self, grid, timeout):
        """The prepared model, or one built now (once the engine is up)."""
        with self._lock:
            model, self._ready = self._ready, None
        if model is None:
            _wait_for_simulation_engine(grid, timeout)
            model = self.model_fn()
        return model


def run_server(grid, model_fn, settings, evaluate_fn=None, timeout=3600, model=None):
    """The server's work (what `server_app`'s main runs): returns a
    `FederatedResult`. `model`: the server's model if already built (else
    `model_fn()` builds it, once Flower's simulation engine is up)."""
    if model is None:
        _wait_for_simulation_engine(grid, timeout)
        model = model_fn()
    full = exchange.adapter_arrays(model)
    big = exchange.max_rank(model)
    fingerprint = exchange.base_fingerprint(model)
    _wait_for_clients(grid, settings.num_clients, timeout)
    inner = PoissonFedAvg(settings.sampling_rate, settings.clients_per_round,
                          fixed_denominator=settings.private, seed=settings.seed,
                          server_learning_rate=settings.server_learning_rate)
    ledger = None
    if settings.private:
        inner = DifferentialPrivacyClientSideFixedClipping(
            inner, settings.noise_multiplier, settings.clipping_norm,
            num_sampled_clients=max(1, int(round(settings.clients_per_round))),
        )
        # Flower's wrapper computes σC/n from an int n; ours may be fractional
        inner.num_sampled_clients = settings.clients_per_round
        ledger = accounting.Ledger(settings.noise_multiplier, settings.sampling_rate,
                                   settings.delta, settings.accountant)
    layer_ranks = {}
    for e in exchange.adapter_entries(model):
        for name in e.layer.nested_factors:
            layer_ranks[f"{e.key}{exchange.SEP}{name}"] = int(e.layer.rank)
    strategy = RankBroadcast(inner, full, big, layer_ranks, fingerprint, ledger,
                             settings.max_epsilon, seed=None if settings.seed is None else settings.seed + 1)
    evaluations = {}

    def evaluate(server_round, arrays):
        if evaluate_fn is None:
            return None
        exchange.set_adapter_arrays(model, _arrays(arrays))
        metrics = {k: float(v) for k, v in dict(evaluate_fn(model, server_round)).items()}
        evaluations[server_round] = metrics
        return MetricRecord(metrics)

    stopped = None
    try:
        strategy.start(grid=grid, initial_arrays=_record(full), num_rounds=settings.rounds,
                       timeout=timeout, evaluate_fn=evaluate if evaluate_fn else None)
    except PrivacyBudgetExhausted as e:
        stopped = str(e)
        logger.warning("stopped: %s", stopped)
    exchange.set_adapter_arrays(model, strategy.full)
    for entry in strategy.history:
        entry.update(evaluations.get(entry["round"], {}))
    result = FederatedResult(
        model, strategy.history,
        epsilon=None if ledger is None else ledger.epsilon,
        delta=None if ledger is None else ledger.delta,
        noise_multiplier=settings.noise_multiplier if settings.private else 0.0,
        stopped=stopped,
    )
    result.initial_metrics = evaluations.get(0)
    if settings.save_path:
        model.save(settings.save_path)
    return result


def server_app(model_fn, num_clients, clients_per_round, rounds, noise_multiplier=0.0,
               clipping_norm=None, target_epsilon=None, delta=None, max_epsilon=None,
               accountant="rdp", seed=0, rank_sampling="server", evaluate_fn=None,
               save_path=None, on_finish=None, server_learning_rate=1.0, timeout=3600):
    """A Flower `ServerApp` for a (DP-)DyLoRA federation (DP-DyLoRA).

    Args:
        model_fn: `() -> model` with adapters: the same base as the
            clients'. DyLoRA adapters make it DP-DyLoRA (one rank per round,
            drawn by the server); any other method trains at full rank
            (e.g. DP-LoRA).
        num_clients: N, the clients taking part (the server waits for
            them): an int >= 1.
        clients_per_round: n, the expected cohort size, a number in
            (0, N]: each client takes part in a round with probability
            `n / N`.
        rounds: the number of rounds: an int in [1, 10**12].
        noise_multiplier: σ, a finite number >= 0 (> 0 turns on user-level
            DP, with `clipping_norm`); or `target_epsilon` (a finite number
            > 0) to derive σ from ε at `delta` over `rounds`
            (dp-accounting's calibration).
        clipping_norm: C, the bound on each client's update norm: a finite
            number > 0, required under DP.
        delta: δ in (0, 1) (default `N ** -1.1`).
        max_epsilon: `None` (no cap) or a finite number > 0: stop
            (clearly, keeping the model so far) before a round that would
            bring ε above it.
        accountant: `"rdp"` or `"pld"`.
        seed: `None` or an int >= 0: the seed of the server's randomness
            (client sampling, ranks).
        rank_sampling: `"server"`; `"client"` (the naive variant) is
            refused because it breaks the privacy accounting.
        evaluate_fn: optional `(model, round) -> {name: value}`, run on the
            server's model before the first round and after each.
        save_path: save the final model there (a path ending in `.keras`).
        on_finish: optional callable receiving the `FederatedResult`.
        server_learning_rate: η > 0, the step the server takes along the
            (noised) average update (1: FedAvg; a post-processing, so it
            costs no privacy).
        timeout: seconds (a finite number > 0) to wait for the clients to
            connect and for each round's replies.

    Every argument is checked before anything runs (and under DP the whole
    run's ε accounted once): a value of the wrong kind (`"5"`, `True`,
    `2.5` for an int) raises a `TypeError`, a value out of range or not
    finite a `ValueError`, both naming the argument and the value.

    The run config of `flwr run` (keys `rounds`, `clients-per-round`,
    `num-clients`, `noise-multiplier`, `clipping-norm`, `target-epsilon`,
    `delta`, `max-epsilon`, `seed`, `accountant`, `save-path`,
    `server-learning-rate`) overrides these, checked the same way when the
    run starts.

    The server builds its model with `model_fn` once per run: under
    `run_simulation` before Flower's simulation engine starts, so that
    nothing else draws from Python's global `random` (which Keras seeds
    unseeded initializers from) while it runs.
    """
    where = "server_app"
    arguments.function(where, "model_fn", model_fn)
    arguments.function(where, "evaluate_fn", evaluate_fn, none=True)
    arguments.function(where, "on_finish", on_finish, none=True)
    timeout = arguments.number(where, "timeout", timeout, 0, None, low_open=True)
    settings = Settings(num_clients, clients_per_round, rounds, noise_multiplier, clipping_norm,
                        target_epsilon, delta, max_epsilon, accountant, seed, rank_sampling,
                        save_path, server_learning_rate)
    server_model = _ServerModel(model_fn)
    app = ServerApp()

    @app.main()
    def main(grid, context):
        run_settings = settings.with_run_config(context.run_config or {})
        model = server_model.take(grid, timeout)
        result = run_server(grid, model_fn, run_settings, evaluate_fn=evaluate_fn, timeout=timeout,
                            model=model)
        if on_finish is not None:
            on_finish(result)

    app.settings = settings
    app.server_model = server_model
    return app


def run_simulation(server, client, num_clients, cpus_per_client=1, verbose=False):
    """Run a federation in Flower's simulation engine (Ray) on this machine:
    `num_clients` virtual SuperNodes run `client`, each with its own
    `partition-id`. The Keras backend of this process is the workers'.

    Args:
        server: a Flower `ServerApp` (`server_app(...)`).
        client: a Flower `ClientApp` (`client_app(...)`).
        num_clients: the virtual SuperNodes: an int >= 1, at least the
            server's `num_clients` (it waits for that many).
        cpus_per_client: the CPUs Ray reserves for each client: a finite
            number > 0.
        verbose: Flower's verbose logging (`True`/`False`).

    A `server_app`'s model is built here, before the engine starts (see
    `server_app`).
    """
    where = "run_simulation"
    if not isinstance(server, ServerApp):
        raise TypeError(f"{where}: server must be a Flower ServerApp (server_app(...)); "
                        f"received server={server!r}.")
    if not isinstance(client, ClientApp):
        raise TypeError(f"{where}: client must be a Flower ClientApp (client_app(...)); "
                        f"received client={client!r}.")
    num_clients = arguments.number(where, "num_clients", num_clients, 1, None, integer=True)
    cpus_per_client = arguments.number(where, "cpus_per_client", cpus_per_client, 0, None,
                                     low_open=True)
    verbose = arguments.flag(where, "verbose", verbose)
    settings = getattr(server, "settings", None)
    if isinstance(settings, Settings) and num_clients < settings.num_clients:
        raise ValueError(
            f"{where}: num_clients={num_clients} is below the server's num_clients="
            f"{settings.num_clients}, which it waits for; give at least {settings.num_clients}."
        )
    from flwr.simulation import run_simulation as flower_run_simulation

    server_model = getattr(server, "server_model", None)
    if isinstance(server_model, _ServerModel):
        # before the engine starts: nothing else draws from `random` meanwhile
        server_model.prepare()
    os.environ["KERAS_BACKEND"] = keras.backend.backend()
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    quiet = _NoDeprecation()
    flower = logging.getLogger("flwr")
    flower.addFilter(quiet)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            flower_run_simulation(
                server_app=server,
                client_app=client,
                num_supernodes=num_clients,
                backend_config={"client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0}},
                verbose_logging=verbose,
            )
    finally:
        flower.removeFilter(quiet)
        if isinstance(server_model, _ServerModel):
            server_model.discard()
