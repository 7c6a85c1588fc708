"""fedclip.predict and its command: an adapter file names its backbone and its prompts, and
neither may reach further than the file's own checks allow."""

import pytest

from fedclip.cli import main
from fedclip.config import RunConfig
from fedclip.inprocess import experiment as _experiment
from tests.conftest import as_written, one_line_error, toy_cfg

run = as_written(_experiment.run)


def test_predict_refuses_a_download_named_by_a_file(tiny_arch, toy_root, tmp_path):
    from fedclip.core.adapter_file import load_adapter, save_adapter
    from fedclip.errors import BackboneError
    from fedclip.predict import predict

    run(toy_cfg(toy_root, tiny_arch), tmp_path / "r")
    path = tmp_path / "r" / "beta" / "adapter.safetensors"
    adapter = load_adapter(path)
    evil = tmp_path / "evil.safetensors"
    save_adapter(evil, adapter.params, RunConfig.build(backbone="open_clip:hf-hub:attacker/repo@x"),
                 adapter.classes, adapter.logit_scale, 0, adapter.dim)
    image = next((toy_root / "beta" / "cat").iterdir())
    with pytest.raises(BackboneError, match="downloads weights.*--allow-download"):
        predict(evil, [image])
    from fedclip.errors import FedclipError

    data = bytearray(path.read_bytes())
    data[-5] ^= 0x01  # one bit of one weight
    tampered = tmp_path / "tampered.safetensors"
    tampered.write_bytes(bytes(data))
    with pytest.raises(FedclipError, match="checksum"):
        predict(tampered, [image])
    assert main(["predict", str(path), str(image), "--top", "0"]) == 2
    assert main(["predict", str(path), str(image), "--top", "2", "--out",
                 str(tmp_path / "p.csv")]) == 0
    lines = (tmp_path / "p.csv").read_text().splitlines()
    assert lines[0].startswith("file,rank") and len(lines) == 3  # header + top 2


def _forge_adapter(src, dst, **changes):
    """A copy of an adapter file with metadata ``changes`` and a valid checksum (what an
    attacker who knows the format writes)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from fedclip.tensors import checksum

    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        params = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    meta.pop("checksum")
    meta.update(changes)
    meta["checksum"] = checksum(params, meta)
    save_file(params, str(dst), metadata=meta)
    return dst


@pytest.fixture
def adapter_file(tiny_arch, toy_root, tmp_path):
    run(toy_cfg(toy_root, tiny_arch, rounds=1), tmp_path / "r")
    return tmp_path / "r" / "beta" / "adapter.safetensors"


@pytest.mark.parametrize("template", ["{0.__class__.__mro__} {}", "{:>30000000}"])
def test_an_adapter_file_with_a_hostile_template_is_refused_in_one_line(
        adapter_file, toy_root, tmp_path, capsys, template):
    evil = _forge_adapter(adapter_file, tmp_path / "evil.safetensors",
                          prompt_template=template)
    image = next((toy_root / "beta" / "cat").iterdir())
    line = one_line_error(capsys, ["predict", str(evil), str(image)])
    assert "prompt template" in line and "exactly one" in line


@pytest.mark.parametrize("algorithm", ["fedavg-full", "promptfl"])
def test_predict_loads_the_adapters_own_backbone_for_every_algorithm(
        adapter_file, toy_root, tmp_path, capsys, monkeypatch, algorithm):
    """An adapter naming the offline stand-in but an algorithm that loads a backbone must not
    make predict fetch the default ViT-B/32: the algorithm gets the file's backbone (which the
    download guard covered), and one that cannot train it is one line."""
    import fedclip.backbones as backbones

    def no_network(*args, **kwargs):
        raise AssertionError("predict tried to reach the network")

    monkeypatch.setattr(backbones, "_reachable", no_network)
    evil = _forge_adapter(adapter_file, tmp_path / "x.safetensors", backbone="standin",
                          algorithm=algorithm, options="{}")
    image = next((toy_root / "beta" / "cat").iterdir())
    line = one_line_error(capsys, ["predict", str(evil), str(image)])
    assert "standin" in line and "ViT-B-32" not in line
