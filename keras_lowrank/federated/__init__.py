"""Federated DP-DyLoRA on Flower, with privacy budgets from dp-accounting.

DP-DyLoRA (Xu et al., arXiv 2405.06368) trains DyLoRA adapters across many clients under
user-level differential privacy (DP-FedAvg): each round the server draws
one rank `ℓ` and samples a cohort; each client trains the adapters cut to
`ℓ` on its own data with `model.fit`, clips its update to norm `C` and
sends only the rank-`ℓ` adapter slice; the server adds Gaussian noise of
standard deviation `σ C / n` to the average over the expected cohort size
`n`, and accounts the privacy spent.

- `client_app(model_fn, data_fn)`, `server_app(model_fn, ...)`: Flower
  apps (`ClientApp`, `ServerApp`), for Flower's simulation engine
  (`run_simulation`) and for a deployment (`flwr run` with a SuperLink and
  SuperNodes).
- `privacy_budget`, `noise_for_epsilon`: ε of DP-FedAvg and its inverse,
  with dp-accounting's RDP or PLD accountant.
- `adapter_arrays`, `set_adapter_arrays`: what is exchanged.

Needs the `federated` extra: `pip install 'keras-lowrank[federated]'`
(Flower with its simulation engine, and dp-accounting). The accounting
functions need only dp-accounting.

Every public function checks its arguments before it does anything: a
value of the wrong kind (`"5"`, `True`, `2.5` where an int is needed)
raises a `TypeError`, a number out of range or not finite a `ValueError`;
both name the function, the argument and the value.

Examples:

    >>> from keras_lowrank import federated
    >>> sigma = federated.noise_for_epsilon(8.0, sampling_rate=0.1, rounds=20, delta=1e-5)
    >>> round(federated.privacy_budget(sigma, 0.1, 20, 1e-5), 2)
    8.0
"""

from keras_lowrank.federated.accounting import noise_for_epsilon
from keras_lowrank.federated.accounting import privacy_budget
from keras_lowrank.federated.exchange import adapter_arrays
from keras_lowrank.federated.exchange import base_fingerprint
from keras_lowrank.federated.exchange import set_adapter_arrays

_FLOWER = ("client_app", "server_app", "run_simulation", "FederatedResult",
           "PoissonFedAvg", "RankBroadcast", "train_client")


def __getattr__(name):
    if name in _FLOWER:
        try:
            from keras_lowrank.federated import apps
        except ImportError as e:
            if "flwr" not in str(e):
                raise
            raise ImportError(
                f"keras_lowrank.federated.{name} needs Flower: "
                "pip install 'keras-lowrank[federated]'"
            ) from e
        return getattr(apps, name)
    raise AttributeError(f"module 'keras_lowrank.federated' has no attribute {name!r}")


__all__ = [
    "adapter_arrays",
    "base_fingerprint",
    "noise_for_epsilon",
    "privacy_budget",
    "set_adapter_arrays",
    *_FLOWER,
]
