"""Versioned model repository: ``<repository>/<name>/<version>/{model.onnx,model_card.json}``.

Torch-free (the service uses it). Versions are positive integers, as in Triton's model
repository. Publishing is atomic: files are written into a hidden staging folder inside
``<repository>/<name>/`` and the folder is renamed into place, so a half-written version is
never visible to a reader.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from models.card import CARD_FILENAME, ONNX_FILENAME, ModelCard, sha256_file

logger = logging.getLogger(__name__)


class ModelNotFoundError(LookupError):
    """No such model name or version in the repository."""


class ModelIntegrityError(ValueError):
    """A published version's card is missing/invalid or its ONNX file does not match the card."""


@dataclass(frozen=True)
class PublishedModel:
    """A verified model version: where its files are and its card."""

    path: Path
    card: ModelCard

    @property
    def onnx_path(self) -> Path:
        """Path of ``model.onnx``."""
        return self.path / ONNX_FILENAME


NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"


def check_name(name: str) -> str:
    """``name`` if it is a valid model name (:data:`NAME_PATTERN`: letters, digits, ``_ . -``,
    starting with a letter or digit), so it can never leave the repository (no ``/``, no
    ``..`` component).

    Raises:
        ValueError: naming the refused name and the pattern.
    """
    if not isinstance(name, str) or not re.fullmatch(NAME_PATTERN, name):
        raise ValueError(f"invalid model name {name!r}: use letters, digits, '_', '.', '-' "
                         "(starting with a letter or digit, at most 128 characters)")
    return name


def list_versions(repository: str | Path, name: str) -> list[int]:
    """Published versions of ``name``, ascending; hidden staging folders are ignored.

    Raises:
        ValueError: ``name`` is not a valid model name (see :func:`check_name`).
    """
    root = Path(repository) / check_name(name)
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and p.name.isdigit())


def list_models(repository: str | Path) -> dict[str, list[int]]:
    """Every model name in the repository with its published versions."""
    root = Path(repository)
    if not root.is_dir():
        return {}
    found = {p.name: list_versions(root, p.name) for p in sorted(root.iterdir()) if p.is_dir()}
    return {name: versions for name, versions in found.items() if versions}


ALIASES_FILENAME = "aliases.json"
ALIAS_PATTERN = r"^[a-z][a-z0-9_-]{0,63}$"


def read_aliases(repository: str | Path, name: str) -> dict[str, int]:
    """Aliases of ``name`` (e.g. ``{"production": 3}``) from ``<name>/aliases.json``."""
    path = Path(repository) / check_name(name) / ALIASES_FILENAME
    if not path.is_file():
        return {}
    return {str(k): int(v) for k, v in json.loads(path.read_text()).items()}


def set_alias(repository: str | Path, name: str, alias: str, version: int) -> PublishedModel:
    """Point ``alias`` at ``version`` after verifying that version (atomic file replace).

    Raises:
        ValueError: the alias is not a lowercase name, or is ``latest`` / a number.
        ModelNotFoundError, ModelIntegrityError: the version is missing or corrupt.
    """
    if not re.fullmatch(ALIAS_PATTERN, alias) or alias == "latest":
        raise ValueError(f"invalid alias {alias!r}: lowercase letters, digits, '-', '_'")
    published = resolve(repository, name, version)
    aliases = read_aliases(repository, name) | {alias: published.card.version}
    path = Path(repository) / name / ALIASES_FILENAME
    tmp = path.with_name(f".{ALIASES_FILENAME}.{uuid.uuid4().hex}")
    tmp.write_text(json.dumps(aliases, indent=2, sort_keys=True))
    os.replace(tmp, path)
    logger.info("alias %s:%s -> version %d", name, alias, published.card.version)
    return published


def remove_version(repository: str | Path, name: str, version: int, *,
                   force: bool = False) -> None:
    """Delete a published version (renamed out of view first, so readers never see half).

    Raises:
        ModelNotFoundError: no such version.
        ValueError: an alias points at it and ``force`` is False.
    """
    if version not in list_versions(repository, name):
        raise ModelNotFoundError(f"model {name!r} has no version {version}")
    pointing = [a for a, v in read_aliases(repository, name).items() if v == version]
    if pointing and not force:
        raise ValueError(f"aliases {pointing} point at {name}:{version}; promote another "
                         "version first or pass --force")
    root = Path(repository) / name
    trash = root / f".removed-{version}-{uuid.uuid4().hex}"
    os.rename(root / str(version), trash)
    shutil.rmtree(trash, ignore_errors=True)


def resolve_version(repository: str | Path, name: str, version: int | str = "latest") -> int:
    """The version number ``version`` points at now, without reading or hashing any model file.

    Cheap (a directory listing and, for an alias, ``aliases.json``): the alias poller calls it
    every ``reload_poll_s`` in every API worker; only a version about to be loaded is verified
    (hashed) by :func:`resolve`.

    Args:
        repository: model repository root.
        name: model name.
        version: an integer version, ``"latest"`` (highest published) or an alias.

    Returns:
        A published version number.

    Raises:
        ModelNotFoundError: unknown name, version or alias.
    """
    versions = list_versions(repository, name)
    if not versions:
        raise ModelNotFoundError(f"no published versions of model {name!r} in {repository}")
    if str(version) == "latest":
        chosen = versions[-1]
    elif str(version).isdigit():
        chosen = int(version)
    else:
        aliases = read_aliases(repository, name)
        if str(version) not in aliases:
            raise ModelNotFoundError(f"model {name!r} has no alias {version!r}; aliases: "
                                     f"{sorted(aliases)}")
        chosen = aliases[str(version)]
    if chosen not in versions:
        raise ModelNotFoundError(f"model {name!r} has no version {chosen}; versions: {versions}")
    return chosen


def resolve(repository: str | Path, name: str, version: int | str = "latest") -> PublishedModel:
    """Find, load and verify (hash) one model version: :func:`resolve_version` + :func:`verify`.

    Args:
        repository: model repository root.
        name: model name.
        version: an integer version, ``"latest"`` (highest published) or an alias
            (e.g. ``"production"``, see :func:`set_alias`).

    Returns:
        The verified model.

    Raises:
        ModelNotFoundError: unknown name or version.
        ModelIntegrityError: the card is invalid, names another model, or the sha256 differs.
    """
    chosen = resolve_version(repository, name, version)
    return verify(Path(repository) / name / str(chosen), expected_name=name,
                  expected_version=chosen)


CARD_CHECKSUM_FILENAME = CARD_FILENAME + ".sha256"


def seal_card(folder: str | Path) -> str:
    """Write the checksum that covers ``folder/model_card.json`` (``model_card.json.sha256``:
    the hex sha256 of the card's bytes, as ``sha256sum`` prints it). :func:`publish` seals every
    version it writes.

    Returns:
        The hex digest.
    """
    folder = Path(folder)
    digest = hashlib.sha256((folder / CARD_FILENAME).read_bytes()).hexdigest()
    (folder / CARD_CHECKSUM_FILENAME).write_text(f"{digest}  {CARD_FILENAME}\n")
    return digest


def _check_card_checksum(folder: Path, card_bytes: bytes) -> None:
    checksum = folder / CARD_CHECKSUM_FILENAME
    if not checksum.is_file():
        logger.warning("%s has no %s (published before cards were sealed): the card is not "
                       "covered by a checksum; re-publish it", folder, CARD_CHECKSUM_FILENAME)
        return
    expected = checksum.read_text().split()[0] if checksum.read_text().split() else ""
    digest = hashlib.sha256(card_bytes).hexdigest()
    if digest != expected:
        raise ModelIntegrityError(f"{folder / CARD_FILENAME} sha256 {digest} does not match "
                                  f"{CARD_CHECKSUM_FILENAME} ({expected or 'empty'}): the card "
                                  "changed after it was published")


def verify(
    path: str | Path, *, expected_name: str | None = None, expected_version: int | None = None
) -> PublishedModel:
    """Check a version folder: the card's own checksum, the card parses, names match, the ONNX
    file's sha256 matches the card.

    Raises:
        ModelIntegrityError: with the reason.
    """
    path = Path(path)
    card_path, onnx_path = path / CARD_FILENAME, path / ONNX_FILENAME
    if not card_path.is_file() or not onnx_path.is_file():
        raise ModelIntegrityError(f"{path} lacks {CARD_FILENAME} or {ONNX_FILENAME}")
    card_bytes = card_path.read_bytes()
    _check_card_checksum(path, card_bytes)
    try:
        card = ModelCard.model_validate_json(card_bytes)
    except ValueError as exc:
        raise ModelIntegrityError(f"invalid model card {card_path}: {exc}") from None
    if expected_name is not None and card.name != expected_name:
        raise ModelIntegrityError(f"{card_path} names model {card.name!r}, not {expected_name!r}")
    if expected_version is not None and card.version != expected_version:
        raise ModelIntegrityError(
            f"{card_path} says version {card.version}, folder says {expected_version}"
        )
    digest = sha256_file(onnx_path)
    if digest != card.onnx_sha256:
        raise ModelIntegrityError(
            f"{onnx_path} sha256 {digest} does not match the card's {card.onnx_sha256}"
        )
    return PublishedModel(path=path, card=card)


def publish(
    repository: str | Path, card: ModelCard, onnx_file: str | Path, *, max_attempts: int = 100
) -> PublishedModel:
    """Publish an ONNX file and its card as the next version of ``card.name``, atomically.

    The card's ``version`` is replaced by the version actually taken (highest + 1). Concurrent
    publishers each get their own version: ``os.rename`` of a folder onto an existing one fails.

    Args:
        repository: model repository root (created if missing).
        card: the card to write; ``onnx_sha256``/``onnx_bytes`` must describe ``onnx_file``.
        onnx_file: the exported model file (copied, not moved).

    Returns:
        The published, verified model.

    Raises:
        ModelIntegrityError: the ONNX file does not match the card.
        RuntimeError: no free version after ``max_attempts`` tries.
    """
    if sha256_file(onnx_file) != card.onnx_sha256:
        raise ModelIntegrityError(f"{onnx_file} does not match the card's sha256")
    root = Path(repository) / check_name(card.name)
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".staging-{uuid.uuid4().hex}"
    staging.mkdir()
    try:
        shutil.copyfile(onnx_file, staging / ONNX_FILENAME)
        for _ in range(max_attempts):
            version = (list_versions(repository, card.name) or [0])[-1] + 1
            final = card.model_copy(update={"version": version})
            (staging / CARD_FILENAME).write_text(final.model_dump_json(indent=2))
            seal_card(staging)
            fsync_dir_files(staging)
            try:
                os.rename(staging, root / str(version))
            except OSError:
                continue  # another publisher took this version; try the next one
            logger.info("published %s version %d to %s", card.name, version, repository)
            return verify(root / str(version), expected_name=card.name, expected_version=version)
        raise RuntimeError(f"could not find a free version for {card.name} in {repository}")
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def fsync_dir_files(folder: Path) -> None:
    """Flush every file in ``folder`` to disk before it is renamed into view."""
    for child in folder.iterdir():
        with open(child, "rb") as handle:
            os.fsync(handle.fileno())
