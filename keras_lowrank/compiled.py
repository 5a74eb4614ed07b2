"""Keeping a compiled model usable after its layers or flags change."""

import warnings

import keras

from keras_lowrank import _compat
from keras_lowrank import training
from keras_lowrank import tree


def after_change(model):
    """Refresh what Keras caches about the model's variables and layers."""
    _compat.refresh_torch_params(tree.all_layers_with_root(model))
    reset_compiled_functions(model)


def reset_compiled_functions(model):
    """Drop traced train/test/predict functions and put the optimizer parts
    of the adapters in place; if the optimizer was already built on the old
    trainable variables, recompile with a fresh copy of it (same class and
    config) and the same loss and metrics."""
    for attr in ("train_function", "test_function", "predict_function"):
        if hasattr(model, attr):
            setattr(model, attr, None)
    optimizer = getattr(model, "optimizer", None)
    if not getattr(model, "compiled", False) or optimizer is None:
        return
    if not getattr(optimizer, "built", False):
        training.after_compile(model)
        return
    compile_config = _compat.compile_config(model)
    try:
        inner = training.unwrap(optimizer)
        kwargs = dict(compile_config.config)
        kwargs["optimizer"] = type(inner).from_config(inner.get_config())
        # The base compile: task models with a custom compile() resolved their
        # "auto" arguments already, and these are the resolved ones.
        keras.Model.compile(model, **kwargs)
        training.after_compile(model)
    except Exception as e:  # keep the user informed, never silent
        warnings.warn(
            "The model was compiled before its adapters changed and could not "
            f"be recompiled automatically ({e}); call model.compile(...) again "
            "before training."
        )
