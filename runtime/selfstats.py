"""A process's own counters, written to ``TWOPHASE_STATS_FILE`` for ``twophase bench``.

The benchmark counts messages and forced log writes instead of assuming them: each service
rewrites this small JSON file about twice a second (atomically, by rename).
"""

from __future__ import annotations

import json
import os
import resource
from pathlib import Path
from typing import Any

ENV = "TWOPHASE_STATS_FILE"


def usage() -> dict[str, float]:
    """CPU seconds (user + system) and peak RSS in MiB of this process."""
    self = resource.getrusage(resource.RUSAGE_SELF)
    return {"cpu_s": self.ru_utime + self.ru_stime, "peak_rss_mib": _peak_rss_mib(self)}


def _peak_rss_mib(self: resource.struct_rusage) -> float:
    # ru_maxrss survives execve on Linux, so a child would report its parent's peak;
    # VmHWM belongs to this process image alone.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return self.ru_maxrss / 1024


def write(path: str, counters: dict[str, Any]) -> None:
    target = Path(path)
    temporary = target.with_suffix(".tmp")
    temporary.write_text(json.dumps({**counters, **usage(), "pid": os.getpid()}))
    temporary.replace(target)


def read(path: Path) -> dict[str, Any] | None:
    try:
        loaded: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return loaded
