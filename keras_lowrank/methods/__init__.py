"""Adapter methods, one module per method family.

Each module defines its layer classes (and model-level state, if any) and
registers its methods with `keras_lowrank.registry` when imported. Every
module in this package is imported here, so a new method is a new module
(and its tests), nothing else.
"""

import importlib
import pkgutil

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    importlib.import_module(f"{__name__}.{_info.name}")

from keras_lowrank.methods.dora import DoRA  # noqa: E402
from keras_lowrank.methods.dylora import DyLoRA  # noqa: E402
from keras_lowrank.methods.lora import LoRA  # noqa: E402
from keras_lowrank.methods.lora import LoRAPlus  # noqa: E402
from keras_lowrank.methods.residual import OLoRA  # noqa: E402
from keras_lowrank.methods.residual import PiSSA  # noqa: E402
from keras_lowrank.methods.vera import VeRA  # noqa: E402

__all__ = ["DoRA", "DyLoRA", "LoRA", "LoRAPlus", "OLoRA", "PiSSA", "VeRA"]
