"""open_clip backbones: ``open_clip:ARCH@TAG``.

``TAG`` is an open_clip pretrained tag (downloaded through open_clip, needs internet once),
a path to a local checkpoint file, or ``none`` for random weights. Random weights are
initialised from a fixed seed so that feature caches stay valid across processes.
"""

from __future__ import annotations

import hashlib
import pickle
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fedclip.config import EXTRACT_BATCH_SIZE
from fedclip.errors import BackboneError

FORMS = [
    ("open_clip:ARCH@TAG", "an open_clip architecture with a pretrained tag, downloaded once "
                           "(the paper: open_clip:ViT-B-32@openai)"),
    ("open_clip:ARCH@/path/ckpt.pt", "a local checkpoint file (offline)"),
    ("open_clip:ARCH@none", "random weights, seeded (shapes, speed and code paths; no "
                            "accuracy)"),
    ("open_clip:hf-hub:ORG/REPO", "an open_clip repository on the Hugging Face hub (its own "
                                  "weights; no tag)"),
    ("open_clip:local-dir:/path", "an open_clip repository saved locally (no tag)"),
]
FINETUNABLE = True  # the -full baselines train open_clip models
PROMPTABLE = True  # the prompt learners put context vectors into its text tower



def first_line(exc: BaseException) -> str:
    """An exception's first non-empty line, at most 200 characters (libraries' messages run
    to pages)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:200]


class OpenClipBackbone:
    default_batch_size = EXTRACT_BATCH_SIZE

    def __init__(self, arch: str, tag: str, device: str = "cpu") -> None:
        import open_clip

        self.spec = f"open_clip:{arch}@{tag}"
        self.arch, self.tag, self.device = arch, tag, device
        pretrained = _validate(arch, tag)
        try:
            with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Detected pickle protocol")
                torch.manual_seed(0)  # `@none`: the same random weights in every process
                model, _, preprocess = open_clip.create_model_and_transforms(
                    arch, pretrained=pretrained, device=device
                )
        except pickle.UnpicklingError:  # torch.load(weights_only=True) refused it; its
            # text suggests weights_only=False: never for a file from elsewhere
            raise BackboneError(f"{tag} is not a plain weights file (safe loading refused "
                                f"it: it holds Python objects, not only tensors); pass a "
                                f"checkpoint of tensors only") from None
        except (OSError, RuntimeError, ValueError, KeyError) as exc:
            hint = (f". Offline? Download the weights once and pass the file: "
                    f"open_clip:{arch}@/path/to/checkpoint.pt" if pretrained else "")
            raise BackboneError(f"could not build {self.spec}: {first_line(exc)}{hint}"
                                ) from None
        self.model = model.eval().requires_grad_(False)
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.embed_dim = int(self.encode_texts(["a"]).shape[1])
        self.logit_scale = float(model.logit_scale.exp().item())

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels.to(self.device)).float().cpu()

    def _vit(self):  # noqa: ANN202 - open_clip's VisionTransformer
        from open_clip.transformer import VisionTransformer

        visual = self.model.visual
        if not isinstance(visual, VisionTransformer) or visual.attn_pool is not None \
                or visual.pool_type != "tok":
            raise BackboneError(f"{self.spec} gives no patch tokens: its image tower is not a "
                                f"ViT pooled by its class token (use a ViT architecture)")
        return visual

    def token_count(self) -> int:
        grid = self._vit().grid_size
        return int(grid[0] * grid[1])

    @torch.no_grad()
    def encode_image_tokens(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The transformer's output tokens after ``ln_post`` and ``@ proj``: the class token's
        is the pooled embedding (what ``encode_images`` gives), the others the patch tokens."""
        visual = self._vit()
        x = visual.transformer(visual._embeds(pixels.to(self.device)))
        pooled, tokens = visual._pool(x)
        if visual.final_ln_after_pool:
            tokens = visual.ln_post(tokens)
        if visual.proj is not None:
            pooled, tokens = pooled @ visual.proj, tokens @ visual.proj
        return pooled.float().cpu(), tokens.float().cpu()

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts).to(self.device)
        return self.model.encode_text(tokens).float().cpu()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def prompt_tower(self, prompts: Sequence[str], prefix: str) -> OpenClipPromptTower:
        """The text tower with ``prefix``'s tokens of each prompt as learned context."""
        if not hasattr(self.model, "token_embedding"):
            raise BackboneError(f"{self.spec} has a custom text tower; prompt learning needs a "
                                f"CLIP-style one (token_embedding + transformer)")
        return OpenClipPromptTower(self, prompts, prefix)


class OpenClipPromptTower:
    """CoOp's prompt on CLIP's text tower: ``[SOT] ctx_1..ctx_M name... [EOT]`` through the
    frozen transformer, pooled at the end token and projected (``PromptTower``)."""

    def __init__(self, backbone: OpenClipBackbone, prompts: Sequence[str], prefix: str
                 ) -> None:
        model = backbone.model
        self.model = model
        tok = backbone.tokenizer
        self.n_ctx = int((tok([prefix])[0] != 0).sum()) - 2  # without start and end tokens
        self.width = int(model.token_embedding.weight.shape[1])
        self.tokens = tok(list(prompts)).to(model.token_embedding.weight.device)

    def template_context(self) -> torch.Tensor:
        with torch.no_grad():
            return self.model.token_embedding(self.tokens[0, 1:1 + self.n_ctx]).float().cpu()

    def encode(self, ctx: torch.Tensor) -> torch.Tensor:
        from open_clip.transformer import text_global_pool

        model, tokens = self.model, self.tokens
        x = model.token_embedding(tokens)
        ctx = ctx.to(x.dtype)
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(len(tokens), -1, -1)
        x = torch.cat([x[:, :1], ctx, x[:, 1 + self.n_ctx:]], dim=1)
        x = model.transformer(x + model.positional_embedding, attn_mask=model.attn_mask)
        x = text_global_pool(model.ln_final(x), tokens, model.text_pool_type,
                             eos_token_id=getattr(model, "text_eos_id", None))
        proj = model.text_projection
        if proj is not None:
            x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return F.normalize(x.float(), dim=-1)


def fingerprint(rest: str) -> str:
    """Architecture, tag (a local checkpoint also by size and mtime) and open_clip's version,
    which together decide the weights and the preprocessing. Known without importing
    open_clip (seconds: it pulls torchvision and transformers): a run whose features are all
    cached never does; :func:`validate` checks the names when something is encoded."""
    from importlib.metadata import version

    arch, tag = _split(rest)
    ident = f"{arch}@{tag}|open_clip={version('open_clip_torch')}"
    if Path(tag).is_file():
        st = Path(tag).stat()
        ident += f"|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def validate(rest: str) -> None:
    """A one-line BackboneError unless open_clip knows the architecture and the tag."""
    _validate(*_split(rest))


def zero_shot_templates(name: str) -> tuple:
    """open_clip's named template list (``OPENAI_IMAGENET_TEMPLATES``...), read from its
    data module without importing open_clip itself (the module holds only the lists)."""
    import importlib.util

    found = importlib.util.find_spec("open_clip")
    folders = list(found.submodule_search_locations or []) if found is not None else []
    path = next((Path(f) / "zero_shot_metadata.py" for f in folders
                 if (Path(f) / "zero_shot_metadata.py").is_file()), None)
    if path is None:  # not a plain folder: the normal import
        from open_clip import zero_shot_metadata

        return tuple(getattr(zero_shot_metadata, name))
    spec = importlib.util.spec_from_file_location("_fedclip_open_clip_templates", path)
    assert spec is not None and spec.loader is not None  # a .py file that exists
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return tuple(getattr(module, name))


def _hub_cached(repo: str, filenames: list[str]) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    return any(isinstance(try_to_load_from_cache(repo, f), str) for f in filenames)


def weights_to_download(rest: str) -> str | None:
    """Where this spec's weights would be downloaded from; None when they are on this machine
    (a local file or folder, random weights, or already in open_clip's / the hub's cache)."""
    import os

    import open_clip
    from open_clip import pretrained as pt

    arch, tag = _split(rest)
    if arch.startswith("local-dir:") or tag == "none" or Path(tag).is_file():
        return None
    if arch.startswith("hf-hub:"):
        repo = arch.removeprefix("hf-hub:")
        cached = _hub_cached(repo, ["open_clip_config.json"])
        return None if cached else f"https://huggingface.co/{repo}"
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if cfg.get("hf_hub"):
        repo, filename = os.path.split(cfg["hf_hub"])
        filename = filename or pt.HF_WEIGHTS_NAME
        names = [filename, *getattr(pt, "_get_safe_alternatives", lambda _: [])(filename)]
        return None if _hub_cached(repo, names) else f"https://huggingface.co/{repo}"
    url = cfg.get("url", "")
    if not url:
        return None
    folder = Path(os.path.expanduser("~/.cache/clip"))
    return None if (folder / os.path.basename(url)).is_file() else url


def load(rest: str, device: str) -> OpenClipBackbone:
    return OpenClipBackbone(*_split(rest), device)


HUB_SCHEMAS = ("hf-hub:", "local-dir:")  # open_clip loads these repositories' own weights


def _split(rest: str) -> tuple[str, str]:
    arch, sep, tag = rest.partition("@")
    if arch.startswith(HUB_SCHEMAS):
        if tag == "none":
            raise BackboneError(f"open_clip:{arch} loads that repository's own weights; "
                                f"'@none' (random weights) cannot apply to it: drop the tag")
        return arch, tag or "hub"  # the tag is optional (and ignored by open_clip) here
    if not arch or not sep or not tag:
        raise BackboneError(
            f"open_clip spec needs an architecture and a tag: open_clip:ARCH@TAG "
            f"(got open_clip:{rest}); e.g. open_clip:ViT-B-32@openai or open_clip:ViT-B-32@none"
        )
    return arch, tag


def _validate(arch: str, tag: str) -> str | None:
    """Check the architecture and tag exist; return what open_clip's ``pretrained`` takes."""
    import open_clip

    if arch.startswith(HUB_SCHEMAS):
        return None  # open_clip takes the weights from the repository itself
    pretrained = None if tag == "none" else tag
    if not arch.startswith(("hf-hub:", "local-dir:")) and arch not in open_clip.list_models():
        raise BackboneError(
            f"open_clip has no architecture {arch!r}; known ones include "
            f"{', '.join(open_clip.list_models()[:8])}, ... (open_clip.list_models())"
        )
    if pretrained and not Path(pretrained).is_file() and not arch.startswith("hf-hub:"):
        known = open_clip.list_pretrained_tags_by_model(arch)
        if pretrained not in known:
            raise BackboneError(
                f"open_clip has no pretrained tag {pretrained!r} for {arch}; use one of "
                f"{', '.join(known) or '(none known)'}, a local checkpoint path, or 'none'"
            )
    return pretrained
