"""Where the CPU goes inside a server under load: py-spy on the whole process tree.

``py-spy record --subprocesses --format raw`` writes collapsed stacks (``frame;frame;... N``,
the first frame naming the process); :func:`summarise` turns them into per-process shares:
the hottest leaf functions (self time) and the hottest functions anywhere on the stack
(inclusive time). Idle threads are not sampled (py-spy's default), so shares are of busy time.
"""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def py_spy_path() -> str | None:
    """The ``py-spy`` executable (the bench extra installs it into .venv), or None."""
    import sys

    candidate = Path(sys.executable).parent / "py-spy"
    return str(candidate) if candidate.is_file() else shutil.which("py-spy")


def start_record(pid: int, duration_s: int, out: Path, rate: int = 97
                 ) -> subprocess.Popen | None:
    """Start ``py-spy record`` on ``pid`` and its children for ``duration_s`` seconds.

    Returns:
        The py-spy process (wait on it), or None when py-spy is not installed.
    """
    exe = py_spy_path()
    if exe is None:
        logger.warning("py-spy not installed; no profile")
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    argv = [exe, "record", "--pid", str(pid), "--subprocesses", "--nonblocking",
            "--rate", str(rate), "--duration", str(duration_s), "--format", "raw",
            "--output", str(out)]
    logger.info("profiling: %s", " ".join(argv))
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _short(frame: str) -> str:
    """``func (path/to/file.py:12)`` -> ``func (file.py)``."""
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    return f"{match['func']} ({Path(match['file']).name})"


def _process_label(frame: str) -> str:
    """A readable name for a py-spy process frame (``process PID:"cmdline"``)."""
    text = frame.strip()
    service = re.search(r"--service-name[ =](\S+)", text)
    if service:
        return f"bentoml worker {service.group(1)}"
    for key, label in (("model_service_worker", "torchserve worker"),
                       ("jspawnhelper", "torchserve metric collector"), ("uvicorn", "uvicorn"),
                       ("bentoml serve", "bentoml arbiter")):
        if key in text:
            return label
    return text[:80]


# Frames every stack shares (thread/event-loop/CLI plumbing): left out of inclusive lists.
_PLUMBING_FILES = {"threading.py", "<frozen runpy>", "core.py", "runners.py", "base_events.py",
                   "events.py", "thread.py", "_asyncio.py", "_compat.py", "server.py",
                   "_bentoml_impl/worker/service.py"}
_PLUMBING_FUNCS = {"main (service.py)", "<module> (service.py)"}

# What a stack is spent on, first match wins (substrings of ``func (file)`` frames).
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("onnxruntime Session.run", ("Session.run (",)),
    ("torch forward", ("_call_impl (module.py)", "forward (")),
    # models/decode.py and models/preprocessing.py: the one decode every path runs
    ("decode + resize (Pillow)", ("decode_batch (", "decode_image (", "load_rgb (",
                                  "resize_center_crop (", "ImageFile.load (", "Image.resize (")),
    ("multipart parsing", ("multipart", "parse_form", "form (", "_get_form (")),
    ("response building (JSON, pydantic, tolist)", ("model_dump", "dump_json", "render (",
                                                     "jsonable_encoder", "serialize_response",
                                                     "to_json", "dumps (", "tolist")),
    ("Encoder call transport (serde, pickle, http client)", ("serde.py", "proxy2.py",
                                                             "pickle", "client_reqrep.py")),
)
_IDLE_LEAVES = ("EpollSelector.select (", "_worker (thread.py)", "select (selectors.py)",
                "Condition.wait (", "Event.wait (")


def categorise(funcs: list[str]) -> str:
    """The :data:`CATEGORIES` label of one stack (``other`` when none matches)."""
    if funcs and funcs[-1].startswith(_IDLE_LEAVES):
        return "waiting (event loop select, idle pool threads)"
    joined = ";".join(funcs)
    for label, needles in CATEGORIES:
        if any(n in joined for n in needles):
            return label
    return "other"


def summarise(raw: Path, top: int = 12) -> dict[str, Any]:
    """Per process: samples, top self functions and top inclusive functions (percent).

    Args:
        raw: py-spy ``--format raw`` output.
        top: rows kept per list.
    """
    self_time: dict[str, Counter] = defaultdict(Counter)
    inclusive: dict[str, Counter] = defaultdict(Counter)
    categories: dict[str, Counter] = defaultdict(Counter)
    totals: Counter = Counter()
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        # --subprocesses prefixes every ancestor process; the last one is the sampled process.
        marks = [i for i, f in enumerate(frames) if f.startswith("process ")]
        process = _process_label(frames[marks[-1]]) if marks else "?"
        start = marks[-1] + 1 if marks else 0
        funcs = [_short(f) for f in frames[start:] if not f.startswith("thread ")]
        if not funcs:
            continue
        totals[process] += count
        self_time[process][funcs[-1]] += count
        categories[process][categorise(funcs)] += count
        for func in set(funcs):
            inclusive[process][func] += count
    result: dict[str, Any] = {}
    for process, total in totals.most_common():
        result[process] = {
            "samples": total,
            "self_pct": [[f, round(100 * n / total, 1)]
                         for f, n in self_time[process].most_common(top)],
            "categories_pct": [[c, round(100 * n / total, 1)]
                               for c, n in categories[process].most_common()],
            "inclusive_pct": [[f, round(100 * n / total, 1)]
                              for f, n in inclusive[process].most_common(top * 4)
                              if f not in _PLUMBING_FUNCS
                              and not any(f.endswith(f"({x})") for x in _PLUMBING_FILES)][:top],
        }
    return result
