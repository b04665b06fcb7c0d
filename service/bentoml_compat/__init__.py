"""Every workaround that reaches into BentoML internals, in one package.

Checked against **BentoML 1.4.39** (``pip show bentoml``); a BentoML upgrade re-checks this
package and nothing else (one small module per piece: ``batching``, ``uploads``, ``errors``,
``labels``, ``connections``, ``readiness``). Each piece names the upstream code or issue it works around:

1. :func:`cap_learned_wait`: a cap on adaptive batching's learned wait
   (``bentoml/_internal/marshal/dispatcher.py``, ``Optimizer``).
2. :class:`NoFetchMultipartSerde` / :class:`NoFetchJSONSerde` / :func:`install_no_fetch`: file
   fields are never fetched from URLs (``_bentoml_impl/serde.py``, SSRF).
3. :class:`ErrorEnvelopeMiddleware`: one JSON error shape (``_bentoml_impl/server/app.py``
   answers a ``BentoMLException`` < 500 as a one-element list).
4. :func:`client_filename`: the client's file name recovered from BentoML's upload temp file
   (``_bentoml_sdk/validators.py``).
5. :data:`RUNNER_CONNECTION`: one connection pool for the API -> Encoder client for the
   worker's lifetime (bentoml/BentoML#5540).
6. :func:`to_bentoml`: our error table's errors as ``BentoMLException`` with the table's HTTP
   status, so BentoML answers them as 4xx instead of 500.
7. :func:`install_bounded_endpoint_labels`: BentoML's request metrics labelled by route, not
   by raw path (``bentoml/_internal/server/http/instruments.py``).
8. :func:`install_connection_limits` / :func:`raise_nofile_limit`: idle and slow-header
   connections closed, connections per worker bounded, the open-file limit raised (BentoML's
   uvicorn worker, ``_bentoml_impl/worker/service.py``; ``uvicorn/protocols/http/h11_impl.py``
   0.54.0, Kludex/uvicorn#1192).
9. :func:`bounded_readiness`: ``/readyz`` answers 503 within ``readiness_timeout_s`` instead of
   hanging when the Encoder is frozen or restarting (``_bentoml_impl/server/app.py``
   ``readyz``, ``_bentoml_impl/client/proxy2.py`` ``AsyncClient.is_ready``,
   ``bentoml/_internal/server/http/traffic.py`` ``TimeoutMiddleware``).
10. :func:`set_read_high_water`: uvicorn's per-connection read buffer before it pauses the
   socket (``uvicorn/protocols/http/flow_control.py`` ``HIGH_WATER_LIMIT``, 0.54.0), raised
   from 64 KiB so that a photo upload does not pause and resume its socket.
"""

from __future__ import annotations

import logging





logger = logging.getLogger(__name__)

CHECKED_BENTOML_VERSION = "1.4.39"


def check_version() -> bool:
    """True when the installed BentoML is the version this module was checked against; logs
    a warning naming both versions otherwise (the service still starts)."""
    from importlib.metadata import version

    installed = version("bentoml")
    if installed != CHECKED_BENTOML_VERSION:
        logger.warning("BentoML %s is installed; service/bentoml_compat/ was checked against "
                       "%s: re-check its workarounds", installed, CHECKED_BENTOML_VERSION)
    return installed == CHECKED_BENTOML_VERSION


# --- 5. The API -> Encoder connection pool ------------------------------------------------
# BentoML 1.4.39's client to a ``bentoml.depends`` service closes its connection pool every 100
# calls or 300 s while calls are still in flight on it (bentoml/BentoML#5540), failing them
# with ServerDisconnectedError: under load 16-46 % of responses (bench/, c=32..64). Keep one
# pool for the worker's lifetime; the pipeline also retries such a failure once.
RUNNER_CONNECTION = {"max_requests": 2**31 - 1, "max_age": 1e12}


# The pieces, one module each (imported here so callers use one name: service.bentoml_compat).
from service.bentoml_compat.batching import cap_learned_wait  # noqa: E402
from service.bentoml_compat.connections import (install_connection_limits,  # noqa: E402
                                                raise_nofile_limit, set_read_high_water)
from service.bentoml_compat.errors import ErrorEnvelopeMiddleware, to_bentoml  # noqa: E402
from service.bentoml_compat.labels import install_bounded_endpoint_labels  # noqa: E402
from service.bentoml_compat.readiness import READINESS_PATHS, bounded_readiness  # noqa: E402
from service.bentoml_compat.uploads import (MAX_FILENAME_BYTES, NoFetchJSONSerde,  # noqa: E402
                                            NoFetchMultipartSerde, client_filename,
                                            install_no_fetch)

__all__ = ["CHECKED_BENTOML_VERSION", "MAX_FILENAME_BYTES", "READINESS_PATHS",
           "RUNNER_CONNECTION", "ErrorEnvelopeMiddleware", "NoFetchJSONSerde",
           "NoFetchMultipartSerde", "bounded_readiness", "cap_learned_wait", "check_version",
           "client_filename", "install_bounded_endpoint_labels", "install_connection_limits",
           "install_no_fetch", "raise_nofile_limit", "set_read_high_water", "to_bentoml"]
