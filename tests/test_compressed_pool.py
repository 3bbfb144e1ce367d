"""The compressed pool format (worker/compressed.py): same tokens as the raw pool, fewer bytes, damage caught."""
import json

import pytest

from ksleep.v1 import ksleep_pb2
from ksleep.worker import Engine, SamplingParams

from .conftest import PROMPT, SHM


def ids(engine: Engine, n: int = 8) -> list[int]:
    return engine.complete(PROMPT, SamplingParams(max_tokens=n)).token_ids


def pool_file(engine: Engine, suffix: str = ".pool"):
    return SHM / f"{engine.pool_name}{suffix}" if suffix == ".pool" else SHM / f"{engine.pool_name}.manifest.json"


def test_a_compressed_pool_gives_the_raw_pools_tokens_with_fewer_bytes(open_engine, make_config):
    raw = open_engine(pool_format="raw")
    baseline = ids(raw)
    coded = open_engine(pool_format="compressed")
    assert coded.pool_name != raw.pool_name  # a pool of one format is never taken for the other
    assert ids(coded) == baseline
    manifest = json.loads(pool_file(coded, ".manifest").read_text())
    assert manifest["format"] == "compressed" and any(c[4] for c in manifest["chunks"])
    assert coded.memory().mirror_bytes < 0.7 * raw.memory().mirror_bytes
    for level in (1, 2):  # level 2 drops the pool: the wake codes the weights again
        coded.sleep(level)
        assert coded.memory().resident_bytes == 0
        coded.wake()
        assert ids(coded) == baseline
    attached = Engine.load(make_config(pool_format="compressed"), awake=False)  # a second worker on the pool
    try:
        assert attached.load_report.pool == "attached"
        assert attached.wake().verified and ids(attached) == baseline
    finally:
        attached.close()


@pytest.mark.parametrize("section", ["words", "table", "sign_mantissa"])
def test_a_damaged_chunk_or_code_table_is_caught_by_the_checksum_and_rebuilt(open_engine, section):
    engine = open_engine(pool_format="compressed")
    baseline = ids(engine)
    engine.sleep(1)
    entry = next(c for c in engine.weights.pool.manifest.chunks if c.coded)
    table, _, words, sm = entry.sections()
    at = entry.offset + {"table": table + 4 * 100, "words": words + 64, "sign_mantissa": sm + 10}[section]
    with open(pool_file(engine), "r+b") as f:
        f.seek(at)
        original = f.read(32)
        f.seek(at)
        f.write(bytes(b ^ 0x5A for b in original))
    woke = engine.wake()
    assert woke.source == "source"  # the wake's checksums failed: rebuilt from the model source
    assert ids(engine) == baseline
    with open(pool_file(engine), "rb") as f:
        f.seek(at)
        assert f.read(32) == original  # the rebuilt pool is the same pool


def test_a_pool_of_the_other_format_under_our_name_is_not_used(open_engine, make_config, prefix):
    raw = open_engine(pool_format="raw")
    baseline = ids(raw)
    raw.close()
    coded_name = Engine.load(make_config(pool_format="compressed"), awake=False)  # no pool yet: asleep, level 2
    name = coded_name.pool_name
    coded_name.close()
    data = (SHM / f"{raw.pool_name}.pool").read_bytes()
    manifest = json.loads((SHM / f"{raw.pool_name}.manifest.json").read_text())
    manifest["name"] = name
    (SHM / f"{name}.pool").write_bytes(data)
    (SHM / f"{name}.pool").chmod(0o600)
    (SHM / f"{name}.manifest.json").write_text(json.dumps(manifest))
    (SHM / f"{name}.manifest.json").chmod(0o600)
    engine = open_engine(pool_format="compressed")
    assert engine.load_report.pool == "rebuilt"  # the raw pool was refused, and a compressed one built
    assert engine.weights.pool.manifest.format == "compressed" and ids(engine) == baseline
    (SHM / f"{raw.pool_name}.pool").unlink()
    (SHM / f"{raw.pool_name}.manifest.json").unlink()


def test_kept_layers_restore_only_their_chunks(open_engine):
    baseline = ids(open_engine(pool_format="raw"))
    engine = open_engine(pool_format="compressed", keep_layers=1)
    assert ids(engine) == baseline
    engine.sleep(1)
    assert engine.memory().resident_bytes > 0
    engine.wake()
    assert ids(engine) == baseline


def test_the_embedded_real_model_compresses_to_two_thirds_with_identical_tokens(open_engine):
    raw = open_engine("smollm2-135m", pool_format="raw")
    baseline = ids(raw, 12)
    raw_bytes = raw.memory().mirror_bytes
    raw.close(remove_pool=True)
    coded = open_engine("smollm2-135m", pool_format="compressed")
    assert ids(coded, 12) == baseline
    ratio = coded.memory().mirror_bytes / raw_bytes
    assert ratio < 0.72, ratio
    coded.sleep(1)
    coded.wake()
    assert ids(coded, 12) == baseline


def test_pool_format_settings_are_checked(make_config):
    with pytest.raises(ValueError, match="pool_format"):
        make_config(pool_format="zip")
    with pytest.raises(ValueError, match="bfloat16"):
        make_config(pool_format="compressed", dtype="float32")
    assert make_config().pool_format == "auto"


def test_auto_is_raw_on_cpu(open_engine):
    engine = open_engine()
    assert engine.weights.pool_format == "raw"


def test_the_daemon_reports_its_pool_format(tmp_path, prefix):
    from .daemon import Daemon

    daemon = Daemon(tmp_path, prefix, "synthetic:tiny", "--pool-format", "compressed", "--idle-timeout", "0").wait_ready()
    try:
        status = daemon.status()
        assert status.pool_format == "compressed" and status.pool_bytes > 0
        baseline = daemon.ids()
        daemon.stub.Sleep(ksleep_pb2.SleepRequest(level=1), timeout=60)
        assert daemon.ids() == baseline
    finally:
        daemon.stop()
