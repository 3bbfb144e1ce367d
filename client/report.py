"""--report DIR: a Markdown report and a PNG of device memory over time, states shaded, each TTFT marked."""
from __future__ import annotations

import json
from pathlib import Path

STATE_COLOURS = {"awake": "#d9f2d9", "asleep": "#d6e4f5", "sleeping": "#fff2cc", "waking": "#ffe0b3",
                 "loading": "#eeeeee", "stopped": "#f8d0d0"}


def gb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e9:.2f} GB"


def write_plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = result["started_unix"]
    history = [h for h in result["history"] if h["at_unix"] >= t0 - 1.0] or result["history"]
    times = [h["at_unix"] - t0 for h in history]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.plot(times, [h["device_used_bytes"] / 1e9 for h in history], color="black", lw=1.2, label="device used",
            drawstyle="steps-post")
    if any(h["worker_device_bytes"] is not None for h in history):
        ax.plot(times, [(h["worker_device_bytes"] or 0) / 1e9 for h in history], color="grey", lw=0.8, ls="--",
                label="worker process", drawstyle="steps-post")
    for i, h in enumerate(history[:-1]):  # shade each interval by the state at its start
        ax.axvspan(times[i], times[i + 1], color=STATE_COLOURS.get(h["state"], "white"), lw=0)
    for c in result["cycles"]:
        x = c["sent_unix"] - t0
        ax.axvline(x, color="red", lw=0.8)
        ax.annotate(f"TTFT {c['ttft_seconds']:.2f}s", (x, ax.get_ylim()[1] * 0.95), rotation=90, fontsize=7,
                    color="red", ha="right", va="top")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in STATE_COLOURS.values()]
    first = ax.legend(loc="upper left", fontsize=8)
    ax.add_artist(first)
    ax.legend(handles, list(STATE_COLOURS), loc="upper right", fontsize=7, title="state", title_fontsize=7)
    ax.set_xlabel("seconds since the start of the benchmark")
    ax.set_ylabel("GB")
    ax.set_title(f"{result['model']} on {result['device']}: device memory across sleep/wake")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(result: dict, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "bench.json").write_text(json.dumps(result, indent=1))
    write_plot(result, directory / "memory.png")
    t = result["ttft_after_sleep"]
    lines = [
        f"# ksleep bench: {result['model']} on {result['device']}", "",
        f"Prompt {result['settings']['prompt']!r}, {result['settings']['max_tokens']} tokens, greedy; sleep level "
        f"{result['settings']['level']}, {result['settings']['repeat']} wakes, {result['settings']['pause']} s asleep before each.", "",
        "| figure | value |", "|---|---|",
        f"| weight bytes | {result['weight_bytes']:,} |",
        f"| TTFT awake | {result['baseline']['ttft_seconds']:.3f} s |",
        f"| TTFT after sleep (wake included) min / median / p90 / max | {t['min']:.3f} / {t['median']:.3f} / {t['p90']:.3f} / {t['max']:.3f} s |",
        f"| device memory awake / asleep | {gb(result['awake']['device_used_bytes'])} / {gb(result['cycles'][0]['device_used_asleep'])} ({result['memory_source']}) |",
        f"| freed (median) | {gb(result['freed_median_bytes'])} = {100 * (result['freed_fraction_of_weights'] or 0):.1f} % of the weights |",
        f"| memory back after wake (within 1 %) | {result['memory_back_within_1pct']} |",
        f"| outputs identical to the baseline | {result['identical']} |",
        f"| verdict (every TTFT <= {result['threshold_seconds']} s, identical) | **{result['verdict']}** |",
    ]
    if "naive" in result:
        n = result["naive"]
        lines += [f"| reference (`.to('cpu')`/`.to(device)`) sleep / TTFT | {n['sleep_s']:.2f} s / {n['ttft_after_sleep_s']:.3f} s |",
                  f"| ksleep median TTFT vs reference | {n['ttft_after_sleep_s'] / t['median']:.1f}x faster |",
                  f"| reference output identical | {n['output_identical']} |"]
    lines += ["", "![device memory](memory.png)", "", f"Baseline text: {result['baseline']['text']!r}", ""]
    path = directory / "report.md"
    path.write_text("\n".join(lines))
    return path
