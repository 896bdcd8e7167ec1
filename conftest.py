"""Personas shared by every test: an admin, a user with credits, a user without, an outsider."""

from __future__ import annotations

from decimal import Decimal

import pytest

from accounts.models import User
from accounts.services import create_api_key
from billing.services import create_user


@pytest.fixture
def admin_user(db) -> User:
    return create_user("admin", password="admin-pass-123", is_superuser=True)


@pytest.fixture
def user_with_credits(db) -> User:
    return create_user("alice", credits=Decimal("100"), groups=["research"])


@pytest.fixture
def user_without_credits(db) -> User:
    return create_user("bob", groups=["research"])


@pytest.fixture
def outsider(db) -> User:
    """Has credits, but belongs to no group."""
    return create_user("mallory", credits=Decimal("100"))


@pytest.fixture
def api_key_secret(user_with_credits) -> str:
    _, secret = create_api_key(user_with_credits, name="tests")
    return secret
