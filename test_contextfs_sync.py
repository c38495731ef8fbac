"""The contextfs-sync test suite: real SQLite files, real subprocesses, real servers on 127.0.0.1.

Sections follow contextfs_sync.py. Helpers at the top; each area below its own banner.
"""
from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

import contextfs_sync as cfs

BIN = Path(sys.executable).parent
CONTEXTFS = str(BIN / "contextfs")


def run_cli(home, *args, input=None, env=None, timeout=60, check=None):
    """Run the installed `contextfs` console script in a subprocess with CONTEXTFS_HOME=home."""
    assert Path(CONTEXTFS).exists(), "install the package first: pip install -e '.[test]'"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("CONTEXTFS_")}
    full_env["CONTEXTFS_HOME"] = str(home)
    full_env.update(env or {})
    proc = subprocess.run([CONTEXTFS, *args], input=input, capture_output=True, text=True,
                          env=full_env, timeout=timeout)
    if check is not None:
        assert proc.returncode == check, (proc.returncode, proc.stdout, proc.stderr)
    return proc


def cli_json(home, *args, **kw):
    """Run a command with --json and decode its stdout."""
    proc = run_cli(home, *args, "--json", check=0, **kw)
    return json.loads(proc.stdout)


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh CONTEXTFS_HOME for in-process library calls and CLI subprocesses."""
    path = tmp_path / "home"
    for var in ("CONTEXTFS_HOME", "CONTEXTFS_API_KEY", "CONTEXTFS_SERVER_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CONTEXTFS_HOME", str(path))
    return path


# ---- tests: pure logic ---------------------------------------------------------------------

@pytest.mark.parametrize("a,b,expected", [
    ({}, {}, "equal"),
    ({"x": 0}, {}, "equal"),
    ({"a": 1}, {"a": 2}, "before"),
    ({"a": 2}, {"a": 1}, "after"),
    ({"a": 1}, {"a": 1, "b": 1}, "before"),
    ({"a": 2}, {"a": 1, "b": 1}, "concurrent"),
    ({"a": 1, "b": 2}, {"a": 2, "b": 1}, "concurrent"),
])
def test_clock_compare_table(a, b, expected):
    assert cfs.clock_compare(a, b) == expected


def test_clock_merge_and_tick():
    assert cfs.clock_merge({"a": 1, "b": 3}, {"a": 2, "c": 0}) == {"a": 2, "b": 3}
    assert cfs.clock_tick({"a": 1}, "a") == {"a": 2}
    assert cfs.clock_tick({}, "d") == {"d": 1}


@pytest.mark.parametrize("local,dirty,same,cloud,expected", [
    (None, False, False, {"b": 1}, cfs.APPLY_INSERT),
    ({"a": 1}, False, False, {"a": 1}, cfs.APPLY_SKIP),
    ({"a": 1}, False, False, {"a": 1, "b": 1}, cfs.APPLY_OVERWRITE),
    ({"a": 2}, False, False, {"a": 1}, cfs.APPLY_SKIP),
    ({"a": 2}, False, False, {"b": 1}, cfs.APPLY_OVERWRITE),
    ({"a": 2}, True, False, {"a": 1}, cfs.APPLY_KEEP_LOCAL),
    ({"a": 1}, True, True, {"a": 2}, cfs.APPLY_SETTLE),      # our write, ticked by the server
    ({"a": 1}, True, True, {"a": 1}, cfs.APPLY_SETTLE),      # push answer lost, same row
    ({"a": 1}, True, False, {"a": 1, "b": 1}, cfs.APPLY_CONFLICT),
    ({"a": 2}, True, False, {"a": 1, "b": 1}, cfs.APPLY_CONFLICT),
])
def test_decide_incoming_table(local, dirty, same, cloud, expected):
    assert cfs.decide_incoming(local, dirty, same, cloud) == expected


def test_conflict_copy_id_picks_free_suffix():
    taken = {"m1_local", "m1_local_2"}
    assert cfs.conflict_copy_id("m2", taken.__contains__) == "m2_local"
    assert cfs.conflict_copy_id("m1", taken.__contains__) == "m1_local_3"


def test_content_hash_matches_protocol_examples():
    assert cfs.content_hash("hello") == "2cf24dba5fb0a30e"
    assert cfs.content_hash("") == "e3b0c44298fc1c14"
    assert cfs.content_hash("hello world!") == "7509e5bda0c762d2"


def test_batches_bounded_by_count_and_bytes():
    items = [{"id": str(i), "content": "x" * 100} for i in range(50)]
    by_count = list(cfs.batches(items, max_count=20, max_bytes=10**9))
    assert [len(b) for b in by_count] == [20, 20, 10]
    by_bytes = list(cfs.batches(items, max_count=1000, max_bytes=1000))
    assert all(len(json.dumps(b)) <= 1100 for b in by_bytes) and sum(map(len, by_bytes)) == 50


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("30m", 1800), ("1h", 3600), ("2d", 172800),
                                          ("1w", 604800), ("45", 45)])
def test_parse_ttl(text, seconds):
    assert cfs.parse_ttl(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "5q", "-1h", "h"])
def test_parse_ttl_rejects_bad_values(text):
    with pytest.raises(cfs.UsageError):
        cfs.parse_ttl(text)


def test_mask_key_never_shows_whole_key():
    key = "ctxfs_" + "A" * 20 + "secretpart" + "wxyz"
    masked = cfs.mask_key(key)
    assert masked.startswith("ctxfs_AAAA") and masked.endswith("wxyz") and "secretpart" not in masked


def test_timestamps_accept_z_offset_and_naive():
    assert cfs.normalize_ts("2025-01-05T10:00:01Z") == "2025-01-05T10:00:01.000000Z"
    assert cfs.normalize_ts("2025-01-05T11:00:01+01:00") == "2025-01-05T10:00:01.000000Z"
    assert cfs.normalize_ts("2025-01-05T10:00:01.5") == "2025-01-05T10:00:01.500000Z"


# ---- tests: config -------------------------------------------------------------------------
# (config tests)


# ---- tests: local store --------------------------------------------------------------------
# (store tests)


# ---- tests: memory CLI ---------------------------------------------------------------------
# (CLI tests)


# ---- tests: semantic index -----------------------------------------------------------------
# With the offline `hash` embedder: real ChromaDB under a temp CONTEXTFS_HOME, no model, no network.

needs_chromadb = pytest.mark.skipif(not cfs.chromadb_installed(), reason="needs the [semantic] extra")

MIGRATIONS = "Database migrations must run before deploying the payment service"
NEIGHBOURS = "migrate databases prior to deploys"  # shares word pieces, not one whole word


def _use_embedder(home, name):
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(f'[index]\nembedder = "{name}"\n', encoding="utf-8")
    return cfs.load_config(home)


def _pulled(store, *texts, prefix="p"):
    """Write memories the way a pull does: committed, clean rows carrying another device's clock."""
    memories = []
    with store.transaction():
        for n, text in enumerate(texts):
            now = cfs.utc_now()
            memory = cfs.Memory(id=f"{prefix}{n:04d}", content=text, created_at=now, updated_at=now,
                                vector_clock={"other-device": 1}, content_hash=cfs.content_hash(text))
            store._write("memory", memory, dirty=False)
            memories.append(memory)
    return memories


def test_hash_embedder_is_deterministic_normalised_and_lexical():
    embedder = cfs.HashEmbedder()
    first, again, unrelated = embedder([MIGRATIONS, MIGRATIONS, "xylophone quartet rehearsal"])
    assert first == again and len(first) == 384
    assert abs(sum(v * v for v in first) - 1.0) < 1e-9
    query = embedder([NEIGHBOURS])[0]

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b))

    assert cos(query, first) > embedder.min_similarity > cos(query, unrelated)
    # Same vector in a fresh process: crc32 features, not Python's salted hash().
    code = ("import contextfs_sync as c, json; "
            f"print(json.dumps(c.HashEmbedder()([{MIGRATIONS!r}])[0]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert json.loads(out.stdout) == pytest.approx(first)


@needs_chromadb
def test_save_then_search_finds_memory_by_word_neighbours(home):
    _use_embedder(home, "hash")
    for text in (MIGRATIONS, "Use pnpm instead of npm for the frontend workspace",
                 "The staging cluster runs on Kubernetes with three nodes"):
        run_cli(home, "save", text, check=0)
    with cfs.open_store(home) as store:
        assert store.search(NEIGHBOURS) == []  # keywords alone find nothing
    hits = cli_json(home, "search", NEIGHBOURS)
    assert [h["content"] for h in hits][:1] == [MIGRATIONS]
    assert set(hits[0]["scores"]) == {"semantic"} and hits[0]["scores"]["semantic"] > 0.2
    # A query sharing a keyword too is ranked by both, and --json shows both scores.
    both = cli_json(home, "search", "deploying payments")
    assert both[0]["content"] == MIGRATIONS and set(both[0]["scores"]) == {"keyword", "semantic"}
    assert cli_json(home, "search", "xylophone quartet") == []
    status = cli_json(home, "index", "status")
    assert (status["state"], status["indexed"], status["memories"]) == ("ok", 3, 3)


@needs_chromadb
def test_edit_reembeds_and_delete_leaves_the_index(home):
    _use_embedder(home, "hash")
    saved = cli_json(home, "save", "Cats sleep most of the afternoon")
    assert cli_json(home, "search", NEIGHBOURS) == []
    run_cli(home, "edit", saved["id"], MIGRATIONS, check=0)
    assert [h["id"] for h in cli_json(home, "search", NEIGHBOURS)] == [saved["id"]]
    run_cli(home, "delete", saved["id"], check=0)
    assert cli_json(home, "search", NEIGHBOURS) == []
    status = cli_json(home, "index", "status")
    assert (status["state"], status["indexed"], status["memories"]) == ("ok", 0, 0)


@needs_chromadb
def test_index_after_pull_indexes_pulled_memories_and_drops_tombstones(home):
    cfg = _use_embedder(home, "hash")
    with cfs.open_store(home) as store:
        cfs.attach_index(store, cfg)
        store.save("Use pnpm instead of npm for the frontend workspace")
        pulled = _pulled(store, MIGRATIONS, "The staging cluster runs on Kubernetes with three nodes",
                         *(f"Pulled note number {n} about release {n}" for n in range(300)))
        ids = [m.id for m in pulled]
        assert cfs.index_after_pull(store, cfg, ids, []) is None
        status = cfs.index_status(store, cfg)
        assert (status["state"], status["indexed"], status["memories"]) == ("ok", 303, 303)
        hits = cfs.search_memories(store, NEIGHBOURS, limit=3)
        assert hits[0].memory.id == pulled[0].id and "semantic" in hits[0].sources
        # A pulled tombstone: the row is committed deleted, then the index forgets it.
        with store.transaction():
            pulled[0].deleted_at = cfs.utc_now()
            store._write("memory", pulled[0], dirty=False)
        assert cfs.index_after_pull(store, cfg, [], [pulled[0].id]) is None
        assert cfs.open_index(home, "hash").count() == 302
        assert pulled[0].id not in [h.memory.id for h in cfs.search_memories(store, NEIGHBOURS)]
        # An id listed as upserted but deleted in the store also leaves the index.
        with store.transaction():
            pulled[1].deleted_at = cfs.utc_now()
            store._write("memory", pulled[1], dirty=False)
        assert cfs.index_after_pull(store, cfg, [pulled[1].id], []) is None
        assert cfs.index_status(store, cfg)["indexed"] == 301


@needs_chromadb
def test_broken_index_never_fails_a_pull_or_save_and_rebuild_restores(home):
    cfg = _use_embedder(home, "hash")
    (home / "chroma").write_text("not a directory", encoding="utf-8")  # root ignores chmod: break it so
    with cfs.open_store(home) as store:
        pulled = _pulled(store, MIGRATIONS, "The staging cluster runs on Kubernetes with three nodes")
        warning = cfs.index_after_pull(store, cfg, [m.id for m in pulled], [])
        assert warning.startswith("semantic index is stale (") and warning.endswith("run: contextfs index rebuild")
        assert "\n" not in warning
        assert store.get(pulled[0].id).content == MIGRATIONS  # the pulled rows stay committed
        assert cfs.index_after_pull(store, cfg, [], []) == warning  # still stale, still one line
    saved = run_cli(home, "save", "Saving still works with a broken index", check=0)
    assert saved.stderr == ""  # already marked stale: no repeated warnings on every save
    searched = run_cli(home, "search", "kubernetes", check=0)
    assert "Kubernetes" in searched.stdout and "keyword matches only" in searched.stderr
    status = cli_json(home, "index", "status")
    assert status["state"] == "stale" and "chroma" in status["reason"]
    failed = run_cli(home, "index", "rebuild", check=1)
    assert failed.stderr.count("\n") == 1 and "Cannot rebuild the semantic index" in failed.stderr
    (home / "chroma").unlink()
    run_cli(home, "index", "rebuild", check=0)
    status = cli_json(home, "index", "status")
    assert (status["state"], status["indexed"], status["memories"]) == ("ok", 3, 3)
    assert cli_json(home, "search", NEIGHBOURS)[0]["content"] == MIGRATIONS


@needs_chromadb
def test_first_index_failure_on_save_warns_once_and_keeps_the_memory(home):
    _use_embedder(home, "hash")
    (home / "chroma").write_text("not a directory", encoding="utf-8")
    first = run_cli(home, "save", MIGRATIONS, check=0)
    assert first.stdout.startswith("Saved ")
    assert first.stderr.count("\n") == 1 and first.stderr.startswith("semantic index is stale")
    assert run_cli(home, "save", "another one", check=0).stderr == ""
    assert len(cli_json(home, "list")) == 2


@needs_chromadb
def test_rebuild_from_sqlite_after_deleting_chroma_gives_same_results(home):
    import shutil

    _use_embedder(home, "hash")
    with cfs.open_store(home) as store:
        _pulled(store, MIGRATIONS, "Use pnpm instead of npm for the frontend workspace",
                *(f"Deploy checklist item {n}: migrate, verify, announce" for n in range(40)))
    assert cli_json(home, "index", "status")["state"] == "stale"  # pulled without the index: 0 of 42
    rebuilt = cli_json(home, "index", "rebuild")
    assert rebuilt["indexed"] == 42 and rebuilt["embedder"] == "hash"
    before = cli_json(home, "search", NEIGHBOURS)
    shutil.rmtree(home / "chroma")
    assert cli_json(home, "index", "status")["state"] == "stale"
    assert run_cli(home, "index", "rebuild", check=0).stdout.startswith("Indexed 42 memories with the hash embedder")
    after = cli_json(home, "search", NEIGHBOURS)
    assert [(h["id"], h["scores"]) for h in after] == [(h["id"], h["scores"]) for h in before]
    assert len(before) == 10 and any("semantic" in h["scores"] for h in before)


@needs_chromadb
def test_long_lived_process_survives_rebuild_and_deleted_chroma_elsewhere(home):
    import shutil

    cfg = _use_embedder(home, "hash")
    warnings = []
    with cfs.open_store(home) as store:  # as the MCP server holds it open
        cfs.attach_index(store, cfg, warn=warnings.append)
        store.save("Use pnpm instead of npm for the frontend workspace")
        run_cli(home, "index", "rebuild", check=0)  # drops and re-creates the collection
        store.save("The staging cluster runs on Kubernetes with three nodes")
        shutil.rmtree(home / "chroma")
        run_cli(home, "index", "rebuild", check=0)
        store.save(MIGRATIONS)
        assert warnings == []
        status = cfs.index_status(store, cfg)
        assert (status["state"], status["indexed"], status["memories"]) == ("ok", 3, 3)
        assert cfs.search_memories(store, NEIGHBOURS)[0].memory.content == MIGRATIONS


@needs_chromadb
def test_index_built_by_another_embedder_is_stale_until_rebuild(home):
    import chromadb
    from chromadb.config import Settings

    _use_embedder(home, "hash")
    run_cli(home, "save", MIGRATIONS, check=0)
    # As after an upgrade that changed the hash features: the vectors are not comparable.
    client = chromadb.PersistentClient(path=str(home / "chroma"), settings=Settings(anonymized_telemetry=False))
    client.get_collection("memories").modify(metadata={"embedder": "hash-v0"})
    status = cli_json(home, "index", "status")
    assert status["state"] == "stale" and "'hash-v0'" in status["reason"] and "'hash-v1'" in status["reason"]
    searched = run_cli(home, "search", NEIGHBOURS, check=0)
    assert searched.stdout.startswith("No memories match") and "keyword matches only" in searched.stderr
    run_cli(home, "index", "rebuild", check=0)
    assert cli_json(home, "index", "status")["state"] == "ok"
    assert cli_json(home, "search", NEIGHBOURS)[0]["content"] == MIGRATIONS


def test_default_embedder_without_local_model_is_stale_with_one_warning(home, tmp_path):
    if not cfs.chromadb_installed():
        pytest.skip("needs the [semantic] extra")
    _use_embedder(home, "default")
    env = {"HOME": str(tmp_path / "user")}  # no ~/.cache/chroma model: what `default` meets offline
    first = run_cli(home, "save", MIGRATIONS, env=env, check=0)
    assert first.stderr.strip().splitlines() == [
        'semantic index is stale (all-MiniLM-L6-v2 is not downloaded yet; or set [index] embedder = '
        '"hash" to stay offline); run: contextfs index rebuild']
    assert run_cli(home, "save", "second", env=env, check=0).stderr == ""
    assert [h["content"] for h in cli_json(home, "search", "migrations", env=env)] == [MIGRATIONS]
    status = cli_json(home, "index", "status", env=env)
    assert status["state"] == "stale" and "not downloaded yet" in status["reason"]
    assert not (home / "chroma").exists()
    # Only an explicit rebuild lets chromadb fetch the model; a dead loopback proxy stands in
    # for "no network" so that nothing leaves this machine.
    dead = "http://127.0.0.1:9"
    offline = dict(env, HTTPS_PROXY=dead, https_proxy=dead, HTTP_PROXY=dead, http_proxy=dead,
                   ALL_PROXY=dead, all_proxy=dead, NO_PROXY="", no_proxy="")
    failed = run_cli(home, "index", "rebuild", env=offline, check=1)
    assert failed.stderr.startswith("Cannot rebuild the semantic index: cannot download all-MiniLM-L6-v2")
    assert failed.stderr.count("\n") == 1 and 'embedder = "hash"' in failed.stderr


def test_embedder_none_and_missing_chromadb_never_import_chromadb(home, tmp_path):
    script = r'''
import sys, json
hide = sys.argv[1] == "hide"
if hide:
    class HideChromadb:
        def find_spec(self, name, path=None, target=None):
            if name == "chromadb" or name.startswith("chromadb."):
                raise ModuleNotFoundError(f"No module named {name!r}")
    sys.meta_path.insert(0, HideChromadb())
import contextfs_sync as cfs
codes = [cfs.main(["save", "Database migrations must run first"]),
         cfs.main(["search", "migrations"]), cfs.main(["list"]), cfs.main(["index", "status", "--json"])]
print(json.dumps({"codes": codes, "imported": "chromadb" in sys.modules}))
'''
    for mode, embedder, state in (("hide", "default", "unavailable"), ("show", "none", "off")):
        case = tmp_path / mode
        _use_embedder(case, embedder)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONTEXTFS_")}
        env["CONTEXTFS_HOME"] = str(case)
        proc = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True,
                              env=env, timeout=60)
        assert proc.returncode == 0, proc.stderr
        *printed, last = proc.stdout.strip().splitlines()
        assert json.loads(last) == {"codes": [0, 0, 0, 0], "imported": False}
        status = json.loads("\n".join(printed[printed.index("{"):]))
        assert status["state"] == state and status["memories"] == 1
        assert proc.stderr == ""  # no noise about the index on ordinary commands
        assert not (case / "chroma").exists()


@needs_chromadb
def test_pushed_memories_carry_no_embedding(home):
    _use_embedder(home, "hash")
    run_cli(home, "save", MIGRATIONS, check=0)
    with cfs.open_store(home) as store:
        assert cfs.index_status(store, cfs.load_config(home))["indexed"] == 1
        for memory in store.list():
            assert "embedding" not in memory.to_wire()


def _cli_has_server():
    try:
        return "server" in run_cli(Path("/nonexistent-contextfs-home"), "--help", timeout=60).stdout
    except Exception:
        return False


class _RecordingProxy:
    """A loopback HTTP proxy to the reference server that keeps every request body it forwards."""

    def __init__(self, target):
        import http.client
        import http.server
        import threading
        from urllib.parse import urlsplit

        parts = urlsplit(target)
        bodies = self.bodies = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                bodies.append((self.path, body))
                conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for key, value in resp.getheaders():
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_POST = do_PUT = do_DELETE = _forward

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.skipif(not cfs.chromadb_installed() or not _cli_has_server(),
                    reason="needs the [semantic] extra and the reference server + sync engine")
def test_cli_sync_indexes_pulled_memories_on_second_device(tmp_path):
    import re
    import time

    data = tmp_path / "server-data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONTEXTFS_")}
    env["CONTEXTFS_HOME"] = str(tmp_path / "server-home")
    server = subprocess.Popen([CONTEXTFS, "server", "run", "--port", "0", "--data", str(data)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    proxy = None
    try:
        deadline = time.monotonic() + 30
        url = None
        while url is None and time.monotonic() < deadline:
            line = server.stdout.readline()
            if not line:
                break
            match = re.search(r"listening on (http://\S+)", line)
            url = match.group(1) if match else None
        assert url, "reference server did not start"
        added = run_cli(tmp_path / "server-home", "server", "add-user", "a@example.com", "--data", str(data),
                        check=0)
        key = re.search(r"ctxfs_[A-Za-z0-9_-]+", added.stdout).group(0)
        proxy = _RecordingProxy(url)
        device_a, device_b = tmp_path / "a", tmp_path / "b"
        for device in (device_a, device_b):
            _use_embedder(device, "hash")
            run_cli(device, "cloud", "login", "--api-key", key, "--server", proxy.url, check=0)
            run_cli(device, "cloud", "configure", "--enabled", check=0)
        saved = [cli_json(device_a, "save", text)["id"] for text in (
            MIGRATIONS, "Use pnpm instead of npm for the frontend workspace",
            "The staging cluster runs on Kubernetes with three nodes")]
        run_cli(device_a, "cloud", "sync", check=0)
        run_cli(device_b, "cloud", "sync", check=0)
        status = cli_json(device_b, "index", "status")
        assert (status["state"], status["indexed"], status["memories"]) == ("ok", 3, 3)
        assert cli_json(device_b, "search", NEIGHBOURS)[0]["id"] == saved[0]
        run_cli(device_a, "delete", saved[0], check=0)
        run_cli(device_a, "cloud", "sync", check=0)
        run_cli(device_b, "cloud", "sync", check=0)
        status = cli_json(device_b, "index", "status")
        assert (status["state"], status["indexed"], status["memories"]) == ("ok", 2, 2)
        assert saved[0] not in [h["id"] for h in cli_json(device_b, "search", NEIGHBOURS)]
        pushes = [json.loads(body) for path, body in proxy.bodies if path.endswith("/push") and body]
        assert pushes and all(m.get("embedding") is None for p in pushes for m in p.get("memories", []))
    finally:
        if proxy:
            proxy.close()
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=10)


# ---- tests: crypto -------------------------------------------------------------------------
# (E2EE)


# ---- tests: reference server ---------------------------------------------------------------
# (raw HTTP)


# ---- tests: sync ---------------------------------------------------------------------------
# (sync engine, cloud CLI)


# ---- tests: MCP stdio server ---------------------------------------------------------------
# (issue 5)


# ---- tests: reliability and security -------------------------------------------------------
# (issue 7)
