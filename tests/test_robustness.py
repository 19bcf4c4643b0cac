"""Issue 10: parameters checked before work, degenerate data, corpus faults, runner faults."""
import json
import math

import pytest
import yaml

from saelib import config, run


# ----------------------------------------------------------------------------- parameters
def test_yaml_scientific_notation_is_read_as_a_number():
    over = yaml.safe_load("{lm: {lr: 1e-3}}")        # YAML 1.1: '1e-3' (no dot) is a string
    assert over["lm"]["lr"] == "1e-3"
    cfg = config.load_profile("quick", over)
    assert cfg["lm"]["lr"] == pytest.approx(1e-3) and isinstance(cfg["lm"]["lr"], float)
    cfg = config.load_profile("quick", {"chapter01": {"lr_base": "1e-3", "steps": 1e3}})
    assert cfg["chapter01"]["lr_base"] == pytest.approx(1e-3)
    assert cfg["chapter01"]["steps"] == 1000 and isinstance(cfg["chapter01"]["steps"], int)


@pytest.mark.parametrize("over, path, allowed", [
    ({"chapter01": {"steps": "many"}}, "chapter01.steps", "positive integer"),
    ({"chapter01": {"steps": -5}}, "chapter01.steps", "positive integer"),
    ({"chapter01": {"steps": 2.5}}, "chapter01.steps", "positive integer"),
    ({"chapter01": {"steps": True}}, "chapter01.steps", "positive integer"),
    ({"chapter01": {"lr_base": "fast"}}, "chapter01.lr_base", "positive number or null"),
    ({"chapter01": {"lr_base": -1e-3}}, "chapter01.lr_base", "positive number or null"),
    ({"chapter00": {"n_generations": -1}}, "chapter00.n_generations", "non-negative integer"),
    ({"chapter01": {"scaling": {"widths": [2, "x"]}}}, "chapter01.scaling.widths[1]", "list of positive integers"),
    ({"chapter01": {"scaling": {"widths": 4}}}, "chapter01.scaling.widths", "list of positive integers"),
    ({"lm": {"lr": float("nan")}}, "lm.lr", "number"),
    ({"data": {"max_docs_per_domain": 0}}, "data.max_docs_per_domain", "positive integer or null"),
    ({"lm": {"steps": None}}, "lm.steps", "integer"),
])
def test_bad_override_type_or_range_names_the_key_path(over, path, allowed):
    with pytest.raises(ValueError) as e:
        config.load_profile("quick", over)
    assert path in str(e.value) and allowed in str(e.value)


def test_scalar_for_a_section_is_refused():
    with pytest.raises(ValueError, match=r"lm is a section.*n_layer"):
        config.load_profile("quick", {"lm": 5})


def test_null_where_a_profile_allows_it_and_numbers_where_null_is_the_default():
    cfg = config.load_profile("quick", {"data": {"max_docs_per_domain": None}, "chapter01": {"threads": None}})
    assert cfg["data"]["max_docs_per_domain"] is None and cfg["chapter01"]["threads"] is None
    cfg = config.load_profile("full", {"data": {"max_docs_per_domain": "50", "max_chars_per_doc": 1000}})
    assert cfg["data"]["max_docs_per_domain"] == 50 and cfg["data"]["max_chars_per_doc"] == 1000
    with pytest.raises(ValueError, match="data.max_chars_per_doc"):
        config.load_profile("full", {"data": {"max_chars_per_doc": "lots"}})
    cfg = config.load_profile("quick", {"lm": {"name": "gpt2"}, "chapter01": {"tsne": {"perplexity": 12.5}}})
    assert cfg["lm"]["name"] == "gpt2" and cfg["chapter01"]["tsne"]["perplexity"] == 12.5


def test_leaf_null_in_every_profile_takes_the_hinted_kind(monkeypatch):
    """A key that other chapters add with a null default (lm.capacity_factor: null = no cap)."""
    real = config._read

    def read(name):
        cfg = real(name)
        cfg["lm"]["capacity_factor"] = None
        return cfg
    monkeypatch.setattr(config, "_read", read)
    assert config.load_profile("quick", {"lm": {"capacity_factor": "1.25"}})["lm"]["capacity_factor"] == 1.25
    assert config.load_profile("quick", {"lm": {"capacity_factor": None}})["lm"]["capacity_factor"] is None
    with pytest.raises(ValueError, match="lm.capacity_factor.*positive number or null"):
        config.load_profile("quick", {"lm": {"capacity_factor": -1}})


@pytest.mark.parametrize("over, match", [
    ({"site": "blocks.9.resid_post"}, r"site='blocks.9.resid_post'.*lm.n_layer=2"),
    ({"site": "blocks.1.resid_middle"}, r"site='blocks.1.resid_middle'.*resid_post"),
    ({"activations": {"dtype": "int8"}}, r"activations.dtype='int8'.*float16"),
    ({"device": "gpu"}, r"device='gpu'"),
    ({"lm": {"n_head": 3}}, r"lm.n_embd=64 must be divisible by lm.n_head=3"),
    ({"lm": {"warmup": 1000}}, r"lm.warmup=1000"),
    ({"lm": {"lr": 0}}, r"lm.lr=0 must be > 0 when we train our own LM"),
    ({"data": {"domains": ["poetry"]}}, r"data.domains.*'poetry'"),
    ({"data": {"corpus": "wiki"}}, r"data.corpus='wiki'"),
])
def test_config_only_checks_run_before_any_work(over, match):
    with pytest.raises(ValueError, match=match):
        config.load_profile("quick", over)


def test_site_layer_is_checked_against_the_overridden_depth():
    assert config.load_profile("quick", {"lm": {"n_layer": 4}, "site": "blocks.3.resid_post"})["site"]
    assert config.load_profile("quick", {"site": "blocks.-1.mlp_out"})["site"]
    # a hub model: the depth is unknown until it loads
    assert config.load_profile("quick", {"lm": {"name": "gpt2"}, "site": "blocks.8.resid_post"})


def test_every_profile_passes_its_own_checks():
    for name in config.available_profiles():
        assert config.load_profile(name)["name"] == name


# ----------------------------------------------------------------------------- runner
def _nb(path):
    import nbformat
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('profile = "quick"\noverrides = {}')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell("print(overrides)")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


@pytest.fixture
def nbdir(tmp_path, monkeypatch):
    d = tmp_path / "notebooks"
    d.mkdir()
    _nb(d / "00_a.ipynb")
    monkeypatch.setattr(run, "NOTEBOOK_DIR", d)
    return d


@pytest.mark.parametrize("value, match", [
    ("{lm: {lr: 1e-3", "-p overrides.*not valid YAML"),
    ("{chapter01: {steps: many}}", "chapter01.steps='many'"),
    ("{lm: 5}", "lm is a section"),
    ("{site: blocks.9.resid_post}", "lm.n_layer=2"),
])
def test_runner_refuses_bad_overrides_before_running(nbdir, tmp_path, capsys, value, match):
    out = tmp_path / "out"
    assert run.main(["--output-dir", str(out), "--no-build", "-p", "overrides", value]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    import re
    assert re.search(match, err), err
    assert not out.exists()


def test_runner_injects_numbers_for_scientific_notation(nbdir, tmp_path):
    out = tmp_path / "out"
    assert run.main(["--output-dir", str(out), "--no-build", "-p", "overrides", "{lm: {lr: 1e-3}}"]) == 0
    nb = json.loads((out / "00_a.ipynb").read_text())
    text = "".join("".join(o.get("text", "")) for c in nb["cells"] for o in c.get("outputs", []))
    assert "{'lm': {'lr': 0.001}}" in text


# ----------------------------------------------------------------------------- cache entries
import os
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import torch

from saelib import activations as A
from saelib import utils


def _old(path, seconds=3600):
    t = time.time() - seconds
    for p in [path, *path.rglob("*")]:
        os.utime(p, (t, t))


def _hold_lock_in_other_process(path, cache):
    """Start a process that holds the entry lock of ``path``; returns it once the lock is held."""
    code = ("import sys, time; from saelib import utils\n"
            "with utils.entry_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "SAELIB_CACHE": str(cache)})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_stale_temp_folders_are_removed_unless_a_live_writer_holds_the_entry(tmp_cache):
    folder = utils.cache_dir("activations")
    dead = folder / ".abc123.k2j4h5g6.tmp"          # the temp folder of a write that was killed
    (dead / "abc123").mkdir(parents=True)
    (dead / "abc123" / "acts.npy").write_bytes(b"\0" * 1000)
    live = folder / ".def456.a1b2c3d4.tmp"          # a write in progress in another process
    (live / "def456").mkdir(parents=True)
    fresh = folder / ".ghi789.z9y8x7w6.tmp"          # just created: could be an unlocked (old-code) writer
    fresh.mkdir()
    _old(dead), _old(live)
    proc = _hold_lock_in_other_process(folder / "def456", tmp_cache)
    try:
        utils.cache_dir("activations")
        assert not dead.exists() and live.exists() and fresh.exists()
    finally:
        proc.kill(), proc.wait()
    utils.cache_dir("activations")
    assert not live.exists()


def test_replacing_a_directory_entry_leaves_no_moment_without_it(tmp_path):
    entry = tmp_path / "entry"
    with utils.atomic_path(entry) as tmp:
        tmp.mkdir(), (tmp / "x").write_text("0")
    errors, stop = [], threading.Event()

    def reader():
        while not stop.is_set():
            try:
                (entry / "x").read_text()
            except FileNotFoundError as e:
                errors.append(e)
    th = threading.Thread(target=reader)
    th.start()
    for i in range(200):
        with utils.atomic_path(entry) as tmp:
            tmp.mkdir(), (tmp / "x").write_text(str(i))
    stop.set(), th.join()
    assert not errors and (entry / "x").read_text() == "199"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]   # no .old / .tmp left


def _build_slowly(path, log):
    with open(log, "a") as f:
        f.write("built\n")
    time.sleep(1.0)
    with utils.atomic_path(path) as tmp:
        tmp.mkdir(), (tmp / "data.txt").write_text("payload")


def test_two_processes_on_one_entry_build_once(tmp_cache, tmp_path):
    entry, log = tmp_cache / "things" / "e1", tmp_path / "log"
    code = ("import sys, time\nfrom saelib import utils\n"
            "def build(path):\n"
            "    open(sys.argv[2], 'a').write('built\\n'); time.sleep(1.0)\n"
            "    with utils.atomic_path(path) as tmp:\n"
            "        tmp.mkdir(); (tmp / 'data.txt').write_text('payload')\n"
            "print(utils.cached(sys.argv[1], build, lambda p: (p / 'data.txt').read_text()))\n")
    env = {**os.environ, "SAELIB_CACHE": str(tmp_cache)}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(entry), str(log), os.path.dirname(__file__)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert [o.strip() for o, _ in outs] == ["payload", "payload"]
    assert log.read_text() == "built\n"


def test_checksum_catches_zeroed_block_and_truncation(tmp_path):
    entry = tmp_path / "e"
    with utils.atomic_path(entry) as tmp:
        tmp.mkdir()
        (tmp / "w.bin").write_bytes(np.random.default_rng(0).bytes(300_000))
    assert utils.verify_entry(entry)
    with open(entry / "w.bin", "r+b") as f:      # 100 KB overwritten with zeros, size unchanged
        f.seek(100_000), f.write(b"\0" * 100_000)
    utils._verified.clear()
    with pytest.raises(utils.CacheEntryError, match=r"w\.bin.*checksum"):
        utils.verify_entry(entry)
    os.truncate(entry / "w.bin", 1000)
    with pytest.raises(utils.CacheEntryError, match=r"w\.bin has 1000 bytes, 300000 were written"):
        utils.verify_entry(entry)
    single = tmp_path / "f.json"                 # a file entry: checksum beside it
    single.write_text("{}")
    utils.write_checksum(single)
    assert utils.verify_entry(single)
    single.write_text("[]")
    with pytest.raises(utils.CacheEntryError, match="f.json"):
        utils.verify_entry(single)


def test_cached_rebuilds_a_damaged_or_unloadable_entry(tmp_cache):
    entry, builds = tmp_cache / "things" / "e2", []

    def build(p):
        builds.append(1)
        with utils.atomic_path(p) as tmp:
            tmp.mkdir(), (tmp / "v.txt").write_text("12345")
    load = lambda p: int((p / "v.txt").read_text())   # noqa: E731
    assert utils.cached(entry, build, load) == 12345
    (entry / "v.txt").write_text("99999")            # same size, other content
    utils._verified.clear()
    with pytest.warns(UserWarning, match=r"v\.txt does not match its checksum.*rebuilding"):
        assert utils.cached(entry, build, load) == 12345
    (entry / utils.CHECKSUM_FILE).unlink()           # an entry from before checksums, truncated
    (entry / "v.txt").write_text("")
    with pytest.warns(UserWarning, match=r"e2 cannot be loaded.*rebuilding"):
        assert utils.cached(entry, build, load) == 12345
    assert len(builds) == 3


@pytest.fixture(scope="module")
def gpt():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=50, n_positions=12, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def _tokens():
    x = torch.randint(1, 50, (20, 12), generator=torch.Generator().manual_seed(0))
    x[:, 0] = 0
    return x


def test_damaged_activation_store_is_refused_by_name_and_rebuilt(tmp_cache, gpt):
    store = A.collect(gpt, _tokens(), "blocks.1.resid_post", 150)
    ref = np.array(store.acts)
    path = store.path
    with open(path / "acts.npy", "r+b") as f:
        f.seek(1000), f.write(b"\0" * 2000)
    utils._verified.clear()
    with pytest.raises(ValueError, match=r"acts\.npy does not match its checksum"):
        A.ActivationStore(path)
    with pytest.warns(UserWarning, match=r"acts\.npy"):
        again = A.collect(gpt, _tokens(), "blocks.1.resid_post", 150)
    np.testing.assert_array_equal(np.array(again.acts), ref)
    os.truncate(path / "acts.npy", 500)
    with pytest.raises(ValueError, match=r"acts\.npy has 500 bytes"):
        A.ActivationStore(path)
    with pytest.warns(UserWarning, match=r"truncated"):
        again = A.collect(gpt, _tokens(), "blocks.1.resid_post", 150)
    np.testing.assert_array_equal(np.array(again.acts), ref)


def test_collect_checks_free_space_before_writing(tmp_cache, gpt, monkeypatch):
    import collections
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(A.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(OSError, match=r"needs .* MiB .* free"):
        A.collect(gpt, _tokens(), "blocks.1.resid_post", 150)
    assert not [p for p in utils.cache_dir("activations").iterdir()]   # no partial entry left


def test_disk_full_while_writing_is_an_error_that_says_so(tmp_cache, gpt, monkeypatch):
    import errno

    def full(fd, off, n):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(A.os, "posix_fallocate", full)
    with pytest.raises(OSError, match="disk holding .* is full"):
        A.collect(gpt, _tokens(), "blocks.1.resid_post", 150)
    assert not [p for p in utils.cache_dir("activations").iterdir()]


# ----------------------------------------------------------------------------- defaults, degenerate data
from saelib import metrics, saes, train


def _planted(n=8192, d=64, n_feat=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    D = torch.nn.functional.normalize(torch.randn(n_feat, d, generator=g), dim=-1)
    on = torch.rand(n, n_feat, generator=g) < 4 / n_feat
    codes = on * (torch.rand(n, n_feat, generator=g) * 1.5 + 0.5)
    return codes @ D


@pytest.mark.parametrize("kind", ["relu", "gated"])
@pytest.mark.parametrize("scale", [0.01, 100.0])
def test_build_and_fit_defaults_compose_on_any_scale(kind, scale, one_thread):
    """build(kind) + fit with no options (only a shorter run) give a working SAE on raw activations."""
    x = _planted() * scale
    sae = saes.build(kind, d_in=64, n_latents=512)
    hist = train.fit(sae, x, steps=150, progress=False)
    res = metrics.evaluate_sae(sae, x[:4096])
    assert 1.0 < res["l0"] < 64 and res["fvu"] < 0.5, res
    assert hist.fvu.iloc[-1] < 0.5


def test_zero_data_is_refused_before_training():
    with pytest.raises(ValueError, match="every sampled row is zero"):
        train.fit(saes.build("topk", d_in=8, n_latents=16, k=2), torch.zeros(512, 8), steps=5, batch_size=64,
                  normalize="unit", progress=False)
    bad = torch.randn(512, 8)
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf"):
        train.fit(saes.build("topk", d_in=8, n_latents=16, k=2), bad, steps=5, batch_size=64, progress=False)


@pytest.mark.parametrize("normalize", [None, "unit"])
def test_fvu_without_variance_is_nan_in_history_and_metrics(normalize):
    const = torch.full((512, 8), 3.7) + torch.arange(8.0)
    sae = saes.build("topk", d_in=8, n_latents=16, k=2)
    hist = train.fit(sae, const, steps=10, batch_size=64, normalize=normalize, progress=False)
    assert hist.fvu.isna().all() and hist.mse.notna().all()
    assert math.isnan(metrics.evaluate_sae(sae, const)["fvu"])


def test_one_row_batches_log_nan_fvu_not_huge_numbers():
    x = torch.randn(256, 8)
    hist = train.fit(saes.build("topk", d_in=8, n_latents=16, k=2), x, steps=10, batch_size=1, progress=False)
    assert hist.fvu.isna().all() and hist.loss.notna().all()


def test_fvu_ratio_convention():
    assert train.fvu_ratio(1.0, 4.0, 10.0) == 0.25
    assert math.isnan(train.fvu_ratio(1.0, 0.0, 0.0))
    assert math.isnan(train.fvu_ratio(1e-20, 1e-16, 1e2))     # rounding noise, not variance


# ----------------------------------------------------------------------------- corpus faults
from saelib import data

sys.path.insert(0, os.path.dirname(__file__))
from test_data import write_files  # noqa: E402


def test_corpus_leaving_a_split_empty_is_refused_before_writing(tmp_path, tmp_cache):
    spec = write_files(tmp_path / "txt", n_docs=5)
    with pytest.raises(ValueError, match=r"split 'validation' would be empty: max_docs_per_domain=1 keeps 2"):
        data.load_corpus(spec, max_docs_per_domain=1)
    assert data.load_corpus(spec, max_docs_per_domain=3)["validation"].num_rows == 2


def test_tokenize_refuses_a_split_without_rows_and_writes_nothing(tmp_path, tmp_cache):
    dsd = data.load_corpus(write_files(tmp_path / "txt", n_docs=30))
    tok = data.train_tokenizer(dsd, vocab_size=300)
    with pytest.raises(ValueError, match=r"split\(s\) \['validation', 'test'\] give no row of n_ctx=4096"):
        data.tokenize(dsd, tok, n_ctx=4096)
    assert not [p for p in utils.cache_dir("tokenized").iterdir()]


def test_binary_files_are_skipped_and_latin1_is_decoded(tmp_path, tmp_cache):
    root = tmp_path / "mixed"
    spec = write_files(root, n_docs=10).replace("*.txt", "*")
    (root / "alpha" / "prog.bin").write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 40)
    (root / "alpha" / "noise.dat").write_bytes(np.random.default_rng(0).bytes(5000))
    (root / "beta" / "fr.txt").write_bytes("le café est très chaud, la crème brûlée aussi. " .encode("latin-1") * 5)
    with pytest.warns(UserWarning, match=r"skipped 2 file\(s\).*noise\.dat.*prog\.bin"):
        dsd = data.load_corpus(spec, fractions=(1.0, 0.0, 0.0))
    texts = data.column(dsd["train"], "text")
    assert not any("\x00" in t or "\ufffd" in t for t in texts)
    assert any("le café est très chaud" in t for t in texts)
    assert data.decode_text("déjà vu".encode("utf-8")) == "déjà vu"
    assert data.decode_text("naïve".encode("utf-16")) == "naïve"


def test_tokenizer_training_bounds_a_huge_word(tmp_path, tmp_cache):
    import datasets
    texts = ["plain words here and there " * 20] * 20 + ["x" * 30_000 + " end"]
    dsd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts, "domain": ["a"] * 21,
                                                                      "id": [str(i) for i in range(21)]})})
    with pytest.warns(UserWarning, match=r"1 run\(s\) of more than 1000 characters"):
        tok = data.train_tokenizer(dsd, vocab_size=300)
    assert tok.decode(tok("x" * 5000)["input_ids"]) == "x" * 5000     # still encodes any text
    cut, n = data.bound_words(["ab" * 3 + " " + "c" * 25], max_word=10)
    assert n == 1 and cut[0] == "ababab " + "\n".join(["c" * 10, "c" * 10, "c" * 5])


def test_atomic_path_under_a_held_lock_cleans_its_own_leftovers(tmp_cache):
    entry = utils.cache_dir("things") / "e3"
    stale = entry.parent / ".e3.k2j4h5g6.tmp"
    stale.mkdir()
    _old(stale)
    with utils.entry_lock(entry):                    # the caller holds the lock (utils.cached does)
        with utils.atomic_path(entry) as tmp:
            tmp.write_text("x")
    assert entry.read_text() == "x" and not stale.exists()


def test_rerun_after_kill_9_mid_write_removes_the_leftover_at_once(tmp_cache):
    import signal
    entry = tmp_cache / "things" / "e4"
    code = ("import sys, time; from pathlib import Path; from saelib import utils\n"
            "with utils.atomic_path(sys.argv[1]) as tmp:\n"
            "    tmp.mkdir(); (tmp / 'big.bin').write_bytes(b'x' * 10**6); print('writing', flush=True)\n"
            "    time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(entry)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "SAELIB_CACHE": str(tmp_cache)})
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    left = [p for p in entry.parent.iterdir() if p.name.endswith(".tmp")]
    assert left and not entry.exists()                 # the killed write left its temp folder
    got = utils.cached(entry, lambda p: _build_slowly(p, tmp_cache / "log"), lambda p: (p / "data.txt").read_text())
    assert got == "payload" and sorted(p.name for p in entry.parent.iterdir()) == ["e4"]
