"""DP-DyLoRA federations: accounting, what clients send, the server's
noise, and whole federations, in this process (a Grid that runs the
ClientApp in-process) and in Flower's simulation engine (Ray workers: the
example script in a child process, and tiny federations in this one)."""

import json
import logging
import math
import os
import random
import subprocess
import sys
import threading
import time

import dp_accounting
import keras
import numpy as np
import pytest
from flwr.app import Array
from flwr.app import ArrayRecord
from flwr.app import ConfigRecord
from flwr.app import Message
from flwr.app import MetricRecord
from flwr.app import RecordDict
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping

import keras_lowrank as kl
from keras_lowrank import federated
from keras_lowrank.federated import apps

from conftest import BACKEND
from flower_grid import InProcessGrid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
logging.getLogger("flwr").setLevel(logging.WARNING)


# ---------------------------------------------------------------------------
# Accounting


@pytest.mark.one_backend  # accounting and argument checks: no backend op
@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_privacy_budget_is_dp_accounting(accountant):
    sigma, q, rounds, delta = 1.1, 0.05, 30, 1e-5
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), rounds
    )
    if accountant == "rdp":
        direct = dp_accounting.rdp.RdpAccountant(list(federated.accounting.RDP_ORDERS))
    else:
        direct = dp_accounting.pld.PLDAccountant()
    expected = direct.compose(event).get_epsilon(delta)
    got = federated.privacy_budget(sigma, q, rounds, delta, accountant=accountant)
    assert got == pytest.approx(expected, rel=1e-9)
    # PLD is the tighter of the two
    if accountant == "pld":
        assert got <= federated.privacy_budget(sigma, q, rounds, delta, accountant="rdp")


@pytest.mark.one_backend  # accounting and argument checks: no backend op
def test_epsilon_falls_as_noise_grows():
    eps = [federated.privacy_budget(s, 0.1, 20, 1e-5) for s in (0.6, 0.8, 1.0, 1.5, 3.0)]
    assert all(a > b for a, b in zip(eps, eps[1:])), eps
    # and grows with rounds and with the sampling rate
    assert federated.privacy_budget(1.0, 0.1, 40, 1e-5) > eps[2]
    assert federated.privacy_budget(1.0, 0.2, 20, 1e-5) > eps[2]
    assert federated.privacy_budget(1.0, 0.1, 0, 1e-5) == 0.0


@pytest.mark.one_backend  # accounting and argument checks: no backend op
@pytest.mark.parametrize("accountant,target", [("rdp", 2.0), ("rdp", 8.0), ("pld", 2.0)])
def test_noise_for_epsilon_round_trips(accountant, target):
    q, rounds, delta = 0.1, 10, 1e-5
    sigma = federated.noise_for_epsilon(target, q, rounds, delta, accountant=accountant)
    eps = federated.privacy_budget(sigma, q, rounds, delta, accountant=accountant)
    assert eps == pytest.approx(target, rel=0.01)
    assert eps <= target * (1 + 1e-6)  # the calibrated σ spends at most the target


def refused(error, where, name, value):
    """`pytest.raises(error)` for a refusal whose message names the
    function, the argument and the value (as `repr` writes it)."""
    import re

    return pytest.raises(error, match=rf"^{re.escape(where)}: .*{re.escape(f'{name}={value!r}')}")


BAD_NUMBERS = [  # (value, error) for an argument that needs a positive finite number
    (float("nan"), ValueError), (-1.0, ValueError), (0, ValueError), (float("inf"), ValueError),
    ("5", TypeError), (True, TypeError), (None, TypeError),
]


@pytest.mark.one_backend  # accounting and argument checks: no backend op
@pytest.mark.parametrize("name,value,error", [
    *[("noise_multiplier", v, e) for v, e in BAD_NUMBERS],
    ("noise_multiplier", 1e-300, ValueError),  # was a ZeroDivisionError in dp-accounting
    ("sampling_rate", 1.5, ValueError), ("sampling_rate", 0.0, ValueError),
    ("sampling_rate", float("nan"), ValueError), ("sampling_rate", "0.1", TypeError),
    ("rounds", -1, ValueError), ("rounds", 2.5, TypeError), ("rounds", 10.0, TypeError),
    ("rounds", True, TypeError), ("rounds", "10", TypeError), ("rounds", 10**400, ValueError),
    ("delta", 1.0, ValueError), ("delta", 0.0, ValueError), ("delta", float("nan"), ValueError),
    ("delta", "1e-5", TypeError),
    ("accountant", "moments", ValueError), ("accountant", None, ValueError),
])
def test_privacy_budget_refuses_bad_values(name, value, error):
    args = {"noise_multiplier": 1.0, "sampling_rate": 0.1, "rounds": 10, "delta": 1e-5}
    args[name] = value
    with refused(error, "privacy_budget", name, value):
        federated.privacy_budget(**args)


@pytest.mark.one_backend  # accounting and argument checks: no backend op
@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_privacy_budget_at_extreme_values(accountant):
    """A huge σ gives ε = 0 (it overflowed); a σ too small to account, a PLD
    too large for memory (a MemoryError after minutes), a δ below the PLD's
    truncated tail (ε = inf) are refused, naming the values."""
    assert federated.privacy_budget(1e300, 0.1, 10, 1e-5, accountant) == 0.0
    assert federated.privacy_budget(float(np.finfo(np.float64).max), 0.1, 10, 1e-5, accountant) == 0.0
    # many rounds of a huge σ: dp-accounting's sparse PLD composition computed
    # `size ** rounds` and never returned
    assert federated.privacy_budget(1e100, 0.5, 10**12, 1e-5, accountant) == 0.0
    assert federated.privacy_budget(3.0, 1e-300, 10, 1e-5, accountant) == 0.0
    with refused(ValueError, "privacy_budget", "noise_multiplier", 1e-300):
        federated.privacy_budget(1e-300, 0.1, 10, 1e-5, accountant)
    if accountant == "rdp":
        assert math.isfinite(federated.privacy_budget(1e-100, 0.5, 10**12, 5e-324, "rdp"))
        assert federated.privacy_budget(1.0, 0.1, 10**12, 1e-5, "rdp") > 1e9
        return
    for sigma, q, rounds in [(1e-3, 0.1, 10), (1.0, 0.1, 10**6), (1.0, 1.0, 10**6)]:
        with pytest.raises(ValueError, match=rf"^privacy_budget: the PLD accountant cannot account "
                                             rf"noise_multiplier={sigma!r}, sampling_rate={q!r}, "
                                             rf"rounds={rounds!r}.*accountant='rdp'"):
            federated.privacy_budget(sigma, q, rounds, 1e-5, "pld")
    with pytest.raises(ValueError, match=r"^privacy_budget: .*no finite epsilon.*delta=1e-100"):
        federated.privacy_budget(1.0, 0.1, 10, 1e-100, "pld")


@pytest.mark.one_backend  # accounting and argument checks: no backend op
@pytest.mark.parametrize("name,value,error", [
    *[("target_epsilon", v, e) for v, e in BAD_NUMBERS],
    ("sampling_rate", 2, ValueError), ("rounds", 0, ValueError), ("rounds", 1.5, TypeError),
    ("delta", -1e-5, ValueError), ("accountant", "gdp", ValueError),
])
def test_noise_for_epsilon_refuses_bad_values(name, value, error):
    args = {"target_epsilon": 2.0, "sampling_rate": 0.1, "rounds": 10, "delta": 1e-5}
    args[name] = value
    with refused(error, "noise_for_epsilon", name, value):
        federated.noise_for_epsilon(**args)


@pytest.mark.one_backend  # accounting and argument checks: no backend op
def test_noise_for_epsilon_at_extreme_targets():
    # a tiny target: the smallest σ whose ε is 0 to the accountant
    sigma = federated.noise_for_epsilon(1e-300, 0.1, 10, 1e-5)
    assert 1e3 < sigma < 1e6 and federated.privacy_budget(sigma, 0.1, 10, 1e-5) == 0.0
    # a target no noise reaches (at δ = 5e-324 RDP's ε keeps a floor)
    with pytest.raises(ValueError, match=r"^noise_for_epsilon: target_epsilon=0.01 is below the "
                                         r"epsilon of any noise"):
        federated.noise_for_epsilon(0.01, 1.0, 10, 5e-324)


@pytest.mark.one_backend  # accounting and argument checks: no backend op
def test_noise_for_epsilon_refuses_a_budget_with_no_privacy():
    with pytest.raises(ValueError, match="next to no privacy"):
        federated.noise_for_epsilon(1e6, 0.1, 10, 1e-5)


# ---------------------------------------------------------------------------
# The model, the data


def model_fn(method="dylora", rank=4, seed=0):
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([
        keras.Input((6,)),
        keras.layers.Dense(12, activation="relu", name="hidden"),
        keras.layers.Dense(12, name="middle"),
        keras.layers.Dense(3, name="logits"),
    ])
    options = {"frozen": False} if method == "dylora" else {}
    kl.enable_adapter(model, method=method, rank=rank, targets=["hidden", "middle"], **options)
    model.compile(optimizer=keras.optimizers.Adam(0.05),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def data_fn(partition, partitions):
    rng = np.random.default_rng(partition)
    x = rng.normal(size=(16, 6)).astype("float32") + partition % 3  # non-IID
    y = ((x[:, 0] > x[:, 1]).astype("int32") + (x[:, 2] > partition % 3)).astype("int32")
    return x, y


def evaluate_fn(model, server_round):
    x, y = data_fn(999, 1)
    return model.evaluate(x, y, verbose=0, return_dict=True)


# ---------------------------------------------------------------------------
# What is exchanged


def test_adapter_arrays_cut_to_the_rank():
    model = model_fn(rank=4)
    full = federated.adapter_arrays(model)
    assert sorted(full) == ["hidden/lora_a", "hidden/lora_b", "middle/lora_a", "middle/lora_b"]
    cut = federated.adapter_arrays(model, rank=2)
    assert cut["hidden/lora_a"].shape == (2, 6) and cut["hidden/lora_b"].shape == (2, 12)
    np.testing.assert_array_equal(cut["middle/lora_b"], full["middle/lora_b"][:2])
    # writing a rank-2 slice keeps the components above 2
    new = {k: v + 1.0 for k, v in cut.items()}
    federated.set_adapter_arrays(model, new, rank=2)
    after = federated.adapter_arrays(model)
    np.testing.assert_allclose(after["hidden/lora_a"][:2], full["hidden/lora_a"][:2] + 1)
    np.testing.assert_array_equal(after["hidden/lora_a"][2:], full["hidden/lora_a"][2:])


def test_set_adapter_arrays_checks_before_writing():
    model = model_fn(rank=4)
    before = federated.adapter_arrays(model)
    bad = dict(federated.adapter_arrays(model, rank=2))
    bad["middle/lora_b"] = np.zeros((3, 12), "float32")
    with pytest.raises(ValueError, match=r"'middle/lora_b' has shape \(3, 12\)"):
        federated.set_adapter_arrays(model, bad, rank=2)
    wrong = dict(before)
    wrong["logits/kernel"] = np.zeros((12, 3), "float32")
    with pytest.raises(ValueError, match="unexpected: \\['logits/kernel'\\]"):
        federated.set_adapter_arrays(model, wrong)
    with pytest.raises(ValueError, match="rank must be None or an int in \\[1, 4\\]"):
        federated.adapter_arrays(model, rank=5)
    after = federated.adapter_arrays(model)
    for k in before:
        np.testing.assert_array_equal(after[k], before[k])


def _round_message(model, rank, clip=None, fingerprint=None):
    """A server's training message, as `RankBroadcast` builds it."""
    config = ConfigRecord({apps.KEY_BASE: fingerprint or federated.base_fingerprint(model)})
    if rank is not None:
        config[apps.KEY_RANK] = rank
    if clip is not None:
        config[apps.KEY_CLIP] = clip
    arrays = ArrayRecord({k: Array(v) for k, v in federated.adapter_arrays(model, rank).items()})
    return arrays, config


def _client_round(client, arrays, config, node=1):
    grid = InProcessGrid(client, num_nodes=4)
    strategy = apps.PoissonFedAvg(1.0, 4, fixed_denominator=False)
    messages = [m for m in strategy.configure_train(1, arrays, config, grid)
                if m.metadata.dst_node_id == node]
    (reply,) = grid.send_and_receive(messages)
    return reply


def test_a_client_sends_only_its_clipped_rank_slice():
    server_model = model_fn(rank=4)
    client = federated.client_app(model_fn, data_fn, epochs=3, batch_size=8)
    arrays, config = _round_message(server_model, rank=2, clip=0.05)
    reply = _client_round(client, arrays, config)
    assert not reply.has_error(), reply.error
    sent = {k: v.numpy() for k, v in arrays.items()}
    got = {k: v.numpy() for k, v in reply.content["arrays"].items()}
    # adapter slices of rank 2 only: no base weight, no component above 2
    assert list(got) == list(sent)
    assert all(k.endswith(("/lora_a", "/lora_b")) for k in got)
    assert all(got[k].shape[0] == 2 for k in got)
    norm = federated.exchange.update_norm(got, sent)
    assert 0.05 - 1e-4 < norm <= 0.05 + 1e-6  # trained, then clipped to C
    assert set(reply.content["metrics"]) >= {apps.KEY_EXAMPLES, apps.KEY_LOSS}


def test_a_client_without_clipping_norm_sends_its_whole_update():
    server_model = model_fn(rank=4)
    client = federated.client_app(model_fn, data_fn, epochs=3, batch_size=8)
    arrays, config = _round_message(server_model, rank=3)
    reply = _client_round(client, arrays, config)
    got = {k: v.numpy() for k, v in reply.content["arrays"].items()}
    sent = {k: v.numpy() for k, v in arrays.items()}
    assert got["hidden/lora_a"].shape == (3, 6)
    assert federated.exchange.update_norm(got, sent) > 0.1


def test_a_client_trains_at_the_broadcast_rank_only():
    """Components above the round's rank get no update (they are not even
    in the message), and the model's rank draw resumes after the round."""
    model = model_fn(rank=4)
    fp = federated.base_fingerprint(model)
    arrays, config = _round_message(model, rank=1)
    content = RecordDict({"arrays": arrays, "config": config})
    before = federated.adapter_arrays(model)
    out, metrics = apps.train_client(model, fp, content, data_fn(0, 1), epochs=2, batch_size=8)
    after = federated.adapter_arrays(model)
    assert out["hidden/lora_a"].shape == (1, 6)
    np.testing.assert_array_equal(after["hidden/lora_a"][1:], before["hidden/lora_a"][1:])
    np.testing.assert_array_equal(after["middle/lora_b"][1:], before["middle/lora_b"][1:])
    assert np.abs(after["hidden/lora_a"][0] - before["hidden/lora_a"][0]).max() > 0
    assert int(keras.ops.convert_to_numpy(kl.shared.get(model, "dylora").fixed_rank)) == 0
    assert metrics[apps.KEY_EXAMPLES] == 16


def test_a_dylora_client_refuses_to_draw_its_own_rank():
    server_model = model_fn(rank=4)
    client = federated.client_app(model_fn, data_fn)
    arrays, config = _round_message(server_model, rank=None)
    reply = _client_round(client, arrays, config)
    assert reply.has_error()
    assert "server sent no rank" in reply.error.reason and "privacy accounting" in reply.error.reason


def test_a_client_refuses_another_base():
    server_model = model_fn(rank=4)
    client = federated.client_app(model_fn, data_fn)
    arrays, config = _round_message(server_model, rank=2, fingerprint="0" * 64)
    reply = _client_round(client, arrays, config)
    assert reply.has_error() and "base weights differ" in reply.error.reason


def test_the_naive_variant_is_refused():
    with pytest.raises(ValueError, match="rank_sampling='client' is refused.*privacy accounting"):
        federated.server_app(model_fn, num_clients=10, clients_per_round=2, rounds=2,
                             noise_multiplier=1.0, clipping_norm=1.0, rank_sampling="client")


@pytest.mark.parametrize("kwargs,match", [
    ({"clients_per_round": 20}, "clients_per_round"),
    ({"rounds": 0}, r"rounds must be an int in \[1, "),
    ({"noise_multiplier": 1.0}, "needs a clipping_norm"),
    ({"clipping_norm": 1.0}, "belong to differential privacy"),
    ({"max_epsilon": 5.0}, "belong to differential privacy"),
    ({"noise_multiplier": 1.0, "target_epsilon": 2.0, "clipping_norm": 1.0}, "not both"),
    ({"accountant": "gdp"}, "accountant"),
])
def test_server_app_refuses_bad_settings(kwargs, match):
    args = {"num_clients": 10, "clients_per_round": 2, "rounds": 2}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        federated.server_app(model_fn, **args)


DP = {"num_clients": 10, "clients_per_round": 2, "rounds": 2, "noise_multiplier": 1.0,
      "clipping_norm": 1.0}


@pytest.mark.one_backend  # accounting and argument checks: no backend op
@pytest.mark.parametrize("name,value,error", [
    *[("max_epsilon", v, e) for v, e in BAD_NUMBERS if v is not None],  # None: no cap
    *[("clipping_norm", v, e) for v, e in BAD_NUMBERS if v is not None],
    *[("server_learning_rate", v, e) for v, e in BAD_NUMBERS],
    *[("timeout", v, e) for v, e in BAD_NUMBERS],
    ("noise_multiplier", float("nan"), ValueError), ("noise_multiplier", -1.0, ValueError),
    ("noise_multiplier", float("inf"), ValueError), ("noise_multiplier", "1.0", TypeError),
    ("noise_multiplier", 1e-300, ValueError),
    ("target_epsilon", float("nan"), ValueError), ("target_epsilon", 0.0, ValueError),
    ("num_clients", 0, ValueError), ("num_clients", 2.5, TypeError), ("num_clients", True, TypeError),
    ("num_clients", "10", TypeError),
    ("clients_per_round", float("nan"), ValueError), ("clients_per_round", 0, ValueError),
    ("clients_per_round", 11, ValueError), ("clients_per_round", "2", TypeError),
    ("rounds", 0, ValueError), ("rounds", 2.5, TypeError), ("rounds", "2", TypeError),
    ("delta", 0.0, ValueError), ("delta", 1.0, ValueError), ("delta", float("nan"), ValueError),
    ("seed", -1, ValueError), ("seed", 1.5, TypeError), ("seed", "0", TypeError),
    ("accountant", 3, ValueError), ("save_path", 3, TypeError), ("save_path", "model.h5", ValueError),
    ("model_fn", None, TypeError), ("evaluate_fn", 3, TypeError), ("on_finish", "print", TypeError),
])
def test_server_app_checks_every_argument(name, value, error):
    """Each refused before anything runs, naming the argument and the value
    (a NaN max_epsilon used to be accepted and the cap silently ignored)."""
    args = dict(DP, model_fn=model_fn)
    args[name] = value
    with refused(error, "server_app", name, value):
        federated.server_app(**args)


def test_a_nan_max_epsilon_from_the_run_config_is_refused_when_the_run_starts():
    settings = federated.server_app(model_fn, **DP, max_epsilon=3.0).settings
    assert settings.with_run_config({"max-epsilon": 2.0}).max_epsilon == 2.0
    with pytest.raises(ValueError, match=r"^server_app: max_epsilon must be .*max_epsilon=nan.*"
                                         r"\(the run config set max-epsilon\)"):
        settings.with_run_config({"max-epsilon": float("nan")})
    with pytest.raises(TypeError, match=r"max_epsilon='5'"):
        settings.with_run_config({"max-epsilon": "5"})


@pytest.mark.one_backend  # accounting and argument checks: no backend op
def test_a_pld_run_too_large_to_account_is_refused_by_server_app():
    with pytest.raises(ValueError, match=r"^server_app: the PLD accountant cannot account "
                                         r"noise_multiplier=0.01"):
        federated.server_app(model_fn, **dict(DP, noise_multiplier=0.01), accountant="pld")


@pytest.mark.parametrize("name,value,error", [
    ("epochs", 0, ValueError), ("epochs", -1, ValueError), ("epochs", float("nan"), TypeError),
    ("epochs", 2.5, TypeError), ("epochs", True, TypeError), ("epochs", "1", TypeError),
    ("batch_size", 0, ValueError), ("batch_size", 2.5, TypeError), ("batch_size", None, TypeError),
    ("seed", -1, ValueError), ("seed", 1.5, TypeError),
    ("model_fn", "model", TypeError), ("data_fn", None, TypeError),
])
def test_client_app_checks_every_argument(name, value, error):
    args = {"model_fn": model_fn, "data_fn": data_fn}
    args[name] = value
    with refused(error, "client_app", name, value):
        federated.client_app(**args)


def test_train_client_checks_its_numbers():
    model = model_fn(rank=4)
    fp = federated.base_fingerprint(model)
    arrays, config = _round_message(model, rank=2)
    content = RecordDict({"arrays": arrays, "config": config})
    before = federated.adapter_arrays(model)
    for name, value, error in [("epochs", 0, ValueError), ("batch_size", 2.5, TypeError)]:
        with refused(error, "train_client", name, value):
            apps.train_client(model, fp, content, data_fn(0, 1), **{name: value})
    for k, v in federated.adapter_arrays(model).items():
        np.testing.assert_array_equal(v, before[k])


@pytest.mark.one_backend  # accounting and argument checks: no backend op
def test_run_simulation_checks_its_arguments_before_anything_runs():
    built = []

    def counting_model_fn():
        built.append(1)
        return model_fn("lora", rank=2)

    server = federated.server_app(counting_model_fn, num_clients=3, clients_per_round=2, rounds=1)
    client = federated.client_app(counting_model_fn, data_fn)
    for kwargs, error, where in [
        ({"num_clients": 0}, ValueError, ("num_clients", 0)),
        ({"num_clients": 2.5}, TypeError, ("num_clients", 2.5)),
        ({"num_clients": 3, "cpus_per_client": 0}, ValueError, ("cpus_per_client", 0)),
        ({"num_clients": 3, "cpus_per_client": float("nan")}, ValueError,
         ("cpus_per_client", float("nan"))),
        ({"num_clients": 3, "cpus_per_client": "1"}, TypeError, ("cpus_per_client", "1")),
        ({"num_clients": 3, "verbose": "yes"}, TypeError, ("verbose", "yes")),
    ]:
        with refused(error, "run_simulation", *where):
            federated.run_simulation(server, client, **kwargs)
    with pytest.raises(ValueError, match=r"^run_simulation: num_clients=2 is below the server's "
                                         r"num_clients=3"):
        federated.run_simulation(server, client, num_clients=2)
    with pytest.raises(TypeError, match=r"^run_simulation: server must be a Flower ServerApp"):
        federated.run_simulation(client, client, num_clients=3)
    assert not built  # nothing was built, no engine started


@pytest.mark.one_backend  # accounting and argument checks: no backend op
def test_the_strategies_check_their_numbers():
    with refused(ValueError, "PoissonFedAvg", "sampling_rate", float("nan")):
        apps.PoissonFedAvg(float("nan"), 4, True)
    with refused(ValueError, "PoissonFedAvg", "expected_cohort", 0):
        apps.PoissonFedAvg(0.5, 0, True)
    with refused(ValueError, "PoissonFedAvg", "seed", -1):
        apps.PoissonFedAvg(0.5, 4, True, seed=-1)
    with refused(TypeError, "PoissonFedAvg", "fixed_denominator", "yes"):
        apps.PoissonFedAvg(0.5, 4, "yes")
    with refused(ValueError, "RankBroadcast", "max_epsilon", float("nan")):
        apps.RankBroadcast(None, {}, 4, {}, "", max_epsilon=float("nan"))


def test_the_exchange_checks_its_arguments():
    model = model_fn(rank=4)
    before = federated.adapter_arrays(model)
    for rank, error in [(2.0, TypeError), (True, TypeError), ("2", TypeError), (0, ValueError),
                        (5, ValueError)]:
        with refused(error, "adapter_arrays", "rank", rank):
            federated.adapter_arrays(model, rank=rank)
        with refused(error, "set_adapter_arrays", "rank", rank):
            federated.set_adapter_arrays(model, before, rank=rank)
    with pytest.raises(TypeError, match=r"^set_adapter_arrays: arrays must be a dict"):
        federated.set_adapter_arrays(model, list(before.values()))
    bad = dict(before, **{"hidden/lora_a": before["hidden/lora_a"].astype(str)})
    with pytest.raises(TypeError, match=r"^set_adapter_arrays: .*'hidden/lora_a' must hold real numbers"):
        federated.set_adapter_arrays(model, bad)
    with pytest.raises(TypeError, match=r"^base_fingerprint: model must be a Keras model"):
        federated.base_fingerprint("model")
    for k, v in federated.adapter_arrays(model).items():
        np.testing.assert_array_equal(v, before[k])


# ---------------------------------------------------------------------------
# The server's aggregate


def _reply(arrays, n=8):
    """A client's reply carrying `arrays` (a dict)."""
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(np.asarray(v, "float32")) for k, v in arrays.items()}),
        "metrics": MetricRecord({apps.KEY_EXAMPLES: n, apps.KEY_WEIGHT: 1}),
    })
    return Message(content=content, dst_node_id=0, message_type="train")


def test_noise_on_the_aggregate_has_std_sigma_c_over_n():
    sigma, clip, n = 1.3, 0.7, 8.0
    inner = apps.PoissonFedAvg(0.5, n, fixed_denominator=True, seed=0)
    dp = DifferentialPrivacyClientSideFixedClipping(inner, sigma, clip, num_sampled_clients=8)
    current = {"w": np.zeros(40_000, "float32"), "v": np.full((10, 100), 2.0, "float32")}
    InProcessGrid(None, 0)  # sets the run identity messages need
    list(dp.configure_train(1, ArrayRecord({k: Array(v) for k, v in current.items()}),
                            ConfigRecord(), InProcessGrid(None, 0)))
    np.random.seed(0)  # Flower draws its noise from NumPy's global generator
    # five clients sending back exactly what they got: the aggregate is the
    # current arrays plus the noise alone
    agg, _ = dp.aggregate_train(1, [_reply(current) for _ in range(5)])
    out = {k: v.numpy() for k, v in agg.items()}
    noise = np.concatenate([(out[k] - current[k]).ravel() for k in current])
    expected = sigma * clip / n
    assert np.std(noise) == pytest.approx(expected, rel=0.02)
    assert abs(np.mean(noise)) < 4 * expected / np.sqrt(noise.size)


def test_the_average_divides_by_the_expected_cohort():
    inner = apps.PoissonFedAvg(0.5, 4.0, fixed_denominator=True, seed=0)
    current = {"w": np.zeros(3, "float32")}
    list(inner.configure_train(1, ArrayRecord({"w": Array(current["w"])}), ConfigRecord(),
                               InProcessGrid(None, 0)))
    agg, metrics = inner.aggregate_train(1, [_reply({"w": np.ones(3)}), _reply({"w": np.ones(3)})])
    np.testing.assert_allclose(agg["w"].numpy(), 0.5)  # (1 + 1) / 4, not their mean
    assert metrics["clients"] == 2


def test_poisson_sampling_is_seeded_and_has_the_expected_size():
    grid = InProcessGrid(None, 200)
    arrays = ArrayRecord({"w": Array(np.zeros(2, "float32"))})
    sizes = []
    a, b = apps.PoissonFedAvg(0.1, 20, True, seed=3), apps.PoissonFedAvg(0.1, 20, True, seed=3)
    for r in range(40):
        ma = [m.metadata.dst_node_id for m in a.configure_train(r, arrays, ConfigRecord(), grid)]
        mb = [m.metadata.dst_node_id for m in b.configure_train(r, arrays, ConfigRecord(), grid)]
        assert ma == mb
        sizes.append(len(ma))
    assert np.mean(sizes) == pytest.approx(20, rel=0.15)
    assert len(set(sizes)) > 1  # the cohort size varies (Poisson sampling)


# ---------------------------------------------------------------------------
# Whole federations, in process


def _federate(tmp_path=None, **kwargs):
    args = dict(num_clients=12, clients_per_round=4, rounds=4, noise_multiplier=0.8,
                clipping_norm=0.5, seed=1)
    args.update(kwargs)
    settings = apps.Settings(**args)
    client = federated.client_app(model_fn, data_fn, epochs=2, batch_size=8)
    grid = InProcessGrid(client, settings.num_clients)
    result = apps.run_server(grid, model_fn, settings, evaluate_fn=evaluate_fn)
    return result, grid


def test_a_dp_dylora_federation(tmp_path):
    result, grid = _federate()
    history = result.history
    assert [h["round"] for h in history] == [1, 2, 3, 4]
    # one server-drawn rank per round, the same for every client of the round
    for h in history:
        ranks = {m.content["config"][apps.KEY_RANK] for m in grid.sent
                 if m.content["config"]["server-round"] == h["round"]}
        assert ranks <= {h["rank"]}
        # every client's update within the clipping norm
        assert h["max-update-norm"] <= 0.5 + 1e-6
    for reply in grid.replies:
        assert not reply.has_error(), reply.error
        keys = list(reply.content["arrays"])
        assert all(k.endswith(("/lora_a", "/lora_b")) for k in keys)
    # ε after each round, from the ledger, as dp-accounting gives it
    eps = [h["epsilon"] for h in history]
    assert all(a < b for a, b in zip(eps, eps[1:]))
    assert eps[-1] == pytest.approx(federated.privacy_budget(0.8, 4 / 12, 4, 12 ** -1.1), rel=1e-9)
    assert result.epsilon == eps[-1] and result.stopped is None
    # the server's model is an ordinary keras-lowrank model: any rank, save, merge
    model = result.model
    x, y = data_fn(999, 1)
    by_rank = kl.dylora.evaluate_ranks(model, x, y, verbose=0)
    assert sorted(by_rank) == [1, 2, 3, 4]
    path = str(tmp_path / "server.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(reloaded.predict(x, verbose=0)),
                               keras.ops.convert_to_numpy(model.predict(x, verbose=0)), atol=1e-5)
    for k, v in federated.adapter_arrays(reloaded).items():
        np.testing.assert_array_equal(v, federated.adapter_arrays(model)[k])
    expected = keras.ops.convert_to_numpy(model.predict(x, verbose=0))
    kl.merge(model)
    assert not kl.adapters(model)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model.predict(x, verbose=0)), expected,
                               atol=1e-4)


def test_a_federation_without_dp_learns():
    result, _ = _federate(noise_multiplier=0.0, clipping_norm=None, rounds=6, clients_per_round=6)
    assert result.epsilon is None and all("epsilon" not in h for h in result.history)
    first = result.initial_metrics["loss"]
    last = result.history[-1]["loss"]
    assert last < 0.8 * first, (first, last)


def test_max_epsilon_stops_the_federation_before_the_round_that_exceeds_it():
    eps2 = federated.privacy_budget(0.8, 4 / 12, 2, 12 ** -1.1)
    eps3 = federated.privacy_budget(0.8, 4 / 12, 3, 12 ** -1.1)
    result, grid = _federate(max_epsilon=(eps2 + eps3) / 2)
    assert len(result.history) == 2
    assert "would bring epsilon" in result.stopped and "max_epsilon" in result.stopped
    assert result.epsilon == pytest.approx(eps2) and result.epsilon <= (eps2 + eps3) / 2
    assert {m.content["config"]["server-round"] for m in grid.sent} <= {1, 2}
    assert len(kl.adapters(result.model)) == 2  # the model after round 2


def test_a_target_epsilon_sets_the_noise():
    result, _ = _federate(noise_multiplier=0.0, target_epsilon=3.0, rounds=3)
    assert result.noise_multiplier == pytest.approx(
        federated.noise_for_epsilon(3.0, 4 / 12, 3, 12 ** -1.1), rel=1e-9)
    assert result.epsilon == pytest.approx(3.0, rel=0.01)


def test_dp_lora_sends_the_whole_adapter():
    def lora_fn():
        return model_fn("lora", rank=2)

    settings = apps.Settings(num_clients=6, clients_per_round=3, rounds=2, noise_multiplier=1.0,
                             clipping_norm=0.5)
    client = federated.client_app(lora_fn, data_fn)
    grid = InProcessGrid(client, 6)
    result = apps.run_server(grid, lora_fn, settings)
    assert all(h["rank"] is None for h in result.history)
    for m in grid.sent:
        assert apps.KEY_RANK not in m.content["config"]
        assert tuple(m.content["arrays"]["hidden/lora_a"].shape) == (2, 6)


# ---------------------------------------------------------------------------
# Flower's simulation engine


@pytest.mark.one_backend
def test_the_example_federation_runs_in_flowers_simulation_engine(tmp_path):
    """`examples/federated_dp_dylora.py --small`: a tiny KerasHub Gemma, 20
    clients in Flower's simulation engine (Ray workers), DP at ε = 8, then
    the server's model at every rank, reloaded and merged."""
    env = dict(os.environ, KERAS_BACKEND=BACKEND)
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "federated_dp_dylora.py"), "--small",
         "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["backend"] == BACKEND
    assert summary["rounds"] == 3 and len(summary["ranks"]) == 3
    assert summary["epsilon"] == pytest.approx(8.0, rel=0.01)
    assert summary["max_update_norm"] <= 0.5 + 1e-6
    assert sorted(summary["accuracy_by_rank"], key=int) == [str(r) for r in range(1, 9)]
    assert summary["reload_diff"] <= 1e-5


def test_fix_train_rank_checks_its_rank():
    model = model_fn(rank=4)
    for bad in (0, 5, 2.0, True):
        with pytest.raises(ValueError, match=r"fix_train_rank: rank must be None or an int in \[1, 4\]"):
            kl.dylora.fix_train_rank(model, bad)
    kl.dylora.fix_train_rank(model, 3)
    kl.dylora.fix_train_rank(model, None)
    assert int(keras.ops.convert_to_numpy(kl.shared.get(model, "dylora").fixed_rank)) == 0


def test_the_flower_app_for_flwr_run_is_valid(monkeypatch):
    """examples/federated_app: Flower accepts its pyproject.toml as an app
    config, and its components are our ServerApp and ClientApp (the
    deployment itself, SuperLink + SuperNodes + `flwr run`, is in
    docs/federated.md)."""
    from pathlib import Path

    from flwr.clientapp import ClientApp
    from flwr.cli.config_utils import load_and_validate
    from flwr.serverapp import ServerApp

    app_dir = Path(ROOT) / "examples" / "federated_app"
    config, _ = load_and_validate(app_dir / "pyproject.toml")
    components = config["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "klr_federated_app.server_app:app",
                          "clientapp": "klr_federated_app.client_app:app"}
    monkeypatch.syspath_prepend(str(app_dir))
    import klr_federated_app.client_app as client_module
    import klr_federated_app.server_app as server_module

    assert isinstance(server_module.app, ServerApp) and isinstance(client_module.app, ClientApp)
    # its run config is what server_app reads
    settings = server_module.app.settings.with_run_config(config["tool"]["flwr"]["app"]["config"])
    assert (settings.rounds, settings.num_clients, settings.clients_per_round) == (3, 2, 2)
    assert settings.server_learning_rate == 3.0 and settings.save_path is None
    assert settings.noise_multiplier > 0


def test_a_seeded_client_repeats_its_training_exactly():
    server_model = model_fn(rank=4)
    client = federated.client_app(model_fn, data_fn, epochs=2, batch_size=4, seed=7)
    arrays, config = _round_message(server_model, rank=3)
    first = _client_round(client, arrays, config)
    keras.utils.set_random_seed(123)  # whatever the process did in between
    second = _client_round(client, arrays, config)
    for k, v in first.content["arrays"].items():
        np.testing.assert_array_equal(v.numpy(), second.content["arrays"][k].numpy())


# ---------------------------------------------------------------------------
# The server's base under Flower's simulation engine


@pytest.mark.one_backend
@pytest.mark.parametrize("entry", ["keras_lowrank", "flower"])
def test_the_server_builds_the_clients_base_while_ray_starts(monkeypatch, entry):
    """Keras seeds unseeded initializers from Python's global `random`,
    which Ray's start-up draws from too; Flower's simulation engine runs
    the ServerApp in a thread while its main thread starts Ray. Here Ray's
    start-up is made to fall deterministically in the middle of the
    server's seeded `model_fn` whenever that runs beside the engine: the
    server then built another base, every client refused it ("base weights
    differ") and the run ended with "every client failed". `run_simulation`
    builds the server's model before the engine starts; Flower's own
    `run_simulation` (`entry="flower"`) gets a server that waits for Ray.
    Two clients, one round, a tiny model."""
    import flwr.simulation
    import ray

    if ray.is_initialized():
        ray.shutdown()
    engine_entered = threading.Event()
    ray_started = threading.Event()
    real_flower, real_init = flwr.simulation.run_simulation, ray.init

    def flower_run_simulation(*args, **kwargs):
        engine_entered.set()
        return real_flower(*args, **kwargs)

    def ray_init(*args, **kwargs):
        random.random()  # a draw at Ray's start, beside its own (external storage)
        try:
            return real_init(*args, **kwargs)
        finally:
            ray_started.set()

    monkeypatch.setattr(flwr.simulation, "run_simulation", flower_run_simulation)
    monkeypatch.setattr(ray, "init", ray_init)

    # defined here, so that cloudpickle sends them to Ray's workers by value
    def build():
        model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, name="hidden"),
                                  keras.layers.Dense(3, name="logits")])
        kl.enable_adapter(model, method="lora", rank=2, targets=["hidden", "logits"])
        model.compile(optimizer="adam",
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return model

    def client_model_fn():
        keras.utils.set_random_seed(0)
        return build()

    def server_model_fn():
        keras.utils.set_random_seed(0)
        if engine_entered.is_set():  # built beside the engine: Ray starts now
            ray_started.wait(timeout=120)
        return build()

    def client_data_fn(partition, partitions):
        x = np.random.default_rng(partition).normal(size=(8, 6)).astype("float32")
        return x, (x[:, 0] > 0).astype("int32")

    results = []
    server = federated.server_app(server_model_fn, num_clients=2, clients_per_round=2, rounds=1,
                                  on_finish=results.append, timeout=300)
    client = federated.client_app(client_model_fn, client_data_fn, epochs=1, batch_size=8)
    cpus = os.cpu_count() or 1  # one Ray worker for both clients: one Keras import
    start = time.time()
    try:
        if entry == "keras_lowrank":
            federated.run_simulation(server, client, num_clients=2, cpus_per_client=cpus)
        else:
            monkeypatch.setenv("KERAS_BACKEND", keras.backend.backend())
            flwr.simulation.run_simulation(
                server_app=server, client_app=client, num_supernodes=2,
                backend_config={"client_resources": {"num_cpus": cpus, "num_gpus": 0.0}})
    finally:
        if ray.is_initialized():
            ray.shutdown()
    print(f"federation in Flower's simulation engine: {time.time() - start:.1f} s")
    assert ray_started.is_set()  # Ray did start
    (result,) = results
    assert [h["clients"] for h in result.history] == [2]
    assert federated.base_fingerprint(result.model) == federated.base_fingerprint(client_model_fn())
