import os

import pytest

os.environ.setdefault("SAELIB_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    """A fresh, empty SAELIB_CACHE for one test."""
    path = tmp_path / "cache"
    monkeypatch.setenv("SAELIB_CACHE", str(path))
    return path
