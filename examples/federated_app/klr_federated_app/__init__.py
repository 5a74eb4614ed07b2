"""The DP-DyLoRA federation of examples/federated_dp_dylora.py as a Flower App."""

import os

from keras_lowrank.examples import federated_dp_dylora as task

#: the shared base (trained on task A): every SuperNode and the SuperLink
#: must see the same file (`python examples/federated_dp_dylora.py --base-only`)
BASE = os.environ.get("KLR_FEDERATED_BASE", os.path.join("/tmp", "klr-federated", "base.weights.h5"))
MODEL_FN = task.ModelFn(BASE, method="dylora", rank=8)
