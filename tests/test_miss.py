"""MiSS (`method="miss"`): parity with Hugging Face PEFT's MiSS in its three
modes (the default, "mini", "bat"; forward, merged kernel, unmerge, init) on
a torch `nn.Linear` and its Keras twin; PEFT directories both ways on a tiny
Hugging Face Llama converted by KerasHub; and what the adapter contract does
not cover: the modes other than the default (over a quantized base too),
batched EinsumDense kernels, the refusals. PEFT runs in PyTorch beside the
Keras backend under test."""

import json
import os

import keras
import numpy as np
import pytest

import keras_lowrank as kl

from conftest import REFERENCE_MERGED
from conftest import np_layer_output
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
#: (r, mode, mini_r): r=3 leaves a shorter last shard (8 = 3 + 3 + 2)
CONFIGS = {"miss_r3": (3, "miss", 1), "miss_r4": (4, "miss", 1), "mini": (4, "mini", 3), "bat": (4, "bat", 1)}


def _dense(n_in=N_IN, n_out=N_OUT):
    inp = keras.Input((n_in,))
    return keras.Model(inp, keras.layers.Dense(n_out, name="lin")(inp))


def _peft_config(r, mode, mini_r, **kw):
    init = True if mode == "miss" else mode
    return peft.MissConfig(r=r, init_weights=init, mini_r=mini_r, **kw)


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(N_IN, N_OUT)

    def forward(self, x):
        return self.lin(x)


def _pair(config, seed=0):
    """PEFT's MiSS on a torch Linear with a nonzero block, and the Keras
    Dense twin with the same weights."""
    r, mode, mini_r = CONFIGS[config]
    torch.manual_seed(seed)
    net = _Net()
    model = _dense()
    model.get_layer("lin").set_weights(
        [net.lin.weight.detach().numpy().T.copy(), net.lin.bias.detach().numpy().copy()])
    pm = peft.get_peft_model(net, _peft_config(r, mode, mini_r, target_modules=["lin"]))
    lin = pm.base_model.model.lin
    block = np.random.RandomState(seed + 1).normal(
        scale=0.3, size=tuple(lin.miss_block["default"].shape)).astype("float32")
    with torch.no_grad():
        lin.miss_block["default"].copy_(torch.tensor(block))
    kl.enable_adapter(model, method="miss", rank=r, mode=mode, mini_rank=mini_r, targets=["lin"])
    layer = model.get_layer("lin")
    layer.miss_block.assign(block)  # PEFT's layout, as it is
    return pm.eval(), model, layer


@pytest.mark.parametrize("config", list(CONFIGS))
def test_forward_and_merged_kernel_match_peft(config):
    pm, model, layer = _pair(config)
    with torch.no_grad():
        want = pm(torch.tensor(X)).numpy()
        base = pm.base_model.model.lin.base_layer(torch.tensor(X)).numpy()
    assert np.abs(want - base).max() > 1e-2  # the update is not trivial
    _close(to_np(model(X)), want)
    k0 = to_np(layer.layer.kernel)
    merged = pm.merge_and_unload().lin.weight.detach().numpy().T
    _close(to_np(layer.delta_matrix()), merged - k0)
    _close(to_np(layer.merged_matrix(layer.base_matrix())), merged)
    kl.merge(model)
    _close(to_np(model.get_layer("lin").kernel), merged)
    _close(to_np(model(X)), want)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_unmerge_matches_peft(config):
    """Merged in place then unmerged: the base again, as PEFT's unmerge
    (`bat`: a solve with I + D_a; the others subtract the shard)."""
    pm, model, layer = _pair(config)
    k0 = to_np(layer.layer.kernel).copy()
    lin = pm.base_model.model.lin
    lin.merge()
    lin.unmerge()
    _close(lin.base_layer.weight.detach().numpy().T, k0)
    y = to_np(model(X))
    kl.merge(model, unload=False)
    _close(to_np(model(X)), y)
    kl.unmerge(model)
    _close(to_np(model.get_layer("lin").layer.kernel), k0)
    _close(to_np(model(X)), y)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_init_and_count_are_peft_s(config):
    """Every mode starts at a zero block (a no-op), with PEFT's number of
    trainable values."""
    r, mode, mini_r = CONFIGS[config]
    pm = peft.get_peft_model(_Net(), _peft_config(r, mode, mini_r, target_modules=["lin"]))
    model = _dense()
    y0 = to_np(model(X))
    kl.enable_adapter(model, method="miss", rank=r, mode=mode, mini_rank=mini_r, targets=["lin"])
    layer = model.get_layer("lin")
    theirs = pm.base_model.model.lin.miss_block["default"].detach().numpy()
    assert tuple(layer.miss_block.shape) == theirs.shape
    assert not theirs.any() and not to_np(layer.miss_block).any()
    np.testing.assert_array_equal(to_np(model(X)), y0)
    assert layer.trainable_count() == sum(p.numel() for p in pm.parameters() if p.requires_grad)
    config_back = type(layer).from_config(layer.get_config())
    assert (config_back.mode, config_back.mini_rank, config_back.rank) == (mode, mini_r, r)


# ----------------------------------------------------------------------
# What the contract does not cover
@pytest.mark.parametrize("mode", ["mini", "bat"])
def test_modes_on_a_quantized_base_and_keras_file(mode, tmp_path):
    """`mini` and `bat` over an NF4 base (`bat` builds its update from the
    dequantized kernel) follow the NumPy statement, survive a `.keras` round
    trip and merge into a float kernel."""
    x = np.random.RandomState(3).normal(size=(4, 8)).astype("float32")
    model = _dense(8, 8)
    kl.enable_adapter(model, method="miss", rank=4, mode=mode, mini_rank=2, base="nf4", targets=["lin"])
    layer = model.get_layer("lin")
    perturb(layer)
    y = to_np(model(x))
    _close(y, np_layer_output(layer, x, REFERENCE_MERGED["miss"]))
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.get_layer("lin").mode == mode
    _close(to_np(loaded(x)), y)
    kl.merge(model)
    _close(to_np(model(x)), y, tol=1e-4)


@pytest.mark.parametrize("mode", ["miss", "bat", "mini"])
def test_batched_einsum_kernel(mode):
    """A kernel with an axis shared by input and output (`n`): one MiSS per
    slice of the `(n, 6, 4)` matrix view."""
    x = np.random.RandomState(2).normal(size=(2, 3, 4, 6)).astype("float32")
    inp = keras.Input((3, 4, 6))
    out = keras.layers.EinsumDense("btnd,ndh->btnh", output_shape=(3, 4, 4), name="target")(inp)
    model = keras.Model(inp, out)
    kl.enable_adapter(model, method="miss", rank=2, mode=mode, mini_rank=2, targets=["target"])
    layer = model.get_layer("target")
    shape = {"miss": (4, 2, 4), "bat": (4, 2, 2, 2), "mini": (4, 2, 2)}[mode]
    assert tuple(layer.miss_block.shape) == shape
    perturb(layer)
    k0 = to_np(layer.layer.kernel).astype("float64")
    merged = np.stack([REFERENCE_MERGED["miss"](_Slice(layer, i), k0[i]) for i in range(4)])
    want = np.einsum("btnd,ndh->btnh", x, merged)
    _close(to_np(model(x)), want)
    _close(to_np(layer.delta_matrix()), merged - k0)
    kl.merge(model, unload=False)
    _close(to_np(model(x)), want)
    kl.unmerge(model)
    _close(to_np(model.get_layer("target").layer.kernel), k0)


class _Slice:
    """Slice `i` of a batched adapter, as the reference reads adapters."""

    def __init__(self, adapter, i):
        self.rank, self.mode, self.mini_rank = adapter.rank, adapter.mode, adapter.mini_rank
        self.miss_block = to_np(adapter.miss_block)[i]


def test_refusals_change_nothing():
    model = _dense(6, 4)
    before = [to_np(w).copy() for w in model.weights]
    for kwargs, match in [
        (dict(rank=7), r"rank=7 is larger than layer 'lin' allows.*6x4.*n_in=6"),
        (dict(rank=4, mode="bat"), r"rank=4 for layer 'lin' with mode='bat'.*6x4.*4x4 blocks"),
        (dict(rank=2, mode="mini", mini_rank=3), r"mini_rank=3 for layer 'lin'.*n_out=4"),
        (dict(rank=2, mode="tiny"), r"mode for 'enable_adapter' must be one of \('miss', 'bat', 'mini'\).*'tiny'"),
        (dict(rank=2, mini_rank=0), r"mini_rank"),
    ]:
        with pytest.raises(ValueError, match=match):
            kl.enable_adapter(model, method="miss", targets=["lin"], **kwargs)
        assert not kl.adapters(model)
        for w, v in zip(model.weights, before):
            np.testing.assert_array_equal(to_np(w), v)


# ----------------------------------------------------------------------
# PEFT directories on a KerasHub model converted from Hugging Face
@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return hf_model("llama", str(tmp_path_factory.mktemp("llama")), layers=1)


@pytest.mark.parametrize("config", ["miss_r4", "mini", "bat"])
def test_peft_directory_loads_with_the_same_logits(llama_dir, tmp_path, config):
    r, mode, _ = CONFIGS[config]
    mini_r = 4 if mode == "mini" else 1  # divides every output size (8, 16, 24)
    pm = peft.get_peft_model(_hf(llama_dir), _peft_config(r, mode, mini_r, miss_dropout=0.1,
                                                           target_modules=ALL))
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "miss_block" in name:
                p.copy_(0.1 * torch.randn_like(p))
    pm.save_pretrained(str(tmp_path / "ad"))
    expected = _torch_logits(pm.eval())
    assert np.abs(_torch_logits(_hf(llama_dir)) - expected).max() > 1e-3  # not a no-op
    backbone = _backbone(llama_dir)
    kl.load_peft_adapter(backbone, str(tmp_path / "ad"), llama_dir)
    layers = dict(kl.adapters(backbone))
    assert len(layers) == 7 and {a.method for a in layers.values()} == {"miss"}
    assert {(a.rank, a.mode, a.mini_rank, a.dropout) for a in layers.values()} == {(r, mode, mini_r, 0.1)}
    _close(_keras_logits(backbone), expected, tol=1e-4 if mode == "bat" else 1e-5)


@pytest.mark.parametrize("mode", ["miss", "bat"])
def test_save_peft_adapter_loads_in_peft(llama_dir, tmp_path, mode):
    backbone = _backbone(llama_dir)
    kl.enable_adapter(backbone, method="miss", rank=4, mode=mode)
    for _, a in kl.adapters(backbone):
        perturb(a, scale=0.1)
    expected = _keras_logits(backbone)
    out = str(tmp_path / "peft")
    kl.save_peft_adapter(backbone, out, llama_dir)
    config = json.load(open(os.path.join(out, "adapter_config.json")))
    assert config["peft_type"] == "MISS"
    assert (config["r"], config["init_weights"]) == (4, True if mode == "miss" else mode)
    pm = peft.PeftModel.from_pretrained(_hf(llama_dir), out).eval()
    assert isinstance(pm.peft_config["default"], peft.MissConfig)
    got = _torch_logits(pm)
    assert np.abs(got - _torch_logits(_hf(llama_dir))).max() > 1e-3
    tol = 1e-4 if mode == "bat" else 1e-5
    _close(got, expected, tol=tol)
    fresh = _backbone(llama_dir)  # and back, the base model from the config
    kl.load_peft_adapter(fresh, out)
    _close(_keras_logits(fresh), expected, tol=tol)


def test_what_one_peft_directory_cannot_hold_is_refused(llama_dir, tmp_path):
    other = _backbone(llama_dir)
    kl.enable_adapter(other, method="miss", rank=2, targets=["*/query"])
    kl.enable_adapter(other, method="miss", rank=4, targets=["*/value"])
    with pytest.raises(ValueError, match="one r, init_weights"):
        kl.save_peft_adapter(other, str(tmp_path / "x"), llama_dir)
    assert not os.path.exists(tmp_path / "x")

