"""Convolutions as a kernel kind: every method on Conv1D/2D/3D through the
`(in·prod(kernel_size)) x filters` matrix view, PEFT's Conv2d forms of LoRA,
DoRA, LoHa and LoKr on the same weights, clear refusals, and a KerasHub
ResNet classifier fine-tuned end to end."""

import keras
import numpy as np
import pytest

import keras_lowrank as kl
from keras_lowrank import registry

from conftest import assert_noop
from conftest import dealt
from conftest import needs
from conftest import perturb
from conftest import to_np

METHODS = kl.methods()

CONVS = {
    "conv1d": (lambda: keras.layers.Conv1D(5, 3, padding="causal", dilation_rate=2, name="conv"), (2, 9, 3)),
    "conv2d": (lambda: keras.layers.Conv2D(5, 3, strides=2, padding="same", activation="relu", name="conv"),
               (2, 7, 7, 3)),
    "conv3d": (lambda: keras.layers.Conv3D(5, (2, 3, 2), name="conv"), (2, 5, 4, 4, 2)),
}


def conv_model(kind, seed=0):
    keras.utils.set_random_seed(seed)
    make, shape = CONVS[kind]
    inp = keras.Input(shape[1:])
    h = keras.layers.Flatten()(make()(inp))
    model = keras.Model(inp, keras.layers.Dense(2, name="head")(h))
    x = np.random.RandomState(0).normal(size=shape).astype("float32")
    return model, x


def reference(model, adapter, x):
    """The model's output with the conv's kernel replaced by the method's
    own merged kernel (a plain Keras convolution)."""
    conv = adapter.layer
    plain = type(conv).from_config({**conv.get_config(), "name": "plain"})
    plain.build(x.shape)
    plain.kernel.assign(adapter.geometry.matrix_to_kernel(adapter.merged_matrix(adapter.base_matrix())))
    plain.bias.assign(conv.bias)
    plain.activation = adapter.activation
    return to_np(model.get_layer("head")(keras.layers.Flatten()(plain(x))))


#: every method on Conv2D on every backend; on Conv1D and Conv3D each
#: backend runs a third of the methods (all of them once per suite)
CONV_CASES = [(m, "conv2d") for m in METHODS] + dealt([(m, k) for k in ("conv1d", "conv3d") for m in METHODS])


@pytest.mark.parametrize("method, kind", CONV_CASES)
def test_every_method_on_convolutions(method, kind):
    """No-op at start, a forward equal to a convolution with the method's
    merged kernel, and a merge back into a plain convolution."""
    model, x = conv_model(kind)
    y0 = to_np(model(x))
    summary = kl.enable_adapter(model, method=method, rank=2, targets="conv", **needs(method, model))
    assert summary.kinds["conv"] == (1, 1)
    adapter = dict(kl.adapters(model))["conv"]
    assert adapter.geometry.matrix_shape == (adapter.geometry.channels * int(np.prod(adapter.geometry.kernel_size)), 5)
    y = to_np(model(x))
    assert_noop(method, y, y0)
    perturb(adapter)
    y = to_np(model(x))
    np.testing.assert_allclose(y, reference(model, adapter, x), rtol=1e-4, atol=1e-5)
    kl.merge(model)
    assert type(model.get_layer("conv")) is type(adapter.layer)
    np.testing.assert_allclose(to_np(model(x)), y, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(y).max()))


@pytest.mark.parametrize("method, config", [
    ("lora", dict(peft_type="LORA")),
    ("dora", dict(peft_type="LORA", use_dora=True)),
    ("loha", dict(peft_type="LOHA")),
    ("lokr", dict(peft_type="LOKR")),
])
def test_conv2d_matches_peft(method, config):
    """On the same weights and factors, each of PEFT's Conv2d forms (LoRA,
    DoRA, LoHa, LoKr) gives the output of our adapter on the Keras Conv2D."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    net = torch.nn.Sequential()
    net.add_module("conv", torch.nn.Conv2d(4, 6, 3, stride=2, padding=1))
    kind = config.pop("peft_type")
    options = dict(r=2, target_modules=["conv"])
    if kind == "LORA":
        peft_config = peft.LoraConfig(lora_alpha=4, **options, **config)
    elif kind == "LOHA":
        peft_config = peft.LoHaConfig(alpha=4, **options)
    else:
        peft_config = peft.LoKrConfig(alpha=4, **options)
    pm = peft.get_peft_model(net, peft_config)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "conv.base_layer" not in name:
                p.copy_(0.3 * torch.randn_like(p) + (1.0 if "magnitude" in name else 0.0))
    x = np.random.RandomState(0).normal(size=(2, 7, 7, 4)).astype("float32")
    want = pm(torch.tensor(x).permute(0, 3, 1, 2)).detach().numpy().transpose(0, 2, 3, 1)

    inp = keras.Input((7, 7, 4))
    model = keras.Model(inp, keras.layers.Conv2D(6, 3, strides=2, padding="same", name="conv")(inp))
    base = pm.base_model.model.conv.base_layer
    model.get_layer("conv").set_weights([base.weight.detach().numpy().transpose(2, 3, 1, 0),
                                         base.bias.detach().numpy()])
    kl.enable_adapter(model, method=method, rank=2, alpha=4.0, targets="conv")
    adapter = model.get_layer("conv")
    parts = {}
    for name, value in peft.get_peft_model_state_dict(pm).items():
        part = name.split("conv.", 1)[1]
        value = value.detach().numpy()
        parts[part] = value.reshape(value.shape[0], -1) if value.ndim > 2 else value.reshape(-1) if "magnitude" in part else value
    fmt = registry.get(method).peft
    n_in, n_out = adapter.geometry.n_in, adapter.geometry.n_out
    state = fmt.state({fmt.part_name(k): v for k, v in parts.items()}, np.arange(n_in), np.arange(n_out), "conv")
    for name, value in state.items():
        getattr(adapter, name).assign(np.asarray(value, "float32"))
    np.testing.assert_allclose(to_np(model(x)), want, rtol=1e-4, atol=1e-5)


def test_what_cannot_be_adapted_is_refused_by_name():
    keras.utils.set_random_seed(0)
    inp = keras.Input((6, 6, 4))
    h = keras.layers.Conv2D(4, 3, groups=2, name="grouped")(inp)
    h = keras.layers.DepthwiseConv2D(3, name="depthwise")(h)
    h = keras.layers.Conv2DTranspose(4, 3, name="transposed")(h)
    h = keras.layers.Conv2D(4, 1, name="pointwise")(h)
    out = keras.layers.Dense(2, name="head")(keras.layers.Flatten()(h))
    model = keras.Model(inp, out)
    with pytest.raises(ValueError, match="'grouped'.*groups=2"):
        kl.enable_adapter(model, rank=2, targets=["grouped"])
    for name in ("depthwise", "transposed"):
        with pytest.raises(TypeError, match=f"'{name}'"):
            kl.enable_adapter(model, rank=2, targets=[name])
    with pytest.raises(ValueError, match=r"'pointwise' \(Conv2D\): its base stays float"):
        kl.enable_adapter(model, rank=2, targets="conv", base="nf4")
    assert not kl.adapters(model)
    summary = kl.enable_adapter(model, rank=2, targets="conv")
    assert summary.adapted_paths == ["pointwise"]  # the grouped conv is not adaptable
    assert summary.kinds["conv"] == (1, 1)
    assert "Conv2D" in summary.left_out["not adaptable"]
    model2 = keras.Model(inp, out)
    with pytest.raises(ValueError, match="No layer left"):
        kl.enable_adapter(keras.Sequential([keras.Input((6, 6, 4)), keras.layers.Conv2D(4, 1)]), rank=2)
    del model2


def resnet(seed=0):
    import keras_hub

    keras.utils.set_random_seed(seed)
    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64, 16],
        stackwise_num_blocks=[1, 1], stackwise_num_strides=[1, 2], block_type="basic_block",
        image_shape=(16, 16, 3))
    return keras_hub.models.ResNetImageClassifier(backbone=backbone, num_classes=3, preprocessor=None)


@pytest.mark.parametrize("method", dealt(["lora", "dora", "loha"]))
def test_keras_hub_resnet_classifier_fine_tunes(method, tmp_path):
    """LoRA/DoRA/LoHa on every convolution of a KerasHub ResNet classifier:
    a compiled fit lowers the loss with only the adapters (and the head)
    training, the model reloads from `.keras`, and merges into plain Conv2D
    layers with the same outputs."""
    model = resnet()
    x = np.random.RandomState(0).uniform(size=(12, 16, 16, 3)).astype("float32")
    y = np.arange(12) % 3
    summary = kl.enable_adapter(model, method=method, rank=2, targets="conv")
    assert summary.kinds["conv"][0] == summary.kinds["conv"][1] >= 5
    model.compile(optimizer=keras.optimizers.Adam(0.02),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    trained = {v.path for v in model.trainable_variables}
    assert all("conv" not in p or any(k in p for k in ("lora", "loha", "magnitude")) for p in trained
               if "predictions" not in p and "head" not in p), trained
    history = model.fit(x, y, epochs=6, batch_size=12, verbose=0)
    assert history.history["loss"][-1] < 0.9 * history.history["loss"][0]
    out = to_np(model(x))
    model.save(tmp_path / "m.keras")
    np.testing.assert_allclose(to_np(keras.saving.load_model(tmp_path / "m.keras")(x)), out, rtol=1e-4, atol=1e-5)
    kl.merge(model)
    assert not kl.adapters(model)
    np.testing.assert_allclose(to_np(model(x)), out, rtol=1e-4, atol=1e-5)
