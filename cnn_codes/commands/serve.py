"""``cnn-codes serve``: check the model, then run ``bentoml serve`` and watch it.

1. **Pre-flight**: the model is resolved and verified (sha256, card) and opened in one
   onnxruntime session (CPU) that runs one test batch, in this process, before BentoML starts.
   A model that cannot load ends the command at once with one line on stderr and exit status
   :data:`EXIT_MODEL_UNUSABLE`, instead of BentoML's workers failing and restarting forever.
2. **Own temporary folder**: ``bentoml serve`` runs with ``TMPDIR`` set to the instance's own
   folder (``tmp_dir``), emptied before start and removed at exit, so uploads a killed worker
   left behind never pile up in the system temp folder.
3. **Watch**: this process stays the parent of ``bentoml serve``, forwards SIGTERM / SIGINT /
   SIGQUIT / SIGHUP to it and exits with its status; when service workers die
   ``max_worker_failures`` times within ``worker_failure_window_s`` (a crash loop, e.g. the
   model file changed after the pre-flight), it stops the service and exits with
   :data:`EXIT_WORKERS_FAILING`.

Never imports torch (nor BentoML: that runs in the child).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from cnn_codes.commands._common import REPO_ROOT
from cnn_codes.commands.supervise import (POLL_S, TMP_MARKER, WorkerWatch,  # noqa: F401
                                         instance_tmp_dir, prepare_tmp_dir, stop_service)
from cnn_codes.settings import Settings

logger = logging.getLogger(__name__)

EXIT_MODEL_UNUSABLE = 3
EXIT_WORKERS_FAILING = 4

EPILOG = f"""\
exit status:
  0    stopped by SIGTERM / SIGINT after serving
  {EXIT_MODEL_UNUSABLE}    cannot start: the pre-flight found the model unusable (unknown or invalid
       name or version, sha256 or card mismatch, onnxruntime cannot open or run it, a
       requested execution provider is missing), the search index (CNN_CODES_INDEX) is
       missing or holds codes of another model version, or the temp folder is unusable;
       one line on stderr says why
  {EXIT_WORKERS_FAILING}    service workers died CNN_CODES_MAX_WORKER_FAILURES times within
       CNN_CODES_WORKER_FAILURE_WINDOW_S seconds (a crash loop); the service was stopped
  other  the exit status of `bentoml serve`
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``serve`` on ``subparsers``."""
    p = subparsers.add_parser(
        "serve", help="serve HTTP with BentoML",
        description="Check the model (pre-flight), then serve it with BentoML.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--repository", type=Path)
    p.add_argument("--model", help="NAME[:VERSION]")
    p.set_defaults(func=run)
    return p


def model_target(args: argparse.Namespace, settings: Settings) -> tuple[Path, str, str]:
    """(absolute repository, model name, version) the command serves."""
    repository = (args.repository or settings.repository).resolve()
    name, _, version = (args.model or settings.model_name).partition(":")
    return repository, name, version or settings.model_version


def service_env(args: argparse.Namespace, settings: Settings) -> dict[str, str]:
    """The environment of the ``bentoml serve`` process (``CNN_CODES_*``, PYTHONPATH...).

    Creates a fresh ``BENTOML_HOME`` (``cnn-codes-bentoml-*`` in the system temp folder) only
    when the environment has none.
    """
    env = dict(os.environ)
    env["CNN_CODES_REPOSITORY"] = str((args.repository or settings.repository).resolve())
    if settings.index is not None:  # the workers run in another folder (--working-dir)
        env["CNN_CODES_INDEX"] = str(settings.index.resolve())
    env["CNN_CODES_MODEL_NAME"], _, version = (args.model or settings.model_name).partition(":")
    if version:
        env["CNN_CODES_MODEL_VERSION"] = version
    env["CNN_CODES_HOST"] = args.host or settings.host  # the gRPC server binds the same host
    # Each instance gets its own BENTOML_HOME: Prometheus' multiprocess directory lives there.
    if not env.get("BENTOML_HOME"):
        env["BENTOML_HOME"] = tempfile.mkdtemp(prefix="cnn-codes-bentoml-")
    env["TMPDIR"] = str(instance_tmp_dir(env["BENTOML_HOME"], settings))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def preflight(repository: Path, name: str, version: str, settings: Settings) -> None:
    """Load the model as the Encoder will, before any worker starts.

    Checks that the requested execution providers exist, resolves and verifies the version
    (:func:`models.repository.resolve`: name, sha256, card), opens it with
    :meth:`models.runtime.OnnxEncoder.create` (card vs graph) and runs one batch. The session
    runs on the CPU provider (the parent process must not hold a GPU context); a GPU provider
    that fails only when a session opens shows up as a worker crash loop instead.

    Raises:
        Exception: whatever made loading fail (the caller prints it).
    """
    import numpy as np
    import onnxruntime as ort

    from models.repository import resolve
    from models.runtime import OnnxEncoder, SessionConfig, select_providers

    config = SessionConfig.from_settings(settings)
    select_providers(config.providers, ort.get_available_providers(),
                     allow_cpu_fallback=config.allow_cpu_fallback)
    published = resolve(repository, name, version)
    cpu = dataclasses.replace(config, providers=("cpu",), optimized_model_dir=None)
    core = OnnxEncoder.create(str(published.onnx_path), published.card, cpu)
    size = published.card.preprocessing.crop_size
    if not np.isfinite(core.run(np.zeros((1, size, size, 3), np.uint8))).all():
        raise RuntimeError("a test inference produced non-finite outputs")


def preflight_index(repository: Path, name: str, version: str, settings: Settings) -> None:
    """When ``index`` is set: its manifest must name the version the service will serve (the
    workers load the index itself and refuse it too, see :mod:`service.search_route`).

    Raises:
        Exception: no index folder there, or an index of another model version or layer
            width (both versions are named).
    """
    if settings.index is None:
        return
    from models.card import CARD_FILENAME, ModelCard
    from models.repository import resolve_version
    from search.manifest import read_manifest

    manifest = read_manifest(settings.index)
    served = resolve_version(repository, name, version)
    card = ModelCard.model_validate_json(
        (repository / name / str(served) / CARD_FILENAME).read_bytes())
    problems = manifest.problems_with(card.name, card.version, card.onnx_sha256,
                                      {o.name: o.shape[-1] for o in card.outputs})
    if problems:
        raise ValueError(f"{'; '.join(problems)}: build an index of {card.name}:{card.version} "
                         f"or serve {manifest.model_ref}")


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Pre-flight, then run ``bentoml serve service.service:CNNCodes`` until it stops.

    Returns:
        The exit status (see :data:`EPILOG`).
    """
    repository, name, version = model_target(args, settings)
    try:
        preflight(repository, name, version, settings)
    except Exception as exc:  # any failure to load is reported the same way
        print(f"cnn-codes serve: cannot load model {name}:{version} from {repository}: "
              f"{_one_line(exc)}", file=sys.stderr, flush=True)
        return EXIT_MODEL_UNUSABLE
    try:
        preflight_index(repository, name, version, settings)
    except Exception as exc:  # the index cannot answer for this model version
        print(f"cnn-codes serve: cannot search with index {settings.index}: {_one_line(exc)}",
              file=sys.stderr, flush=True)
        return EXIT_MODEL_UNUSABLE
    own_home = not os.environ.get("BENTOML_HOME")
    env = service_env(args, settings)
    tmp_dir = Path(env["TMPDIR"])
    try:
        try:
            prepare_tmp_dir(tmp_dir)
        except OSError as exc:
            print(f"cnn-codes serve: cannot use the temp folder {tmp_dir}: {_one_line(exc)}",
                  file=sys.stderr, flush=True)
            return EXIT_MODEL_UNUSABLE
        try:
            return _serve(args, settings, env)
        finally:
            shutil.rmtree(tmp_dir, ignore_errors=True)
    finally:
        if own_home:
            shutil.rmtree(env["BENTOML_HOME"], ignore_errors=True)


def _serve(args: argparse.Namespace, settings: Settings, env: dict[str, str]) -> int:
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
    stopping = False
    proc: subprocess.Popen | None = None
    pending: list[int] = []  # signals that came before the child existed

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        if signum != signal.SIGHUP:
            stopping = True
        if proc is None:
            pending.append(signum)
            return
        try:
            os.kill(proc.pid, signum)
        except ProcessLookupError:
            pass

    previous = {sig: signal.signal(sig, forward)
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP)}
    try:
        proc = subprocess.Popen(argv, env=env)
        for signum in pending:
            os.kill(proc.pid, signum)
        watch = WorkerWatch(proc.pid, settings.max_worker_failures,
                            settings.worker_failure_window_s)
        while True:
            try:
                code = proc.wait(timeout=POLL_S)
                break
            except subprocess.TimeoutExpired:
                pass
            if stopping or watch.check():
                continue
            print(f"cnn-codes serve: service workers died {watch.max_failures} times within "
                  f"{watch.window_s:g} s (last: {watch.last}); stopping the service: see the "
                  "errors above", file=sys.stderr, flush=True)
            stopping = True
            stop_service(proc)
            return EXIT_WORKERS_FAILING
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if proc is not None and proc.poll() is None:  # never leave the service running
            stop_service(proc)
    return 128 - code if code < 0 else code


