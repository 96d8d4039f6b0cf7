"""The benchmark's report: a markdown table per dataset (final checkpoints, floors, step-time ratios), quality vs NFE,
quality vs training time, and every method's samples side by side on the same noise."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

from ..plots import save_panels

REFERENCE_METHOD = "flow_matching"  # speed is reported as a ratio to its training step


def _arrow(better: str) -> str:
    return {"lower": "↓", "higher": "↑"}.get(better, "≈ floor")


def _step_ms(row: Dict[str, Any]) -> float:
    return 1000.0 * row["train_seconds"] / max(1, row["train_step"])


def dataset_table(dataset: str, info: Dict[str, Any], rows: List[Dict[str, Any]]) -> str:
    final = [r for r in rows if r["final"]]
    columns = [c for c in info["columns"] if c[0] in final[0]["metrics"]]
    reference = [r for r in final if r["method"] == REFERENCE_METHOD]
    ref_ms = _step_ms(reference[0]) if reference else None
    head = ["method", "steps", "NFE"] + [f"{h} ({_arrow(b)})" for _, h, b in columns]
    head += [f"step time (× {REFERENCE_METHOD})"]  # a ratio from one run: absolute times say more of the machine
    lines = [f"### {dataset} ({info['kind']}, {info['n_eval']} samples, EMA weights, same noise for every row)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in final:
        values = [f"{r['metrics'][k]:.3f}" for k, _, _ in columns]
        ratio = f"{_step_ms(r) / ref_ms:.2f}" if ref_ms else "-"
        lines.append(f"| {r['method']} | {r['steps']} | {r['nfe']} | " + " | ".join(values) + f" | {ratio} |")
    floors = [f"{info['floors'][k]:.3f}" if k in info["floors"] else "-" for k, _, _ in columns]
    lines.append("| real data (floor) | | | " + " | ".join(floors) + " | |")
    return "\n".join(lines)


def markdown(results: Dict[str, Any]) -> str:
    spec, machine = results["spec"], results["machine"]
    parts = [f"## jumpflow bench `{spec['name']}`", "",
             f"Machine: {machine['device']}, torch {machine['torch']}, {machine['platform']}. Budget per cell: "
             + (f"{spec['steps']} steps" if spec["steps"] else "each dataset's training steps")
             + (f", at most {spec['time_limit_s']:.0f} s of training" if spec["time_limit_s"] else "")
             + f"; seed {spec['seed']}. Floors: the metric between two real sample sets of the same size.", ""]
    for dataset, info in results["datasets"].items():
        parts += [dataset_table(dataset, info, [r for r in results["rows"] if r["dataset"] == dataset]), ""]
    if results["skipped"]:
        parts += ["Skipped: " + "; ".join(f"{m} ({why})" for m, why in results["skipped"].items()), ""]
    if spec["paper_numbers"]:
        parts += ["Published numbers (not measured here):", "", "| method | NFE | FID | source |", "|---|---|---|---|"]
        parts += [f"| {p['method']} | {p['nfe']} | {p['fid']} | {p['source']} |" for p in spec["paper_numbers"]]
    return "\n".join(parts) + "\n"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _log_scale_if_positive(ax) -> None:
    """Log y when every value is positive: a 1-step collapse (FD ~100) would otherwise flatten the curves that
    matter (FD ~1)."""
    values = [y for line in ax.get_lines() for y in line.get_ydata()]
    if values and min(values) > 0:
        ax.set_yscale("log")


def plot_quality_vs_nfe(results: Dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    datasets = list(results["datasets"])
    width = max(len(info["headline"]) for info in results["datasets"].values())
    fig, axes = plt.subplots(len(datasets), width, figsize=(5 * width, 3.6 * len(datasets)), squeeze=False)
    for ax_row, dataset in zip(axes, datasets):
        info = results["datasets"][dataset]
        final = [r for r in results["rows"] if r["dataset"] == dataset and r["final"]]
        for ax in ax_row[len(info["headline"]):]:
            ax.axis("off")
        columns = {c[0]: c for c in info["columns"]}
        for ax, (key, header, better) in zip(ax_row, [columns[k] for k in info["headline"]]):
            for method in dict.fromkeys(r["method"] for r in final):
                mine = [r for r in final if r["method"] == method]
                points = sorted((r["nfe"], r["metrics"][key]) for r in mine)
                peer = mine[0]["kind"] == "peer"  # drawn so that a peer matching its counterpart stays visible
                ax.plot(*zip(*points), marker="x" if peer else "o", linestyle=":" if peer else "-",
                        markersize=9 if peer else 6, label=method)
            if key in info["floors"]:
                ax.axhline(info["floors"][key], color="gray", linestyle="--", label="real data (floor)")
            ax.set_xscale("log")
            _log_scale_if_positive(ax)
            ax.set_xlabel("NFE")
            ax.set_ylabel(f"{header} ({_arrow(better)})")
            ax.set_title(dataset)
        ax_row[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_quality_vs_time(results: Dict[str, Any], path: Path) -> None:
    """Headline metric vs training seconds: each method at its fewest steps (solid) and, when it has a many-step
    setting (flow matching's teacher ceiling), at its most (dashed)."""
    plt = _pyplot()
    datasets = list(results["datasets"])
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.2 * len(datasets), 3.8), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        info = results["datasets"][dataset]
        key, header, better = next(c for c in info["columns"] if c[0] == info["headline"][0])
        rows = [r for r in results["rows"] if r["dataset"] == dataset]
        for method in dict.fromkeys(r["method"] for r in rows):
            mine = [r for r in rows if r["method"] == method]
            fewest, most = min(r["steps"] for r in mine), max(r["steps"] for r in mine)
            for steps, style in ((fewest, "-"), (most, "--")) if most > 2 else ((fewest, "-"),):
                points = sorted((r["train_seconds"], r["metrics"][key]) for r in mine if r["steps"] == steps)
                ax.plot(*zip(*points), style, marker="o", label=f"{method}, {steps} step{'s' if steps > 1 else ''}")
        if key in info["floors"]:
            ax.axhline(info["floors"][key], color="gray", linestyle=":", label="real data (floor)")
        _log_scale_if_positive(ax)
        ax.set_xlabel("training time (s)")
        ax.set_ylabel(f"{header} ({_arrow(better)})")
        ax.set_title(dataset)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: Dict[str, Any], out: Path) -> None:
    (out / "table.md").write_text(markdown(results))
    plot_quality_vs_nfe(results, out / "quality_vs_nfe.png")
    plot_quality_vs_time(results, out / "quality_vs_time.png")
    for dataset, info in results["datasets"].items():
        save_panels(out / f"samples_{dataset}.png", info["panels"], columns=6,
                    title=f"{dataset}: every method from the same noise, same training budget, EMA weights")
