"""HiRA (`method="hira"`): parity with Hugging Face PEFT's HiRA (forward,
merged kernel, init) on a torch `nn.Linear` and its Keras twin; PEFT
directories both ways on a tiny Hugging Face Llama converted by KerasHub
(and GPT-2's fused, transposed `c_attn`); and what the adapter contract does
not cover: the update's rank, an exact unmerge through a near-zero
`1 + AB`, a refused unmerge where `K0` is lost, a batched EinsumDense
kernel. PEFT runs in PyTorch beside the Keras backend under test."""

import json
import os

import keras
import numpy as np
import pytest

import keras_lowrank as kl

from conftest import perturb
from conftest import to_np

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
keras_hub = pytest.importorskip("keras_hub")

from peft_models import ALL
from peft_models import close as _close
from peft_models import hf_model
from peft_models import keras_backbone as _backbone
from peft_models import keras_logits as _keras_logits
from peft_models import load_hf as _hf
from peft_models import torch_logits as _torch_logits

N_IN, N_OUT, R = 8, 12, 3
X = np.random.RandomState(0).normal(size=(5, N_IN)).astype("float32")



# ----------------------------------------------------------------------
# A torch Linear and its Keras twin
class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(N_IN, N_OUT)

    def forward(self, x):
        return self.lin(x)


def _pair(seed=0, **config):
    """PEFT's HiRA on a torch Linear with nonzero factors, and the Keras
    Dense twin with the same base weights and a HiRA with the same
    factors."""
    torch.manual_seed(seed)
    net = _Net()
    inp = keras.Input((N_IN,))
    model = keras.Model(inp, keras.layers.Dense(N_OUT, name="lin")(inp))
    model.get_layer("lin").set_weights(
        [net.lin.weight.detach().numpy().T.copy(), net.lin.bias.detach().numpy().copy()])
    pm = peft.get_peft_model(net, peft.HiraConfig(r=R, target_modules=["lin"], **config))
    lin = pm.base_model.model.lin
    rng = np.random.RandomState(seed + 1)
    a = rng.normal(scale=0.5, size=(R, N_IN)).astype("float32")  # PEFT's hira_A (r, n_in)
    b = rng.normal(scale=0.5, size=(N_OUT, R)).astype("float32")  # PEFT's hira_B (n_out, r)
    with torch.no_grad():
        lin.hira_A["default"].copy_(torch.tensor(a))
        lin.hira_B["default"].copy_(torch.tensor(b))
    kl.enable_adapter(model, method="hira", rank=R, targets=["lin"])
    layer = model.get_layer("lin")
    layer.hira_a.assign(a)
    layer.hira_b.assign(b.T)
    return pm.eval(), model, layer


def test_forward_and_merged_kernel_match_peft():
    pm, model, layer = _pair()
    with torch.no_grad():
        want = pm(torch.tensor(X)).numpy()
        base = pm.base_model.model.lin.base_layer(torch.tensor(X)).numpy()
    assert np.abs(want - base).max() > 1e-2  # the update is not trivial
    _close(to_np(model(X)), want)
    w0 = to_np(layer.layer.kernel).astype("float64")
    delta_peft = pm.base_model.model.lin.get_delta_weight("default").detach().numpy().T  # A B, Keras layout
    _close(to_np(layer.delta_matrix()), w0 * delta_peft)
    merged = pm.merge_and_unload().lin.weight.detach().numpy().T
    kl.merge(model)
    _close(to_np(model.get_layer("lin").kernel), merged)
    _close(to_np(model(X)), want)


def test_init_is_peft_s():
    """A ~ U(±1/sqrt(n_in)) (kaiming) or N(0, 1/r²) (gaussian), B = 0, and
    no scaling: PEFT's HiraConfig(init_weights=True | "gaussian")."""
    torch.manual_seed(0)
    inp = keras.Input((64,))
    model = keras.Model(inp, keras.layers.Dense(48, name="lin")(inp))
    kl.enable_adapter(model, method="hira", rank=16, seed=3, targets=["lin"])
    layer = model.get_layer("lin")
    ours = to_np(layer.hira_a)
    pm = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(64, 48)),
                             peft.HiraConfig(r=16, target_modules=["0"]))
    theirs = pm.base_model.model[0].hira_A["default"].detach().numpy()
    assert ours.shape == theirs.shape == (16, 64)
    bound = 1 / np.sqrt(64)
    assert np.abs(ours).max() <= bound and np.abs(theirs).max() <= bound
    assert np.abs(ours).max() > 0.9 * bound and ours.std() == pytest.approx(theirs.std(), rel=0.15)
    assert not to_np(layer.hira_b).any()
    assert not pm.base_model.model[0].hira_B["default"].detach().numpy().any()
    gaussian = kl.layers.HiRA(keras.layers.Dense(48), rank=16, init="gaussian", seed=0)
    gaussian.build((None, 64))
    assert to_np(gaussian.hira_a).std() == pytest.approx(1 / 16, rel=0.1)


def test_dropout_is_on_the_adapter_input_only():
    inp = keras.Input((N_IN,))
    model = keras.Model(inp, keras.layers.Dense(N_OUT, name="lin")(inp))
    kl.enable_adapter(model, method="hira", rank=R, dropout=0.5, seed=0, targets=["lin"])
    perturb(model.get_layer("lin"))
    y = to_np(model(X))
    np.testing.assert_array_equal(to_np(model(X, training=False)), y)  # inference: no dropout
    assert np.abs(to_np(model(X, training=True)) - y).max() > 1e-3


# ----------------------------------------------------------------------
# What the contract does not cover
def test_the_update_is_high_rank():
    """rank(K0 ⊙ AB) ≤ rank(K0)·r, far above r: at r = 1 it is
    diag(a) K0 diag(b), full rank for a full-rank K0."""
    inp = keras.Input((N_IN,))
    model = keras.Model(inp, keras.layers.Dense(N_OUT, name="lin")(inp))
    kl.enable_adapter(model, method="hira", rank=1, targets=["lin"])
    layer = model.get_layer("lin")
    perturb(layer)
    delta = to_np(layer.delta_matrix()).astype("float64")
    assert np.linalg.matrix_rank(delta) == min(N_IN, N_OUT)


def test_unmerge_gives_the_kernel_back_through_a_near_zero_modulation():
    _, model, layer = _pair()
    k0 = to_np(layer.layer.kernel).copy()
    # 1 + A B as small as 1e-4 in places: the merged kernel keeps K0 anyway
    a = np.ones((R, N_IN), "float32") / R
    b = np.full((R, N_OUT), -(1 - 3e-3), "float32")
    b[:, ::2] = -(1 - 1e-4)
    layer.hira_a.assign(a)
    layer.hira_b.assign(b)
    y = to_np(model(X))
    kl.merge(model, unload=False)
    _close(to_np(model(X)), y, 1e-4)
    kl.unmerge(model)
    np.testing.assert_allclose(to_np(layer.layer.kernel), k0, rtol=1e-6, atol=0)


def test_unmerge_where_the_kernel_was_lost_is_refused():
    _, model, layer = _pair()
    layer.hira_a.assign(np.ones((R, N_IN), "float32"))
    b = np.zeros((R, N_OUT), "float32")
    b[0, 0] = -1.0  # 1 + AB = 0 in column 0: K0's column is gone once merged
    layer.hira_b.assign(b)
    kl.merge(model, unload=False)
    merged = to_np(layer.layer.kernel).copy()
    assert not merged[:, 0].any()
    with pytest.raises(FloatingPointError, match="'lin'"):
        kl.unmerge(model)
    np.testing.assert_array_equal(to_np(layer.layer.kernel), merged)
    assert layer.merged


def test_batched_einsum_kernel():
    """A kernel with an axis shared by input and output (`n`): one HiRA per
    slice of the matrix view, `(n, d, h)`."""
    x = np.random.RandomState(2).normal(size=(2, 3, 4, 5)).astype("float32")
    inp = keras.Input((3, 4, 5))
    out = keras.layers.EinsumDense("btnd,ndh->btnh", output_shape=(3, 4, 6), name="target")(inp)
    model = keras.Model(inp, out)
    kl.enable_adapter(model, method="hira", rank=2, targets=["target"])
    layer = model.get_layer("target")
    assert tuple(layer.hira_a.shape) == (4, 2, 5) and tuple(layer.hira_b.shape) == (4, 2, 6)
    perturb(layer)
    k0 = to_np(layer.layer.kernel).astype("float64")
    m = np.swapaxes(to_np(layer.hira_a), -1, -2).astype("float64") @ to_np(layer.hira_b)
    want = np.einsum("btnd,ndh->btnh", x, k0 * (1 + m))
    _close(to_np(model(x)), want)
    kl.merge(model)
    _close(to_np(model(x)), want)


# ----------------------------------------------------------------------
# PEFT directories on a KerasHub model converted from Hugging Face
@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return hf_model("llama", str(tmp_path_factory.mktemp("llama")), layers=1)


def test_peft_directory_loads_with_the_same_logits(llama_dir, tmp_path):
    pm = peft.get_peft_model(_hf(llama_dir), peft.HiraConfig(
        r=2, target_modules=ALL, rank_pattern={"v_proj": 3}, hira_dropout=0.1))
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "hira_" in name:
                p.copy_(0.5 * torch.randn_like(p))
    pm.save_pretrained(str(tmp_path / "ad"))
    expected = _torch_logits(pm.eval())
    assert np.abs(_torch_logits(_hf(llama_dir)) - expected).max() > 1e-3  # not a no-op
    backbone = _backbone(llama_dir)
    kl.load_peft_adapter(backbone, str(tmp_path / "ad"), llama_dir)
    layers = dict(kl.adapters(backbone))
    assert len(layers) == 7 and {a.method for a in layers.values()} == {"hira"}
    # PEFT 0.21 builds every HiRA module at r, whatever rank_pattern says
    assert {a.rank for a in layers.values()} == {2}
    assert {a.dropout for a in layers.values()} == {0.1}
    _close(_keras_logits(backbone), expected)


def test_save_peft_adapter_loads_in_peft(llama_dir, tmp_path):
    backbone = _backbone(llama_dir)
    kl.enable_adapter(backbone, method="hira", rank=2, rank_pattern={"query": 3})
    for _, a in kl.adapters(backbone):
        perturb(a)
    expected = _keras_logits(backbone)
    out = str(tmp_path / "peft")
    kl.save_peft_adapter(backbone, out, llama_dir)
    config = json.load(open(os.path.join(out, "adapter_config.json")))
    # every module at the largest rank (zero-padded: PEFT 0.21 ignores rank_pattern)
    assert config["peft_type"] == "HIRA" and config["r"] == 3 and not config["rank_pattern"]
    assert "alpha_pattern" not in config
    pm = peft.PeftModel.from_pretrained(_hf(llama_dir), out).eval()
    assert isinstance(pm.peft_config["default"], peft.HiraConfig)
    got = _torch_logits(pm)
    assert np.abs(got - _torch_logits(_hf(llama_dir))).max() > 1e-3
    _close(got, expected)
    fresh = _backbone(llama_dir)  # and back, the base model from the config
    kl.load_peft_adapter(fresh, out)
    _close(_keras_logits(fresh), expected)


def test_gpt2_fused_qkv_joins_and_splits(tmp_path):
    """GPT-2's `c_attn` (Conv1D, stored (n_in, n_out)) is three Keras
    layers: their HiRAs join into one of the summed rank (exact: the
    Hadamard product with the base is linear in AB), and split back."""
    hf = hf_model("gpt2", str(tmp_path / "gpt2"), layers=1)
    backbone = _backbone(hf)
    kl.enable_adapter(backbone, method="hira", rank=2, rank_pattern={"value": 1})
    for _, a in kl.adapters(backbone):
        perturb(a)
    expected = _keras_logits(backbone)
    out = str(tmp_path / "peft")
    kl.save_peft_adapter(backbone, out, hf)
    config = json.load(open(os.path.join(out, "adapter_config.json")))
    assert config["fan_in_fan_out"] is True
    assert config["r"] == 5 and not config["rank_pattern"]  # q, k, v: 2 + 2 + 1
    _close(_torch_logits(peft.PeftModel.from_pretrained(_hf(hf), out).eval()), expected)
    fresh = _backbone(hf)
    kl.load_peft_adapter(fresh, out, hf)
    _close(_keras_logits(fresh), expected)


def test_mixed_dropout_cannot_be_one_peft_directory(llama_dir, tmp_path):
    backbone = _backbone(llama_dir)
    kl.enable_adapter(backbone, method="hira", rank=2, targets=["*/query"], dropout=0.1)
    kl.enable_adapter(backbone, method="hira", rank=2, targets=["*/value"])
    with pytest.raises(ValueError, match="one hira_dropout"):
        kl.save_peft_adapter(backbone, str(tmp_path / "x"), llama_dir)
    assert not os.path.exists(tmp_path / "x")
