"""keras-lowrank: low-rank and SVD-based adapters for Keras 3.

Examples:

    >>> import keras, numpy as np
    >>> import keras_lowrank
    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, name="hidden"),
    ...                           keras.layers.Dense(4, name="logits")])
    >>> summary = model.enable_adapter(method="lora", rank=2)
    >>> summary.adapted_paths
    ['hidden']
"""

import sys as _sys

from keras_lowrank.version import __version__


def _command_line_starting():
    """Whether this import is `python -m keras_lowrank ...` finding its
    `__main__` (Python sets `sys.argv[0]` to `"-m"` while it does). The
    command line then answers `--help`, `methods` and `inspect` without
    Keras; a command that needs the library loads it (`__getattr__` below)."""
    if _sys.argv[:1] != ["-m"] or globals().get("_load_now"):
        return False
    argv = list(getattr(_sys, "orig_argv", ()))
    return "-m" in argv and argv[argv.index("-m") + 1:][:1] == [__name__]


if _command_line_starting():

    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)
        import importlib

        global _load_now
        _load_now = True
        importlib.reload(_sys.modules[__name__])  # runs this file again, importing everything
        return getattr(_sys.modules[__name__], name)

else:
    globals().pop("__getattr__", None)
    import keras as _keras

    from keras_lowrank import layers
    from keras_lowrank import svd
    from keras_lowrank.methods import svf
    from keras_lowrank import training
    from keras_lowrank.methods import adalora
    from keras_lowrank.methods import dylora
    from keras_lowrank.methods import vera
    from keras_lowrank.adapt import AdapterSummary
    from keras_lowrank.bases import count_params
    from keras_lowrank.methods.lora_drop.stages import LoRADropReport
    from keras_lowrank.methods.lora_drop.stages import lora_drop
    from keras_lowrank.adapt import enable_adapter
    from keras_lowrank.adapter import Adapter
    from keras_lowrank.geometry import KernelGeometry
    from keras_lowrank.lifecycle import disable_adapter
    from keras_lowrank.lifecycle import merge
    from keras_lowrank.lifecycle import set_adapter_enabled
    from keras_lowrank.lifecycle import unmerge
    from keras_lowrank.adapter_set import AdapterSet
    from keras_lowrank.named import active_adapters
    from keras_lowrank.named import adapter_names
    from keras_lowrank.named import combine
    from keras_lowrank.named import delete_adapter
    from keras_lowrank.named import set_active
    from keras_lowrank.serving import PerExampleAdapters
    from keras_lowrank.serving import adapter_selection
    from keras_lowrank.serving import generate
    from keras_lowrank.hotswap import hotswap_adapter
    from keras_lowrank.peft_format import load_peft_adapter
    from keras_lowrank.peft_format import save_peft_adapter
    from keras_lowrank.adapted_model import adapters
    from keras_lowrank import registry
    from keras_lowrank.registry import method_info
    from keras_lowrank.registry import methods
    from keras_lowrank.saving import load_adapter
    from keras_lowrank.saving import save_adapter
    from keras_lowrank.spectrum import plot_spectrum
    from keras_lowrank.spectrum import spectrum
    from keras_lowrank.spectrum import spectrum_share
    from keras_lowrank.targeting import resolve_targets

    def _model_enable_adapter(self, method=registry.DEFAULT_METHOD, rank=None, **kwargs):
        return enable_adapter(self, method=method, rank=rank, **kwargs)

    _model_enable_adapter.__doc__ = enable_adapter.__doc__
    _keras.Model.enable_adapter = _model_enable_adapter


__all__ = [
    "Adapter",
    "AdapterSet",
    "AdapterSummary",
    "active_adapters",
    "adapter_names",
    "combine",
    "delete_adapter",
    "set_active",
    "PerExampleAdapters",
    "adapter_selection",
    "generate",
    "hotswap_adapter",
    "KernelGeometry",
    "LoRADropReport",
    "adalora",
    "adapters",
    "count_params",
    "dylora",
    "disable_adapter",
    "enable_adapter",
    "layers",
    "load_adapter",
    "load_peft_adapter",
    "lora_drop",
    "merge",
    "method_info",
    "methods",
    "resolve_targets",
    "save_adapter",
    "save_peft_adapter",
    "set_adapter_enabled",
    "plot_spectrum",
    "spectrum",
    "spectrum_share",
    "svd",
    "svf",
    "training",
    "unmerge",
    "vera",
    "__version__",
]
