import math
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = sorted(f for f in os.listdir(os.path.join(ROOT, "examples")) if f[:2].isdigit() and f.endswith(".py"))
DATA = os.path.join(ROOT, "..", "shared", "data", "text")
NUM = r"(-?\d+(?:\.\d+)?)"


def check_knowledge_store(out):
    m = re.search(r"KnowledgeStore\(entries=(\d+), dim=\d+, num_classes=2", out)
    assert m and int(m.group(1)) == 32  # SST-2, 16 per class
    rows = re.findall(rf"\[\s*{NUM}\s+{NUM}\]", out.split("p_kNN of the first 3 entries")[1])
    assert len(rows) == 3 and all(abs(float(a) + float(b) - 1) <= 2e-3 for a, b in rows)
    for block in out.split("\n\n")[1:4]:  # each entry's neighbours, best first
        scores = [float(s) for s in re.findall(rf"^\s+{NUM}\s+label", block, re.M)]
        assert len(scores) == 3 and scores == sorted(scores, reverse=True)
    assert "identical search results" in out


def check_demonstrations(out):
    neural, text = out.split("[text]")
    assert "[UNK] terrible [UNK] great [SEP]" in neural  # a slot before each class's label word
    assert re.search(r"demonstrations \(4, 2, \d+\) \(B, C, D\)", neural)
    assert "it was terrible." in text and "it was great." in text and text.count("[MASK]") == 1


def check_knn_guided_training(out):
    pairs = [(float(w), float(p)) for w, p in re.findall(rf"w={NUM}\s+p_kNN\(gold\)={NUM}", out)]
    assert len(pairs) == 5 and [w for w, _ in pairs] == sorted((w for w, _ in pairs), reverse=True)
    cap = float(re.search(rf"capped at {NUM}", out).group(1))
    gate_on = "the gate is on" in out
    for w, p in pairs:  # w = min(1 + beta * (-log p), cap), beta = 1, while the gate is on: what training uses
        expected = min(1 - math.log(max(p, 1e-12)), cap) if gate_on else 1.0
        assert 1 <= w <= cap and (p < 0.005 or w == pytest.approx(expected, abs=0.12))
    table = re.findall(rf"^\s+(\d+)\s+{NUM}\s+{NUM}$", out.split("dev accuracy")[1], re.M)
    assert [int(e) for e, _, _ in table] == [0]  # --epochs 1
    assert all(math.isfinite(float(loss)) and 0 <= float(acc) <= 1 for _, loss, acc in table)


def check_knn_inference(out):
    rows = re.findall(rf"^\s+{NUM}\s+{NUM}$", out, re.M)
    assert [float(lam) for lam, _ in rows] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert all(round(float(acc) * 40, 6) == int(round(float(acc) * 40)) for _, acc in rows)  # --limit 40


def check_fewshot(out):
    accs = dict(re.findall(rf"^(prompt|retro)\s+test accuracy {NUM}", out, re.M))
    assert set(accs) == {"prompt", "retro"} and all(0 <= float(a) <= 1 for a in accs.values())
    assert re.search(r"retro .*tuned: \{'dev_accuracy': [\d.]+, 'knn_lambda': [\d.]+, 'knn_k': \d+", out)
    weights = [float(w) for w in re.findall(rf"label [01] weight {NUM}", out)]
    assert len(weights) == 3 and weights == sorted(weights, reverse=True)
    assert sum(weights) <= 1.0 + 1e-2  # weights of the k neighbours behind p_kNN: the shown ones sum to <= 1


CHECKS = {"01_knowledge_store.py": check_knowledge_store, "02_neural_demonstrations.py": check_demonstrations,
          "03_knn_guided_training.py": check_knn_guided_training, "04_knn_inference.py": check_knn_inference,
          "05_retroprompt_fewshot.py": check_fewshot}


def test_every_example_is_checked():
    assert sorted(CHECKS) == EXAMPLES


@pytest.mark.skipif(not os.path.isdir(os.path.join(DATA, "k-shot")), reason="../shared data not present")
@pytest.mark.parametrize("script", EXAMPLES)
def test_example_runs_on_tiny_model(script):
    extra = {"03_knn_guided_training.py": ["--epochs", "1"], "04_knn_inference.py": ["--limit", "40"],
             "05_retroprompt_fewshot.py": ["--epochs", "1", "--limit", "40"]}.get(script, [])
    out = subprocess.run([sys.executable, os.path.join("examples", script), "--model", "tiny-bert",
                          "--data-root", DATA, *extra], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    CHECKS[script](out.stdout)


@pytest.mark.skipif(not os.path.isdir(os.path.join(DATA, "k-shot")), reason="../shared data not present")
def test_a_limit_takes_a_class_stratified_sample():
    """mr's test file is sorted by class: before, --limit 40 scored 40 examples of class 0."""
    out = subprocess.run([sys.executable, os.path.join("examples", "04_knn_inference.py"), "--model", "tiny-bert",
                          "--data-root", DATA, "--task", "mr", "--limit", "40"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert re.search(r"^test: 40 of \d+ examples, per class \{'0': 20, '1': 20\}$", out.stdout, re.M), out.stdout
