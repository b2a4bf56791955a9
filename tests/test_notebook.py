"""Runs the example notebook top to bottom, headless, on the tiny model."""
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "examples", "retroprompt_quickstart.ipynb")
DATA = os.path.join(ROOT, "..", "shared", "data", "text")


@pytest.mark.skipif(not os.path.isdir(os.path.join(DATA, "k-shot")), reason="../shared data not present")
def test_notebook_runs_top_to_bottom(monkeypatch):
    with open(NOTEBOOK) as f:
        nb = json.load(f)
    monkeypatch.chdir(os.path.join(ROOT, "examples"))
    monkeypatch.setenv("OPENPROMPT_RETRO_MODEL", "tiny-bert")
    monkeypatch.setenv("OPENPROMPT_RETRO_DATA", DATA)
    monkeypatch.setenv("NOTEBOOK_EPOCHS", "1")
    monkeypatch.setenv("NOTEBOOK_TEST_LIMIT", "40")
    namespace = {"__name__": "__main__"}
    code_cells = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert code_cells
    for i, cell in enumerate(code_cells):
        exec(compile("".join(cell["source"]), f"cell {i}", "exec"), namespace)
    assert namespace["trainer"].tuned["knn_lambda"] is not None
    assert len(namespace["model"].store) == 32 + 3  # the 3 added examples are in the store
    assert len(namespace["acc"]) == 11
