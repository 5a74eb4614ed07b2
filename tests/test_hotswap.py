"""Loading a new adapter into a slot of a compiled model without a retrace
(keras_lowrank.hotswap): adapter files and PEFT directories, ranks padded
up to the slot's, the traces counted on each backend, and every file that
does not fit refused before a variable changes."""

import keras
import numpy as np
import pytest

import keras_lowrank as kl
from keras_lowrank import adapter_set

from conftest import BACKEND
from conftest import perturb
from conftest import seq_model
from conftest import to_np

X = np.random.RandomState(0).normal(size=(4, 3, 6)).astype("float32")


def trained(tmp_path, name, method="lora", seed=1, **options):
    """A model with one adapter moved off its init, its file and outputs."""
    model = seq_model()
    kl.enable_adapter(model, method=method, adapter_name=name, **options)
    for _, a in kl.adapters(model):
        perturb(a, seed=seed)
    path = str(tmp_path / f"{name}.safetensors")
    kl.save_adapter(model, path, adapter_name=name)
    return path, to_np(model(X))


def weights(model):
    return [to_np(v).copy() for v in model.weights]


def server(method="lora", rank=8, **options):
    model = seq_model()
    kl.enable_adapter(model, method=method, rank=rank, adapter_name="slot", **options)
    kl.enable_adapter(model, method="dora", rank=2, adapter_name="other")
    kl.set_active(model, "slot", trainable=False)
    return model


class Traces:
    """Counts the traced Python runs of every adapter set's `call`: on jax
    and tensorflow a compiled predict runs them only while tracing."""

    def __init__(self, monkeypatch):
        self.n = 0
        inner = adapter_set.AdapterSet.call

        def call(layer, *args, **kwargs):
            self.n += 1
            return inner(layer, *args, **kwargs)

        monkeypatch.setattr(adapter_set.AdapterSet, "call", call)


def test_swapping_files_into_a_compiled_model(tmp_path, monkeypatch):
    files = [trained(tmp_path, "a", rank=2, alpha=4.0, seed=1),
             trained(tmp_path, "b", rank=8, alpha=8.0, rslora=True, seed=2),
             trained(tmp_path, "c", rank=5, seed=3)]
    model = server()
    model.compile(loss="mse")
    traces = Traces(monkeypatch)
    model.predict(X, verbose=0)
    fn, n = model.predict_function, traces.n
    for path, want in files + files[:1]:
        kl.hotswap_adapter(model, path, "slot")
        np.testing.assert_allclose(model.predict(X, verbose=0), want, atol=1e-5)
        assert model.predict_function is fn
    if BACKEND != "torch":  # eager on torch: see test_torch_compile_does_not_recompile
        assert traces.n == n
    # the slot stays an ordinary rank-8 LoRA: it saves and merges as one
    kl.set_active(model, "slot")
    kl.merge(model)
    np.testing.assert_allclose(to_np(model(X)), files[0][1], atol=1e-5)


def test_dora_and_same_shape_methods(tmp_path):
    path, want = trained(tmp_path, "d", method="dora", rank=2, seed=4)
    model = server("dora", rank=6)
    kl.hotswap_adapter(model, path, "slot")
    np.testing.assert_allclose(to_np(model(X)), want, atol=1e-5)
    # a method without a rank to pad: the same shapes
    path, want = trained(tmp_path, "h", method="loha", rank=2, seed=5)
    model = server("loha", rank=2)
    kl.hotswap_adapter(model, path, "slot")
    np.testing.assert_allclose(to_np(model(X)), want, atol=1e-5)
    path3, _ = trained(tmp_path, "h3", method="loha", rank=3, seed=5)
    with pytest.raises(ValueError, match=r"the slot's loha has alpha=2.0, adapter file .* has alpha=3.0"):
        kl.hotswap_adapter(model, path3, "slot")


@pytest.mark.skipif(BACKEND != "torch", reason="torch.compile is torch's")
def test_torch_compile_does_not_recompile(tmp_path):
    import torch

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    files = [trained(tmp_path, "a", rank=2, seed=1), trained(tmp_path, "b", rank=4, seed=2)]
    model = server()
    x = torch.as_tensor(X)
    run = torch.compile(lambda t: model(t), backend=backend)
    with torch.no_grad():
        run(x)
        run(x)  # dynamo compiles some frames again on their second call (Keras's own bookkeeping)
        n = len(graphs)
        assert n >= 1
        for path, want in files:
            kl.hotswap_adapter(model, path, "slot")
            np.testing.assert_allclose(to_np(run(x)), want, atol=1e-5)
    assert len(graphs) == n


@pytest.mark.parametrize("case", ["rank", "method", "layers", "rewrites", "two", "unnamed", "nan"])
def test_refusals_leave_the_model_unchanged(tmp_path, case):
    model = server(rank=4)
    before = weights(model)
    if case == "rank":
        path, _ = trained(tmp_path, "a", rank=6)
        match = r"layer 'hidden'.*rank 6, above the slot's rank 4"
    elif case == "method":
        path, _ = trained(tmp_path, "a", method="vera", rank=2)
        match = r"layer 'hidden' holds a 'lora' adapter in the slot; .* holds a 'vera'"
    elif case == "layers":
        m = seq_model()
        kl.enable_adapter(m, rank=2, targets=["hidden"], adapter_name="a")
        path = str(tmp_path / "a.safetensors")
        kl.save_adapter(m, path)
        match = r"has no adapter for the slot's layers \['heads'\]"
    elif case == "rewrites":
        model = server("pissa", rank=2)
        before = weights(model)
        path, _ = trained(tmp_path, "a", method="pissa", rank=2)
        match = "rewrites the frozen kernel"
    elif case == "two":
        m = seq_model()
        kl.enable_adapter(m, rank=2, adapter_name="a")
        kl.enable_adapter(m, rank=2, adapter_name="b")
        path = str(tmp_path / "ab.safetensors")
        kl.save_adapter(m, path)
        match = r"holds the adapters \['a', 'b'\]"
    elif case == "unnamed":
        path, _ = trained(tmp_path, "a", rank=2)
        with pytest.raises(ValueError, match="has no adapter named 'nope' to swap into"):
            kl.hotswap_adapter(model, path, "nope")
        assert all(np.array_equal(a, b) for a, b in zip(before, weights(model)))
        return
    else:
        from safetensors.numpy import load_file, save_file
        from safetensors import safe_open

        path, _ = trained(tmp_path, "a", rank=2)
        with safe_open(path, framework="np") as f:
            meta = f.metadata()
        tensors = load_file(path)
        key = next(k for k in tensors if k.endswith("lora_b") and "heads" in k)
        tensors[key][0, 0] = np.nan
        save_file(tensors, path, metadata=meta)
        match = "NaN or inf"
    with pytest.raises(ValueError, match=match):
        kl.hotswap_adapter(model, path, "slot")
    assert all(np.array_equal(a, b) for a, b in zip(before, weights(model)))


def test_peft_directory_into_a_slot(tmp_path):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    from peft_models import ALL
    from peft_models import close
    from peft_models import hf_model
    from peft_models import keras_backbone
    from peft_models import keras_logits
    from peft_models import load_hf
    from peft_models import torch_logits

    hf = hf_model("llama", str(tmp_path / "llama"))
    logits = []
    for i, config in enumerate((dict(r=2, lora_alpha=4), dict(r=4, lora_alpha=4, use_rslora=True),
                                dict(r=3, lora_alpha=3, use_dora=True))):
        torch.manual_seed(i)
        pm = peft.get_peft_model(load_hf(hf), peft.LoraConfig(init_lora_weights=False, target_modules=ALL,
                                                              **config))
        pm.save_pretrained(str(tmp_path / f"p{i}"))
        logits.append(torch_logits(pm.eval()))
    backbone = keras_backbone(hf)
    kl.enable_adapter(backbone, rank=4, adapter_name="slot")
    for i in range(2):
        kl.hotswap_adapter(backbone, str(tmp_path / f"p{i}"), "slot", base_model=hf)
        close(keras_logits(backbone), logits[i], tol=1e-4)
    before = weights(backbone)
    with pytest.raises(ValueError, match="holds a 'lora' adapter in the slot; PEFT directory .* 'dora'"):
        kl.hotswap_adapter(backbone, str(tmp_path / "p2"), "slot", base_model=hf)
    assert all(np.array_equal(a, b) for a, b in zip(before, weights(backbone)))
    kl.enable_adapter(backbone, method="dora", rank=4, adapter_name="dora_slot")  # now the active one
    kl.hotswap_adapter(backbone, str(tmp_path / "p2"), "dora_slot", base_model=hf)
    close(keras_logits(backbone), logits[2], tol=1e-4)


def test_swapping_under_kerashub_generate(tmp_path, monkeypatch):
    """A compiled KerasHub generate function runs on with the new weights."""
    import keras_hub

    from conftest import gemma_backbone
    from conftest import token_inputs

    def lm():
        keras.utils.set_random_seed(0)
        model = keras_hub.models.GemmaCausalLM(backbone=gemma_backbone(), preprocessor=None)
        model.compile(sampler="greedy")
        return model

    prompts = token_inputs(20, batch=2, seq=8, seed=5)
    prompts["padding_mask"][:, 3:] = 0
    files = []
    for i, rank in enumerate((2, 4)):
        source = lm()
        kl.enable_adapter(source, rank=rank, adapter_name="t")
        for _, a in kl.adapters(source):
            perturb(a, scale=2.0, seed=i)
        path = str(tmp_path / f"t{i}.safetensors")
        kl.save_adapter(source, path, adapter_name="t")
        files.append((path, source.generate(prompts, stop_token_ids=None)["token_ids"]))
    assert not np.array_equal(files[0][1], files[1][1])
    server = lm()
    kl.enable_adapter(server, rank=4, adapter_name="slot")
    server.generate(prompts, stop_token_ids=None)
    traces = Traces(monkeypatch)
    fn = server.generate_function
    for path, want in files:
        kl.hotswap_adapter(server, path, "slot")
        np.testing.assert_array_equal(server.generate(prompts, stop_token_ids=None)["token_ids"], want)
        assert server.generate_function is fn
    if BACKEND != "torch":  # traced once, before the swaps
        assert traces.n == 0
