"""Lily (`method="lily"`): parity with Hugging Face PEFT's Lily (forward,
the update on a batch, init, which projectors are tied) on a stack of torch
`nn.Linear`s and its Keras twin; PEFT directories both ways on a tiny
Hugging Face Llama converted by KerasHub; the shared projectors held once
and tied through `.keras` and adapter files; batched EinsumDense kernels;
the refusals. PEFT runs in PyTorch beside the Keras backend under test."""

import json
import os

import keras
import numpy as np
import pytest

import keras_lowrank as kl
from keras_lowrank import shared
from keras_lowrank.methods import lily

from conftest import perturb
from conftest import to_np

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
keras_hub = pytest.importorskip("keras_hub")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from peft_models import ALL
from peft_models import close as _close
from peft_models import hf_model
from peft_models import keras_backbone as _backbone
from peft_models import keras_logits as _keras_logits
from peft_models import load_hf as _hf
from peft_models import torch_logits as _torch_logits

N, LAYERS, R, NUM_B, STRIDE, SCALE = 8, 4, 3, 3, 2, 0.7
X = np.random.RandomState(0).normal(size=(2, 5, N)).astype("float32")


def _stack(layers=LAYERS):
    inp = keras.Input((5, N))
    h = inp
    for i in range(layers):
        h = keras.layers.Dense(N, name=f"lin_{i}")(h)
    return keras.Model(inp, h)


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.ModuleDict({"lin": torch.nn.Linear(N, N)})
                                          for _ in range(LAYERS))

    def forward(self, x):
        for block in self.blocks:
            x = block["lin"](x)
        return x


def _peft_layers(pm):
    return [pm.base_model.model.blocks[i]["lin"] for i in range(LAYERS)]


def _pair(seed=0):
    """PEFT's Lily on four torch Linears (A tied in pairs, B by all) with
    every factor nonzero, and the Keras twin with the same values."""
    torch.manual_seed(seed)
    net = _Net()
    model = _stack()
    for i, block in enumerate(net.blocks):
        model.get_layer(f"lin_{i}").set_weights(
            [block["lin"].weight.detach().numpy().T.copy(), block["lin"].bias.detach().numpy().copy()])
    pm = peft.get_peft_model(net, peft.LilyConfig(
        r=R, stride_A=STRIDE, num_B=NUM_B, scaling=SCALE, target_modules=["lin"]))
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lily_" in name:
                p.copy_(0.4 * torch.randn_like(p))
    kl.enable_adapter(model, method="lily", rank=R, stride_a=STRIDE, num_b=NUM_B, scaling=SCALE,
                      targets=["lin_*"])
    for i, lin in enumerate(_peft_layers(pm)):
        layer = model.get_layer(f"lin_{i}")
        a, b = layer.projectors()
        a.assign(lin.lily_A["default"].weight.detach().numpy().T)
        b.assign(lin.lily_B["default"].weight.detach().numpy().reshape(NUM_B, R, N))
        layer.lily_router.assign(lin.lily_router["default"].weight.detach().numpy().T)
    return pm.eval(), model


def test_forward_and_update_match_peft():
    pm, model = _pair()
    with torch.no_grad():
        want = pm(torch.tensor(X)).numpy()
        with pm.disable_adapter():
            plain = pm(torch.tensor(X)).numpy()
    assert np.abs(want - plain).max() > 1e-2  # the update is not trivial
    _close(to_np(model(X)), want)
    # each layer's update on this batch, restated from PEFT's tensors
    x = X.reshape(-1, N).astype("float64")
    for i, lin in enumerate(_peft_layers(pm)):
        a = lin.lily_A["default"].weight.detach().numpy().astype("float64").T
        b = lin.lily_B["default"].weight.detach().numpy().astype("float64").reshape(NUM_B, R, N)
        router = lin.lily_router["default"].weight.detach().numpy().astype("float64").T
        logits = (x @ a) @ router
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p = (p / p.sum(-1, keepdims=True)).mean(0)
        delta = SCALE * a @ np.einsum("e,ero->ro", p, b)
        _close(to_np(model.get_layer(f"lin_{i}").delta_matrix()), delta, tol=1e-5)
        w = lin.base_layer.weight.detach().numpy().T.astype("float64")
        x = x @ (w + delta) + lin.base_layer.bias.detach().numpy()
    _close(x.reshape(want.shape), want)
    with pytest.raises(NotImplementedError):  # PEFT does not merge Lily
        _peft_layers(pm)[0].merge()
    kl.merge(model)  # folds the mixture of the batch just seen: same outputs on it
    _close(to_np(model(X)), want)


def test_projectors_are_tied_as_peft_ties_them():
    pm, model = _pair()
    theirs = _peft_layers(pm)
    ours = [model.get_layer(f"lin_{i}").projectors() for i in range(LAYERS)]
    for i in range(LAYERS):
        for j in range(LAYERS):
            same_a = theirs[i].lily_A["default"] is theirs[j].lily_A["default"]
            assert (ours[i][0] is ours[j][0]) == same_a == (i // STRIDE == j // STRIDE)
            assert (ours[i][1] is ours[j][1]) == (theirs[i].lily_B["default"] is theirs[j].lily_B["default"])
    assert len({id(o[1]) for o in ours}) == 1


def test_init_is_peft_s():
    """A U(±1/sqrt(n_in)), the router U(±1/sqrt(r)), B = 0, and the same
    number of trainable parameters as PEFT (shared ones once)."""
    r = 4
    model = _stack()
    s = kl.enable_adapter(model, method="lily", rank=r, stride_a=STRIDE, num_b=NUM_B, seed=3,
                          targets=["lin_*"])
    torch.manual_seed(0)
    pm = peft.get_peft_model(_Net(), peft.LilyConfig(r=r, stride_A=STRIDE, num_B=NUM_B,
                                                     target_modules=["lin"]))
    assert s.trainable_params == sum(p.numel() for p in pm.parameters() if p.requires_grad)
    layer = model.get_layer("lin_0")
    a, b = layer.projectors()
    assert np.abs(to_np(a)).max() <= 1 / np.sqrt(N) and to_np(a).std() > 0
    assert np.abs(to_np(layer.lily_router)).max() <= 1 / np.sqrt(r)
    assert not to_np(b).any()
    assert tuple(a.shape) == (N, r) and tuple(b.shape) == (NUM_B, r, N)
    assert tuple(layer.lily_router.shape) == (r, NUM_B)


def test_shared_projectors_are_stored_once_and_stay_tied(tmp_path):
    model = _stack()
    base = [to_np(w).copy() for w in model.weights]
    kl.enable_adapter(model, method="lily", rank=2, stride_a=STRIDE, num_b=2, targets=["lin_*"])
    for _, a in kl.adapters(model):
        perturb(a)
    y = to_np(model(X))
    names = [v.path for v in model.weights if "lily_a" in v.path or "lily_b" in v.path]
    assert len(names) == len(set(names)) == LAYERS // STRIDE + 1
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    _close(to_np(loaded(X)), y)
    a0, b0 = loaded.get_layer("lin_0").projectors()
    a1, b1 = loaded.get_layer("lin_1").projectors()
    a2, b2 = loaded.get_layer("lin_2").projectors()
    assert a0 is a1 and a0 is not a2 and b0 is b1 is b2
    assert shared.get(loaded, "lily") is not None
    # an adapter file: each projector once
    f = tmp_path / "a.safetensors"
    kl.save_adapter(model, f)
    keys = list(safetensors_numpy.load_file(str(f)))
    assert sum("lily_a" in k for k in keys) == LAYERS // STRIDE and sum("lily_b" in k for k in keys) == 1
    fresh = _stack()
    for w, v in zip(fresh.weights, base):
        w.assign(v)
    kl.load_adapter(fresh, f)
    _close(to_np(fresh(X)), y)
    fa0, fb0 = fresh.get_layer("lin_0").projectors()
    fa1, fb1 = fresh.get_layer("lin_1").projectors()
    assert fa0 is fa1 and fb0 is fb1
    fa0.assign(np.ones(tuple(fa0.shape), "float32"))  # one variable, seen by both
    np.testing.assert_array_equal(to_np(fresh.get_layer("lin_1").projectors()[0]), 1.0)


def test_merge_folds_the_mixture_of_the_last_inference_batch():
    """Training does not move `lily_mix`; a compiled `predict` records its
    batch's mixture, and a merge then keeps that batch's outputs."""
    model = _stack(2)
    kl.enable_adapter(model, method="lily", rank=2, num_b=3, targets=["lin_*"])
    for _, a in kl.adapters(model):
        perturb(a)
    x1 = np.random.RandomState(5).normal(size=(4, 5, N)).astype("float32")
    x2 = np.random.RandomState(6).normal(size=(4, 5, N)).astype("float32")
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
    model.fit(x1, np.zeros_like(x1), batch_size=4, epochs=1, verbose=0)
    for _, a in kl.adapters(model):
        np.testing.assert_allclose(to_np(a.lily_mix), np.full(3, 1 / 3), rtol=1e-6)
    y2 = model.predict(x2, batch_size=4, verbose=0)
    mixes = [to_np(a.lily_mix).copy() for _, a in kl.adapters(model)]
    assert all(abs(m.sum() - 1) < 1e-5 and np.abs(m - 1 / 3).max() > 1e-4 for m in mixes)
    kl.merge(model)
    _close(to_np(model(x2)), y2)


def test_batched_einsum_kernel():
    """Per-head kernels `(n, d, h)`: each head has its own A, B and router
    and its own mixture (the mean over the rows of that head)."""
    x = np.random.RandomState(2).normal(size=(2, 3, 4, 6)).astype("float32")
    inp = keras.Input((3, 4, 6))
    h = keras.layers.EinsumDense("btnd,ndh->btnh", output_shape=(3, 4, 6), name="head_0")(inp)
    out = keras.layers.EinsumDense("btnd,ndh->btnh", output_shape=(3, 4, 5), name="head_1")(h)
    model = keras.Model(inp, out)
    kl.enable_adapter(model, method="lily", rank=2, num_b=3, scaling=0.5, targets=["head_*"])
    l0, l1 = model.get_layer("head_0"), model.get_layer("head_1")
    assert l0.projectors()[1] is not l1.projectors()[1]  # other shapes: other groups
    assert tuple(l0.projectors()[0].shape) == (4, 6, 2) and tuple(l0.projectors()[1].shape) == (4, 3, 2, 6)
    assert tuple(l0.lily_router.shape) == (4, 2, 3)
    perturb(l0)
    perturb(l1, seed=1)
    y = to_np(model(x))
    cur = x.astype("float64")
    for layer in (l0, l1):
        a, b = (to_np(v).astype("float64") for v in layer.projectors())
        router = to_np(layer.lily_router).astype("float64")
        k = to_np(layer.layer.kernel).astype("float64")
        outs = []
        for n in range(4):
            rows = cur[:, :, n, :].reshape(-1, cur.shape[-1])
            logits = rows @ a[n] @ router[n]
            p = np.exp(logits - logits.max(-1, keepdims=True))
            p = (p / p.sum(-1, keepdims=True)).mean(0)
            merged = k[n] + 0.5 * a[n] @ np.einsum("e,ero->ro", p, b[n])
            outs.append((rows @ merged).reshape(2, 3, -1))
            _close(to_np(layer.delta_matrix())[n], merged - k[n])
        cur = np.stack(outs, axis=2)
    _close(y, cur)
    kl.merge(model)
    _close(to_np(model(x)), y)


def test_refusals_change_nothing():
    model = _stack(2)
    before = [to_np(w).copy() for w in model.weights]
    for kwargs, match in [
        (dict(rank=2, stride_a=0), r"stride_a"),
        (dict(rank=2, num_b=0), r"num_b"),
        (dict(rank=2, scaling=float("nan")), r"scaling"),
        (dict(rank=2, a_group="x/y"), r"a_group"),
    ]:
        with pytest.raises(ValueError, match=match):
            kl.enable_adapter(model, method="lily", targets=["lin_*"], **kwargs)
        assert not kl.adapters(model)
        for w, v in zip(model.weights, before):
            np.testing.assert_array_equal(to_np(w), v)
    kl.enable_adapter(model, method="lily", rank=2, targets=["lin_0"])
    snapshot = [to_np(w).copy() for w in model.weights]
    with pytest.raises(ValueError, match="one enable_adapter call"):
        kl.enable_adapter(model, method="lily", rank=2, targets=["lin_1"])
    assert [p for p, _ in kl.adapters(model)] == ["lin_0"]
    for w, v in zip(model.weights, snapshot):
        np.testing.assert_array_equal(to_np(w), v)


@pytest.mark.one_backend
def test_groups():
    g = lily.groups(["b_10/q", "b_2/q", "b_1/q", "b_1/v"], [(4, 4)] * 4, stride_a=2)
    assert g == {"b_1/q": ("0_0", "0"), "b_2/q": ("0_0", "0"), "b_10/q": ("0_1", "0"),
                 "b_1/v": ("1_0", "1")}
    shapes = {m: (4, 4) for m in ("m.0.q_proj", "m.1.q_proj", "m.0.v_proj")}
    theirs = lily.peft_groups(list(shapes), shapes, {"target_modules": ["q_proj", "v_proj"], "stride_A": 2})
    assert theirs["m.1.q_proj"] == ("m.0.q_proj", "m.0.q_proj") and theirs["m.0.v_proj"][1] == "m.0.v_proj"


# ----------------------------------------------------------------------
# PEFT directories on a KerasHub model converted from Hugging Face
@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return hf_model("llama", str(tmp_path_factory.mktemp("llama")), layers=2)


def test_peft_directory_loads_with_the_same_logits(llama_dir, tmp_path):
    pm = peft.get_peft_model(_hf(llama_dir), peft.LilyConfig(
        r=4, stride_A=2, num_B=2, scaling=0.5, target_modules=ALL))
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lily_" in name:
                p.copy_(0.3 * torch.randn_like(p))
    pm.save_pretrained(str(tmp_path / "ad"))
    expected = _torch_logits(pm.eval())
    assert np.abs(_torch_logits(_hf(llama_dir)) - expected).max() > 1e-3  # not a no-op
    backbone = _backbone(llama_dir)
    kl.load_peft_adapter(backbone, str(tmp_path / "ad"), llama_dir)
    layers = dict(kl.adapters(backbone))
    assert len(layers) == 14 and {a.method for a in layers.values()} == {"lily"}
    assert {(a.rank, a.stride_a, a.num_b, a.scaling) for a in layers.values()} == {(4, 2, 2, 0.5)}
    q0 = [a for p, a in layers.items() if p.endswith("query") and "_0/" in p][0]
    q1 = [a for p, a in layers.items() if p.endswith("query") and "_1/" in p][0]
    assert q0.projectors()[0] is q1.projectors()[0] and q0.projectors()[1] is q1.projectors()[1]
    _close(_keras_logits(backbone), expected)


def test_save_peft_adapter_loads_in_peft(llama_dir, tmp_path):
    backbone = _backbone(llama_dir)
    kl.enable_adapter(backbone, method="lily", rank=2, stride_a=1, num_b=2, scaling=0.8)
    for _, a in kl.adapters(backbone):
        perturb(a)
    expected = _keras_logits(backbone)
    out = str(tmp_path / "peft")
    kl.save_peft_adapter(backbone, out, llama_dir)
    config = json.load(open(os.path.join(out, "adapter_config.json")))
    assert config["peft_type"] == "LILY"
    assert (config["r"], config["stride_A"], config["num_B"], config["scaling"]) == (2, 1, 2, 0.8)
    pm = peft.PeftModel.from_pretrained(_hf(llama_dir), out).eval()
    assert isinstance(pm.peft_config["default"], peft.LilyConfig)
    got = _torch_logits(pm)
    assert np.abs(got - _torch_logits(_hf(llama_dir))).max() > 1e-3
    _close(got, expected)
    fresh = _backbone(llama_dir)  # and back, the base model from the config
    kl.load_peft_adapter(fresh, out)
    _close(_keras_logits(fresh), expected)


def test_peft_directory_tied_otherwise_is_refused(llama_dir, tmp_path):
    """A regex `target_modules` makes PEFT share projectors across kinds of
    layers (by shape only); keras-lowrank shares within a kind: refused by
    name, the model unchanged."""
    pm = peft.get_peft_model(_hf(llama_dir), peft.LilyConfig(
        r=2, num_B=2, target_modules=r".*\.(q_proj|o_proj)"))
    pm.save_pretrained(str(tmp_path / "ad"))
    backbone = _backbone(llama_dir)
    before = [to_np(w).copy() for w in backbone.weights]
    with pytest.raises(ValueError, match="PEFT shares lily_B"):
        kl.load_peft_adapter(backbone, str(tmp_path / "ad"), llama_dir)
    assert not kl.adapters(backbone)
    assert all(np.array_equal(to_np(w), v) for w, v in zip(backbone.weights, before))
