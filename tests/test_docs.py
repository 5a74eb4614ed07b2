"""The documentation: the site builds with `mkdocs build --strict` (a broken
link or a missing API reference fails), and every Python code block of the
docs and the README runs (on one backend: the torch shard). Blocks of a page
run in order in one namespace, in a scratch directory. Blocks that load a
KerasHub preset get a tiny model of the same class (no download); the PEFT
page gets a tiny Hugging Face model and PEFT adapter at the paths it names.
docs/distribution.md needs 8 devices: tests/distribution_check.py runs it
(here its names are only checked to be defined).

The docs also say what exists, and the tests hold them to it: the API
reference shows every public name and no internal one; the extras, the
command line's commands, `enable_adapter`'s signature, the demo's options,
the `keras_lowrank.*` names and what saves as LoRA are what the code has;
and no page cites sections of a document users cannot read ("spec §N")."""

import ast
import builtins
import glob
import importlib
import inspect
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import keras_lowrank

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


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The site, built once per module with `mkdocs build --strict`."""
    out = tmp_path_factory.mktemp("site")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, NO_MKDOCS_2_WARNING="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out


@pytest.mark.one_backend
def test_the_site_builds_strict(site):
    assert (site / "api" / "index.html").is_file()


@pytest.mark.one_backend
def test_the_method_pages_show_the_declared_options_and_are_in_the_navigation(site):
    """scripts/docs_hooks.py makes each method page's options table and the
    overview's method table from the registry, and lists every method page
    in the navigation."""
    from keras_lowrank import registry

    overview = (site / "methods" / "index.html").read_text(encoding="utf-8")
    for name in keras_lowrank.methods():
        page = (site / "methods" / name / "index.html").read_text(encoding="utf-8")
        assert "{{" not in page
        for option in registry.get(name).options:
            assert f"<code>{option.name}</code>" in page, (name, option.name)
        assert f"<code>{name}</code>" in overview and f'href="{name}/"' in overview, name
        row = re.search(rf"<tr>\s*<td><code>{name}</code></td>(.*?)</tr>", overview, re.S).group(1)
        cells = re.findall(r"<td>(.*?)</td>", row, re.S)
        assert cells[1] == ("yes" if keras_lowrank.method_info(name).as_lora or name == "lora" else "no"), (name, cells)
        peft = registry.get(name).peft
        assert cells[2] == (f"<code>{peft.peft_type}</code>" if peft else "no"), (name, cells)
        assert f'href="../methods/{name}/"' in (site / "saving" / "index.html").read_text(encoding="utf-8"), name


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


def page_text(page):
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        return f.read()


# ----------------------------------------------------------------------
# The API reference: every public name, no internal one
#: the members the reference shows of a class (the others are how methods
#: are built, or Keras's own)
CLASS_MEMBERS = {
    "keras_lowrank.Adapter": {"options", "delta_matrix", "trainable_count"},
    "keras_lowrank.AdapterSummary": {"adapter_params", "adapted_paths", "trainable_fraction"},
    "keras_lowrank.registry.MethodInfo": {"defaults"},
}
#: classes the reference shows because a public function returns them
RETURN_TYPES = ("keras_lowrank.registry.MethodInfo", "keras_lowrank.registry.OptionInfo")


def resolve(path):
    """The object a dotted path names: attributes from the package down
    (`keras_lowrank.methods` is the function), or else from the longest
    module prefix (`keras_lowrank.methods.lora.LoRA`)."""
    parts = path.split(".")
    try:
        obj = importlib.import_module(parts[0])
        for i, name in enumerate(parts[1:], 1):
            if inspect.ismodule(obj) and not hasattr(obj, name):
                importlib.import_module(".".join(parts[: i + 1]))
            obj = getattr(obj, name)
        return obj
    except (AttributeError, ImportError):
        pass
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for name in parts[i:]:
            obj = getattr(obj, name)
        return obj
    raise AttributeError(f"{path} names nothing")


def public_api():
    """`{id(object): (public path, object)}` of every public name:
    `keras_lowrank.__all__`, and the public names of its public modules
    (their `__all__`, or else every function and class they define) and of
    `keras_lowrank.federated`."""
    import keras_lowrank as kl
    from keras_lowrank import federated

    found = {}
    modules = [("keras_lowrank.federated", federated)]
    for name in kl.__all__:
        obj = getattr(kl, name)
        if inspect.ismodule(obj):
            modules.append((f"keras_lowrank.{name}", obj))
        elif name != "__version__":
            found.setdefault(id(obj), (f"keras_lowrank.{name}", obj))
    for path, module in modules:
        names = getattr(module, "__all__", None)
        if names is None:
            names = [n for n, o in vars(module).items() if not n.startswith("_")
                     and (inspect.isfunction(o) or inspect.isclass(o)) and o.__module__ == module.__name__]
        for name in names:
            obj = getattr(module, name)
            found.setdefault(id(obj), (f"{path}.{name}", obj))
    return found


@pytest.mark.one_backend
def test_the_api_reference_shows_every_public_name_and_no_internal_one(site):
    html = (site / "api" / "index.html").read_text(encoding="utf-8")
    shown = {ident: resolve(ident) for ident in set(re.findall(r'id="(keras_lowrank\.[\w.]+)"', html))}
    public = public_api()
    shown_ids = {id(obj) for obj in shown.values()}
    missing = sorted(path for key, (path, _) in public.items() if key not in shown_ids)
    assert not missing, f"docs/api.md lacks these public names: {missing}"
    allowed = set(public) | {id(resolve(path)) for path in RETURN_TYPES}
    internal = sorted(
        ident for ident, obj in shown.items()
        if id(obj) not in allowed and ident.rpartition(".")[2] not in CLASS_MEMBERS.get(ident.rpartition(".")[0], ())
    )
    assert not internal, f"docs/api.md shows internal names (list a class's public members): {internal}"
    for owner, members in CLASS_MEMBERS.items():
        for member in members:
            assert hasattr(resolve(owner), member) and f'id="{owner}.{member}"' in html, (owner, member)
    assert "spec §" not in html


# ----------------------------------------------------------------------
# What the docs name exists
def test_no_page_cites_the_spec():
    """Users cannot read the internal spec: no page cites its sections."""
    cited = [f"{page}:{n}" for page in PAGES for n, line in enumerate(page_text(page).splitlines(), 1)
             if re.search(r"spec §|\bthe spec\b|\bspec's\b|keras-notes|(?<!paper )§ ?\d", line, re.I)]
    assert not cited, cited


def pyproject_extras():
    text = page_text("pyproject.toml")
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return re.findall(r"^([\w-]+)\s*=", section, re.M)


def test_the_extras_listed_are_pyprojects():
    extras = set(pyproject_extras())
    assert {"jax", "torch", "tensorflow", "files", "all"} <= extras
    for page in ("README.md", "docs/index.md"):
        text = page_text(page)
        paragraph = text[text.index("To install the library alone"):].split("\n\n", 1)[0]
        assert set(re.findall(r"`\[([\w-]+)\]`", paragraph)) == extras, page


def test_the_command_lines_in_the_docs_are_the_parsers():
    """README and docs/index.md list the commands exactly as the parser
    (and so `--help`) has them, and every `keras-lowrank COMMAND` the docs
    name is a command."""
    import keras_lowrank_cli

    for page in ("README.md", "docs/index.md"):
        blocks = re.findall(r"```bash\n(.*?)```", page_text(page), re.S)
        lines = [line for block in blocks for line in block.splitlines() if line.startswith("keras-lowrank ")]
        assert lines == keras_lowrank_cli.synopsis(), page
    for page in PAGES:
        for command in re.findall(r"`keras-lowrank ([a-z][\w-]*)", page_text(page)):
            assert command in keras_lowrank_cli.COMMANDS, (page, command)


def test_the_documented_demo_options_exist():
    from keras_lowrank.examples import finetune_gemma

    options = {a.option_strings[0]: a for a in finetune_gemma.build_parser()._actions if a.option_strings}
    text = page_text("README.md")
    paragraph = text[text.index("`scripts/demo.sh` (= `keras-lowrank demo`"):].split("\n\n", 1)[0]
    named = re.findall(r"`(--[\w-]+)(?: ([\w|]+))?`", paragraph)
    assert len(named) >= 6
    for flag, values in named:
        assert flag in options, flag
        if "|" in values:
            assert set(values.split("|")) == set(options[flag].choices), flag


def test_the_documented_enable_adapter_signature_is_the_code():
    import keras_lowrank

    text = " ".join(page_text("README.md").split())
    documented = re.search(r"`keras_lowrank\.enable_adapter\((model, .*?)\)` is the same", text).group(1)
    tree = ast.parse(f"def f({documented}): pass").body[0].args
    names = [a.arg for a in tree.args] + ([f"**{tree.kwarg.arg}"] if tree.kwarg else [])
    defaults = [ast.literal_eval(d) for d in tree.defaults]
    params = list(inspect.signature(keras_lowrank.enable_adapter).parameters.values())
    assert names == [("**" if p.kind is p.VAR_KEYWORD else "") + p.name for p in params]
    assert defaults == [p.default for p in params if p.default is not p.empty]


def test_the_keras_lowrank_names_the_docs_use_exist():
    missing = set()
    for page in PAGES:
        for path in set(re.findall(r"\bkeras_lowrank(?:\.[A-Za-z_]\w*)+", page_text(page))):
            try:
                resolve(path)
            except (AttributeError, ImportError):
                missing.add(f"{page}: {path}")
    assert not missing, sorted(missing)


def test_the_blocks_run_elsewhere_define_their_names():
    """docs/distribution.md's block runs under 8 devices elsewhere: here,
    every name it reads is imported or assigned in it (it once used `x`,
    `y` it never made)."""
    for page in ELSEWHERE:
        source = "\n".join(code_blocks(page))
        tree = ast.parse(source)
        bound = set(dir(builtins))
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                bound.add(node.id)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                bound.update((a.asname or a.name).split(".")[0] for a in node.names)
        read = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
        assert not read - bound, (page, sorted(read - bound))


# ----------------------------------------------------------------------
# Discoverability: each method's options, PEFT's names
def test_method_info_describes_every_method():
    import keras_lowrank
    from keras_lowrank import registry

    for name in keras_lowrank.methods():
        info = keras_lowrank.method_info(name)
        method = registry.get(name)
        assert info.name == name and info.description == method.summary
        assert [o.name for o in info.options] == [o.name for o in method.options]
        assert info.defaults == method.defaults
        assert all(o.allowed and o.meaning for o in info.options), name
        text = str(info)
        assert all(o.name in text and o.meaning in text for o in info.options), name
    assert keras_lowrank.method_info("pissa").as_lora and not keras_lowrank.method_info("dora").as_lora
    assert keras_lowrank.method_info("svf").lr_scale > 1
    with pytest.raises(ValueError, match="'nope'.*available methods"):
        keras_lowrank.method_info("nope")


@pytest.mark.parametrize("peft_name, ours", [
    ("r", "rank"), ("lora_alpha", "alpha"), ("target_modules", "targets"),
    ("lora_dropout", "dropout"), ("modules_to_save", "trainable_layers"),
])
def test_peft_names_are_refused_with_ours(peft_name, ours):
    import keras

    import keras_lowrank

    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="hidden"),
                              keras.layers.Dense(2, name="head")])
    before = [v.name for v in model.weights]
    message = f"'{peft_name}' is PEFT's name; keras-lowrank calls it '{ours}'"
    with pytest.raises(ValueError, match=re.escape(message)):
        keras_lowrank.enable_adapter(model, method="lora", **{peft_name: 4})
    assert [v.name for v in model.weights] == before
    with pytest.raises(ValueError, match=re.escape(message)):
        keras_lowrank.registry.get("dora").validate_options({peft_name: 4})
