"""The notebook runner: ``python -m saelib.run --profile quick|full``.

Executes ``notebooks/*.ipynb`` in order with papermill, injecting ``profile``
and any ``-p name value`` overrides (values are parsed as YAML, so
``-p overrides '{lm: {n_layer: 4}}'`` passes a dict), then builds the book
with ``jupyter-book build -W -n --keep-going``.

* Every ``-p`` name is checked against each selected notebook's
  ``parameters`` cell before anything runs; an unknown name is refused.
* ``full`` writes to ``book/chapters/`` (the committed book). Any other
  profile writes to ``_build/<profile>/chapters/`` and builds a staged copy of
  the book in ``_build/<profile>/``, so a quick run never touches the
  committed chapters.
* ``-p overrides '{...}'`` is resolved with :func:`saelib.config.load_profile`
  before anything runs, so a bad key, type or range (or malformed YAML) is an
  error naming it, not a traceback after the corpus step.
* A notebook is executed into a temporary file and only renamed onto its
  destination when it succeeds; a failed run is kept in ``<output-dir>/failed/``
  with ``--output-dir`` (``_build/<profile>/failed/`` otherwise), under a name
  with a time stamp and process id, so two failing runs keep both copies; the
  old chapter stays.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

from saelib.config import available_profiles, load_profile
from saelib.utils import REPO_ROOT

NOTEBOOK_DIR = REPO_ROOT / "notebooks"
BOOK_CHAPTERS = REPO_ROOT / "book" / "chapters"


def list_notebooks(root: Path | None = None) -> list[Path]:
    return sorted(p for p in (root or NOTEBOOK_DIR).glob("*.ipynb") if not p.name.startswith((".", "_")))


def notebook_parameters(path: Path) -> dict:
    """Names (and inferred types/defaults) declared in the notebook's cell tagged ``parameters``."""
    import papermill

    params = papermill.inspect_notebook(str(path))
    if not params:
        raise ValueError(f"{path.name}: no cell tagged 'parameters' (papermill cannot parameterize it)")
    return params


def select(notebooks: list[Path], only: list[str] | None) -> list[Path]:
    if not only:
        return notebooks
    chosen = []
    for name in only:
        hits = [p for p in notebooks if p.stem == name or p.stem.startswith(name)]
        if not hits:
            raise ValueError(f"--only {name!r} matches no notebook; choose from {[p.stem for p in notebooks]}")
        chosen += [p for p in hits if p not in chosen]
    return sorted(chosen)


def validate(notebooks: list[Path], params: dict) -> None:
    """Refuse any parameter a selected notebook's parameters cell does not define."""
    for nb in notebooks:
        declared = notebook_parameters(nb)
        unknown = sorted(set(params) - set(declared))
        if unknown:
            raise ValueError(
                f"{nb.name}: unknown parameter(s) {unknown}; its parameters cell defines {sorted(declared)}"
            )


def output_dir_for(profile: str) -> Path:
    return BOOK_CHAPTERS if profile == "full" else REPO_ROOT / "_build" / profile / "chapters"


def failed_dir_for(profile: str, output_dir: Path | None = None) -> Path:
    """Where failed notebooks go: ``<output_dir>/failed`` when an output folder was given,
    else ``_build/<profile>/failed`` (never inside the committed ``book/``)."""
    return Path(output_dir) / "failed" if output_dir is not None else REPO_ROOT / "_build" / profile / "failed"


def _failed_name(failed: Path, nb: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, i = failed / f"{nb.stem}.{stamp}.{os.getpid()}{nb.suffix}", 1
    while path.exists():
        path, i = failed / f"{nb.stem}.{stamp}.{os.getpid()}-{i}{nb.suffix}", i + 1
    return path


def execute(nb: Path, out_dir: Path, parameters: dict, profile: str, failed_dir: Path | None = None) -> float:
    """Run one notebook with papermill; returns wall seconds. Atomic on success; a failed
    run is kept in ``failed_dir`` (default :func:`failed_dir_for` ``(profile)``) under a unique name."""
    import papermill

    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / nb.name
    tmp = out_dir / f".{nb.stem}.{os.getpid()}.running.ipynb"
    t0 = time.perf_counter()
    try:
        papermill.execute_notebook(
            str(nb), str(tmp), parameters=parameters, kernel_name="python3",
            cwd=str(nb.parent), progress_bar=False, request_save_on_cell_execute=False,
        )
    except BaseException:
        failed = failed_dir or failed_dir_for(profile)
        failed.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            kept = _failed_name(failed, nb)
            os.replace(tmp, kept)
            print(f"  failed notebook kept at {kept}", file=sys.stderr)
        raise
    relative_paths(tmp, final)
    os.replace(tmp, final)
    return time.perf_counter() - t0


def relative_paths(path: Path, output: Path | None = None) -> None:
    """Rewrite papermill's ``metadata.papermill.input_path`` / ``output_path`` of the notebook
    at ``path`` relative to the repository (``output``: the path to record as the output), so
    no absolute path of the machine that ran it is committed with an executed notebook."""
    import json

    nb = json.loads(Path(path).read_text())
    pm = nb.get("metadata", {}).get("papermill")
    if not pm:
        return

    def rel(p):
        try:
            return Path(p).resolve().relative_to(REPO_ROOT.resolve()).as_posix()
        except ValueError:
            return Path(p).name                          # outside the repository: the file name only
    changed = False
    for key, val in (("input_path", pm.get("input_path")), ("output_path", str(output or pm.get("output_path") or ""))):
        if val and rel(val) != val:
            pm[key], changed = rel(val), True
    if changed:
        Path(path).write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n")


def jupyter_book_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "jupyter-book"
    return [str(exe) if exe.exists() else "jupyter-book"]


def build_book(profile: str, chapter_dir: Path | None = None) -> Path:
    """Build the HTML book with warnings as errors. ``full`` builds the repo root
    into ``_build/html``; other profiles build a staged copy whose chapters are
    the ones in ``chapter_dir`` (committed ones fill any gap, with a notice)."""
    if profile == "full":
        src, out = REPO_ROOT, REPO_ROOT
    else:
        stage = REPO_ROOT / "_build" / profile
        src = stage / "src"
        shutil.rmtree(src, ignore_errors=True)
        src.mkdir(parents=True)
        for name in ("_config.yml", "_toc.yml"):
            shutil.copy2(REPO_ROOT / name, src / name)
        shutil.copytree(REPO_ROOT / "book", src / "book", ignore=shutil.ignore_patterns("chapters"))
        (src / "book" / "chapters").mkdir()
        for nb in sorted(BOOK_CHAPTERS.glob("*.ipynb")):
            mine = (chapter_dir or output_dir_for(profile)) / nb.name
            if not mine.exists():
                print(f"  note: no {profile} run of {nb.stem}; using the committed full-profile chapter")
            shutil.copy2(mine if mine.exists() else nb, src / "book" / "chapters" / nb.name)
        out = stage
    from saelib import scorecard                  # the scorecard page, from the chapters being built

    scorecard.write(src / "book" / "chapters", src / "book" / "scorecard.md", src)
    cmd = jupyter_book_cmd() + ["build", str(src), "--path-output", str(out), "-W", "-n", "--keep-going"]
    print("$", " ".join(str(c) for c in cmd), flush=True)
    subprocess.run(cmd, check=True)
    html = out / "_build" / "html"
    print(f"book built: {html.relative_to(REPO_ROOT)}/index.html")
    return html


def parse_value(text: str, name: str = "VALUE"):
    """A ``-p NAME VALUE`` value parsed as YAML; malformed YAML is a ValueError naming the parameter."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"-p {name} {text!r}: not valid YAML ({str(e).splitlines()[0]}); "
                         "write a mapping like '{lm: {lr: 1.0e-3}}'") from None


def _resolved_overrides(over, resolved):
    """The overrides with the values :func:`load_profile` read (``'1e-3'`` -> 0.001)."""
    if not isinstance(over, dict):
        return over
    return {k: _resolved_overrides(v, resolved[k]) if isinstance(v, dict) else resolved[k] for k, v in over.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m saelib.run", description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="quick", choices=available_profiles())
    ap.add_argument("--only", action="append", metavar="NAME", help="run only this notebook (stem or prefix); repeatable")
    ap.add_argument("--list", action="store_true", help="list the notebooks and their parameters, run nothing")
    ap.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                    help="inject a parameter (VALUE parsed as YAML); repeatable")
    ap.add_argument("--output-dir", type=Path, help="where executed notebooks go (default: by profile)")
    ap.add_argument("--no-build", action="store_true", help="execute notebooks but do not build the book")
    ap.add_argument("--build-only", action="store_true", help="build the book from existing chapters, run nothing")
    args = ap.parse_args(argv)

    notebooks = list_notebooks()
    if args.list:
        for nb in notebooks:
            params = notebook_parameters(nb)
            print(f"{nb.stem}: " + ", ".join(f"{k}={v['default']}" for k, v in params.items()))
        return 0
    out_dir = args.output_dir or output_dir_for(args.profile)
    if args.build_only:
        build_book(args.profile, out_dir)
        return 0
    try:
        chosen = select(notebooks, args.only)
        overrides = {name: parse_value(value, name) for name, value in args.parameter}
        if "profile" in overrides:
            raise ValueError("set the profile with --profile, not -p profile")
        parameters = {"profile": args.profile, **overrides}
        validate(chosen, parameters)
        if "overrides" in overrides:   # keys, types and ranges, before any notebook runs
            resolved = load_profile(args.profile, overrides["overrides"])
            parameters["overrides"] = _resolved_overrides(overrides["overrides"], resolved)
        if out_dir.resolve() == NOTEBOOK_DIR.resolve() and args.profile == "quick" and not overrides:
            parameters = {}  # refreshing the committed quick outputs: keep the notebooks free of an injected cell
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    # executed notebooks are read as documents: no progress-bar widgets in them
    os.environ.setdefault("SAELIB_QUIET", "1")
    times = {}
    for nb in chosen:
        print(f"[{args.profile}] running {nb.name} -> {out_dir.relative_to(REPO_ROOT) if out_dir.is_relative_to(REPO_ROOT) else out_dir}", flush=True)
        times[nb.stem] = execute(nb, out_dir, parameters, args.profile, failed_dir_for(args.profile, args.output_dir))
        print(f"[{args.profile}] {nb.stem}: {times[nb.stem]:.0f} s", flush=True)
    print("\nwall time per notebook:")
    for name, sec in times.items():
        print(f"  {name:<28s} {sec / 60:6.1f} min")
    print(f"  {'total':<28s} {sum(times.values()) / 60:6.1f} min")
    if not args.no_build:
        build_book(args.profile, out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
