"""The notebook runner: parameter validation, profile injection, atomic output."""
import json

import nbformat
import pytest

from saelib import config, run


def make_notebook(path, body="result = profile"):
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('profile = "quick"\noverrides = {}')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell(body + "\nprint('PROFILE=' + profile)")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


@pytest.fixture
def nbdir(tmp_path, monkeypatch):
    d = tmp_path / "notebooks"
    d.mkdir()
    make_notebook(d / "00_a.ipynb")
    make_notebook(d / "01_b.ipynb")
    monkeypatch.setattr(run, "NOTEBOOK_DIR", d)
    return d


def test_unknown_parameter_is_refused_and_nothing_runs(nbdir, tmp_path, capsys):
    out = tmp_path / "out"
    code = run.main(["--profile", "quick", "--output-dir", str(out), "--no-build", "-p", "n_layerz", "3"])
    assert code == 2
    err = capsys.readouterr().err
    assert "n_layerz" in err and "00_a.ipynb" in err and "overrides" in err
    assert not out.exists()


def test_only_unknown_name_is_refused(nbdir, capsys):
    assert run.main(["--only", "99_missing", "--no-build"]) == 2
    assert "99_missing" in capsys.readouterr().err


def test_profile_is_injected_and_written_atomically(nbdir, tmp_path):
    out = tmp_path / "out"
    code = run.main(["--profile", "full", "--only", "00", "--output-dir", str(out), "--no-build",
                     "-p", "overrides", "{lm: {n_layer: 3}}"])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["00_a.ipynb"]  # --only respected, no temp left
    nb = json.loads((out / "00_a.ipynb").read_text())
    text = "".join("".join(o.get("text", "")) for c in nb["cells"] for o in c.get("outputs", []))
    assert "PROFILE=full" in text
    injected = [c for c in nb["cells"] if "injected-parameters" in c["metadata"].get("tags", [])]
    assert injected and "n_layer" in "".join(injected[0]["source"])


def test_failed_notebook_keeps_previous_output(nbdir, tmp_path, monkeypatch):
    monkeypatch.setattr(run, "REPO_ROOT", tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "00_a.ipynb").write_text("previous")
    make_notebook(nbdir / "00_a.ipynb", body="raise RuntimeError('boom')")
    with pytest.raises(Exception):
        run.main(["--only", "00", "--output-dir", str(out), "--no-build"])
    assert (out / "00_a.ipynb").read_text() == "previous"
    # kept under --output-dir, not under the repo's _build; a second failure keeps both copies
    with pytest.raises(Exception):
        run.main(["--only", "00", "--output-dir", str(out), "--no-build"])
    kept = sorted((out / "failed").glob("00_a.*.ipynb"))
    assert len(kept) == 2 and not (tmp_path / "_build").exists()
    assert not list(out.glob(".*running*"))


def test_quick_profile_never_targets_committed_chapters():
    assert run.output_dir_for("full") == run.BOOK_CHAPTERS
    assert run.BOOK_CHAPTERS not in run.output_dir_for("quick").parents
    assert run.output_dir_for("quick") != run.BOOK_CHAPTERS


def test_every_notebook_has_parameters_cell_with_profile():
    for nb in run.list_notebooks():
        params = run.notebook_parameters(nb)
        assert "profile" in params and "overrides" in params, nb.name


def test_profiles_load_and_reject_unknown_keys():
    assert {"quick", "full", "paper"} <= set(config.available_profiles())
    cfg = config.load_profile("quick", {"lm": {"n_layer": 3}})
    assert cfg["lm"]["n_layer"] == 3 and cfg["name"] == "quick"
    with pytest.raises(ValueError, match="n_layerz"):
        config.load_profile("quick", {"lm": {"n_layerz": 3}})
    with pytest.raises(ValueError, match="profile='huge'"):
        config.load_profile("huge")


def test_relative_paths_keep_no_machine_path(tmp_path):
    import json
    from saelib import run
    nb = tmp_path / "x.ipynb"
    meta = {"papermill": {"input_path": str(run.REPO_ROOT / "notebooks" / "00_subject_model.ipynb"),
                          "output_path": str(run.REPO_ROOT / "book" / "chapters" / ".00.123.running.ipynb")}}
    nb.write_text(json.dumps({"cells": [], "metadata": meta, "nbformat": 4, "nbformat_minor": 5}))
    run.relative_paths(nb, run.REPO_ROOT / "book" / "chapters" / "00_subject_model.ipynb")
    pm = json.loads(nb.read_text())["metadata"]["papermill"]
    assert pm == {"input_path": "notebooks/00_subject_model.ipynb", "output_path": "book/chapters/00_subject_model.ipynb"}
    meta["papermill"]["input_path"] = "/somewhere/else/y.ipynb"          # outside the repository: the name only
    nb.write_text(json.dumps({"cells": [], "metadata": meta, "nbformat": 4, "nbformat_minor": 5}))
    run.relative_paths(nb)
    assert json.loads(nb.read_text())["metadata"]["papermill"]["input_path"] == "y.ipynb"
