"""MkDocs hooks: the parts of the site that come from the method registry.

- The "Methods" section of the navigation lists every method page under
  docs/methods/ (each registered method has one; a test checks it), by
  title, after the overview: a new method's page appears without editing
  mkdocs.yml.
- `{{ method_options }}` on a method page becomes the method's options
  table, made from its declarations (`Method.options_table()`).
- `{{ methods_table }}` on docs/methods.md becomes the table of every
  method: its name, its one-line description, whether it has a plain-LoRA
  form (`save_adapter(..., as_lora=True)`), its PEFT adapter type, and its
  page.
- `{{ method_layers }}` on docs/api.md becomes the API reference of every
  method's layer class, as `keras_lowrank.layers.<Class>`.
"""

import os
import re

METHODS_DIR = "methods"
OPTIONS = "{{ method_options }}"
TABLE = "{{ methods_table }}"
LAYERS = "{{ method_layers }}"


def _title(path):
    """A method page's title: its first heading, less `(method="...")`."""
    with open(path, encoding="utf-8") as f:
        first = f.readline().lstrip("# ").strip()
    return re.sub(r"\s*\(`method=.*`\)\s*$", "", first)


def _method_pages(docs_dir):
    folder = os.path.join(docs_dir, METHODS_DIR)
    pages = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".md"):
            pages[name[:-3]] = _title(os.path.join(folder, name))
    return pages


def on_config(config):
    pages = _method_pages(config["docs_dir"])
    entries = [{title: f"{METHODS_DIR}/{name}.md"} for name, title in
               sorted(pages.items(), key=lambda item: item[1].lower())]
    for item in config["nav"]:
        if isinstance(item, dict) and "Methods" in item:
            overview = [e for e in item["Methods"] if not str(next(iter(e.values()))).startswith(METHODS_DIR + "/")]
            item["Methods"] = overview + entries
    return config


def on_page_markdown(markdown, page, config, files):
    if OPTIONS not in markdown and TABLE not in markdown and LAYERS not in markdown:
        return markdown
    from keras_lowrank import registry

    if OPTIONS in markdown and os.path.dirname(page.file.src_path).replace(os.sep, "/") == METHODS_DIR:
        name = os.path.splitext(os.path.basename(page.file.src_path))[0]
        markdown = markdown.replace(OPTIONS, registry.get(name).options_table())
    if TABLE in markdown:
        pages = _method_pages(config["docs_dir"])
        rows = ["| method | what it trains | as LoRA | PEFT | page |", "|---|---|---|---|---|"]
        for name in registry.methods():
            m = registry.get(name)
            title = pages.get(name, name)
            summary = m.summary.replace("|", "\\|")
            as_lora = "yes" if registry.LORA_FORM in m.export_forms or name == registry.LORA_FORM else "no"
            peft = f"`{m.peft.peft_type}`" if m.peft is not None else "no"
            rows.append(f"| `{name}` | {summary} | {as_lora} | {peft} | [{title}]({METHODS_DIR}/{name}.md) |")
        markdown = markdown.replace(TABLE, "\n".join(rows))
    if LAYERS in markdown:
        classes = sorted({registry.get(name).layer_class for name in registry.methods()}, key=lambda c: c.__name__)
        blocks = [f"::: {c.__module__}.{c.__qualname__}\n    options:\n      heading: \"keras_lowrank.layers.{c.__name__}\"\n"
                  for c in classes]
        markdown = markdown.replace(LAYERS, "\n".join(blocks))
    return markdown
