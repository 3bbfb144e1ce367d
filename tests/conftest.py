"""Shared fixtures. Every pool a test makes carries this session's prefix, and the session fails if any of
them is still in /dev/shm at the end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ksleep.worker import Engine, WorkerConfig

SHM = Path("/dev/shm")
PREFIX = f"ksleep-test-{os.getpid()}"
PROMPT = "The future of artificial intelligence is"


@pytest.fixture(scope="session", autouse=True)
def no_pool_outlives_the_session():
    yield
    leftovers = sorted(p.name for p in SHM.glob(f"{PREFIX}*"))
    for name in leftovers:
        (SHM / name).unlink(missing_ok=True)
    assert not leftovers, f"pools left in /dev/shm: {leftovers}"


@pytest.fixture
def prefix(request) -> str:
    """A pool prefix private to one test, so tests never attach to each other's pools."""
    return f"{PREFIX}-{request.node.name[:40].replace('[', '-').replace(']', '')}"


@pytest.fixture
def make_config(prefix):
    def make(model: str = "synthetic:tiny", **kw) -> WorkerConfig:
        return WorkerConfig(model=model, device="cpu", pool_prefix=prefix, **kw)

    return make


@pytest.fixture
def open_engine(make_config):
    """Load engines that are closed, and their pools removed, when the test ends."""
    engines: list[Engine] = []

    def load(model: str = "synthetic:tiny", **kw) -> Engine:
        engine = Engine.load(make_config(model, **kw))
        engines.append(engine)
        return engine

    yield load
    for engine in engines:
        engine.close(remove_pool=True)


def pool_files(prefix: str) -> list[Path]:
    return sorted(SHM.glob(f"{prefix}*"))


def run_in_new_process(config: WorkerConfig, prompt: str, max_tokens: int) -> dict:
    """Load `config` in a fresh interpreter (a second worker), generate greedily, report what happened."""
    code = textwrap.dedent(f"""
        import json
        from ksleep.worker import Engine, WorkerConfig, SamplingParams
        engine = Engine.load(WorkerConfig(model={config.model!r}, device="cpu", pool_prefix={config.pool_prefix!r},
                                          cache_dir={str(config.cache_dir)!r}))
        out = engine.complete({prompt!r}, SamplingParams(max_tokens={max_tokens}))
        print(json.dumps({{"pool": engine.load_report.pool, "token_ids": out.token_ids, "text": out.text}}))
        engine.close()
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
