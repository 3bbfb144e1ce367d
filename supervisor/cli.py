"""`ksleepd start`: run the daemon in the foreground (under systemd, docker or a terminal)."""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
import socket
import sys
from pathlib import Path

from .config import DaemonConfig

SERVER_EXTRAS = "ksleepd needs the server's packages (torch, transformers...): pip install 'ksleep[server]'"


async def start_http(config: DaemonConfig, service):
    from .http import HttpFace  # fastapi and uvicorn are imported only when the HTTP face is on

    face = HttpFace(config, service)
    await face.start()
    return face

log = logging.getLogger("ksleepd")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ksleepd", description="ksleep: sleep-mode LLM serving daemon")
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", help="run the daemon in the foreground",
                                description="Every option is also a KSLEEP_<NAME> environment variable and a key of the "
                                            "TOML file given by --config (flags win, then the environment, then the file).")
    start.add_argument("--config", metavar="FILE", help="TOML file of settings (also KSLEEP_CONFIG)")
    for f in dataclasses.fields(DaemonConfig):
        if not f.metadata.get("flag", True):
            continue
        if f.name == "model":  # repeatable: several models in one daemon
            start.add_argument("--model", action="append", default=None, metavar="MODEL",
                               help=f"{f.metadata['help']}; repeat for several models, the first the default "
                                    f"(default {f.default!r}; env KSLEEP_MODEL)")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        helptext = f"{f.metadata['help']} (default {default!r}; env KSLEEP_{f.name.upper()})"
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            start.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=helptext)
        else:
            kind = {"str": str, "float": float, "int": int}.get(f.type, f.type)
            start.add_argument(flag, type=kind, default=None, metavar=f.name.upper(), help=helptext)
    return parser


def claim_socket(path: Path) -> None:
    """Remove a stale unix socket; refuse one another live process still listens on."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not path.exists():
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # nobody listens: left by a daemon that died
        return
    finally:
        probe.close()
    raise OSError(f"{path} is taken: another ksleepd is listening there (stop it or pass --listen)")


async def serve(config: DaemonConfig) -> int:
    from .registry import ModelRegistry  # (the server's stack: not in a client-only install)
    from .server import KsleepService, build_server

    if config.unix_socket:
        claim_socket(config.unix_socket)
    models = ModelRegistry.from_config(config)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    starting = asyncio.create_task(models.start())
    await asyncio.wait([starting, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
    if not starting.done() or starting.exception() is not None:
        error = starting.exception() if starting.done() else None
        starting.cancel()
        if error is not None:
            log.error("cannot start: %s", error)
        await models.stop()
        return 1 if error is not None else 0
    service = KsleepService(models, models.metrics)
    server, health = await build_server(config, service)
    http = await start_http(config, service) if config.http else None
    await server.start()
    await health.refresh()
    log.info("ksleepd serving %s on %s (idle timeout %s s, sleep level %d)", ", ".join(models.lifecycles),
             config.listen, config.idle_timeout, config.sleep_level)
    await stop.wait()
    log.info("shutting down")
    await health.enter_graceful_shutdown()
    if http is not None:
        await http.stop()
    await server.stop(config.grace)
    await models.stop()
    if config.unix_socket:
        config.unix_socket.unlink(missing_ok=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    toml_path = args.pop("config")
    args.pop("command")
    try:
        config = DaemonConfig.load(args, toml_path=toml_path)
    except (ValueError, OSError) as exc:
        parser.error(str(exc))
    logging.basicConfig(level=config.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s ksleepd %(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(serve(config))
    except ModuleNotFoundError as exc:
        log.error("%s (%s)", SERVER_EXTRAS, exc)
        return 2
    except OSError as exc:
        log.error("%s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
