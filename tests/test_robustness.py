"""Issue 10: parameters checked before work, degenerate data, corpus faults, runner faults."""
import json

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
