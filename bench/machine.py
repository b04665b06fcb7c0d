"""What the benchmark ran on: cores, CPU model, memory, load average, library versions."""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata
from typing import Any

PACKAGES = ("onnxruntime", "bentoml", "torch", "torchvision", "pillow", "numpy", "fastapi",
            "uvicorn", "aiohttp", "torchserve", "py-spy")


def cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def memory_total_bytes() -> int | None:
    """Physical memory, bytes (``/proc/meminfo``), or None where unreadable."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages, rounded."""
    return [round(x, 2) for x in os.getloadavg()]


def usable_cores() -> int:
    """Cores this process may run on (affinity mask), falling back to ``os.cpu_count``."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed versions of the libraries that shape the numbers (None = not installed)."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def machine_info() -> dict[str, Any]:
    """A JSON-able description of this machine, taken at the start of a run."""
    return {
        "hostname": platform.node(),
        "cores": usable_cores(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "memory_bytes": memory_total_bytes(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "gpu": None,
        "packages": package_versions(),
    }
