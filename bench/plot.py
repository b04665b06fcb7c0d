"""The throughput plot (``throughput.png``) from one run's result dict."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def throughput_plot(result: dict[str, Any], path: Path) -> None:
    """Throughput vs concurrency for every system/endpoint, with the limit lines and the batch
    job's images/s (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for key, entry in result["systems"].items():
        if entry.get("status") != "ok":
            continue
        for endpoint, data in entry["endpoints"].items():
            if data.get("status", "ok") != "ok":
                continue
            xs = [c["concurrency"] for c in data["cells"]]
            ys = [c["images_per_s"] for c in data["cells"]]
            ax.plot(xs, ys, marker="o", label=f"{entry['title']} /{endpoint}")
    pipe = result.get("limit", {}).get("pipeline")
    if pipe:
        ax.axhline(pipe["images_per_s"], color="black", linestyle="--",
                   label=f"pipeline limit ({pipe['bound_by']} alone)")
        ax.axhline(pipe["shared_cores_images_per_s"], color="gray", linestyle=":",
                   label="both stages sharing the cores")
    job = ((result.get("batch_job") or {}).get("configs") or {}).get("local") or {}
    if job.get("images_per_s"):
        ax.axhline(job["images_per_s"], color="tab:brown", linestyle="-.",
                   label="cnn-codes embed (batch job, start-up excluded)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(result["plan"]["concurrency"])
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("concurrent clients (one photo per request)")
    ax.set_ylabel("images/s")
    ax.set_ylim(bottom=0)
    m = result["machine"]
    ax.set_title(f"{result['model']['backbone']} on {m['cores']} cores, load "
                 f"{result['load_average_start'][0]}->{result['load_average_end'][0]} "
                 f"({result['mode']})", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
