"""PEFT adapter directories on KerasHub models converted from Hugging Face:
tiny random `transformers` models saved to a directory, loaded in KerasHub
from it, adapters moved both ways and logits compared (no download)."""

import json
import os
import re

import keras
import numpy as np
import pytest

import keras_lowrank
from tests.conftest import to_np

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
keras_hub = pytest.importorskip("keras_hub")

from peft_models import ALL
from peft_models import close
from peft_models import hf_model as _hf_model
from peft_models import keras_backbone as _backbone
from peft_models import keras_logits as _keras_logits
from peft_models import load_hf as _hf
from peft_models import torch_logits as _torch_logits



@pytest.fixture(scope="module", params=["gemma", "llama"])
def hf_dir(request, tmp_path_factory):
    return _hf_model(request.param, str(tmp_path_factory.mktemp(request.param)))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """One family for what does not depend on it (formats, refusals)."""
    return _hf_model("llama", str(tmp_path_factory.mktemp("llama1")))


def _close(keras_out, torch_out):
    close(keras_out, torch_out, tol=1e-4)


def _perturb(model):
    """Move every trainable adapter variable away from its (often no-op) init."""
    rng = np.random.RandomState(0)
    for _, a in keras_lowrank.adapters(model):
        for v in a.trainable_variables:
            v.assign(to_np(v) + 0.3 * rng.standard_normal(v.shape).astype("float32"))


def _peft_dir(hf_path, out, **config):
    model = _hf(hf_path)
    torch.manual_seed(1)
    pm = peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **config))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_magnitude_vector" in name:  # away from the weight norm
                p.mul_(1.0 + 0.3 * torch.rand_like(p))
    pm.save_pretrained(out)
    return _torch_logits(pm.eval())


IMPORTS = {
    "lora": dict(r=4, lora_alpha=8, target_modules=ALL),
    "rslora_patterns": dict(r=4, lora_alpha=6, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"],
                            rank_pattern={"v_proj": 2}, alpha_pattern={r"layers\.1\.mlp\.down_proj": 3}),
    "dora": dict(r=2, lora_alpha=4, use_dora=True, target_modules=ALL),
}


@pytest.mark.parametrize("variant", list(IMPORTS))
def test_load_peft_adapter_matches_peft_logits(hf_dir, tmp_path, variant):
    expected = _peft_dir(hf_dir, str(tmp_path / "ad"), **IMPORTS[variant])
    backbone = _backbone(hf_dir)
    before = _keras_logits(backbone)
    assert np.abs(before - expected).max() > 1e-3  # the adapter changes the output
    keras_lowrank.load_peft_adapter(backbone, str(tmp_path / "ad"), hf_dir)
    _close(_keras_logits(backbone), expected)
    layers = dict(keras_lowrank.adapters(backbone))
    if variant == "rslora_patterns":
        assert len(layers) == 6
        v = next(a for p, a in layers.items() if p.endswith("value") or p.endswith("value_dense"))
        assert v.rank == 2 and v.rslora
        down = [a for p, a in layers.items() if "_1/" in p and ("ffw_linear" in p or "output_dense" in p)]
        assert [a.alpha for a in down] == [3.0]


OTHER_FORMATS = {
    "loha": lambda: peft.LoHaConfig(r=2, alpha=3, target_modules=ALL, init_weights=False),
    "lokr": lambda: peft.LoKrConfig(r=2, alpha=3, target_modules=ALL, init_weights=False),
    "lokr_both": lambda: peft.LoKrConfig(r=1, alpha=3, target_modules=ALL, init_weights=False,
                                         decompose_both=True),
    "adalora": lambda: peft.AdaLoraConfig(init_r=3, target_r=2, lora_alpha=4, target_modules=ALL,
                                          total_step=10),
    "vera": lambda: peft.VeraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"],
                                    init_weights=False),
}


@pytest.mark.parametrize("fmt", list(OTHER_FORMATS))
def test_load_other_peft_formats(llama_dir, tmp_path, fmt):
    hf_dir = llama_dir
    pm = peft.get_peft_model(_hf(hf_dir), OTHER_FORMATS[fmt]())
    torch.manual_seed(2)
    with torch.no_grad():  # every factor nonzero (AdaLoRA starts with E = 0)
        for name, p in pm.named_parameters():
            if any(k in name for k in ("hada_", "lokr_", "lora_", "vera_lambda")):
                p.copy_(0.3 * torch.randn_like(p))
    pm.save_pretrained(str(tmp_path / "ad"))
    expected = _torch_logits(pm.eval())
    backbone = _backbone(hf_dir)
    keras_lowrank.load_peft_adapter(backbone, str(tmp_path / "ad"), hf_dir)
    methods = {a.method for _, a in keras_lowrank.adapters(backbone)}
    assert methods == {fmt.split("_")[0]}
    _close(_keras_logits(backbone), expected)


@pytest.mark.parametrize("method", ["lora", "dora", "pissa", "lokr"])
def test_save_peft_adapter_loads_in_peft(hf_dir, tmp_path, method):
    backbone = _backbone(hf_dir)
    options = {"rslora": True} if method == "lora" else {}
    keras_lowrank.enable_adapter(backbone, method=method, rank=2, alpha=4, **options)
    _perturb(backbone)
    expected = _keras_logits(backbone)
    out = str(tmp_path / "peft")
    keras_lowrank.save_peft_adapter(backbone, out, hf_dir)
    config = json.load(open(os.path.join(out, "adapter_config.json")))
    assert config["r"] == (4 if method == "pissa" else 2)  # PiSSA: the rank-2r LoRA
    assert config.get("use_dora", False) == (method == "dora")
    assert config["peft_type"] == ("LOKR" if method == "lokr" else "LORA")
    pm = peft.PeftModel.from_pretrained(_hf(hf_dir), out).eval()
    got = _torch_logits(pm)
    assert np.abs(got - _torch_logits(_hf(hf_dir))).max() > 1e-3
    _close(expected, got)
    # and back: the directory loads onto a fresh KerasHub model
    fresh = _backbone(hf_dir)
    keras_lowrank.load_peft_adapter(fresh, out)  # base_model from the config
    _close(_keras_logits(fresh), got)


def _weights(model):
    return [to_np(v).copy() for v in model.weights]


def _unchanged(model, before):
    assert keras_lowrank.adapters(model) == []
    for v, w in zip(model.weights, before):
        np.testing.assert_array_equal(to_np(v), w)


@pytest.mark.parametrize(
    "edit, message",
    [
        ({"peft_type": "BOFT"}, "peft_type 'BOFT' is not supported"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"bias": "all"}, "bias='all'"),
        ({"r": 3}, "rank 4 in the weights, 3 in the config"),
    ],
)
def test_load_peft_adapter_refuses_clearly(llama_dir, tmp_path, edit, message):
    hf_dir = llama_dir
    ad = str(tmp_path / "ad")
    _peft_dir(hf_dir, ad, r=4, lora_alpha=8, target_modules=["q_proj"])
    path = os.path.join(ad, "adapter_config.json")
    config = json.load(open(path))
    config.update(edit)
    json.dump(config, open(path, "w"))
    backbone = _backbone(hf_dir)
    before = _weights(backbone)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        keras_lowrank.load_peft_adapter(backbone, ad, hf_dir)
    _unchanged(backbone, before)


def test_unmapped_module_and_wrong_family(tmp_path):
    llama = _hf_model("llama", str(tmp_path / "llama"))
    gemma = _hf_model("gemma", str(tmp_path / "gemma"))
    ad = str(tmp_path / "ad")
    _peft_dir(llama, ad, r=2, target_modules=["q_proj", "lm_head"])
    backbone = _backbone(llama)
    before = _weights(backbone)
    with pytest.raises(ValueError, match="'base_model.model.lm_head.base_layer.weight' is not a LORA factor"):
        keras_lowrank.load_peft_adapter(backbone, ad, llama)
    _unchanged(backbone, before)
    from safetensors.numpy import load_file, save_file

    weights = os.path.join(ad, "adapter_model.safetensors")
    save_file({k: v for k, v in load_file(weights).items() if "base_layer" not in k}, weights)
    with pytest.raises(ValueError, match="'lm_head'.*maps no Dense/EinsumDense"):
        keras_lowrank.load_peft_adapter(backbone, ad, llama)
    _unchanged(backbone, before)
    with pytest.raises(ValueError, match="converts to GemmaBackbone.*Llama3Backbone"):
        keras_lowrank.load_peft_adapter(backbone, ad, gemma)
    _unchanged(backbone, before)
    keras_lowrank.enable_adapter(backbone, method="svft")
    with pytest.raises(ValueError, match="'svft' adapter, which has no PEFT form"):
        keras_lowrank.save_peft_adapter(backbone, str(tmp_path / "out"), llama)


def test_cli_peft_import_and_export(tmp_path):
    import keras_lowrank_cli as cli

    hf = _hf_model("gemma", str(tmp_path / "gemma"))
    ad = str(tmp_path / "ad")
    expected = _peft_dir(hf, ad, r=2, lora_alpha=4, target_modules=ALL)
    out = str(tmp_path / "m.keras")
    assert cli.main(["peft-import", ad, hf, out]) == 0
    model = keras.saving.load_model(out)
    backbone = getattr(model, "backbone", model)
    _close(_keras_logits(backbone), expected)
    back = str(tmp_path / "back")
    assert cli.main(["peft-export", out, hf, back]) == 0
    pm = peft.PeftModel.from_pretrained(_hf(hf), back).eval()
    _close(_torch_logits(pm), expected)


def test_qlora_adapter_on_an_nf4_base(tmp_path):
    """A PEFT adapter trained over bitsandbytes NF4 goes back onto an NF4
    base: the logits equal PEFT's on the bitsandbytes-dequantized weights
    (bitsandbytes' CPU 4-bit matmul is not the reference: in 0.50 it, and its
    CPU `dequantize_4bit` for weights 16 or 96 wide, disagree with its own codes;
    the codes are bit-identical to ours at every width)."""
    F = pytest.importorskip("bitsandbytes.functional")
    hf = _hf_model("llama", str(tmp_path / "llama"), width=64, inter=128)
    ad = str(tmp_path / "ad")
    targets = ["q_proj", "o_proj", "down_proj"]
    _peft_dir(hf, ad, r=2, lora_alpha=4, target_modules=targets)
    ref = _hf(hf)
    with torch.no_grad():
        for name, module in ref.named_modules():
            if name.split(".")[-1] in targets:
                q, state = F.quantize_4bit(module.weight.data.contiguous(), blocksize=64,
                                           quant_type="nf4", compress_statistics=True)
                module.weight.copy_(F.dequantize_4bit(q, state))
    expected = _torch_logits(peft.PeftModel.from_pretrained(ref, ad).eval())
    backbone = _backbone(hf)
    keras_lowrank.load_peft_adapter(backbone, ad, hf, base="nf4")
    assert {a.layer.__class__.__name__ for _, a in keras_lowrank.adapters(backbone)} == {"NF4Linear"}
    _close(_keras_logits(backbone), expected)


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_gpt2_fused_qkv_and_conv1d_layout(tmp_path, variant):
    """GPT-2 stores its projections (n_in, n_out) (PEFT's fan_in_fan_out) and
    fuses query, key and value in one `c_attn`, which KerasHub splits into
    three layers: each gets its part of the update, and back."""
    hf = _hf_model("gpt2", str(tmp_path / "gpt2"))
    ad = str(tmp_path / "ad")
    expected = _peft_dir(hf, ad, r=2, lora_alpha=4, fan_in_fan_out=True,
                         use_dora=variant == "dora", target_modules=["c_attn", "c_proj", "c_fc"])
    backbone = _backbone(hf)
    keras_lowrank.load_peft_adapter(backbone, ad, hf)
    assert len(keras_lowrank.adapters(backbone)) == 2 * 6  # q, k, v, attention out, 2 MLP
    _close(_keras_logits(backbone), expected)
    if variant == "dora":
        with pytest.raises(ValueError, match="c_attn.*DoRA update cannot be joined"):
            keras_lowrank.save_peft_adapter(backbone, str(tmp_path / "back"), hf)
        return
    # Keras -> PEFT: separate q/k/v LoRAs (different ranks) join into one c_attn LoRA
    fresh = _backbone(hf)
    keras_lowrank.enable_adapter(fresh, method="lora", rank=2, alpha=3, rslora=True,
                                 rank_pattern={"value": 1})
    _perturb(fresh)
    mine = _keras_logits(fresh)
    back = str(tmp_path / "back")
    keras_lowrank.save_peft_adapter(fresh, back, hf)
    config = json.load(open(os.path.join(back, "adapter_config.json")))
    assert config["fan_in_fan_out"] is True
    assert config["rank_pattern"][re.escape("transformer.h.0.attn.c_attn")] == 5
    _close(_torch_logits(peft.PeftModel.from_pretrained(_hf(hf), back).eval()), mine)


def test_named_adapters_both_ways(llama_dir, tmp_path):
    """Two PEFT adapters onto one model as named adapters, switched; one of
    them written back as a PEFT directory."""
    logits = {}
    for name, config in (("a", dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])),
                         ("b", dict(r=2, lora_alpha=2, use_dora=True, target_modules=["v_proj", "down_proj"]))):
        logits[name] = _peft_dir(llama_dir, str(tmp_path / name), **config)
    backbone = _backbone(llama_dir)
    for name in ("a", "b"):
        keras_lowrank.load_peft_adapter(backbone, str(tmp_path / name), llama_dir, adapter_name=name)
    assert keras_lowrank.adapter_names(backbone) == ["a", "b"]
    for name in ("a", "b"):
        keras_lowrank.set_active(backbone, name)
        _close(_keras_logits(backbone), logits[name])
    with pytest.raises(ValueError, match="give adapter_name"):
        keras_lowrank.save_peft_adapter(backbone, str(tmp_path / "x"), llama_dir)
    keras_lowrank.save_peft_adapter(backbone, str(tmp_path / "b2"), llama_dir, adapter_name="b")
    pm = peft.PeftModel.from_pretrained(_hf(llama_dir), str(tmp_path / "b2")).eval()
    _close(_keras_logits(backbone), _torch_logits(pm))


# ----------------------------------------------------------------------
# Tampered directories: every fault is a ValueError naming it, found before
# the model changes (a retry with a good directory then works)
@pytest.fixture(scope="module")
def peft_dirs(llama_dir, tmp_path_factory):
    out = {}
    for kind, config in (
        ("lora", dict(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])),
        ("dora", dict(r=2, lora_alpha=4, use_dora=True, target_modules=["q_proj", "v_proj"])),
    ):
        out[kind] = str(tmp_path_factory.mktemp(kind))
        _peft_dir(llama_dir, out[kind], **config)
    pm = peft.get_peft_model(_hf(llama_dir), peft.VeraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    out["vera"] = str(tmp_path_factory.mktemp("vera"))
    pm.save_pretrained(out["vera"])
    return out


def _edit_weights(folder, edit):
    from safetensors.numpy import load_file, save_file

    path = os.path.join(folder, "adapter_model.safetensors")
    tensors = load_file(path)
    for name in list(tensors):
        edit(name, tensors)
    save_file(tensors, path)


def _poison(suffix, value=np.nan):
    def edit(name, tensors):
        if name.endswith(suffix):
            t = tensors[name].copy()
            t.reshape(-1)[0] = value
            tensors[name] = t
    return edit


def _resize(suffix, fn):
    def edit(name, tensors):
        if name.endswith(suffix):
            tensors[name] = fn(tensors[name])
    return edit


def _edit_config(**changes):
    def edit(folder):
        path = os.path.join(folder, "adapter_config.json")
        config = json.load(open(path))
        config.update(changes)
        json.dump(config, open(path, "w"))
    return edit


def _replace_config(text):
    def edit(folder):
        with open(os.path.join(folder, "adapter_config.json"), "w") as f:
            f.write(text)
    return edit


def _lower_vera_rank(name, tensors):
    """The shared projections at rank 2, the modules' lambdas at 4."""
    if name.endswith("vera_A"):
        tensors[name] = np.ascontiguousarray(tensors[name][:2])
    elif name.endswith("vera_B"):
        tensors[name] = np.ascontiguousarray(tensors[name][:, :2])


def _truncate(folder):
    path = os.path.join(folder, "adapter_model.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])


TAMPERS = {
    "nan_lora_A": ("lora", lambda d: _edit_weights(d, _poison("lora_A.weight")), "lora_A.weight.*NaN or inf"),
    "inf_lora_B": ("lora", lambda d: _edit_weights(d, _poison("lora_B.weight", np.inf)), "lora_B.weight.*NaN or inf"),
    "nan_magnitude": ("dora", lambda d: _edit_weights(d, _poison("lora_magnitude_vector")), "magnitude.*NaN or inf"),
    "nan_vera_A": ("vera", lambda d: _edit_weights(d, _poison("vera_A")), "vera_A.*NaN or inf"),
    "config_list": ("lora", _replace_config("[1, 2]"), "must hold a JSON object.*list"),
    "config_null": ("lora", _replace_config("null"), "must hold a JSON object.*null"),
    "config_not_json": ("lora", _replace_config("{r: 2"), "not valid JSON"),
    "bad_regex": ("lora", _edit_config(rank_pattern={"q_proj(": 2}), "rank_pattern key 'q_proj\\(' is not a valid"),
    "pattern_list": ("lora", _edit_config(rank_pattern=["q_proj"]), "rank_pattern must be a JSON object"),
    "pattern_value": ("lora", _edit_config(alpha_pattern={"q_proj": "x"}), "alpha_pattern must be a finite number > 0; received alpha_pattern='x'"),
    "rank_string": ("lora", _edit_config(r="2"), "r must be an int > 0; received r='2'"),
    "alpha_nan": ("lora", _edit_config(lora_alpha=float("nan")), "lora_alpha must be a finite number > 0; received lora_alpha=nan"),
    "dropout_range": ("lora", _edit_config(lora_dropout=2.0), "lora_dropout must be a finite number in \\[0, 1\\]; received lora_dropout=2.0"),
    "truncated": ("lora", _truncate, "not a readable safetensors file"),
    "magnitude_short": ("dora", lambda d: _edit_weights(d, _resize("lora_magnitude_vector", lambda t: t[:-1])),
                        "lora_magnitude_vector size 15, lora_B.weight rows 16"),
    "lora_A_1d": ("lora", lambda d: _edit_weights(d, _resize("lora_A.weight", lambda t: t[0])),
                  "lora_A.weight has shape \\(16,\\); a 2-D matrix"),
    "vera_A_1d": ("vera", lambda d: _edit_weights(d, _resize("vera_A", lambda t: t[0])), "vera_A has shape"),
    "vera_rank": ("vera", lambda d: _edit_weights(d, _lower_vera_rank), "have rank 2/2, the modules' vera_lambda_d \\[4\\]"),
}


@pytest.mark.parametrize("tamper", list(TAMPERS))
def test_tampered_peft_directories_are_refused_before_anything_changes(peft_dirs, llama_dir, tmp_path, tamper):
    import shutil

    kind, edit, message = TAMPERS[tamper]
    bad = str(tmp_path / "bad")
    shutil.copytree(peft_dirs[kind], bad)
    edit(bad)
    backbone = _backbone(llama_dir)
    before = _weights(backbone)
    flags = [v.trainable for v in backbone.weights]
    with pytest.raises((ValueError, TypeError), match=message):
        keras_lowrank.load_peft_adapter(backbone, bad, llama_dir)
    _unchanged(backbone, before)
    assert [v.trainable for v in backbone.weights] == flags
    # nothing half-loaded: the good directory loads onto the same model
    keras_lowrank.load_peft_adapter(backbone, peft_dirs[kind], llama_dir)
    assert {a.method for _, a in keras_lowrank.adapters(backbone)} == {"dora" if kind == "dora" else kind}


def test_save_peft_adapter_writes_both_files_or_neither(llama_dir, tmp_path):
    import pathlib

    backbone = _backbone(llama_dir)
    keras_lowrank.enable_adapter(backbone, method="lora", rank=2, targets=["query"])
    _perturb(backbone)
    out = tmp_path / "out"
    # os.PathLike everywhere a path goes, the recorded base path included
    keras_lowrank.save_peft_adapter(backbone, out, pathlib.Path(llama_dir),
                                    base_model_name_or_path=pathlib.Path(llama_dir))
    config = json.load(open(out / "adapter_config.json"))
    assert config["base_model_name_or_path"] == llama_dir
    files = {n: open(out / n, "rb").read() for n in sorted(os.listdir(out))}
    assert list(files) == ["adapter_config.json", "adapter_model.safetensors"]
    _perturb(backbone)  # a new adapter that fails to save must not replace the old one
    with pytest.raises(TypeError, match="base_model_name_or_path must be a str or os.PathLike"):
        keras_lowrank.save_peft_adapter(backbone, out, llama_dir, base_model_name_or_path=object())
    assert {n: open(out / n, "rb").read() for n in sorted(os.listdir(out))} == files
    fresh = _backbone(llama_dir)
    keras_lowrank.load_peft_adapter(fresh, out)
    assert len(keras_lowrank.adapters(fresh)) == len(keras_lowrank.adapters(backbone))
