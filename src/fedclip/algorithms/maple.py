"""FedMaPLe: MaPLe's multimodal prompts (Khattak et al., "MaPLe: Multi-modal Prompt Learning",
CVPR 2023), learned by clients through the frozen open_clip encoders and averaged by the
server.

What trains (everything else of both encoders is frozen):

* the **text prompts** ``P_0 .. P_{J-1}``, each ``n_ctx`` x text width: ``P_0`` are context
  tokens at the input that take the place of the first ``n_ctx`` words of ``init`` in the
  class prompt ``"{init} {class name}."`` (``"a photo of a {}."``: ``P_0`` starts at the token
  embeddings of "a photo"; the rest of the words stay as they are); ``P_i`` (``i >= 1``) take
  the place of the same ``n_ctx`` positions at the input of text layer ``i + 1`` (the paper's
  deep language prompting, as its equations write it: ``[_, W_i] = L_i([P_{i-1}, W_{i-1}])``
  for ``i <= J``, after which the tokens at those positions carry on as computed);
* the **coupling functions** ``F_k``, one ``Linear(text width -> vision width)`` per depth
  ``k = 0 .. J-1``: the vision prompts are ``P~_k = F_k(P_k)`` (the V-L coupling), ``n_ctx``
  tokens appended after the patch tokens at the image encoder's input (after the positional
  embedding, before its input LayerNorm) and replaced at the input of vision layer ``k + 1``
  (``[c_i, E_i, _] = V_i([c_{i-1}, E_{i-1}, P~_{i-1}])`` for ``i <= J``). The vision prompts are
  a function of the text prompts: they have no parameters of their own.

The image embedding is pooled from the encoder's own tokens (the prompt tokens are dropped
before its pooling), and the loss is the run's (``loss=clip`` by default; the paper trains
with cross-entropy over the class prompts: ``--set loss=ce``). The paper's defaults are the
options' (``n_ctx`` 2, ``depth`` 9, ``init`` "a photo of a"); ``depth`` is clamped to the
encoders' layers (a backbone with fewer layers than 9 prompts every layer).

Choices the paper leaves open, made here:

* ``P_0`` starts at the word embeddings where the tokenizer allows (``init`` has at least
  ``n_ctx`` tokens); otherwise (or ``init = ""``) at N(0, 0.02^2) with ``n_ctx`` placeholder
  words "X" in the prompt. The deep prompts start at N(0, 0.02^2), the coupling layers at
  torch's default Linear initialisation, all from the run's seed (the same on every node);
* round 0 is therefore not the zero-shot classifier: the deep text prompts replace hidden
  states and the vision prompts add tokens to every image's attention. What holds is that the
  first layer's text input is exactly the zero-shot prompt's at round 0, and that round 0 is
  the initial prompts' accuracy, identical in every runtime;
* only ViT image encoders with CLIP-style text transformers (``open_clip:ARCH@TAG``): the
  stand-in and the ResNet (CNN) image encoders have no token sequence to prompt, and are
  refused in one line.

What travels each round (up and down): the prompts and the coupling layers, ``n_ctx * d_t * J +
J * (d_t * d_v + d_v)`` values: 3,555,072 for ViT-B/32 (``d_t`` 512, ``d_v`` 768), 14.2 MB
per direction in fp32. The server averages them as any mean, so DP, the robust rules and
SecAgg+ apply unchanged. Each step runs both encoders forward and backward (the text encoder
over the C class prompts), as the ``-full`` baselines do, without their optimizer state.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from fedclip.adapters import get_params
from fedclip.algorithms.base import Algorithm, ClientSide
from fedclip.algorithms.registry import register
from fedclip.errors import ConfigError
from fedclip.tensors import Params

INIT_STD = 0.02  # the paper's reference initialisation of random prompts


class MaPLeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    n_ctx: int = Field(2, ge=1, le=16, description="Prompt tokens per layer (the paper: 2).")
    depth: int = Field(9, ge=1, le=64, description="Prompted layers J, clamped to the "
                       "encoders' layers (the paper: 9).")
    init: str = Field("a photo of a", max_length=200, description="Words whose first n_ctx "
                      "token embeddings start the input prompt; the prompt reads "
                      "'{init} {class}.' ('': random, with placeholder words).")


class MaPLePrompts(nn.Module):
    """The text prompts of every prompted depth and the coupling functions that map them to
    the vision prompts."""

    def __init__(self, n_ctx: int, depth: int, text_width: int, vision_width: int) -> None:
        super().__init__()
        self.ctx = nn.Parameter(torch.zeros(n_ctx, text_width))
        self.deep_text = nn.ParameterList(
            [nn.Parameter(torch.zeros(n_ctx, text_width)) for _ in range(depth - 1)])
        self.coupling = nn.ModuleList(
            [nn.Linear(text_width, vision_width) for _ in range(depth)])

    def text_prompts(self) -> list[torch.Tensor]:
        """``P_0 .. P_{J-1}``."""
        return [self.ctx, *self.deep_text]

    def vision_prompts(self) -> list[torch.Tensor]:
        """``F_k(P_k)`` for ``k = 0 .. J-1``."""
        return [f(p) for f, p in zip(self.coupling, self.text_prompts(), strict=True)]


def _block(block: nn.Module, x: torch.Tensor, mask: torch.Tensor | None, batch_first: bool
           ) -> torch.Tensor:
    """One residual attention block on batch-first ``x``."""
    if batch_first:
        return block(x, attn_mask=mask)
    return block(x.transpose(0, 1), attn_mask=mask).transpose(0, 1)


def _expand(p: torch.Tensor, n: int, like: torch.Tensor) -> torch.Tensor:
    return p.unsqueeze(0).expand(n, -1, -1).to(like.dtype)


class MaPLeClient(ClientSide):
    """FedMaPLe's client side: both encoders run with the prompts."""

    def embed(self, module: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
        if module is None:  # the frozen backbone: zero-shot
            return F.normalize(self.backbone.model.encode_image(x).float(), dim=-1)
        return F.normalize(self.encode_image(module, x).float(), dim=-1)

    def class_text(self, module: nn.Module | None, class_text: torch.Tensor) -> torch.Tensor:
        if module is None:
            return class_text
        return F.normalize(self.encode_text(module).float(), dim=-1)


@register
class FedMaPLe(Algorithm):
    name = "fedmaple"
    summary = "MaPLe: deep text prompts coupled to vision prompts, frozen encoders, averaged"
    uses_text = "tower"  # the prompts run through the text encoder at every step
    inputs = "pixels"  # and through the image encoder
    eval_batch = 32
    init_needs_text = True  # the context starts at the init words' embeddings (nodes')
    Options = MaPLeOptions
    options: MaPLeOptions
    Client = MaPLeClient

    # --- the frozen backbone and its shapes ------------------------------------------------
    @property
    def backbone(self):  # noqa: ANN201 - fedclip.backbones.FinetunableBackbone
        """The frozen open_clip backbone the prompts run through (loaded once; a backbone
        without CLIP-style text and ViT image transformers is refused in one line)."""
        if getattr(self, "_backbone", None) is None:
            from fedclip.backbones import backbone_traits, load_finetunable, resolve_device

            why = f"{self.name} prompts the layers of open_clip's text and vision transformers"
            if backbone_traits(self.cfg.backbone).prefix != "open_clip":
                raise ConfigError(f"{why}; backbone {self.cfg.backbone!r} has none (use "
                                  f"open_clip:ARCH@TAG with a ViT, e.g. open_clip:ViT-B-32@none)")
            backbone = load_finetunable(self.cfg.backbone, resolve_device(self.cfg.device), why)
            problem = _unpromptable(backbone.model)
            if problem is not None:
                raise ConfigError(f"{why}; {self.cfg.backbone} {problem} (use a ViT "
                                  f"architecture with CLIP's text tower, e.g. ViT-B-32)")
            self._backbone = backbone
        return self._backbone

    @property
    def depth(self) -> int:
        """The prompted depth J: the option, clamped to the encoders' layers."""
        model = self.backbone.model
        return min(self.options.depth, len(model.transformer.resblocks),
                   len(model.visual.transformer.resblocks))

    def _widths(self) -> tuple[int, int]:
        model = self.backbone.model
        return int(model.token_embedding.weight.shape[1]), int(model.visual.conv1.out_channels)

    def class_names(self) -> list[str]:
        """The class names, recovered from the run's class prompts and template."""
        if not self.prompts:
            raise ConfigError(f"{self.name} needs the class prompts: build it with "
                              f"get_algorithm(cfg, Runtime(prompts=...))")
        before, _, after = self.cfg.prompt_template.partition("{}")
        names = []
        for prompt in self.prompts:
            if not (prompt.startswith(before) and prompt.endswith(after)):
                raise ConfigError(f"class prompt {prompt!r} does not follow prompt_template "
                                  f"{self.cfg.prompt_template!r}")
            names.append(prompt[len(before):len(prompt) - len(after)])
        return names

    def _init_tokens(self) -> torch.Tensor | None:
        """The token ids of the first ``n_ctx`` words of ``init`` (None: the tokenizer gives
        fewer, or ``init`` is empty: random context, placeholder words)."""
        init, n = self.options.init.strip(), self.options.n_ctx
        if not init:
            return None
        ids = self.backbone.tokenizer([init])[0]
        body = ids[1:int((ids != 0).sum()) - 1]  # without the start and end tokens
        return body[:n] if len(body) >= n else None

    def tokens(self) -> torch.Tensor:
        """The class prompts' token ids [C, L] (on the backbone's device), computed once:
        ``"{init} {name}."``, the first ``n_ctx`` tokens after the start token being the
        context's positions."""
        if getattr(self, "_tokens", None) is None:
            init = self.options.init.strip()
            prefix = init if self._init_tokens() is not None else " ".join(
                ["X"] * self.options.n_ctx)
            texts = [f"{prefix} {name}." for name in self.class_names()]
            device = self.backbone.model.token_embedding.weight.device
            self._tokens = self.backbone.tokenizer(texts).to(device)
        return self._tokens

    # --- the model ------------------------------------------------------------------------
    def build_module(self, dim: int) -> nn.Module:
        with torch.random.fork_rng(devices=[]):  # its random init is overwritten at once
            return MaPLePrompts(self.options.n_ctx, self.depth, *self._widths())

    def init_global(self, dim: int) -> Params | None:
        text_width, vision_width = self._widths()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed)
            module = MaPLePrompts(self.options.n_ctx, self.depth, text_width, vision_width)
            with torch.no_grad():
                for p in module.text_prompts():
                    nn.init.normal_(p, std=INIT_STD)
                words = self._init_tokens()
                if words is not None:
                    embedding = self.backbone.model.token_embedding
                    module.ctx.copy_(embedding(words.to(embedding.weight.device)).cpu())
        return get_params(module)

    # --- the two encoders with the prompts ------------------------------------------------
    def encode_text(self, module: nn.Module) -> torch.Tensor:
        """The class prompts' text features (not normalised) with the text prompts ``P_k``
        in the context positions of the first J layers' inputs."""
        from open_clip.transformer import text_global_pool

        model: Any = self.backbone.model
        prompts: list[torch.Tensor] = module.text_prompts()  # type: ignore[operator]
        tokens, n = self.tokens(), len(prompts[0])
        x = model.token_embedding(tokens)

        def place(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
            return torch.cat([x[:, :1], _expand(p, len(x), x), x[:, 1 + n:]], dim=1)

        x = place(x, prompts[0]) + model.positional_embedding.to(x.dtype)
        batch_first = getattr(model.transformer, "batch_first", True)
        for i, block in enumerate(model.transformer.resblocks):
            if 1 <= i < len(prompts):
                x = place(x, prompts[i])
            x = _block(block, x, model.attn_mask, batch_first)
        x = text_global_pool(model.ln_final(x), tokens, model.text_pool_type,
                             eos_token_id=getattr(model, "text_eos_id", None))
        proj = model.text_projection
        if proj is not None:
            x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
        return x

    def encode_image(self, module: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        """Image features (not normalised) with the vision prompts ``F_k(P_k)`` after the
        patch tokens of the first J layers' inputs."""
        visual: Any = self.backbone.model.visual
        prompts: list[torch.Tensor] = module.vision_prompts()  # type: ignore[operator]
        n = len(prompts[0])
        x = visual.conv1(pixels)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # [B, grid^2, width]
        cls = visual.class_embedding.view(1, 1, -1).expand(len(x), -1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        x = visual.patch_dropout(x)
        x = visual.ln_pre(torch.cat([x, _expand(prompts[0], len(x), x)], dim=1))
        batch_first = getattr(visual.transformer, "batch_first", True)
        for i, block in enumerate(visual.transformer.resblocks):
            if 1 <= i < len(prompts):
                x = torch.cat([x[:, :-n], _expand(prompts[i], len(x), x)], dim=1)
            x = _block(block, x, None, batch_first)
        pooled, _ = visual._pool(x[:, :-n])  # the encoder's own tokens
        if visual.proj is not None:
            pooled = pooled @ visual.proj
        return pooled


def _unpromptable(model: nn.Module) -> str | None:
    """Why ``model`` has no CLIP text transformer and ViT image transformer to prompt (None:
    it has both)."""
    from open_clip.transformer import VisionTransformer

    if not all(hasattr(model, a) for a in ("token_embedding", "transformer", "attn_mask")):
        return "has a custom text tower, not CLIP's token embedding + transformer"
    visual = getattr(model, "visual", None)
    if not isinstance(visual, VisionTransformer):
        kind = type(visual).__name__
        return f"has a {kind} image encoder, not a ViT (no token sequence to prompt)"
    if getattr(visual, "attn_pool", None) is not None:
        return "pools its image tokens by attention (CoCa), which the prompts would enter"
    return None
