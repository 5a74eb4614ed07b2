"""The adapter layers, for direct use as drop-in Keras layers."""

from keras_lowrank.adapter import Adapter
from keras_lowrank.methods import DoRA
from keras_lowrank.methods import DyLoRA
from keras_lowrank.methods import LoRA
from keras_lowrank.methods import LoRAPlus
from keras_lowrank.methods import OLoRA
from keras_lowrank.methods import PiSSA
from keras_lowrank.methods import VeRA

__all__ = ["Adapter", "DoRA", "DyLoRA", "LoRA", "LoRAPlus", "OLoRA", "PiSSA", "VeRA"]
