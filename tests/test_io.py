"""Disks: a feature cache that cannot be written is refused before extraction; a full or
read-only disk is one line and leaves nothing partial."""

import errno
import os

import pytest

from fedclip.errors import FedclipError, RunFolderError
from fedclip.inprocess import experiment as _experiment
from tests.conftest import as_written, one_line_error, toy_cfg

run = as_written(_experiment.run)


def test_an_unwritable_cache_is_refused_before_extraction(tiny_arch, toy_root, tmp_path):
    if os.geteuid() == 0:
        blocker = tmp_path / "cache-file"
        blocker.write_text("not a folder")
        cache = blocker / "sub"  # cannot be created, even as root
    else:
        cache = tmp_path / "ro"
        cache.mkdir(mode=0o500)
    with pytest.raises(RunFolderError, match="feature cache.*not writable"):
        run(toy_cfg(toy_root, tiny_arch, cache_dir=str(cache)), tmp_path / "r")


@pytest.mark.parametrize(("code", "said"), [(errno.ENOSPC, "no space left"),
                                            (errno.EROFS, "read-only")])
def test_a_full_or_read_only_disk_is_one_line_and_leaves_nothing_partial(
        tiny_arch, toy_root, tmp_path, capsys, monkeypatch, code, said):
    """The feature cache's writer (safetensors, which raises its own error type with the OS
    text inside) and the run folder's JSON writer both fail on the disk."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError(f"Error while serializing: IoError({os.strerror(code)} "
                              f"(os error {code}))")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    argv = ["run", "--data-root", str(toy_root), "--backbone", tiny_arch, "--heldout", "beta",
            "--rounds", "1", "--out", str(tmp_path / "r")]
    line = one_line_error(capsys, argv)
    assert said in line and "cannot write" in line and ".safetensors" in line
    cache = os.environ["FEDCLIP_CACHE"]
    assert not [p for p in os.listdir(os.path.join(cache, "images"))
                if p.endswith(".tmp")] if os.path.isdir(os.path.join(cache, "images")) else True
    from fedclip import io

    monkeypatch.undo()
    monkeypatch.setenv("FEDCLIP_CACHE", cache)

    def text_full(self, data):  # noqa: ANN001
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(io.Path, "write_bytes", text_full)
    with pytest.raises(FedclipError, match=said):
        io.atomic_write_text(tmp_path / "x.json", "{}")
    assert not list(tmp_path.glob(".x.json.*"))
