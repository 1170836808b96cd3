"""``audit.md`` (the threat model, then one table row per defense, setting and batch
size) and ``plots/leakage.png`` (each attack's headline figure per defense)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# attack -> (score, column title): the figure a reader looks at first
HEADLINE = {
    "labels": ("label_accuracy", "label acc."),
    "head_input": ("head_input_cosine", "head-input cos."),
    "token_set": ("token_recall", "token-set recall"),
    "span": ("token_recall", "span recall"),
    "span_b": ("token_recall", "ΔB-span recall"),
}
EXTRA = {
    "head_input": [("exact_matches", "retrieved exactly")],
    "token_set": [("token_precision", "token-set precision")],
    "span": [("token_precision", "span precision"), ("rougeL", "span ROUGE-L")],
    "span_b": [("token_precision", "ΔB-span precision")],
}


def _columns(attacks: list[str]) -> list[tuple[str, str, str]]:
    cols = []
    for a in attacks:
        score, title = HEADLINE.get(a, ("", a))
        cols.append((a, score, title))
        cols += [(a, s, t) for s, t in EXTRA.get(a, [])]
    return cols


def table(summary: dict[str, Any]) -> str:
    cells = summary["cells"]
    attacks = list(dict.fromkeys(c["attack"] for c in cells))
    cols = _columns(attacks)
    by_key = {(c["defense"], c["setting"], c["batch_size"], c["attack"]): c for c in cells}
    rows = list(dict.fromkeys((c["defense"], c["setting"], c["batch_size"]) for c in cells))
    lines = [
        "| defense | setting | batch | " + " | ".join(t for _, _, t in cols) + " |",
        "|---|---|---|" + "---|" * len(cols),
    ]
    for d, s, b in rows:
        values = []
        for attack, score, _ in cols:
            cell = by_key.get((d, s, b, attack), {})
            value = cell.get("scores", {}).get(score)
            partial = "" if cell.get("scored") == cell.get("trials") else "*"
            values.append("n/a" if value is None else f"{value:.2f}{partial}")
        lines.append(f"| {d} | {s} | {b} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def write_report(summary: dict[str, Any], out_dir: Path) -> None:
    unavailable = sorted(
        {
            f"{c['attack']} ({c['defense']}): {c['unavailable']}"
            for c in summary["cells"]
            if "unavailable" in c
        }
    )
    text = [
        "# Gradient-inversion audit",
        "",
        f"**Threat model.** {summary['threat_model']}",
        "",
        f"Candidate pool: {summary['candidates']} sentences. fedSGD: one local step on the "
        "batch; fedAvg: `train.local_steps` steps on it. Each figure is the mean over the "
        "trials (the same batches for every defense); n/a: the attack has nothing to read; "
        "*: the mean of the trials it could run on.",
        "",
        table(summary),
        "",
    ]
    if unavailable:
        text += ["Not applicable:", ""] + [f"- {u}" for u in unavailable] + [""]
    (out_dir / "audit.md").write_text("\n".join(text))
    plot(summary, out_dir / "plots" / "leakage.png")


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in summary["cells"] if "scores" in c]
    attacks = [a for a in HEADLINE if any(c["attack"] == a for c in cells)]
    if not attacks:
        return
    defenses = list(dict.fromkeys(c["defense"] for c in summary["cells"]))
    series = list(dict.fromkeys((c["setting"], c["batch_size"]) for c in cells))
    fig, axes = plt.subplots(1, len(attacks), figsize=(4.2 * len(attacks), 3.6), squeeze=False)
    width = 0.8 / max(len(series), 1)
    for ax, attack in zip(axes[0], attacks, strict=True):
        score, title = HEADLINE[attack]
        for i, (setting, b) in enumerate(series):
            values = [
                next(
                    (
                        c["scores"].get(score, 0.0)
                        for c in cells
                        if (c["defense"], c["setting"], c["batch_size"], c["attack"])
                        == (d, setting, b, attack)
                    ),
                    0.0,
                )
                for d in defenses
            ]
            ax.bar(
                [x + i * width for x in range(len(defenses))],
                values,
                width,
                label=f"{setting}, B={b}",
            )
        ax.set_xticks(
            [x + 0.4 - width / 2 for x in range(len(defenses))], defenses, rotation=30, ha="right"
        )
        ax.set_ylim(0, 1.05)
        ax.set_title(title)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
