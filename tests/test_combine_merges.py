"""`combine`'s task-arithmetic merges (TIES, DARE, magnitude pruning and
their `_svd` variants) against PEFT's `add_weighted_adapter` on the same
LoRA weights, on every backend; the bugs PEFT has there (rank patterns that
do not reload, rsLoRA and DoRA merged to wrong weights) and combining over a
quantized base.

DARE draws random masks. The parity test records the masks `combine`
draws (through `keras_lowrank.named._keep_mask`) and hands the same masks,
in PEFT's layout and call order, to PEFT's `torch.bernoulli` (patched for
the call): PEFT's own code then merges with our draws."""

import keras
import numpy as np
import pytest

import keras_lowrank as kl
from keras_lowrank import bases
from keras_lowrank import named
from keras_lowrank import tree

from conftest import perturb
from conftest import to_np

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

N_IN, N_MID, N_OUT = 6, 5, 7  # no factor or update is square: a mask's layout is unambiguous
X = np.random.RandomState(0).normal(size=(4, N_IN)).astype("float32")
#: name -> (rank, alpha, rslora); "t3" has another rank (SVD merges only)
ADAPTERS = {"t1": (2, 4.0, False), "t2": (2, 3.0, True), "t3": (3, 6.0, False)}
TARGETS = ["lin0", "lin1"]


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = torch.nn.Linear(N_IN, N_MID)
        self.lin1 = torch.nn.Linear(N_MID, N_OUT)

    def forward(self, x):
        return self.lin1(self.lin0(x))


@pytest.fixture(scope="module")
def twins():
    """PEFT's model with the LoRAs t1, t2 (rsLoRA), t3, and its Keras twin."""
    torch.manual_seed(0)
    peft_model = None
    for name, (r, alpha, rs) in ADAPTERS.items():
        config = peft.LoraConfig(r=r, lora_alpha=alpha, use_rslora=rs, target_modules=TARGETS,
                                 init_lora_weights=False)
        if peft_model is None:
            peft_model = peft.get_peft_model(MLP(), config, adapter_name=name)
        else:
            peft_model.add_adapter(name, config)
    model = keras.Sequential([keras.Input((N_IN,)), keras.layers.Dense(N_MID, name="lin0"),
                              keras.layers.Dense(N_OUT, name="lin1")])
    for t in TARGETS:
        lin = getattr(peft_model.base_model.model, t)
        model.get_layer(t).set_weights([lin.weight.detach().numpy().T, lin.bias.detach().numpy()])
    for name, (r, alpha, rs) in ADAPTERS.items():
        kl.enable_adapter(model, method="lora", rank=r, alpha=alpha, rslora=rs, targets=TARGETS,
                          adapter_name=name)
        for t in TARGETS:
            lin = getattr(peft_model.base_model.model, t)
            m = model.get_layer(t).members[name]
            m.lora_a.assign(lin.lora_A[name].weight.detach().numpy())
            m.lora_b.assign(lin.lora_B[name].weight.detach().numpy().T)
    return peft_model, model


def peft_delta(peft_model, target, name):
    """PEFT's combined update `B A` of `target` in the Keras layout (its
    combined adapters have rank = alpha: scale 1 whatever their rslora)."""
    lin = getattr(peft_model.base_model.model, target)
    a, b = lin.lora_A[name].weight.detach().double(), lin.lora_B[name].weight.detach().double()
    return (b @ a).numpy().T


def keras_delta(model, target, name):
    return to_np(model.get_layer(target).members[name].delta_matrix()).astype("float64")


def close(got, want, tol=1e-5):
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert rel <= tol, rel


W2 = {"t1": 0.7, "t2": 0.5}
W2_NEG = {"t1": 1.0, "t2": -0.6}
W3 = {"t1": 0.6, "t2": -0.4, "t3": 0.9}
CASES = [
    ("ties", 0.5, "total", W2),
    ("ties", 0.8, "frequency", W2_NEG),
    ("dare_linear", 0.5, "total", W2),
    ("dare_linear", 0.8, "total", W2_NEG),
    ("dare_ties", 0.6, "total", W2_NEG),
    ("dare_ties", 0.5, "frequency", W2),
    ("magnitude_prune", 0.5, "total", W2_NEG),
    ("magnitude_prune", 1.0, "total", W2),
    ("linear", None, "total", W2_NEG),  # negative weights, as PEFT 0.21
    ("ties_svd", 0.5, "total", W3),
    ("ties_svd", 0.7, "frequency", W3),
    ("dare_linear_svd", 0.6, "total", W3),
    ("dare_ties_svd", 0.7, "total", W3),
    ("dare_ties_svd", 0.5, "frequency", W3),
    ("magnitude_prune_svd", 0.4, "total", W3),
]


@pytest.mark.filterwarnings("ignore:The density 1.0")
@pytest.mark.parametrize("method,density,sign,weights", CASES, ids=[
    f"{m}-{d}-{s}-{len(w)}{'neg' if min(w.values()) < 0 else ''}" for m, d, s, w in CASES])
def test_equals_peft_add_weighted_adapter(twins, monkeypatch, method, density, sign, weights):
    peft_model, model = twins
    drawn = []
    keep_mask = named._keep_mask

    def recording(rng, shape, p):
        mask = keep_mask(rng, shape, p)
        drawn.append(mask)
        return mask

    monkeypatch.setattr(named, "_keep_mask", recording)
    kl.combine(model, weights, "mix", method=method, density=density, majority_sign_method=sign, seed=3)
    assert bool(drawn) == (method.startswith("dare") and density < 1)

    queue = list(drawn)  # ours, in PEFT's call order; PEFT's layout is the transpose where shapes differ

    def bernoulli(p):
        mask = queue.pop(0)
        if mask.shape != tuple(p.shape):
            mask = mask.T
        assert mask.shape == tuple(p.shape)
        return torch.tensor(mask, dtype=p.dtype)

    monkeypatch.setattr(torch, "bernoulli", bernoulli)
    try:
        peft_model.add_weighted_adapter(list(weights), list(weights.values()), "mix", combination_type=method,
                                        density=density, majority_sign_method=sign)
        assert not queue
        for t in TARGETS:
            close(keras_delta(model, t, "mix"), peft_delta(peft_model, t, "mix"))
        # the outputs: our combined adapter against PEFT's combined kernels
        kl.set_active(model, "mix", trainable=False)
        h = X
        for t in TARGETS:
            lin = getattr(peft_model.base_model.model, t)
            h = h @ (lin.weight.detach().double().numpy().T + peft_delta(peft_model, t, "mix")) + \
                lin.bias.detach().double().numpy()
        close(to_np(model(X)), h)
    finally:
        peft_model.delete_adapter("mix")
        kl.delete_adapter(model, "mix")


def test_dare_is_reproducible_under_a_seed(twins):
    _, model = twins
    deltas = {}
    for name, seed in (("s1", 5), ("s2", 5), ("s3", 6)):
        kl.combine(model, W2_NEG, name, method="dare_ties", density=0.5, seed=seed)
        deltas[name] = keras_delta(model, "lin0", name)
        kl.delete_adapter(model, name)
    np.testing.assert_array_equal(deltas["s1"], deltas["s2"])
    assert not np.allclose(deltas["s1"], deltas["s3"])


BAD = [
    (dict(method="ties"), "needs a density in \\(0, 1\\].*received density=None"),
    (dict(method="dare_linear", density=0.0), "received density=0.0"),
    (dict(method="ties_svd", density=1.5), "received density=1.5"),
    (dict(method="magnitude_prune", density=True), "received density=True"),
    (dict(method="svd", density=0.5), "density=0.5 has no effect with method='svd'"),
    (dict(method="ties", density=0.5, majority_sign_method="mean"), "received 'mean'"),
    (dict(method="dare_linear", density=0.5, majority_sign_method="frequency"),
     "majority_sign_method='frequency' has no effect with method='dare_linear'"),
    (dict(method="dare_ties", density=0.5, seed=-1), "seed must be None or an int >= 0; received -1"),
    (dict(method="ties_svd", density=0.5, rank=0), "rank must be a positive int; received 0"),
    (dict(method="ties", density=0.5, weights={"t1": 1.0, "t3": 1.0}),
     "layer 'lin0': method='ties' .* one rank; they have ranks \\[2, 3\\]"),
]


@pytest.mark.parametrize("kwargs,message", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_arguments_leave_the_model_unchanged(twins, kwargs, message):
    _, model = twins
    kwargs = dict(kwargs)
    weights = kwargs.pop("weights", W2)
    names = kl.adapter_names(model)
    before = [to_np(w).copy() for w in model.weights]
    with pytest.raises(ValueError, match=message):
        kl.combine(model, weights, "bad", **kwargs)
    assert kl.adapter_names(model) == names
    assert all(np.array_equal(a, to_np(b)) for a, b in zip(before, model.weights))


# ----------------------------------------------------------------------
# PEFT #3761: rsLoRA and DoRA combined to the right weights, or refused


def small_model():
    return keras.Sequential([keras.Input((N_IN,)), keras.layers.Dense(N_MID, name="lin0"),
                             keras.layers.Dense(N_OUT, name="lin1")])


def test_one_rslora_adapter_combines_to_itself():
    """Combining a single adapter with weight 1 gives it back (PEFT 0.21
    scales an rsLoRA one by √r)."""
    model = small_model()
    kl.enable_adapter(model, rank=4, alpha=3.0, rslora=True, targets=TARGETS, adapter_name="rs")
    for i, (_, a) in enumerate(kl.adapters(model)):
        perturb(a, seed=i)
    y = to_np(model(X))
    for method in ("linear", "cat", "svd", "ties", "dare_ties_svd", "magnitude_prune"):
        density = None if method in ("linear", "cat", "svd") else 0.5
        kl.combine(model, {"rs": 1.0}, "same", method=method, density=density)
        np.testing.assert_allclose(to_np(model(X)), y, atol=1e-5, err_msg=method)
        kl.delete_adapter(model, "same")
        kl.set_active(model, "rs", trainable=False)


def test_dora_merges_through_its_whole_update_or_is_refused():
    """DoRA's magnitude has no factor-by-factor merge: the element-wise
    types refuse it by name and change nothing; the `_svd` types merge its
    true update (PEFT 0.21 drops the magnitude)."""
    model = small_model()
    y0 = to_np(model(X))
    for i, name in enumerate(("d1", "d2")):
        kl.enable_adapter(model, method="dora", rank=2, targets=TARGETS, adapter_name=name)
        for path, a in kl.adapters(model):
            if path.endswith("@" + name):
                perturb(a, seed=10 + i)
    names = kl.adapter_names(model)
    for method in ("ties", "dare_linear", "dare_ties", "magnitude_prune", "linear"):
        density = None if method == "linear" else 0.5
        with pytest.raises(ValueError, match=f"'dora' adapter, which has no plain-LoRA form .*"
                                             f"method='{'svd' if method == 'linear' else method + '_svd'}'"):
            kl.combine(model, {"d1": 0.5, "d2": 0.5}, "no", method=method, density=density)
        assert kl.adapter_names(model) == names
    # one DoRA adapter with weight 1, at its full update's rank: itself
    kl.set_active(model, "d1")
    y1 = to_np(model(X))
    kl.combine(model, {"d1": 1.0}, "d1_again", method="ties_svd", density=0.5, rank=N_MID)
    np.testing.assert_allclose(to_np(model(X)), y1, atol=1e-5)
    # two: PEFT's own TIES rule on the true updates, then an exact (full-rank) SVD
    from peft.utils import merge_utils

    weights = {"d1": 0.8, "d2": -0.5}
    kl.combine(model, weights, "dd", method="ties_svd", density=0.6, rank=N_MID)
    for t in TARGETS:
        s = model.get_layer(t)
        k = s.base_matrix()
        updates = [torch.tensor(to_np(s.members[n].merged_matrix(k)) - to_np(k)).T for n in weights]
        want = merge_utils.ties(updates, torch.tensor(list(weights.values())), 0.6, "total").numpy().T
        close(keras_delta(model, t, "dd"), want.astype("float64"))
    assert not np.allclose(to_np(model(X)), y0, atol=1e-3)


# ----------------------------------------------------------------------
# PEFT #3737: combinations of adapters with rank patterns reload


def test_rank_pattern_combinations_reload(tmp_path):
    model = small_model()
    for i, name in enumerate(("p", "q")):
        kl.enable_adapter(model, rank=2, rank_pattern={"lin0": 4}, targets=TARGETS, adapter_name=name)
        for path, a in kl.adapters(model):
            if path.endswith("@" + name):
                perturb(a, seed=20 + i)
    made = {"ties": dict(density=0.7), "dare_linear": dict(density=0.5, seed=1),
            "magnitude_prune_svd": dict(density=0.6, rank=3), "cat": {}}
    for method, kwargs in made.items():
        kl.combine(model, {"p": 0.6, "q": -0.3}, method, method=method, **kwargs)
    assert model.get_layer("lin0").members["ties"].rank == 4
    assert model.get_layer("lin1").members["ties"].rank == 2
    assert model.get_layer("lin0").members["cat"].rank == 8
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    kl.save_adapter(model, tmp_path / "all.safetensors")
    fresh = small_model()
    fresh.set_weights(model.get_layer("lin0").layer.get_weights() + model.get_layer("lin1").layer.get_weights())
    kl.load_adapter(fresh, tmp_path / "all.safetensors")
    for method in made:
        for m in (model, loaded, fresh):
            kl.set_active(m, method, trainable=False)
        want = to_np(model(X))
        np.testing.assert_allclose(to_np(loaded(X)), want, atol=1e-5)
        np.testing.assert_allclose(to_np(fresh(X)), want, atol=1e-5)


def test_rank_pattern_combination_exports_a_peft_directory_that_loads(tmp_path):
    """The combined adapter of adapters with rank patterns, written as a
    PEFT directory, loads in PEFT with the same logits (PEFT's own
    combination of them does not reload)."""
    pytest.importorskip("transformers")
    pytest.importorskip("keras_hub")
    from peft_models import close as rel_close
    from peft_models import hf_model
    from peft_models import keras_backbone
    from peft_models import keras_logits
    from peft_models import load_hf
    from peft_models import torch_logits

    hf_dir = hf_model("llama", str(tmp_path / "llama"), layers=1)
    backbone = keras_backbone(hf_dir)
    for i, name in enumerate(("p", "q")):
        kl.enable_adapter(backbone, rank=2, rank_pattern={"query": 4}, adapter_name=name)
        for path, a in kl.adapters(backbone):
            if path.endswith("@" + name):
                perturb(a, scale=0.2, seed=40 + i)
    kl.combine(backbone, {"p": 0.8, "q": -0.5}, "mix", method="ties", density=0.7)
    expected = keras_logits(backbone)
    out = str(tmp_path / "mix")
    kl.save_peft_adapter(backbone, out, hf_dir, adapter_name="mix")
    pm = peft.PeftModel.from_pretrained(load_hf(hf_dir), out).eval()
    assert {m.lora_A["default"].weight.shape[0] for n, m in pm.named_modules() if n.endswith("q_proj")} == {4}
    assert {m.lora_A["default"].weight.shape[0] for n, m in pm.named_modules() if n.endswith("v_proj")} == {2}
    got = torch_logits(pm)
    assert np.abs(got - torch_logits(load_hf(hf_dir))).max() > 1e-3
    rel_close(got, expected)


# ----------------------------------------------------------------------
# A quantized base: combine adds an adapter; merge dequantizes, merges,
# requantizes (when asked)


@pytest.mark.parametrize("storage,requantize", [("nf4", False), ("nf4", True), ("int8", True), ("int4", False)])
def test_combine_over_a_quantized_base(storage, requantize):
    model = small_model()
    kl.enable_adapter(model, rank=2, targets=TARGETS, base=storage, adapter_name="u")
    kl.enable_adapter(model, rank=2, targets=TARGETS, adapter_name="v")
    for i, (_, a) in enumerate(kl.adapters(model)):
        perturb(a, seed=30 + i)
    base = {t: model.get_layer(t).layer for t in TARGETS}
    stored = {t: [to_np(w).copy() for w in base[t].weights] for t in TARGETS}
    kl.combine(model, {"u": 0.7, "v": -0.4}, "mix", method="ties_svd", density=0.6)
    for t in TARGETS:  # the base's storage: the same layer, bit for bit
        assert model.get_layer(t).layer is base[t]
        assert bases.base_kind(base[t]) == storage
        assert all(np.array_equal(a, to_np(b)) for a, b in zip(stored[t], base[t].weights))
    kernels = {t: to_np(model.get_layer(t).base_matrix()) + keras_delta(model, t, "mix") for t in TARGETS}
    biases = {t: to_np(bases.bias_variable(base[t])) for t in TARGETS}
    report = kl.merge(model, requantize=requantize)
    for t in TARGETS:
        layer = model.get_layer(t)
        assert not tree.is_adapter_set(layer)
        if requantize:  # quantized again, the error reported
            assert bases.base_kind(layer) == storage and report[t]["storage"] == storage
            err = np.abs(to_np(bases.read_kernel(layer)) - kernels[t]).max()
            assert err <= report[t]["max_abs_error"] + 1e-6
        else:  # a float kernel: the dequantized base plus the combined update
            assert bases.base_kind(layer) == "float"
            np.testing.assert_allclose(to_np(layer.kernel), kernels[t], atol=1e-5)
    if not requantize:  # against the float kernels (Keras's int8 layers quantize inputs too)
        np.testing.assert_allclose(to_np(model(X)), (X @ kernels["lin0"] + biases["lin0"]) @ kernels["lin1"]
                                   + biases["lin1"], atol=1e-5)
