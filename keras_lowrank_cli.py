"""The `keras-lowrank` command, and what it can tell about a file without Keras.

`keras-lowrank inspect FILE` reads an adapter file (`.safetensors`) or a
`.keras` model and lists its adapters from the metadata alone: it imports
neither Keras nor a backend, so it answers in well under a second. Every
other command (`demo`, `merge`) needs Keras and runs in `keras_lowrank.cli`.

This module sits beside the `keras_lowrank` package, not in it: importing
anything inside the package imports Keras and a backend first.
"""

import json
import os
import sys
import zipfile

ADAPTER_FORMAT = "keras_lowrank.adapter"


class FileError(Exception):
    """A file that does not exist or cannot be read (exit code 2)."""


def _rows_from_plan(plan):
    rows = []
    for key, cfg in plan.get("layers", {}).items():
        if not isinstance(cfg, dict):
            raise FileError(f"the adapter plan's entry {key!r} is malformed")
        options = cfg.get("options")
        if not isinstance(options, dict):  # format 1: options beside the fields
            options = cfg
        trainable = cfg.get("trainable")
        rows.append(
            {
                "layer": cfg.get("path", key),
                "method": str(cfg.get("method", "?")),
                "rank": options.get("rank"),
                "alpha": options.get("alpha"),
                "matrix": cfg.get("matrix", "?"),
                "base": cfg.get("base", "float"),
                "trainable": trainable,
            }
        )
    return rows


def describe_adapter_file(path):
    """What an adapter file holds, from its metadata (no tensor is read)."""
    try:
        from safetensors import safe_open
    except ImportError:
        raise FileError("reading adapter files needs safetensors: pip install safetensors") from None
    try:
        with safe_open(path, framework="np") as f:
            meta = f.metadata() or {}
            stored = 0
            for k in f.keys():
                n = 1
                for d in f.get_slice(k).get_shape():
                    n *= int(d)
                stored += n
    except Exception as e:
        raise FileError(f"could not read {path}: {type(e).__name__}: {e}") from None
    if meta.get("format") != ADAPTER_FORMAT:
        raise FileError(f"{path} is a safetensors file but not a keras_lowrank adapter file")
    try:
        plan = json.loads(meta.get("plan", ""))
    except ValueError:
        raise FileError(f"{path}: the adapter plan is not valid JSON") from None
    if not isinstance(plan, dict):
        raise FileError(f"{path}: the adapter plan is malformed")
    return {
        "kind": "adapter file",
        "model": meta.get("model", "?"),
        "format": meta.get("version", "?"),
        "rows": _rows_from_plan(plan),
        "stored_values": stored,
        "trainable_layers": plan.get("trainable_layers"),
        "total_params": plan.get("total_params"),
        "trainable_params": plan.get("trainable_params"),
    }


def _find_plans(node, found):
    if isinstance(node, dict):
        if node.get("registered_name") == "keras_lowrank>AdaptedModel":
            cfg = node.get("config", {})
            if isinstance(cfg, dict) and isinstance(cfg.get("adapters"), dict):
                found.append((node, cfg["adapters"]))
        for value in node.values():
            _find_plans(value, found)
    elif isinstance(node, list):
        for value in node:
            _find_plans(value, found)


def describe_keras_file(path):
    """What a `.keras` model holds, from its `config.json` (no Keras)."""
    try:
        with zipfile.ZipFile(path) as z:
            config = json.loads(z.read("config.json"))
            meta = json.loads(z.read("metadata.json")) if "metadata.json" in z.namelist() else {}
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as e:
        raise FileError(f"could not load {path}: {type(e).__name__}: {e}") from None
    found = []
    _find_plans(config, found)
    rows = []
    total = trainable = None
    for _, plan in found:
        rows.extend(_rows_from_plan(plan))
        total = plan.get("total_params", total)
        trainable = plan.get("trainable_params", trainable)
    model = config.get("class_name", "?")
    return {
        "kind": ".keras model",
        "model": model,
        "name": config.get("config", {}).get("name") if isinstance(config.get("config"), dict) else None,
        "keras_version": meta.get("keras_version"),
        "rows": rows,
        "total_params": total,
        "trainable_params": trainable,
    }


def describe(path):
    """`describe_keras_file` or `describe_adapter_file`, by the file's kind."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileError(f"no such file: {path}")
    if os.path.isdir(path):
        raise FileError(f"expected a file, got the folder {path}")
    if zipfile.is_zipfile(path):
        return describe_keras_file(path)
    if str(path).endswith(".keras"):
        raise FileError(f"could not load {path}: not a .keras (zip) file")
    return describe_adapter_file(path)


def table(head, rows):
    """`rows` (tuples of strings) under `head` as aligned columns."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(head)]

    def line(cells):
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _fmt(value, spec=""):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    return format(value, spec) if spec else str(value)


def inspect(path, out=None):
    """Print the adapters of a `.keras` model or an adapter file."""
    out = sys.stdout if out is None else out
    info = describe(path)
    size = os.path.getsize(path)
    head = f"{path}: {info['kind']}"
    if info["kind"] == "adapter file":
        head += f" (format {info['format']}) for a {info['model']}"
    else:
        head += f", {info['model']}"
        if info.get("name"):
            head += f" {info['name']!r}"
        if info.get("keras_version"):
            head += f", saved by Keras {info['keras_version']}"
    print(f"{head}; {size:,} bytes", file=out)
    rows = info["rows"]
    if not rows:
        print("no adapters in this model", file=out)
        return 0
    body = [
        (r["layer"], r["method"], _fmt(r["rank"]), _fmt(r["alpha"]), str(r["matrix"]),
         str(r["base"]), _fmt(r["trainable"], ","))
        for r in rows
    ]
    print(table(("layer", "method", "rank", "alpha", "matrix", "base", "trainable"), body), file=out)
    methods = sorted({r["method"] for r in rows})
    known = [r["trainable"] for r in rows if isinstance(r["trainable"], int)]
    line = f"adapters: {len(rows)} ({', '.join(methods)})"
    if len(known) == len(rows):
        line += f"   adapter params: {sum(known):,}"
    if info.get("trainable_params") is not None and info.get("total_params"):
        t, n = info["trainable_params"], info["total_params"]
        line += f"   trainable params: {t:,} / {n:,} ({100 * t / n:.3f}%)"
    print(line, file=out)
    return 0


def main(argv=None):
    """The `keras-lowrank` command: `inspect` here, the rest in
    `keras_lowrank.cli` (which imports Keras)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 2 and argv[0] == "inspect" and not argv[1].startswith("-"):
        try:
            return inspect(argv[1])
        except FileError as e:
            print(f"keras-lowrank inspect: error: {e}", file=sys.stderr)
            return 2
    # Imported here, not at the top: everything in keras_lowrank imports Keras.
    from keras_lowrank.cli import main as full_main

    return full_main(argv)


if __name__ == "__main__":
    sys.exit(main())
