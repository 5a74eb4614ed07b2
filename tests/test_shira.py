"""SHiRA (`method="shira"`): parity with Hugging Face PEFT's SHiRA (forward,
merged kernel, the mask's size and order) on a torch `nn.Linear` and its
Keras twin; PEFT directories both ways on a tiny Hugging Face Llama
converted by KerasHub; and what the adapter contract does not cover: the
seeded mask, the product from the entries against the dense one, batched
EinsumDense kernels, the refusals. PEFT runs in PyTorch beside the Keras
backend under test."""

import json
import os

import keras
import numpy as np
import pytest

import keras_lowrank as kl
from keras_lowrank.methods import shira

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


def _pair(r, seed=0):
    """PEFT's SHiRA on a torch Linear with nonzero weights, and the Keras
    Dense twin with the same weights and PEFT's entries."""
    torch.manual_seed(seed)
    net = _Net()
    model = _dense()
    model.get_layer("lin").set_weights(
        [net.lin.weight.detach().numpy().T.copy(), net.lin.bias.detach().numpy().copy()])
    pm = peft.get_peft_model(net, peft.ShiraConfig(r=r, random_seed=seed, target_modules=["lin"]))
    lin = pm.base_model.model.lin
    w = np.random.RandomState(seed + 1).normal(scale=0.5, size=r * (N_IN + N_OUT)).astype("float32")
    with torch.no_grad():
        lin.shira_weight["default"].copy_(torch.tensor(w))
    kl.enable_adapter(model, method="shira", rank=r, seed=seed, targets=["lin"])
    layer = model.get_layer("lin")
    idx = lin.shira_indices["default"].numpy()  # (torch rows = outputs, columns = inputs)
    layer.shira_index.assign(np.stack([idx[1], idx[0]]).astype("int32"))
    layer.shira_weight.assign(w)
    return pm.eval(), model, layer


@pytest.mark.parametrize("r", [1, 3])
def test_forward_and_merged_kernel_match_peft(r):
    pm, model, layer = _pair(r)
    with torch.no_grad():
        want = pm(torch.tensor(X)).numpy()
        base = pm.base_model.model.lin.base_layer(torch.tensor(X)).numpy()
    assert np.abs(want - base).max() > 1e-2  # the update is not trivial
    _close(to_np(model(X)), want)
    delta = pm.base_model.model.lin.get_delta_weight("default").to_dense().detach().numpy().T
    _close(to_np(layer.delta_matrix()), delta)
    merged = pm.merge_and_unload().lin.weight.detach().numpy().T
    kl.merge(model)
    _close(to_np(model.get_layer("lin").kernel), merged)
    _close(to_np(model(X)), want)


def test_mask_is_peft_s_in_size_and_order():
    """r (n_in + n_out) distinct entries, listed row-major over the torch
    weight (PEFT's order), zero weights at the start; the same seed gives
    the same entries, another seed others."""
    r = 2
    model = _dense()
    kl.enable_adapter(model, method="shira", rank=r, seed=5, targets=["lin"])
    layer = model.get_layer("lin")
    ours = to_np(layer.shira_index)
    pm = peft.get_peft_model(_Net(), peft.ShiraConfig(r=r, random_seed=5, target_modules=["lin"]))
    theirs = pm.base_model.model.lin.shira_indices["default"].numpy()
    assert ours.shape == theirs.shape == (2, r * (N_IN + N_OUT))
    flat = ours[1].astype(np.int64) * N_IN + ours[0]  # torch's row-major position
    assert np.all(np.diff(flat) > 0)
    assert np.all(np.diff(theirs[0].astype(np.int64) * N_IN + theirs[1]) > 0)
    assert not to_np(layer.shira_weight).any()
    assert layer.trainable_count() == sum(p.numel() for p in pm.parameters() if p.requires_grad)
    again = _dense()
    kl.enable_adapter(again, method="shira", rank=r, seed=5, targets=["lin"])
    np.testing.assert_array_equal(to_np(again.get_layer("lin").shira_index), ours)
    other = _dense()
    kl.enable_adapter(other, method="shira", rank=r, seed=6, targets=["lin"])
    assert not np.array_equal(to_np(other.get_layer("lin").shira_index), ours)


# ----------------------------------------------------------------------
# What the contract does not cover
def test_entries_and_dense_products_agree():
    """`x S` from the entries (few rows) and through the dense `S` (many
    rows, or rows unknown when traced) are the same function."""
    model = _dense()
    kl.enable_adapter(model, method="shira", rank=1, seed=0, targets=["lin"])
    layer = model.get_layer("lin")
    perturb(layer)
    x = np.random.RandomState(3).normal(size=(40, N_IN)).astype("float32")
    rows = keras.ops.convert_to_tensor(x)
    assert layer.use_entries(rows[:2]) and not layer.use_entries(rows)
    w, idx = layer.shira_weight, layer.shira_index.value
    dense = keras.ops.matmul(rows, layer.dense_update(w, idx))
    _close(to_np(layer.sparse_rows(rows, w, idx)), to_np(dense))
    want = x.astype("float64") @ REFERENCE_MERGED["shira"](layer, to_np(layer.layer.kernel).astype("float64"))
    want = want + to_np(layer.layer.bias)
    _close(to_np(model(x)), want)
    _close(to_np(model(x[:2])), want[:2])


def test_a_small_kernel_trains_every_entry():
    """r (n_in + n_out) > n_in n_out: every entry trains (PEFT refuses such
    an r), with a warning; such an adapter has no PEFT form."""
    model = _dense(5, 3)
    with pytest.warns(UserWarning, match="16 SHiRA entries of a 5x3 kernel"):
        kl.enable_adapter(model, method="shira", rank=2, targets=["lin"])
    layer = model.get_layer("lin")
    assert layer.trainable_count() == 15
    idx = to_np(layer.shira_index)
    assert len({(i, o) for i, o in idx.T}) == 15


@pytest.mark.parametrize("h", [4, 3])
def test_batched_einsum_kernel(h):
    """A kernel with an axis shared by input and output (`n`): one mask per
    slice of the matrix view (`seed + i`), `(n, 2, r (6 + h))`."""
    x = np.random.RandomState(2).normal(size=(2, 3, 4, 6)).astype("float32")
    inp = keras.Input((3, 4, 6))
    out = keras.layers.EinsumDense("btnd,ndh->btnh", output_shape=(3, 4, h), name="target")(inp)
    model = keras.Model(inp, out)
    kl.enable_adapter(model, method="shira", rank=1, seed=4, targets=["target"])
    layer = model.get_layer("target")
    idx = to_np(layer.shira_index)
    assert idx.shape == (4, 2, 6 + h) and tuple(layer.shira_weight.shape) == (4, 6 + h)
    for i in range(4):
        np.testing.assert_array_equal(idx[i], shira.random_indices(6, h, 6 + h, 4 + i))
    perturb(layer)
    k0 = to_np(layer.layer.kernel).astype("float64")
    merged = np.stack([REFERENCE_MERGED["shira"](_Slice(layer, i), k0[i]) for i in range(4)])
    want = np.einsum("btnd,ndh->btnh", x, merged)
    _close(to_np(model(x)), want)
    assert layer.use_entries(keras.ops.ones((4, 2, 6))) and not layer.use_entries(keras.ops.ones((4, 6, 6)))
    _close(to_np(layer(x[:1, :2])), want[:1, :2])  # 2 rows per slice: from the entries
    _close(to_np(layer.delta_matrix()), merged - k0)
    kl.merge(model)
    _close(to_np(model(x)), want)


class _Slice:
    """Slice `i` of a batched adapter, as the reference reads adapters."""

    def __init__(self, adapter, i):
        self.shira_index = to_np(adapter.shira_index)[i]
        self.shira_weight = to_np(adapter.shira_weight)[i]


def test_refusals_change_nothing(tmp_path):
    model = _dense(6, 3)
    before = [to_np(w).copy() for w in model.weights]
    for kwargs, match in [
        (dict(rank=4), r"rank=4 is larger than layer 'lin' allows.*6x3"),
        (dict(rank=0), r"rank"),
        (dict(rank=1, dropout=0.1), r"dropout"),
    ]:
        with pytest.raises(ValueError, match=match):
            kl.enable_adapter(model, method="shira", targets=["lin"], **kwargs)
        assert not kl.adapters(model)
        for w, v in zip(model.weights, before):
            np.testing.assert_array_equal(to_np(w), v)
    # an adapter file whose entries do not fit the kernel
    kl.enable_adapter(model, method="shira", rank=1, targets=["lin"])
    f = tmp_path / "a.safetensors"
    kl.save_adapter(model, f)
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    with safe_open(str(f), "np") as fh:
        metadata = fh.metadata()
    tensors = load_file(str(f))
    name = next(n for n in tensors if n.endswith("shira_index"))
    tensors[name] = tensors[name] + 0.5
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=metadata)
    fresh = _dense(6, 3)
    before = [to_np(w).copy() for w in fresh.weights]
    with pytest.raises(ValueError, match="shira_index"):
        kl.load_adapter(fresh, tmp_path / "bad.safetensors")
    assert not kl.adapters(fresh)
    for w, v in zip(fresh.weights, before):
        np.testing.assert_array_equal(to_np(w), v)


# ----------------------------------------------------------------------
# PEFT directories on a KerasHub model converted from Hugging Face
@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return hf_model("llama", str(tmp_path_factory.mktemp("llama")), layers=1)


def test_peft_directory_loads_with_the_same_logits(llama_dir, tmp_path):
    pm = peft.get_peft_model(_hf(llama_dir), peft.ShiraConfig(r=2, random_seed=7, target_modules=ALL))
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "shira_weight" in name:
                p.copy_(0.3 * torch.randn_like(p))
    pm.save_pretrained(str(tmp_path / "ad"))
    expected = _torch_logits(pm.eval())
    assert np.abs(_torch_logits(_hf(llama_dir)) - expected).max() > 1e-3  # not a no-op
    backbone = _backbone(llama_dir)
    kl.load_peft_adapter(backbone, str(tmp_path / "ad"), llama_dir)
    layers = dict(kl.adapters(backbone))
    assert len(layers) == 7 and {a.method for a in layers.values()} == {"shira"}
    assert {(a.rank, a.seed) for a in layers.values()} == {(2, 7)}
    _close(_keras_logits(backbone), expected)


def test_save_peft_adapter_loads_in_peft(llama_dir, tmp_path):
    backbone = _backbone(llama_dir)
    kl.enable_adapter(backbone, method="shira", rank=2, seed=3)
    for _, a in kl.adapters(backbone):
        perturb(a)
    expected = _keras_logits(backbone)
    out = str(tmp_path / "peft")
    kl.save_peft_adapter(backbone, out, llama_dir)
    config = json.load(open(os.path.join(out, "adapter_config.json")))
    assert (config["peft_type"], config["r"], config["random_seed"]) == ("SHIRA", 2, 3)
    pm = peft.PeftModel.from_pretrained(_hf(llama_dir), out).eval()
    assert isinstance(pm.peft_config["default"], peft.ShiraConfig)
    got = _torch_logits(pm)
    assert np.abs(got - _torch_logits(_hf(llama_dir))).max() > 1e-3
    _close(got, expected)
    fresh = _backbone(llama_dir)  # and back, the base model from the config
    kl.load_peft_adapter(fresh, out)
    _close(_keras_logits(fresh), expected)


def test_what_one_peft_directory_cannot_hold_is_refused(llama_dir, tmp_path):
    backbone = _backbone(llama_dir)
    kl.enable_adapter(backbone, method="shira", rank=1, targets=["*/query"])
    kl.enable_adapter(backbone, method="shira", rank=2, targets=["*/value"])
    with pytest.raises(ValueError, match="one r for every module"):
        kl.save_peft_adapter(backbone, str(tmp_path / "x"), llama_dir)
    other = _backbone(llama_dir)  # the key kernel is 16x8: r=6 trains every entry
    with pytest.warns(UserWarning, match="every entry trains"):
        kl.enable_adapter(other, method="shira", rank=6, targets=["*/key"])
    with pytest.raises(ValueError, match=r"key.*16x8.*r=6 trains every entry"):
        kl.save_peft_adapter(other, str(tmp_path / "x"), llama_dir)
    assert not os.path.exists(tmp_path / "x")


def test_a_peft_directory_with_bad_indices_is_refused(llama_dir, tmp_path):
    from safetensors.numpy import load_file, save_file

    pm = peft.get_peft_model(_hf(llama_dir), peft.ShiraConfig(r=1, random_seed=0, target_modules=["q_proj"]))
    pm.save_pretrained(str(tmp_path / "ad"))
    path = str(tmp_path / "ad" / "adapter_model.safetensors")
    tensors = load_file(path)
    name = next(n for n in tensors if n.endswith("shira_indices"))
    tensors[name][:, 1] = tensors[name][:, 0]  # a repeated entry
    save_file(tensors, path, metadata={"format": "pt"})
    backbone = _backbone(llama_dir)
    with pytest.raises(ValueError, match="repeat an entry"):
        kl.load_peft_adapter(backbone, str(tmp_path / "ad"), llama_dir)
    assert not kl.adapters(backbone)
