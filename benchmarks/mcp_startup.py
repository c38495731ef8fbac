"""Time from spawning `contextfs mcp` to its answer to `initialize` (median of N runs).

Usage: python benchmarks/mcp_startup.py [N]   (uses the `contextfs` next to this Python)
"""
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONTEXTFS = str(Path(sys.executable).parent / "contextfs")
INITIALIZE = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
    "protocolVersion": "2025-11-25", "capabilities": {},
    "clientInfo": {"name": "bench", "version": "1"}}}).encode() + b"\n"


def spawn_to_initialize(home: str) -> float:
    env = dict(os.environ, CONTEXTFS_HOME=home)
    started = time.perf_counter()
    proc = subprocess.Popen([CONTEXTFS, "mcp"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    proc.stdin.write(INITIALIZE)
    proc.stdin.flush()
    answer = json.loads(proc.stdout.readline())
    elapsed = time.perf_counter() - started
    assert answer["result"]["protocolVersion"] == "2025-11-25", answer
    proc.stdin.close()
    proc.wait(timeout=10)
    return elapsed


def main() -> None:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    with tempfile.TemporaryDirectory() as home:
        spawn_to_initialize(home)  # warm the OS file cache once
        times = sorted(spawn_to_initialize(home) * 1000 for _ in range(runs))
    print(f"spawn -> initialize answer over {runs} runs: median {statistics.median(times):.1f} ms, "
          f"min {times[0]:.1f} ms, max {times[-1]:.1f} ms")


if __name__ == "__main__":
    main()
