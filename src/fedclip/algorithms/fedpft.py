"""FedPFT (Beitollahi et al., 2024, "Parametric Feature Transfer: One-shot Federated Learning
with Foundation Models"): one round. Each client fits a Gaussian mixture to each class's
cached features and sends the mixtures' parameters and its class counts; the server samples
synthetic features from the union of the mixtures and trains the classifier head on them.

Following the paper: per class ``c`` client ``k`` fits ``sum_j pi_kcj N(mu_kcj, Sigma_kcj)``
(``components`` K, ``covariance`` spherical | diag | full: the paper's Eq. 2-3); the server
draws, for each class, as many features as the clients hold (``samples_per_class`` to set
another number; a sample that would not fit in memory is refused, saying what it needs,
before anything is allocated), each from a client's mixture with probability proportional
to its count of the class (the mixture of the clients' mixtures), and trains the head by
gradient steps on them (the paper's server-side classifier training). Choices where the
paper leaves one open:

* the head is the linear probe's cosine classifier (C x d, initialised at the class prompts'
  text features, so it can also be fine-tuned and used by ``predict``), trained with the run's
  loss and logit scale for ``server_epochs`` epochs of Adam at ``server_lr``;
* K = 1 is fitted exactly (mean and maximum-likelihood covariance, in float64); K > 1 with
  scikit-learn's ``GaussianMixture`` (EM, k-means initialisation, seeded), on at most as many
  components as the class has features; a small ``reg`` is added to every variance;
* ``half``: the mixture parameters are rounded to 16 bits before they leave (the bytes count
  2 per value; on Flower, run with ``transfer=fp16`` for a 16-bit wire as well);
* ``dp_epsilon`` > 0: the Gaussian mechanism on each client's release (the paper's DP variant
  adds Gaussian noise to the mixture's statistics). Supported for K = 1 with diag or spherical
  covariance: the features are normalised (norm 1), so the per-class sums, sums of squares and
  counts change by at most sqrt(3) in L2 when one feature is added or removed; one Gaussian
  release of that sensitivity with noise std z sqrt(3) is (``dp_epsilon``, ``dp_delta``)-DP
  for the client's data, z calibrated with Flower's RDP accountant (``fedclip.privacy``).
  The noise is drawn on the client from :func:`fedclip.privacy.secret_generator` (the OS's
  entropy; never written or sent), so the server it protects against cannot regenerate it
  from the run seed, the round or the client's name. Not covered: the train size each client
  declares (``num_examples``, an exact count the server uses to bound the reply) and the
  val/test accuracies it reports.

Bytes per client: one upload of C (K d + K cov + K + 1) values (cov: 1, d or d^2 per
component) and the head sent down once; no loop. The server checks every reply's shapes and
bounds: counts whole, non-negative, summing to the declared train size; weights in [0, 1];
variances positive and no larger than the features allow.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from fedclip.algorithms.base import ClientJob, ClientUpdate, RoundConfig, ServerSide, State
from fedclip.algorithms.linear_probe import LinearProbe, LinearProbeClient
from fedclip.algorithms.registry import register
from fedclip.core.client import Split, round_seed, train_local
from fedclip.errors import ConfigError
from fedclip.privacy import secret_generator
from fedclip.tensors import Params

SERVER = "fedpft/server"  # the seed key of the server's sampling and training


class PFTOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    components: int = Field(1, ge=1, le=64, description="Gaussians per class (K).")
    covariance: Literal["spherical", "diag", "full"] = Field(
        "diag", description="Covariance of each Gaussian (full: d^2 values each).")
    half: bool = Field(False, description="Send the mixtures in 16 bits.")
    samples_per_class: int = Field(0, ge=0, le=10**6, description="Synthetic features per "
                                   "class on the server; 0: as many as the clients hold.")
    server_epochs: int = Field(20, ge=1, le=10**4, description="Epochs of head training on "
                               "the synthetic features.")
    server_lr: float = Field(1e-3, gt=0, le=10, allow_inf_nan=False,
                             description="Adam's learning rate for the head on the server.")
    reg: float = Field(1e-6, gt=0, le=1, allow_inf_nan=False,
                       description="Added to every variance (numerical floor).")
    dp_epsilon: float = Field(0.0, ge=0, le=1e6, allow_inf_nan=False,
                              description="> 0: each client's release is (epsilon, "
                              "dp_delta)-DP (Gaussian mechanism; K=1, diag or spherical).")
    dp_delta: float = Field(1e-5, gt=0, lt=1, description="The delta of the client's DP.")

    @model_validator(mode="after")
    def _dp_supported(self) -> PFTOptions:
        if self.dp_epsilon > 0 and (self.components != 1 or self.covariance == "full"):
            raise ValueError("dp_epsilon needs components=1 and covariance diag or spherical")
        return self


def fit_gaussians(x: torch.Tensor, components: int, covariance: str, reg: float, seed: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weights [K], means [K, d] and covariances ([K], [K, d] or [K, d, d]) of a K-component
    mixture fitted to ``x`` [n, d] (n >= 1); components beyond n get weight 0."""
    n, d = x.shape
    shape = {"spherical": (components,), "diag": (components, d),
             "full": (components, d, d)}[covariance]
    weights, means = torch.zeros(components), torch.zeros(components, d)
    covs = torch.zeros(shape)
    k = min(components, n)
    if k == 1:
        xd = x.double()
        mean = xd.mean(0)
        centred = xd - mean
        if covariance == "full":
            cov = centred.T @ centred / n + reg * torch.eye(d, dtype=torch.float64)
        else:
            var = (centred ** 2).mean(0) + reg
            cov = var.mean() if covariance == "spherical" else var
        weights[0], means[0], covs[0] = 1.0, mean.float(), cov.float()
        return weights, means, covs
    try:
        from sklearn.mixture import GaussianMixture
    except ImportError:
        raise ConfigError("fedpft with components > 1 fits mixtures with scikit-learn; "
                          "install it (pip install scikit-learn) or use components=1") from None
    gm = GaussianMixture(k, covariance_type=covariance, reg_covar=reg, random_state=seed)
    gm.fit(x.double().numpy())
    weights[:k] = torch.from_numpy(gm.weights_).float()
    means[:k] = torch.from_numpy(gm.means_).float()
    covs[:k] = torch.from_numpy(gm.covariances_).float()
    return weights, means, covs


def dp_noise_std(epsilon: float, delta: float) -> float:
    """The noise std of one Gaussian release of sensitivity sqrt(3) (sums, sums of squares and
    counts of unit vectors) that is (epsilon, delta)-DP (Flower's RDP accountant)."""
    from fedclip.privacy import calibrate

    return calibrate(epsilon, 1, 1, 1, delta) * math.sqrt(3)


SAMPLE_CHUNK = 1 << 16  # synthetic features drawn at a time (bounds the sampling's overhead)


def synthetic_counts(updates: Sequence[ClientUpdate], per_class: int) -> list[int]:
    """How many synthetic features each class gets: ``per_class`` (0: as many as the
    clients hold), none for a class no client holds."""
    counts = []
    for c in range(len(updates[0].extras["counts"]) if updates else 0):
        total = float(sum(u.extras["counts"][c] for u in updates))
        counts.append(0 if total <= 0 else per_class or int(round(total)))
    return counts


def free_memory() -> int | None:
    """Bytes this machine can still allocate (Linux's MemAvailable; else the free pages; None:
    unknown)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def check_synthetic_memory(rows: int, dim: int, per_class: int, device: torch.device) -> None:
    """Refuse, in one line and before anything is allocated, a synthetic sample that does
    not fit: ``rows`` features of ``dim`` float32 and their int64 labels, in host memory and
    again on an accelerator."""
    need = rows * (dim * 4 + 8)
    places = [("host memory", free_memory())]
    if device.type == "cuda":
        places.append((f"{device}", int(torch.cuda.mem_get_info(device)[0])))
    def size(n: float) -> str:
        return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"

    for where, free in places:
        if free is not None and need > 0.8 * free:
            raise ConfigError(
                f"fedpft: {rows:,} synthetic features of {dim} floats need about {size(need)} "
                f"of {where}, but {size(free)} are free; lower fedpft.samples_per_class (now "
                f"{per_class or 'as many as the clients hold'})")


def sample_mixtures(updates: Sequence[ClientUpdate], per_class: int, generator: torch.Generator
                    ) -> Split:
    """Synthetic features from the clients' mixtures: for each class, ``per_class`` draws (0:
    as many as the clients hold), each from a component chosen with probability (client's
    count of the class x the component's weight), drawn ``SAMPLE_CHUNK`` at a time into one
    preallocated tensor (memory: the sample itself, and a chunk). Independent of the updates'
    order (they are put in a canonical order first), so both runtimes draw the same
    features."""
    ordered = sorted(updates, key=lambda u: (u.extras["counts"].tolist(),
                                             u.extras["means"].flatten()[:16].tolist()))
    means = torch.stack([u.extras["means"].float() for u in ordered], 1)  # [C, k, K, d]
    covs = torch.stack([u.extras["covs"].float() for u in ordered], 1)
    mix = torch.stack([u.extras["weights"].float() * u.extras["counts"].float()[:, None]
                       for u in ordered], 1)  # [C, k, K]
    classes, clients, comps, dim = means.shape
    counts = synthetic_counts(ordered, per_class)
    xs = torch.empty(sum(counts), dim)
    ys = torch.empty(sum(counts), dtype=torch.long)
    at = 0
    for c, n in enumerate(counts):
        if n == 0:
            continue
        probs = mix[c].flatten().clamp(min=0)
        probs = probs / probs.sum()
        flat_means = means[c].reshape(clients * comps, dim)
        flat_covs = covs[c].reshape(clients * comps, *covs.shape[3:])
        chol = (torch.linalg.cholesky(flat_covs.double()).float() if flat_covs.dim() == 3
                else None)
        for start in range(0, n, SAMPLE_CHUNK):
            m = min(SAMPLE_CHUNK, n - start)
            pick = torch.multinomial(probs, m, replacement=True, generator=generator)
            z = torch.randn(m, dim, generator=generator)
            if chol is not None:  # full: L L^T = Sigma
                x = flat_means[pick] + (chol[pick] @ z[:, :, None]).squeeze(-1)
            elif flat_covs.dim() == 1:  # spherical
                x = flat_means[pick] + z * flat_covs[pick].clamp(min=0).sqrt()[:, None]
            else:  # diag
                x = flat_means[pick] + z * flat_covs[pick].clamp(min=0).sqrt()
            xs[at:at + m] = x
            ys[at:at + m] = c
            at += m
    return Split(xs, ys)


class FedPFTClient(LinearProbeClient):
    """FedPFT's client side."""

    def train_client(self, job: ClientJob, noise: torch.Generator | None = None
                     ) -> ClientUpdate:
        """The client's release (``noise``: the DP noise's source; None: a secret one)."""
        start = time.perf_counter()
        release = self._release(job, noise)
        half = self.options.half
        release = {k: v.to(torch.float16) if half and k != "counts" else v
                   for k, v in release.items()}
        return ClientUpdate({}, release, len(job.train), 0.0, time.perf_counter() - start)


class FedPFTServer(ServerSide):
    """FedPFT's server side."""

    def planned_rounds(self, configured: int) -> int:
        return min(configured, 1)

    def reply_extras(self, global_params: Params) -> dict[str, torch.Size]:
        return self._shapes(*global_params["weight"].shape)

    def update_bound(self, current: Params, num_examples: int, config: RoundConfig
                     ) -> float | None:
        return None  # no parameters travel up; the extras are bounded in check_extras

    def check_extras(self, current: Params, update: ClientUpdate, server_state: State,
                     config: RoundConfig, quantum: float) -> str | None:
        e, opts = update.extras, self.options
        counts = e["counts"]
        if opts.dp_epsilon > 0:
            counts = counts.clamp(min=0)  # noisy: only its size is bounded
            if float(counts.sum()) > 2 * update.num_examples + 10 * counts.numel():
                return "noisy class counts far over the declared train size"
        else:
            if bool((counts < 0).any()) or bool(((counts - counts.round()).abs() > 1e-3).any()):
                return "class counts must be whole numbers >= 0"
            if abs(float(counts.sum()) - update.num_examples) > 0.5:
                return (f"class counts sum to {float(counts.sum()):g}, not the "
                        f"{update.num_examples} train examples declared at discovery")
        w = e["weights"]
        if bool((w < -quantum).any()) or bool((w > 1 + 4 * quantum).any()):
            return "mixture weights must lie in [0, 1]"
        covs = e["covs"]
        var = covs.diagonal(dim1=-2, dim2=-1) if covs.dim() == 4 else covs
        if bool((var < 0).any()):
            return "a mixture variance is negative"
        limit = 1e6 * (1 + float(current["weight"].abs().max()))
        if bool((e["means"].abs() > limit).any()) or bool((var > limit).any()):
            return "mixture means or variances out of any feature's range"
        return None

    def aggregate(self, current: Params, updates: Sequence[ClientUpdate], server_state: State
                  ) -> tuple[Params, State]:
        if self.logit_scale is None:
            raise ConfigError("fedpft trains its head on the server with the backbone's logit "
                              "scale; the runtime did not set it")
        seed = round_seed(self.cfg.seed, 1, SERVER)
        device = current["weight"].device
        per_class = self.options.samples_per_class
        check_synthetic_memory(sum(synthetic_counts(updates, per_class)),
                               current["weight"].shape[1], per_class, device)
        synthetic = sample_mixtures(updates, per_class, torch.Generator().manual_seed(seed))
        if len(synthetic) == 0:
            return current, server_state
        opts = self.options
        config = RoundConfig(1, opts.server_lr, opts.server_epochs)
        head = train_local(self.algorithm.client, current, synthetic.to(device),
                           F.normalize(current["weight"], dim=-1), self.logit_scale,
                           config=config, seed=seed)
        return head.params, server_state


@register
class FedPFT(LinearProbe):
    name = "fedpft"
    summary = "one round: per-class Gaussian mixtures of the features; server trains the head"
    aggregates_mean = False  # mixtures per client, not a mean of parameters
    sends_params = False
    Options = PFTOptions
    options: PFTOptions
    Client = FedPFTClient
    Server = FedPFTServer

    def _classes(self) -> int:
        if self.text is None and self.prompts:
            return len(self.prompts)  # the server: it holds the prompts, not their features
        return super()._classes()

    def _shapes(self, classes: int, dim: int) -> dict[str, torch.Size]:
        opts = self.options
        k = opts.components
        cov = {"spherical": (k,), "diag": (k, dim),
               "full": (k, dim, dim)}[opts.covariance]
        return {"weights": torch.Size([classes, k]), "means": torch.Size([classes, k, dim]),
                "covs": torch.Size([classes, *cov]), "counts": torch.Size([classes])}

    def _release(self, job: ClientJob, noise: torch.Generator | None = None
                 ) -> dict[str, torch.Tensor]:
        """The mixtures (and counts) this client sends, noised under ``dp_epsilon`` from
        ``noise`` (None: a secret generator; tests inject one)."""
        opts = self.options
        x, y = job.train.x.detach().cpu().float(), job.train.y.cpu()
        classes, dim = job.class_text.shape[0], x.shape[1]
        shapes = self._shapes(classes, dim)
        out = {k: torch.zeros(s) for k, s in shapes.items()}
        out["counts"] = torch.bincount(y, minlength=classes).float()
        if opts.dp_epsilon > 0:
            return self._private_release(x, y, out,
                                         noise if noise is not None else secret_generator())
        for c in range(classes):
            xc = x[y == c]
            if len(xc):
                w, m, cov = fit_gaussians(xc, opts.components,
                                          opts.covariance, opts.reg,
                                          job.seed % 2**31)
                out["weights"][c], out["means"][c], out["covs"][c] = w, m, cov
        return out

    def _private_release(self, x: torch.Tensor, y: torch.Tensor, out: dict[str, torch.Tensor],
                         gen: torch.Generator) -> dict[str, torch.Tensor]:
        opts = self.options
        classes = len(out["counts"])
        xn = F.normalize(x, dim=-1)
        sums = torch.zeros(classes, x.shape[1]).index_add_(0, y, xn)
        squares = torch.zeros(classes, x.shape[1]).index_add_(0, y, xn ** 2)
        std = dp_noise_std(opts.dp_epsilon, opts.dp_delta)
        counts = out["counts"] + std * torch.randn(classes, generator=gen)
        sums = sums + std * torch.randn(sums.shape, generator=gen)
        squares = squares + std * torch.randn(squares.shape, generator=gen)
        n = counts.clamp(min=1.0)[:, None]
        mean = sums / n
        var = (squares / n - mean ** 2).clamp(min=opts.reg)
        if opts.covariance == "spherical":
            var = var.mean(1, keepdim=True)
        out["weights"][:, 0] = 1.0
        out["means"][:, 0] = mean
        out["covs"][:, 0] = var[:, 0] if var.shape[1] == 1 else var
        out["counts"] = counts.clamp(min=0)
        return out
