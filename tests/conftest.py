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


@pytest.fixture(scope="session")
def tiny_gpt2():
    """``tiny_gpt2(n_layer, d, n_ctx, vocab, bos)``: a randomly initialised GPT-2 (seed 0, no
    dropout, large weights so that ablations visibly change the loss), and
    ``tiny_gpt2.tokens(n, n_ctx, vocab, bos)``: ``n`` random rows starting with ``bos``, with
    a document separator mid-row in row 3 (seed 0)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    def build(n_layer, d, n_ctx, vocab, bos):
        torch.manual_seed(0)
        cfg = GPT2Config(vocab_size=vocab, n_positions=n_ctx, n_embd=d, n_layer=n_layer, n_head=2,
                         bos_token_id=bos, eos_token_id=bos, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                         initializer_range=0.5)
        return GPT2LMHeadModel(cfg).eval()

    def tokens(n, n_ctx, vocab, bos):
        g = torch.Generator().manual_seed(0)
        x = torch.randint(1, vocab, (n, n_ctx), generator=g)
        x[:, 0] = bos
        x[3, 5] = bos  # a document separator mid-sequence
        return x

    build.tokens = tokens
    return build
