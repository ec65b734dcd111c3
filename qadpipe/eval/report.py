"""Turn evaluation results into what people read: ``report.json``, ``report.md`` and plots.

Pure rendering: the numbers come from :mod:`qadpipe.eval.runner`; this module only lays
them out, so a report can be re-rendered from its ``report.json`` without re-running a model.
The markdown table puts each student's KL next to the PTQ baseline's, because "how much of
what PTQ lost did QAD recover" is the one question every QAD report answers.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from qadpipe.provenance import atomic_write_bytes, atomic_write_text, finite_or_none

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
KL_PLOT = "kl_by_model.png"
CURVES_PLOT = "training_curves.png"

#: Columns of the table, in order: (metric key, header, format).
_COLUMNS = (
    ("kl", "KL(teacher‖model) nats/tok", "{:.4f}"),
    ("top1_agreement", "top-1 agreement", "{:.3f}"),
    ("ppl", "ppl", "{:.2f}"),
    ("tail_kl", "tail-bucket KL vs cache", "{:.4f}"),
)


def kl_ratio(results: Mapping[str, Mapping[str, float]], name: str, baseline: str = "ptq") -> float | None:
    """``KL(name) / KL(baseline)``: below 1 means ``name`` recovered part of what the baseline lost."""
    base = results.get(baseline, {}).get("kl")
    value = results.get(name, {}).get("kl")
    if base is None or value is None or base <= 0:
        return None
    return value / base


def render_table(results: Mapping[str, Mapping[str, float]], baseline: str = "ptq") -> str:
    """A markdown table, one row per model, with a 'KL vs PTQ' column when PTQ was scored."""
    columns = [c for c in _COLUMNS if any(c[0] in m for m in results.values())]
    with_ratio = baseline in results and "kl" in results[baseline]
    header = ["model", *(c[1] for c in columns)] + ([f"KL / KL({baseline})"] if with_ratio else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, metrics in results.items():
        cells = [name]
        for key, _, fmt in columns:
            value = metrics.get(key)
            cells.append("–" if value is None else fmt.format(value))   # a broken model's NaN shows as nan
        if with_ratio:
            ratio = kl_ratio(results, name, baseline) if name != "teacher" else None
            cells.append("–" if ratio is None else f"{ratio:.2f}×")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(out_dir: Path, results: Mapping[str, Mapping[str, float]], *,
                 context: Mapping[str, Any], metrics_files: Mapping[str, Path] = {}) -> dict[str, Path]:
    """Write report.json, report.md and the plots into ``out_dir``; return their paths.

    ``context`` says what was measured (data, positions, teacher) and goes into both files;
    ``metrics_files`` maps a run name to its training ``metrics.jsonl`` for the curve plot.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / REPORT_JSON, "md": out_dir / REPORT_MD}
    # NaN is not JSON (jq and strict parsers refuse the file): a broken model's figures are null
    finite = {name: {key: finite_or_none(value) for key, value in metrics.items()} for name, metrics in results.items()}
    report = {"context": dict(context), "results": finite}
    atomic_write_text(paths["json"], json.dumps(report, indent=2, allow_nan=False) + "\n")
    lines = ["# qadpipe eval", ""]
    lines += [f"- {key}: {value}" for key, value in context.items()]
    lines += ["", render_table(results)]
    atomic_write_text(paths["md"], "\n".join(lines))
    paths["kl_plot"] = plot_kl_bars(results, out_dir / KL_PLOT)
    curves = {name: read_metrics(path) for name, path in metrics_files.items() if Path(path).is_file()}
    if any(curves.values()):
        paths["curves_plot"] = plot_training_curves(curves, out_dir / CURVES_PLOT)
    return paths


def _save_figure(fig: Any, path: Path) -> Path:
    """PNG bytes written whole (temp file, fsync, rename), as every other report file."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Rows of a metrics JSONL file; a torn last line (a killed writer) is skipped."""
    rows = []
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on cluster nodes
    import matplotlib.pyplot as plt

    return plt


def plot_kl_bars(results: Mapping[str, Mapping[str, float]], path: Path) -> Path:
    """One bar per model: KL(teacher‖model) — the gap QAD closes, at a glance."""
    plt = _pyplot()
    names = [n for n, m in results.items() if n != "teacher" and "kl" in m]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(names) + 2), 3.2))
    bars = ax.bar(names, [results[n]["kl"] for n in names], color="#4c72b0")
    ax.bar_label(bars, fmt="%.4f", fontsize=8)
    ax.set_ylabel("KL(teacher ‖ model), nats/token")
    ax.set_title("Distance to the teacher (lower is better)")
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)
    return path


def plot_training_curves(curves: Mapping[str, Sequence[Mapping[str, Any]]], path: Path) -> Path:
    """Training loss and held-out KL against the optimizer step, one line per run."""
    plt = _pyplot()
    fig, (ax_loss, ax_eval) = plt.subplots(1, 2, figsize=(9, 3.2))
    for name, rows in curves.items():
        train = [r for r in rows if "loss" in r and "step" in r]
        held = [r for r in rows if "eval_kl" in r and "step" in r]
        if train:
            ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label=name)
        if held:
            ax_eval.plot([r["step"] for r in held], [r["eval_kl"] for r in held], marker="o", label=name)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss")
    ax_eval.set_xlabel("step")
    ax_eval.set_ylabel("distill's held-out KL vs its targets\n(nats/token; top-k cache: tail-bucket)", fontsize=8)
    for ax in (ax_loss, ax_eval):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    _save_figure(fig, path)
    plt.close(fig)
    return path
