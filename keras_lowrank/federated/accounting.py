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

import functools
import math

from keras_lowrank import arguments

ACCOUNTANTS = ("rdp", "pld")
#: Rényi orders of the RDP accountant: integers, whose subsampled-Gaussian
#: RDP dp-accounting computes exactly (its series for fractional orders
#: near 1 may not converge, and it then drops the order with a warning)
RDP_ORDERS = tuple(list(range(2, 64)) + [128, 256, 512])
#: the smallest noise multiplier `noise_for_epsilon` considers, per
#: accountant (a PLD of a much smaller σ does not fit in memory)
SMALLEST_NOISE = {"rdp": 0.05, "pld": 0.3}
#: the smallest noise multiplier accounted at all: below it the noise gives
#: no privacy and the accountants' arithmetic under- or overflows
NOISE_FLOOR = 1e-100
#: a larger noise multiplier is accounted as this one: its ε is already 0
#: to float precision (and ε only falls as the noise grows)
NOISE_CEILING = 1e100
#: the most rounds accounted
MAX_ROUNDS = 10**12
#: the PLD accountant's grid: dp-accounting's default discretization of the
#: privacy loss, and the tail mass it truncates when composing
PLD_INTERVAL = 1e-4
PLD_TAIL = 1e-15
#: the most points of one round's PLD (building one takes about 10 µs a
#: point: 20 s at the limit) and of the composed PLD (composing takes about
#: 100 bytes a point: 1 GB at the limit)
PLD_MAX_ROUND_POINTS = 2_000_000
PLD_MAX_POINTS = 10_000_000


def _dp_accounting():
    try:
        import dp_accounting
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError(
            "keras_lowrank.federated needs dp-accounting for privacy budgets: "
            "pip install 'keras-lowrank[federated]'"
        ) from e
    return dp_accounting


def check_noise(where, noise_multiplier):
    """σ checked: a finite number > 0, and at least `NOISE_FLOOR`."""
    sigma = arguments.number(where, "noise_multiplier", noise_multiplier, 0, None, low_open=True)
    if sigma < NOISE_FLOOR:
        raise ValueError(
            f"{where}: noise_multiplier must be at least {NOISE_FLOOR:g} (smaller noise gives "
            "no privacy, and its epsilon is beyond what the accountants can represent); "
            f"received noise_multiplier={noise_multiplier!r}."
        )
    return sigma


def check_sampling_rate(where, sampling_rate):
    return arguments.number(where, "sampling_rate", sampling_rate, 0, 1, low_open=True)


def check_delta(where, delta):
    return arguments.number(where, "delta", delta, 0, 1, low_open=True, high_open=True)


def check_rounds(where, rounds, low=0):
    return arguments.number(where, "rounds", rounds, low, MAX_ROUNDS, integer=True)


def check_accountant(where, accountant):
    return arguments.choice(where, "accountant", accountant, ACCOUNTANTS)


def make_accountant(accountant="rdp"):
    """A fresh dp-accounting accountant: `"rdp"` or `"pld"`."""
    check_accountant("make_accountant", accountant)
    dpa = _dp_accounting()
    if accountant == "rdp":
        return dpa.rdp.RdpAccountant(list(RDP_ORDERS))
    return dpa.pld.PLDAccountant(value_discretization_interval=PLD_INTERVAL)


def round_event(noise_multiplier, sampling_rate):
    """The dp-accounting event of one DP-FedAvg round."""
    sigma = check_noise("round_event", noise_multiplier)
    q = check_sampling_rate("round_event", sampling_rate)
    dpa = _dp_accounting()
    gaussian = dpa.GaussianDpEvent(min(sigma, NOISE_CEILING))
    if q == 1:
        return gaussian
    return dpa.PoissonSampledDpEvent(q, gaussian)


def training_event(noise_multiplier, sampling_rate, rounds):
    """The dp-accounting event of `rounds` DP-FedAvg rounds."""
    rounds = check_rounds("training_event", rounds, low=1)
    return _dp_accounting().SelfComposedDpEvent(round_event(noise_multiplier, sampling_rate), rounds)


def _values(sigma, q, rounds, delta):
    return f"noise_multiplier={sigma!r}, sampling_rate={q!r}, rounds={rounds!r}, delta={delta!r}"


def _pld_round_points(sigma, q):
    """How many points the PLD of one round has (dp-accounting's
    connect-the-dots grid), found without building it."""
    from dp_accounting.pld import privacy_loss_mechanism as plm

    points = 0
    for adjacency in (plm.AdjacencyType.REMOVE, plm.AdjacencyType.ADD):
        bounds = plm.GaussianPrivacyLoss(sigma, sampling_prob=q,
                                         adjacency_type=adjacency).connect_dots_bounds()
        upper = bounds.epsilon_upper / PLD_INTERVAL
        lower = bounds.epsilon_lower / PLD_INTERVAL
        if not (math.isfinite(upper) and math.isfinite(lower)):
            return math.inf
        points = max(points, math.ceil(upper) - math.floor(lower) + 1)
    return points


@functools.lru_cache(maxsize=2)
def _pld_round(sigma, q):
    """The PLD of one round (kept: a federation's ledger asks again every
    round), its distributions dense: dp-accounting composes a small sparse
    one by a loop whose size test computes `size ** rounds`, which does not
    end for many rounds."""
    from dp_accounting.pld import privacy_loss_distribution as pld_module

    pld = pld_module.from_gaussian_mechanism(
        sigma, sampling_prob=q, value_discretization_interval=PLD_INTERVAL)
    try:
        remove = pld._pmf_remove.to_dense_pmf()
        add = None if pld._symmetric else pld._pmf_add.to_dense_pmf()
    except AttributeError:  # pragma: no cover - another dp-accounting layout
        return pld
    return pld_module.PrivacyLossDistribution(remove, add)


def _pld_composed_points(pld, count):
    """How many points `pld` composed `count` times has: dp-accounting's own
    bound on the FFT it will run (0 where this version of dp-accounting
    keeps its distributions elsewhere: then no estimate)."""
    from dp_accounting.pld import common

    points = 0
    for name in ("_pmf_remove", "_pmf_add"):
        probs = getattr(getattr(getattr(pld, name, None), "to_dense_pmf", lambda: None)(),
                        "_probs", None)
        if probs is None:
            return 0
        low, high = common.compute_self_convolve_bounds(probs, count, PLD_TAIL)
        points = max(points, high - low + 1)
    return points


def _pld_epsilon(where, given, sigma, q, rounds, delta):
    """ε from dp-accounting's privacy loss distributions, as its PLD
    accountant computes it (a Gaussian of σ / √rounds at q = 1; else one
    round's PLD composed `rounds` times), after checking that the grids fit
    in time and memory."""
    count = rounds
    if q == 1:
        sigma, count = sigma / math.sqrt(rounds), 1
    too_big = (f"{where}: the PLD accountant cannot account {_values(*given)} in reasonable "
               "time and memory: it would need a privacy-loss grid of {points:.3g} points "
               "(at most {limit:.3g}); use accountant='rdp' (or more noise, fewer rounds).")
    points = _pld_round_points(sigma, q)
    if points > PLD_MAX_ROUND_POINTS:
        raise ValueError(too_big.format(points=float(points), limit=float(PLD_MAX_ROUND_POINTS)))
    pld = _pld_round(sigma, q)
    if count > 1:
        points = _pld_composed_points(pld, count)
        if points > PLD_MAX_POINTS:
            raise ValueError(too_big.format(points=float(points), limit=float(PLD_MAX_POINTS)))
        pld = pld.self_compose(count, tail_mass_truncation=PLD_TAIL)
    return pld.get_epsilon_for_delta(delta)


def compute_epsilon(where, noise_multiplier, sampling_rate, rounds, delta, accountant):
    given = (noise_multiplier, sampling_rate, rounds, delta)
    sigma = check_noise(where, noise_multiplier)
    q = check_sampling_rate(where, sampling_rate)
    rounds = check_rounds(where, rounds)
    delta = check_delta(where, delta)
    check_accountant(where, accountant)
    if rounds == 0:
        return 0.0
    sigma = min(sigma, NOISE_CEILING)
    try:
        if accountant == "rdp":
            acc = make_accountant("rdp")
            acc.compose(training_event(sigma, q, rounds))
            eps = acc.get_epsilon(delta)
        else:
            eps = _pld_epsilon(where, given, sigma, q, rounds, delta)
    except (ArithmeticError, MemoryError) as e:
        raise ValueError(
            f"{where}: dp-accounting's {accountant.upper()} accountant failed on "
            f"{_values(*given)}: {type(e).__name__}: {e}."
        ) from e
    if not math.isfinite(eps):
        hint = (" The PLD accountant truncates a tail mass of about 1e-15: a smaller delta "
                "has no finite epsilon there; use accountant='rdp' or a larger delta."
                if accountant == "pld" else "")
        raise ValueError(
            f"{where}: dp-accounting's {accountant.upper()} accountant gives no finite epsilon "
            f"for {_values(*given)}.{hint}"
        )
    return float(eps)


@functools.lru_cache(maxsize=None)
def _calibration_accountant():
    """A dp-accounting `PrivacyAccountant` of DP-FedAvg events that computes
    ε as `privacy_budget` does (its checks, its guards on the PLD), for
    dp-accounting's calibration in `noise_for_epsilon`."""
    dpa = _dp_accounting()

    class CalibrationAccountant(dpa.PrivacyAccountant):
        def __init__(self, where, accountant):
            super().__init__(dpa.NeighboringRelation.ADD_OR_REMOVE_ONE)
            self.where = where
            self.accountant = accountant
            self.rounds = None

        def _maybe_compose(self, event, count, do_compose):
            if isinstance(event, dpa.SelfComposedDpEvent):
                return self._maybe_compose(event.event, event.count * count, do_compose)
            q = 1.0
            if isinstance(event, dpa.PoissonSampledDpEvent):
                q, event = event.sampling_probability, event.event
            if not isinstance(event, dpa.GaussianDpEvent) or self.rounds is not None:
                return self.CompositionErrorDetails(
                    invalid_event=event, error_message="only one DP-FedAvg training event")
            if do_compose:
                self.sigma, self.q, self.rounds = event.noise_multiplier, q, count
            return None

        def get_epsilon(self, target_delta):
            if self.rounds is None:
                return 0.0
            return compute_epsilon(self.where, self.sigma, self.q, self.rounds, target_delta,
                            self.accountant)

    return CalibrationAccountant


def privacy_budget(noise_multiplier, sampling_rate, rounds, delta, accountant="rdp"):
    """ε of `rounds` rounds of DP-FedAvg at `δ = delta`.

    Args:
        noise_multiplier: σ, the noise's standard deviation over the
            clipping norm: a finite number, at least 1e-100 (smaller noise
            gives no privacy). One above 1e100 is accounted as 1e100, whose
            ε is already that of unbounded noise (0 at any ordinary δ).
        sampling_rate: q, the probability that a client takes part in a
            round (expected cohort size / number of clients), in (0, 1].
        rounds: the number of rounds: an int in [0, 10**12].
        delta: δ, in (0, 1).
        accountant: `"rdp"` (Rényi DP, the moments accountant) or `"pld"`
            (privacy loss distributions, tighter; it refuses, naming the
            values, a σ so small or so many rounds that its grid would not
            fit in time and memory, and a δ below the tail mass it
            truncates).

    Returns:
        ε as a float (0 for no rounds).

    Raises:
        TypeError: an argument of the wrong type (a string, a bool, a
            float for `rounds`).
        ValueError: a value out of range or not finite, or one the
            accountant cannot account; the message names the values.

    Examples:

        >>> from keras_lowrank import federated
        >>> eps = federated.privacy_budget(1.0, 0.01, 100, 1e-5)
        >>> 0 < eps < federated.privacy_budget(0.8, 0.01, 100, 1e-5)
        True
    """
    return compute_epsilon("privacy_budget", noise_multiplier, sampling_rate, rounds, delta, accountant)


def noise_for_epsilon(target_epsilon, sampling_rate, rounds, delta, accountant="rdp"):
    """The smallest noise multiplier σ for which `rounds` rounds of
    DP-FedAvg at sampling rate `sampling_rate` spend at most
    `target_epsilon` at `δ = delta` (dp-accounting's calibration).

    `target_epsilon` is a finite number > 0, `rounds` an int in
    [1, 10**12]; the other arguments are those of `privacy_budget`. A
    target that noise below `SMALLEST_NOISE` already meets is refused: it
    gives next to no privacy.

    Examples:

        >>> from keras_lowrank import federated
        >>> sigma = federated.noise_for_epsilon(2.0, 0.05, 50, 1e-5)
        >>> abs(federated.privacy_budget(sigma, 0.05, 50, 1e-5) - 2.0) < 0.02
        True
    """
    where = "noise_for_epsilon"
    target = arguments.number(where, "target_epsilon", target_epsilon, 0, None, low_open=True)
    q = check_sampling_rate(where, sampling_rate)
    rounds = check_rounds(where, rounds, low=1)
    delta = check_delta(where, delta)
    check_accountant(where, accountant)
    dpa = _dp_accounting()
    low = SMALLEST_NOISE[accountant]
    if compute_epsilon(where, low, q, rounds, delta, accountant) <= target:
        raise ValueError(
            f"{where}: target_epsilon={target_epsilon!r} is reached with noise "
            f"multipliers below {low} (sampling_rate={sampling_rate!r}, rounds={rounds!r}, "
            f"delta={delta!r}); such a budget gives next to no privacy. Lower the target."
        )
    if compute_epsilon(where, NOISE_CEILING, q, rounds, delta, accountant) > target:
        raise ValueError(
            f"{where}: target_epsilon={target_epsilon!r} is below the epsilon of any noise "
            f"multiplier up to {NOISE_CEILING:g} (sampling_rate={sampling_rate!r}, "
            f"rounds={rounds!r}, delta={delta!r}). Raise the target."
        )
    calibration = _calibration_accountant()
    try:
        sigma = dpa.calibrate_dp_mechanism(
            lambda: calibration(where, accountant),
            lambda s: training_event(min(s, NOISE_CEILING), q, rounds),
            target,
            delta,
            bracket_interval=dpa.LowerEndpointAndGuess(low, 2 * low),
            tol=1e-4,
        )
    except (ArithmeticError, MemoryError, ValueError,
            dpa.mechanism_calibration.NoBracketIntervalFoundError) as e:
        if str(e).startswith(f"{where}:"):
            raise
        raise ValueError(
            f"{where}: dp-accounting's calibration failed on target_epsilon={target_epsilon!r}, "
            f"sampling_rate={sampling_rate!r}, rounds={rounds!r}, delta={delta!r}: "
            f"{type(e).__name__}: {e}."
        ) from e
    return float(sigma)


class Ledger:
    """The privacy spent so far by a federation, round by round.

    `epsilon` is ε after the rounds released so far; `epsilon_after(k)`
    what it would be after `k` more; `release()` records one round.
    """

    def __init__(self, noise_multiplier, sampling_rate, delta, accountant="rdp"):
        self.noise_multiplier = check_noise("Ledger", noise_multiplier)
        self.sampling_rate = check_sampling_rate("Ledger", sampling_rate)
        self.delta = check_delta("Ledger", delta)
        check_accountant("Ledger", accountant)
        self.accountant = accountant
        self.rounds = 0

    def epsilon_after(self, more=0):
        more = arguments.number("Ledger.epsilon_after", "more", more, 0, None, integer=True)
        return compute_epsilon("Ledger", self.noise_multiplier, self.sampling_rate, self.rounds + more,
                        self.delta, self.accountant)

    @property
    def epsilon(self):
        return self.epsilon_after(0)

    def release(self):
        self.rounds += 1
        return self.epsilon
