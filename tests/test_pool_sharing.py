"""A pool shared by several handles (workers, possibly of different daemons): removal waits for the last one, and
closing a handle never unmaps memory a live tensor view still reads."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap

from ksleep.worker import Engine
from ksleep.worker.pool import BLOCK_BYTES, WeightPool
from ksleep.worker.poolfiles import remove_pool_files

from .conftest import SHM, pool_files


def _mapped(ino: int) -> bool:
    """Whether this process maps the file with inode `ino` (whatever its name now, deleted or not)."""
    with open("/proc/self/maps") as maps:
        return any(len(f := line.split()) > 4 and f[4] == str(ino) for line in maps)


def test_removal_leaves_a_pool_another_handle_holds_and_removes_it_after(make_config, prefix, caplog):
    engine = Engine.load(make_config())
    other = None
    try:
        name = engine.pool_name
        assert len(pool_files(prefix)) == 2
        other = WeightPool.open(SHM, name)  # a second worker (of this or another daemon) attaches
        assert other is not None and other.manifest is not None

        with caplog.at_level(logging.INFO, logger="ksleep.worker.poolfiles"):
            assert remove_pool_files(SHM, name) is False  # both handles hold it
        assert len(pool_files(prefix)) == 2
        assert "still in use by another process" in caplog.text

        engine.close()  # the first daemon's worker exits; its supervisor cleans up...
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="ksleep.worker.poolfiles"):
            assert remove_pool_files(SHM, name) is False  # ...but the other worker still has it
        assert len(pool_files(prefix)) == 2 and "still in use" in caplog.text
        assert other.tensor.view(-1)[:BLOCK_BYTES].sum().item() != 0  # and it still reads the weights

        other.close()  # the last holder goes: now the pool is removable
        assert remove_pool_files(SHM, name) is True
        assert pool_files(prefix) == []
        assert remove_pool_files(SHM, name) is True  # removing what is gone is harmless
    finally:
        if other is not None:
            other.close()
        engine.close(remove_pool=True)
        for path in pool_files(prefix):
            path.unlink(missing_ok=True)


def test_close_releases_the_lock_and_unmaps_at_once_without_views(tmp_path):
    pool = WeightPool.create(tmp_path, "solo", BLOCK_BYTES)
    pool.path = pool.path.rename(tmp_path / "solo.pool")  # published, as far as removal is concerned
    ino = pool.path.stat().st_ino
    assert _mapped(ino)
    assert remove_pool_files(tmp_path, "solo") is False and pool.path.exists()
    pool.close()
    assert not _mapped(ino)  # no view left: unmapped at once, not leaked
    pool.close()  # twice is harmless
    assert remove_pool_files(tmp_path, "solo") is True and not pool.path.exists()


def test_corrupt_pool_unlink_works_while_others_are_attached(make_config, prefix):
    engine = Engine.load(make_config())
    other = None
    try:
        other = WeightPool.open(SHM, engine.pool_name)
        before = other.tensor[:BLOCK_BYTES].clone()
        engine.weights.pool.unlink()  # the owner drops a pool it found corrupt
        assert pool_files(prefix) == []
        assert other.tensor[:BLOCK_BYTES].equal(before)  # the attached mapping stays valid
    finally:
        if other is not None:
            other.close()
        engine.close(remove_pool=True)


CLOSE_WITH_VIEW = textwrap.dedent("""
    import json, os, sys
    from pathlib import Path
    from ksleep.worker.pool import BLOCK_BYTES, WeightPool
    from ksleep.worker.poolfiles import remove_pool_files

    def mapped(ino):
        return any(len(f := line.split()) > 4 and f[4] == str(ino) for line in open("/proc/self/maps"))

    shm = Path(sys.argv[1])
    pool = WeightPool.create(shm, "viewed", 2 * BLOCK_BYTES)
    pool.tensor[:] = 7
    ino = pool.path.stat().st_ino
    os.rename(pool.path, shm / "viewed.pool")  # published, as far as removal is concerned
    view = pool.tensor[BLOCK_BYTES:]  # handed out, e.g. a weight's view into the mirror
    pool.close()
    released = remove_pool_files(shm, "viewed")  # the lock went with close(), though the mapping stays
    total = int(view.sum())  # a read after close: a segfault if close had unmapped it
    mapped_with_view = mapped(ino)
    del view  # the last view goes: now the mapping does
    print(json.dumps({"sum": total, "released": released, "mapped_with_view": mapped_with_view,
                      "mapped_after": mapped(ino), "left": sorted(p.name for p in shm.iterdir())}))
""")


def test_close_with_an_outstanding_view_keeps_the_view_readable(tmp_path):
    proc = subprocess.run([sys.executable, "-c", CLOSE_WITH_VIEW, str(tmp_path)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, f"rc {proc.returncode}: {proc.stderr[-3000:]}"  # -11: close unmapped a live view
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out == {"sum": 7 * BLOCK_BYTES, "released": True, "mapped_with_view": True, "mapped_after": False,
                   "left": []}
