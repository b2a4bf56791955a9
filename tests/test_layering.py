"""The package's layers and what importing them costs.

    core/         imports no openprompt / transformers, and nothing from prompt/, clip/, experiments/
    prompt/       never imports experiments/ or the cli
    clip/         imports core/, never prompt/ or openprompt
    experiments/  is never imported by the library (core, prompt, clip, compat, errors, __init__)
    inside prompt/: no import circle; saved_run never imports model

Imports are read with ``ast`` (function-level imports included), relative ones resolved.
"""
import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = "openprompt_retro"
HEAVY = ("torch", "openprompt", "transformers", "faiss")


def module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[: -len(".py")].split(os.sep)
    return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def imported_modules(path: str):
    """Absolute names of every module imported anywhere in the file (``from a import b`` gives a and a.b)."""
    name = module_name(path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)
    return found


def package_files():
    for folder, _, files in os.walk(os.path.join(ROOT, PKG)):
        for f in files:
            if f.endswith(".py"):
                yield os.path.join(folder, f)


def under(mod: str, *prefixes: str) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in prefixes)


def violations(layer_prefixes, forbidden):
    bad = []
    for path in package_files():
        name = module_name(path)
        if under(name, *layer_prefixes):
            bad += [(name, m) for m in sorted(imported_modules(path)) if under(m, *forbidden)]
    return bad


def test_relative_imports_are_resolved():
    mods = imported_modules(os.path.join(ROOT, PKG, "prompt", "model.py"))
    assert {"openprompt_retro.core.loss", "openprompt_retro.prompt.keys", "openprompt"} <= mods
    assert "openprompt_retro.compat" in imported_modules(os.path.join(ROOT, PKG, "prompt", "__init__.py"))


def test_core_is_framework_free():
    assert violations([f"{PKG}.core"], ["openprompt", "transformers", f"{PKG}.prompt", f"{PKG}.clip",
                                        f"{PKG}.experiments", f"{PKG}.cli", f"{PKG}.compat"]) == []


def test_clip_never_imports_the_openprompt_layer():
    assert violations([f"{PKG}.clip"], ["openprompt", f"{PKG}.prompt", f"{PKG}.experiments", f"{PKG}.cli"]) == []


def test_prompt_never_imports_experiments_or_cli():
    assert violations([f"{PKG}.prompt"], [f"{PKG}.experiments", f"{PKG}.cli"]) == []


def test_library_never_imports_experiments_or_cli():
    library = [f"{PKG}.{m}" for m in ("core", "prompt", "clip", "compat", "errors")]
    assert violations(library, [f"{PKG}.experiments", f"{PKG}.cli"]) == []
    top = imported_modules(os.path.join(ROOT, PKG, "__init__.py"))
    assert [m for m in top if under(m, f"{PKG}.experiments", f"{PKG}.cli")] == []


def test_saved_run_never_imports_the_model():
    assert violations([f"{PKG}.prompt.saved_run"], [f"{PKG}.prompt.model"]) == []


def test_no_import_cycle_inside_the_openprompt_layer():
    """Modules of prompt/ (its __init__ aside, which gathers them all) import each other without a circle."""
    folder = os.path.join(ROOT, PKG, "prompt")
    graph = {}
    for f in os.listdir(folder):
        if f.endswith(".py") and f != "__init__.py":
            name = module_name(os.path.join(folder, f))
            graph[name] = {m for m in imported_modules(os.path.join(folder, f))
                           if under(m, f"{PKG}.prompt") and m != f"{PKG}.prompt"}
    done, path = set(), []

    def visit(node):
        if node in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(node):] + [node]))
        if node in done or node not in graph:
            return
        path.append(node)
        for nxt in sorted(graph[node]):
            visit(nxt)
        path.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)
    assert f"{PKG}.prompt.model" in done


# ---------------------------------------------------------------- import cost (fresh interpreters)
def loaded_after(code: str):
    """The heavy modules in sys.modules after running ``code`` in a fresh interpreter (cwd = repo root)."""
    probe = f"{code}\nimport sys\nprint('LOADED=' + ','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    line = [l for l in out.stdout.splitlines() if l.startswith("LOADED=")][-1]
    return [m for m in line[len("LOADED="):].split(",") if m], out.stdout


def test_cli_help_loads_no_heavy_module():
    code = ("import sys, runpy\nsys.argv = ['openprompt-retro', '--help']\n"
            "try:\n    runpy.run_module('openprompt_retro', run_name='__main__')\n"
            "except SystemExit as e:\n    assert e.code in (0, None), e.code")
    loaded, stdout = loaded_after(code)
    assert "usage:" in stdout
    assert loaded == []


def test_top_level_import_is_cheap_and_names_still_resolve():
    assert loaded_after("import openprompt_retro")[0] == []
    loaded, stdout = loaded_after("import openprompt_retro as R\nprint(R.RetroTrainer.__module__)")
    assert "openprompt_retro.prompt.trainer" in stdout and "openprompt" in loaded


def test_clip_adapter_does_not_load_openprompt():
    loaded, _ = loaded_after("import openprompt_retro.clip")
    assert "openprompt" not in loaded and "torch" in loaded
