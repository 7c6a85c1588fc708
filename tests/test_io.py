"""Disks: a feature cache that cannot be written is refused before extraction."""

import os

import pytest

from fedclip.errors import RunFolderError
from fedclip.inprocess import experiment as _experiment
from tests.conftest import as_written, toy_cfg

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
