"""A :class:`UserStore` on a data directory, laid out as the agent lays it out."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from acme_registry.auth import DEFAULT_COST, Credential, UserStore
from acme_registry.statekeys import HTPASSWD_FILE
from acme_registry.storage import FileStorage


def user_store(
    data_dir: Path, env_users: Mapping[str, Credential] | None = None, cost: int = DEFAULT_COST
) -> UserStore:
    return UserStore(FileStorage(data_dir), data_dir / HTPASSWD_FILE, env_users, cost=cost)


def auth_dir(data_dir: Path) -> Path:
    """Where the users live on disk: the README's DATA_DIR/auth."""
    return data_dir / "auth"
