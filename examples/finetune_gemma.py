"""Fine-tune a tiny KerasHub Gemma with LoRA; save, reload, merge.

Run `KERAS_BACKEND=jax python examples/finetune_gemma.py` (or tensorflow,
torch). For real weights use `GemmaCausalLM.from_preset(..., preprocessor=None)`.
"""

import os
import tempfile

import keras
import keras_hub
import numpy as np

import keras_lowrank

# A tiny Gemma causal LM, built from scratch (no download).
V, T = 64, 16
backbone = keras_hub.models.GemmaBackbone(
    vocabulary_size=V, num_layers=2, num_query_heads=4, num_key_value_heads=1,
    hidden_dim=32, intermediate_dim=64, head_dim=8,
)
model = keras_hub.models.GemmaCausalLM(backbone=backbone, preprocessor=None)

# Toy data: the target of every token is (token + 3) mod V.
tokens = np.random.default_rng(0).integers(0, V, (256, T)).astype("int32")
x = {"token_ids": tokens, "padding_mask": np.ones_like(tokens)}
y = (tokens + 3) % V

# Wrap every Dense/EinsumDense (except the output head) with a rank-8 LoRA
# adapter and freeze everything else; the summary prints as a table.
print(model.enable_adapter(method="lora", rank=8))

# Compile after enable_adapter, so the optimizer sees only the adapters.
model.compile(
    optimizer=keras.optimizers.Adam(1e-2),
    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
)
model.fit(x, y, batch_size=32, epochs=3)

# The .keras file keeps the adapters; loading needs `import keras_lowrank`.
folder = tempfile.mkdtemp()
model.save(os.path.join(folder, "adapted.keras"))
reloaded = keras.saving.load_model(os.path.join(folder, "adapted.keras"), compile=False)
print("reloaded adapters:", len(keras_lowrank.adapters(reloaded)))

# Or save just the adapters (a few KB), to load onto a fresh base later.
keras_lowrank.save_adapter(model, os.path.join(folder, "adapter.safetensors"))

# Fold the adapters into the kernels: plain layers, same outputs.
before = keras.ops.convert_to_numpy(reloaded(x, training=False))
keras_lowrank.merge(reloaded)
after = keras.ops.convert_to_numpy(reloaded(x, training=False))
print("adapters left:", len(keras_lowrank.adapters(reloaded)),
      "max |merged - adapted|:", float(np.max(np.abs(after - before))))
