"""LoHa and LoKr (spec §10, §11): PEFT parity on the same weights, PEFT's
factorization and layout rules, the forms of the forward, and the training
extras (rank and module dropout) inside `model.fit`."""

import keras
import numpy as np
import pytest

import keras_lowrank as kl
from keras_lowrank.methods.lycoris import factorization
from keras_lowrank.methods.lycoris import lokr_layout

from conftest import gemma_backbone
from conftest import to_np
from conftest import token_inputs

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

N_IN, N_OUT = 12, 16
X = np.random.RandomState(0).normal(size=(7, N_IN)).astype("float32")


class _Net(torch.nn.Module):
    def __init__(self, n_in=N_IN, n_out=N_OUT):
        super().__init__()
        self.lin = torch.nn.Linear(n_in, n_out)

    def forward(self, x):
        return self.lin(x)


def _pair(seed=0, n_in=N_IN, n_out=N_OUT):
    torch.manual_seed(seed)
    net = _Net(n_in, n_out)
    inp = keras.Input((n_in,))
    model = keras.Model(inp, keras.layers.Dense(n_out, name="lin")(inp))
    model.get_layer("lin").set_weights(
        [net.lin.weight.detach().numpy().T.copy(), net.lin.bias.detach().numpy().copy()]
    )
    return net, model


def _t(a):
    return a.detach().numpy()


# ----------------------------------------------------------------------
# LoKr's factorization and layout (spec §11)
def test_factorization_examples_of_the_spec():
    assert factorization(4096) == (64, 64)
    assert factorization(768) == (24, 32)
    assert factorization(128) == (8, 16)
    assert factorization(127) == (1, 127)
    assert factorization(128, factor=4) == (4, 32)


def test_factorization_matches_peft():
    from peft.tuners.lokr.layer import factorization as peft_factorization

    for dim in list(range(1, 300)) + [768, 1024, 2048, 3072, 4096, 11008, 14336]:
        for factor in (-1, 2, 3, 4, 8, 16):
            want = peft_factorization(dim, factor)
            if want[0] > want[1]:  # this PEFT release keeps (factor, dim/factor) unsorted
                want = want[::-1]
            assert factorization(dim, factor) == want, (dim, factor)


@pytest.mark.parametrize("rank,both,factor", [(1, False, -1), (2, True, -1), (4, False, -1),
                                               (1, True, 2), (8, False, -1), (3, False, 3)])
def test_lokr_layout_matches_peft_parameters(rank, both, factor):
    from peft import LoKrConfig
    from peft import get_peft_model

    net, _ = _pair()
    pm = get_peft_model(net, LoKrConfig(r=rank, alpha=rank, target_modules=["lin"],
                                        decompose_both=both, decompose_factor=factor))
    lin = pm.base_model.model.lin
    names = {n for n in ("lokr_w1", "lokr_w1_a", "lokr_w2", "lokr_w2_a") if "default" in getattr(lin, n)}
    p = lokr_layout(N_IN, N_OUT, rank, both, factor)
    assert ("lokr_w1" in names) == p["full_1"]
    assert ("lokr_w2" in names) == p["full_2"]
    peft_count = sum(v.numel() for n, v in lin.named_parameters() if "lokr" in n)
    _, model = _pair()
    s = kl.enable_adapter(model, method="lokr", rank=rank, decompose_both=both,
                          decompose_factor=factor, targets=["lin"])
    assert s.adapter_params == peft_count


# ----------------------------------------------------------------------
# Parity with PEFT on the same weights
def _copy_loha(lin, layer):
    rng = np.random.RandomState(5)
    for name, ours, transpose in (("hada_w1_b", "loha_a1", False), ("hada_w1_a", "loha_b1", True),
                                  ("hada_w2_b", "loha_a2", False), ("hada_w2_a", "loha_b2", True)):
        p = getattr(lin, name)["default"]
        value = rng.normal(scale=0.4, size=tuple(p.shape)).astype("float32")
        with torch.no_grad():
            p.copy_(torch.tensor(value))
        getattr(layer, ours).assign(value.T if transpose else value)


@pytest.mark.parametrize("form", ["factorized", "materialized"])
def test_loha_matches_peft(form):
    from peft import LoHaConfig
    from peft import get_peft_model

    net, model = _pair(1)
    pm = get_peft_model(net, LoHaConfig(r=3, alpha=6, target_modules=["lin"]))
    kl.enable_adapter(model, method="loha", rank=3, alpha=6.0, form=form, targets=["lin"])
    layer = model.get_layer("lin")
    assert layer.factorized() == (form == "factorized")
    _copy_loha(pm.base_model.model.lin, layer)
    pm.eval()
    want = _t(pm(torch.tensor(X)))
    np.testing.assert_allclose(to_np(model(X)), want, rtol=1e-5, atol=1e-5)
    delta = _t(pm.base_model.model.lin.get_delta_weight("default")).T
    np.testing.assert_allclose(to_np(layer.delta_matrix()), delta, rtol=1e-5, atol=1e-6)
    kl.merge(model)
    np.testing.assert_allclose(to_np(model(X)), want, rtol=1e-5, atol=1e-5)


def test_loha_default_init_is_peft_fedpara():
    _, model = _pair()
    kl.enable_adapter(model, method="loha", rank=4, targets=["lin"], seed=3)
    a = model.get_layer("lin")
    assert np.all(to_np(a.loha_a2) == 0)
    for name, fan_in in (("loha_a1", N_IN), ("loha_b1", 4), ("loha_b2", 4)):
        v = to_np(getattr(a, name))
        assert np.abs(v).max() <= 1 / np.sqrt(fan_in) and np.abs(v).max() > 0.5 / np.sqrt(fan_in)


LOKR_CASES = [  # rank, decompose_both, decompose_factor, init
    (1, False, -1, "peft"), (2, True, -1, "peft"), (4, False, -1, "peft"),
    (1, True, 2, "lycoris"), (3, False, 3, "peft"),
]


@pytest.mark.parametrize("rank,both,factor,init", LOKR_CASES)
def test_lokr_matches_peft(rank, both, factor, init):
    from peft import LoKrConfig
    from peft import get_peft_model

    net, model = _pair(2)
    pm = get_peft_model(net, LoKrConfig(r=rank, alpha=2.0 * rank, target_modules=["lin"],
                                        decompose_both=both, decompose_factor=factor,
                                        init_weights=True if init == "peft" else "lycoris"))
    lin = pm.base_model.model.lin
    kl.enable_adapter(model, method="lokr", rank=rank, alpha=2.0 * rank, decompose_both=both,
                      decompose_factor=factor, init=init, targets=["lin"])
    layer = model.get_layer("lin")
    # the same factor starts at zero, so both start as a no-op
    zero_peft = {n for n, p in lin.named_parameters() if "lokr" in n and not p.detach().any()}
    zero_ours = {v.name for v in layer.trainable_variables if not to_np(v).any()}
    table = {"lokr_w1": "lokr_f1", "lokr_w1_a": "lokr_b1", "lokr_w1_b": "lokr_a1",
             "lokr_w2": "lokr_f2", "lokr_w2_a": "lokr_b2", "lokr_w2_b": "lokr_a2"}
    assert {table[n.split(".")[-2]] for n in zero_peft} == zero_ours
    rng = np.random.RandomState(7)
    for name, ours in table.items():
        if "default" not in getattr(lin, name):
            continue
        p = getattr(lin, name)["default"]
        value = rng.normal(scale=0.4, size=tuple(p.shape)).astype("float32")
        with torch.no_grad():
            p.copy_(torch.tensor(value))
        # full factors and *_a are (out, in)-like: transposed; *_b are (r, in): as they are
        getattr(layer, ours).assign(value if name.endswith("_b") else value.T)
    pm.eval()
    want = _t(pm(torch.tensor(X)))
    np.testing.assert_allclose(to_np(model(X)), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(to_np(layer.delta_matrix()), _t(lin.get_delta_weight("default")).T,
                               rtol=1e-5, atol=1e-6)
    kl.merge(model)
    np.testing.assert_allclose(to_np(model(X)), want, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------
# Forward forms
def test_loha_forms_agree_and_auto_follows_r_squared():
    x = np.random.RandomState(2).normal(size=(2, 4, 12)).astype("float32")
    outs = {}
    for form in ("factorized", "materialized", "auto"):
        inp = keras.Input((4, 12))
        h = keras.layers.EinsumDense("btd,ndh->btnh", output_shape=(4, 2, 8), name="t")(inp)
        model = keras.Model(inp, h)
        model.get_layer("t").set_weights([np.ones((2, 12, 8), "float32") * 0.1])
        kl.enable_adapter(model, method="loha", rank=2, form=form, targets=["t"], seed=1)
        a = model.get_layer("t")
        a.loha_a2.assign(np.random.RandomState(4).normal(size=tuple(a.loha_a2.shape)).astype("float32"))
        outs[form] = to_np(model(x))
        if form == "auto":  # 2 r² = 8 < min(12, 16)
            assert a.factorized()
    np.testing.assert_allclose(outs["factorized"], outs["materialized"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(outs["auto"], outs["factorized"], rtol=1e-6, atol=1e-6)
    _, model = _pair()
    kl.enable_adapter(model, method="loha", rank=3, targets=["lin"])  # 2 * 9 >= 12
    assert not model.get_layer("lin").factorized()


def _mlp(n=6):
    inp = keras.Input((n,))
    h = keras.layers.Dense(8, activation="tanh", name="hidden")(inp)
    return keras.Model(inp, keras.layers.Dense(3, name="out")(h))


def test_lokr_train_step_never_builds_the_kronecker_product():
    model = _mlp(12)
    kl.enable_adapter(model, method="lokr", rank=1, targets=["hidden"])
    a = model.get_layer("hidden")

    def refuse():
        raise AssertionError("the train step built the Kronecker product")

    object.__setattr__(a, "delta_matrix", refuse)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    x = np.random.RandomState(0).normal(size=(16, 12)).astype("float32")
    hist = model.fit(x, x[:, :3], epochs=3, verbose=0)
    assert np.isfinite(hist.history["loss"][-1])


def test_loha_exports_as_an_exact_rank_r_squared_lora(tmp_path):
    model = _mlp()
    weights = [to_np(w).copy() for w in model.weights]
    kl.enable_adapter(model, method="loha", rank=2, alpha=3.0)
    a = model.get_layer("hidden")
    a.loha_a2.assign(np.random.RandomState(0).normal(size=tuple(a.loha_a2.shape)).astype("float32"))
    x = np.random.RandomState(1).normal(size=(5, 6)).astype("float32")
    y = to_np(model(x))
    kl.save_adapter(model, tmp_path / "lora.safetensors", as_lora=True)
    fresh = _mlp()
    for w, v in zip(fresh.weights, weights):
        w.assign(v)
    kl.load_adapter(fresh, tmp_path / "lora.safetensors")
    assert [(p, l.method, l.rank) for p, l in kl.adapters(fresh)] == [("hidden", "lora", 4)]
    np.testing.assert_allclose(to_np(fresh(x)), y, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------
# Rank dropout and module dropout (PEFT's extras)
@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_rank_dropout_drops_whole_output_columns(method):
    model = _mlp(12)
    extra = {"rank_dropout_scale": True} if method == "lokr" else {}
    kl.enable_adapter(model, method=method, rank=2, rank_dropout=0.5, seed=3, targets=["hidden"], **extra)
    a = model.get_layer("hidden")
    for v in a.trainable_variables:
        v.assign(np.random.RandomState(1).normal(size=tuple(v.shape)).astype("float32"))
    x = np.random.RandomState(2).normal(size=(4, 12)).astype("float32")
    a.activation = keras.activations.linear  # compare pre-activations
    with kl.disable_adapter(model):
        base = to_np(a(x))
    full = to_np(a(x)) - base  # inference: no dropout
    seen = set()
    for _ in range(4):
        delta = to_np(a(x, training=True)) - base
        ratio = np.where(np.abs(full) > 1e-4, delta / np.where(np.abs(full) > 1e-4, full, 1), np.nan)
        col = np.nanmean(ratio, axis=0)  # per output column: 0 (dropped) or 1/keep-fraction
        np.testing.assert_allclose(ratio, np.broadcast_to(col, ratio.shape), atol=1e-3)
        kept = col > 0.5
        assert 0 < kept.sum() < kept.size
        np.testing.assert_allclose(col[~kept], 0, atol=1e-5)
        np.testing.assert_allclose(col[kept], kept.size / kept.sum(), rtol=1e-3)
        seen.add(tuple(kept))
    assert len(seen) > 1  # a new mask each step


@pytest.mark.parametrize("method", ["loha", "lokr"])
def test_module_dropout_acts_inside_fit(method):
    """With module_dropout near 1 the update is skipped on (almost) every
    step of the compiled train step, so the adapter gets no gradient; with
    0 it trains."""
    x = np.random.RandomState(0).normal(size=(16, 12)).astype("float32")
    changed = {}
    for rate in (0.0, 0.999):
        keras.utils.set_random_seed(0)
        model = _mlp(12)
        kl.enable_adapter(model, method=method, rank=2, module_dropout=rate, seed=1, targets=["hidden"])
        a = model.get_layer("hidden")
        for v in a.trainable_variables:  # off the no-op start, so every factor has a gradient
            v.assign(np.random.RandomState(2).normal(scale=0.3, size=tuple(v.shape)).astype("float32"))
        before = [to_np(v).copy() for v in a.trainable_variables]
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        model.fit(x, x[:, :3], epochs=4, batch_size=8, verbose=0)
        changed[rate] = any(not np.array_equal(b, to_np(v)) for b, v in zip(before, a.trainable_variables))
        # inference never drops the module
        with kl.disable_adapter(model):
            base = to_np(model(x))
        assert np.abs(to_np(model(x)) - base).max() > 1e-4
    assert changed == {0.0: True, 0.999: False}


def test_lokr_learns_on_a_tiny_gemma_causal_lm():
    import keras_hub

    lm = keras_hub.models.GemmaCausalLM(backbone=gemma_backbone(), preprocessor=None)
    x = token_inputs(20, batch=4, seq=8)
    y = (x["token_ids"] + 3) % 20
    kl.enable_adapter(lm, method="lokr", rank=2)
    lm.compile(optimizer=keras.optimizers.Adam(2e-2),
               loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    losses = lm.fit(x, y, epochs=12, batch_size=4, verbose=0).history["loss"]
    assert losses[-1] < 0.9 * losses[0]
