import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(f for f in os.listdir(os.path.join(ROOT, "examples")) if f[:2].isdigit() and f.endswith(".py"))
DATA = os.path.join(ROOT, "..", "shared", "data", "text")


@pytest.mark.skipif(not os.path.isdir(os.path.join(DATA, "k-shot")), reason="../shared data not present")
@pytest.mark.parametrize("script", EXAMPLES)
def test_example_runs_on_tiny_model(script):
    extra = {"03_knn_guided_training.py": ["--epochs", "1"], "04_knn_inference.py": ["--limit", "40"],
             "05_retroprompt_fewshot.py": ["--epochs", "1", "--limit", "40"]}.get(script, [])
    out = subprocess.run([sys.executable, os.path.join("examples", script), "--model", "tiny-bert",
                          "--data-root", DATA, *extra], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip()
