"""Markdown tables and PNG plots for an evaluation result (the dict `eval.tasks` returns, i.e. OUT.json).

`write_report(result, out_json)` writes, next to OUT.json:

- ``OUT.md``: overall metrics, per-subset table, per-class recall, audio dominance, per-path metrics,
  DnR component ablation (when the predictions carry it), DCR fuse-or-drop table (when they carry every
  path's probs) and warnings (classification tasks);
  level/wheel tables (emer-ov); score summary and failures (emer-judge, headed PROXY for the embedding
  proxy).
- ``OUT.confusion.png``: confusion matrix (classification tasks), cells coloured by row share.
- ``OUT.subsets.png``: accuracy per conflict subset (only when the result has subsets).
- ``OUT.wheels.png``: F-score per emotion wheel at both levels (emer-ov).
- ``OUT.scores.png``: histogram of per-sample scores (emer-judge, when any sample was scored).

Plots use matplotlib's object API with the Agg canvas, so no global backend is switched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

OVERALL_KEYS: tuple[str, ...] = (
    "accuracy",
    "weighted_f1",
    "weighted_precision",
    "weighted_recall",
    "uar",
    "war",
)
"""Overall classification metrics shown in the first table, in this order."""

UNKNOWN_COLUMN = "unknown"
"""Name of the extra confusion column `classification_metrics` adds for out-of-set predictions."""


def report_paths(out_json: str | Path) -> dict[str, Path]:
    """Where the report files of OUT.json go: OUT.md, OUT.confusion.png, OUT.subsets.png, ...

    Args:
        out_json: the result file path (any suffix; it is replaced).
    Returns:
        `{"markdown", "confusion", "subsets", "wheels", "scores"}` -> path.
    """
    out = Path(out_json)
    stem = out.with_suffix("") if out.suffix else out
    return {
        "markdown": stem.with_name(stem.name + ".md"),
        "confusion": stem.with_name(stem.name + ".confusion.png"),
        "subsets": stem.with_name(stem.name + ".subsets.png"),
        "wheels": stem.with_name(stem.name + ".wheels.png"),
        "scores": stem.with_name(stem.name + ".scores.png"),
    }


# ----------------------------------------------------------------------------------------------------------
# markdown


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats with 4 decimals, None as "-"."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(_fmt(v).replace("|", "\\|") for v in row) + " |" for row in rows]
    return "\n".join(lines)


def confusion_columns(result: Mapping[str, Any], confusion: Sequence[Sequence[int]]) -> list[str]:
    """Column names of a confusion matrix: the labels, plus "unknown" when it has the extra column."""
    labels = list(result["labels"])
    return labels + [UNKNOWN_COLUMN] if confusion and len(confusion[0]) == len(labels) + 1 else labels


def per_class_recall(result: Mapping[str, Any]) -> list[tuple[str, int, int, float | None]]:
    """(label, support, correct, recall) per label, from the confusion matrix (recall None when support 0)."""
    confusion = result["metrics"]["confusion"]
    out = []
    for i, label in enumerate(result["labels"]):
        support = int(sum(confusion[i]))
        correct = int(confusion[i][i])
        out.append((label, support, correct, correct / support if support else None))
    return out


def _inputs_section(result: Mapping[str, Any]) -> list[str]:
    inputs = result.get("inputs", {})
    rows = [(str(p), h[:16]) for p, h in inputs.get("sha256", {}).items()]
    return ["## Inputs", "", markdown_table(["file", "sha256 (first 16)"], rows), ""]


def _warnings_section(result: Mapping[str, Any]) -> list[str]:
    warnings = result.get("warnings") or []
    if not warnings:
        return []
    return ["## Warnings", "", *[f"- {w}" for w in warnings], ""]


def dnr_ablation_section(result: Mapping[str, Any]) -> list[str]:
    """Markdown lines for `result["dnr_ablation"]` (mean per DnR component); [] when absent."""
    ablation = result.get("dnr_ablation")
    if not ablation:
        return []
    rows = [(c, v["kl"], v["delta_p"]) for c, v in ablation["components"].items()]
    return [
        f"## DnR component ablation (mean over {ablation['n']} predictions)",
        "",
        "One part zeroed at a time: KL(full || ablated) of the class distribution, and the drop of the "
        "predicted class's probability.",
        "",
        markdown_table(["component", "kl", "delta_p(pred)"], rows),
        "",
    ]


def fuse_or_drop_section(result: Mapping[str, Any]) -> list[str]:
    """Markdown lines for `result["fuse_or_drop"]` (DCR arms and baselines per subset); [] when absent."""
    report = result.get("fuse_or_drop")
    if not report:
        return []
    arms = report["arms"]
    with_arbiter = any("arbiter" in r for r in report["subsets"].values())
    header = ["subset", "n", "always_fuse", f"best_single ({report['best_single']})", "oracle"]
    header += (["arbiter"] + [f"share {a}" for a in arms]) if with_arbiter else []
    rows = []
    for name, r in report["subsets"].items():
        row = [name, r["n"], r["always_fuse"], r["best_single"], r["oracle"]]
        if with_arbiter:
            row += [r["arbiter"], *(r["arm_share"][a] for a in arms)]
        rows.append(row)
    return [
        "## DCR: fuse or drop (accuracy per subset)",
        "",
        "best_single: the unimodal path with the best overall accuracy; oracle: correct when any path is.",
        "",
        markdown_table(header, rows),
        "",
    ]


def classification_markdown(result: Mapping[str, Any]) -> str:
    """Markdown for a classification result (synthetic, ca-mer, mer2023, dfew)."""
    metrics = result["metrics"]
    lines = [
        f"# {result['task']} evaluation",
        "",
        f"n = {result['n']}, labels mode `{result['labels_mode']}`",
        "",
    ]
    lines += [
        "## Overall",
        "",
        markdown_table(["metric", "value"], [(k, metrics[k]) for k in OVERALL_KEYS]),
        "",
    ]
    if metrics.get("per_subset"):
        rows = [(name, s["n"], s["accuracy"], s["weighted_f1"]) for name, s in metrics["per_subset"].items()]
        lines += ["## Per subset", "", markdown_table(["subset", "n", "accuracy", "weighted_f1"], rows), ""]
    lines += [
        "## Per-class recall",
        "",
        markdown_table(["label", "support", "correct", "recall"], per_class_recall(result)),
        "",
    ]
    dominance = result.get("audio_dominance")
    if dominance is not None:
        lines += [
            "## Audio dominance (conflict samples)",
            "",
            "index = A / (A + V): 1.0 follows audio only, 0.0 follows video only.",
            "",
            markdown_table(
                ["index", "audio_follow (A)", "video_follow (V)", "n_conflict"],
                [
                    (
                        dominance["index"],
                        dominance["audio_follow"],
                        dominance["video_follow"],
                        dominance["n_conflict"],
                    )
                ],
            ),
            "",
        ]
    if result.get("per_path"):
        rows = [(name, m["accuracy"], m["weighted_f1"], m["uar"]) for name, m in result["per_path"].items()]
        lines += [
            "## Per path (argmax of probs)",
            "",
            markdown_table(["path", "accuracy", "weighted_f1", "uar"], rows),
            "",
        ]
    lines += explanations_section(result)
    lines += dnr_ablation_section(result)
    lines += fuse_or_drop_section(result)
    confusion = metrics["confusion"]
    columns = confusion_columns(result, confusion)
    lines += [
        "## Confusion (rows: truth, columns: prediction)",
        "",
        markdown_table(
            ["truth \\ pred", *columns],
            [
                (label, *row)
                for label, row in zip(result["labels"], confusion[: len(result["labels"])], strict=True)
            ],
        ),
        "",
    ]
    return "\n".join(lines + _warnings_section(result) + _inputs_section(result))


def explanations_section(result: Mapping[str, Any]) -> list[str]:
    """Explanation quality on the synthetic set (`mllm_mer.explanations`), overall and per subset."""
    quality = result.get("explanations")
    if not quality:
        return []
    keys = ("parse_rate", "label_accuracy", "video_cue_accuracy", "audio_cue_accuracy",
            "video_intensity_accuracy", "audio_intensity_accuracy")
    rows = [("all", quality["n"], *(quality[k] for k in keys))]
    rows += [(subset, q["n"], *(q[k] for k in keys)) for subset, q in quality["per_subset"].items()]
    return [
        "## Explanation quality (generated text vs the designed cues)",
        "",
        markdown_table(["subset", "n", "parses", "label", "face cue", "voice cue", "face intensity",
                        "voice intensity"], rows),
        "",
    ]


def openset_markdown(result: Mapping[str, Any]) -> str:
    """Markdown for an emer-ov result: level F/P/R and per-wheel scores."""
    lines = [f"# {result['task']} evaluation (emotion wheel)", "", f"n = {result['n']}", ""]
    levels = [lv for lv in ("level1", "level2") if lv in result]
    rows = [(lv, result[lv]["fscore"], result[lv]["precision"], result[lv]["recall"]) for lv in levels]
    lines += [
        "## Overall (mean over wheels)",
        "",
        markdown_table(["level", "fscore", "precision", "recall"], rows),
        "",
    ]
    for lv in levels:
        wheel_rows = [
            (w, s["fscore"], s["precision"], s["recall"]) for w, s in result[lv]["per_wheel"].items()
        ]
        lines += [
            f"## Per wheel, {lv}",
            "",
            markdown_table(["wheel", "fscore", "precision", "recall"], wheel_rows),
            "",
        ]
    return "\n".join(lines + _warnings_section(result) + _inputs_section(result))


def judge_markdown(result: Mapping[str, Any], max_failures: int = 20) -> str:
    """Markdown for an emer-judge result: score summary, judge description and the first failures."""
    judge = result.get("judge", {})
    title = f"# {result['task']} evaluation"
    lines = [
        title + (" (PROXY: embedding similarity, not the EMER protocol)" if result.get("proxy") else ""),
        "",
    ]
    summary = [(k, result.get(k)) for k in ("mean_score", "n_scored", "n_failed", "n_total")]
    lines += ["## Scores", "", markdown_table(["metric", "value"], summary), ""]
    lines += ["## Judge", "", markdown_table(["field", "value"], [(k, v) for k, v in judge.items()]), ""]
    failures = result.get("failures") or []
    if failures:
        rows = [(f["id"], f["error"], f.get("raw", "")[:80]) for f in failures[:max_failures]]
        more = f" (first {max_failures} of {len(failures)})" if len(failures) > max_failures else ""
        lines += [f"## Failures{more}", "", markdown_table(["id", "error", "raw reply"], rows), ""]
    return "\n".join(lines + _warnings_section(result) + _inputs_section(result))


# ----------------------------------------------------------------------------------------------------------
# plots


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120)
    return path


def plot_confusion(
    confusion: Sequence[Sequence[int]], rows: Sequence[str], columns: Sequence[str], path: Path, title: str
) -> Path:
    """Confusion-matrix heat map with counts; colours are the share of each row (truth) count.

    Args:
        confusion: counts, one row per entry of `rows`, one column per entry of `columns`.
        rows: truth labels.
        columns: predicted labels (the labels, plus "unknown" when present).
        path: PNG to write.
        title: plot title.
    """
    n_rows, n_cols = len(rows), len(columns)
    shares = [[c / max(1, sum(row)) for c in row] for row in confusion]
    fig = Figure(figsize=(1.0 + 0.75 * n_cols, 1.0 + 0.65 * n_rows), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(n_rows):
        for j in range(n_cols):
            ax.text(
                j,
                i,
                str(confusion[i][j]),
                ha="center",
                va="center",
                color="white" if shares[i][j] > 0.5 else "black",
                fontsize=8,
            )
    ax.set_xticks(range(n_cols), list(columns), rotation=45, ha="right")
    ax.set_yticks(range(n_rows), list(rows))
    ax.set_xlabel("prediction")
    ax.set_ylabel("truth")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="share of row")
    return _save(fig, path)


def plot_bars(
    series: Mapping[str, Mapping[str, float]],
    path: Path,
    title: str,
    ylabel: str,
    ylim: tuple[float, float] = (0.0, 1.1),
) -> Path:
    """Grouped bar chart: one group per category, one bar per series (e.g. level1/level2 per wheel).

    Args:
        series: series name -> category -> value; categories come from the first series.
        path: PNG to write.
        title: plot title.
        ylabel: y-axis label.
        ylim: y-axis range (the default leaves room for the value labels above 1.0).
    """
    names = list(series)
    categories = list(next(iter(series.values())))
    width = 0.8 / max(1, len(names))
    fig = Figure(figsize=(max(4.0, 1.0 + 0.9 * len(categories)), 3.5), layout="constrained")
    ax = fig.add_subplot()
    for k, name in enumerate(names):
        xs = [i + (k - (len(names) - 1) / 2) * width for i in range(len(categories))]
        values = [series[name].get(c, 0.0) for c in categories]
        bars = ax.bar(xs, values, width=width, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(categories)), categories)
    ax.set_ylim(*ylim)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(names) > 1:
        ax.legend()
    return _save(fig, path)


def plot_histogram(values: Sequence[float], path: Path, title: str, xlabel: str) -> Path:
    """Histogram of per-sample scores."""
    fig = Figure(figsize=(4.5, 3.2), layout="constrained")
    ax = fig.add_subplot()
    ax.hist(list(values), bins=min(20, max(5, len(values))))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("samples")
    ax.set_title(title)
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------------------
# entry points


def summary_line(result: Mapping[str, Any]) -> str:
    """One line with the task's headline numbers, e.g. "synthetic: n=4 accuracy=0.7500 ..."."""
    task = result["task"]
    if task == "emer-ov":
        values: dict[str, Any] = {f"{lv}_fscore": result[lv]["fscore"] for lv in ("level1", "level2")}
    elif task == "emer-judge":
        values = {
            "mean_score": result["mean_score"],
            "n_failed": result["n_failed"],
            "proxy": result["proxy"],
        }
    else:
        values = {k: result["metrics"][k] for k in ("accuracy", "weighted_f1", "uar")}
        if result.get("audio_dominance"):
            values["audio_dominance"] = result["audio_dominance"]["index"]
    return f"{task}: n={result['n']} " + " ".join(f"{k}={_fmt(v)}" for k, v in values.items())


def write_report(result: Mapping[str, Any], out_json: str | Path) -> list[Path]:
    """Write OUT.md and the PNG plots for `result` next to `out_json`.

    Args:
        result: a result dict from `eval.tasks` (its `task` key picks the layout).
        out_json: where OUT.json is (or will be) written.
    Returns:
        The files written (markdown first).
    """
    paths = report_paths(out_json)
    paths["markdown"].parent.mkdir(parents=True, exist_ok=True)
    task = result["task"]
    written: list[Path] = []
    if task == "emer-ov":
        text = openset_markdown(result)
        series = {
            lv: {w: s["fscore"] for w, s in result[lv]["per_wheel"].items()} for lv in ("level1", "level2")
        }
        plots = [plot_bars(series, paths["wheels"], "emer-ov: F-score per emotion wheel", "F-score")]
    elif task == "emer-judge":
        text = judge_markdown(result)
        scores = list(result.get("scores", {}).values())
        xlabel = "cosine similarity (PROXY)" if result.get("proxy") else "judge score (1-10)"
        plots = [plot_histogram(scores, paths["scores"], "emer-judge scores", xlabel)] if scores else []
    else:
        text = classification_markdown(result)
        confusion = result["metrics"]["confusion"]
        plots = [
            plot_confusion(
                confusion[: len(result["labels"])],  # drop the all-zero "unknown" truth row
                result["labels"],
                confusion_columns(result, confusion),
                paths["confusion"],
                f"{task}: confusion (n={result['n']})",
            )
        ]
        per_subset = result["metrics"].get("per_subset") or {}
        if per_subset:
            series = {"accuracy": {f"{name}\n(n={s['n']})": s["accuracy"] for name, s in per_subset.items()}}
            plots.append(plot_bars(series, paths["subsets"], f"{task}: accuracy per subset", "accuracy"))
    paths["markdown"].write_text(text + "\n", encoding="utf-8")
    written.append(paths["markdown"])
    return written + plots
