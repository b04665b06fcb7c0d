"""API-key authentication shared by HTTP and gRPC (``Authorization: Bearer <key>``)."""

from __future__ import annotations

import hmac
from typing import Iterable

from pydantic import SecretStr


def bearer_token(header_value: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` value (scheme case-insensitive)."""
    if not header_value:
        return None
    scheme, _, token = header_value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def check_api_key(header_value: str | None, keys: Iterable[SecretStr | str]) -> bool:
    """True when ``header_value`` carries one of ``keys``, or when no keys are configured.

    Every configured key is compared with ``hmac.compare_digest`` (constant time, RFC 6750
    bearer scheme), and all of them are always compared, so timing reveals neither the key
    nor which one matched. Keys never appear in logs or error messages.
    """
    secrets = [k.get_secret_value() if isinstance(k, SecretStr) else k for k in keys]
    if not secrets:
        return True
    token = bearer_token(header_value)
    if token is None:
        return False
    given = token.encode()
    matched = False
    for secret in secrets:
        matched |= hmac.compare_digest(given, secret.encode())
    return matched
