"""ServerApp: DP-DyLoRA over the connected SuperNodes; the run config
(pyproject.toml's [tool.flwr.app.config], or `flwr run --run-config`)
sets rounds, cohort, ε, C, ..."""

from keras_lowrank import federated
from klr_federated_app import MODEL_FN
from klr_federated_app import task


def report(result):
    for h in result.history:
        print(f"round {h['round']}: rank {h['rank']}, {h['clients']} clients, "
              f"epsilon {h.get('epsilon')}, accuracy {h.get('accuracy')}", flush=True)


app = federated.server_app(
    MODEL_FN, num_clients=2, clients_per_round=2, rounds=3, target_epsilon=8.0,
    clipping_norm=0.5, evaluate_fn=task.Evaluate(), on_finish=report,
)
