"""Cost of indexing N pulled memories with an embedder (default: 10,000 with ``hash``).

Usage:  python benchmarks/index_after_pull.py [N] [embedder]
Writes N memories the way a pull does (one committed transaction of clean rows), then times
``index_after_pull`` for all of them, and splits the time into embedding vs ChromaDB upsert.
"""
from __future__ import annotations

import random
import sys
import tempfile
import time
from pathlib import Path

import contextfs_sync as cfs

WORDS = ("deploy database migration service cluster kubernetes frontend workspace pytest fixture "
         "cache invoice cron backup rollout flag token secret release branch merge review latency "
         "queue worker retry timeout index search embedding vector config schema api client server "
         "session memory sync conflict device error decision procedure user note code").split()


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    embedder = sys.argv[2] if len(sys.argv) > 2 else "hash"
    rng = random.Random(42)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) for _ in range(count)]
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        cfg = cfs.Config(home=home, data={"index": {"embedder": embedder}})
        store = cfs.open_store(home)
        now = cfs.utc_now()
        with store.transaction():
            for n, text in enumerate(texts):
                store._write("memory", cfs.Memory(id=f"m{n:06d}", content=text, created_at=now, updated_at=now,
                                                  vector_clock={"other": 1}, content_hash=cfs.content_hash(text)),
                             dirty=False)
        cfs.open_index(home, embedder).count()  # chromadb import + client start, paid once per process
        started = time.perf_counter()
        warning = cfs.index_after_pull(store, cfg, [f"m{n:06d}" for n in range(count)], [])
        total = time.perf_counter() - started
        assert warning is None, warning
        index = cfs.open_index(home, embedder)
        assert index.count() == count
        started = time.perf_counter()
        index.embedder(texts)
        embed = time.perf_counter() - started
        size = sum(f.stat().st_size for f in (home / "chroma").rglob("*") if f.is_file())
        print(f"{count} pulled memories, embedder {embedder}: {total:.2f}s wall "
              f"({total / count * 1000:.3f} ms per memory; embedding alone {embed:.2f}s, "
              f"ChromaDB upsert + SQLite reads {total - embed:.2f}s); chroma/ is {size / 1e6:.1f} MB")
        store.close()


if __name__ == "__main__":
    main()
