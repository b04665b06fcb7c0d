"""Which files a batch embedding job reads: directories, glob patterns and manifests.

Torch-free. Every source resolves to absolute paths; the job's input list is the sorted,
de-duplicated union, so the same sources always give the same list (and the same shards).
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Iterable

#: File name extensions a directory source picks up (case-insensitive): the formats the
#: service accepts (``models.decode.SERVING_FORMATS``).
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".gif", ".webp", ".bmp",
                              ".dib", ".tif", ".tiff", ".mpo"})
#: Manifest files: one path per line (``.txt``, ``.lst``) or a table with a ``path`` column.
LINE_MANIFESTS = frozenset({".txt", ".lst"})
TABLE_MANIFESTS = frozenset({".csv", ".parquet"})


class SourceError(ValueError):
    """A source that names nothing usable (missing directory, empty glob, bad manifest)."""


def _is_glob(source: str) -> bool:
    return any(ch in source for ch in "*?[")


def _from_directory(folder: Path) -> Iterable[str]:
    for root, _dirs, files in os.walk(folder, followlinks=False):
        for name in files:
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                yield os.path.abspath(os.path.join(root, name))


def _from_manifest(manifest: Path) -> list[str]:
    """Paths listed in a manifest; relative ones are relative to the manifest's folder."""
    suffix = manifest.suffix.lower()
    if suffix in LINE_MANIFESTS:
        entries = [line.strip() for line in manifest.read_text(encoding="utf-8").splitlines()]
        entries = [e for e in entries if e and not e.startswith("#")]
    else:
        import pyarrow.csv as pa_csv
        import pyarrow.parquet as pq

        try:
            table = (pq.read_table(manifest, columns=["path"]) if suffix == ".parquet"
                     else pa_csv.read_csv(manifest).select(["path"]))
        except (KeyError, ValueError, OSError) as exc:  # pyarrow raises ArrowInvalid(ValueError)
            raise SourceError(f"manifest {manifest} needs a 'path' column: {exc}") from None
        entries = [e for e in table.column("path").to_pylist() if e]
    base = manifest.parent
    return [os.path.abspath(base / entry) for entry in entries]


def list_inputs(sources: Iterable[str | Path]) -> list[str]:
    """Resolve sources to the job's input list.

    Args:
        sources: each one a directory (walked recursively for :data:`IMAGE_EXTENSIONS`), a glob
            pattern (``**`` recurses; every match that is a file is taken, whatever its
            extension), or a manifest file (``.txt``/``.lst``: a path per line, ``#`` comments;
            ``.csv``/``.parquet``: a ``path`` column). Any other file is one input.

    Returns:
        Sorted, de-duplicated absolute paths (str). Manifest entries are not checked for
        existence here: a missing file becomes that row's error in the output, not a failed job.

    Raises:
        SourceError: a source that does not exist, a glob or directory that matches nothing, a
            path containing a newline (the job's input list is newline-separated).
    """
    found: set[str] = set()
    for source in map(str, sources):
        path = Path(source)
        if path.is_dir():
            matches = list(_from_directory(path))
        elif path.is_file() and path.suffix.lower() in LINE_MANIFESTS | TABLE_MANIFESTS:
            matches = _from_manifest(path)
        elif path.is_file():
            matches = [os.path.abspath(path)]
        elif _is_glob(source):
            matches = [os.path.abspath(m) for m in glob.glob(source, recursive=True)
                       if os.path.isfile(m)]
        else:
            raise SourceError(f"{source}: no such file, directory or glob match")
        if not matches:
            raise SourceError(f"{source}: matches no image files")
        found.update(matches)
    bad = next((p for p in found if "\n" in p or "\r" in p), None)
    if bad is not None:
        raise SourceError(f"path with a line break is not supported: {bad!r}")
    return sorted(found)
