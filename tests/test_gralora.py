"""GraLoRA (`method="gralora"`): parity with Hugging Face PEFT's GraLoRA
(forward, merged kernel, init; with and without the hybrid LoRA) on a torch
`nn.Linear` and its Keras twin; PEFT directories both ways on a tiny Hugging
Face Llama converted by KerasHub; and what the adapter contract does not
cover: the equal-block path against the masked one, the exact LoRA form,
batched EinsumDense kernels, the refusals. PEFT runs in PyTorch beside the
Keras backend under test."""

import json
import os

import keras
import numpy as np
import pytest

import keras_lowrank as kl
from keras_lowrank.methods import gralora

from conftest import REFERENCE_MERGED
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

N_IN, N_OUT = 8, 12
X = np.random.RandomState(0).normal(size=(5, N_IN)).astype("float32")
#: (r, gralora_k, hybrid_r, alpha)
CONFIGS = {"k2": (4, 2, 0, 6), "k4_hybrid": (8, 4, 2, 5)}





def _dense(n_in=N_IN, n_out=N_OUT):
    inp = keras.Input((n_in,))
    return keras.Model(inp, keras.layers.Dense(n_out, name="lin")(inp))


# ----------------------------------------------------------------------
# A torch Linear and its Keras twin
class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(N_IN, N_OUT)

    def forward(self, x):
        return self.lin(x)


def _pair(config, seed=0):
    """PEFT's GraLoRA on a torch Linear with nonzero factors, and the Keras
    Dense twin with the same weights."""
    r, k, h, alpha = CONFIGS[config]
    torch.manual_seed(seed)
    net = _Net()
    model = _dense()
    model.get_layer("lin").set_weights(
        [net.lin.weight.detach().numpy().T.copy(), net.lin.bias.detach().numpy().copy()])
    pm = peft.get_peft_model(net, peft.GraloraConfig(
        r=r, gralora_k=k, hybrid_r=h, alpha=alpha, target_modules=["lin"]))
    lin = pm.base_model.model.lin
    rng = np.random.RandomState(seed + 1)
    a = rng.normal(scale=0.5, size=(k, N_IN // k, r)).astype("float32")
    b = rng.normal(scale=0.5, size=(k, r, N_OUT // k)).astype("float32")
    with torch.no_grad():
        lin.gralora_A["default"].copy_(torch.tensor(a))
        lin.gralora_B["default"].copy_(torch.tensor(b))
    kl.enable_adapter(model, method="gralora", rank=r, alpha=alpha, gralora_k=k, hybrid_rank=h,
                      targets=["lin"])
    layer = model.get_layer("lin")
    layer.gralora_a.assign(a.reshape(N_IN, r))
    layer.gralora_b.assign(np.transpose(b, (1, 0, 2)).reshape(r, N_OUT))
    if h:
        h_a = rng.normal(scale=0.5, size=(h, N_IN)).astype("float32")
        h_b = rng.normal(scale=0.5, size=(N_OUT, h)).astype("float32")
        with torch.no_grad():
            lin.gralora_A_general["default"].weight.copy_(torch.tensor(h_a))
            lin.gralora_B_general["default"].weight.copy_(torch.tensor(h_b))
        layer.hybrid_a.assign(h_a)
        layer.hybrid_b.assign(h_b.T)
    return pm.eval(), model, layer


@pytest.mark.parametrize("config", list(CONFIGS))
def test_forward_and_merged_kernel_match_peft(config):
    pm, model, layer = _pair(config)
    assert layer.scaling == pytest.approx(pm.base_model.model.lin.scaling["default"])
    with torch.no_grad():
        want = pm(torch.tensor(X)).numpy()
        base = pm.base_model.model.lin.base_layer(torch.tensor(X)).numpy()
    assert np.abs(want - base).max() > 1e-2  # the update is not trivial
    _close(to_np(model(X)), want)
    delta = pm.base_model.model.lin.get_delta_weight("default").detach().numpy().T
    _close(to_np(layer.delta_matrix()), delta)
    merged = pm.merge_and_unload().lin.weight.detach().numpy().T
    kl.merge(model)
    _close(to_np(model.get_layer("lin").kernel), merged)
    _close(to_np(model(X)), want)


def test_init_is_peft_s():
    """Each block's A rows U(±1/sqrt(n_in/k)), the hybrid's U(±1/sqrt(n_in)),
    B = 0 (PEFT's GraloraConfig(init_weights=True))."""
    n_in, n_out, r, k, h = 64, 48, 16, 4, 8
    inp = keras.Input((n_in,))
    model = keras.Model(inp, keras.layers.Dense(n_out, name="lin")(inp))
    kl.enable_adapter(model, method="gralora", rank=r, gralora_k=k, hybrid_rank=h, seed=3, targets=["lin"])
    layer = model.get_layer("lin")
    torch.manual_seed(0)
    pm = peft.get_peft_model(torch.nn.Sequential(torch.nn.Linear(n_in, n_out)),
                             peft.GraloraConfig(r=r, gralora_k=k, hybrid_r=h, target_modules=["0"]))
    lin = pm.base_model.model[0]
    for ours, theirs, fan_in in [
        (to_np(layer.gralora_a), lin.gralora_A["default"].detach().numpy(), n_in / k),
        (to_np(layer.hybrid_a), lin.gralora_A_general["default"].weight.detach().numpy(), n_in),
    ]:
        assert ours.size == theirs.size
        bound = 1 / np.sqrt(fan_in)
        assert np.abs(ours).max() <= bound and np.abs(theirs).max() <= bound
        assert ours.std() == pytest.approx(theirs.std(), rel=0.15)
    assert not to_np(layer.gralora_b).any() and not to_np(layer.hybrid_b).any()
    assert not lin.gralora_B["default"].detach().numpy().any()
    assert layer.trainable_count() == sum(p.numel() for p in pm.parameters() if p.requires_grad)


# ----------------------------------------------------------------------
# What the contract does not cover
def test_equal_blocks_and_masked_blocks_agree(monkeypatch):
    """The reshape path (k divides both sizes, PEFT's) and the masked path
    (any sizes) are the same function."""
    model = _dense()
    kl.enable_adapter(model, method="gralora", rank=4, gralora_k=2, hybrid_rank=1, targets=["lin"])
    layer = model.get_layer("lin")
    perturb(layer)
    assert layer.even()
    y, delta = to_np(model(X)), to_np(layer.delta_matrix())
    monkeypatch.setattr(type(layer), "even", lambda self: False)
    _close(to_np(model(X)), y)
    _close(to_np(layer.delta_matrix()), delta)
    _close(to_np(model(X)), np.einsum("nd,do->no", X.astype("float64"),
                                      REFERENCE_MERGED["gralora"](layer, to_np(layer.layer.kernel).astype("float64")))
           + to_np(layer.layer.bias))


def test_the_lora_form_is_exact(tmp_path):
    """save_adapter(as_lora=True): one rank-r/k pair per block, then the
    hybrid pair: a LoRA of rank k·r + h with the same outputs (here on
    unequal blocks, 7 = 4 + 3 inputs, 5 = 3 + 2 outputs)."""
    n_in, n_out = 7, 5
    x = np.random.RandomState(1).normal(size=(4, n_in)).astype("float32")
    model = _dense(n_in, n_out)
    weights = [to_np(w) for w in model.weights]
    kl.enable_adapter(model, method="gralora", rank=4, gralora_k=2, hybrid_rank=1, alpha=3.0, targets=["lin"])
    perturb(model.get_layer("lin"))
    y = to_np(model(x))
    f = tmp_path / "lora.safetensors"
    kl.save_adapter(model, f, as_lora=True)
    fresh = _dense(n_in, n_out)
    for w, v in zip(fresh.weights, weights):
        w.assign(v)
    kl.load_adapter(fresh, f)
    lora = fresh.get_layer("lin")
    assert lora.method == "lora" and lora.rank == 2 * 4 + 1
    _close(to_np(fresh(x)), y)


@pytest.mark.parametrize("h", [4, 3])
def test_batched_einsum_kernel(h):
    """A kernel with an axis shared by input and output (`n`): one GraLoRA
    per slice of the matrix view, `(n, 5, h)` (equal blocks on the output
    side for h=4, not for h=3)."""
    x = np.random.RandomState(2).normal(size=(2, 3, 4, 6)).astype("float32")
    inp = keras.Input((3, 4, 6))
    out = keras.layers.EinsumDense("btnd,ndh->btnh", output_shape=(3, 4, h), name="target")(inp)
    model = keras.Model(inp, out)
    kl.enable_adapter(model, method="gralora", rank=2, gralora_k=2, hybrid_rank=1, targets=["target"])
    layer = model.get_layer("target")
    assert tuple(layer.gralora_a.shape) == (4, 6, 2) and tuple(layer.gralora_b.shape) == (4, 2, h)
    assert layer.even() == (h == 4)
    perturb(layer)
    k0 = to_np(layer.layer.kernel).astype("float64")
    merged = np.stack([REFERENCE_MERGED["gralora"](_Slice(layer, i), k0[i]) for i in range(4)])
    want = np.einsum("btnd,ndh->btnh", x, merged)
    _close(to_np(model(x)), want)
    _close(to_np(layer.delta_matrix()), merged - k0)
    kl.merge(model)
    _close(to_np(model(x)), want)


class _Slice:
    """Slice `i` of a batched adapter, as the reference reads adapters."""

    def __init__(self, adapter, i):
        self.gralora_k, self.rank, self.hybrid_rank = adapter.gralora_k, adapter.rank, adapter.hybrid_rank
        self.scaling = adapter.scaling
        for name in ("gralora_a", "gralora_b", "hybrid_a", "hybrid_b"):
            setattr(self, name, to_np(getattr(adapter, name))[i])


def test_refusals_change_nothing():
    model = _dense(6, 3)
    before = [to_np(w).copy() for w in model.weights]
    for kwargs, match in [
        (dict(rank=3, gralora_k=2), r"rank=3 for 'lin' must be divisible by gralora_k=2"),
        (dict(rank=4, gralora_k=4), r"gralora_k=4 is larger than layer 'lin' allows.*6x3"),
        (dict(rank=2, hybrid_rank=-1), r"hybrid_rank"),
        (dict(rank=2, gralora_k=0), r"gralora_k"),
    ]:
        with pytest.raises(ValueError, match=match):
            kl.enable_adapter(model, method="gralora", targets=["lin"], **kwargs)
        assert not kl.adapters(model)
        for w, v in zip(model.weights, before):
            np.testing.assert_array_equal(to_np(w), v)


# ----------------------------------------------------------------------
# PEFT directories on a KerasHub model converted from Hugging Face
@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return hf_model("llama", str(tmp_path_factory.mktemp("llama")), layers=1)


def test_peft_directory_loads_with_the_same_logits(llama_dir, tmp_path):
    pm = peft.get_peft_model(_hf(llama_dir), peft.GraloraConfig(
        r=4, gralora_k=2, hybrid_r=2, alpha=6, gralora_dropout=0.1, target_modules=ALL))
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "gralora_" in name:
                p.copy_(0.3 * torch.randn_like(p))
    pm.save_pretrained(str(tmp_path / "ad"))
    expected = _torch_logits(pm.eval())
    assert np.abs(_torch_logits(_hf(llama_dir)) - expected).max() > 1e-3  # not a no-op
    backbone = _backbone(llama_dir)
    kl.load_peft_adapter(backbone, str(tmp_path / "ad"), llama_dir)
    layers = dict(kl.adapters(backbone))
    assert len(layers) == 7 and {a.method for a in layers.values()} == {"gralora"}
    assert {(a.rank, a.gralora_k, a.hybrid_rank, a.alpha, a.dropout) for a in layers.values()} == {(4, 2, 2, 6.0, 0.1)}
    _close(_keras_logits(backbone), expected)


def test_save_peft_adapter_loads_in_peft(llama_dir, tmp_path):
    backbone = _backbone(llama_dir)
    kl.enable_adapter(backbone, method="gralora", rank=4, gralora_k=2, hybrid_rank=1, alpha=3.0)
    for _, a in kl.adapters(backbone):
        perturb(a)
    expected = _keras_logits(backbone)
    out = str(tmp_path / "peft")
    kl.save_peft_adapter(backbone, out, llama_dir)
    config = json.load(open(os.path.join(out, "adapter_config.json")))
    assert config["peft_type"] == "GRALORA"
    assert (config["r"], config["gralora_k"], config["hybrid_r"], config["alpha"]) == (4, 2, 1, 3.0)
    pm = peft.PeftModel.from_pretrained(_hf(llama_dir), out).eval()
    assert isinstance(pm.peft_config["default"], peft.GraloraConfig)
    got = _torch_logits(pm)
    assert np.abs(got - _torch_logits(_hf(llama_dir))).max() > 1e-3
    _close(got, expected)
    fresh = _backbone(llama_dir)  # and back, the base model from the config
    kl.load_peft_adapter(fresh, out)
    _close(_keras_logits(fresh), expected)


def test_what_one_peft_directory_cannot_hold_is_refused(llama_dir, tmp_path):
    backbone = _backbone(llama_dir)  # k=3 divides 24 (the MLP) but not 16 or 8
    kl.enable_adapter(backbone, method="gralora", rank=3, gralora_k=3, targets=["*feedforward*", "*/query"])
    with pytest.raises(ValueError, match=r"query.*16x16.*gralora_k=3 does not divide"):
        kl.save_peft_adapter(backbone, str(tmp_path / "x"), llama_dir)
    other = _backbone(llama_dir)
    kl.enable_adapter(other, method="gralora", rank=2, targets=["*/query"])
    kl.enable_adapter(other, method="gralora", rank=4, targets=["*/value"])
    with pytest.raises(ValueError, match="one r, alpha, gralora_k"):
        kl.save_peft_adapter(other, str(tmp_path / "x"), llama_dir)
    assert not os.path.exists(tmp_path / "x")


@pytest.mark.one_backend
def test_block_sizes():
    assert gralora.block_sizes(12, 4) == [3, 3, 3, 3]
    assert gralora.block_sizes(7, 3) == [3, 2, 2]
    assert [len(p) for p in np.array_split(np.arange(7), 3)] == gralora.block_sizes(7, 3)
