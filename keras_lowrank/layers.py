"""The adapter layers, for direct use as drop-in Keras layers.

Every registered method's layer class is here under its class name
(`keras_lowrank.layers.LoRA`, `...DoRA`, `...VeRA`, ...), read from the
registry: a new method's layer appears without editing this module.
"""

from keras_lowrank import methods as _methods  # noqa: F401  (registers every method)
from keras_lowrank import registry as _registry
from keras_lowrank.adapter import Adapter

__all__ = ["Adapter"]
for _name in _registry.methods():
    _cls = _registry.get(_name).layer_class
    globals()[_cls.__name__] = _cls
    __all__.append(_cls.__name__)
__all__.sort()
