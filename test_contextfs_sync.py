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
def test_config_round_trip_keeps_unknown_keys_and_is_0600(home):
    home.mkdir(mode=0o755)
    (home / "config.toml").write_text('# mine\n[cloud]\nenabled = false\nextra_key = "kept"\n'
                                      '[custom]\nanswer = 42\nlist = [1, 2]\n')
    cfg = cfs.load_config()
    cfg.set("cloud", "enabled", True)
    cfg.set("cloud", "api_key", "ctxfs_" + "k" * 43)
    cfs.save_config(cfg)
    again = cfs.load_config()
    assert again.enabled and again.api_key == "ctxfs_" + "k" * 43
    assert again.get("cloud", "extra_key") == "kept" and again.data["custom"] == {"answer": 42, "list": [1, 2]}
    assert stat.S_IMODE((home / "config.toml").stat().st_mode) == 0o600
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert not [p for p in home.iterdir() if p.name.endswith(".tmp")]


def test_config_strings_with_quotes_and_unicode_round_trip(home):
    cfg = cfs.load_config()
    cfg.set("cloud", "server_url", 'http://127.0.0.1:1/"q"\\ é')
    cfs.save_config(cfg)
    assert cfs.load_config().get("cloud", "server_url") == 'http://127.0.0.1:1/"q"\\ é'


def test_malformed_toml_is_one_clear_line_and_file_untouched(home):
    home.mkdir()
    bad = "[cloud]\nenabled = true\nserver_url = \"unterminated\n"
    (home / "config.toml").write_text(bad)
    proc = run_cli(home, "cloud", "configure", "--enabled")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "config.toml" in lines[0] and "line 3" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert (home / "config.toml").read_text() == bad


def test_wrongly_typed_value_names_file_line_and_key(home):
    home.mkdir()
    (home / "config.toml").write_text('[cloud]\nserver_url = "https://x"\nenabled = "yes"\n')
    proc = run_cli(home, "cloud", "status")
    assert proc.returncode == 1
    assert "config.toml:3" in proc.stderr and "cloud.enabled" in proc.stderr and "boolean" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_unknown_embedder_is_rejected(home):
    home.mkdir()
    (home / "config.toml").write_text('[index]\nembedder = "gpt"\n')
    with pytest.raises(cfs.ConfigError, match="index.embedder"):
        cfs.load_config()


def test_env_overrides_beat_the_file_and_are_never_saved(home, monkeypatch):
    cfg = cfs.load_config()
    cfg.set("cloud", "server_url", "https://file.example")
    cfg.set("cloud", "api_key", "ctxfs_filekey")
    cfs.save_config(cfg)
    monkeypatch.setenv("CONTEXTFS_SERVER_URL", "https://env.example/")
    monkeypatch.setenv("CONTEXTFS_API_KEY", "ctxfs_envkey")
    cfg = cfs.load_config()
    assert cfg.server_url == "https://env.example" and cfg.api_key == "ctxfs_envkey"
    cfs.save_config(cfg)
    text = (home / "config.toml").read_text()
    assert "env.example" not in text and "ctxfs_envkey" not in text


def test_contextfs_home_env_selects_the_home(tmp_path, monkeypatch):
    monkeypatch.setenv("CONTEXTFS_HOME", str(tmp_path / "elsewhere"))
    assert cfs.contextfs_home() == tmp_path / "elsewhere"
    monkeypatch.delenv("CONTEXTFS_HOME")
    assert cfs.contextfs_home() == Path.home() / ".contextfs"


def test_device_id_is_stable(home):
    first = cfs.device_id(home)
    assert first == cfs.device_id(home) and 0 < len(first) <= 32


# ---- tests: local store --------------------------------------------------------------------
@pytest.fixture
def store(home):
    s = cfs.open_store()
    yield s
    s.close()


def test_store_uses_wal_and_a_busy_timeout(store):
    assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.conn.execute("PRAGMA busy_timeout").fetchone()[0] >= 1000
    assert store.conn.execute("PRAGMA user_version").fetchone()[0] == len(cfs._MIGRATIONS)


def test_local_writes_take_a_new_seq_and_set_dirty(store):
    a = store.save("first")
    b = store.save("second")
    assert a.dirty and b.dirty and b.seq > a.seq
    edited = store.edit(a.id, content="first, edited")
    assert edited.seq > b.seq and edited.vector_clock == {store.device_id: 2}


def test_write_during_push_stays_dirty(store):
    memory = store.save("original")
    seq_sent = memory.seq                      # a push reads the row with this seq …
    store.edit(memory.id, content="edited while the push was in flight")
    with store.transaction():                  # … and settles only rows whose seq is unchanged
        store.conn.execute("UPDATE memories SET dirty = 0 WHERE id = ? AND seq = ?", (memory.id, seq_sent))
    assert store.get(memory.id).dirty


def test_delete_is_a_tombstone(store):
    memory = store.save("to delete")
    store.delete(memory.id)
    row = store.get(memory.id)
    assert row.deleted_at and row.dirty and row.content == "to delete"
    assert [m.id for m in store.list()] == []
    assert [m.id for m in store.list(include_deleted=True)] == [memory.id]
    with pytest.raises(cfs.NotFound):
        store.delete(memory.id)


def test_drafts_temporary_and_conflict_copies_are_not_pushable(store):
    store.save("draft", draft=True)
    store.save("temporary", ttl=3600)
    normal = store.save("normal")
    where = cfs._PUSHABLE["memory"]
    ids = [r[0] for r in store.conn.execute(f"SELECT id FROM memories WHERE dirty = 1 AND {where}")]
    assert ids == [normal.id]
    assert store.counts()["pending_push"] == 1


def test_publishing_a_draft_makes_it_dirty_and_pushable(store):
    draft = store.save("draft", draft=True)
    published = store.edit(draft.id, publish=True)
    assert not published.draft and published.dirty and published.seq > draft.seq
    assert store.counts()["pending_push"] == 1


def test_expired_temporary_memories_are_purged(store):
    temp = store.save("short lived", ttl=3600)
    store.conn.execute("UPDATE memories SET expires_at = ? WHERE id = ?", ("2000-01-01T00:00:00.000000Z", temp.id))
    assert store.purge_expired() == 1
    with pytest.raises(cfs.NotFound):
        store.get(temp.id)


def test_fts_ranks_better_matches_first_with_snippet(store):
    store.save("A note about cooking pasta al dente")
    best = store.save("Python packaging: use uv to manage Python virtualenvs and Python versions",
                      tags=["python"])
    store.save("Deploy with kubectl; unrelated to Python mostly")
    hits = store.search("python virtualenvs")
    assert hits[0].memory.id == best.id
    assert "[" in hits[0].snippet and len(hits) == 2


def test_search_survives_fts_syntax_characters(store):
    store.save('say "hello" AND (world) NOT -x*')
    assert store.search('"hello" AND (') and store.search("NOT -x*")


def test_search_falls_back_to_like_without_fts(store):
    store.save("fallback search finds words")
    store.fts = False
    hits = store.search("words")
    assert len(hits) == 1 and "words" in hits[0].snippet


def test_migration_from_an_older_user_version_keeps_rows(home):
    home.mkdir()
    path = home / "sync.db"
    conn = sqlite3.connect(path)
    conn.executescript(cfs._MIGRATIONS[0] + "PRAGMA user_version = 1;")
    conn.execute("INSERT INTO memories (id, content, created_at, updated_at) VALUES "
                 "('old1', 'written by schema one', '2025-01-01T00:00:00Z', '2025-01-01T00:00:00Z')")
    conn.commit()
    conn.close()
    store = cfs.open_store()
    assert store.conn.execute("PRAGMA user_version").fetchone()[0] == len(cfs._MIGRATIONS)
    assert store.get("old1").content == "written by schema one"
    assert store.search("schema")[0].memory.id == "old1"
    store.close()


def test_newer_schema_is_refused_not_clobbered(home):
    home.mkdir()
    conn = sqlite3.connect(home / "sync.db")
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(cfs.StoreError, match="newer"):
        cfs.open_store()


def test_corrupt_store_is_a_clear_error_and_left_untouched(home):
    home.mkdir()
    garbage = b"this is not sqlite" * 100
    (home / "sync.db").write_bytes(garbage)
    proc = run_cli(home, "list")
    assert proc.returncode == 1 and "not a valid SQLite database" in proc.stderr and "mv " in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (home / "sync.db").read_bytes() == garbage


def test_links_and_sessions(store):
    a, b = store.save("cause"), store.save("effect")
    edge = store.link(a.id, b.id, "caused_by", weight=0.5)
    assert edge.id == f"{a.id}:{b.id}:caused_by" and edge.dirty
    session = store.session_start(label="refactor")
    inside = store.save("learned during the session")
    assert inside.session_id == session.id
    ended = store.session_end(summary="did the refactor")
    assert ended.ended_at and ended.summary == "did the refactor" and ended.vector_clock == {store.device_id: 2}
    assert store.save("after").session_id is None
    store.unlink(a.id, b.id, "caused_by")
    assert store.edges(a.id) == [] and store.edges(a.id, include_deleted=True)[0].deleted_at


def test_resolve_conflict_keep_local_and_keep_cloud(store):
    cloud = store.save("cloud text")
    with store.transaction():
        for n in (1, 2):
            copy = cfs.Memory(id=f"{cloud.id}_local" + ("" if n == 1 else "_2"), content=f"local text {n}",
                              conflict_of=cloud.id, created_at=cloud.created_at, updated_at=cloud.updated_at)
            store._write("memory", copy, dirty=True)
    assert len(store.conflicts()) == 2 and store.counts()["pending_push"] == 1
    with pytest.raises(cfs.UsageError, match="2 conflict copies"):
        store.resolve_conflict(cloud.id, "local")
    store.resolve_conflict(f"{cloud.id}_local_2", "cloud")
    winner = store.resolve_conflict(f"{cloud.id}_local", "local")
    assert winner.id == cloud.id and winner.content == "local text 1" and winner.dirty
    assert cfs.clock_compare(winner.vector_clock, cloud.vector_clock) == "after"
    assert store.conflicts() == []


# ---- tests: memory CLI ---------------------------------------------------------------------
def test_version_is_fast_path_and_imports_nothing_heavy(home):
    proc = run_cli(home, "--version", check=0)
    assert proc.stdout.strip() == f"contextfs-sync {cfs.__version__}"
    code = ("import sys, contextfs_sync; contextfs_sync.main(['--version']); "
            "heavy = [m for m in ('httpx', 'chromadb', 'cryptography', 'http.server', 'argparse') if m in sys.modules]; "
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("[]"), out


def test_cli_save_search_show_edit_delete_end_to_end(home):
    saved = cli_json(home, "save", "Use uv for Python virtualenvs", "--type", "decision",
                     "--tags", "python,tools", "--summary", "uv for venvs", "--metadata", '{"ticket": "T-1"}')
    assert saved["type"] == "decision" and saved["tags"] == ["python", "tools"]
    assert saved["metadata"] == {"ticket": "T-1"} and saved["dirty"] is True
    hits = cli_json(home, "search", "virtualenvs")
    assert hits[0]["id"] == saved["id"] and "score" in hits[0] and "snippet" in hits[0]
    shown = run_cli(home, "show", saved["id"][:8], check=0).stdout
    assert "Use uv for Python virtualenvs" in shown and "decision" in shown
    edited = cli_json(home, "edit", saved["id"], "Use uv, always", "--tags", "python")
    assert edited["content"] == "Use uv, always" and edited["tags"] == ["python"]
    listed = cli_json(home, "list", "--type", "decision")
    assert [m["id"] for m in listed] == [saved["id"]]
    run_cli(home, "delete", saved["id"], check=0)
    assert cli_json(home, "list") == []


def test_cli_save_from_stdin_and_free_form_types(home):
    saved = cli_json(home, "save", "-", "--type", "gotcha", input="from stdin\nsecond line\n")
    assert saved["content"] == "from stdin\nsecond line\n" and saved["type"] == "gotcha"
    proc = run_cli(home, "save", "x", "--type", "gotcha", check=0)
    assert proc.stderr == ""


def test_cli_drafts_temporary_and_publish(home):
    draft = cli_json(home, "save", "draft idea", "--draft")
    temp = cli_json(home, "save", "scratch", "--temporary", "--ttl", "2h")
    assert draft["draft"] is True and temp["expires_at"]
    published = cli_json(home, "edit", draft["id"], "--publish")
    assert published["draft"] is False


@pytest.mark.parametrize("args,needle", [
    (("show", "doesnotexist"), "No memory with id"),
    (("delete", "doesnotexist"), "No memory with id"),
    (("save", "   "), "empty"),
    (("save", "x", "--temporary", "--ttl", "soon"), "Invalid --ttl"),
    (("save", "x", "--metadata", "[1]"), "JSON object"),
    (("edit", "doesnotexist"), "Nothing to change"),
])
def test_cli_errors_are_one_line_and_nonzero(home, args, needle):
    proc = run_cli(home, *args)
    assert proc.returncode != 0 and needle in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr


def test_cli_link_and_sessions_json(home):
    a = cli_json(home, "save", "cause")
    b = cli_json(home, "save", "effect")
    edge = cli_json(home, "link", a["id"], b["id"], "--relation", "caused_by")
    assert edge["from_id"] == a["id"] and edge["relation"] == "caused_by"
    started = cli_json(home, "session", "start", "--label", "debugging")
    inside = cli_json(home, "save", "found the bug")
    assert inside["session_id"] == started["id"]
    ended = cli_json(home, "session", "end", "--summary", "fixed it")
    assert ended["summary"] == "fixed it" and ended["ended_at"]
    sessions = cli_json(home, "session", "list")
    assert sessions[0]["id"] == started["id"]
    shown = cli_json(home, "show", a["id"])
    assert shown["edges"][0]["to_id"] == b["id"]


def test_cli_human_output_is_plain_when_piped(home):
    proc = run_cli(home, "save", "plain output", check=0)
    assert proc.stdout.startswith("Saved ") and "\x1b[" not in proc.stdout
    assert "plain output" in run_cli(home, "list", check=0).stdout


# ---- tests: semantic index -----------------------------------------------------------------
# (issue 6)


# ---- tests: crypto -------------------------------------------------------------------------
# (E2EE)


# ---- tests: reference server ---------------------------------------------------------------
# (raw HTTP)


# ---- tests: sync ---------------------------------------------------------------------------
import re as _re
import selectors as _selectors
import signal as _signal
import threading as _threading
import time as _time


class LiveServer:
    """A real `contextfs server run --port 0` subprocess on 127.0.0.1 with its own data dir."""

    def __init__(self, data_dir, extra_args=()):
        self.data = Path(data_dir)
        self.home = self.data.parent / (self.data.name + "-home")
        self.extra_args = tuple(extra_args)
        self.proc = None
        self.url = None
        self.start()

    def start(self):
        env = {k: v for k, v in os.environ.items() if not k.startswith("CONTEXTFS_")}
        env["CONTEXTFS_HOME"] = str(self.home)
        self.proc = subprocess.Popen([CONTEXTFS, "server", "run", "--host", "127.0.0.1", "--port", "0",
                                      "--data", str(self.data), *self.extra_args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        sel = _selectors.DefaultSelector()
        sel.register(self.proc.stdout, _selectors.EVENT_READ)
        deadline = _time.monotonic() + 20
        line = ""
        while _time.monotonic() < deadline and not line:
            if sel.select(timeout=0.5):
                line = self.proc.stdout.readline()
            elif self.proc.poll() is not None:
                break
        sel.close()
        match = _re.search(r"listening on (http://\S+)", line)
        assert match, f"server did not start: {line!r} {self.proc.stderr.read() if self.proc.poll() is not None else ''}"
        self.url = match.group(1)

    def add_user(self, email, password=None):
        args = ["server", "add-user", email, "--data", str(self.data)]
        if password is not None:
            args.append("--password-stdin")
        proc = run_cli(self.home, *args, input=(password + "\n") if password is not None else None, check=0)
        return proc.stdout.strip().splitlines()[-1]

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(_signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        for stream in (self.proc.stdout, self.proc.stderr):
            stream.close()


@pytest.fixture
def live_server(tmp_path):
    server = LiveServer(tmp_path / "server-data")
    yield server
    server.stop()


def make_device(tmp_path, name, server, key, enable=True):
    """A device home logged in to `server` with `key` (through the real CLI)."""
    home = tmp_path / name
    run_cli(home, "cloud", "login", "--api-key", key, "--server", server.url, check=0)
    if enable:
        run_cli(home, "cloud", "configure", "--enabled", check=0)
    return home


def sync(home, *args, check=0):
    """`contextfs cloud sync --json …` → the report dict."""
    proc = run_cli(home, "cloud", "sync", "--json", *args, check=check)
    return json.loads(proc.stdout) if proc.returncode == 0 else proc


def raw(server, key, path, body=None, method="POST"):
    """A raw HTTP call to the server (for looking at what it stores)."""
    import httpx

    headers = {"X-API-Key": key} if key else {}
    response = httpx.request(method, server.url + path, json=body, headers=headers, timeout=10)
    return response.status_code, response.json()


def server_memories(server, key):
    """Every memory the server holds for this account (pulled with a fresh device id)."""
    out, cursor = {}, None
    raw(server, key, "/api/sync/register", {"device_id": "inspector", "device_name": "t",
                                            "platform": "t", "client_version": "t"})
    for _ in range(1000):
        status, page = raw(server, key, "/api/sync/pull", {"device_id": "inspector", "cursor": cursor, "limit": 1000})
        assert status == 200, page
        for m in page["memories"]:
            out[m["id"]] = m
        if not page["has_more"]:
            return out
        cursor = page["next_cursor"]
    raise AssertionError("pull paging did not end")


@pytest.fixture
def two_devices(tmp_path, live_server):
    key = live_server.add_user("alice@example.com")
    return live_server, key, make_device(tmp_path, "laptop", live_server, key), make_device(tmp_path, "desktop", live_server, key)


def test_memories_sessions_and_edges_converge_with_metadata(two_devices):
    server, key, laptop, desktop = two_devices
    session = cli_json(laptop, "session", "start", "--label", "refactor", "--repo", "/src/app")
    a = cli_json(laptop, "save", "Use uv for virtualenvs", "--type", "decision", "--tags", "python,tools",
                 "--summary", "uv", "--metadata", '{"ticket": "T-1", "nested": {"n": 1}}',
                 "--source-repo", "git@github.com:me/app.git", "--source-file", "pyproject.toml")
    b = cli_json(laptop, "save", "pip install fails without --user", "--type", "error")
    cli_json(laptop, "link", a["id"], b["id"], "--relation", "resolves")
    cli_json(laptop, "session", "end", "--summary", "moved to uv")
    report = sync(laptop)
    assert report["pushed"] == {"memories": 2, "sessions": 1, "edges": 1}, report
    assert report["summary"].startswith("pushed 4, pulled 0")
    report = sync(desktop)
    assert report["pulled"] == {"memories": 2, "sessions": 1, "edges": 1}
    got = cli_json(desktop, "show", a["id"])
    for field in ("content", "type", "tags", "summary", "metadata", "source_repo", "source_file",
                  "session_id", "created_at", "content_hash"):
        assert got[field] == a[field], field
    assert got["session_id"] == session["id"] and got["dirty"] is False
    assert got["edges"][0]["relation"] == "resolves" and got["edges"][0]["to_id"] == b["id"]
    sessions = cli_json(desktop, "session", "list")
    assert sessions[0]["summary"] == "moved to uv" and sessions[0]["label"] == "refactor"
    # Edits flow back the other way, and a second sync has nothing to do.
    cli_json(desktop, "edit", a["id"], "Use uv for virtualenvs and tools", "--tags", "python")
    sync(desktop)
    sync(laptop)
    assert cli_json(laptop, "show", a["id"])["content"] == "Use uv for virtualenvs and tools"
    assert sync(laptop)["summary"] == "pushed 0, pulled 0"
    assert cli_json(laptop, "cloud", "status")["pending_push"] == 0


def test_deletes_propagate_as_tombstones(two_devices):
    server, key, laptop, desktop = two_devices
    m = cli_json(laptop, "save", "soon gone")
    sync(laptop)
    sync(desktop)
    run_cli(desktop, "delete", m["id"], check=0)
    sync(desktop)
    sync(laptop)
    assert cli_json(laptop, "list") == []
    assert server_memories(server, key)[m["id"]]["deleted_at"]


def test_drafts_and_temporary_memories_never_reach_the_server(two_devices):
    server, key, laptop, desktop = two_devices
    draft = cli_json(laptop, "save", "half-baked idea", "--draft")
    temp = cli_json(laptop, "save", "scratch", "--temporary")
    kept = cli_json(laptop, "save", "a real fact")
    sync(laptop, "--all")
    on_server = server_memories(server, key)
    assert set(on_server) == {kept["id"]}
    cli_json(laptop, "edit", draft["id"], "--publish")
    sync(laptop)
    assert set(server_memories(server, key)) == {kept["id"], draft["id"]}
    assert temp["id"] not in server_memories(server, key)


def test_push_all_restores_a_wiped_server(tmp_path, two_devices):
    server, key, laptop, desktop = two_devices
    ids = {cli_json(laptop, "save", f"memory {i}")["id"] for i in range(5)}
    sync(laptop)
    server.stop()
    import shutil
    shutil.rmtree(server.data)
    server.start()                           # an empty server, a new account
    new_key = server.add_user("alice@example.com")
    run_cli(laptop, "cloud", "login", "--api-key", new_key, "--server", server.url, check=0)
    assert sync(laptop)["pushed"]["memories"] == 0      # nothing is dirty …
    assert sync(laptop, "--all")["pushed"]["memories"] == 5  # … but --all repairs the server
    fresh = make_device(tmp_path, "fresh", server, new_key)
    sync(fresh)
    assert {m["id"] for m in cli_json(fresh, "list")} == ids


def test_concurrent_edit_keeps_cloud_version_and_local_copy(two_devices):
    server, key, laptop, desktop = two_devices
    m = cli_json(laptop, "save", "original text")
    sync(laptop)
    sync(desktop)
    cli_json(laptop, "edit", m["id"], "laptop text")
    cli_json(desktop, "edit", m["id"], "desktop text")
    sync(laptop)                                           # laptop's edit reaches the cloud first
    report = sync(desktop)
    assert report["conflicts"] == [{"id": m["id"], "local_copy": f"{m['id']}_local"}]
    human = run_cli(desktop, "cloud", "sync", check=0).stdout
    assert human.startswith("pushed 0, pulled 0")
    assert cli_json(desktop, "show", m["id"])["content"] == "laptop text"
    copy = cli_json(desktop, "show", f"{m['id']}_local")
    assert copy["content"] == "desktop text" and copy["conflict_of"] == m["id"]
    assert [c["id"] for c in cli_json(desktop, "cloud", "conflicts")] == [f"{m['id']}_local"]
    sync(desktop, "--all")                                 # never pushed until resolved
    assert f"{m['id']}_local" not in server_memories(server, key)
    assert server_memories(server, key)[m["id"]]["content"] == "laptop text"


def test_conflict_summary_line_names_the_copy(two_devices):
    server, key, laptop, desktop = two_devices
    m = cli_json(laptop, "save", "v1")
    sync(laptop), sync(desktop)
    cli_json(laptop, "edit", m["id"], "v2 laptop")
    cli_json(desktop, "edit", m["id"], "v2 desktop")
    sync(laptop)
    out = run_cli(desktop, "cloud", "sync", check=0).stdout
    assert out.splitlines()[0] == f"pushed 0, pulled 1, 1 conflict kept as {m['id']}_local"


@pytest.mark.parametrize("keep", ["local", "cloud"])
def test_resolve_conflict_both_ways_then_converge(two_devices, keep):
    server, key, laptop, desktop = two_devices
    m = cli_json(laptop, "save", "v1")
    sync(laptop), sync(desktop)
    cli_json(laptop, "edit", m["id"], "laptop wins?")
    cli_json(desktop, "edit", m["id"], "desktop wins?")
    sync(laptop), sync(desktop)
    run_cli(desktop, "cloud", "resolve", f"{m['id']}_local", "--keep", keep, check=0)
    assert cli_json(desktop, "cloud", "conflicts") == []
    sync(desktop), sync(laptop)
    expected = "desktop wins?" if keep == "local" else "laptop wins?"
    for home in (laptop, desktop):
        assert cli_json(home, "show", m["id"])["content"] == expected
        assert [x["id"] for x in cli_json(home, "list")] == [m["id"]]
    assert server_memories(server, key)[m["id"]]["content"] == expected


def test_pull_pages_across_boundaries_with_equal_timestamps(tmp_path, two_devices, monkeypatch):
    server, key, laptop, desktop = two_devices
    store = cfs.open_store(laptop)
    with store.transaction():                 # 250 memories sharing one updated_at
        for i in range(250):
            store._write("memory", cfs.Memory(id=f"m{i:04d}", content=f"same time {i}",
                                              created_at="2025-01-05T10:00:00.000000Z",
                                              updated_at="2025-01-05T10:00:00.000000Z",
                                              vector_clock={store.device_id: 1}), dirty=True)
    store.close()
    monkeypatch.setattr(cfs, "PUSH_BATCH_ITEMS", 40)
    monkeypatch.setattr(cfs, "PULL_PAGE_SIZE", 7)
    report = cfs.cloud_sync(laptop)
    assert report.pushed["memories"] == 250
    report = cfs.cloud_sync(desktop)
    assert report.pulled["memories"] == 250
    with cfs.open_store(desktop) as other:
        assert other.conn.execute("SELECT count(*) FROM memories").fetchone()[0] == 250


def test_embeddings_never_in_a_request_body(tmp_path, two_devices):
    server, key, laptop, desktop = two_devices
    for i in range(3):
        cli_json(laptop, "save", f"embeddable {i}")
    proxy = RecordingProxy(server.url)
    try:
        run_cli(laptop, "cloud", "sync", "--all", env={"CONTEXTFS_SERVER_URL": proxy.url}, check=0)
    finally:
        proxy.stop()
    pushes = [body for path, body in proxy.requests if path == "/api/sync/push"]
    assert pushes and all(b"embedding" not in body for body in pushes)
    assert sum(len(json.loads(b)["memories"]) for b in pushes) == 3


def test_disabled_and_missing_key_give_seed_messages_and_exit_3(tmp_path, live_server):
    home = tmp_path / "dev"
    proc = run_cli(home, "cloud", "sync")
    assert proc.returncode == 3
    assert proc.stderr.strip() == "Cloud sync is disabled. Run: contextfs cloud configure --enabled"
    run_cli(home, "cloud", "configure", "--enabled", "--server-url", live_server.url, check=0)
    proc = run_cli(home, "cloud", "sync")
    assert proc.returncode == 3
    assert proc.stderr.strip() == "No API key configured. Run: contextfs cloud login"


def test_wrong_key_and_server_down_are_one_line_errors(tmp_path, live_server):
    key = live_server.add_user("bob@example.com")
    home = make_device(tmp_path, "dev", live_server, key)
    cli_json(home, "save", "precious")
    proc = run_cli(home, "cloud", "sync", env={"CONTEXTFS_API_KEY": "ctxfs_" + "x" * 43})
    assert proc.returncode == 3 and "rejected the API key" in proc.stderr and "contextfs cloud login" in proc.stderr
    assert "x" * 10 not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    proc = run_cli(tmp_path / "other", "cloud", "login", "--api-key", "ctxfs_" + "y" * 43, "--server", live_server.url)
    assert proc.returncode == 3 and "nothing was saved" in proc.stderr
    live_server.stop()
    proc = run_cli(home, "cloud", "sync", timeout=120)
    assert proc.returncode == 1 and "Cannot sync with" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert cli_json(home, "list")[0]["content"] == "precious"


def test_plain_http_to_a_remote_host_is_refused(tmp_path):
    proc = run_cli(tmp_path / "h", "cloud", "configure", "--server-url", "http://sync.example.com")
    assert proc.returncode == 1 and "--insecure" in proc.stderr
    run_cli(tmp_path / "h", "cloud", "configure", "--server-url", "http://sync.example.com", "--insecure", check=0)


def test_dry_run_changes_nothing(two_devices):
    server, key, laptop, desktop = two_devices
    m = cli_json(laptop, "save", "planned")
    plan = sync(laptop, "--dry-run")
    assert plan["dry_run"] and plan["plan"][0]["id"] == m["id"] and plan["pushed"]["memories"] == 1
    assert server_memories(server, key) == {}
    sync(laptop)
    plan = sync(desktop, "--dry-run")
    assert plan["pulled"]["memories"] == 1 and cli_json(desktop, "list") == []
    assert sync(desktop)["pulled"]["memories"] == 1


def test_users_are_isolated_through_sync(tmp_path, live_server):
    alice, bob = live_server.add_user("alice@example.com"), live_server.add_user("bob@example.com")
    a_home = make_device(tmp_path, "a", live_server, alice)
    b_home = make_device(tmp_path, "b", live_server, bob)
    secret = cli_json(a_home, "save", "alice's secret")
    sync(a_home)
    sync(b_home)
    assert cli_json(b_home, "list") == []
    # Bob forges a memory with Alice's id: it stays Bob's; Alice's copy is untouched.
    store = cfs.open_store(b_home)
    with store.transaction():
        store._write("memory", cfs.Memory(id=secret["id"], content="bob overwrote it",
                                          created_at=secret["created_at"], updated_at=secret["updated_at"],
                                          vector_clock={"x": 99}), dirty=True)
    store.close()
    sync(b_home, "--force")
    sync(a_home)
    assert cli_json(a_home, "show", secret["id"])["content"] == "alice's secret"
    assert server_memories(live_server, alice)[secret["id"]]["content"] == "alice's secret"


def test_status_and_check_report_local_and_server_state(two_devices):
    server, key, laptop, desktop = two_devices
    cli_json(laptop, "save", "one")
    status = cli_json(laptop, "cloud", "status")
    assert status["enabled"] and status["pending_push"] == 1 and key not in json.dumps(status)
    assert status["api_key"].startswith("ctxfs_") and "…" in status["api_key"]
    human = run_cli(laptop, "cloud", "status", check=0).stdout
    assert "Pending push: 1" in human and key not in human
    assert cli_json(laptop, "cloud", "check")["only_local"]
    sync(laptop)
    status = cli_json(laptop, "cloud", "status")
    assert status["server"]["memory_count"] == 1 and status["last_push_at"] and status["last_pull_at"]
    assert cli_json(laptop, "cloud", "check")["in_sync"]
    assert "In sync" in run_cli(laptop, "cloud", "check", check=0).stdout


def test_e2ee_round_trip_server_sees_only_ciphertext(tmp_path, two_devices):
    pytest.importorskip("cryptography")
    server, key, laptop, desktop = two_devices
    for home in (laptop, desktop):
        run_cli(home, "cloud", "configure", "--e2ee", "--passphrase-stdin", input="correct horse\n", check=0)
    m = cli_json(laptop, "save", "the launch codes are 1234", "--tags", "secret")
    sync(laptop)
    stored = server_memories(server, key)[m["id"]]
    assert stored["encrypted"] is True and "launch" not in stored["content"]
    assert stored["content_hash"] == cfs.content_hash("the launch codes are 1234")
    sync(desktop)
    assert cli_json(desktop, "show", m["id"])["content"] == "the launch codes are 1234"
    # A device with the wrong passphrase is told so, and stores nothing.
    wrong = make_device(tmp_path, "wrong", server, key)
    run_cli(wrong, "cloud", "configure", "--e2ee", "--passphrase-stdin", input="wrong horse\n", check=0)
    proc = run_cli(wrong, "cloud", "sync")
    assert proc.returncode == 1 and "wrong E2EE passphrase" in proc.stderr
    assert cli_json(wrong, "list") == []
    # A device without E2EE configured gets a clear error, not ciphertext.
    plain = make_device(tmp_path, "plain", server, key)
    proc = run_cli(plain, "cloud", "sync")
    assert proc.returncode == 3 and "configure --e2ee" in proc.stderr
    assert cli_json(plain, "list") == []


def test_anchor_e2ee_test_vector_decrypts():
    pytest.importorskip("cryptography")
    key = cfs.derive_anchor_key("ctxfs_AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8",
                                "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8")
    assert key.hex() == "fc28de6d8d9908f10e96011d86a6e85d65ec8d81cbcdfe42a3872a579c78caea"
    token = "AAAAAAAAAAAAAAAAwPhxabh8yc3net0XCkyVyjU21-fyadCdX5koNQ=="
    assert cfs.decrypt_content(key, token) == "hello world!"
    assert cfs.decrypt_content(key, token.rstrip("=")) == "hello world!"
    assert cfs.encrypt_content(key, "hello world!", nonce=bytes(12)) == token
    with pytest.raises(cfs.CryptoError):
        cfs.decrypt_content(bytes(32), token)


def test_missing_e2ee_extra_names_the_pip_command(home):
    code = ("import sys; sys.modules['cryptography'] = None; import contextfs_sync as c\n"
            "try:\n    c.decrypt_content(bytes(32), 'AAAA')\nexcept c.CryptoError as e:\n    print(e)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    assert "pip install 'contextfs-sync[e2ee]'" in out


class RecordingProxy:
    """A tiny HTTP proxy on 127.0.0.1 that forwards to `upstream` and records request bodies."""

    def __init__(self, upstream):
        import http.client
        import http.server
        from urllib.parse import urlsplit

        target = urlsplit(upstream)
        self.requests = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                proxy.requests.append((self.path, body))
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                response = conn.getresponse()
                data = response.read()
                self.send_response(response.status)
                for k, v in response.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_POST = _forward

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = _threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


# ---- tests: MCP stdio server ---------------------------------------------------------------
# (issue 5)


# ---- tests: reliability and security -------------------------------------------------------
# (issue 7)
