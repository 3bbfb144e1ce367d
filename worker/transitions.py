"""The engine's transitions: sleep, wake and new weights, each a command its thread runs between steps
(engine.py). A mixin of Engine: it uses the engine's thread (`_call`), scheduler, KV cache, runner and weights."""
from __future__ import annotations

import time
from pathlib import Path

from .errors import BusyError, SleepAbortError, ValidationError
from .poolfiles import remove_pool_files
from .reports import SleepResult, WakeResult
from .update import UpdateResult, WeightsVersion, checkpoint_source, stage_pool
from .weights import WeightState

GATHER_SECONDS = 0.05  # the most a wake holds its first step for the requests the supervisor said are coming
# ... and at least this share of its copy's expected time (at 200 GB/s: ~10 % of a PCIe 5 copy), which costs nothing:
# the first layers' weights land only then, and requests that arrive meanwhile join the first step
SHADOW_BYTES_PER_SECOND = 200e9


class Transitions:
    # -- sleep and wake -------------------------------------------------------------------------------------
    @property
    def state(self) -> WeightState:
        return self.weights.state

    @property
    def sleep_level(self) -> int:
        return self.weights.sleep_level

    @property
    def streams(self) -> int:
        """Requests running or waiting for the batch."""
        return len(self.scheduler.running) + len(self.scheduler.waiting)

    def sleep(self, level: int = 1, abort: bool = False) -> SleepResult:
        """Level 1: release the device arena (weights and KV cache) and torch's cached blocks; the mirror stays.
        Level 2: also drop the mirror (wake reloads from the model source). Refused (BusyError) while requests run
        or wait, unless `abort`, which ends them (their streams raise SleepAbortError)."""
        if level not in (1, 2):
            raise ValidationError(f"sleep level must be 1 or 2, got {level!r}")
        return self._call(self._sleep, level, abort)

    def _sleep(self, level: int, abort: bool) -> SleepResult:
        self.weights.check_open()
        if self.scheduler.has_work:
            if not abort:
                raise BusyError(f"{self.streams} generation(s) still running or waiting; sleep after they finish")
            self._fail(self.scheduler.drain(), SleepAbortError("cancelled: the model was put to sleep"))
        self._gather = None
        if self.weights.state is WeightState.AWAKE:
            self.kv_cache.unbind()
            if not self.weights.arena.stable_addresses:
                self.runner.forget_graphs()  # they captured the arena's addresses, which are about to be freed
        return self.weights.sleep(level)

    def wake(self, overlap: bool = False, waiting: int = 0) -> WakeResult:
        """One bulk copy from the pinned mirror (after level 1) or a reload from the source (after level 2).
        Raises DeviceMemoryError, and stays asleep, when the device has no room.

        `overlap` (from the mirror): return as soon as the copy is queued; the next step runs behind it layer by
        layer, so a request's first token costs about the copy alone. `seconds` then covers only the allocation
        and queueing; the copy's verification is settled by that step (or by the next sleep). `waiting`: requests
        on their way; the first step waits for them (at most GATHER_SECONDS) so that they run together."""
        return self._call(self._wake, overlap, waiting)

    def _wake(self, overlap: bool, waiting: int) -> WakeResult:
        result = self.weights.wake(overlap)
        if result.source != "none":
            self.kv_cache.bind(self.weights.arena.scratch())
            if waiting and result.overlapped:
                now = time.monotonic()
                shadow = min(GATHER_SECONDS, result.bytes_restored / SHADOW_BYTES_PER_SECOND)
                self._gather = (waiting, now + shadow, now + GATHER_SECONDS)
        return result

    def update_weights(self, directory: str, abort: bool = False) -> UpdateResult:
        """Serve the weights of a checkpoint directory (safetensors) from now on; see update.py. Raises
        ValidationError when they do not fit the model (nothing changes), BusyError while requests run or wait
        (unless `abort`, which ends them)."""
        started = time.perf_counter()
        folder = Path(directory).expanduser()
        if folder.is_dir() and any(folder.glob("*.safetensors")) and not (folder / "config.json").exists():
            # tensors alone (client.WeightWriter): made a complete checkpoint of this model, before its identity
            self.skeleton.config.save_pretrained(folder)
            self.tokenizer.save_pretrained(folder)
        source = checkpoint_source(folder, self.config.trust_remote_code)
        pool, how = stage_pool(self.weights, source)
        staged = time.perf_counter()
        try:
            self._call(self._swap_weights, pool, source, abort)
        except BaseException:
            pool.close()
            remove_pool_files(self.config.shm_dir, pool.manifest.name)
            raise
        done = time.perf_counter()
        return UpdateResult(self.weights_version, done - started, staged - started, done - staged, how)

    def _swap_weights(self, pool, source, abort: bool) -> None:
        awake = self.weights.state is WeightState.AWAKE
        if awake:
            self._sleep(1, abort)  # BusyError (nothing changed) while requests run, unless abort
        self.weights.swap(pool, source)
        self.weights_version = WeightsVersion(self.weights_version.number + 1, source.name)
        if awake:
            self._wake(False, 0)

    def wait_pinned(self) -> None:
        """Block until the mirror is page-locked, so that the next wake copies at full DMA speed (no-op on CPU)."""
        self._call(self.weights.wait_pinned)
