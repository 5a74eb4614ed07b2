"""A different adapter per example in one call (keras_lowrank.serving,
keras_lowrank.per_example): every registered method computes each example
as the model does with only that example's adapters active; a compiled
predict and KerasHub's generate run on when the selection changes, without
a new trace; what cannot run per example is refused by name."""

import keras
import numpy as np
import pytest

import keras_lowrank as kl
from keras_lowrank import adapter_set
from keras_lowrank import per_example
from keras_lowrank import registry

from conftest import BACKEND
from conftest import gemma_backbone
from conftest import needs
from conftest import seq_model
from conftest import perturb
from conftest import to_np
from conftest import token_inputs

X3 = np.random.RandomState(0).normal(size=(5, 3, 6)).astype("float32")


def moved(model, name, seed):
    for path, a in kl.adapters(model):
        if path.endswith("@" + name):
            perturb(a, seed=seed)


def gated(model, weights):
    """Set the gates as `weights` ({name: weight}) directly: what each
    example of a weighted selection computes at every layer."""
    for _, s in adapter_set.sets(model):
        for name, gate in s._gates.items():
            gate.assign(float(weights.get(name, 0.0)))


def reference(model, x, entry):
    gated(model, {} if entry is None else {entry: 1.0} if isinstance(entry, str) else entry)
    return to_np(model(x))


@pytest.mark.parametrize("method", registry.methods())
def test_each_example_as_its_adapter_alone(method):
    model = seq_model()
    options = needs(method, model)
    if method == "lily":
        kl.enable_adapter(model, method="lily", rank=2, adapter_name="x", **options)
        with pytest.raises(ValueError, match=r"'x' is a 'lily' adapter.*depends on the others"):
            kl.PerExampleAdapters(model)
        return
    # a data init goes on plain layers, unnamed: it becomes "default"
    # when the second adapter makes the model's adapters named
    b = "default" if registry.get(method).calibration else "b"
    kl.enable_adapter(model, method=method, rank=2, **({} if b == "default" else {"adapter_name": b}), **options)
    kl.enable_adapter(model, method="lora", rank=2, adapter_name="a")
    moved(model, b, 2)
    moved(model, "a", 1)
    entries = [b, "a", None, {"a": 0.5, b: -0.75}, ["a", b]]
    served = kl.PerExampleAdapters(model)
    got = to_np(served({"inputs": X3, **kl.adapter_selection(model, entries)}))
    for e, entry in enumerate(entries):
        want = reference(model, X3[e:e + 1], {"a": 1.0, b: 1.0} if isinstance(entry, list) else entry)[0]
        scale = max(1.0, np.abs(want).max())
        np.testing.assert_allclose(got[e], want, atol=1e-5 * scale, rtol=1e-5, err_msg=str(entry))


class FlatRows(keras.Model):
    """Dense layers called on the batch's rows flattened (batch × steps, d),
    as KerasHub's MoE blocks call their routers."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(8, activation="tanh", name="hidden")
        self.out = keras.layers.Dense(3, name="out")

    def call(self, x):
        rows = keras.ops.reshape(x, (-1, 6))
        return keras.ops.reshape(self.out(self.hidden(rows)), (-1, 3, 3))


@pytest.mark.parametrize("method", ["lora", "hira"])  # gathered factors; an adapter's own output
def test_rows_flattened_across_the_batch(method):
    keras.utils.set_random_seed(0)
    model = FlatRows()
    model(X3)
    kl.enable_adapter(model, method=method, rank=2, targets=["hidden", "out"], adapter_name="a")
    moved(model, "a", 1)
    kl.enable_adapter(model, rank=2, targets=["hidden", "out"], adapter_name="b")
    moved(model, "b", 2)
    entries = ["b", None, "a", {"a": 0.5, "b": 0.5}, "a"]
    served = kl.PerExampleAdapters(model)
    got = served.predict({"inputs": X3, **kl.adapter_selection(model, entries)}, verbose=0)
    for e, entry in enumerate(entries):
        np.testing.assert_allclose(got[e], reference(model, X3[e:e + 1], entry)[0], atol=2e-5)


def test_compiled_predict_does_not_retrace(monkeypatch):
    model = seq_model()
    for i, method in enumerate(("lora", "dora", "vera", "pissa")):
        kl.enable_adapter(model, method=method, rank=2, adapter_name=f"n{i}")
        moved(model, f"n{i}", i)
    served = kl.PerExampleAdapters(model)
    traces = []
    inner = per_example.mixed_output
    monkeypatch.setattr(per_example, "mixed_output", lambda *a: traces.append(1) or inner(*a))
    rng = np.random.default_rng(0)
    names = kl.adapter_names(model)
    first = None
    for step in range(3):
        entries = [names[i] if i < len(names) else None for i in rng.integers(0, len(names) + 1, 5)]
        out = served.predict({"inputs": X3, **kl.adapter_selection(model, entries)}, batch_size=5, verbose=0)
        for e, entry in enumerate(entries):
            np.testing.assert_allclose(out[e], reference(model, X3[e:e + 1], entry)[0], atol=2e-5)
        if first is None:
            first = (served.predict_function, len(traces))
        assert served.predict_function is first[0]
    # on jax and tensorflow the layers run only while the step is traced
    # (once per batch shape); torch runs its predict step eagerly
    if BACKEND != "torch":
        assert len(traces) == first[1]


@pytest.mark.skipif(BACKEND != "torch", reason="torch.compile is torch's")
def test_torch_compile_does_not_recompile_when_the_selection_changes():
    import torch

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    model = seq_model()
    for i, method in enumerate(("lora", "dora")):
        kl.enable_adapter(model, method=method, rank=2, adapter_name=f"n{i}")
        moved(model, f"n{i}", i)
    served = kl.PerExampleAdapters(model)
    run = torch.compile(lambda inputs: served(inputs), backend=backend)
    x = torch.as_tensor(X3)
    with torch.no_grad():
        for step, entries in enumerate((["n0", "n1", None, "n0", "n1"], ["n1", None, "n0", "n1", "n0"],
                                        [None, "n0", "n0", "n1", None])):
            sel = {k: torch.as_tensor(v) for k, v in kl.adapter_selection(model, entries).items()}
            out = to_np(run({"inputs": x, **sel}))
            for e, entry in enumerate(entries):
                np.testing.assert_allclose(out[e], reference(model, X3[e:e + 1], entry)[0], atol=2e-5)
            if step == 1:  # dynamo compiles some frames again on their second call
                n = len(graphs)
    assert len(graphs) == n


def test_selection_and_refusals():
    model = seq_model()
    with pytest.raises(ValueError, match="no named adapters"):
        kl.adapter_selection(model, ["a"])
    kl.enable_adapter(model, rank=2, adapter_name="a")
    kl.enable_adapter(model, rank=2, adapter_name="b")
    s = kl.adapter_selection(model, ["a", None, {"b": 2.0, "a": -1}])
    assert s["adapter_index"].tolist() == [[0, -1], [-1, -1], [1, 0]]
    assert s["adapter_weight"].tolist() == [[1.0, 0.0], [0.0, 0.0], [2.0, -1.0]]
    with pytest.raises(ValueError, match=r"example 1: the model has no adapter named 'c'"):
        kl.adapter_selection(model, ["a", "c"])
    with pytest.raises(ValueError, match=r"example 0: the weight of 'a' must be a finite number"):
        kl.adapter_selection(model, [{"a": float("nan")}])
    with pytest.raises(ValueError, match="one entry per example"):
        kl.adapter_selection(model, "a")
    with pytest.raises(ValueError, match="names 'a' twice"):
        kl.adapter_selection(model, [["a", "a"]])
    served = kl.PerExampleAdapters(model)
    with pytest.raises(ValueError, match="expected a dict with keys"):
        served(X3)
    # a weight 0 and an index outside the names: no adapter
    none = {"adapter_index": np.array([[7]], "int32"), "adapter_weight": np.array([[1.0]], "float32")}
    kl.set_active(model, None)
    np.testing.assert_allclose(to_np(served({"inputs": X3[:1], **none})), to_np(model(X3[:1])), atol=1e-6)


def test_saved_per_example_model_round_trip(tmp_path):
    model = seq_model()
    kl.enable_adapter(model, rank=2, adapter_name="a")
    kl.enable_adapter(model, method="dora", rank=2, adapter_name="b")
    moved(model, "a", 0)
    moved(model, "b", 1)
    served = kl.PerExampleAdapters(model)
    sel = kl.adapter_selection(model, ["b", "a", None, "a", "b"])
    want = to_np(served({"inputs": X3, **sel}))
    path = str(tmp_path / "served.keras")
    served.save(path)
    back = keras.saving.load_model(path)
    np.testing.assert_allclose(to_np(back({"inputs": X3, **sel})), want, atol=1e-6)


def gemma_lm():
    keras.utils.set_random_seed(0)
    lm = kl_hub().models.GemmaCausalLM(backbone=gemma_backbone(), preprocessor=None)
    lm.compile(sampler="greedy")
    return lm


def kl_hub():
    import keras_hub

    return keras_hub


def test_kerashub_generate_per_prompt(monkeypatch):
    lm = gemma_lm()
    for i, method in enumerate(("lora", "dora")):
        kl.enable_adapter(lm, method=method, rank=2, adapter_name=f"t{i}")
        for _, a in kl.adapters(lm):
            perturb(a, scale=2.0, seed=i)
    prompts = token_inputs(20, batch=3, seq=10, seed=3)
    prompts["padding_mask"][:, 4:] = 0  # 4 prompt tokens, 6 to generate
    entries = ["t0", "t1", None]
    entered = []
    inner = per_example.selecting
    monkeypatch.setattr(per_example, "selecting", lambda s: entered.append(1) or inner(s))
    out = kl.generate(lm, prompts, entries, stop_token_ids=None)
    fn = lm.generate_function
    for e, entry in enumerate(entries):
        kl.set_active(lm, entry, trainable=False)
        alone = lm.generate({k: v[e:e + 1] for k, v in prompts.items()}, stop_token_ids=None)
        np.testing.assert_array_equal(out["token_ids"][e], alone["token_ids"][0])
    # the adapters change what is generated (the test would pass vacuously otherwise)
    assert not np.array_equal(out["token_ids"][0], out["token_ids"][2])
    n = len(entered)
    again = kl.generate(lm, prompts, ["t1", None, "t0"], stop_token_ids=None)
    assert lm.generate_function is fn
    if BACKEND != "torch":  # traced once: the Python step does not run again
        assert len(entered) == n
    kl.set_active(lm, "t0", trainable=False)
    alone = lm.generate({k: v[2:] for k, v in prompts.items()}, stop_token_ids=None)
    np.testing.assert_array_equal(again["token_ids"][2], alone["token_ids"][0])
    with pytest.raises(ValueError, match="3 prompts, but adapter_names has 2 entries"):
        kl.generate(lm, prompts, ["t0", "t1"], stop_token_ids=None)


def test_kerashub_backbone_mixed_batch():
    backbone = gemma_backbone()
    for j, (name, method) in enumerate((("p", "lora"), ("q", "vera"))):
        kl.enable_adapter(backbone, method=method, rank=2, adapter_name=name)
        for i, (_, a) in enumerate(kl.adapters(backbone)):  # the active (trainable) one moves
            perturb(a, seed=10 * j + i)
    x = token_inputs(20, batch=4, seq=6)
    entries = ["q", None, "p", {"p": 0.5, "q": 0.5}]
    got = to_np(kl.PerExampleAdapters(backbone).predict(
        {"inputs": x, **kl.adapter_selection(backbone, entries)}, verbose=0))
    for e, entry in enumerate(entries):
        want = reference(backbone, {k: v[e:e + 1] for k, v in x.items()}, entry)[0]
        np.testing.assert_allclose(got[e], want, atol=2e-5 * max(1.0, np.abs(want).max()))


# a tiny byte-pair vocabulary: single characters and a few merges
GPT2_VOCAB = {t: i for i, t in enumerate(
    ["<|endoftext|>", "a", "i", "r", "p", "l", "n", "e", "t", "o", "Ġ", "ai", "air", "Ġa", "Ġat"])}
GPT2_MERGES = ["a i", "ai r", "Ġ a", "Ġa t"]


def test_kerashub_generate_strings_through_the_preprocessor():
    hub = kl_hub()
    tokenizer = hub.models.GPT2Tokenizer(vocabulary=GPT2_VOCAB, merges=GPT2_MERGES)
    preprocessor = hub.models.GPT2CausalLMPreprocessor(tokenizer=tokenizer, sequence_length=16)
    keras.utils.set_random_seed(0)
    backbone = hub.models.GPT2Backbone(vocabulary_size=len(GPT2_VOCAB), num_layers=2, num_heads=2,
                                       hidden_dim=8, intermediate_dim=16, max_sequence_length=16)
    lm = hub.models.GPT2CausalLM(backbone=backbone, preprocessor=preprocessor)
    lm.compile(sampler="greedy")
    for j, name in enumerate(("x", "y")):
        kl.enable_adapter(lm, rank=2, adapter_name=name)  # the active one: trainable, moved
        for i, (_, a) in enumerate(kl.adapters(lm)):
            perturb(a, scale=3.0, seed=10 * j + i)
    prompts = ["air plane at", "a train", "at air"]
    entries = ["x", None, "y"]
    out = kl.generate(lm, prompts, entries, max_length=16, stop_token_ids=None)
    assert "generate_preprocess" not in vars(preprocessor)  # the preprocessor is as it was
    assert len(out) == 3 and all(isinstance(o, str) for o in out)
    for e, entry in enumerate(entries):
        kl.set_active(lm, entry, trainable=False)
        assert lm.generate([prompts[e]], max_length=16, stop_token_ids=None)[0] == out[e]
    kl.set_active(lm, None, trainable=False)
    base = [lm.generate([p], max_length=16, stop_token_ids=None)[0] for p in prompts]
    assert base[0] != out[0] and base[2] != out[2]  # the adapters change the text
