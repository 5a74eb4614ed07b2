"""PEFT's `target_parameters` on mixture-of-experts checkpoints: a PEFT LoRA
on the experts, the router and attention of a Hugging Face Mixtral or
Qwen3-MoE loads onto the KerasHub model with the same logits, and LoRA
trained in Keras on the same layers writes back as a directory that PEFT
loads with the same logits."""

import json

import pytest

import keras_lowrank as kl

pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
keras_hub = pytest.importorskip("keras_hub")

from conftest import dealt
from conftest import perturb
from peft_models import close
from peft_models import hf_moe_model
from peft_models import keras_backbone
from peft_models import keras_logits
from peft_models import load_hf
from peft_models import randomize_lora
from peft_models import torch_logits

PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"]


@pytest.mark.parametrize("family, rslora", dealt([("mixtral", False), ("qwen3_moe", False), ("mixtral", True)]))
def test_target_parameters_both_ways(family, rslora, tmp_path):
    base = hf_moe_model(family, str(tmp_path / "hf"))
    # PEFT -> Keras
    model = peft.get_peft_model(load_hf(base), peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], target_parameters=PARAMS,
        use_rslora=rslora))
    randomize_lora(model)
    want = torch_logits(model)
    model.save_pretrained(tmp_path / "peft")
    backbone = keras_backbone(base)
    summary = kl.load_peft_adapter(backbone, tmp_path / "peft", base_model=base)
    assert summary.kinds["experts"][0] == summary.kinds["experts"][1] >= 4
    assert summary.kinds["router"] == (2, 2)
    close(keras_logits(backbone), want, 1e-5)
    # Keras -> PEFT: LoRA of Keras's own (Mixtral's gate and up banks get
    # different factors, written as one fused rank-2r LoRA)
    backbone = keras_backbone(base)
    kl.enable_adapter(backbone, rank=2, alpha=4, targets=["experts", "router", "query", "value"],
                      rank_pattern={"expert_feedforward_output_dense": 3}, rslora=rslora)
    for i, (_, a) in enumerate(kl.adapters(backbone)):
        perturb(a, 0.3, seed=i)
    want = keras_logits(backbone)
    kl.save_peft_adapter(backbone, tmp_path / "back", base)
    config = json.loads((tmp_path / "back" / "adapter_config.json").read_text())
    assert sorted({p.split(".", 3)[-1] for p in config["target_parameters"]}) == sorted(PARAMS)
    back = peft.PeftModel.from_pretrained(load_hf(base), tmp_path / "back")
    close(torch_logits(back), want, 1e-5)
    # and that directory loads back onto a fresh KerasHub model
    fresh = keras_backbone(base)
    kl.load_peft_adapter(fresh, tmp_path / "back")
    close(keras_logits(fresh), want, 1e-5)
