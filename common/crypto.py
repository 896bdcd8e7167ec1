"""Encryption of the secrets the gateway must read back, such as upstream credentials.

Fernet tokens (AES-128-CBC with an HMAC-SHA256) under ``settings.GATEWAY_ENCRYPTION_KEYS``: the
first key encrypts, every key decrypts, so a new key can be put first while what the old one
encrypted is still read — until it has been re-encrypted and the old key can go.
"""

from __future__ import annotations

from functools import cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured


class UndecryptableToken(ValueError):
    """No configured key decrypts the token: another key made it, or it was altered."""


def encrypt(text: str) -> str:
    """Encrypt with the first configured key."""
    return _keyring().encrypt(text.encode()).decode()


def decrypt(token: str) -> str:
    """Decrypt with whichever configured key made the token."""
    try:
        return _keyring().decrypt(token.encode()).decode()
    except InvalidToken:
        raise UndecryptableToken("No key in GATEWAY_ENCRYPTION_KEYS decrypts this value.") from None


def _keyring() -> MultiFernet:
    return _multi_fernet(tuple(settings.GATEWAY_ENCRYPTION_KEYS))


@cache
def _multi_fernet(keys: tuple[str, ...]) -> MultiFernet:
    # Cached by the keys themselves, so a changed setting (a test's override) takes effect at once.
    if not keys:
        raise ImproperlyConfigured("GATEWAY_ENCRYPTION_KEYS holds no usable key: see `manage.py check`.")
    return MultiFernet([Fernet(key) for key in keys])
