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
# (sync engine, cloud CLI)


# ---- tests: MCP stdio server ---------------------------------------------------------------
# (issue 5)


# ---- tests: reliability and security -------------------------------------------------------
# (issue 7)
