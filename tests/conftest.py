import os

import pytest
import torch

os.environ.setdefault("SAELIB_QUIET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    """A fresh, empty SAELIB_CACHE for one test."""
    path = tmp_path / "cache"
    monkeypatch.setenv("SAELIB_CACHE", str(path))
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: one thread is fastest and immune to a busy second core."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def interrupt_training_at(monkeypatch):
    """``interrupt_training_at(step)``: from now on, ``train.fit``'s step ``step`` raises
    KeyboardInterrupt (an interrupted run); returns the real step function, for undoing."""
    from saelib import train

    real_step = train._train_step

    def arm(stop: int):
        def interrupted(sae, opt, x, lr, aux_k, coef, dead, step):
            if step == stop:
                raise KeyboardInterrupt
            return real_step(sae, opt, x, lr, aux_k, coef, dead, step)

        monkeypatch.setattr(train, "_train_step", interrupted)
        return real_step
    return arm
