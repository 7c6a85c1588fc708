"""fedclip.predict and its command: an adapter file names its backbone and its prompts, and
neither may reach further than the file's own checks allow."""

import pytest

from fedclip.cli import main
from fedclip.config import RunConfig
from fedclip.inprocess import experiment as _experiment
from tests.conftest import as_written, toy_cfg

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
