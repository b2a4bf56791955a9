"""Executes the example notebook top to bottom in a real Jupyter kernel (nbclient), headless, on the tiny model:
every cell runs, the lambda-sweep figure is shown, and its curve is the model's own mixture."""
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "examples", "retroprompt_quickstart.ipynb")
DATA = os.path.join(ROOT, "..", "shared", "data", "text")

#: run in the same kernel after the notebook: what a reader of its outputs relies on
CHECKS = """
assert len(model.knn_store) == 32 + 3, len(model.knn_store)  # the 3 added examples are in the store
chosen = int(round(model.effective_lambda * 10))
own = (model.predict_proba(data["dev"]).argmax(1) == labels).mean()  # the model as it predicts now
assert abs(acc[chosen] - own) < 1e-9, (acc, own)  # the curve is the model's own mixture
print("CHECKS-OK", len(acc))
"""


@pytest.mark.skipif(not os.path.isdir(os.path.join(DATA, "k-shot")), reason="../shared data not present")
def test_notebook_runs_top_to_bottom_in_a_kernel(monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(CHECKS))
    monkeypatch.setenv("OPENPROMPT_RETRO_MODEL", "tiny-bert")
    monkeypatch.setenv("OPENPROMPT_RETRO_DATA", DATA)
    monkeypatch.setenv("NOTEBOOK_EPOCHS", "1")
    monkeypatch.setenv("NOTEBOOK_TEST_LIMIT", "40")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's own (inline) backend, as in Jupyter
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": os.path.join(ROOT, "examples")}}).execute()
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    sweep = code[-2]
    assert "knn_distribution(queries)" in sweep.source
    assert [o for o in sweep.outputs if o.output_type == "display_data" and "image/png" in o.data]  # shown
    assert "CHECKS-OK 11" in "".join(o.get("text", "") for o in code[-1].outputs)
