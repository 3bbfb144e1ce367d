"""The forkserver: a process that imports torch and transformers once, never touches the GPU, and forks a
worker whenever ksleepd asks (first start, restart after a crash, wake from a level-3 sleep).

A fresh `python` worker spends ~9 s importing before it touches the GPU; a fork of this process starts at the
GPU, with the model's skeleton and tokenizer already built (inherited copy-on-write).

Protocol (framing.py): ForkRequest messages on stdin; ForkserverEvent messages on stdout. The forkserver is
single-threaded, so forking is safe; it reaps its children and reports each exit. It stops, terminating its
workers, when stdin closes (ksleepd is gone).

    python -m ksleep.worker.forkserver
"""
from __future__ import annotations

import logging
import os
import selectors
import signal
import sys
import time
import traceback

log = logging.getLogger("ksleep.forkserver")


def main() -> int:
    t0 = time.perf_counter()
    # torch.cuda.is_available() through NVML, without initialising CUDA in this process: forks stay usable.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # no Rust thread pool to break across fork()
    logging.basicConfig(level=os.environ.get("KSLEEP_LOG_LEVEL", "INFO").upper(), stream=sys.stderr,
                        format=f"%(asctime)s forkserver[{os.getpid()}] %(levelname)s %(name)s: %(message)s")
    # Private copies of the protocol pipes; fd 1 becomes stderr so that no stray print corrupts the protocol.
    requests, events = os.dup(0), os.dup(1)
    os.dup2(2, 1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    from ksleep.v1 import forkserver_pb2

    from . import framing
    from .config import WorkerConfig
    from .errors import KsleepError
    from .prepared import PreparedModel

    import torch  # noqa: F401  (the point of this process)
    import transformers  # noqa: F401

    prepared: dict[tuple, PreparedModel] = {}
    children: set[int] = set()

    def send(**event) -> None:
        try:
            os.write(events, framing.encode(forkserver_pb2.ForkserverEvent(**event)))
        except BrokenPipeError:  # ksleepd is gone; the loop ends at the next read of its closed pipe
            pass

    def prepare(settings) -> PreparedModel:
        config = WorkerConfig.from_pb(settings)
        device_type = "cpu" if config.device == "cpu" else ("cuda" if config.device != "auto" or torch.cuda.is_available() else "cpu")
        key = (config.model, config.dtype, config.keep_layers, device_type, str(config.cache_dir), str(config.model_dir))
        if key not in prepared:
            prepared[key] = PreparedModel.build(config, device_type)
        return prepared[key]

    def fork(settings) -> None:
        try:
            model = prepare(settings)
        except Exception as exc:  # noqa: BLE001 - reported to ksleepd, which keeps serving
            status = exc.status if isinstance(exc, KsleepError) else ("INVALID_ARGUMENT" if isinstance(exc, ValueError) else "INTERNAL")
            log.error("cannot prepare %s: %s", settings.model, exc)
            send(rejected=forkserver_pb2.ForkserverEvent.Rejected(error=str(exc), status=status))
            return
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                for fd in (requests, events, wake_read, wake_write):
                    os.close(fd)
                from .process import run_worker

                code = run_worker(settings, model)
            except BaseException:  # noqa: BLE001 - a child must never return into the forkserver's loop
                traceback.print_exc()
            finally:
                os._exit(code)
        children.add(pid)
        send(started=forkserver_pb2.ForkserverEvent.Started(pid=pid))

    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_write)
    selector = selectors.DefaultSelector()
    selector.register(requests, selectors.EVENT_READ, "request")
    selector.register(wake_read, selectors.EVENT_READ, "child")
    send(ready=forkserver_pb2.ForkserverEvent.Ready(pid=os.getpid(), preload_seconds=time.perf_counter() - t0))
    running = True
    while running:
        for key, _ in selector.select():
            if key.data == "child":
                os.read(wake_read, 4096)
                while children:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                    if pid == 0:
                        break
                    children.discard(pid)
                    send(exited=forkserver_pb2.ForkserverEvent.Exited(pid=pid, returncode=os.waitstatus_to_exitcode(status)))
            else:
                request = framing.read_blocking(requests, forkserver_pb2.ForkRequest)
                if request is None:
                    running = False
                    break
                fork(request.settings)
    for pid in children:  # ksleepd is gone: no worker may outlive it
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
