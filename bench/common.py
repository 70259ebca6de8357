"""Helpers shared by the benchmarks: machine description, peak memory, tables, JSON and plots."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "models" / "digits-dit"


def machine_description(device: str = "cpu", threads: int | None = None) -> str:
    """One line: CPU model and cores (or the GPU), torch version and threads, OS, commit."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    parts = [f"{cpu} ({os.cpu_count()} logical cores)"]
    if device.startswith("cuda") and torch.cuda.is_available():
        parts.append(torch.cuda.get_device_name(torch.device(device)))
    parts.append(f"torch {torch.__version__}, {threads or torch.get_num_threads()} thread(s)")
    parts.append(f"{platform.system()} {platform.release()}")
    commit = git_commit()
    if commit:
        parts.append(f"commit {commit}")
    return "; ".join(parts)


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def command_line(module: str, argv: Sequence[str] | None = None) -> str:
    """How this benchmark was invoked, as ``python -m <module> <args>``."""
    import shlex

    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python", "-m", module, *(shlex.quote(a) for a in args)])


class PeakMemory:
    """Peak memory over one or more measurement windows.

    On CUDA it is ``torch.cuda.max_memory_allocated`` (reset by :meth:`reset`). On CPU it is the peak
    resident set size (RSS) of this whole process, sampled every ``interval`` seconds by a background
    thread while a window is open (and once at each window's start and end). RSS includes the
    interpreter, libraries, model weights and memory the allocator keeps after freeing it, so on CPU
    the figure is an upper bound that moves little between methods.
    """

    def __init__(self, device: str = "cpu", interval: float = 0.005) -> None:
        self.device = device
        self.cuda = device.startswith("cuda")
        self.interval = interval
        self.peak = 0
        self._active = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._process = None
        if not self.cuda:
            import psutil

            self._process = psutil.Process()
            self._thread = threading.Thread(target=self._sample_loop, name="rss-sampler", daemon=True)
            self._thread.start()

    def _rss(self) -> int:
        try:
            return int(self._process.memory_info().rss)
        except Exception:  # the process table can be briefly unreadable; skip the sample
            return 0

    def _sample_loop(self) -> None:
        while not self._stop.is_set():
            if self._active.wait(timeout=0.2):
                self.peak = max(self.peak, self._rss())
                time.sleep(self.interval)

    def reset(self) -> None:
        self.peak = 0
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    @contextmanager
    def window(self) -> Iterator[None]:
        if self.cuda:
            import torch

            try:
                yield
            finally:
                torch.cuda.synchronize(self.device)
                self.peak = max(self.peak, int(torch.cuda.max_memory_allocated(self.device)))
            return
        self.peak = max(self.peak, self._rss())
        self._active.set()
        try:
            yield
        finally:
            self._active.clear()
            self.peak = max(self.peak, self._rss())

    def close(self) -> None:
        self._stop.set()
        self._active.set()
        if self._thread is not None:
            self._thread.join(timeout=2)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: ``n/a`` for None/NaN, fixed decimals for floats."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def clean_number(value: Any, digits: int = 6) -> Any:
    """JSON-safe number: ``None`` for NaN/inf, rounded floats."""
    if value is None:
        return None
    value = float(value)
    if not math.isfinite(value):
        return None
    return round(value, digits)


def write_json(path: str | Path, data: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display), or a clear error."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - matplotlib is in the bench extra
        raise SystemExit("--plot needs matplotlib: pip install 'fastcache-serve[bench]'") from error
    return plt


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100, linear interpolation), ``None`` for no values."""
    if not values:
        return None
    ordered = sorted(values)
    if len(ordered) == 1:
        return float(ordered[0])
    position = (len(ordered) - 1) * q / 100.0
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (position - low))
