"""Benchmark contextfs sync end to end, the way users run it, against a floor.

    python benchmarks/bench_sync.py                      # N = 1,000, 10,000, 100,000
    python benchmarks/bench_sync.py --sizes 1000,10000 --repeats 3 --json-out results.json

Needs only the installed package (``pip install -e .``): it starts ``contextfs server run
--port 0`` on 127.0.0.1, creates device homes in a temporary directory, and times the real
``contextfs`` console script in subprocesses (peak RSS from ``wait4``; the server's from
/proc/PID/status VmHWM). Each measurement runs ``--repeats`` times; the table shows medians.
The floor (benchmarks/floor.py, stdlib only) does the unavoidable work for the same rows in
the same run, so ours/floor is comparable even on a noisy machine.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Dict, List, Optional

import contextfs_server
import contextfs_sync as cfs

HERE = Path(__file__).resolve().parent
FLOOR = str(HERE / "floor.py")
_BIN = Path(sys.executable).parent / "contextfs"
CONTEXTFS = str(_BIN) if _BIN.exists() else (shutil.which("contextfs") or "contextfs")
TIMEOUT = 900

# Targets at the largest N (issue 8), on 2-core machines with the index off.
TARGETS = {
    "first_push": ("≤ 5 s", lambda v: v <= 5.0),
    "first_pull": ("≤ 5 s", lambda v: v <= 5.0),
    "noop": ("≤ 100 ms", lambda v: v <= 0.100),
    "incr_push": ("≤ 0.5 s", lambda v: v <= 0.5),
    "incr_pull": ("≤ 0.5 s", lambda v: v <= 0.5),
    "client_rss": ("≤ 150 MB", lambda v: v <= 150),
    "server_rss": ("≤ 200 MB", lambda v: v <= 200),
    "push_ratio": ("≤ 2", lambda v: v <= 2.0),
    "pull_ratio": ("≤ 2", lambda v: v <= 2.0),
    "version": ("≤ 60 ms", lambda v: v <= 0.060),
    "mcp_init": ("≤ 150 ms", lambda v: v <= 0.150),
}


# -- processes -------------------------------------------------------------------------------

def env_for(home: Optional[Path]) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONTEXTFS_")}
    # A normal install caches the module's bytecode (pip compiles it); never measure compiling.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if home is not None:
        env["CONTEXTFS_HOME"] = str(home)
    return env


class Run:
    """One finished subprocess: wall time, peak RSS (MB), exit code and output."""

    def __init__(self, seconds: float, rss_mb: float, rc: int, stdout: str, stderr: str):
        self.seconds, self.rss_mb, self.rc, self.stdout, self.stderr = seconds, rss_mb, rc, stdout, stderr


def run(cmd: List[str], env: Optional[dict] = None, timeout: float = TIMEOUT, check: bool = True) -> Run:
    """Run a command; time it from spawn to exit and take its own peak RSS from wait4."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                env=env if env is not None else env_for(None))
        done: dict = {}

        def wait() -> None:
            done["wait"] = os.wait4(proc.pid, 0)
            done["at"] = time.perf_counter()

        waiter = threading.Thread(target=wait, daemon=True)
        waiter.start()
        waiter.join(timeout)
        if waiter.is_alive():
            proc.kill()
            waiter.join(10)
            raise RuntimeError(f"timed out after {timeout}s: {' '.join(cmd)}")
        _pid, status, usage = done["wait"]
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        result = Run(done["at"] - started, usage.ru_maxrss / 1024, proc.returncode,
                     out.read().decode("utf-8", "replace"), err.read().decode("utf-8", "replace"))
    if check and result.rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {result.rc}: {result.stderr.strip()[-500:]}")
    return result


class Server:
    """A server subprocess that prints 'listening on http://…' when ready."""

    def __init__(self, cmd: List[str], env: dict):
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, env=env, text=True)
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + 30
        line = ""
        while not line and time.monotonic() < deadline and self.proc.poll() is None:
            if sel.select(timeout=0.5):
                line = self.proc.stdout.readline()
        sel.close()
        match = re.search(r"listening on (http://\S+)", line)
        if not match:
            self.stop()
            raise RuntimeError(f"server did not start: {line!r}")
        self.url = match.group(1)

    def peak_rss_mb(self) -> float:
        """VmHWM: the peak resident set size of the server process so far."""
        with open(f"/proc/{self.proc.pid}/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc.stdout.close()


def our_server(data: Path) -> Server:
    return Server([CONTEXTFS, "server", "run", "--host", "127.0.0.1", "--port", "0", "--data", str(data)],
                  env_for(data.parent / (data.name + "-home")))


def floor_server(data: Path) -> Server:
    return Server([sys.executable, FLOOR, "serve", str(data)], env_for(None))


# -- data ------------------------------------------------------------------------------------

WORDS = ("the a to of and in is for on that with as it this be by we not use when run fails error "
         "retry timeout cache config deploy build test python sqlite venv docker kubernetes pod "
         "service endpoint request response token key auth login session memory sync device server "
         "client branch merge commit rebase release version pin upgrade migrate schema index query "
         "latency throughput batch page cursor clock conflict resolve prefer avoid always never "
         "because after before instead default option flag env variable path file directory repo "
         "module function class method import export log warning debug trace metric alert").split()
TAGS = ["python", "sqlite", "deploy", "ci", "bug", "decision", "infra", "frontend", "backend", "perf",
        "security", "docs", "testing", "tooling", "api", "db", "auth", "release", "oncall", "design"]
TYPES = cfs.MEMORY_TYPES


def corpus(rng: random.Random, size: int = 1 << 20) -> str:
    words: List[str] = []
    total = 0
    while total < size:
        word = rng.choice(WORDS)
        words.append(word)
        total += len(word) + 1
    return " ".join(words)


def text_of(rng: random.Random, text: str, size: int) -> str:
    start = rng.randrange(0, len(text) - size - 1)
    return text[start:start + size]


def make_store(home: Path, n: int, seed: int = 8) -> Dict[str, int]:
    """N realistic memories (100 B–4 KB, log-uniform), tags, metadata, sessions, 10% with an edge."""
    rng = random.Random(seed)
    words = corpus(rng)
    base = datetime(2025, 1, 1, tzinfo=timezone.utc)
    store = cfs.open_store(home)
    sessions: List[str] = []
    ids: List[str] = []
    edges = 0
    try:
        with store.transaction():
            for s in range(max(1, n // 100)):
                started = base + timedelta(minutes=37 * s)
                session = cfs.Session(
                    id="%032x" % rng.getrandbits(128), label=f"work on {rng.choice(WORDS)} {s}",
                    tool=rng.choice(["claude-code", "cursor", "contextfs"]), repo=f"/src/project-{s % 17}",
                    started_at=cfs.format_ts(started), ended_at=cfs.format_ts(started + timedelta(minutes=30)),
                    summary=text_of(rng, words, rng.randint(80, 400)), metadata={"turns": rng.randint(1, 90)})
                store._local_write("session", session)
                sessions.append(session.id)
            for i in range(n):
                size = int(math.exp(rng.uniform(math.log(100), math.log(4096))))
                content = text_of(rng, words, size)
                created = cfs.format_ts(base + timedelta(seconds=300 * i + rng.randrange(300)))
                metadata = {}
                if rng.random() < 0.6:
                    metadata = {"source": rng.choice(["agent", "user", "import"]),
                                "confidence": round(rng.random(), 3), "ticket": f"T-{rng.randint(1, 9999)}"}
                memory = cfs.Memory(
                    id="%032x" % rng.getrandbits(128), content=content, type=rng.choice(TYPES),
                    summary=content[:60] if rng.random() < 0.5 else None,
                    tags=rng.sample(TAGS, rng.randint(0, 4)),
                    source_repo=f"git@example.com:team/project-{i % 17}.git" if rng.random() < 0.5 else None,
                    source_file=f"src/{rng.choice(WORDS)}.py" if rng.random() < 0.3 else None,
                    session_id=rng.choice(sessions) if rng.random() < 0.7 else None,
                    metadata=metadata, created_at=created, content_hash=cfs.content_hash(content))
                store._local_write("memory", memory)
                ids.append(memory.id)
                if i and rng.random() < 0.10:
                    edge = cfs.Edge(from_id=memory.id, to_id=ids[rng.randrange(i)],
                                    relation=rng.choice(["related_to", "supersedes", "caused_by", "resolves"]),
                                    weight=round(rng.random(), 2), created_at=created)
                    store._local_write("edge", edge)
                    edges += 1
    finally:
        store.close()
    return {"memories": n, "sessions": len(sessions), "edges": edges}


def edit_percent(home: Path, fraction: float, round_no: int) -> int:
    """Edit ``fraction`` of the memories (different ones each round) in one transaction."""
    store = cfs.open_store(home)
    try:
        ids = [r[0] for r in store.conn.execute("SELECT id FROM memories ORDER BY id")]
        count = max(1, int(len(ids) * fraction))
        chosen = ids[round_no * count:(round_no + 1) * count]
        with store.transaction():
            for memory_id in chosen:
                store.edit(memory_id, content=f"edited in round {round_no}: " + memory_id * 8)
        return len(chosen)
    finally:
        store.close()


def configure(home: Path, url: str, key: str) -> None:
    cfg = cfs.Config(home=home)
    cfg.data = {"cloud": {"enabled": True, "server_url": url, "api_key": key}, "index": {"embedder": "none"}}
    cfs.save_config(cfg)


def count_memories(home: Path) -> int:
    store = cfs.open_store(home)
    try:
        return store.conn.execute("SELECT count(*) FROM memories WHERE deleted_at IS NULL").fetchone()[0]
    finally:
        store.close()


# -- measurements ----------------------------------------------------------------------------

def sync(home: Path, *args: str) -> Run:
    result = run([CONTEXTFS, "cloud", "sync", "--json", *args], env_for(home))
    result.report = json.loads(result.stdout)
    return result


def median(values: List[float]) -> float:
    return statistics.median(values) if values else float("nan")


def mcp_available() -> bool:
    proc = subprocess.run([CONTEXTFS, "mcp", "--help"], capture_output=True, env=env_for(None), timeout=60)
    return proc.returncode == 0


def mcp_initialize(home: Path) -> float:
    """Seconds from spawning ``contextfs mcp`` to reading its answer to ``initialize``."""
    request = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
               "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                          "clientInfo": {"name": "bench", "version": "0"}}}
    started = time.perf_counter()
    proc = subprocess.Popen([CONTEXTFS, "mcp"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=env_for(home))
    try:
        proc.stdin.write((json.dumps(request) + "\n").encode())
        proc.stdin.flush()
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout=30):
            raise RuntimeError("contextfs mcp did not answer initialize within 30 s")
        line = proc.stdout.readline()
        elapsed = time.perf_counter() - started
        sel.close()
        if b'"result"' not in line:
            raise RuntimeError(f"unexpected initialize answer: {line[:200]!r}")
        return elapsed
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
        proc.stdout.close()


def bench_size(n: int, root: Path, repeats: int, log) -> dict:
    """Every per-N measurement; returns medians (seconds / MB) and raw samples."""
    servers: List[Server] = []
    try:
        return _bench_size(n, root, repeats, log, servers)
    finally:
        for server in servers:  # also when a step failed: never leave a server behind
            server.stop()


def _bench_size(n: int, root: Path, repeats: int, log, servers: List[Server]) -> dict:
    out: dict = {"n": n, "samples": {}}
    samples = out["samples"]

    def keep(name: str, value: float) -> None:
        samples.setdefault(name, []).append(value)

    top = root / f"n{n}"
    template = top / "template"
    started = time.perf_counter()
    out["rows"] = make_store(template, n)
    log(f"  generated {out['rows']} in {time.perf_counter() - started:.1f}s")
    client_rss: List[float] = []
    server_rss: List[float] = []

    # First push: a fresh server and a fresh copy of the device each time; `sync --all` is what a
    # user runs for a first sync (push everything, then pull).
    server = device_a = None
    for r in range(repeats):
        if server is not None:  # only the last server and device are kept for what follows
            server_rss.append(server.peak_rss_mb())
            server.stop()
            shutil.rmtree(data, ignore_errors=True)
            shutil.rmtree(device_a, ignore_errors=True)
        data = top / f"server{r}"
        server = our_server(data)
        servers.append(server)
        key = contextfs_server.add_user(data, "bench@example.com")
        device_a = top / f"device-a{r}"
        shutil.copytree(template, device_a)
        configure(device_a, server.url, key)
        result = sync(device_a, "--all")
        pushed = result.report["pushed"]
        assert pushed["memories"] == n and pushed["edges"] == out["rows"]["edges"], result.report
        keep("first_push", result.seconds)
        client_rss.append(result.rss_mb)
        log(f"  first push {r + 1}: {result.seconds:.2f}s rss {result.rss_mb:.0f} MB")
    for r in range(repeats):
        fserver = floor_server(top / f"floor{r}")
        servers.append(fserver)
        try:
            keep("floor_push", run([sys.executable, FLOOR, "push", str(template / "sync.db"), fserver.url]).seconds)
            if r == repeats - 1:
                for p in range(repeats):
                    keep("floor_pull", run([sys.executable, FLOOR, "pull", str(top / f"floor-pull{p}.db"),
                                            fserver.url]).seconds)
                for p in range(max(5, repeats)):
                    keep("floor_noop", run([sys.executable, FLOOR, "noop", fserver.url]).seconds)
        finally:
            fserver.stop()
    log(f"  floor push {median(samples['floor_push']):.2f}s, floor pull {median(samples['floor_pull']):.2f}s, "
        f"floor no-op {median(samples['floor_noop']) * 1000:.0f} ms")

    # First pull onto an empty device (a new home: no store, no cursor).
    device_b = None
    for r in range(repeats):
        if device_b is not None:
            shutil.rmtree(device_b, ignore_errors=True)
        device_b = top / f"device-b{r}"
        configure(device_b, server.url, key)
        result = sync(device_b)
        assert result.report["pulled"]["memories"] == n, result.report
        keep("first_pull", result.seconds)
        client_rss.append(result.rss_mb)
        log(f"  first pull {r + 1}: {result.seconds:.2f}s rss {result.rss_mb:.0f} MB")
    assert count_memories(device_b) == n

    for r in range(max(5, repeats)):  # short and noisy: at least five samples
        result = sync(device_a)
        assert result.report["summary"] == "pushed 0, pulled 0", result.report
        keep("noop", result.seconds)
        client_rss.append(result.rss_mb)
    log(f"  no-op {median(samples['noop']) * 1000:.0f} ms")

    for r in range(repeats):
        edited = edit_percent(device_a, 0.01, r)
        result = sync(device_a)
        assert result.report["pushed"]["memories"] == edited, result.report
        keep("incr_push", result.seconds)
        client_rss.append(result.rss_mb)
        result = sync(device_b)
        assert result.report["pulled"]["memories"] == edited, result.report
        keep("incr_pull", result.seconds)
        client_rss.append(result.rss_mb)
    log(f"  1% incremental push {median(samples['incr_push']):.2f}s, pull {median(samples['incr_pull']):.2f}s")

    for r in range(repeats):
        result = run([CONTEXTFS, "cloud", "status"], env_for(device_a))
        keep("status", result.seconds)
        result = run([CONTEXTFS, "save", f"benchmark save {r}", "--tags", "bench"], env_for(device_a))
        keep("save", result.seconds)
    server_rss.append(server.peak_rss_mb())
    server.stop()
    out["client_rss"] = max(client_rss)
    out["server_rss"] = max(server_rss)
    out.update({name: median(values) for name, values in samples.items()})
    out["push_ratio"] = out["first_push"] / out["floor_push"]
    out["pull_ratio"] = out["first_pull"] / out["floor_pull"]
    out["noop_ratio"] = out["noop"] / out["floor_noop"]
    return out


def bench_startup(root: Path, repeats: int) -> dict:
    home = root / "startup"
    configure(home, "http://127.0.0.1:9", "ctxfs_unused")
    version = [run([CONTEXTFS, "--version"], env_for(home)).seconds for _ in range(max(5, repeats))]
    out = {"version": median(version), "mcp_init": None}
    if mcp_available():
        out["mcp_init"] = median([mcp_initialize(home) for _ in range(max(5, repeats))])
    return out


# -- report ----------------------------------------------------------------------------------

def fmt_s(value: Optional[float]) -> str:
    if value is None or value != value:
        return "n/a"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def label_n(n: int) -> str:
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def table(results: List[dict], startup: dict) -> str:
    sizes = [r["n"] for r in results]
    head = "| measurement | " + " | ".join(f"N = {label_n(n)}" for n in sizes) + f" | target (N = {label_n(sizes[-1])}) | met |"
    lines = [head, "|" + " --- |" * (len(sizes) + 3)]

    def row(name: str, key: str, fmt, target_key: Optional[str] = None) -> None:
        values = [r.get(key) for r in results]
        target, ok = "", ""
        if target_key:
            target, check = TARGETS[target_key]
            last = values[-1]
            ok = "n/a" if last is None else ("yes" if check(last) else "**NO**")
        lines.append(f"| {name} | " + " | ".join(fmt(v) for v in values) + f" | {target} | {ok} |")

    mb = lambda v: f"{v:.0f} MB"
    ratio = lambda v: f"{v:.2f}"
    row("first push (`cloud sync --all`)", "first_push", fmt_s, "first_push")
    row("floor push (stdlib)", "floor_push", fmt_s)
    row("ours/floor push", "push_ratio", ratio, "push_ratio")
    row("first pull onto an empty device", "first_pull", fmt_s, "first_pull")
    row("floor pull (stdlib)", "floor_pull", fmt_s)
    row("ours/floor pull", "pull_ratio", ratio, "pull_ratio")
    row("no-op sync", "noop", fmt_s, "noop")
    row("floor no-op (stdlib: start, one request)", "floor_noop", fmt_s)
    row("ours/floor no-op", "noop_ratio", ratio)
    row("incremental sync after 1% edits (editing device)", "incr_push", fmt_s, "incr_push")
    row("incremental sync, other device pulls the 1%", "incr_pull", fmt_s, "incr_pull")
    row("`cloud status`", "status", fmt_s)
    row("`contextfs save` (into this store)", "save", fmt_s)
    row("client peak RSS (any sync)", "client_rss", mb, "client_rss")
    row("server peak RSS", "server_rss", mb, "server_rss")
    cols = len(sizes)
    for name, key in (("`contextfs --version`", "version"), ("MCP spawn → `initialize`", "mcp_init")):
        value = startup.get(key)
        target, check = TARGETS[key]
        shown = fmt_s(value) if value is not None else "n/a (not built)"
        ok = "n/a" if value is None else ("yes" if check(value) else "**NO**")
        lines.append(f"| {name} | " + " | ".join([shown] + [""] * (cols - 1)) + f" | {target} | {ok} |")
    return "\n".join(lines)


def growth(results: List[dict]) -> str:
    """Per-item cost and its growth between the two largest sizes."""
    if len(results) < 2:
        return ""
    a, b = results[-2], results[-1]
    lines = [f"Per-item cost growth from N = {label_n(a['n'])} to N = {label_n(b['n'])} (1.00 = linear):"]
    for name, key, per in (("first push", "first_push", "n"), ("floor push", "floor_push", "n"),
                           ("first pull", "first_pull", "n"), ("floor pull", "floor_pull", "n"),
                           ("1% incremental push", "incr_push", "n"), ("1% incremental pull", "incr_pull", "n")):
        ua, ub = a[key] / a["n"] * 1e6, b[key] / b["n"] * 1e6
        lines.append(f"  {name:<22} {ua:8.1f} µs/item -> {ub:8.1f} µs/item  (x{ub / ua:.2f})")
    lines.append(f"  {'no-op sync':<22} {fmt_s(a['noop']):>8} -> {fmt_s(b['noop']):>8}  (x{b['noop'] / a['noop']:.2f}, "
                 f"should stay flat)")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000,100000", help="comma-separated N values")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (median reported)")
    parser.add_argument("--json-out", help="also write all results and samples to this JSON file")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    sizes = [int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()]
    root = Path(tempfile.mkdtemp(prefix="contextfs-bench-"))
    log = lambda message: print(message, file=sys.stderr, flush=True)
    began = time.perf_counter()
    try:
        log(f"contextfs-sync {cfs.__version__}, python {sys.version.split()[0]}, sqlite {cfs.sqlite3.sqlite_version}, "
            f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}, work dir {root}")
        startup = bench_startup(root, args.repeats)
        results = []
        for n in sizes:
            log(f"N = {n}")
            results.append(bench_size(n, root, args.repeats, log))
            shutil.rmtree(root / f"n{n}", ignore_errors=True) if not args.keep else None
        startup["version"] = median([startup["version"]] + [run([CONTEXTFS, "--version"], env_for(None)).seconds
                                                            for _ in range(4)])
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(table(results, startup))
    print()
    print(growth(results))
    print(f"\n(medians of {args.repeats} runs; total benchmark time {time.perf_counter() - began:.0f} s, "
          f"load average now {os.getloadavg()[0]:.2f})")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"startup": startup, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
