"""Five one-line mutants of the retrieval rooms, each applied to a copy of the package and run against the tests
of its own room only: each must be killed there (not only by the tutorial loops).

    python tests/mutants.py        # from the repository root, in the venv; about a minute

Prints KILLED or SURVIVED per mutant and exits 1 if one survives.
"""
import os
import shutil
import subprocess
import sys
import tempfile

SRC = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MUT = [
 ("key cache keyed by text_a only", "openprompt_retro/prompt/store_lifecycle.py",
  [("todo = list(dict.fromkeys(p for p in pairs if p not in self._key_cache))",
    "todo = list(dict.fromkeys(p for p in pairs if p[0] not in self._key_cache))"),
   ("self._key_cache.update(zip(todo, keys))", "self._key_cache.update(zip([a for a, _ in todo], keys))"),
   ("return np.stack([self._key_cache[p] for p in pairs])", "return np.stack([self._key_cache[p[0]] for p in pairs])")],
  ["tests/test_store_lifecycle.py", "tests/test_adapted_keys.py"]),
 ("saved key store's built_by unchecked", "openprompt_retro/prompt/saved_run.py",
  [("expected_built_by=expected, files=files)", "expected_built_by=None, files=files)")],
  ["tests/test_saved_run.py"]),
 ("no rebuild before inference", "openprompt_retro/prompt/store_lifecycle.py",
  [("                rebuild = rebuild or self.stale\n", "                rebuild = rebuild\n")],
  ["tests/test_store_lifecycle.py"]),
 ("no self-exclusion for demonstrations drawn by the key encoder", "openprompt_retro/prompt/retrieval.py",
  [("demos = neural_demonstrations(lifecycle.key_store, key_query, host.config.demo_topk, exclude,",
    "demos = neural_demonstrations(lifecycle.key_store, key_query, host.config.demo_topk, None,")],
  ["tests/test_retrieval.py"]),
 ("state_dict fingerprint unchecked", "openprompt_retro/prompt/model.py",
  [("            if saved != self.key_encoder.fingerprint():", "            if False:")],
  ["tests/test_store_lifecycle.py"]),
]
survived = 0
for name, path, edits, tests in MUT:
    d = os.path.join(tempfile.mkdtemp(prefix="mutant-"), "tree")
    shutil.copytree(SRC, d, ignore=shutil.ignore_patterns(".venv", ".git", "benchmarks", "__pycache__", "site"))
    p = os.path.join(d, path)
    with open(p, encoding="utf-8") as f:
        t = f.read()
    for a, b in edits:
        assert t.count(a) == 1, (name, a)
        t = t.replace(a, b)
    with open(p, "w", encoding="utf-8") as f:
        f.write(t)
    # python -m pytest puts the copy first on sys.path: its (mutated) package is the one imported
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                       cwd=d, capture_output=True, text=True)
    last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-300:]
    print(f"{'KILLED' if r.returncode else 'SURVIVED'}: {name} ({' '.join(tests)}): {last}", flush=True)
    survived += r.returncode == 0
    shutil.rmtree(os.path.dirname(d), ignore_errors=True)
sys.exit(1 if survived else 0)
