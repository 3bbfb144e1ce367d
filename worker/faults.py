"""Fault injection for tests and drills, off unless a KSLEEP_FAULT_* variable is set in the worker's
environment (read at the moment of use, never at import):

  KSLEEP_FAULT_ALLOC_FAIL_FILE=/path   while /path exists, arena allocations fail as if another process held
                                       the device memory (DeviceMemoryError -> RESOURCE_EXHAUSTED)
  KSLEEP_FAULT_TRANSITION_DELAY=SECONDS  every sleep and wake takes that much longer (to kill a worker inside one)
  KSLEEP_FAULT_SHM_FREE_BYTES=N        pretend the pool's filesystem has N bytes free
  KSLEEP_FAULT_STEP_DELAY=SECONDS      every batch step takes that much longer (a slow device: queues fill)
"""
from __future__ import annotations

import os
import time

from .errors import DeviceMemoryError


def check_allocation(nbytes: int) -> None:
    flag = os.environ.get("KSLEEP_FAULT_ALLOC_FAIL_FILE")
    if flag and os.path.exists(flag):
        raise DeviceMemoryError(f"no room on the device for {nbytes:,} bytes of weights (fault injected by {flag})")


def transition_delay() -> None:
    seconds = float(os.environ.get("KSLEEP_FAULT_TRANSITION_DELAY", "0") or 0)
    if seconds > 0:
        time.sleep(seconds)


def step_delay() -> None:
    seconds = float(os.environ.get("KSLEEP_FAULT_STEP_DELAY", "0") or 0)
    if seconds > 0:
        time.sleep(seconds)


def shm_free_override() -> int | None:
    value = os.environ.get("KSLEEP_FAULT_SHM_FREE_BYTES")
    return int(value) if value else None
