"""`ksleepctl bench`: the evaluation protocol end to end on CPU (a daemon of its own)."""
import json
import subprocess
import sys

import pytest

from ksleep.client.bench import BenchSettings, percentile


def bench(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "ksleep.client", "bench", "--spawn", "--model", "synthetic:tiny",
                           "--device", "cpu", "--repeat", "2", "--pause", "0.1", "--max-tokens", "12", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_bench_spawns_measures_and_reports(tmp_path):
    out = bench("--json", str(tmp_path / "b.json"), "--report", str(tmp_path / "report"))
    assert out.returncode == 0, out.stdout + out.stderr
    r = json.loads((tmp_path / "b.json").read_text())
    assert r["identical"] and r["verdict"] == "pass" and len(r["cycles"]) == 2
    assert all(c["woke"] and c["identical"] and c["ttft_seconds"] > 0 for c in r["cycles"])
    assert set(r["ttft_after_sleep"]) == {"min", "median", "p90", "max"}
    assert r["baseline"]["token_ids"] and r["weight_bytes"] > 0 and r["freed_median_bytes"] is not None
    assert {h["state"] for h in r["history"]} >= {"awake", "asleep"}
    assert "baseline text" in out.stdout and "text after wake" in out.stdout  # what was compared, shown
    assert r["cycles"][-1]["text"] == r["baseline"]["text"]
    report = (tmp_path / "report" / "report.md").read_text()
    assert "TTFT after sleep" in report and "memory.png" in report
    png = (tmp_path / "report" / "memory.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_a_ttft_above_assert_ttft_fails_the_run():
    out = bench("--assert-ttft", "0.000001")
    assert out.returncode == 5 and "FAIL" in out.stdout


def test_level3_bench():
    out = bench("--level", "3", "--json", "/dev/stdout")
    assert out.returncode == 0, out.stdout + out.stderr


def test_settings_are_validated():
    with pytest.raises(ValueError):
        BenchSettings(repeat=0)
    assert percentile([4, 1, 3, 2, 5], 0.9) == 5 and percentile([1.0], 0.5) == 1.0
