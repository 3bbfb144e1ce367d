"""UpdateWeights: new weights for the served model (the RL loop), without a restart.

Admission closes and the requests in flight finish (at most --drain-timeout, or are cancelled: SLEEP_MODE_ABORT),
exactly as for a sleep; then the worker builds the new pool beside the old one, swaps it in between steps and wakes
on it (worker/update.py). A model asleep at level 3 has no worker: one is started asleep for the update and stopped
again, and the pool it built waits for the next wake. From then on every worker this daemon starts (a restart, the
standby, a level-3 wake) loads the new weights, and Status and every Generate summary name them.
"""
from __future__ import annotations

import logging

from ksleep.v1 import common_pb2, ksleep_pb2, worker_pb2
from ksleep.worker.errors import StateError, ValidationError

from .workers import STATUS_DEADLINE

log = logging.getLogger("ksleep.updates")
UPDATE_DEADLINE = 1800.0  # seconds a worker may take to build the new pool (a 15 GB checkpoint from a slow disk)


class Updates:
    async def update_weights(self, directory: str, mode: int) -> ksleep_pb2.UpdateWeightsResponse:
        if not directory.strip():
            raise ValidationError("directory must name a checkpoint directory")
        with self._gate.closed():
            try:
                aborted = await self._drain_or_abort(mode)
                async with self._lock:
                    reply = await self._update_locked(directory)
            finally:
                self._touch()
        log.info("weights updated to version %d from %s in %.2f s (requests held %.3f s)", reply.weights.number,
                 reply.weights.source, reply.seconds, reply.swap_seconds)
        return ksleep_pb2.UpdateWeightsResponse(weights=reply.weights, seconds=reply.seconds,
                                                stage_seconds=reply.stage_seconds, swap_seconds=reply.swap_seconds,
                                                pool=reply.pool, aborted_requests=aborted)

    async def _update_locked(self, directory: str) -> worker_pb2.WorkerUpdateWeightsResponse:
        started = None
        if self.worker is None:
            if self.state != common_pb2.STATE_ASLEEP:
                raise StateError("no worker is running (it is restarting); update once it is up")
            await self._spawn(start_asleep=True)  # level 3: a worker only for the update
            started = self.worker
        worker = self.worker
        try:
            reply = await worker.stub.UpdateWeights(
                worker_pb2.WorkerUpdateWeightsRequest(directory=directory, abort=True), timeout=UPDATE_DEADLINE)
            self.weights = reply.weights
            # (its pool's name: what this daemon's shutdown removes)
            self.worker_info = await worker.stub.Status(worker_pb2.WorkerStatusRequest(), timeout=STATUS_DEADLINE)
        finally:
            if started is not None:
                self.worker = None
                await started.stop(self.config.grace)
        if self.state == common_pb2.STATE_ASLEEP and self.sleep_level >= 2 and started is None:
            self.sleep_level = 1  # the worker holds the new pool now
        await self.standby.stop(self.config.grace)  # a spare loaded with the old weights would serve them
        self._fill_standby()
        return reply
