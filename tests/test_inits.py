"""The data-aware inits (`eva`, `corda`, `lora_ga`) and LoRA's
`init="orthogonal"`: parity with Hugging Face PEFT on the same weights and
the same sample data (a torch model of two Linear layers and its Keras
twin), the data forms `enable_adapter(data=...)` takes, quantized bases,
round trips, and refusals that leave the model unchanged. PEFT runs in
PyTorch beside the Keras backend under test.

An SVD fixes each singular vector only up to its sign. CorDA's and EVA's
factors pair the vectors of one triplet, so their update `s A B` is PEFT's
exactly; LoRA-GA pairs vectors of different triplets (`A` from one, `B`
from another), so its factors are compared with PEFT's up to a sign per
component."""

import keras
import numpy as np
import pytest

import keras_lowrank as kl

from conftest import to_np

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

N_IN, N_HID, N_OUT = 8, 6, 5
RNG = np.random.RandomState(0)
#: inputs in a 3-dimensional subspace (so that PEFT's randomized SVDs are exact)
BASIS = RNG.normal(size=(3, N_IN)).astype("float32")


def _batches(n=4, rows=24, low_rank=False, seed=1):
    rng = np.random.RandomState(seed)
    out = []
    for _ in range(n):
        if low_rank:
            x = (rng.normal(size=(rows, 3)) * [3.0, 1.5, 0.5]) @ BASIS + 0.3
        else:
            x = rng.normal(size=(rows, N_IN)) * np.linspace(2.0, 0.2, N_IN)
        out.append(x.astype("float32"))
    return out


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(N_IN, N_HID)
        self.b = torch.nn.Linear(N_HID, N_OUT)

    def forward(self, x):
        return self.b(self.a(x))


def _twins(seed=0):
    torch.manual_seed(seed)
    net = _Net()
    inp = keras.Input((N_IN,))
    model = keras.Model(inp, keras.layers.Dense(N_OUT, name="b")(keras.layers.Dense(N_HID, name="a")(inp)))
    for name in ("a", "b"):
        lin = getattr(net, name)
        model.get_layer(name).set_weights([lin.weight.detach().numpy().T.copy(), lin.bias.detach().numpy().copy()])
    return net, model


def _peft_delta(pm, name):
    lin = getattr(pm.base_model.model, name)
    a = lin.lora_A["default"].weight.detach().numpy().astype("float64")
    b = lin.lora_B["default"].weight.detach().numpy().astype("float64")
    return lin.scaling["default"] * (b @ a).T, lin.base_layer.weight.detach().numpy().T, a, b


def _keras_parts(model, name):
    layer = model.get_layer(name)
    a_t, b = to_np(layer.lora_a).astype("float64"), to_np(layer.lora_b).astype("float64")
    return layer.scaling * a_t.T @ b, to_np(layer.layer.kernel), a_t, b


# ----------------------------------------------------------------------
# CorDA
@pytest.mark.parametrize("mode", ["ipm", "kpm"])
def test_corda_matches_peft(mode):
    batches = _batches()
    net, model = _twins()
    config = peft.LoraConfig(r=2, lora_alpha=3, target_modules=["a", "b"], init_lora_weights="corda",
                             corda_config=peft.tuners.lora.config.CordaConfig(corda_method=mode))

    def run_model():
        for x in batches:
            net(torch.tensor(x))

    from peft.tuners.lora.corda import preprocess_corda

    preprocess_corda(net, config, run_model=run_model)
    pm = peft.get_peft_model(net, config)
    y0 = to_np(model(batches[0]))
    kl.enable_adapter(model, method="corda", rank=2, alpha=3, corda_method=mode, targets=["a", "b"],
                      data=batches)
    for name in ("a", "b"):
        d_peft, base_peft, _, _ = _peft_delta(pm, name)
        d_ours, base_ours, _, _ = _keras_parts(model, name)
        np.testing.assert_allclose(d_ours, d_peft, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(base_ours, base_peft, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(to_np(model(batches[0])), y0, atol=1e-5)


# ----------------------------------------------------------------------
# LoRA-GA
def _aligned(ours, theirs, axis):
    """`ours` with each component's sign matched to `theirs` (rows of A:
    axis 0; columns of torch B: axis 1)."""
    ours = np.moveaxis(ours, axis, 0)
    theirs = np.moveaxis(theirs, axis, 0)
    signs = np.sign(np.sum(ours * theirs, axis=tuple(range(1, ours.ndim))))
    return np.moveaxis(ours * signs.reshape((-1,) + (1,) * (ours.ndim - 1)), 0, axis), np.moveaxis(theirs, 0, axis)


@pytest.mark.parametrize("direction,scale", [("ArB2r", "stable"), ("A2rBr", "gd_scale"),
                                             ("ArBr", "unit"), ("ArB2r", "weight_svd")])
def test_lora_ga_matches_peft(direction, scale):
    batches = _batches(n=3)
    targets = [np.random.RandomState(i).normal(size=(24, N_OUT)).astype("float32") for i in range(3)]
    net, model = _twins(seed=1)
    if scale == "weight_svd":  # a dominant singular value: PEFT's randomized rank-r SVD finds it exactly
        with torch.no_grad():
            for lin in (net.a, net.b):
                u = torch.randn(lin.weight.shape[0], 1)
                v = torch.randn(1, lin.weight.shape[1])
                lin.weight += 5.0 * u @ v
        for name in ("a", "b"):
            lin = getattr(net, name)
            model.get_layer(name).set_weights([lin.weight.detach().numpy().T.copy(), lin.bias.detach().numpy().copy()])
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["a", "b"], init_lora_weights="lora_ga",
                             lora_ga_config=peft.LoraGAConfig(direction=direction, scale=scale))

    def train_step():
        for x, y in zip(batches, targets):
            loss = torch.nn.functional.mse_loss(net(torch.tensor(x)), torch.tensor(y))
            loss.backward()

    peft.preprocess_loraga(net, config, train_step)
    pm = peft.get_peft_model(net, config)
    model.compile(loss="mse")
    y0 = to_np(model(batches[0]))
    kl.enable_adapter(model, method="lora_ga", rank=2, alpha=4, direction=direction, scale=scale,
                      targets=["a", "b"], data=list(zip(batches, targets)))
    for name in ("a", "b"):
        _, base_peft, a_peft, b_peft = _peft_delta(pm, name)
        _, _, a_t, b = _keras_parts(model, name)
        ours_a, theirs_a = _aligned(a_t, a_peft, 0)
        # PEFT's randomized float32 SVD of the gradient against our exact one
        # (the spiked weights of the weight_svd case leave the gradient's
        # second triplets close together, where float32 moves them most)
        tol = 2e-2 if scale == "weight_svd" else 2e-3
        np.testing.assert_allclose(ours_a, theirs_a, atol=tol)
        ours_b, theirs_b = _aligned(b.T, b_peft, 1)
        np.testing.assert_allclose(ours_b, theirs_b, rtol=tol, atol=tol)
        layer = model.get_layer(name)
        # the base is the residual of our own factors: the layer starts unchanged
        w = base_peft + pm.base_model.model.get_submodule(name).scaling["default"] * (b_peft @ a_peft).T
        np.testing.assert_allclose(to_np(layer.layer.kernel) + layer.scaling * a_t.T @ b, w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(to_np(model(batches[0])), y0, rtol=1e-5, atol=1e-4)  # outputs up to ~200


def test_lora_ga_needs_a_loss_and_targets():
    _, model = _twins()
    before = [to_np(w) for w in model.weights]
    with pytest.raises(ValueError, match="compile the model"):
        kl.enable_adapter(model, method="lora_ga", rank=2, targets=["a"], data=_batches())
    model.compile(loss="mse")
    with pytest.raises(ValueError, match=r"batches of \(x, y\)"):
        kl.enable_adapter(model, method="lora_ga", rank=2, targets=["a"], data=_batches())
    assert not kl.adapters(model)
    for w, b in zip(model.weights, before):
        np.testing.assert_array_equal(to_np(w), b)


def test_lora_ga_on_a_kernel_with_fewer_than_2r_triplets():
    """rank 4 on a 8x6 kernel: 6 triplets for 8 places; the two missing ones
    are zero (A's or B's), the layer starts unchanged and trains."""
    _, model = _twins()
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    x, y = _batches(n=1)[0], np.ones((24, N_OUT), "float32")
    y0 = to_np(model(x))
    kl.enable_adapter(model, method="lora_ga", rank=4, targets=["a"], data=(x, y))
    layer = model.get_layer("a")
    np.testing.assert_allclose(to_np(model(x)), y0, rtol=1e-5, atol=1e-4)
    assert np.sum(np.all(to_np(layer.lora_b) == 0, axis=1)) == 2  # B's rows from triplets 6 and 7
    before = to_np(layer.lora_a).copy()
    model.fit(x, y, epochs=1, verbose=0)
    assert np.abs(to_np(layer.lora_a) - before).max() > 0


# ----------------------------------------------------------------------
# EVA
def test_eva_matches_peft():
    batches = _batches(n=6, rows=32, low_rank=True)
    net, model = _twins(seed=2)
    config = peft.LoraConfig(r=2, lora_alpha=2, target_modules=["a", "b"], init_lora_weights="eva",
                             eva_config=peft.EvaConfig(rho=2.0, tau=0.99))
    state = peft.get_eva_state_dict(net, [torch.tensor(x) for x in batches], peft_config=config,
                                    forward_fn=lambda m, x: m(x), prepare_model_inputs_fn=None,
                                    prepare_layer_inputs_fn=None, show_progress_bar=False)
    y0 = to_np(model(batches[0]))
    summary = kl.enable_adapter(model, method="eva", rank=2, targets=["a", "b"], data=batches)
    assert sorted(summary.adapted_paths) == sorted(k for k, v in state.items() if v.shape[0])
    total = 0
    for name in summary.adapted_paths:
        layer = model.get_layer(name)
        theirs = state[name].numpy()
        assert layer.rank == theirs.shape[0]
        total += layer.rank
        np.testing.assert_allclose(to_np(layer.lora_a), theirs, rtol=1e-4, atol=1e-5)
        assert layer.scaling == pytest.approx(1.0)  # alpha follows the rank
        np.testing.assert_array_equal(to_np(layer.lora_b), 0.0)
    assert total == 4  # the budget: r per targeted layer
    np.testing.assert_array_equal(to_np(model(batches[0])), y0)


def test_eva_pca_is_the_pca_of_all_rows():
    from keras_lowrank.methods.eva import IncrementalPCA

    # exact when the components span the rows (here 3 dimensions), as PEFT's
    rows = np.concatenate(_batches(n=5, rows=20, low_rank=True))
    pca = IncrementalPCA(4)
    for i in range(0, 100, 20):
        pca.partial_fit(rows[i : i + 20])
    full = np.linalg.svd(rows - rows.mean(0), full_matrices=False)
    np.testing.assert_allclose(np.abs(pca.components[:3]), np.abs(full[2][:3]), atol=1e-5)
    total = np.sum((rows - rows.mean(0)) ** 2)
    np.testing.assert_allclose(pca.explained_variance_ratio[:3], full[1][:3] ** 2 / total, rtol=1e-5)


def test_eva_shares_one_pca_between_layers_with_the_same_inputs():
    inp = keras.Input((N_IN,))
    q, k = keras.layers.Dense(4, name="q")(inp), keras.layers.Dense(4, name="k")(inp)
    model = keras.Model(inp, keras.layers.Add()([q, k]))
    summary = kl.enable_adapter(model, method="eva", rank=2, rho=1.0, targets=["q", "k"], data=_batches())
    a_q, a_k = to_np(model.get_layer("q").lora_a), to_np(model.get_layer("k").lora_a)
    np.testing.assert_array_equal(a_q, a_k)
    assert sorted(summary.adapted_paths) == ["k", "q"]


# ----------------------------------------------------------------------
# orthogonal
def test_orthogonal_matches_peft():
    torch.manual_seed(0)
    net = _Net()
    pm = peft.get_peft_model(net, peft.LoraConfig(r=4, target_modules=["a"], init_lora_weights="orthogonal"))
    lin = pm.base_model.model.a
    torch.manual_seed(7)
    lin.orthogonal_init("default")
    torch.manual_seed(7)
    draws = [torch.randn(4, 4), torch.randn(N_IN, 2), torch.randn(2, N_HID)]
    from keras_lowrank.methods.lora import orthogonal_factors

    a_t, b = orthogonal_factors(*[d.numpy() for d in draws])
    np.testing.assert_allclose(a_t, lin.lora_A["default"].weight.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(b, lin.lora_B["default"].weight.detach().numpy().T, rtol=1e-5, atol=1e-6)


def test_orthogonal_starts_unchanged_and_trains(tmp_path):
    _, model = _twins()
    x = _batches(n=1)[0]
    y0 = to_np(model(x))
    kl.enable_adapter(model, method="lora", init="orthogonal", rank=4, seed=3, targets=["a", "b"])
    layer = model.get_layer("a")
    assert np.abs(to_np(layer.lora_a)).max() > 0 and np.abs(to_np(layer.lora_b)).max() > 0
    np.testing.assert_allclose(to_np(model(x)), y0, atol=1e-5)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    model.fit(x, np.zeros((x.shape[0], N_OUT)), epochs=2, verbose=0)
    path = str(tmp_path / "m.keras")
    model.save(path)
    back = keras.models.load_model(path)
    np.testing.assert_allclose(to_np(back(x)), to_np(model(x)), atol=1e-5)
    with pytest.raises(ValueError, match="even rank"):
        kl.enable_adapter(_twins()[1], method="lora", init="orthogonal", rank=3, targets=["a"])


# ----------------------------------------------------------------------
# data forms, bases, round trips, refusals
def test_data_forms_give_the_same_init():
    """A list of batches, arrays cut into batches, and a tf.data.Dataset-like
    iterable of (x, y) give one CorDA init."""
    batches = _batches(n=2, rows=32)
    inits = []
    for data in (batches, np.concatenate(batches), [(x, np.zeros((32, N_OUT))) for x in batches]):
        _, model = _twins()
        kl.enable_adapter(model, method="corda", rank=2, targets=["a"], data=data)
        inits.append(to_np(model.get_layer("a").lora_a))
    np.testing.assert_allclose(inits[1], inits[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(inits[2], inits[0], rtol=1e-5, atol=1e-6)


def test_datasets_give_the_same_init():
    """A tf.data.Dataset and a keras.utils.PyDataset of the same batches give
    the init a list of them gives (on every backend)."""
    tf = pytest.importorskip("tensorflow")
    batches = _batches(n=2, rows=32)

    class Batched(keras.utils.PyDataset):
        def __len__(self):
            return len(batches)

        def __getitem__(self, i):
            return batches[i]

    inits = []
    for data in (batches, tf.data.Dataset.from_tensor_slices(np.concatenate(batches)).batch(32), Batched()):
        _, model = _twins()
        kl.enable_adapter(model, method="corda", rank=2, targets=["a"], data=data)
        inits.append(to_np(model.get_layer("a").lora_a))
    np.testing.assert_allclose(inits[1], inits[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(inits[2], inits[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["eva", "corda", "lora_ga"])
@pytest.mark.parametrize("base", ["nf4", "int8"])
def test_quantized_base_roundtrip_and_merge(method, base, tmp_path):
    batches = _batches(n=2, rows=32)
    _, model = _twins()
    data = batches
    if method == "lora_ga":
        model.compile(loss="mse")
        data = [(x, np.zeros((32, N_OUT), "float32")) for x in batches]
    x = batches[0]
    kl.enable_adapter(model, method=method, rank=2, rho=1.0, targets=["a", "b"], data=data, base=base) \
        if method == "eva" else \
        kl.enable_adapter(model, method=method, rank=2, targets=["a", "b"], data=data, base=base)
    assert kl.bases.base_kind(model.get_layer("a").layer) == base
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    model.fit(x, np.ones((32, N_OUT)), epochs=2, verbose=0)
    y = to_np(model(x))
    path = str(tmp_path / "m.keras")
    model.save(path)
    np.testing.assert_allclose(to_np(keras.models.load_model(path)(x)), y, atol=1e-5)
    kl.merge(model)
    np.testing.assert_allclose(to_np(model(x)), y, atol=5e-2 if base != "float" else 1e-5)


@pytest.mark.parametrize("method", ["eva", "corda"])
def test_refusals_leave_the_model_unchanged(method):
    _, model = _twins()
    before = [to_np(w) for w in model.weights]
    with pytest.raises(ValueError, match="initializes from sample data"):
        kl.enable_adapter(model, method=method, rank=2, targets=["a"])
    with pytest.raises(ValueError, match="share one non-zero number of rows"):
        kl.enable_adapter(model, method=method, rank=2, targets=["a"], data=(np.ones((4, N_IN)), np.ones((3, 2))))
    with pytest.raises(ValueError, match="NaN or inf"):
        kl.enable_adapter(model, method=method, rank=2, targets=["a"], data=np.full((8, N_IN), np.nan, "float32"))
    with pytest.raises(ValueError, match="does not initialize from sample data"):
        kl.enable_adapter(model, method="lora", rank=2, targets=["a"], data=_batches())
    assert not kl.adapters(model)
    for w, b in zip(model.weights, before):
        np.testing.assert_array_equal(to_np(w), b)


def test_eva_adapter_file_and_peft_directory(tmp_path):
    """After its init an EVA adapter is a LoRA: an adapter file loads into a
    fresh model, and PEFT's LoRA directory holds its factors."""
    batches = _batches(n=4, rows=32)
    _, model = _twins()
    kl.enable_adapter(model, method="eva", rank=2, targets=["a", "b"], data=batches)
    path = str(tmp_path / "eva.safetensors")
    kl.save_adapter(model, path)
    _, fresh = _twins()
    kl.load_adapter(fresh, path)
    np.testing.assert_allclose(to_np(fresh.get_layer("a").lora_a), to_np(model.get_layer("a").lora_a))
