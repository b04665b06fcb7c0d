"""``cnn-codes serve``: run the BentoML service (replaces this process with ``bentoml serve``).

Never imports torch.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

from cnn_codes.commands._common import REPO_ROOT
from cnn_codes.settings import Settings

logger = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``serve`` on ``subparsers``."""
    p = subparsers.add_parser("serve", help="serve HTTP with BentoML")
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--repository", type=Path)
    p.add_argument("--model", help="NAME[:VERSION]")
    p.set_defaults(func=run)
    return p


def service_env(args: argparse.Namespace, settings: Settings) -> dict[str, str]:
    """The environment of the ``bentoml serve`` process (``CNN_CODES_*``, PYTHONPATH...)."""
    env = dict(os.environ)
    env["CNN_CODES_REPOSITORY"] = str((args.repository or settings.repository).resolve())
    env["CNN_CODES_MODEL_NAME"], _, version = (args.model or settings.model_name).partition(":")
    if version:
        env["CNN_CODES_MODEL_VERSION"] = version
    env["CNN_CODES_HOST"] = args.host or settings.host  # the gRPC server binds the same host
    # Each instance gets its own BENTOML_HOME: Prometheus' multiprocess directory lives there.
    env.setdefault("BENTOML_HOME", tempfile.mkdtemp(prefix="cnn-codes-bentoml-"))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Exec ``bentoml serve service.service:CNNCodes`` on the host and port; never returns."""
    env = service_env(args, settings)
    host = env["CNN_CODES_HOST"]
    port = args.port if args.port is not None else settings.port
    base = f"http://{host}:{port}"
    logger.info(
        "serving %s from %s on %s\n  curl -F images=@ant.jpg -F top_k=2 %s/classify\n"
        "  curl -F images=@ant.jpg -F layer=embedding %s/embed\n  curl %s/metadata",
        env["CNN_CODES_MODEL_NAME"], env["CNN_CODES_REPOSITORY"], base, base, base, base)
    argv = [sys.executable, "-m", "bentoml", "serve", "service.service:CNNCodes",
            "--host", host, "--port", str(port), "--working-dir", str(REPO_ROOT)]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(argv[0], argv, env)
    return 0  # not reached
