"""The one holder of the model an API worker serves, and its reload and canary.

Every front of the worker (HTTP routes, the Open Inference Protocol over gRPC and ``/v2``, the
shared pipeline) reads the served card through one :class:`ModelHolder`; a hot reload swaps one
immutable snapshot there, so no front can see a half-updated model.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import numpy as np

from cnn_codes.settings import Settings
from models.card import ModelCard, compatibility_problems
from models.errors import RequestError
from models.repository import resolve, resolve_version
from service.schemas import ModelRef

logger = logging.getLogger(__name__)

LoadFn = Callable[[int], Awaitable[dict[str, Any]]]  # Encoder.load(version)


@dataclass(frozen=True)
class Served:
    """An immutable snapshot of what is served: the card and its short reference."""

    card: ModelCard
    ref: ModelRef

    @classmethod
    def of(cls, card: ModelCard) -> "Served":
        """The snapshot of ``card``."""
        return cls(card=card, ref=ModelRef(name=card.name, version=card.version,
                                           backbone=card.backbone))


class ModelHolder:
    """Holds the served model's snapshot; :meth:`swap` replaces it whole.

    Args:
        card: the card of the model served at start-up.
    """

    def __init__(self, card: ModelCard) -> None:
        self._served = Served.of(card)

    @property
    def served(self) -> Served:
        """The current snapshot (read it once per request)."""
        return self._served

    @property
    def card(self) -> ModelCard:
        """The current card."""
        return self._served.card

    def swap(self, card: ModelCard) -> None:
        """Serve ``card`` from now on (after the Encoder loaded it)."""
        self._served = Served.of(card)


class Reloader:
    """Reload to the version ``model_version`` points at now, for one API worker.

    Args:
        holder: the worker's model holder.
        settings: repository, model name, ``model_version`` (a number, ``latest`` or alias).
        load: the Encoder's ``load(version)`` call.
    """

    def __init__(self, holder: ModelHolder, settings: Settings, load: LoadFn) -> None:
        self.holder = holder
        self.settings = settings
        self._load = load
        self._lock = asyncio.Lock()

    async def reload(self) -> dict[str, Any]:
        """Load the version ``model_version`` resolves to now.

        Resolving is cheap (no hashing); only a new version is verified (sha256, card), checked
        for compatibility, and loaded and canary-checked by the Encoder before it is served.

        Returns:
            ``{"reloaded": bool, "previous": v, "version": v}``.

        Raises:
            RequestError: ``reload_refused`` (corrupt, missing or incompatible version); the
                old version keeps serving.
        """
        async with self._lock:
            current = self.holder.card
            previous = current.version
            repo, name = self.settings.repository, current.name
            try:
                version = await asyncio.to_thread(resolve_version, repo, name,
                                                  self.settings.model_version)
                if version == previous:
                    return {"reloaded": False, "previous": previous, "version": previous}
                target = (await asyncio.to_thread(resolve, repo, name, version)).card
            except (LookupError, ValueError) as exc:
                raise RequestError("reload_refused", f"cannot reload: {exc}") from None
            problems = compatibility_problems(current, target)
            if problems:
                raise RequestError("reload_refused", f"version {target.version} is not "
                                   f"compatible with version {previous}: {', '.join(problems)}")
            result = await self._load(target.version)
            if not result.get("ok"):
                raise RequestError("reload_refused", f"version {target.version} refused: "
                                                     f"{result.get('error')}")
            self.holder.swap(target)
            logger.info("reloaded %s: version %d -> %d", name, previous, target.version)
            return {"reloaded": True, "previous": previous, "version": target.version}

    async def follow(self, is_ready: Callable[[], bool]) -> None:
        """Poll every ``reload_poll_s`` and reload when ``model_version`` moved; runs forever
        (a task); a refused version is logged once."""
        refused: set[str] = set()
        while True:
            await asyncio.sleep(self.settings.reload_poll_s)
            if not is_ready():
                continue
            try:
                await self.reload()
            except RequestError as exc:
                if exc.message not in refused:
                    refused.add(exc.message)
                    logger.error("%s; still serving version %d", exc.message,
                                 self.holder.card.version)
            except Exception:  # the poller must survive anything; logged for operators
                logger.exception("alias poll failed")


async def canary(holder: ModelHolder, model_ref: Callable[[], Awaitable[dict]],
                 encode: Callable[[np.ndarray], Awaitable[Any]], *,
                 timeout_s: float | None = None) -> bool:
    """A real inference through the Encoder on the model this worker serves.

    Args:
        timeout_s: the longest the check may take (a frozen or restarting Encoder answers
            nothing); None = ``readiness_timeout_s`` of the settings.

    Returns:
        True when the Encoder serves the same name and version and a batch of one image
        went through within ``timeout_s``; False otherwise (the cause is logged). Never raises.
    """
    card = holder.card
    if timeout_s is None:
        timeout_s = Settings().readiness_timeout_s
    try:
        async with asyncio.timeout(timeout_s):
            ref = await model_ref()
            if (ref["name"], int(ref["version"])) != (card.name, card.version):
                logger.error("encoder serves %s, API expects %s:%d", ref, card.name,
                             card.version)
                return False
            size = card.preprocessing.crop_size
            await encode(np.zeros((1, size, size, 3), np.uint8))
    except TimeoutError:
        logger.warning("canary inference: no answer from the Encoder (inference core) "
                       "within %g s", timeout_s)
        return False
    except Exception:  # any failure means "not ready yet"; logged for operators
        logger.exception("canary inference failed")
        return False
    return True
