"""The adapter layers, for direct use as drop-in Keras layers."""

from keras_lowrank.adapter import Adapter
from keras_lowrank.methods import DoRA
from keras_lowrank.methods import LoRA
from keras_lowrank.methods import PiSSA

__all__ = ["Adapter", "LoRA", "DoRA", "PiSSA"]
