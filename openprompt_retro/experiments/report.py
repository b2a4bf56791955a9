"""Results file -> markdown table (mean ± std over seeds), CSVs and a plot."""
from __future__ import annotations

import csv
import os
import warnings
from collections import defaultdict
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..errors import UserError
from .methods import ALL_METHODS, BENCH_TASKS, TRAINED_METHODS
from .results import dedupe, read_rows, row_shots, run_key


def read_results(path: str) -> List[Dict]:
    """The runs of a results file, one row each; a row without a numeric test accuracy is skipped with a
    warning naming file and run."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no results file at {path!r}")
    rows = []
    for r in dedupe(read_rows(path), where=path):
        if isinstance(r.get("test_accuracy"), (int, float)) and not isinstance(r["test_accuracy"], bool):
            rows.append(r)
        else:
            warnings.warn(f"{path}: skipped run {tuple(run_key(r))[:4]}, which has no test_accuracy", stacklevel=2)
    if not rows:
        raise UserError(f"{path!r} holds no results")
    return rows


def split_variants(rows: List[Dict], where: str = "results") -> List[Dict]:
    """Rows of one method run with different models or settings are kept apart: each such row's ``method`` gets
    the variant in brackets ("retro [settings 3f0415c95a2e]", "prompt [model tiny-bert]"), with a warning, so
    no table cell, paired difference or bar averages different runs together."""
    variants = defaultdict(set)
    for r in rows:
        variants[r["method"]].add((r.get("model"), str(run_key(r).settings_id)))
    mixed = {m: v for m, v in variants.items() if len(v) > 1}
    if not mixed:
        return rows
    out = []
    for r in rows:
        v = mixed.get(r["method"])
        if v is None:
            out.append(r)
            continue
        parts = []
        if len({model for model, _ in v}) > 1:
            parts.append(f"model {os.path.basename(str(r.get('model')).rstrip('/')) or r.get('model')}")
        if len({sid for _, sid in v}) > 1:
            parts.append(f"settings {run_key(r).settings_id}")
        out.append(dict(r, method=f"{r['method']} [{', '.join(parts)}]"))
    warnings.warn(f"{where}: " + "; ".join(f"{m} ran with {len(v)} different models or settings" for m, v in
                                          sorted(mixed.items()))
                  + ": their rows are shown apart, as '<method> [model ...]' / '<method> [settings <id>]'",
                  stacklevel=2)
    return out


def _row_name(r: Dict, several_k: bool) -> str:
    return f"{r['method']} (K={row_shots(r)})" if several_k else r["method"]


def summarize(rows: List[Dict]) -> Dict:
    """{(method, task): (mean, std, n_seeds)} of test accuracy in %, std over seeds (ddof=0).

    When the results hold several K, methods are split by K ("retro (K=4)")."""
    several_k = len({row_shots(r) for r in rows}) > 1
    acc = defaultdict(list)
    for r in rows:
        acc[(_row_name(r, several_k), r["task"])].append(100.0 * r["test_accuracy"])
    return {key: (float(np.mean(v)), float(np.std(v)), len(v)) for key, v in acc.items()}


def _ordered(values, preferred):
    return [v for v in preferred if v in values] + sorted(v for v in values if v not in preferred)


def markdown_table(rows: List[Dict]) -> str:
    s = summarize(rows)
    tasks = _ordered({t for _, t in s}, BENCH_TASKS)
    methods = _ordered({m for m, _ in s}, ALL_METHODS)
    if len({row_shots(r) for r in rows}) > 1:
        methods = sorted({m for m, _ in s}, key=lambda m: (m.split(" (K=")[0], int(m.split("K=")[1].rstrip(")"))))
    head = "| method | " + " | ".join(tasks) + " | avg |"
    lines = [head, "|" + "---|" * (len(tasks) + 2)]
    for m in methods:
        cells, means, stds = [], [], []
        for t in tasks:
            if (m, t) in s:
                mean, std, n = s[(m, t)]
                cells.append(f"{mean:.1f} ± {std:.1f}" + ("" if n == max(x[2] for x in s.values()) else f" (n={n})"))
                means.append(mean)
                stds.append(std)
            else:
                cells.append("-")
        avg = f"{np.mean(means):.1f} (std {np.mean(stds):.1f})" if len(means) == len(tasks) else "-"
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {avg} |")
    seeds = sorted({r["seed"] for r in rows})
    lines.append("")
    lines.append(f"Test accuracy (%), mean ± std over seeds {seeds} (population std, ddof = 0); "
                 "avg = mean over tasks (std = mean of the per-task stds).")
    return "\n".join(lines) + "\n"


def diagnostics_table(rows: List[Dict]) -> str:
    """The retrieval diagnostics of the runs that use a store, averaged per method (empty when none has them).

    Test accuracy with lambda tuned on dev, with the PLM alone (lambda = 0), the fixed mixture (lambda 0.5,
    k 16, T 1) and the store alone (lambda 1), all of the same trained weights; how often the store's and the
    PLM's predictions agree; how often dev chose lambda > 0; the change in test
    accuracy when each example's neural demonstrations are permuted across classes or removed; and the
    store's leave-one-out kNN accuracy and the mean kNN loss weight at the first and last evaluation."""
    groups = defaultdict(list)
    for r in rows:
        d = r.get("diagnostics") or {}
        if d.get("test_accuracy_by_inference") or d.get("demonstration_reliance"):
            groups[r["method"]].append(r)
    if not groups:
        return ""

    def avg(values, scale=100.0, signed=False, unit=""):
        values = [v for v in values if v is not None]
        if not values:
            return "-"
        value = scale * float(np.mean(values))
        return (f"{value:+.1f}" if signed else (f"{value:.1f}" if scale == 100.0 else f"{value:.2f}")) + unit

    lines = ["| method | runs | test: tuned | lambda 0 | lambda 0.5 | lambda 1 | kNN = PLM | lambda > 0 chosen "
             "| d_c permuted | d_c removed | store LOO first / last | loss weight first / last |", "|" + "---|" * 12]
    for m in _ordered(set(groups), ALL_METHODS):
        g = groups[m]
        d = [r.get("diagnostics") or {} for r in g]
        inf = [x.get("test_accuracy_by_inference") or {} for x in d]
        rel = [x.get("demonstration_reliance") or {} for x in d]
        evs = [x.get("evaluations") or [{}] for x in d]
        lines.append(
            f"| {m} | {len(g)} | {avg([r['test_accuracy'] for r in g])} | {avg([i.get('plm_only') for i in inf])} | "
            f"{avg([i.get('fixed') for i in inf])} | {avg([i.get('knn_only') for i in inf])} | "
            f"{avg([i.get('knn_plm_agreement') for i in inf], unit='%')} | "
            f"{avg([float(r.get('knn_lambda') or 0) > 0 for r in g], unit='%')} | "
            f"{avg([x.get('permuted_change') for x in rel], signed=True)} | "
            f"{avg([x.get('removed_change') for x in rel], signed=True)} | "
            f"{avg([e[0].get('store_loo_accuracy') for e in evs])} / "
            f"{avg([e[-1].get('store_loo_accuracy') for e in evs])} | "
            f"{avg([e[0].get('loss_weight_mean') for e in evs], 1)} / {avg([e[-1].get('loss_weight_mean') for e in evs], 1)} |")
    lines += ["", "Accuracies in %, changes in points, means over the runs; LOO = the store's leave-one-out kNN "
              "accuracy on its training keys."]
    return "\n".join(lines) + "\n"


def sign_flip_p(diffs: Sequence[float], draws: int = 20000) -> float:
    """Two-sided p-value of a paired sign-flip test: how often a random sign on each difference gives a mean at
    least as far from 0 as the observed one. Exact (all 2^n signs) for n <= 16, else ``draws`` seeded draws,
    counted as (hits + 1) / (draws + 1) so that a sampled p is never 0 (the observed signs are one pattern)."""
    d = np.asarray(diffs, dtype=float)
    n = len(d)
    if n == 0:
        raise ValueError("no paired differences")
    exact = n <= 16
    if exact:
        signs = 1 - 2 * ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1)  # every sign pattern
    else:
        signs = np.random.default_rng(0).choice([-1, 1], size=(draws, n))
    hits = int(np.sum(np.abs((signs * d).mean(axis=1)) >= abs(d.mean()) - 1e-12))
    return hits / len(signs) if exact else (hits + 1) / (draws + 1)


def _format_p(p: float) -> str:
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def paired_table(rows: List[Dict], reference: str = "retro") -> str:
    """``reference`` against every other method on the splits (task, K, seed) both ran: the mean and std of the
    per-split differences in test accuracy (points), wins / ties / losses, and the sign-flip p-value; "" when
    no other method ran any of the reference's splits."""
    runs = {(r["task"], row_shots(r), r["seed"], r["method"]): 100.0 * r["test_accuracy"] for r in rows}
    splits = {(t, k, s) for t, k, s, m in runs if m == reference}
    if not splits:
        return ""
    lines = []
    for m in _ordered({key[3] for key in runs} - {reference}, ALL_METHODS):
        d = np.array([runs[(*sp, reference)] - runs[(*sp, m)] for sp in sorted(splits) if (*sp, m) in runs])
        if len(d) == 0:
            continue
        wins, ties = int((d > 1e-9).sum()), int((np.abs(d) <= 1e-9).sum())
        lines.append(f"| {m} | {len(d)} | {d.mean():+.2f} | {d.std():.2f} | {wins} / {ties} / {len(d) - wins - ties} "
                     f"| {_format_p(sign_flip_p(d))} |")
    if not lines:  # no other method ran any of the reference's splits
        return ""
    lines = [f"| {reference} - method | splits | mean difference | std | wins / ties / losses | p (sign flip) |",
             "|" + "---|" * 6] + lines
    lines += ["", f"Per split (task, seed): {reference}'s test accuracy minus the method's, in points; p: the chance "
              "that random signs on these differences give a mean at least this far from 0."]
    return "\n".join(lines) + "\n"


def plot(rows: List[Dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summarize(rows)
    tasks = _ordered({t for _, t in s}, BENCH_TASKS)
    methods = _ordered({m for m, _ in s}, TRAINED_METHODS)
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(tasks)), 4))
    x = np.arange(len(tasks))
    for i, m in enumerate(methods):
        means = [s.get((m, t), (np.nan, 0, 0))[0] for t in tasks]
        stds = [s.get((m, t), (0, 0, 0))[1] for t in tasks]
        ax.bar(x + (i - (len(methods) - 1) / 2) * width, means, width, yerr=stds, capsize=2, label=m)
    ax.set_xticks(x)
    ax.set_xticklabels(tasks)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=7, ncol=min(3, len(methods)))
    ax.set_title("Few-shot accuracy, mean ± std over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def dev_selected(rows: List[Dict], candidates: Sequence[str]) -> List[Dict]:
    """One more method, ``dev-select(a, b, ...)``: per (task, K, seed) the candidate run with the best dev accuracy.

    Ties go to the candidate listed first. Only (task, K, seed) where every candidate ran are kept, and
    test accuracy is never looked at for the choice.
    """
    runs = {(r["task"], row_shots(r), r["seed"], r["method"]): r for r in rows}
    out = []
    for task, k, seed in sorted({(r["task"], row_shots(r), r["seed"]) for r in rows}, key=str):
        group = [runs.get((task, k, seed, m)) for m in candidates]
        if any(g is None or g.get("dev_accuracy") is None for g in group):
            continue
        best = max(range(len(group)), key=lambda i: (group[i]["dev_accuracy"], -i))
        out.append(dict(group[best], method=f"dev-select({', '.join(candidates)})", selected=candidates[best]))
    return out


def write_report(results_path: str, out_dir: str, seeds: Optional[Sequence[int]] = None,
                 dev_select: Optional[Sequence[str]] = None, reference: Optional[str] = None) -> None:
    """table.md, summary.csv and accuracy.png over ``seeds`` (default: all); results.csv lists every run.

    ``dev_select`` adds the method that picks, per split, whichever of these methods did best on dev;
    ``reference``: the method the paired differences are taken from (default: retro, where it ran)."""
    all_rows = read_results(results_path)
    rows = split_variants([r for r in all_rows if seeds is None or r["seed"] in set(seeds)], where=results_path)
    if not rows:
        raise UserError(f"{results_path!r} holds no results for seeds {list(seeds)}")
    if dev_select:
        missing = [m for m in dev_select if m not in {r["method"] for r in rows}]
        if missing:
            raise UserError(f"--dev-select: no runs of {missing} in {results_path!r}")
        rows = rows + dev_selected(rows, dev_select)
    if reference is not None and reference not in {r["method"] for r in rows}:
        raise UserError(f"--reference: no runs of {reference!r} in {results_path!r}")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UserError(f"--out {out_dir}: it is a file, not a folder (the report writes table.md, results.csv, "
                        "summary.csv and accuracy.png there)")
    table = markdown_table(rows)
    diagnostics = diagnostics_table([r for r in rows if not r["method"].startswith("dev-select")])
    if diagnostics:
        table += "\nRetrieval diagnostics (from each run's record):\n\n" + diagnostics
    paired = paired_table(rows, reference or "retro")
    if paired:
        table += "\nPaired differences (the same splits):\n\n" + paired
    keys = ["task", "method", "shots", "seed", "test_accuracy", "dev_accuracy", "n_test", "epochs_run",
            "train_seconds", "test_seconds", "knn_lambda", "knn_k", "knn_temperature", "model", "settings_id"]

    def results_csv(f):
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(all_rows)

    def summary_csv(f):
        w = csv.writer(f)
        w.writerow(["method", "task", "mean_accuracy", "std_accuracy", "n_seeds"])
        for (m, t), (mean, std, n) in sorted(summarize(rows).items()):
            w.writerow([m, t, round(mean, 3), round(std, 3), n])

    try:
        os.makedirs(out_dir, exist_ok=True)
        write_atomic(os.path.join(out_dir, "table.md"), lambda f: f.write(table))
        write_atomic(os.path.join(out_dir, "results.csv"), results_csv)
        write_atomic(os.path.join(out_dir, "summary.csv"), summary_csv)
        write_atomic(os.path.join(out_dir, "accuracy.png"), lambda path: plot(rows, path), by_path=True)
    except OSError as e:
        raise UserError(f"cannot write the report files in {out_dir} ({e.strerror or e}); files already there "
                        "are as they were") from None


def write_atomic(path: str, write, by_path: bool = False) -> None:
    """Write ``path`` by ``write`` (given an open text file, or with ``by_path`` a file name) into a new file
    beside it, then rename that over ``path``: a link planted at ``path`` is replaced, never followed (its
    target is untouched), and a failed write leaves the old file whole."""
    import tempfile

    folder, name = os.path.split(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)  # O_EXCL: never an existing path
    try:
        if by_path:
            os.close(fd)
            write(tmp)
        else:
            with os.fdopen(fd, "w", newline="", encoding="utf-8") as f:
                write(f)
        os.chmod(tmp, 0o644 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def run_report(ns) -> None:
    """``openprompt-retro report``: write the table, CSVs and plot, and print the table."""
    out = ns.out or os.path.dirname(ns.results) or "."
    write_report(ns.results, out, seeds=ns.seeds, dev_select=ns.dev_select, reference=ns.reference)
    with open(os.path.join(out, "table.md")) as f:
        print(f.read())
