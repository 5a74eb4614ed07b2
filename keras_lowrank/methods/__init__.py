"""Adapter methods, one module per method family.

Each module defines its layer classes (and model-level state, if any) and
registers its methods with `keras_lowrank.registry` when imported. Every
module in this package is imported here, so a new method is a new module
(and its tests), nothing else. The layer classes are in
`keras_lowrank.layers`.
"""

import importlib
import pkgutil

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    importlib.import_module(f"{__name__}.{_info.name}")
