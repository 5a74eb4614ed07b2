"""The documentation: the site builds with `mkdocs build --strict` (a broken
link or a missing API reference fails), and every Python code block of the
docs and the README runs (on one backend: the torch shard). Blocks of a page
run in order in one namespace, in a scratch directory. Blocks that load a
KerasHub preset get a tiny model of the same class (no download); the PEFT
page gets a tiny Hugging Face model and PEFT adapter at the paths it names.
docs/distribution.md needs 8 devices: tests/distribution_check.py runs it."""

import glob
import os
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
PAGES = sorted(
    os.path.relpath(p, ROOT) for p in [os.path.join(ROOT, "README.md")]
    + glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True)
)
#: pages whose blocks run elsewhere
ELSEWHERE = {"docs/distribution.md": "tests/distribution_check.py (8 JAX devices)"}


def code_blocks(page):
    with open(os.path.join(ROOT, page)) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), re.S)


RUN = [p for p in PAGES if code_blocks(p) and p not in ELSEWHERE]

#: a tiny Gemma of the same classes as the presets the docs name
TINY_GEMMA = dict(vocabulary_size=64, num_layers=2, num_query_heads=4, num_key_value_heads=1,
                  hidden_dim=16, intermediate_dim=32, head_dim=4)


def tiny_presets(monkeypatch):
    import keras_hub

    real = keras_hub.models.Backbone.from_preset.__func__

    def causal_lm(cls, preset, **kwargs):
        kwargs.pop("dtype", None)
        return keras_hub.models.GemmaCausalLM(
            backbone=keras_hub.models.GemmaBackbone(**TINY_GEMMA), preprocessor=kwargs.get("preprocessor"))

    def backbone(cls, preset, **kwargs):
        if os.path.isdir(preset):  # a local Hugging Face directory: the real converter
            return real(cls, preset, **kwargs)
        return keras_hub.models.GemmaBackbone(**TINY_GEMMA)

    monkeypatch.setattr(keras_hub.models.GemmaCausalLM, "from_preset", classmethod(causal_lm))
    monkeypatch.setattr(keras_hub.models.Backbone, "from_preset", classmethod(backbone))


def peft_paths():
    """The directories docs/peft.md names: a tiny Hugging Face Llama and a
    PEFT LoRA adapter for it with nonzero weights."""
    import peft
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=32,
        tie_word_embeddings=False))
    model.save_pretrained("path/to/hf-model-dir")
    pm = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, init_lora_weights=False,
                                                   target_modules=["q_proj", "v_proj"]))
    pm.save_pretrained("path/to/peft-adapter")


@pytest.mark.one_backend
def test_the_site_builds_strict(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, NO_MKDOCS_2_WARNING="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert (tmp_path / "site" / "api" / "index.html").is_file()


@pytest.mark.one_backend
@pytest.mark.parametrize("page", RUN)
def test_code_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny_presets(monkeypatch)
    if page == "docs/peft.md":
        peft_paths()
    namespace = {"__name__": "__docs__"}
    np.random.seed(0)
    for i, block in enumerate(code_blocks(page)):
        try:
            exec(compile(block, f"{page}[block {i}]", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"{page}, code block {i} failed: {type(e).__name__}: {e}") from e


def test_every_page_with_code_is_run():
    assert set(RUN) | set(ELSEWHERE) == {p for p in PAGES if code_blocks(p)}
    assert len(RUN) >= 6
