"""A PEFT adapter into Keras and back: Hugging Face checkpoint, PEFT LoRA,
KerasHub, fine-tune with `model.fit`, PEFT directory again.

A tiny random Hugging Face Llama is saved to a directory (no download), a
PEFT LoRA with nonzero weights is put on it and saved; KerasHub converts the
checkpoint (`from_preset(<directory>)`), `load_peft_adapter` puts the PEFT
adapter on it (the logits must match PEFT's), the adapter is fine-tuned
further in Keras, and `save_peft_adapter` writes it back as a PEFT directory
that `PeftModel.from_pretrained` loads (the logits must match Keras's).
Needs torch, transformers and peft.

    python examples/peft_roundtrip.py [--backend B] [--epochs 4] [--out DIR] [--small]
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny_tasks as tt  # noqa: E402

TOL = 1e-4  # largest relative logit difference


def main(argv=None):
    args, epochs, n, out = tt.setup(argv, __doc__, default_epochs=4, small_epochs=2)
    import keras
    import keras_hub
    import numpy as np
    import peft
    import torch
    import transformers

    import keras_lowrank as kl

    # 1. A Hugging Face checkpoint and a PEFT LoRA for it.
    torch.manual_seed(0)
    hf_dir, peft_in, peft_out = (os.path.join(out, d) for d in ("hf_llama", "peft_lora", "peft_lora_tuned"))
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=tt.VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
        tie_word_embeddings=False))
    hf.save_pretrained(hf_dir)
    pm = peft.get_peft_model(hf, peft.LoraConfig(
        r=4, lora_alpha=8, init_lora_weights=False, target_modules=["q_proj", "v_proj", "down_proj"]))
    pm.save_pretrained(peft_in)
    x, y = tt.task(3, n, seed=1)

    def torch_logits(model):
        with torch.no_grad():
            ids = torch.tensor(x["token_ids"][:4].astype("int64"))
            return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.numpy()

    def keras_logits(lm):
        return keras.ops.convert_to_numpy(lm({k: v[:4] for k, v in x.items()}))

    def rel(a, b):
        return float(np.abs(a - b).max() / np.abs(b).max())

    # 2. Into KerasHub.
    backbone = keras_hub.models.Backbone.from_preset(hf_dir, dtype="float32")
    lm = keras_hub.models.LlamaCausalLM(backbone=backbone, preprocessor=None)
    summary = kl.load_peft_adapter(lm, peft_in, hf_dir)
    imported = rel(keras_logits(lm), torch_logits(pm.eval()))
    print(f"imported {len(summary.rows)} LoRA layers; logits vs PEFT: {imported:.2g} relative")

    # 3. Fine-tune in Keras, then back to PEFT.
    tt.compile_lm(lm, 1e-2)
    lm.fit(x, y, batch_size=32, epochs=epochs, verbose=0)
    kl.save_peft_adapter(lm, peft_out, hf_dir)
    back = peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained(hf_dir), peft_out)
    exported = rel(keras_logits(lm), torch_logits(back.eval()))
    print(f"fine-tuned in Keras and exported; logits vs PeftModel.from_pretrained: {exported:.2g} relative")
    result = {"backend": keras.backend.backend(), "layers": len(summary.rows),
              "import_rel_diff": imported, "export_rel_diff": exported,
              "accuracy": tt.accuracy(lm, (x, y))}
    print(json.dumps(result))
    if imported > TOL or exported > TOL:
        print("failed: the logits differ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
