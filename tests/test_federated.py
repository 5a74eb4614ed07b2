"""DP-DyLoRA federations (spec §5): accounting, what clients send, the
server's noise, and whole federations, in this process (a Grid that runs
the ClientApp in-process) and in Flower's simulation engine (a child
process: the example script)."""

import json
import logging
import os
import subprocess
import sys

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


def test_epsilon_falls_as_noise_grows():
    eps = [federated.privacy_budget(s, 0.1, 20, 1e-5) for s in (0.6, 0.8, 1.0, 1.5, 3.0)]
    assert all(a > b for a, b in zip(eps, eps[1:])), eps
    # and grows with rounds and with the sampling rate
    assert federated.privacy_budget(1.0, 0.1, 40, 1e-5) > eps[2]
    assert federated.privacy_budget(1.0, 0.2, 20, 1e-5) > eps[2]
    assert federated.privacy_budget(1.0, 0.1, 0, 1e-5) == 0.0


@pytest.mark.parametrize("accountant,target", [("rdp", 2.0), ("rdp", 8.0), ("pld", 2.0)])
def test_noise_for_epsilon_round_trips(accountant, target):
    q, rounds, delta = 0.1, 10, 1e-5
    sigma = federated.noise_for_epsilon(target, q, rounds, delta, accountant=accountant)
    eps = federated.privacy_budget(sigma, q, rounds, delta, accountant=accountant)
    assert eps == pytest.approx(target, rel=0.01)
    assert eps <= target * (1 + 1e-6)  # the calibrated σ spends at most the target


@pytest.mark.parametrize("kwargs,match", [
    ({"noise_multiplier": 0.0}, "noise_multiplier"),
    ({"noise_multiplier": float("nan")}, "noise_multiplier"),
    ({"sampling_rate": 1.5}, "sampling_rate"),
    ({"rounds": -1}, "rounds"),
    ({"rounds": 2.5}, "rounds"),
    ({"delta": 1.0}, "delta"),
    ({"accountant": "moments"}, "accountant"),
])
def test_privacy_budget_refuses_bad_values(kwargs, match):
    args = {"noise_multiplier": 1.0, "sampling_rate": 0.1, "rounds": 10, "delta": 1e-5}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        federated.privacy_budget(**args)


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
    with pytest.raises(ValueError, match="rank must be an int in \\[1, 4\\]"):
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
    ({"rounds": 0}, "rounds must be an int >= 1"),
    ({"noise_multiplier": 1.0}, "needs a clipping_norm"),
    ({"clipping_norm": 1.0}, "belong to differential privacy"),
    ({"noise_multiplier": 1.0, "target_epsilon": 2.0, "clipping_norm": 1.0}, "not both"),
    ({"accountant": "gdp"}, "accountant"),
])
def test_server_app_refuses_bad_settings(kwargs, match):
    args = {"num_clients": 10, "clients_per_round": 2, "rounds": 2}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        federated.server_app(model_fn, **args)


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
