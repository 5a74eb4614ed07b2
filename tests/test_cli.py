"""Tests of the `keras-lowrank` command line (`keras_lowrank.cli.main`).

The demo runs once per test module, in-process, on the backend the test
process runs under (`KERAS_BACKEND`); the other tests use the files it wrote.
"""

import contextlib
import io
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("keras_hub")
pytest.importorskip("safetensors")

import keras  # noqa: E402

import keras_lowrank  # noqa: E402
from keras_lowrank.cli import main  # noqa: E402

# KerasHub tasks compile themselves with a default optimizer when built, so
# loading a file saved with a trained optimizer warns that it skips its state.
pytestmark = pytest.mark.filterwarnings("ignore:Skipping variable loading for optimizer")


def _value(label, text):
    m = re.search(rf"^{label}: ([-+0-9.eE]+|nan|inf)$", text, re.MULTILINE)
    assert m, f"no '{label}: <number>' line in the output:\n{text}"
    return float(m.group(1))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(["demo", "--small", "--epochs-a", "1", "--epochs-b", "2", "--base", "nf4", "--out", str(out)])
    return code, buf.getvalue(), out


def test_demo(demo):
    code, text, out = demo
    assert code == 0, text
    before = _value("loss before", text)
    after = _value("loss after", text)
    assert np.isfinite(before) and np.isfinite(after)
    assert after < before, (before, after)
    assert "outputs match: yes" in text
    # the summary table of enable_adapter
    assert "decoder_block_0/attention/query" in text
    assert (out / "adapted.keras").is_file()
    assert (out / "adapter.safetensors").is_file()
    assert os.path.getsize(out / "adapter.safetensors") < os.path.getsize(out / "adapted.keras")


def test_inspect(demo, capsys):
    _, _, out = demo
    code = main(["inspect", str(out / "adapted.keras")])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "alpha" in text and "trainable" in text
    rows = [line for line in text.splitlines() if "decoder_block" in line]
    assert len(rows) == 14, text  # 7 linear layers in each of the 2 blocks
    assert all(" lora " in row and " nf4 " in row for row in rows)
    assert "32x8" in text  # key/value kernels: hidden 32 -> 1 kv head x 8
    assert re.search(r"adapters: 14\b", text)
    assert re.search(r"trainable params: [\d,]+ / [\d,]+", text)


def test_inspect_adapter_file_without_keras(demo, tmp_path):
    """`inspect` reads adapter files (and .keras files) from their metadata,
    without importing Keras or a backend."""
    _, _, out = demo
    script = (
        "import sys, keras_lowrank_cli\n"
        "code = keras_lowrank_cli.main(['inspect', sys.argv[1]])\n"
        "assert code == 0, code\n"
        "heavy = [m for m in ('keras', 'jax', 'torch', 'tensorflow') if m in sys.modules]\n"
        "print('imported:', heavy)\n"
    )
    for name in ("adapter.safetensors", "adapted.keras"):
        proc = subprocess.run([sys.executable, "-c", script, str(out / name)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "imported: []" in proc.stdout, proc.stdout
        rows = [line for line in proc.stdout.splitlines() if "decoder_block" in line]
        assert len(rows) == 14 and all(" lora " in r for r in rows), proc.stdout
        assert "32x8" in proc.stdout
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"12345678")
    assert main(["inspect", str(junk)]) == 2


def test_merge_writes_atomically(demo, capsys, tmp_path, monkeypatch):
    _, _, out = demo
    src = tmp_path / "same.keras"
    shutil.copy(out / "adapted.keras", src)
    # IN == OUT: loaded fully, then replaced
    assert main(["merge", str(src), str(src)]) == 0, capsys.readouterr()
    capsys.readouterr()
    assert main(["inspect", str(src)]) == 0
    assert "no adapters" in capsys.readouterr().out
    # an output path that is a folder, or in a missing folder: one line, exit 2
    folder = tmp_path / "dir.keras"
    folder.mkdir()
    assert main(["merge", str(out / "adapted.keras"), str(folder)]) == 2
    err = capsys.readouterr().err
    assert "is a folder" in err and len(err.strip().splitlines()) == 1
    # a write that fails half-way keeps the old OUT and leaves no temporary
    target = tmp_path / "target.keras"
    target.write_bytes(b"previous contents")

    def failing_save(self, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(keras.Model, "save", failing_save)
    assert main(["merge", str(out / "adapted.keras"), str(target)]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and len(err.strip().splitlines()) == 1
    assert target.read_bytes() == b"previous contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir.keras", "same.keras", "target.keras"]


def test_merge(demo, capsys, tmp_path):
    _, _, out = demo
    merged_path = tmp_path / "merged.keras"
    code = main(["merge", str(out / "adapted.keras"), str(merged_path)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "merged 14 adapters" in text
    assert merged_path.is_file()

    adapted = keras.saving.load_model(out / "adapted.keras", compile=False)
    merged = keras.saving.load_model(merged_path, compile=False)
    assert keras_lowrank.adapters(merged) == []
    tokens = np.random.default_rng(1).integers(0, 64, (2, 16)).astype("int32")
    x = {"token_ids": tokens, "padding_mask": np.ones_like(tokens)}
    y0 = keras.ops.convert_to_numpy(adapted.predict_on_batch(x))
    y1 = keras.ops.convert_to_numpy(merged.predict_on_batch(x))
    np.testing.assert_allclose(y1, y0, atol=1e-4, rtol=1e-4)

    # A merged model has no adapters: inspect says so, merge refuses it.
    assert main(["inspect", str(merged_path)]) == 0
    assert "no adapters" in capsys.readouterr().out
    assert main(["merge", str(merged_path), str(tmp_path / "again.keras")]) == 2
    assert "no adapters" in capsys.readouterr().err


def test_bad_input(tmp_path, capsys):
    missing = str(tmp_path / "missing.keras")
    assert main(["inspect", missing]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["merge", missing, str(tmp_path / "out.keras")]) == 2
    assert "no such file" in capsys.readouterr().err

    not_a_model = tmp_path / "junk.keras"
    not_a_model.write_text("not a zip file")
    assert main(["inspect", str(not_a_model)]) == 2
    assert "could not load" in capsys.readouterr().err

    assert main(["merge", missing, str(tmp_path / "out.h5")]) == 2
    assert main(["demo", "--method", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert main(["frobnicate"]) == 2  # argparse error
    assert main([]) == 2
