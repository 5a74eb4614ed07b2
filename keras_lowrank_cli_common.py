"""What the `keras-lowrank` command line and the library share, without
Keras: the exit-code exceptions, tables, and a method's description as
text.

`keras_lowrank_cli` (the entry point: `--help`, `methods` and `inspect`
without Keras), the commands that need Keras (`keras_lowrank.cli`) and the
method registry (`MethodInfo.__str__`) all import this module, which
imports neither of them, nor Keras.
"""

PROG = "keras-lowrank"
BACKENDS = ("jax", "tensorflow", "torch")


class FileError(Exception):
    """A file that does not exist or cannot be read (exit code 2)."""


class UsageError(Exception):
    """Bad input from the user (exit code 2)."""


class CheckFailed(Exception):
    """An operation or a check failed on valid input (exit code 1)."""


def table(head, rows):
    """`rows` (tuples of strings) under `head` as aligned columns."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(head)]

    def line(cells):
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def format_method(info):
    """One method's description (a `MethodInfo.to_dict()`) as text."""
    lines = [f"{info['name']} - {info['description']}", ""]
    rows = [(o["name"], o["default"], o["allowed"], o["meaning"]) for o in info["options"]]
    lines.append(table(("option", "default", "allowed", "meaning"), rows))
    notes = []
    if info.get("lr_scale", 1.0) != 1.0:
        notes.append(f"Learning rate: about {info['lr_scale']:g}x LoRA's.")
    if info.get("as_lora"):
        notes.append("Saving: save_adapter(..., as_lora=True) writes it as a plain LoRA.")
    if notes:
        lines += [""] + notes
    lines += ["", f"Use: enable_adapter(model, method={info['name']!r}, <option>=<value>, ...)"]
    return "\n".join(lines)
