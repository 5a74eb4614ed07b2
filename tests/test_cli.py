"""Tests of the `keras-lowrank` command line (`keras_lowrank_cli.main`).

The demo runs once per test module, in-process, on the backend the test
process runs under (`KERAS_BACKEND`); the other tests use the files it wrote.
The tests of what runs without Keras (`--help`, `methods`, `inspect`) run
child processes and are backend-neutral (`one_backend`).
"""

import argparse
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
import keras_lowrank_cli  # noqa: E402
from keras_lowrank_cli import main  # noqa: E402

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


def _one_line_error(err, *words):
    """`err` is one line, no traceback, naming `words`."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, (w, err)


# ----------------------------------------------------------------------
# Refusals: one line on stderr, exit code 2
def test_library_refusals_are_one_line_and_exit_2(capsys, monkeypatch):
    """Whatever the library refuses with (ValueError, TypeError, OSError,
    FileExistsError), the command prints one line naming it and exits 2;
    a closed stdout ends it quietly with 2."""
    cases = [
        (ValueError("layer 'q': rank must be\na positive int"), "rank must be a positive int"),
        (TypeError("base_model must be a str"), "base_model must be a str"),
        (FileNotFoundError(2, "No such file or directory", "x/adapter_config.json"), "x/adapter_config.json"),
        (FileExistsError(17, "File exists", "out_dir"), "out_dir already exists"),
        (PermissionError(13, "Permission denied", "ro/out"), "Permission denied"),
    ]
    for error, words in cases:
        def fail(error=error):
            raise error

        assert keras_lowrank_cli.run("peft-export", fail) == 2
        _one_line_error(capsys.readouterr().err, "keras-lowrank peft-export: error:", words)

    def pipe_closed():
        raise BrokenPipeError(32, "Broken pipe")

    assert keras_lowrank_cli.run("inspect", pipe_closed) == 2
    assert capsys.readouterr().err == ""


def test_peft_commands_refuse_in_one_line(tmp_path, capsys, monkeypatch):
    """`peft-export` onto an existing file, and `peft-import` of an adapter
    whose config is a JSON list, are one line and exit code 2 (they were a
    FileExistsError and an AttributeError traceback)."""
    import keras_hub

    model_dir = tmp_path / "hf"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    # peft-export: OUT_DIR is an existing file
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    assert main(["peft-export", str(tmp_path / "m.keras"), str(model_dir), str(taken)]) == 2
    _one_line_error(capsys.readouterr().err, "peft-export: error:", "already exists")
    assert taken.read_text() == "keep me"
    # peft-import: adapter_config.json holds a JSON list
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("[]")
    tiny = dict(vocabulary_size=64, num_layers=1, num_query_heads=2, num_key_value_heads=1,
                hidden_dim=8, intermediate_dim=16, head_dim=4)
    monkeypatch.setattr(keras_hub.models.CausalLM, "from_preset", classmethod(
        lambda cls, preset, **kw: keras_hub.models.GemmaCausalLM(
            backbone=keras_hub.models.GemmaBackbone(**tiny), preprocessor=None)))
    out = tmp_path / "out.keras"
    assert main(["peft-import", str(adapter), str(model_dir), str(out)]) == 2
    _one_line_error(capsys.readouterr().err, "peft-import: error:", "adapter_config.json")
    assert not out.exists()


def test_argument_errors_are_one_line(capsys):
    assert main(["merge", "only-one.keras"]) == 2
    _one_line_error(capsys.readouterr().err, "keras-lowrank merge: error:", "OUT.keras")
    assert main(["frobnicate"]) == 2
    _one_line_error(capsys.readouterr().err, "invalid choice", "frobnicate")
    assert main(["methods", "nope"]) == 2
    _one_line_error(capsys.readouterr().err, "unknown method 'nope'", "lora")


# ----------------------------------------------------------------------
# methods [NAME]
def test_methods_command_lists_every_method_and_its_options(capsys):
    assert main(["methods"]) == 0
    text = capsys.readouterr().out
    for name in keras_lowrank.methods():
        info = keras_lowrank.method_info(name)
        assert re.search(rf"^{name} +{re.escape(info.description)}$", text, re.M), (name, text)
    assert main(["methods", "vera"]) == 0
    text = capsys.readouterr().out
    for o in keras_lowrank.method_info("vera").options:
        assert re.search(rf"^{o.name} +{re.escape(repr(o.default))} +{re.escape(o.allowed)} +"
                         rf"{re.escape(o.meaning)}$", text, re.M), (o, text)


# ----------------------------------------------------------------------
# The parser, --help and the docs list the same commands
def test_the_synopsis_is_the_parser():
    """`COMMANDS` (what `--help`, the README and docs/index.md show) names
    every command of the parser with every argument and option it takes."""
    parser = keras_lowrank_cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert list(sub.choices) == list(keras_lowrank_cli.COMMANDS)
    for name, command in sub.choices.items():
        args, _ = keras_lowrank_cli.COMMANDS[name]
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            if action.option_strings:
                assert action.option_strings[0] in args, (name, action.option_strings)
            else:
                assert action.metavar in args, (name, action.metavar)
    helptext = parser.format_help()
    for line in keras_lowrank_cli.synopsis():
        assert line in helptext


# ----------------------------------------------------------------------
# Without Keras: --help, methods, inspect
HEAVY = ("keras", "tensorflow", "jax", "torch")


def _imported(importtime_log):
    """Top-level packages in a `python -X importtime` log."""
    return {line.rsplit("|", 1)[-1].strip().split(".")[0]
            for line in importtime_log.splitlines() if line.startswith("import time:")}


@pytest.mark.one_backend
def test_help_and_inspect_import_no_keras(demo):
    """`python -m keras_lowrank --help` and `inspect FILE`, and the same
    through the `keras-lowrank` entry point, import neither Keras nor a
    backend (they took ~7 s when they did). `methods` reads the registry,
    which the methods' modules declare, so it imports Keras."""
    _, _, out = demo
    env = dict(os.environ, KERAS_BACKEND="tensorflow")
    commands = [["--help"], ["inspect", str(out / "adapted.keras")],
                ["inspect", str(out / "adapter.safetensors")], ["merge", "--help"]]
    for argv in commands:
        proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "keras_lowrank", *argv],
                              capture_output=True, text=True, timeout=120, env=env)
        assert proc.returncode == 0, (argv, proc.stderr[-2000:])
        heavy = set(HEAVY) & _imported(proc.stderr)
        assert not heavy, (argv, heavy)
        assert "keras_lowrank" in _imported(proc.stderr), argv  # the log is read right
    script = ("import sys, keras_lowrank_cli\n"
              "for argv in (['--help'], ['inspect', sys.argv[1]]):\n"
              "    assert keras_lowrank_cli.main(argv) == 0, argv\n"
              "print('imported:', sorted(m for m in %r if m in sys.modules))\n" % (HEAVY,))
    proc = subprocess.run([sys.executable, "-c", script, str(out / "adapted.keras")],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "imported: []" in proc.stdout and "rank" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "keras_lowrank", "methods", "svft"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert all(o.name in proc.stdout for o in keras_lowrank.method_info("svft").options), proc.stdout


@pytest.mark.one_backend
def test_a_closed_pipe_ends_quietly(demo):
    """`keras-lowrank inspect FILE | head` with the reader gone: no
    traceback, nothing on stderr, exit code 2."""
    _, _, out = demo
    for argv in (["inspect", str(out / "adapted.keras")], ["methods"], ["--help"]):
        read, write = os.pipe()
        os.close(read)  # the reader is gone before anything is written
        try:
            proc = subprocess.run([sys.executable, "-m", "keras_lowrank", *argv], stdout=write,
                                  stderr=subprocess.PIPE, text=True, timeout=120)
        finally:
            os.close(write)
        assert proc.stderr == "", (argv, proc.stderr)
        # argparse itself drops what `--help` cannot write
        assert proc.returncode == (0 if argv == ["--help"] else 2), (argv, proc.returncode)


def test_inspect_names_layers_by_their_keys(tmp_path, capsys):
    """`inspect` names each layer by its key, as adapter files and error
    messages do (`dense[1]`), not by the names Keras numbered in this
    process (`dense_7`)."""
    for _ in range(3):
        keras.layers.Dense(2)  # numbers the next generated names
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(6), keras.layers.Dense(6),
                              keras.layers.Dense(2, name="head")])
    keras_lowrank.enable_adapter(model, method="lora", rank=2)
    numbered = [layer.name for layer in model.layers[:2]]
    assert all(re.fullmatch(r"dense_\d+", n) for n in numbered), numbered
    model.save(tmp_path / "m.keras")
    keras_lowrank.save_adapter(model, tmp_path / "m.safetensors")
    for name in ("m.keras", "m.safetensors"):
        assert main(["inspect", str(tmp_path / name)]) == 0
        text = capsys.readouterr().out
        rows = [line.split()[0] for line in text.splitlines() if " lora " in line]
        assert rows == ["dense[0]", "dense[1]"], text
        assert not any(n in text for n in numbered), text
