"""The scorecard page is written from the chapters' glued claims records, untruncated."""
import json

import pandas as pd

from saelib import scorecard, verdicts as V


def _notebook(path, claims: pd.DataFrame):
    out = {"output_type": "display_data", "metadata": {"scrapbook": {"name": f"claims_{path.stem[:2]}_records"}},
           "data": {scorecard.RECORD_MIME: repr(claims.to_json(orient="records"))}}
    nb = {"cells": [{"cell_type": "markdown", "metadata": {}, "source": ["# Switch SAEs\n"]},
                    {"cell_type": "code", "metadata": {}, "outputs": [out], "source": []}], "metadata": {},
          "nbformat": 4, "nbformat_minor": 5}
    path.write_text(json.dumps(nb))


def test_counts_rows_links_and_no_truncation(tmp_path):
    long_why = "holds in 3/8 = 38% of comparisons; " + "x" * 300 + " rule: all -> reproduced"
    claims = V.claims_table([
        {"section": "4.1", "claim": "[Switch SAEs] use *fewer* FLOPs", "paper": "fig. 1", "ours": "fig-01-scaling, FLOPs table",
         "paper_value": "~10x", "our_value": "2.1x", "verdict": V.Verdict("partly", long_why)},
        {"section": "5", "claim": "GPUs", "verdict": V.not_testable("CPU only")}])
    chapters = tmp_path / "book" / "chapters"
    chapters.mkdir(parents=True)
    _notebook(chapters / "01_switch_sae.ipynb", claims)
    (chapters / "00_subject_model.ipynb").write_text(json.dumps({"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    out = scorecard.write(chapters, tmp_path / "book" / "scorecard.md", tmp_path)
    text = out.read_text()
    assert "| {doc}`Switch SAEs </book/chapters/01_switch_sae>` | 2 | 0 | 1 | 0 | 1 |" in text
    assert "x" * 300 in text and "..." not in text                      # the whole rule, not a truncated cell
    assert "\\[Switch SAEs\\] use \\*fewer\\* FLOPs ({numref}`fig-01-scaling`, FLOPs table)" in text
    assert "~10x" in text and "2.1x" in text and "**not testable here**" in text
    assert "  - –" in text and "\n  - -\n" not in text               # "-" would render as a list bullet
    assert "00_subject_model" not in text                              # chapters without claims are skipped
    assert scorecard.claims_from_notebook(chapters / "01_switch_sae.ipynb")[0]["why"] == long_why
