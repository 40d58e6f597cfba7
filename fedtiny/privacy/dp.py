"""Differential privacy of client changes: clipping, Gaussian noise, and the privacy accountant.

Two places to add the noise (``[privacy] dp``):

- ``local``: each client clips its whole change to ``clip_norm`` (L2, in real units)
  and adds N(0, (noise_multiplier * clip_norm)^2) to every element it may change,
  *before* sparsifying and quantizing it. What leaves the device is then a function
  of a Gaussian mechanism's output (post-processing), whatever the codec does. Error
  feedback and momentum correction keep residuals of the *noised* change, so no
  unnoised value is carried to a later round.
- ``central``: the server clips each accepted change, sums them, adds the same noise
  once to the sum and divides by the round's number of sampled clients (a fixed
  denominator, as DP-FedAvg, McMahan et al. 2018). It protects the clients from
  whoever sees the global models, not from the server.

Epsilon is accounted with Google's ``dp-accounting`` (Renyi DP), at the user level:
one client's whole data is the unit. Neighbouring fleets differ in one client's data
(replace-one), so a clipped change moves by at most ``2 * clip_norm`` and the
accountant is given ``noise_multiplier / 2``. Central DP with ``fleet.availability =
"always"`` is amplified by fixed-size sampling without replacement (Wang, Balle and
Kasiviswanathan 2019); any other availability, and local DP (the server sees who
sent), are accounted without amplification: every round a client sent composes.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["clip_change", "add_noise", "gaussian_epsilon", "dp_epsilon", "noise_for_epsilon", "DP_MODES", "DP_STREAM"]

DP_MODES = ("none", "local", "central")
DP_STREAM = 0xD9  # the noise's random stream, kept apart from training's and sampling's


def clip_change(
    values: dict[str, np.ndarray], units: dict[str, np.ndarray], clip_norm: float
) -> tuple[dict[str, np.ndarray], float]:
    """Scale a client's change so that its L2 norm in real units is at most ``clip_norm``.

    ``values`` and ``units`` are flat per tensor (``units``: the real value of one stored
    unit of each element). Returns the clipped change (same units as given) and the
    norm before clipping.
    """
    norm = math.sqrt(sum(float(np.sum((v * units[n]) ** 2)) for n, v in values.items()))
    factor = 1.0 if norm <= clip_norm else clip_norm / norm
    return {n: v * factor for n, v in values.items()}, norm


def add_noise(
    values: dict[str, np.ndarray], units: dict[str, np.ndarray], std: float, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Add N(0, std^2) real-unit noise to every element, returned in the stored units; tensors in sorted order."""
    return {n: values[n] + rng.normal(0.0, std, size=values[n].shape) / units[n] for n in sorted(values)}


def gaussian_epsilon(
    noise_multiplier: float,
    steps: int,
    delta: float,
    *,
    sample_rate: float = 1.0,
    population: int = 0,
    sample_size: int = 0,
    conversion: str = "tight",
) -> float:
    """Epsilon of ``steps`` compositions of a (sub)sampled Gaussian mechanism at ``delta`` (Renyi DP).

    ``noise_multiplier`` is the noise standard deviation over the L2 sensitivity. Sampling:
    Poisson with ``sample_rate`` (add/remove-one neighbours, as DP-SGD) or, when ``population``
    and ``sample_size`` are given, fixed-size sampling without replacement (replace-one
    neighbours). ``conversion``: ``tight`` (dp-accounting's RDP-to-(epsilon, delta)
    conversion) or ``classic`` (Mironov 2017, Proposition 3: the bound older papers and
    TF Privacy's ``compute_dp_sgd_privacy`` printed).
    """
    # dp_accounting takes ~1.5 s to import (it loads scipy.signal): loaded when an epsilon is asked for
    import dp_accounting as dpa
    from dp_accounting.rdp import rdp_privacy_accountant as rdp  # deferred with dp_accounting (above)

    if steps <= 0:
        return 0.0
    gaussian = dpa.GaussianDpEvent(noise_multiplier)
    if population and sample_size:
        accountant = rdp.RdpAccountant(neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
        event = (
            gaussian
            if sample_size >= population
            else dpa.SampledWithoutReplacementDpEvent(population, sample_size, gaussian)
        )
    else:
        accountant = rdp.RdpAccountant()
        event = gaussian if sample_rate >= 1.0 else dpa.PoissonSampledDpEvent(sample_rate, gaussian)
    accountant.compose(event, steps)
    if conversion == "tight":
        return float(accountant.get_epsilon(delta))
    if conversion != "classic":
        raise ValueError(f"conversion: expected tight or classic, got {conversion!r}")
    orders, curve = np.asarray(accountant._orders, float), np.asarray(accountant._rdp, float)  # noqa: SLF001
    usable = orders > 1
    return float(np.min(curve[usable] - math.log(delta) / (orders[usable] - 1)))


def dp_epsilon(
    mode: str,
    noise_multiplier: float,
    delta: float,
    *,
    releases: int,
    clients: int = 0,
    per_round: int = 0,
    amplified: bool = False,
) -> float | None:
    """The epsilon a run spent, at the user level (module docstring); None when ``mode`` is ``none``.

    ``releases``: for central DP the rounds aggregated, for local DP the most updates any
    one client sent. ``amplified``: central DP's clients were a fixed-size uniform sample
    of ``clients`` (``per_round`` each round).
    """
    if mode == "none":
        return None
    sensitivity_multiplier = noise_multiplier / 2.0  # replace-one: a clipped change moves by up to 2 * clip_norm
    if mode == "central" and amplified and 0 < per_round < clients:
        return gaussian_epsilon(sensitivity_multiplier, releases, delta, population=clients, sample_size=per_round)
    return gaussian_epsilon(sensitivity_multiplier, releases, delta, population=1, sample_size=1)


def noise_for_epsilon(
    target: float,
    mode: str,
    delta: float,
    *,
    releases: int,
    clients: int = 0,
    per_round: int = 0,
    amplified: bool = False,
) -> float:
    """The smallest noise multiplier (to 0.1%) whose :func:`dp_epsilon` is at most ``target``."""
    lo, hi = 1e-3, 1.0
    while (
        dp_epsilon(mode, hi, delta, releases=releases, clients=clients, per_round=per_round, amplified=amplified)
        > target
    ):
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise ValueError(f"no noise multiplier below 1e6 reaches epsilon {target}")
    while hi - lo > 1e-3 * hi:
        mid = (lo + hi) / 2
        if (
            dp_epsilon(mode, mid, delta, releases=releases, clients=clients, per_round=per_round, amplified=amplified)
            > target
        ):
            lo = mid
        else:
            hi = mid
    return hi
