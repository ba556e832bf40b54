"""Thread-safe counters of a node and their ``diagnostic_msgs/DiagnosticStatus``."""
from __future__ import annotations

import threading
import time
from collections import deque
from typing import Optional

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue


class Stats:
    """Counters (monotonic), gauges (current values) and latency windows, read as one snapshot."""

    def __init__(self, window: int = 100):
        self._lock = threading.Lock()
        self._counts: dict[str, int] = {}
        self._gauges: dict[str, float] = {}
        self._lat: dict[str, deque] = {}
        self._window = window
        self._rate_t0 = time.monotonic()
        self._rate_n0: dict[str, int] = {}
        self.last_error = ""

    def inc(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counts[name] = self._counts.get(name, 0) + n

    def set(self, name: str, value: float) -> None:
        with self._lock:
            self._gauges[name] = value

    def latency(self, name: str, ms: float) -> None:
        with self._lock:
            self._lat.setdefault(name, deque(maxlen=self._window)).append(ms)

    def error(self, name: str, message: str) -> None:
        with self._lock:
            self._counts[name] = self._counts.get(name, 0) + 1
            self.last_error = message

    def count(self, name: str) -> int:
        with self._lock:
            return self._counts.get(name, 0)

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            out: dict[str, float] = dict(self._counts)
            out.update(self._gauges)
            for k, v in self._lat.items():
                if v:
                    out[f"{k}_ms_median"] = float(np.median(v))
                    out[f"{k}_ms_max"] = float(np.max(v))
            return out

    def rate(self, name: str) -> float:
        """Events per second of counter ``name`` since the previous call."""
        with self._lock:
            now = time.monotonic()
            n = self._counts.get(name, 0)
            dt = now - self._rate_t0 if name in self._rate_n0 else 0.0
            r = (n - self._rate_n0.get(name, n)) / dt if dt > 0 else 0.0
            self._rate_n0[name] = n
            self._rate_t0 = now
            return r


def status_array(stamp, name: str, hardware_id: str, values: dict[str, float], level: bytes,
                 message: str) -> DiagnosticArray:
    st = DiagnosticStatus(level=level, name=name, hardware_id=hardware_id, message=message)
    st.values = [KeyValue(key=k, value=_fmt(v)) for k, v in sorted(values.items())]
    return DiagnosticArray(header=_header(stamp), status=[st])


def _header(stamp):
    from std_msgs.msg import Header
    return Header(stamp=stamp)


def _fmt(v) -> str:
    if isinstance(v, float) and not float(v).is_integer():
        return f"{v:.3f}"
    return str(int(v)) if isinstance(v, (int, float)) else str(v)


def level_of(errors_delta: int, warnings_delta: int, fatal: Optional[str] = None) -> bytes:
    """ERROR when the node cannot work, WARN when inputs were lost or bad since the last report."""
    if fatal:
        return DiagnosticStatus.ERROR
    if errors_delta or warnings_delta:
        return DiagnosticStatus.WARN
    return DiagnosticStatus.OK
