"""The book's scorecard page, written from the executed chapters' claims tables.

Every chapter that tests a paper glues its claims table (``claims_NN``, built by
:func:`saelib.verdicts.claims_table`) and the same rows as JSON
(``claims_NN_records``, untruncated). :func:`write` reads them from the executed
notebooks and writes ``book/scorecard.md``: first the verdict counts per chapter,
then one table per chapter with one row per claim (section, the claim, the paper's
number, ours, the verdict and the rule with its numbers, wrapped, never truncated),
each row linking to the figure it rests on. The runner calls it before every book
build, so the page always matches the committed chapters.
"""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path

from .verdicts import VERDICTS

RECORD_MIME = "application/papermill.record/text/plain"
HTML_MIME = "application/papermill.record/text/html"


def _glued(nb: dict, name: str) -> dict | None:
    for cell in nb.get("cells", []):
        for out in cell.get("outputs", []):
            meta = out.get("metadata", {}).get("scrapbook", {})
            if meta.get("name") == name:
                return out.get("data", {})
    return None


def claims_from_notebook(path) -> list[dict] | None:
    """The claims rows of an executed chapter (``claims_NN_records`` JSON, else the
    ``claims_NN`` HTML table, whose cells may be truncated), or None when it has none."""
    path = Path(path)
    nb = json.loads(path.read_text())
    tag = path.stem[:2]
    data = _glued(nb, f"claims_{tag}_records")
    if data and RECORD_MIME in data:
        text = ast.literal_eval(data[RECORD_MIME])
        return json.loads(text)
    data = _glued(nb, f"claims_{tag}")
    if not data or HTML_MIME not in data:
        return None
    from bs4 import BeautifulSoup

    table = BeautifulSoup(data[HTML_MIME], "html.parser").find("table")
    head = [th.get_text(strip=True) for th in table.find("thead").find_all("th")][1:]
    rows = []
    for tr in table.find("tbody").find_all("tr"):
        cells = [td.get_text(" ", strip=True) for td in tr.find_all("td")]
        rows.append(dict(zip(head, cells)))
    return rows


def chapter_title(path) -> str:
    """The first level-1 heading of the notebook."""
    nb = json.loads(Path(path).read_text())
    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "markdown":
            m = re.search(r"^#\s+(.+)$", "".join(cell["source"]), re.M)
            if m:
                return m.group(1).strip()
    return Path(path).stem


_ESCAPE = re.compile(r"([\\`*_\[\]<>|$])")


def _text(s) -> str:
    s = " ".join(("" if s is None else str(s)).split())
    if s in ("", "-"):
        return "–"                      # a bare "-" would start a list item in the table cell
    return _ESCAPE.sub(r"\\\1", s)


def _ours(s) -> str:
    parts = [p.strip() for p in str(s or "-").split(",")]
    return ", ".join(f"{{numref}}`{p}`" if re.fullmatch(r"fig-[\w-]+", p) else _text(p) for p in parts)


def render(chapters: list[Path], book_dir: Path) -> str:
    """The scorecard page (MyST markdown) for the executed ``chapters`` (paths inside
    ``book_dir``); chapters without a claims table (the subject model) are skipped."""
    counts, sections = [], []
    for path in chapters:
        rows = claims_from_notebook(path)
        rel = "/" + Path(path).resolve().relative_to(Path(book_dir).resolve()).with_suffix("").as_posix()
        title = chapter_title(path)
        if not rows:
            continue
        n = {v: sum(r.get("verdict") == v for r in rows) for v in VERDICTS}
        counts.append(f"| {{doc}}`{title} <{rel}>` | {len(rows)} | " + " | ".join(str(n[v]) for v in VERDICTS) + " |")
        lines = [f"## {title}", "", f"From {{doc}}`{rel}`; the rule column is the text the chapter's rule function returned.",
                 "", "```{list-table}", ":header-rows: 1", ":widths: 5 27 9 11 9 39", "",
                 "* - §", "  - claim", "  - paper", "  - ours", "  - verdict", "  - rule and numbers"]
        for r in rows:
            ours = _text(r.get("our_value", "-"))
            where = "" if str(r.get("ours") or "-").strip() in ("-", "") else f" ({_ours(r.get('ours'))})"
            lines += [f"* - {_text(r.get('section'))}", f"  - {_text(r.get('claim'))}{where}",
                      f"  - {_text(r.get('paper_value', '-'))}", f"  - {ours}",
                      f"  - **{_text(r.get('verdict'))}**", f"  - {_text(r.get('why'))}"]
        lines += ["```", ""]
        sections.append("\n".join(lines))
    head = ["# Scorecard", "",
            "Each chapter that tests a paper ends with a claims table: the claim (quoted), the paper's number, ours,",
            "a verdict (reproduced / partly / not reproduced / not testable here) and the rule that produced it,",
            "computed by a unit-tested function of `saelib.verdicts` from the chapter's own measurements. This page",
            "is written from the executed chapters (`saelib.scorecard`) each time the book is built.", "",
            "## Verdicts per chapter", "",
            "| chapter | claims | " + " | ".join(VERDICTS) + " |", "|---|---|" + "---|" * len(VERDICTS)]
    head += counts or ["| (none yet) | 0 |" + " |" * len(VERDICTS)]
    return "\n".join(head + [""] + sections) + "\n"


def write(chapter_dir: Path, out: Path, book_dir: Path) -> Path:
    """Render the scorecard for every executed ``NN_*.ipynb`` in ``chapter_dir`` and
    write it to ``out`` (only when the text changed)."""
    chapters = sorted(p for p in Path(chapter_dir).glob("[0-9][0-9]_*.ipynb"))
    text = render(chapters, book_dir)
    out = Path(out)
    if not out.exists() or out.read_text() != text:
        out.write_text(text)
    return out
