"""ksleepctl: talk to ksleepd from a shell.

Exit codes: 0 ok, 1 server error, 2 bad argument, 3 daemon unreachable, 4 not authorised (control token),
5 bench failed (outputs differ from the baseline, or a TTFT above the threshold).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from .client import Client
from .errors import InvalidArgument, KsleepClientError, PermissionDenied, Unauthenticated, Unavailable
from .types import Status

EXIT_OK, EXIT_SERVER, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_AUTH, EXIT_BENCH_FAILED = 0, 1, 2, 3, 4, 5
STATE_STYLE = {"awake": "bold green", "asleep": "bold blue", "sleeping": "yellow", "waking": "yellow",
               "loading": "yellow", "stopped": "bold red"}


def human(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)


def bar(used: int, total: int, width: int = 30) -> str:
    filled = round(width * used / total) if total else 0
    return "█" * filled + "░" * (width - filled) + f" {human(used)} / {human(total)}"


def status_table(s: Status) -> Table:
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="dim")
    table.add_column()
    state = f"[{STATE_STYLE.get(s.state, '')}]{s.state}[/]" + (f" (level {s.sleep_level})" if s.sleep_level else "")
    table.add_row("state", state)
    table.add_row("model", f"{s.model} on {s.device} ({human(s.weight_bytes)} of weights)")
    table.add_row("device memory", bar(s.device_used_bytes, s.device_total_bytes) + f"  [dim]({s.memory_source})[/]")
    table.add_row("worker", f"pid {s.worker_pid or '-'}, {human(s.worker_device_bytes)} on the device, "
                            f"weights {s.worker_load_source or '-'}, {s.restarts} restart(s)")
    if s.standby_pid:
        table.add_row("standby", f"pid {s.standby_pid}, warmed up and asleep")
    table.add_row("pool", human(s.pool_bytes) + (f" ({s.pool_format})" if s.pool_format else ""))
    if s.idle_timeout_seconds:
        left = max(0.0, s.idle_timeout_seconds - s.idle_seconds)
        idle = f"{s.idle_seconds:.1f} s of {s.idle_timeout_seconds:.0f} s" + (f" (sleeps in {left:.0f} s)" if s.state == "awake" else "")
    else:
        idle = f"{s.idle_seconds:.1f} s (auto-sleep off)"
    table.add_row("requests", f"{s.in_flight} in flight; idle {idle}")
    if len(s.models) > 1:
        table.add_row("models", "; ".join(
            f"{m.model}: [{STATE_STYLE.get(m.state, '')}]{m.state}[/]" + (f" (level {m.sleep_level})" if m.sleep_level else "")
            + f", {m.wakes_total} wakes" for m in s.models) + f"; {s.model_switches} switch(es)")
    if s.weights.get("number"):
        table.add_row("weights", f"version {s.weights['number']} from {s.weights['source']}")
    if s.batch:
        b = s.batch
        used, tokens = b["kv_used_tokens"], b["kv_cache_tokens"]
        table.add_row("batch", f"{b['running']} running, {b['waiting']} waiting (at most {b['max_batch']} and "
                               f"{b['max_queue']}); {b['attention']} attention, "
                               + (f"{b['graphs_captured']} CUDA graph(s)" if b["cuda_graphs"] else "eager steps")
                               + (f"; fused {', '.join(b['fused'])}" if b.get("fused") else ""))
        table.add_row("KV cache", f"{human(b['kv_cache_bytes'])} ({human(b.get('kv_mapped_bytes', 0))} mapped), "
                                  f"{tokens:,} positions, {used:,} reserved ({used / tokens:.0%})" if tokens else "-")
    for name, t in (("last sleep", s.last_sleep), ("last wake", s.last_wake)):
        if t:
            verb = "freed" if name == "last sleep" else "restored"
            table.add_row(name, f"level {t['level']}: {verb} {human(t['bytes'])} in {t['seconds']:.3f} s"
                          + (f" ({t['source']})" if t.get("source") else "")
                          + (" queued; the copy overlapped the first forward" if t.get("overlapped") else ""))
    if s.last_ttft_seconds is not None:
        table.add_row("last TTFT", f"{s.last_ttft_seconds:.3f} s")
    table.add_row("totals", f"{s.sleeps_total} sleeps, {s.wakes_total} wakes; up {s.uptime_seconds:.0f} s; v{s.version}")
    return table


def cmd_status(client: Client, args, console: Console) -> int:
    if args.json:
        print(json.dumps(client.status(history=args.history).to_dict(), indent=2))
        return EXIT_OK
    if not args.watch:
        console.print(status_table(client.status()))
        return EXIT_OK
    with Live(status_table(client.status()), console=console, refresh_per_second=4) as live:
        try:
            while True:
                time.sleep(args.watch)  # a display refresh, not a wait for a condition
                live.update(status_table(client.status()))
        except KeyboardInterrupt:
            return EXIT_OK


def cmd_sleep(client: Client, args, console: Console) -> int:
    with console.status("putting the model to sleep..."):
        r = client.sleep(args.level, abort=args.abort)
    console.print(f"asleep (level {r['level']}): freed {human(r['bytes'])} in {r['seconds']:.3f} s"
                  + (f"; aborted {r['aborted_requests']} request(s)" if r["aborted_requests"] else ""))
    return EXIT_OK


def cmd_wake(client: Client, args, console: Console) -> int:
    with console.status("waking the model..."):
        r = client.wake()
    if not r["source"]:
        console.print("already awake")
    else:
        console.print(f"awake: restored {human(r['bytes'])} in {r['seconds']:.3f} s (from {r['source']})")
    return EXIT_OK


def cmd_update_weights(client: Client, args, console: Console) -> int:
    with console.status(f"loading the weights of {args.directory}..."):
        r = client.update_weights(args.directory, abort=args.abort)
    console.print(f"serving weights version {r['weights_version']} ({r['source']}) after {r['seconds']:.2f} s; "
                  f"requests held {r['swap_seconds']:.3f} s" + (f"; aborted {r['aborted_requests']} request(s)"
                                                                if r["aborted_requests"] else ""))
    return EXIT_OK


def cmd_generate(client: Client, args, console: Console) -> int:
    params = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                  seed=args.seed, stop=args.stop or None, model=args.model or "")
    if args.json or args.no_stream:
        done = client.complete(args.prompt, **params)
        if args.json:
            print(json.dumps({k: getattr(done, k) for k in ("text", "token_ids", "finish_reason", "ttft_seconds",
                                                             "total_seconds")}))
        else:
            print(done.text)
        return EXIT_OK
    for token in client.generate(args.prompt, **params):
        sys.stdout.write(token.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return EXIT_OK


def naive_comparison(result: dict, settings, pool_prefix: str) -> dict:
    """The reference approach on the same weights, in this process (the daemon sleeps meanwhile)."""
    from ksleep.worker import Engine, WorkerConfig
    from ksleep.worker.reference import ReferenceModel

    engine = Engine.load(WorkerConfig(model=result["model"], device=result["device"], pool_prefix=pool_prefix))
    try:
        reference = ReferenceModel(engine)
    finally:
        engine.close(remove_pool=engine.load_report.pool == "created")
    try:
        return reference.measure(settings.prompt, settings.max_tokens, result["baseline"]["token_ids"])
    finally:
        reference.close()


def bench_summary(r: dict) -> Table:
    t, table = r["ttft_after_sleep"], Table(title=f"ksleep bench: {r['model']} on {r['device']}", show_header=False)
    table.add_column(style="dim")
    table.add_column()
    table.add_row("baseline", f"{len(r['baseline']['token_ids'])} tokens, TTFT awake {r['baseline']['ttft_seconds']:.3f} s")
    table.add_row("device memory", f"awake {human(r['awake']['device_used_bytes'])}, asleep "
                  f"{human(r['cycles'][0]['device_used_asleep'])} ({r['memory_source']}); freed "
                  f"{human(r['freed_median_bytes'])} = {100 * (r['freed_fraction_of_weights'] or 0):.1f} % of the weights")
    table.add_row("TTFT after sleep", f"min {t['min']:.3f} / median {t['median']:.3f} / p90 {t['p90']:.3f} / max {t['max']:.3f} s "
                  f"({len(r['cycles'])} wakes, level {r['settings']['level']})")
    table.add_row("outputs", "identical to the baseline" if r["identical"] else "[bold red]DIFFERENT from the baseline[/]")
    table.add_row("baseline text", escape(repr(r["baseline"]["text"])))  # what was compared, as the reference prints it
    table.add_row("text after wake", escape(repr(r["cycles"][-1]["text"])))
    table.add_row("memory after wake", "back to the awake figure (1 %)" if r["memory_back_within_1pct"] else "[yellow]not back within 1 %[/]")
    if "naive" in r:
        n = r["naive"]
        table.add_row("reference", f"sleep {n['sleep_s']:.2f} s, TTFT {n['ttft_after_sleep_s']:.3f} s: ksleep is "
                      f"{n['ttft_after_sleep_s'] / t['median']:.1f}x faster (identical: {n['output_identical']})")
    colour = "green" if r["verdict"] == "pass" else "red"
    table.add_row("verdict", f"[bold {colour}]{r['verdict'].upper()}[/] (every TTFT <= {r['threshold_seconds']} s, outputs identical)")
    return table


def cmd_bench(client: Client, args, console: Console) -> int:
    from .bench import BenchSettings, run_bench

    settings = BenchSettings(args.prompt, args.max_tokens, args.level, args.repeat, args.pause, args.assert_ttft)
    with console.status("running the evaluation...") as spinner:
        result = run_bench(client, settings, step=lambda message: spinner.update(message))
        if args.compare_naive:
            if result["device"] == "cpu":
                console.print("[yellow]--compare-naive skipped: on cpu, .to('cpu') moves nothing[/]")
            else:
                spinner.update("the reference approach (.to('cpu') / .to(device)) on the same weights")
                client.sleep(1)
                result["naive"] = naive_comparison(result, settings, args.pool_prefix)
    console.print(bench_summary(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
        console.print(f"figures: {args.json}")
    if args.report:
        from .report import write_report

        console.print(f"report: {write_report(result, args.report)}")
    return EXIT_OK if result["verdict"] == "pass" else EXIT_BENCH_FAILED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ksleepctl", description="Control and query ksleepd.")
    parser.add_argument("--address", help="unix:/path, /path or HOST:PORT (default $KSLEEP_ADDRESS, else ksleepd's socket)")
    parser.add_argument("--token", help="control token for sleep/wake (default $KSLEEP_CONTROL_TOKEN)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per call (default: none)")
    parser.add_argument("--connect-timeout", type=float, default=5.0, help="seconds to wait for the daemon")
    commands = parser.add_subparsers(dest="command", required=True)
    status = commands.add_parser("status", help="state, memory, idle timer, last sleep/wake")
    status.add_argument("--json", action="store_true", help="every Status field as JSON")
    status.add_argument("--history", action="store_true", help="with --json: include the memory time series")
    status.add_argument("--watch", type=float, nargs="?", const=1.0, default=None, metavar="SECONDS",
                        help="refresh every SECONDS (default 1)")
    status.set_defaults(run=cmd_status)
    sleep = commands.add_parser("sleep", help="put the model to sleep")
    sleep.add_argument("--level", type=int, choices=(1, 2, 3), help="default: the daemon's --sleep-level")
    sleep.add_argument("--abort", action="store_true", help="cancel requests in flight instead of waiting for them")
    sleep.set_defaults(run=cmd_sleep)
    wake = commands.add_parser("wake", help="wake the model")
    wake.set_defaults(run=cmd_wake)
    update = commands.add_parser("update-weights", help="serve the weights of a checkpoint directory from now on")
    update.add_argument("directory", help="a Hugging Face directory (*.safetensors, config.json) on the daemon's machine")
    update.add_argument("--abort", action="store_true", help="cancel requests in flight instead of waiting for them")
    update.set_defaults(run=cmd_update_weights)
    gen = commands.add_parser("generate", help="generate text (streams to stdout)")
    gen.add_argument("prompt")
    gen.add_argument("--model", help="one of the daemon's models (default: its first)")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--no-stream", action="store_true", help="print the text once it is complete")
    gen.add_argument("--json", action="store_true", help='print {"text", "token_ids", "finish_reason", "ttft_seconds", "total_seconds"}')
    gen.set_defaults(run=cmd_generate)
    bench = commands.add_parser("bench", help="the evaluation: baseline, sleep, TTFT after wake, identical output")
    bench.add_argument("--spawn", action="store_true", help="start (and stop) a ksleepd of our own")
    bench.add_argument("--model", default="smollm2-135m", help="with --spawn: the model (default smollm2-135m)")
    bench.add_argument("--device", default="auto", help="with --spawn: the device (default auto)")
    bench.add_argument("--prompt", default="The future of artificial intelligence is")
    bench.add_argument("--max-tokens", type=int, default=50)
    bench.add_argument("--level", type=int, choices=(1, 2, 3), default=1)
    bench.add_argument("--repeat", type=int, default=5, help="wakes to time, sleeping before each")
    bench.add_argument("--pause", type=float, default=1.0, help="seconds asleep before each request")
    bench.add_argument("--assert-ttft", type=float, metavar="SECONDS", help="fail (exit 5) if a TTFT after sleep exceeds this")
    bench.add_argument("--compare-naive", action="store_true", help="also time the reference .to('cpu')/.to(device)")
    bench.add_argument("--pool-prefix", default="ksleep", help="the daemon's --pool-prefix (for --compare-naive)")
    bench.add_argument("--json", type=Path, metavar="PATH", help="write every figure as JSON")
    bench.add_argument("--report", type=Path, metavar="DIR", help="write report.md, memory.png and bench.json")
    bench.set_defaults(run=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console, errors = Console(), Console(stderr=True)
    spawned = None
    if getattr(args, "spawn", False):
        from .spawn import SpawnedDaemon

        spawned = SpawnedDaemon(args.model, args.device)
        args.address, args.pool_prefix = spawned.address, spawned.pool_prefix
    client = Client(args.address, token=args.token, timeout=args.timeout)
    try:
        if spawned is not None:
            with console.status(f"starting ksleepd with {args.model}..."):
                spawned.wait_ready(client)
        else:
            client.wait_ready(args.connect_timeout)
        return args.run(client, args, console)
    except ValueError as exc:  # settings refused before anything was sent
        errors.print(f"[bold red]ksleepctl:[/] {exc}", highlight=False)
        return EXIT_USAGE
    except KsleepClientError as exc:
        errors.print(f"[bold red]ksleepctl:[/] {exc.code.name}: {exc.details}", highlight=False)
        if isinstance(exc, InvalidArgument):
            return EXIT_USAGE
        if isinstance(exc, (Unauthenticated, PermissionDenied)):
            return EXIT_AUTH
        if isinstance(exc, Unavailable) and "no ksleepd answers" in exc.details:
            return EXIT_UNREACHABLE
        return EXIT_SERVER
    finally:
        client.close()
        if spawned is not None:
            spawned.stop()


if __name__ == "__main__":
    sys.exit(main())
