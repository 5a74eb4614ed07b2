"""Adapter layers, one module per method family."""

from keras_lowrank.methods.dora import DoRA
from keras_lowrank.methods.lora import LoRA
from keras_lowrank.methods.pissa import PiSSA

__all__ = ["LoRA", "DoRA", "PiSSA"]
