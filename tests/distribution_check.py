"""Adapters under keras.distribution, on JAX with 8 simulated CPU devices.

Run by tests/test_distribution.py in a child process (the device count is
fixed when JAX starts): `KERAS_BACKEND=jax python tests/distribution_check.py OUT.json`.
For each case it trains a tiny KerasHub Gemma with adapters for two steps
on one device and under a distribution, and records both runs' losses and
final adapter arrays; it saves a `.keras` file under ModelParallel and
reloads it outside any distribution (one device); and it runs Keras's own
LoRA and ours under the layout map of the guides that keras #19496 broke.
"""

import json
import os
import sys
import tempfile
import traceback

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ["KERAS_BACKEND"] = "jax"

import jax  # noqa: E402
import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402

import keras_lowrank as kl  # noqa: E402
from keras_lowrank import registry  # noqa: E402
from keras_lowrank import tree  # noqa: E402

#: a tiny Gemma whose head counts divide the model axis (4)
CONFIG = dict(vocabulary_size=64, num_layers=2, num_query_heads=4, num_key_value_heads=4,
              hidden_dim=16, intermediate_dim=32, head_dim=4)
RNG = np.random.default_rng(0)
TOKENS = RNG.integers(0, 64, (16, 8)).astype("int32")
X = {"token_ids": TOKENS, "padding_mask": np.ones_like(TOKENS)}
Y = ((TOKENS + 3) % 64).astype("int32")


def families():
    out = {}
    for name in sorted(kl.methods()):
        out.setdefault(registry.get(name).layer_class.__module__, name)
    return sorted(out.values())


def build(method, base="float"):
    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.GemmaBackbone(**CONFIG)
    model = keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)
    options = dict(registry.get(method).example_options)
    compile_ = lambda: model.compile(optimizer=keras.optimizers.SGD(0.5),  # noqa: E731
                                     loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    if method == "randlora":
        # scale 1, as the other families: at RandLoRA's default scale (alpha
        # = 20 r) SGD(0.5) moves λ to ~2.6 in one step, and the later steps
        # grow float32 round-off (the order of sharded sums) to 1.5e-4
        # relative; at scale 1 sharded and single-device runs agree to 3e-7
        options["alpha"] = 4.0
    if registry.get(method).calibration:  # the inits that read sample data (LoRA-GA: and the loss)
        compile_()
        options["data"] = (X, Y)
        if method == "eva":
            options["rho"] = 1.0
    kl.enable_adapter(model, method=method, rank=4, base=base, seed=1, **options)
    compile_()
    return model


def train(model):
    history = model.fit(X, Y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    # every trainable variable (adapters' and model-level states', e.g.
    # LoRA-drop's shared pairs), in the model's order: the two builds have
    # the same structure but other generated names
    arrays = {f"{i}:{v.name}": np.asarray(keras.ops.convert_to_numpy(v))
              for i, v in enumerate(model.trainable_variables)}
    return history.history["loss"], arrays


def layouts(model):
    """Sharding spec of every adapter variable and of each adapted kernel."""
    out = {}
    adapters = [e for e in tree.walk(model) if tree.is_adapter(e.layer)]
    for e in adapters:
        for v in e.layer.weights:
            out[f"{e.key}/{v.name}"] = _spec(v)
    for state in kl.shared.states(model).values():
        for v in state.weights:
            out[f"@{state.method}/{v.name}"] = _spec(v)
    return out


def _spec(variable):
    sharding = getattr(variable.value, "sharding", None)
    return str(getattr(sharding, "spec", sharding))


def model_parallel(layout_map=None):
    mesh = keras.distribution.DeviceMesh((2, 4), ["batch", "model"],
                                         devices=keras.distribution.list_devices())
    layout_map = layout_map or keras_hub.models.GemmaBackbone.get_layout_map(mesh)
    return keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")


def compare(single, sharded):
    (loss1, arrays1), (loss2, arrays2) = single, sharded
    diff = max(float(np.max(np.abs(arrays1[k] - arrays2[k]))) for k in arrays1)
    moved = max(float(np.max(np.abs(v))) for v in arrays1.values())
    return {"loss_single": loss1, "loss_sharded": loss2, "max_array_diff": diff,
            "same_keys": sorted(arrays1) == sorted(arrays2), "max_abs": moved}


def run_case(method, base, distribution):
    single = train(build(method, base))
    with distribution.scope():
        model = build(method, base)
        sharded = train(model)
        spec = layouts(model)
    result = compare(single, sharded)
    result["layouts"] = spec
    return result


def guide_layout_map():
    """The layout map of the 2024 distributed-tuning guides: its loose
    regexes also match Keras's `lora_kernel_a/b` (keras #19496)."""
    mesh = keras.distribution.DeviceMesh((2, 4), ["batch", "model"],
                                         devices=keras.distribution.list_devices())
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map["token_embedding/embeddings"] = ("model", None)
    layout_map["decoder_block.*attention.*(query|key|value).*kernel.*"] = ("model", None, None)
    layout_map["decoder_block.*attention_output.*kernel.*"] = ("model", None, None)
    layout_map["decoder_block.*ffw_gating.*kernel.*"] = (None, "model")
    layout_map["decoder_block.*ffw_linear.*kernel.*"] = ("model", None)
    return layout_map


def keras_lora_under_guide_map():
    distribution = model_parallel(guide_layout_map())
    out = {}
    with distribution.scope():
        try:
            keras.utils.set_random_seed(0)
            model = keras_hub.models.GemmaCausalLM(
                backbone=keras_hub.models.GemmaBackbone(**CONFIG), preprocessor=None)
            model.backbone.enable_lora(rank=4)
            model.compile(optimizer=keras.optimizers.SGD(0.5),
                          loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
            model.fit(X, Y, batch_size=8, epochs=1, shuffle=False, verbose=0)
            out["keras"] = "ok"
        except Exception as e:  # what Keras's LoRA does there is the finding
            out["keras"] = f"{type(e).__name__}: {str(e)[:300]}"
        try:
            model = build("lora")
            loss, _ = train(model)
            out["ours"] = "ok"
            out["ours_loss"] = loss
        except Exception as e:
            out["ours"] = f"{type(e).__name__}: {str(e)[:300]}\n{traceback.format_exc()[-1500:]}"
    return out


def save_and_reload(tmp):
    path = os.path.join(tmp, "sharded.keras")
    with model_parallel().scope():
        model = build("lora")
        train(model)
        expected = np.asarray(keras.ops.convert_to_numpy(model.predict_on_batch(X)))
        model.save(path)
    reloaded = keras.saving.load_model(path, compile=False)  # no distribution: one device
    got = np.asarray(keras.ops.convert_to_numpy(reloaded.predict_on_batch(X)))
    devices = sorted({str(d) for v in reloaded.weights for d in v.value.sharding.device_set})
    return {"max_output_diff": float(np.max(np.abs(expected - got))),
            "adapters": len(kl.adapters(reloaded)), "devices": devices}


def docs_block():
    """docs/distribution.md's code block, as written, with `from_preset`
    giving a tiny Gemma (no download) and small `x`, `y`; in a scratch
    directory, then the distribution is unset again."""
    import re

    page = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "distribution.md")
    with open(page) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    real = keras_hub.models.GemmaCausalLM.from_preset
    keras_hub.models.GemmaCausalLM.from_preset = classmethod(
        lambda cls, preset, **kw: cls(backbone=keras_hub.models.GemmaBackbone(**CONFIG), preprocessor=None))
    cwd = os.getcwd()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            os.chdir(tmp)
            namespace = {"x": X, "y": Y}
            for block in blocks:
                exec(compile(block, "docs/distribution.md", "exec"), namespace)
            saved = os.path.isfile("sharded.keras")
        return {"blocks": len(blocks), "saved": saved, "adapters": len(kl.adapters(namespace["lm"]))}
    finally:
        os.chdir(cwd)
        keras_hub.models.GemmaCausalLM.from_preset = real
        keras.distribution.set_distribution(None)


def moe_experts():
    """A tiny Mixtral whose expert stacks the layout map shards over their
    expert axis: LoRA on the experts (and attention) trains as on one
    device, and the stacks keep their sharding once adapted."""
    mesh = keras.distribution.DeviceMesh((2, 4), ["batch", "model"], devices=keras.distribution.list_devices())
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*experts.*expert_feedforward.*"] = ("model", None, None)
    config = dict(vocabulary_size=64, num_layers=1, num_query_heads=4, num_key_value_heads=4,
                  hidden_dim=16, intermediate_dim=16, num_experts=4, top_k=2, sliding_window=8)

    def build_moe():
        keras.utils.set_random_seed(0)
        lm = keras_hub.models.MixtralCausalLM(backbone=keras_hub.models.MixtralBackbone(**config),
                                              preprocessor=None)
        before = {v.path: _spec(v) for v in lm.weights if len(v.shape) == 3}
        kl.enable_adapter(lm, rank=4, targets=["experts", "query", "value"])
        lm.compile(optimizer=keras.optimizers.SGD(0.5),
                   loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        return lm, before

    single = train(build_moe()[0])
    with keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch").scope():
        lm, before = build_moe()
        after = {}
        for e in tree.walk(lm):
            if tree.is_adapter(e.layer) and len(e.layer.geometry.kernel_shape) == 3 and e.layer.geometry.batch_labels:
                after[bases_path(e.layer)] = _spec(e.layer.layer.kernel)
        sharded = train(lm)
    result = compare(single, sharded)
    result.update(before=before, after=after)
    return result


def bases_path(adapter):
    return adapter.layer.kernel.path


def main(out_path):
    assert len(jax.devices()) == 8, jax.devices()
    result = {"devices": len(jax.devices()), "cases": {}}
    for method in families():
        result["cases"][f"{method}/float/model_parallel"] = run_case(method, "float", model_parallel())
    result["cases"]["lora/nf4/model_parallel"] = run_case("lora", "nf4", model_parallel())
    result["cases"]["lora/float/data_parallel"] = run_case(
        "lora", "float", keras.distribution.DataParallel(devices=keras.distribution.list_devices()))
    with tempfile.TemporaryDirectory() as tmp:
        result["reload"] = save_and_reload(tmp)
    result["guide_map"] = keras_lora_under_guide_map()
    result["moe"] = moe_experts()
    result["docs_block"] = docs_block()
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
