"""The stand-in backbone on a real PACS subset (skipped when ../shared/data/PACS is absent)."""

import json

import pytest

from fedclip.cli import main
from tests.conftest import PACS_ROOT, has_standin

pytestmark = [
    pytest.mark.pacs,
    pytest.mark.skipif(not PACS_ROOT.is_dir(), reason=f"PACS not found at {PACS_ROOT}"),
    pytest.mark.skipif(not has_standin(), reason="stand-in packages not installed"),
]


@pytest.fixture
def pacs_subset(tmp_path):
    """8 images per class and domain, linked (never copied) from the shared folder."""
    root = tmp_path / "pacs"
    for domain in sorted(p for p in PACS_ROOT.iterdir() if p.is_dir()):
        for cls in sorted(p for p in domain.iterdir() if p.is_dir()):
            (root / domain.name / cls.name).mkdir(parents=True)
            for f in sorted(cls.iterdir())[:8]:
                (root / domain.name / cls.name / f.name).symlink_to(f)
    return root


def test_standin_fedclip_on_pacs_subset(pacs_subset, tmp_path):
    out = tmp_path / "run"
    code = main(["run", "--data-root", str(pacs_subset), "--backbone", "standin", "--heldout",
                 "photo", "--rounds", "20", "--out", str(out)])
    assert code == 0
    (r,) = json.loads((out / "results.json").read_text())["runs"]
    assert r["dataset"] == "pacs" and r["heldout_images"] == 56
    # photos are what the ImageNet-aligned stand-in reads best (about 80% on full PACS)
    assert r["zeroshot"]["generalization"] > 0.5
    assert r["trainable_params"] == 2 * (384 * 384 + 384)
    assert all(0 <= v <= 1 for v in r["personalization"]["per_client"].values())
    assert "NOT CLIP" in (out / "results.md").read_text()
