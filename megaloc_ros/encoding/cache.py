"""Where models, weights, engine and feature caches live, and a lock for building into it."""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

log = logging.getLogger("megaloc_ros.encoding.cache")


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


def exported_model(name: str, weights: Optional[Path], version: int, export: Callable[[Path, Path], object],
                   missing: str = "") -> Path:
    """``<cache>/models/<name>-<sha256 of weights, 16 hex>-v<version>.onnx``, made by
    ``export(weights, tmp)`` the first time (under a lock: one process exports, the others wait;
    written to a temporary file, then renamed: a killed export leaves no half model).
    ``weights`` None: WeightsError with ``missing`` (where to get them)."""
    if weights is None:
        from megaloc_ros.errors import WeightsError
        raise WeightsError(missing or f"no weights for {name}")
    digest = hashlib.sha256(Path(weights).read_bytes()).hexdigest()[:16]
    out = cache_root() / "models" / f"{name}-{digest}-v{version}.onnx"
    if not out.is_file():
        with file_lock(out.with_suffix(".lock")):
            if not out.is_file():
                log.info("exporting %s %s -> %s", name, weights, out)
                tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
                try:
                    export(Path(weights), tmp)
                    os.replace(tmp, out)
                finally:
                    tmp.unlink(missing_ok=True)
    return out
