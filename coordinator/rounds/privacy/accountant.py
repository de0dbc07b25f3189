"""Renyi-DP accountant for the sampled Gaussian mechanism: pure Python and numpy.

One round of DP-FedAvg releases (sum of the sampled devices' clipped updates + N(0, (z C)^2)) / n,
each device taking part with probability q. Its Renyi divergence of order alpha is computed as in
Mironov, Talwar and Zhang, "Renyi Differential Privacy of the Sampled Gaussian Mechanism" (2019):
section 3.3 for integer orders (a finite binomial sum), section 3.4 for fractional ones (two
series with erfc tails). q = 1 is the plain Gaussian, alpha / (2 z^2). Rounds compose by adding
their RDP per order (Mironov 2017, Proposition 1), and the total becomes (epsilon, delta) with the
conversion of Canonne, Kamath and Steinke (2020, Proposition 12; Balle et al. 2020, Theorem 21):

    epsilon = min over alpha of  rdp(alpha) + log((alpha - 1) / alpha) - (log delta + log alpha) / (alpha - 1)

which is never worse than the classic rdp + log(1/delta) / (alpha - 1) (Mironov 2017, Prop. 3).
Google's dp_accounting (which TensorFlow Privacy uses) implements the same mechanism and
conversion; tests/test_privacy.py checks this module against its published test values. One
difference: for fractional orders dp_accounting now adds the series' terms in absolute value (an
upper bound), while this module keeps their signs as MTZ 2019 do, which is exact (the test checks
it against numerical integration).

Adjacency is add/remove one device (client level), and q assumes Poisson sampling: see
docs/SECURITY.md for what that means for the coordinator's fixed-size sampling.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# Orders alpha > 1 searched for the best conversion. Small epsilons pick large orders and large
# epsilons (few devices, little noise) pick orders near 1, so both ends are covered.
DEFAULT_ORDERS: tuple[float, ...] = (
    tuple(1 + x / 100 for x in range(2, 10)) + tuple(1 + x / 10 for x in range(1, 100))
    + tuple(float(x) for x in range(12, 64)) + (128.0, 256.0, 512.0, 1024.0))
_SERIES_FLOOR = -30.0  # a fractional-order series stops once its terms fall, below e^-30 of the sum
_SERIES_MAX_TERMS = 1000


def _log_add(a: float, b: float) -> float:
    """log(e^a + e^b) without overflow."""
    high, low = max(a, b), min(a, b)
    return high if low == -math.inf else high + math.log1p(math.exp(low - high))


def _log_sub(a: float, b: float) -> float:
    """log(e^a - e^b) for a >= b (the series' negative binomial coefficients)."""
    if b == -math.inf:
        return a
    if b >= a:
        return -math.inf
    return a + math.log(-math.expm1(b - a))


def _log_erfc(x: float) -> float:
    """log(erfc(x)), finite where erfc(x) underflows (x > ~26): the asymptotic series there."""
    if x < 25.0:
        return math.log(math.erfc(x))
    inv = 1.0 / (2 * x * x)  # erfc(x) ~ e^{-x^2} / (x sqrt(pi)) (1 - 1/(2x^2) + 3/(4x^4) - 15/(8x^6))
    return -x * x - math.log(x) - 0.5 * math.log(math.pi) + math.log1p(-inv + 3 * inv**2 - 15 * inv**3)


def _log_a_integer(q: float, sigma: float, alpha: int) -> float:
    """log A_alpha = log sum_k C(alpha, k) q^k (1-q)^(alpha-k) e^{(k^2 - k) / (2 sigma^2)} (MTZ 2019, 3.3)."""
    total = -math.inf
    for k in range(alpha + 1):
        log_binom = math.lgamma(alpha + 1) - math.lgamma(k + 1) - math.lgamma(alpha - k + 1)
        term = log_binom + k * math.log(q) + (alpha - k) * math.log1p(-q) + (k * k - k) / (2 * sigma**2)
        total = _log_add(total, term)
    return total


def _log_a_fractional(q: float, sigma: float, alpha: float) -> float:
    """log A_alpha for fractional alpha: two convergent series split at z0 (MTZ 2019, 3.4)."""
    pos0 = pos1 = neg0 = neg1 = -math.inf
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    log_binom, sign = 0.0, 1.0  # log |C(alpha, i)| and its sign, updated term by term
    last0 = last1 = math.inf
    for i in range(_SERIES_MAX_TERMS):
        j = alpha - i
        log_t0 = log_binom + i * math.log(q) + j * math.log1p(-q)
        log_t1 = log_binom + j * math.log(q) + i * math.log1p(-q)
        log_s0 = log_t0 + (i * i - i) / (2 * sigma**2) + math.log(0.5) + _log_erfc((i - z0) / (math.sqrt(2) * sigma))
        log_s1 = log_t1 + (j * j - j) / (2 * sigma**2) + math.log(0.5) + _log_erfc((z0 - j) / (math.sqrt(2) * sigma))
        if sign > 0:
            pos0, pos1 = _log_add(pos0, log_s0), _log_add(pos1, log_s1)
        else:
            neg0, neg1 = _log_add(neg0, log_s0), _log_add(neg1, log_s1)
        if log_s0 < last0 and log_s1 < last1 and max(log_s0, log_s1) < _log_add(pos0, pos1) + _SERIES_FLOOR:
            return _log_add(_log_sub(pos0, neg0), _log_sub(pos1, neg1))
        last0, last1 = log_s0, log_s1
        # C(alpha, i+1) = C(alpha, i) (alpha - i) / (i + 1): the sign alternates once i passes alpha
        step = (alpha - i) / (i + 1)
        sign *= 1.0 if step > 0 else -1.0
        log_binom += math.log(abs(step))
    return math.inf  # did not converge: this order proves nothing, and the conversion skips it


def rdp_sampled_gaussian(q: float, noise: float, orders: Sequence[float] = DEFAULT_ORDERS) -> np.ndarray:
    """RDP of one sampled Gaussian release, per order.

    Args:
        q: probability that a given device takes part (sampled / population), in [0, 1].
        noise: the noise multiplier z (noise std / L2 sensitivity), >= 0; 0 means no privacy.
        orders: Renyi orders alpha > 1.

    Returns:
        float64 (len(orders),): the RDP epsilon at each order (inf where unbounded).

    Raises:
        ValueError: q outside [0, 1], a negative or non-finite noise, or an order <= 1.
    """
    if not 0 <= q <= 1 or not (noise >= 0 and math.isfinite(noise)):
        raise ValueError(f"need 0 <= q <= 1 and a finite noise multiplier >= 0, got q={q!r}, noise={noise!r}")
    if min(orders) <= 1:
        raise ValueError(f"Renyi orders must be > 1, got {min(orders)!r}")
    if q == 0:
        return np.zeros(len(orders))
    if noise == 0:
        return np.full(len(orders), math.inf)
    if q == 1:
        return np.array([alpha / (2 * noise**2) for alpha in orders])
    out = []
    for alpha in orders:
        integer = float(alpha).is_integer()
        log_a = _log_a_integer(q, noise, int(alpha)) if integer else _log_a_fractional(q, noise, float(alpha))
        out.append(log_a / (alpha - 1))
    return np.array(out)


def epsilon_from_rdp(orders: Sequence[float], rdp: Sequence[float] | np.ndarray, delta: float) -> tuple[float, float]:
    """The smallest epsilon over the orders for this delta, and the order that gives it.

    Raises:
        ValueError: delta outside (0, 1), or orders and rdp of different lengths.
    """
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    alphas, values = np.asarray(orders, dtype=np.float64), np.asarray(rdp, dtype=np.float64)
    if alphas.shape != values.shape:
        raise ValueError(f"{alphas.size} orders but {values.size} RDP values")
    with np.errstate(invalid="ignore"):  # inf - finite stays inf; nothing here is nan
        eps = values + np.log1p(-1 / alphas) - (math.log(delta) + np.log(alphas)) / (alphas - 1)
    best = int(np.argmin(eps))
    return max(0.0, float(eps[best])), float(alphas[best])


class RdpAccountant:
    """Composes rounds of the sampled Gaussian mechanism and reports (epsilon, delta)."""

    def __init__(self, orders: Sequence[float] = DEFAULT_ORDERS) -> None:
        self.orders = tuple(float(a) for a in orders)
        self.rdp = np.zeros(len(self.orders))
        self.history: list[tuple[float, float]] = []  # (q, z) of every composed round

    def compose(self, q: float, noise: float, rounds: int = 1) -> None:
        """Add `rounds` releases with sampling rate q and noise multiplier `noise`."""
        if rounds < 0:
            raise ValueError(f"rounds must be >= 0, got {rounds}")
        self.rdp = self.rdp + rounds * rdp_sampled_gaussian(q, noise, self.orders)
        self.history.extend([(float(q), float(noise))] * rounds)

    def epsilon(self, delta: float) -> float:
        """Epsilon of everything composed so far at this delta (0 before any round)."""
        return epsilon_from_rdp(self.orders, self.rdp, delta)[0]
