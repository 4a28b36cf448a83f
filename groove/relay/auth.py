"""Who may connect to a relay: separate node and consumer tokens.

With no ``--auth-file`` the relay generates one random token per role at first start and
keeps them in the user's config directory (``$GROOVE_CONFIG_DIR``, else
``$XDG_CONFIG_HOME/groove`` or ``~/.config/groove``), readable by that user only. Groove
commands run on the relay's machine find their role's token there without flags; other
machines pass ``--token``.
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

ROLES = ("node", "consumer")


def config_dir() -> Path:
    if os.environ.get("GROOVE_CONFIG_DIR"):
        return Path(os.environ["GROOVE_CONFIG_DIR"])
    base = os.environ.get("XDG_CONFIG_HOME") or (Path.home() / ".config")
    return Path(base) / "groove"


def default_auth_file() -> Path:
    return config_dir() / "auth.json"


@dataclass
class Tokens:
    node: list[str] = field(default_factory=list)
    consumer: list[str] = field(default_factory=list)

    def allows(self, role: str, token: str) -> bool:
        # Compare against every token of the role in constant time.
        valid = getattr(self, role, [])
        return any(hmac.compare_digest(token.encode(), t.encode()) for t in valid) if token else False


class AuthError(Exception):
    pass


def read(path: Path) -> Tokens:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AuthError(f"cannot read auth file {path}: {exc}") from None
    tokens = Tokens()
    for role in ROLES:
        value = data.get(role, [])
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not all(isinstance(t, str) and len(t) >= 16 for t in value):
            raise AuthError(f"auth file {path}: '{role}' must be a token or a list of tokens of 16+ characters")
        setattr(tokens, role, value)
    if not tokens.node or not tokens.consumer:
        raise AuthError(f"auth file {path} needs at least one 'node' and one 'consumer' token")
    return tokens


def load_or_create(path: Path | None) -> tuple[Tokens, Path, bool]:
    """The relay's tokens: from ``path``, or from (or newly written to) the default file."""
    if path is not None:
        return read(path), path, False
    path = default_auth_file()
    if path.exists():
        return read(path), path, False
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens = Tokens(node=[secrets.token_urlsafe(24)], consumer=[secrets.token_urlsafe(24)])
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"node": tokens.node, "consumer": tokens.consumer}, f, indent=2)
    return tokens, path, True


def local_token(role: str, explicit: str | None = None) -> str:
    """The token a command should present: ``--token``, else ``$GROOVE_TOKEN``, else the
    one in this machine's config directory (a relay running here wrote it), else none."""
    if explicit:
        return explicit
    if os.environ.get("GROOVE_TOKEN"):
        return os.environ["GROOVE_TOKEN"]
    path = default_auth_file()
    try:
        return (read(path).__dict__[role] or [""])[0]
    except AuthError:
        return ""


def bearer_token(headers) -> str:
    """The token of an ``Authorization: Bearer TOKEN`` header, or ''."""
    header = headers.get("Authorization", "")
    return header[7:] if header.startswith("Bearer ") else ""
