"""Client-level central differential privacy: clip, sum, noise, and account.

The mechanism is DP-FedAvg with a fixed denominator (McMahan et al., 2018, "Learning
Differentially Private Recurrent Language Models"), the one Flower's
``DifferentialPrivacy{Client,Server}SideFixedClipping`` wrappers implement:

* each sampled client's update ``delta_i = w_i - w`` (its shared parameters) is clipped to
  L2 norm ``C``: ``delta_i * min(1, C / ||delta_i||)``;
* the server sums the clipped updates, adds Gaussian noise ``N(0, (z C)^2)`` per coordinate
  and divides by ``n``, the number of clients **sampled** (not those that answered: a client
  that drops out cannot raise the sensitivity ``C / n``). With every sampled client
  answering this equals Flower's "mean + N(0, (z C / n)^2)" (``compute_stdv``).

Each round is one Gaussian release with noise multiplier ``z``; Flower's RDP accountant
(``flwr.supercore.privacy_accounting.RdpAccountant``, the ``flwr[dp]`` extra) composes them
without sampling amplification (Flower's fixed-clipping accounting requires that too), at the
add-or-remove-one-client relation. A round's epsilon depends only on ``z`` and the round
count, so it is known before the run starts: the budget decides how many rounds run.

Why not Flower's wrappers themselves: their accounted mode requires the wrapped strategy to
use ``FedAvg.aggregate_train`` unchanged (fedclip's validates every reply first), and their
noise comes from numpy's global generator.

The noise is drawn from :func:`secret_generator`: seeded from the operating system's entropy
on the party that adds it (the server, or under FedPFT's DP each client), and never written,
logged or sent. Nothing a run writes or sends (its seed, the round, a client's name,
config.json, results.json, the run config every node receives) regenerates it, so no client
and no reader of the results can subtract it. Tests that compare runtimes inject a generator
(the ``generator``/``noise`` arguments) or compare with the noise off.
"""

from __future__ import annotations

import math
import secrets
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from fedclip.errors import ConfigError
from fedclip.tensors import Params

_SCRATCH = threading.local()  # per thread and device: float64 room for one tensor


def _wide(v: torch.Tensor) -> torch.Tensor:
    """A float64 copy of ``v`` (what ``v.to(torch.float64, copy=True)`` gives), in room kept
    between calls when ``v`` is contiguous: fresh memory for every update's copy costs page
    faults. Valid until the next call in the same thread."""
    if not v.is_contiguous():
        return v.to(torch.float64, copy=True)
    rooms: dict[torch.device, torch.Tensor] = getattr(_SCRATCH, "rooms", None) or {}
    _SCRATCH.rooms = rooms
    room = rooms.get(v.device)
    if room is None or room.numel() < v.numel():
        room = rooms[v.device] = torch.empty(v.numel(), dtype=torch.float64, device=v.device)
    return room[:v.numel()].view(v.shape).copy_(v)


def _squares(v: torch.Tensor) -> float:
    """The sum of the squares of ``v``'s values in float64 (``v`` already float64: consumed)."""
    return float(v.mul_(v).sum())


def tensor_norm(tensors: Params) -> float:
    """The L2 norm of all of ``tensors`` as one vector.

    Float64, which this computation needs: an update's norm decides DP's clipping factor
    (so the clipped update's bits), over hundreds of thousands of values (the server's
    distance rule, which compares a distance with a bound, takes the float32
    :func:`fedclip.tensors.distance`). One float64 copy per tensor (in room kept between
    calls), squared in place (``x * x``, what ``x ** 2`` computes) and summed: the same
    value, bit for bit, as squaring a second copy."""
    return math.sqrt(sum(_squares(_wide(v)) for v in tensors.values()))


def update_norm(params: Params, current: Params) -> float:
    """``||params - current||`` over the keys of ``params`` (float64, see
    :func:`tensor_norm`: one float64 copy of each tensor, ``current`` subtracted in place with
    its float32 values widened exactly as a float64 copy of them would be)."""
    return math.sqrt(sum(_squares(_wide(params[k]).sub_(current[k])) for k in params))


def clip_update(params: Params, current: Params, norm: float) -> Params:
    """``params`` moved back towards ``current`` so that the update is at most ``norm`` long
    (Flower's flat clipping: one factor for every tensor)."""
    size = update_norm(params, current)
    factor = min(1.0, norm / size) if size > 0 else 1.0
    if factor == 1.0:
        return params
    return {k: current[k] + (v - current[k]) * factor for k, v in params.items()}


def secret_generator(device: str | torch.device = "cpu") -> torch.Generator:
    """A noise source no one else can regenerate: a generator on ``device`` seeded with 63
    bits of the operating system's entropy (``secrets``), a fresh seed on every call. The seed
    lives only in this generator: it is never written, logged or sent."""
    return torch.Generator(device=device).manual_seed(secrets.randbits(63))


def noisy_mean(current: Params, clipped: Sequence[Params], sampled: int, clip: float,
               noise_multiplier: float, generator: torch.Generator) -> Params:
    """``current + (sum of clipped updates + N(0, (z C)^2)) / sampled``, over the keys of the
    clipped updates (noise drawn on the CPU in sorted key order, then moved)."""
    if sampled <= 0:
        raise ValueError("the number of sampled clients must be positive")
    std = noise_multiplier * clip
    out = {}
    for k in sorted(clipped[0]):
        base = current[k]
        total = sum((p[k] - base for p in clipped), torch.zeros_like(base))
        noise = torch.randn(base.shape, generator=generator, dtype=torch.float32) * std
        out[k] = base + (total + noise.to(device=base.device, dtype=base.dtype)) / sampled
    return out


# --- accounting ---------------------------------------------------------------------------
def _flower_accounting() -> Any:
    try:
        import dp_accounting  # noqa: F401  (RdpAccountant's backend, the flwr[dp] extra)
        from flwr.supercore import privacy_accounting
        from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant
    except ImportError:
        raise ConfigError("dp uses Flower's RDP accountant: install the dp extra (pip "
                          "install 'fedclip[dp]', which is flwr[dp])") from None
    return privacy_accounting, RdpAccountant


@lru_cache(maxsize=4096)
def epsilon_after(rounds: int, noise_multiplier: float, sampled: int, population: int,
                  delta: float) -> float:
    """The epsilon (at ``delta``) that ``rounds`` Gaussian releases of ``noise_multiplier``
    spend, by Flower's ``RdpAccountant`` (no sampling amplification); 0 for no round."""
    if rounds <= 0:
        return 0.0
    pa, rdp = _flower_accounting()
    accountant = rdp(pa.PrivacyConfig(
        target_delta=delta, population_size=population,
        neighboring_relation=pa.NeighboringRelation.ADD_OR_REMOVE_ONE,
        sampling_method=pa.SamplingMethod.NO_AMPLIFICATION))
    accountant.compose(pa.GaussianPrivacyEvent(noise_multiplier, sampled, population),
                       count=rounds)
    return float(accountant.get_epsilon(delta))


def calibrate(budget: float, rounds: int, sampled: int, population: int, delta: float) -> float:
    """The smallest noise multiplier (to 0.1 %) with which ``rounds`` rounds spend at most
    ``budget``."""
    lo, hi = 1e-2, 1e4
    if epsilon_after(rounds, hi, sampled, population, delta) > budget:
        raise ConfigError(f"no noise multiplier up to {hi:g} keeps {rounds} rounds within "
                          f"epsilon {budget:g} at delta {delta:g}; raise dp_epsilon or "
                          f"dp_delta, or run fewer rounds")
    if epsilon_after(rounds, lo, sampled, population, delta) <= budget:
        return lo
    while hi / lo > 1.001:
        mid = math.sqrt(lo * hi)
        if epsilon_after(rounds, mid, sampled, population, delta) <= budget:
            hi = mid
        else:
            lo = mid
    return hi


@dataclass(frozen=True)
class PrivacyPlan:
    """A DP run's mechanism and budget, fixed before round 1."""

    mode: str  # "server" or "client": where updates are clipped first
    clipping_norm: float
    noise_multiplier: float
    delta: float
    sampled: int  # clients per round (the noise's denominator)
    population: int  # training clients
    budget: float  # 0: none
    rounds: int  # rounds the budget allows (at most the configured rounds)
    requested_rounds: int

    def epsilon(self, rounds: int) -> float:
        """Epsilon spent after ``rounds`` rounds."""
        return epsilon_after(rounds, self.noise_multiplier, self.sampled, self.population,
                             self.delta)

    @property
    def stopped_by_budget(self) -> bool:
        """Whether the budget ends the run before the configured rounds."""
        return self.rounds < self.requested_rounds

    def to_json(self) -> dict[str, Any]:
        """The ``privacy`` entry of results.json (the spent epsilon: of the rounds run)."""
        return {"mechanism": "gaussian, client-level, fixed clipping", "clipping": self.mode,
                "clipping_norm": self.clipping_norm, "noise_multiplier": self.noise_multiplier,
                "noise_std": self.noise_multiplier * self.clipping_norm / self.sampled,
                "delta": self.delta, "epsilon_budget": self.budget or None,
                "sampled_per_round": self.sampled, "population": self.population,
                "accountant": "flwr RdpAccountant (no sampling amplification)",
                "noise": "secret: drawn from the OS's entropy, never written or sent",
                "protects": "one client's participation, against whoever sees the released "
                            "global parameters (with SecAgg+, the server too)",
                "not_covered": "each client's per-round val/test accuracies, its exact "
                               "train/val/test sizes and losses, which clients answered",
                "rounds_allowed": self.rounds, "stopped_by_budget": self.stopped_by_budget}


def plan(mode: str, clipping_norm: float, noise_multiplier: float, budget: float,
         delta: float, rounds: int, sampled: int, population: int) -> PrivacyPlan:
    """The noise multiplier (given, or calibrated to spend ``budget`` in ``rounds``) and the
    rounds the budget allows; a ConfigError when not even one round fits."""
    if noise_multiplier <= 0:
        noise_multiplier = calibrate(budget, rounds, sampled, population, delta)
    allowed = rounds
    if budget > 0:
        if epsilon_after(1, noise_multiplier, sampled, population, delta) > budget:
            raise ConfigError(
                f"one round with noise multiplier {noise_multiplier:g} already spends epsilon "
                f"{epsilon_after(1, noise_multiplier, sampled, population, delta):.3g} > the "
                f"budget {budget:g} (delta {delta:g}); raise dp_noise_multiplier or dp_epsilon")
        lo, hi = 1, rounds  # the most rounds within budget (epsilon grows with rounds)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if epsilon_after(mid, noise_multiplier, sampled, population, delta) <= budget:
                lo = mid
            else:
                hi = mid - 1
        allowed = min(rounds, lo)
    return PrivacyPlan(mode, clipping_norm, noise_multiplier, delta, sampled, population,
                       budget, allowed, rounds)
