"""ClientApp: trains the DyLoRA adapters at the round's rank on this node's
partition (`--node-config "partition-id=0 num-partitions=2"`)."""

from keras_lowrank import federated
from klr_federated_app import MODEL_FN
from klr_federated_app import task

app = federated.client_app(MODEL_FN, task.DataFn(examples=16), epochs=2, batch_size=8)
