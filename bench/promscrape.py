"""Read the service's ``/metrics``: batch sizes formed by adaptive batching, per cell."""

from __future__ import annotations

from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class HistogramTotals:
    """``_sum`` and ``_count`` of one histogram, summed over its label sets, plus buckets."""

    total: float
    count: float
    buckets: dict[str, float]

    def minus(self, before: "HistogramTotals") -> "HistogramTotals":
        """The observations recorded between ``before`` and this scrape."""
        return HistogramTotals(self.total - before.total, self.count - before.count,
                               {le: n - before.buckets.get(le, 0.0)
                                for le, n in self.buckets.items()})

    def plus(self, other: "HistogramTotals") -> "HistogramTotals":
        """Both sets of observations (e.g. two passes of one cell)."""
        keys = self.buckets.keys() | other.buckets.keys()
        return HistogramTotals(self.total + other.total, self.count + other.count,
                               {le: self.buckets.get(le, 0.0) + other.buckets.get(le, 0.0)
                                for le in keys})

    @property
    def mean(self) -> float | None:
        """Mean observation, None when nothing was observed."""
        return self.total / self.count if self.count else None


def scrape_histogram(base_url: str, name: str, timeout_s: float = 10.0) -> HistogramTotals:
    """Totals of histogram ``name`` on ``base_url/metrics`` (zeros when absent)."""
    text = httpx.get(f"{base_url}/metrics", timeout=timeout_s).text
    total = count = 0.0
    buckets: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for sample in family.samples:
            if sample.name == f"{name}_sum":
                total += sample.value
            elif sample.name == f"{name}_count":
                count += sample.value
            elif sample.name == f"{name}_bucket":
                le = sample.labels.get("le", "")
                buckets[le] = buckets.get(le, 0.0) + sample.value
    return HistogramTotals(total, count, buckets)


def batch_summary(delta: HistogramTotals) -> dict:
    """Mean batch size, batches formed, and cumulative bucket counts of one cell."""
    return {"mean_batch_size": None if delta.mean is None else round(delta.mean, 2),
            "batches": int(delta.count),
            "batch_size_buckets": {le: int(n) for le, n in delta.buckets.items()}}


def scrape_counter_totals(metrics_url: str, items: str, batches: str,
                          labels: dict[str, str] | None = None,
                          timeout_s: float = 10.0) -> HistogramTotals:
    """Batch totals from two counters on ``metrics_url`` (a server without a batch-size
    histogram, e.g. Triton's ``nv_inference_count`` = images inferred and
    ``nv_inference_exec_count`` = batches run), summed over the samples matching ``labels``.

    Returns:
        ``total`` = the ``items`` counter, ``count`` = the ``batches`` counter, no buckets.
    """
    text = httpx.get(metrics_url, timeout=timeout_s).text
    sums = {items: 0.0, batches: 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name.removesuffix("_total")
            if name in sums and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                sums[name] += sample.value
    return HistogramTotals(sums[items], sums[batches], {})
