"""Bounded endpoint labels on BentoML's request metrics.

Checked against BentoML 1.4.39 (see :mod:`service.bentoml_compat`).
"""

from __future__ import annotations

import logging
import typing as t

from bentoml._internal.context import server_context

logger = logging.getLogger(__name__)


# --- 7. Bounded endpoint labels on BentoML's request metrics ----------------------------------
# BentoML 1.4.39 labels its request metrics with the raw request path: ``endpoint =
# scope["path"]`` in ``RunnerTrafficMetricsMiddleware.__call__`` (the metrics middleware of
# new-style services, added by ``ServiceAppFactory.middlewares`` in ``_bentoml_impl/server/
# app.py``) and in ``HTTPTrafficMetricsMiddleware.__call__`` (legacy services), both in
# ``bentoml/_internal/server/http/instruments.py``. Every distinct path, 401s and 404s
# included, adds series to ``bentoml_service_request_total`` / ``_request_duration_seconds``
# (a histogram) / ``_request_in_progress``, about 20 per path, each an entry in the files under
# ``PROMETHEUS_MULTIPROC_DIR``: 5,000 junk GETs made /metrics 19 MB with 100,193 series,
# a scrape 6.6-11 s, the API worker 125 -> 442 MiB.
#
# :func:`install_bounded_endpoint_labels` wraps both middlewares' ``_setup`` (which creates the
# metric objects) so that every one of them labelled ``endpoint`` maps the value through
# :func:`service.request_metrics.endpoint_label`, the function our own metrics use: routes keep
# their path, every other path is ``other``. The worker's own API routes
# (``server_context.service_routes``, set by the worker's ``main``: the Encoder's ``/encode``,
# ``/load``... in the Encoder worker) keep theirs too: a fixed set as well.

_LABELS_MARK = "_cnn_codes_bounded_labels"


class _BoundedEndpoint:
    """A prometheus_client metric whose ``endpoint`` label value goes through ``label``; all
    else is delegated to the metric."""

    def __init__(self, metric: t.Any, label: t.Callable[[str], str]) -> None:
        self._metric = metric
        self._label = label

    def labels(self, *values: t.Any, **labels: t.Any) -> t.Any:
        if "endpoint" in labels:
            path = str(labels["endpoint"])
            if path not in (server_context.service_routes or ()):
                labels["endpoint"] = self._label(path)
        return self._metric.labels(*values, **labels)

    def __getattr__(self, name: str) -> t.Any:
        return getattr(self._metric, name)


def install_bounded_endpoint_labels(label: t.Callable[[str], str] | None = None) -> None:
    """Make BentoML's HTTP metrics middlewares label ``endpoint`` with the path when it is one
    of the worker's API routes, else ``label(path)`` (default
    :func:`service.request_metrics.endpoint_label`). Idempotent; call it in every worker before
    its first request (``_setup`` runs on the first request)."""
    from bentoml._internal.server.http import instruments

    if label is None:
        from service.request_metrics import endpoint_label as label

    for cls in (instruments.RunnerTrafficMetricsMiddleware,
                instruments.HTTPTrafficMetricsMiddleware):
        original = cls._setup
        if getattr(original, _LABELS_MARK, False):
            continue

        def _setup(self: t.Any, *args: t.Any, _original: t.Any = original,
                   **kwargs: t.Any) -> None:
            _original(self, *args, **kwargs)
            for name, value in list(vars(self).items()):
                if name.startswith("metrics_") and "endpoint" in getattr(value, "_labelnames",
                                                                          ()):
                    setattr(self, name, _BoundedEndpoint(value, label))

        setattr(_setup, _LABELS_MARK, True)
        _setup.__doc__ = original.__doc__
        cls._setup = _setup
