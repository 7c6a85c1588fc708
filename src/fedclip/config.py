"""The run configuration: the only place where defaults live.

A :class:`RunConfig` is frozen and validated. Presets are small TOML files that hold only
what differs from these defaults; command-line flags override presets. Unknown keys and
wrongly typed values are errors, never silently ignored.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fedclip.errors import ConfigError


class RunConfig(BaseModel):
    """Everything that decides the numbers of a run.

    The defaults reproduce the FedCLIP reference code (microsoft/PersonalizedFL, ``fedclip/``)
    except where noted.
    """

    # strict: "1e-4" (a string) is not a float and true is not an int; finite numbers only
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)

    # --- data ---------------------------------------------------------------------------
    data_root: str | None = Field(
        None, description="Folder <domain>/<class>/<image>; None uses the embedded PACS sample."
    )
    dataset: str = Field("auto", description="Dataset spec to validate against (pacs, vlcs, "
                         "office-home, domainnet), 'auto' to detect, 'custom' for none.")
    heldout: str = Field("all", description="Domain left out of training, or 'all' for each.")
    classes: tuple[str, ...] | None = Field(
        None, strict=False, description="Class names in label order; None: the dataset "
        "spec's, or (in-process only) the union of the class folders. A Flower run needs a "
        "spec or this list.")
    prompt_template: str = "a picture of a {}"
    prompt_templates: tuple[str, ...] | None = Field(
        None, strict=False, description="A prompt ensemble: each class's text feature is the "
        "mean of its normalised features over these templates ('{}' for the class); "
        "'@openai-imagenet' or '@simple-imagenet' for open_clip's ImageNet ensembles. None: "
        "prompt_template alone (the reference).")
    train_fraction: float = Field(0.6, gt=0, lt=1)
    val_fraction: float = Field(0.2, gt=0, lt=1, description="> 0: the round reported is "
                                "the one best on the clients' val splits.")
    test_fraction: float = Field(0.2, gt=0, lt=1)
    clients_per_domain: int = Field(1, ge=1)
    partition: Literal["iid", "dirichlet"] = "iid"
    clients_per_round: int = Field(0, ge=0, description="Partial participation: clients "
                                   "sampled each round (seeded; 0: all).")
    train_clients_together: bool = Field(
        False, description="In-process: train the round's clients at once (one fused Adam "
        "step for all; on CUDA, batched matmuls; fedclip, fedprox, fedadam/yogi/avgm) instead "
        "of one after another. Same numbers to float rounding; cheaper per client.")
    dirichlet_alpha: float = Field(0.5, gt=0, le=1e6)
    protocol: Literal["all-classes", "base2novel"] = Field(
        "all-classes", description="Which classes train, beside the held-out domain and the "
        "partition: 'all-classes'; 'base2novel' (FedTPG, FedPGP): the classes split into base "
        "and novel halves (class_split_seed), clients train and validate on base classes "
        "only, and the result adds novel accuracy (novel test images among the novel "
        "classes, scored with their prompts) and the harmonic mean of base and novel.")
    class_split_seed: int = Field(0, ge=0, le=2**32 - 1, description="base2novel: the seed "
                                  "of the base/novel class split (not the run's seed: seeds "
                                  "vary training, never the split).")

    # --- model --------------------------------------------------------------------------
    backbone: str = Field("open_clip:ViT-B-32@openai", description="Backbone spec string.")
    algorithm: str = "fedclip"

    # --- federated training (reference recipe) ------------------------------------------
    rounds: int = Field(200, ge=0, le=10**7)
    local_epochs: int = Field(1, ge=1, le=10**4)
    batch_size: int = Field(32, ge=1, le=10**6)
    lr: float = Field(5e-5, gt=0, le=10)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.98, ge=0, lt=1)
    eps: float = Field(1e-6, gt=0, le=1)
    weight_decay: float = Field(0.2, ge=0, le=100,
                                description="L2 in the gradient (Adam, not AdamW).")
    optimizer_state: Literal["reset", "keep"] = Field(
        "reset", description="'reset' re-creates Adam every round (reference); 'keep' per client."
    )
    loss: Literal["clip", "ce"] = "clip"
    lr_decay: float = Field(1.0, gt=0, le=1, description="Server-side schedule: round r "
                            "trains with lr * lr_decay**(r-1) (sent to clients each round).")
    aggregation: Literal["weighted", "uniform", "median", "trimmed-mean", "krum", "multikrum",
                         "bulyan"] = Field(
        "weighted", description="'weighted' by train samples (declared at discovery, capped); "
        "'uniform' as in the reference; robust to a few bad clients: 'median' / "
        "'trimmed-mean' (coordinate-wise), 'krum' / 'multikrum' / 'bulyan' (Flower's, by "
        "distances between updates; need the flower extra).")
    max_weight_ratio: float = Field(
        2.0, ge=0, description="weighted: a client's weight is at most this x the median "
        "train size of the training clients (on Flower, as declared at discovery), so that "
        "one declaration cannot own the average; 0: no bound.")
    trim_fraction: float = Field(0.2, ge=0, lt=0.5, description="trimmed-mean: fraction of "
                                 "clients cut at each end, per coordinate.")
    norm_factor: float = Field(10.0, ge=0, le=1e6, description="Reject an update farther "
                               "from the global parameters than this x what its local steps "
                               "can move (K lr sqrt(P)), or x the round's median distance "
                               "(floored); every runtime; 0: off.")
    byzantine: int = Field(0, ge=0, le=10**6, description="krum, multikrum, bulyan: f, the "
                           "bad updates per round the rule assumes and tolerates (krum and "
                           "multikrum need 2f+3 updates a round, bulyan 4f+3).")
    trust: Literal["reference", "untrusted"] = Field(
        "reference", description="'reference': the settings as given (the reference's "
        "behaviour in-process). 'untrusted', for a deployment whose clients may lie: the "
        "reference defaults of aggregation, norm_factor, max_weight_ratio and selection become "
        "aggregation=median (uniform under dp, whose clipping bounds each client), "
        "norm_factor=3, max_weight_ratio=1 and selection=median; values set to anything else "
        "are kept.")
    selection: Literal["auto", "mean", "median"] = Field(
        "auto", description="How the best round is chosen from the clients' val accuracies: "
        "their 'mean', or their 'median' (one lying client cannot move it outside the honest "
        "clients' range); 'auto': median under a robust aggregator, else mean.")
    multikrum_keep: int = Field(0, ge=0, le=10**7, description="multikrum: m, the best-scored "
                                "updates averaged; 0: n - f.")
    dp: Literal["off", "server", "client"] = Field(
        "off", description="Central differential privacy at the client level (McMahan et al., "
        "2018): each update is clipped to dp_clipping_norm (by the server, or also by each "
        "client before it leaves: 'client', needed with SecAgg+), the clipped updates are "
        "summed and Gaussian noise of std dp_noise_multiplier x dp_clipping_norm is added, "
        "then divided by the clients sampled; Flower's RDP accountant reports the epsilon.")
    dp_clipping_norm: float = Field(0.0, ge=0, le=1e6, description="dp: the L2 bound on one "
                                    "client's update (the change of its shared parameters).")
    dp_noise_multiplier: float = Field(0.0, ge=0, le=1e6, description="dp: z, noise std over "
                                       "the clipping norm; 0 with dp_epsilon: the smallest z "
                                       "that spends dp_epsilon in `rounds` rounds.")
    dp_epsilon: float = Field(0.0, ge=0, le=1e6, description="dp: the privacy budget; the run "
                              "stops (cleanly) before a round would spend more; 0: none.")
    dp_delta: float = Field(1e-5, gt=0, lt=1, description="dp: the delta of (epsilon, delta).")
    options: dict[str, dict[str, bool | int | float | str]] = Field(
        default_factory=dict, description="Per-algorithm hyperparameters, e.g. "
        "{'fedprox': {'mu': 0.01}} (--set fedprox.mu=0.01); checked against the algorithm.")
    personalize_epochs: int = Field(
        5, ge=0, description="After training, each client fine-tunes its own copy of the "
        "selected global adapter for up to this many epochs (chosen on its val split).")

    # --- bookkeeping --------------------------------------------------------------------
    seed: int = Field(0, ge=0, le=2**32 - 1, description="numpy's RandomState takes < 2^32.")
    eval_every: int = Field(1, ge=1)
    checkpoint_every: int = Field(10, ge=1, description="Checkpoint every this many rounds...")
    checkpoint_seconds: float = Field(
        10.0, ge=0, description="...or when this many seconds passed since the last one, so "
        "an interrupt never loses more than about this much work (0: every round).")
    cache_dir: str | None = Field(None, description="Feature cache; default ~/.cache/fedclip.")
    device: str = Field("auto", description="Where everything runs: cpu, cuda, cuda:1, ... "
                        "(auto: cuda when available). Features stay there for the whole run.")
    precision: Literal["fp32", "fp16", "bf16"] = Field(
        "fp32", description="Feature extraction under autocast (fp32: parity with the "
        "reference); part of the cache key.")
    extract_batch_size: int | None = Field(None, ge=1, description="None: backbone default.")
    extract_workers: int = Field(2, ge=0, description="Image-decoding loader processes.")
    extract_decode: Literal["auto", "cpu", "device"] = Field(
        "auto", description="Where images are decoded and resized: 'cpu' (PIL in loader "
        "processes), 'device' (nvJPEG on the GPU, batched), 'auto' (device on CUDA).")

    @model_validator(mode="before")
    @classmethod
    def _trust_preset(cls, values: Any) -> Any:
        """``trust=untrusted``: the reference defaults of the settings that bound one client's
        influence become the untrusted ones (UNTRUSTED); other values are the user's."""
        if not isinstance(values, dict) or values.get("trust") != "untrusted":
            return values
        out = dict(values)
        untrusted = {**UNTRUSTED, **({"aggregation": "uniform"}
                                     if out.get("dp", "off") != "off" else {})}
        for key, value in untrusted.items():
            if out.get(key, cls.model_fields[key].default) == cls.model_fields[key].default:
                out[key] = value
        return out

    @model_validator(mode="after")
    def _fractions_fit(self) -> RunConfig:
        total = self.train_fraction + self.val_fraction + self.test_fraction
        if total > 1.0 + 1e-9:
            raise ValueError(f"train+val+test fractions add up to {total:.3f} > 1")
        check_template(self.prompt_template)
        for t in self.prompt_templates or ():
            if t.startswith("@"):
                if t not in PROMPT_ENSEMBLES:
                    raise ValueError(f"unknown prompt ensemble {shorten(t)}; use one of "
                                     f"{', '.join(PROMPT_ENSEMBLES)} or templates with '{{}}'")
            else:
                check_template(t)
        if 0 < self.max_weight_ratio < 1:
            raise ValueError("max_weight_ratio must be 0 (no bound) or at least 1 (the median "
                             "client's own weight)")
        if self.dp != "off":
            if self.dp_clipping_norm <= 0:  # no default: the right bound depends on the method
                raise ValueError("dp needs dp_clipping_norm > 0, the L2 bound on one client's "
                                 "update: e.g. --set dp_clipping_norm=0.8 (Flower: "
                                 "dp-clipping-norm=0.8), about the median norm of fedclip's "
                                 "round-1 updates on PACS (linear-probe's: 0.07; "
                                 "docs/attacks.md)")
            if self.dp_noise_multiplier <= 0 and self.dp_epsilon <= 0:
                raise ValueError("dp needs dp_noise_multiplier > 0 or a dp_epsilon budget (the "
                                 "noise multiplier is then calibrated to it)")
            if self.aggregation != "uniform":
                raise ValueError(f"dp adds noise calibrated to a uniform mean of clipped "
                                 f"updates; aggregation={self.aggregation!r} weighs or selects "
                                 f"updates: set aggregation=uniform")
        if self.classes is not None and len(set(self.classes)) != len(self.classes):
            raise ValueError("classes must be distinct")
        return self  # algorithm options are checked by the algorithm (get_algorithm)

    # ------------------------------------------------------------------------------------
    @classmethod
    def build(cls, preset: str | Path | None = None, **overrides: Any) -> RunConfig:
        """Defaults, then a TOML preset, then explicit overrides (``None`` values are skipped)."""
        values: dict[str, Any] = {}
        if preset is not None:
            values.update(load_preset(preset))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls.validated(values)

    @classmethod
    def validated(cls, values: dict[str, Any]) -> RunConfig:
        try:
            return cls(**nest_options(values))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'config'}: {err['msg']}"
                for err in exc.errors()
            )
            unknown = any(err["type"] == "extra_forbidden" for err in exc.errors())
            known = f". Known keys: {', '.join(cls.model_fields)}" if unknown else ""
            raise ConfigError(f"invalid configuration ({problems}){known}") from None

    def replace(self, **changes: Any) -> RunConfig:
        """A validated copy with ``changes``."""
        return self.validated({**self.model_dump(), **changes})

    def fingerprint_fields(self) -> dict[str, Any]:
        """The fields that decide training numbers (a resumed run must match them)."""
        skip = {"eval_every", "checkpoint_every", "checkpoint_seconds", "cache_dir", "device",
                "extract_batch_size",
                "extract_workers", "heldout", "rounds", "personalize_epochs",
                "train_clients_together"}
        return {k: v for k, v in self.model_dump().items() if k not in skip}


# trust=untrusted: what replaces the reference defaults (README: privacy and robustness)
UNTRUSTED: dict[str, Any] = {"aggregation": "median", "norm_factor": 3.0,
                             "max_weight_ratio": 1.0, "selection": "median"}

EXTRACT_BATCH_SIZE = 64  # images per forward when neither the run nor the backbone says
EXTRACT_CHUNK_IMAGES = 1024  # extraction saves its progress every this many images: an
# interrupted extraction continues there (--resume, or the same command again)

# --- limits on what files, folders and other machines tell a run (README: reliability) ------
MAX_TEMPLATE_CHARS = 300  # a prompt template's length
PROMPT_ENSEMBLES = ("@openai-imagenet", "@simple-imagenet")  # open_clip's template lists
MAX_ASPECT_RATIO = 50.0  # an image's longer side over its shorter one (a 1 x 100000 PNG is
# 475 bytes and would resize to about 5 G pixels); longer ones are skipped with a warning
SKIPPED_SHOWN = 5  # unreadable files named per folder in a warning (results.json has all)


def env_path(name: str) -> Path | None:
    """An environment variable naming a folder, as users write one: unset or blank is None,
    ``~`` is expanded."""
    value = os.environ.get(name, "").strip()
    return Path(value).expanduser() if value else None


def env_flag(name: str) -> bool:
    """An environment variable as a switch: unset, blank, 0, false, no and off are off."""
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def shorten(text: str, limit: int = 60) -> str:
    """``repr(text)`` of at most about ``limit`` characters (for messages about input)."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} chars)"


def check_template(template: str) -> str:
    """``template`` when it is a prompt with exactly one ``{}`` for the class name and no
    other replacement field (no field names, conversions or format specs: a template from a
    file must not read attributes or pad to gigabytes), at most ``MAX_TEMPLATE_CHARS`` long;
    otherwise ValueError saying why. ``{{`` and ``}}`` are literal braces."""
    import string

    if len(template) > MAX_TEMPLATE_CHARS:
        raise ValueError(f"prompt template {shorten(template)} is longer than "
                         f"{MAX_TEMPLATE_CHARS} characters")
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in
                  string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise ValueError(f"prompt template {shorten(template)} has unbalanced braces ({exc}); "
                         f"write literal braces as '{{{{' and '}}}}'") from None
    if fields != [("", "", None)]:
        raise ValueError(f"prompt template {shorten(template)} must hold exactly one '{{}}' "
                         f"(where the class name goes) and no other field, name or format")
    return template


class FlowerSettings(BaseModel):
    """The Flower layer's own run-config keys (``transfer``, ``round-timeout``, ...), beside
    the RunConfig fields; a run config spells them with dashes."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    transfer: Literal["fp32", "fp16"] = Field("fp32", description="Weights on the wire "
                                              "(fp16: half the bytes).")
    round_timeout: float = Field(600.0, gt=0, description="Seconds to wait for replies "
                                 "before aggregating what came.")
    min_nodes: int = Field(0, ge=0, description="Nodes to wait for before round 1 (0: those "
                           "connected, at least 2).")
    discover_timeout: float = Field(900.0, gt=0, description="Seconds for nodes to answer who "
                                    "they are (a first run extracts features).")
    out: str = Field("runs/flower", description="Run folder on the SuperLink / simulation "
                     "host.")
    data_root: str = Field("", description="'' = the embedded sample; a node's own "
                           "node-config overrides it.")
    cache_dir: str = ""
    resume: bool = Field(False, description="Continue from out/<heldout>/checkpoint.")
    log_to: str = Field("", description="Loggers: 'tensorboard' (into out/tensorboard) or "
                        "'tensorboard:DIR', comma-separated; paths are the server's.")
    poll_interval: float = Field(0.2, ge=0.01, le=60, description="Seconds between the "
                                 "server's checks for replies (Flower's own grid waits 3 s).")
    secagg_max_weight: float = Field(10_000.0, gt=0, description="SecAgg+: the largest "
                                     "weight a client may send (weights are quantized).")

    @classmethod
    def keys(cls) -> dict[str, Any]:
        """Every key as a run config spells it, with its default."""
        return {name.replace("_", "-"): f.default for name, f in cls.model_fields.items()}


# --- flat settings: `--set key=value` on the command line, Flower's run config ------------
LIST_SEPARATORS = {"classes": ",", "prompt_templates": "|"}  # a list as one flat value


def setting_key(key: str) -> str:
    """A flat setting's key as RunConfig spells it: ``train-fraction`` -> ``train_fraction``;
    ``NAME.KEY`` is an algorithm option (``fedprox.mu``, ``NAME.some-key`` ->
    ``NAME.some_key``)."""
    algo, dot, name = key.strip().partition(".")
    return f"{algo}.{name.replace('-', '_')}" if dot else algo.replace("-", "_")


def flat_settings(values: Mapping[str, Any]) -> dict[str, Any]:
    """Flat settings (``key`` or ``NAME.KEY``, dashes or underscores) as the values
    :meth:`RunConfig.validated` takes: the one reader of ``--set`` and of a Flower run config.
    A list may come as one string (a Flower run config has no lists): ``classes``
    comma-separated, ``prompt_templates`` "|"-separated; an empty one is None."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        key = setting_key(key)
        if key in LIST_SEPARATORS and isinstance(value, str):
            items = value.split(LIST_SEPARATORS[key])
            value = (tuple(c.strip() for c in items if c.strip()) if key == "classes"
                     else tuple(t for t in items if t.strip())) or None
        out[key] = value
    return out


def parse_settings(items: Iterable[str]) -> dict[str, Any]:
    """``key=value`` strings (``--set``) as flat settings (:func:`flat_settings`); a value
    is read as TOML (``1e-4``, ``true``, ``'text'``, ``["a", "b"]``), else as the text it is."""
    values: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects key=value (got {item!r})")
        try:
            values[setting_key(key)] = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            values[setting_key(key)] = raw
    return flat_settings(values)


def nest_options(values: dict[str, Any]) -> dict[str, Any]:
    """``{"fedprox.mu": 0.1}`` (a --set or Flower run-config key) -> ``options.fedprox.mu``."""
    out: dict[str, Any] = {}
    options: dict[str, dict[str, Any]] = {k: dict(v) for k, v in
                                          values.get("options", {}).items()}
    for key, value in values.items():
        if key == "options":
            continue
        if isinstance(value, dict) and "." not in key:  # a TOML table [fedprox] in a preset
            if key in RunConfig.model_fields:
                out[key] = value
            else:
                options.setdefault(key, {}).update(value)
        elif "." in key:
            algo, _, name = key.partition(".")
            options.setdefault(algo, {})[name.replace("-", "_")] = value
        else:
            out[key] = value
    if options:
        out["options"] = options
    return out


def load_preset(path: str | Path) -> dict[str, Any]:
    """A TOML preset's values (a one-line ConfigError if missing or not TOML)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"preset {path} does not exist or is not a regular file; pass a TOML "
                          f"file (see configs/)")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"preset {path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"preset {path} is not UTF-8 text (byte {exc.start}); save it as "
                          f"UTF-8 TOML") from None
    except OSError as exc:
        raise ConfigError(f"preset {path} cannot be read ({exc.strerror})") from None
