"""`gaudi-pretrain plot RUN_DIR`: loss, accuracy and throughput curves from metrics.jsonl as one PNG."""

from __future__ import annotations

import argparse
from pathlib import Path

from gaudi_pretrain.errors import GaudiPretrainError


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from gaudi_pretrain.train.metrics import read_metrics

    records = read_metrics(run_dir)
    if not records:
        raise GaudiPretrainError(f"no metrics.jsonl records in {run_dir}")
    train = [r for r in records if r.get("kind", "train") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for key in ("loss", "mlm_loss", "itm_loss"):
        axes[0].plot(*_series(train, key), label=f"train {key}")
    axes[0].plot(*_series(evals, "loss"), "o-", label="eval loss")
    for key in ("mlm_acc", "itm_acc"):
        axes[1].plot(*_series(train, key), label=f"train {key}")
        axes[1].plot(*_series(evals, key), "o-", label=f"eval {key}")
    axes[1].plot(*_series(evals, "ir_r1"), "s--", label="eval IR R@1")
    axes[1].plot(*_series(evals, "tr_r1"), "s--", label="eval TR R@1")
    axes[1].set_ylim(0, 1.02)
    axes[2].plot(*_series(train, "samples_per_s"), label="samples/s (global)")
    axes[2].plot(*_series(train, "samples_per_s_per_device"), label="samples/s per device")
    titles = ("loss", "accuracy / recall", "throughput")
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(out) if out else Path(run_dir) / "curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot(args: argparse.Namespace) -> int:
    print(plot_run(args.run_dir, args.out))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plot",
        help="write a PNG of loss, accuracy and throughput curves of a run",
        description="Read RUN_DIR/metrics.jsonl and write RUN_DIR/curves.png (or --out).",
    )
    p.add_argument("run_dir", help="run directory holding metrics.jsonl")
    p.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/curves.png)")
    p.set_defaults(handler=_plot)
