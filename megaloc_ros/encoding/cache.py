"""Where models, weights, engine and feature caches live, and a lock for building into it."""
from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path


def cache_root() -> Path:
    """Models, the offline backbone, engine caches: ``$MEGALOC_CACHE``, else
    ``$XDG_CACHE_HOME/megaloc_ros``, else ``~/.cache/megaloc_ros`` (never inside an install;
    tools/with_env.sh points ``$MEGALOC_CACHE`` at the repository's .cache/)."""
    env = os.environ.get("MEGALOC_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache") / "megaloc_ros"


@contextmanager
def file_lock(path: Path):
    """Serialise builds across processes (parallel test runs, several nodes starting at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
