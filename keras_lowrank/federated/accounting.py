"""Privacy budgets of DP-FedAvg, from Google's dp-accounting.

One round of DP-FedAvg with Poisson sampling of clients is a
Poisson-subsampled Gaussian mechanism on the users' clipped updates:
each client takes part with probability `q` (the sampling rate), the sum
of clipped updates (sensitivity `C` under adding or removing one user)
gets Gaussian noise of standard deviation `σ C`, and the server divides
by the fixed expected cohort size. `rounds` rounds compose. dp-accounting
turns that event into `ε` at a given `δ`, with its RDP accountant (the
moments accountant of DP-FedAvg) or its privacy-loss-distribution (PLD)
accountant, which is tighter.
"""

import math

ACCOUNTANTS = ("rdp", "pld")
#: Rényi orders of the RDP accountant: integers, whose subsampled-Gaussian
#: RDP dp-accounting computes exactly (its series for fractional orders
#: near 1 may not converge, and it then drops the order with a warning)
RDP_ORDERS = tuple(list(range(2, 64)) + [128, 256, 512])
#: the smallest noise multiplier `noise_for_epsilon` considers, per
#: accountant (a PLD of a much smaller σ does not fit in memory)
SMALLEST_NOISE = {"rdp": 0.05, "pld": 0.3}


def _dp_accounting():
    try:
        import dp_accounting
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError(
            "keras_lowrank.federated needs dp-accounting for privacy budgets: "
            "pip install 'keras-lowrank[federated]'"
        ) from e
    return dp_accounting


def _check(name, value, low, high, low_open=True, high_open=False, kind=float):
    ok_type = kind is int and isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        ok_type = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok_type or (kind is float and not math.isfinite(value)):
        raise ValueError(f"{name} must be a finite number; received {name}={value!r}.")
    if (value <= low if low_open else value < low) or (
        high is not None and (value >= high if high_open else value > high)
    ):
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        upper = "inf" if high is None else high
        raise ValueError(f"{name} must be in {left}{low}, {upper}{right}; received {name}={value!r}.")


def _check_accountant(accountant):
    if accountant not in ACCOUNTANTS:
        raise ValueError(f"accountant must be one of {ACCOUNTANTS}; received accountant={accountant!r}.")


def make_accountant(accountant="rdp"):
    """A fresh dp-accounting accountant: `"rdp"` or `"pld"`."""
    _check_accountant(accountant)
    dpa = _dp_accounting()
    if accountant == "rdp":
        return dpa.rdp.RdpAccountant(list(RDP_ORDERS))
    return dpa.pld.PLDAccountant()


def round_event(noise_multiplier, sampling_rate):
    """The dp-accounting event of one DP-FedAvg round."""
    dpa = _dp_accounting()
    gaussian = dpa.GaussianDpEvent(noise_multiplier)
    if sampling_rate == 1:
        return gaussian
    return dpa.PoissonSampledDpEvent(sampling_rate, gaussian)


def training_event(noise_multiplier, sampling_rate, rounds):
    """The dp-accounting event of `rounds` DP-FedAvg rounds."""
    return _dp_accounting().SelfComposedDpEvent(round_event(noise_multiplier, sampling_rate), rounds)


def privacy_budget(noise_multiplier, sampling_rate, rounds, delta, accountant="rdp"):
    """ε of `rounds` rounds of DP-FedAvg at `δ = delta`.

    Args:
        noise_multiplier: σ, the noise's standard deviation over the
            clipping norm (> 0).
        sampling_rate: q, the probability that a client takes part in a
            round (expected cohort size / number of clients), in (0, 1].
        rounds: the number of rounds (an int >= 0).
        delta: δ, in (0, 1).
        accountant: `"rdp"` (Rényi DP, the moments accountant) or `"pld"`
            (privacy loss distributions, tighter).

    Returns:
        ε as a float (0 for no rounds).

    Examples:

        >>> from keras_lowrank import federated
        >>> eps = federated.privacy_budget(1.0, 0.01, 100, 1e-5)
        >>> 0 < eps < federated.privacy_budget(0.8, 0.01, 100, 1e-5)
        True
    """
    _check("noise_multiplier", noise_multiplier, 0, None)
    _check("sampling_rate", sampling_rate, 0, 1)
    _check("rounds", rounds, 0, None, low_open=False, kind=int)
    _check("delta", delta, 0, 1, high_open=True)
    _check_accountant(accountant)
    if rounds == 0:
        return 0.0
    acc = make_accountant(accountant)
    acc.compose(training_event(noise_multiplier, sampling_rate, rounds))
    return float(acc.get_epsilon(delta))


def noise_for_epsilon(target_epsilon, sampling_rate, rounds, delta, accountant="rdp"):
    """The smallest noise multiplier σ for which `rounds` rounds of
    DP-FedAvg at sampling rate `sampling_rate` spend at most
    `target_epsilon` at `δ = delta` (dp-accounting's calibration).

    Examples:

        >>> from keras_lowrank import federated
        >>> sigma = federated.noise_for_epsilon(2.0, 0.05, 50, 1e-5)
        >>> abs(federated.privacy_budget(sigma, 0.05, 50, 1e-5) - 2.0) < 0.02
        True
    """
    _check("target_epsilon", target_epsilon, 0, None)
    _check("sampling_rate", sampling_rate, 0, 1)
    _check("rounds", rounds, 1, None, low_open=False, kind=int)
    _check("delta", delta, 0, 1, high_open=True)
    _check_accountant(accountant)
    dpa = _dp_accounting()
    low = SMALLEST_NOISE[accountant]
    if privacy_budget(low, sampling_rate, rounds, delta, accountant) <= target_epsilon:
        raise ValueError(
            f"noise_for_epsilon: target_epsilon={target_epsilon} is reached with noise "
            f"multipliers below {low} (sampling_rate={sampling_rate}, rounds={rounds}, "
            f"delta={delta}); such a budget gives next to no privacy. Lower the target."
        )
    sigma = dpa.calibrate_dp_mechanism(
        lambda: make_accountant(accountant),
        lambda s: training_event(s, sampling_rate, rounds),
        target_epsilon,
        delta,
        bracket_interval=dpa.LowerEndpointAndGuess(low, 2 * low),
        tol=1e-4,
    )
    return float(sigma)


class Ledger:
    """The privacy spent so far by a federation, round by round.

    `epsilon` is ε after the rounds released so far; `epsilon_after(k)`
    what it would be after `k` more; `release()` records one round.
    """

    def __init__(self, noise_multiplier, sampling_rate, delta, accountant="rdp"):
        _check("noise_multiplier", noise_multiplier, 0, None)
        _check("sampling_rate", sampling_rate, 0, 1)
        _check("delta", delta, 0, 1, high_open=True)
        _check_accountant(accountant)
        self.noise_multiplier = float(noise_multiplier)
        self.sampling_rate = float(sampling_rate)
        self.delta = float(delta)
        self.accountant = accountant
        self.rounds = 0

    def epsilon_after(self, more=0):
        return privacy_budget(
            self.noise_multiplier, self.sampling_rate, self.rounds + more, self.delta, self.accountant
        )

    @property
    def epsilon(self):
        return self.epsilon_after(0)

    def release(self):
        self.rounds += 1
        return self.epsilon
