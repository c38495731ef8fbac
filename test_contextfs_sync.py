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
# (issue 6)


# ---- tests: crypto -------------------------------------------------------------------------
# (E2EE)


# ---- tests: reference server ---------------------------------------------------------------
# Raw HTTP against a real `contextfs server run --port 0` subprocess. `ref_server` (module
# scope) is shared: tests use fresh ids/users so they do not depend on each other. The sync
# tests reuse `ref_server`, `start_ref_server` and `RefServer.add_user`.

import hashlib
import re
import signal
import socket
import threading
import time
import uuid

import httpx

_LISTENING = re.compile(r"^contextfs server listening on (http://\S+) \(data: (.+)\)$")


class RefServer:
    """A running reference server subprocess: ``.url``, ``.data``, ``.add_user()``, ``.stop()``."""

    def __init__(self, proc, url, data, home, stderr_path):
        self.proc, self.url, self.data, self.home, self.stderr_path = proc, url, Path(data), home, stderr_path
        host, port = url[len("http://"):].rsplit(":", 1)
        self.host, self.port = host, int(port)

    def add_user(self, email=None, password=None, name=None):
        """Create a user with `contextfs server add-user` and return its API key."""
        email = email or f"user-{uuid.uuid4().hex[:10]}@example.com"
        args = ["server", "add-user", email, "--data", str(self.data)]
        if name:
            args += ["--name", name]
        if password is not None:
            args.append("--password-stdin")
        proc = run_cli(self.home, *args, input=(password + "\n") if password is not None else None, check=0)
        return proc.stdout.strip()

    def stop(self, sig=signal.SIGTERM, timeout=15):
        """Stop the server with ``sig`` and return its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)
        return self.proc.returncode

    def stderr(self):
        """What the server wrote to stderr so far."""
        return Path(self.stderr_path).read_text(errors="replace")


def start_ref_server(tmp_dir, *args, timeout=30):
    """Start `contextfs server run --port 0` under tmp_dir and wait for its listening line."""
    tmp_dir = Path(tmp_dir)
    home, data = tmp_dir / "server-home", tmp_dir / "server-data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONTEXTFS_")}
    env["CONTEXTFS_HOME"] = str(home)
    stderr_path = tmp_dir / "server.stderr"
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen([CONTEXTFS, "server", "run", "--port", "0", "--data", str(data), *args],
                                stdout=subprocess.PIPE, stderr=err, env=env, text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not lines or not _LISTENING.match(lines[0].strip()):
        proc.kill()
        proc.wait(timeout=10)
        raise AssertionError(f"server did not start: {lines!r} {stderr_path.read_text(errors='replace')}")
    url, shown_data = _LISTENING.match(lines[0].strip()).groups()
    assert Path(shown_data) == data.resolve()
    return RefServer(proc, url, data, home, stderr_path)


@pytest.fixture(scope="module")
def ref_server(tmp_path_factory):
    """A reference server shared by a test module (stopped with SIGTERM at the end)."""
    server = start_ref_server(tmp_path_factory.mktemp("ref-server"))
    yield server
    assert server.stop() == 0, server.stderr()


@pytest.fixture(scope="module")
def two_users(ref_server):
    """API keys of two users on the shared server (alice, bob)."""
    return ref_server.add_user(name="Alice"), ref_server.add_user(name="Bob")


_HTTP = []


def http_client():
    """One shared httpx client (a new client per request costs ~40 ms of TLS setup)."""
    if not _HTTP:
        _HTTP.append(httpx.Client(timeout=30))
    return _HTTP[0]


def api(server, path, body=None, key=None, method=None, headers=None, content=None):
    """One HTTP request to the server; JSON ``body`` means POST."""
    all_headers = dict(headers or {})
    if key is not None:
        all_headers["X-API-Key"] = key
    method = method or ("POST" if body is not None or content is not None else "GET")
    return http_client().request(method, server.url + path, json=body, content=content, headers=all_headers)


def raw_http(server, data, timeout=10):
    """Send raw bytes and read the answer until the server closes: (status, headers, body)."""
    with socket.create_connection((server.host, server.port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def uid(prefix="m"):
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def mem(mem_id, content="text", clock=None, **fields):
    obj = {"id": mem_id, "content": content, "vector_clock": clock or {}}
    obj.update(fields)
    return obj


def dev(key, name="dev"):
    """A device id unique to this key's user (device ids are global: one owner each)."""
    return f"{name}-{key[6:16]}"


def push(server, key, device=None, memories=(), sessions=(), edges=(), force=False, status=200):
    resp = api(server, "/api/sync/push", {"device_id": device or dev(key), "memories": list(memories),
                                          "sessions": list(sessions), "edges": list(edges), "force": force},
               key=key)
    assert resp.status_code == status, resp.text
    return resp.json()


def pull_all(server, key, device=None, limit=1000, cursor=None):
    """Page through /pull by cursor; returns (items as (kind, id) in order, final cursor)."""
    items, pages, device = [], 0, device or dev(key)
    while True:
        page = api(server, "/api/sync/pull", {"device_id": device, "cursor": cursor, "limit": limit},
                   key=key).json()
        for kind in ("memories", "sessions", "edges"):
            items += [(kind, obj["id"], obj) for obj in page[kind]]
        cursor = page["next_cursor"]
        pages += 1
        assert pages < 1000
        if not page["has_more"]:
            return items, cursor


def server_rows(server, key):
    """{(kind, id): object} of everything this key's user can pull."""
    items, _ = pull_all(server, key, device=f"reader-{uuid.uuid4().hex[:6]}")
    return {(kind, i): obj for kind, i, obj in items}


def test_server_listens_and_reports_health(ref_server):
    resp = api(ref_server, "/health")
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
    body = resp.json()
    assert body["status"] == "healthy" and body["service"] == "contextfs-sync"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", body["timestamp"])
    assert stat.S_IMODE(ref_server.data.stat().st_mode) == 0o700


def test_add_user_prints_key_once_and_stores_only_hashes(ref_server):
    email = f"carol-{uuid.uuid4().hex[:6]}@example.com"
    key = ref_server.add_user(email=email, password="s3cret pass", name="Carol")
    assert re.fullmatch(r"ctxfs_[A-Za-z0-9_-]{43}", key)
    dup = run_cli(ref_server.home, "server", "add-user", email.upper(), "--data", str(ref_server.data))
    assert dup.returncode == 1 and "already exists" in dup.stderr and dup.stdout == ""
    assert "Traceback" not in dup.stderr
    with sqlite3.connect(ref_server.data / "server.db") as db:
        user = db.execute("SELECT id, name, password_hash, password_salt, e2ee_salt FROM users WHERE email = ?",
                          (email,)).fetchone()
        keys = db.execute("SELECT key_hash, key_prefix, is_active FROM api_keys WHERE user_id = ?",
                          (user[0],)).fetchall()
    assert user[1] == "Carol" and re.fullmatch(r"[A-Za-z0-9_-]{43}", user[4])
    expected = hashlib.scrypt(b"s3cret pass", salt=bytes.fromhex(user[3]), n=2 ** 14, r=8, p=1, dklen=32)
    assert user[2] == expected.hex()
    assert keys == [(hashlib.sha256(key.encode()).hexdigest(), key[6:14], 1)]
    assert api(ref_server, "/api/auth/me", key=key).json()["email"] == email


@pytest.mark.parametrize("method,path", [
    ("GET", "/api/auth/me"), ("GET", "/api/auth/encryption-salt"), ("GET", "/api/billing/subscription"),
    ("POST", "/api/sync/register"), ("POST", "/api/sync/push"), ("POST", "/api/sync/pull"),
    ("POST", "/api/sync/diff"), ("POST", "/api/sync/status")])
@pytest.mark.parametrize("bad_key", [None, "", "not-a-ctxfs-key", "ctxfs_" + "A" * 43])
def test_protected_routes_reject_missing_malformed_and_wrong_keys(ref_server, method, path, bad_key):
    body = {"device_id": "dev-x"} if method == "POST" else None
    resp = api(ref_server, path, body, key=bad_key, method=method)
    assert resp.status_code == 401
    assert resp.json() == {"detail": "Invalid or missing API key"}
    assert resp.headers["www-authenticate"] == "ApiKey"


def test_check_order_json_syntax_then_auth_then_schema(ref_server, two_users):
    alice, _ = two_users
    bad = api(ref_server, "/api/sync/push", content=b'{"device_id": ', method="POST")
    assert bad.status_code == 422
    assert bad.json()["detail"][0]["type"] == "json_invalid" and bad.json()["detail"][0]["loc"][0] == "body"
    no_key = api(ref_server, "/api/sync/push", {"memories": [{"id": "x"}]})
    assert no_key.status_code == 401
    schema = api(ref_server, "/api/sync/push", {"device_id": "dev-a", "memories": [{"id": "x"}]}, key=alice)
    assert schema.status_code == 422
    assert {"type": "missing", "loc": ["body", "memories", 0, "content"], "msg": "Field required"} \
        in schema.json()["detail"]
    not_object = api(ref_server, "/api/sync/pull", [1, 2], key=alice)
    assert not_object.status_code == 422 and not_object.json()["detail"][0]["loc"] == ["body"]


def test_get_endpoints_shapes(ref_server, two_users):
    alice, bob = two_users
    me = api(ref_server, "/api/auth/me", key=alice).json()
    assert set(me) == {"id", "email", "name", "provider", "is_admin"} and me["name"] == "Alice"
    salt_a = api(ref_server, "/api/auth/encryption-salt", key=alice).json()["salt"]
    salt_b = api(ref_server, "/api/auth/encryption-salt", key=bob).json()["salt"]
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", salt_a) and salt_a != salt_b
    assert api(ref_server, "/api/billing/subscription", key=alice).json() == {
        "tier": "self-hosted", "status": "active", "device_limit": -1, "memory_limit": -1,
        "current_period_end": None}


def test_unknown_path_404_and_wrong_method_405(ref_server, two_users):
    resp = api(ref_server, "/api/nope", {"a": 1})
    assert resp.status_code == 404 and resp.json() == {"detail": "Not Found"}
    resp = api(ref_server, "/api/sync/push", method="GET", key=two_users[0])
    assert resp.status_code == 405 and resp.json() == {"detail": "Method Not Allowed"}
    assert "POST" in resp.headers["allow"]
    assert api(ref_server, "/health", {"x": 1}).status_code == 405
    assert api(ref_server, "/health").status_code == 200  # the connection is still usable


def test_register_and_devices_never_change_owner(ref_server, two_users):
    alice, bob = two_users
    device = uid("laptop")
    info = {"device_id": device, "device_name": "laptop", "platform": "linux", "client_version": "0.1.0"}
    first = api(ref_server, "/api/sync/register", info, key=alice)
    assert first.status_code == 200
    body = first.json()
    assert set(body) == {"device_id", "device_name", "platform", "client_version", "registered_at",
                         "last_sync_at", "sync_cursor"}
    assert body["device_name"] == "laptop" and body["sync_cursor"] is None
    again = api(ref_server, "/api/sync/register", dict(info, device_name="renamed"), key=alice).json()
    assert again["device_name"] == "renamed" and again["registered_at"] == body["registered_at"]
    stolen = api(ref_server, "/api/sync/register", info, key=bob)
    assert stolen.status_code == 403 and stolen.json() == {"detail": "Device id belongs to another account"}
    assert push(ref_server, bob, device, [mem(uid())], status=403)["detail"] == \
        "Device id belongs to another account"
    assert api(ref_server, "/api/sync/pull", {"device_id": device, "cursor": None}, key=bob).status_code == 403
    assert api(ref_server, "/api/sync/status", {"device_id": device}, key=bob).status_code == 404
    assert api(ref_server, "/api/sync/status", {"device_id": device}, key=alice).status_code == 200
    missing = api(ref_server, "/api/sync/register", {"device_id": device}, key=alice)
    assert missing.status_code == 422 and {e["loc"][-1] for e in missing.json()["detail"]} == \
        {"device_name", "platform", "client_version"}


def test_push_clock_rule_table(ref_server, two_users):
    alice, _ = two_users
    m = uid()

    def one(content, clock, force=False):
        resp = push(ref_server, alice, None, [mem(m, content, clock)], force=force)
        return resp, resp["results"][0]

    resp, res = one("v1", {"a": 1})  # insert: stored as-is, no server tick
    assert (resp["accepted"], resp["accepted_memories"], res["status"]) == (1, 1, "accepted")
    assert res["vector_clock"] == {"a": 1} and resp["status"] == "success" and resp["success"] is True
    resp, res = one("v2", {"a": 2})  # newer
    assert res == {"entity_type": "memory", "id": m, "status": "accepted", "vector_clock": {"a": 2}}
    resp, res = one("v2-again", {"a": 2})  # equal counts as S <= C
    assert res["status"] == "accepted"
    resp, res = one("stale", {"a": 1})  # C < S
    assert res["status"] == "rejected" and res["vector_clock"] == {"a": 2}
    assert (resp["accepted"], resp["rejected"], resp["rejected_memories"]) == (0, 1, 1)
    assert resp["status"] == "partial" and resp["success"] is True and resp["conflicts"] == []
    resp, res = one("concurrent", {"b": 1})
    assert res["status"] == "conflict" and resp["status"] == "conflict" and resp["success"] is False
    assert (resp["accepted"], resp["rejected"]) == (0, 0)
    conflict = resp["conflicts"][0]
    assert conflict["entity_id"] == m and conflict["entity_type"] == "memory"
    assert conflict["client_clock"] == {"b": 1} and conflict["server_clock"] == {"a": 2}
    assert conflict["client_content"] == "concurrent" and conflict["server_content"] == "v2-again"
    assert set(conflict) == {"entity_id", "entity_type", "client_clock", "server_clock", "client_content",
                             "server_content", "client_updated_at", "server_updated_at"}
    assert server_rows(ref_server, alice)[("memories", m)]["content"] == "v2-again"
    resp, res = one("forced", {"b": 1}, force=True)  # force stores max(C, S)
    assert res["status"] == "accepted" and res["vector_clock"] == {"a": 2, "b": 1}
    resp, res = one("forced-stale", {"a": 1}, force=True)
    assert res["status"] == "accepted" and res["vector_clock"] == {"a": 2, "b": 1}
    row = server_rows(ref_server, alice)[("memories", m)]
    assert row["content"] == "forced-stale" and row["vector_clock"] == {"a": 2, "b": 1}
    assert row["last_modified_by"] == dev(alice)
    for key in ("accepted", "rejected", "accepted_memories", "rejected_memories", "accepted_sessions",
                "rejected_sessions", "conflicts", "server_timestamp", "message", "pushed_items"):
        assert key in resp


def test_push_conflicts_for_sessions_and_edges_and_results_order(ref_server, two_users):
    alice, _ = two_users
    s, a, b = uid("s"), uid(), uid()
    edge = {"from_id": a, "to_id": b, "relation": "related_to", "vector_clock": {"x": 1}}
    first = push(ref_server, alice, memories=[mem(a, clock={"x": 1})],
                 sessions=[{"id": s, "summary": "server summary", "vector_clock": {"x": 1}}], edges=[edge])
    assert [(r["entity_type"], r["id"]) for r in first["results"]] == \
        [("memory", a), ("session", s), ("edge", f"{a}:{b}:related_to")]
    assert (first["accepted"], first["accepted_memories"], first["accepted_sessions"]) == (3, 1, 1)
    second = push(ref_server, alice, sessions=[{"id": s, "summary": "mine", "vector_clock": {"y": 1}}],
                  edges=[dict(edge, vector_clock={"y": 1}, weight=0.5)])
    by_type = {c["entity_type"]: c for c in second["conflicts"]}
    assert by_type["session"]["client_content"] == "mine"
    assert by_type["session"]["server_content"] == "server summary"
    assert by_type["edge"]["entity_id"] == f"{a}:{b}:related_to"
    assert by_type["edge"]["client_content"] is None and by_type["edge"]["server_content"] is None


def test_push_overwrites_every_field_and_keeps_metadata_encrypted_and_extras(ref_server, two_users):
    alice, _ = two_users
    m = uid()
    push(ref_server, alice, memories=[mem(m, "first", {"a": 1}, tags=["x"], metadata={"k": 1, "nested": {"z": [1]}},
                                         summary="sum", embedding=[0.1] * 384, custom_field={"keep": True},
                                         user_id="someone-else")])
    row = server_rows(ref_server, alice)[("memories", m)]
    assert row["metadata"] == {"k": 1, "nested": {"z": [1]}} and row["custom_field"] == {"keep": True}
    assert row["embedding"] is None and row["encrypted"] is False and "user_id" not in row
    assert row["tags"] == ["x"] and row["summary"] == "sum"
    push(ref_server, alice, memories=[mem(m, "Y2lwaGVy", {"a": 2}, encrypted=True, metadata={"k": 2},
                                         content_hash="2cf24dba5fb0a30e", type="decision")])
    row = server_rows(ref_server, alice)[("memories", m)]
    assert row["content"] == "Y2lwaGVy" and row["encrypted"] is True and row["metadata"] == {"k": 2}
    assert row["tags"] == [] and row.get("summary") is None and "custom_field" not in row
    assert row["content_hash"] == "2cf24dba5fb0a30e" and row["type"] == "decision"
    with sqlite3.connect(ref_server.data / "server.db") as db:
        bodies = [json.loads(r[0]) for r in db.execute("SELECT body FROM memories WHERE id = ?", (m,))]
    assert len(bodies) == 1 and "embedding" not in bodies[0]


def test_tombstones_travel_through_push_and_pull(ref_server, two_users):
    alice, _ = two_users
    m = uid()
    push(ref_server, alice, memories=[mem(m, "alive", {"a": 1})])
    push(ref_server, alice, memories=[mem(m, "alive", {"a": 2}, deleted_at="2025-01-05T10:00:00Z")])
    row = server_rows(ref_server, alice)[("memories", m)]
    assert row["deleted_at"] == "2025-01-05T10:00:00.000000Z"
    push(ref_server, alice, memories=[mem(m, "revived", {"a": 3}, deleted_at=None)])
    assert server_rows(ref_server, alice)[("memories", m)]["deleted_at"] is None


def test_pull_cursor_pages_without_skips_or_repeats(ref_server):
    key = ref_server.add_user()
    same_ts = "2025-01-05T10:00:00Z"
    expected = set()
    for batch in range(5):
        mems = [mem(f"m{batch}-{i}", updated_at=same_ts, created_at=same_ts) for i in range(50)]
        sessions = [{"id": f"s{batch}-{i}", "updated_at": same_ts} for i in range(12)]
        edges = [{"from_id": f"m{batch}-{i}", "to_id": f"m{batch}-{i + 1}", "relation": "r",
                  "updated_at": same_ts} for i in range(8)]
        push(ref_server, key, memories=mems, sessions=sessions, edges=edges)
        expected |= {("memories", m["id"]) for m in mems} | {("sessions", s["id"]) for s in sessions}
        expected |= {("edges", f"{e['from_id']}:{e['to_id']}:r") for e in edges}
    assert len(expected) == 350
    seen, cursor, pages = [], None, 0
    while True:
        page = api(ref_server, "/api/sync/pull", {"device_id": dev(key, "pager"), "cursor": cursor, "limit": 37},
                   key=key).json()
        got = [(k, o["id"]) for k in ("memories", "sessions", "edges") for o in page[k]]
        assert len(got) <= 37
        seen += got
        pages += 1
        if page["has_more"]:
            assert len(got) == 37
        cursor = page["next_cursor"]
        if pages == 3:
            resume_cursor, resume_seen = cursor, len(seen)
        if not page["has_more"]:
            break
    assert len(seen) == len(set(seen)) == 350 and set(seen) == expected
    assert pages == 10 and any(k == "sessions" for k, _ in seen[:37 * 2])  # lists interleave by seq
    rest, final = pull_all(ref_server, key, device=dev(key, "pager"), cursor=resume_cursor, limit=100)
    resumed = [(k, i) for k, i, _ in rest]
    assert len(resumed) == len(set(resumed)) and set(resumed) == set(seen[resume_seen:]) and final == cursor
    empty = api(ref_server, "/api/sync/pull", {"device_id": dev(key, "pager"), "cursor": cursor}, key=key).json()
    assert (empty["memories"], empty["has_more"], empty["next_cursor"]) == ([], False, cursor)
    one = api(ref_server, "/api/sync/pull", {"device_id": dev(key, "pager"), "cursor": None, "limit": 0}, key=key).json()
    assert len(one["memories"]) == 1 and one["has_more"] is True
    big = api(ref_server, "/api/sync/pull", {"device_id": dev(key, "pager"), "cursor": "0", "limit": 10 ** 9}, key=key)
    assert big.status_code == 200 and len(big.json()["memories"]) == 250
    bad = api(ref_server, "/api/sync/pull", {"device_id": dev(key, "pager"), "cursor": "abc"}, key=key)
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "cursor"]


def test_pull_anchor_mode_pages_each_list_and_filters_on_receive_time(ref_server):
    key = ref_server.add_user()
    push(ref_server, key, memories=[mem(f"m{i}") for i in range(25)],
         sessions=[{"id": f"s{i}"} for i in range(3)])
    got, offset, first_ts = [], 0, None
    for _ in range(10):
        page = api(ref_server, "/api/sync/pull", {"device_id": dev(key, "anchor"), "since_timestamp": None,
                                                  "limit": 10, "offset": offset}, key=key).json()
        first_ts = first_ts or page["server_timestamp"]
        got += [o["id"] for k in ("memories", "sessions") for o in page[k]]
        if not page["has_more"]:
            assert page["next_offset"] == 0
            break
        assert page["next_offset"] == offset + 10  # the longest list's length, not the sum
        offset = page["next_offset"]
    assert sorted(got) == sorted([f"m{i}" for i in range(25)] + [f"s{i}" for i in range(3)])
    # An edit stamped long ago but received now still reaches a device whose cursor is later.
    push(ref_server, key, memories=[mem("m0", "late edit", {"z": 5}, updated_at="2001-01-01T00:00:00Z")])
    later = api(ref_server, "/api/sync/pull", {"device_id": dev(key, "anchor"), "since_timestamp": first_ts},
                key=key).json()
    assert [o["content"] for o in later["memories"]] == ["late edit"] and later["sessions"] == []


def test_users_are_isolated_even_with_the_same_ids(ref_server):
    alice, bob = ref_server.add_user(), ref_server.add_user()
    shared, a_only, s_id = uid(), uid(), uid("s")
    edge = {"from_id": shared, "to_id": a_only, "relation": "related_to"}
    push(ref_server, alice, dev(alice), [mem(shared, "alice secret", {"alice": 1}),
                                         mem(a_only, "alice 2", {"alice": 3})],
         sessions=[{"id": s_id, "summary": "alice session", "vector_clock": {"alice": 2}}],
         edges=[dict(edge, vector_clock={"alice": 2})])
    # Bob guesses the ids: concurrent or stale clocks are plain inserts in his own space…
    resp = push(ref_server, bob, dev(bob), [mem(shared, "bob text", {"bob": 1}, user_id="alice")],
                sessions=[{"id": s_id, "summary": "bob", "deleted_at": "2025-01-01T00:00:00Z"}],
                edges=[dict(edge, deleted_at="2025-01-01T00:00:00Z", vector_clock={"alice": 1})])
    assert resp["accepted"] == 3 and resp["conflicts"] == [] and resp["rejected"] == 0
    assert [r["vector_clock"] for r in resp["results"]] == [{"bob": 1}, {}, {"alice": 1}]
    # …and dominating, forced writes still only touch his own rows.
    resp = push(ref_server, bob, dev(bob), [mem(shared, "bob text", {"alice": 9, "bob": 2})], force=True)
    assert resp["results"][0]["vector_clock"] == {"alice": 9, "bob": 2}
    a_rows, b_rows = server_rows(ref_server, alice), server_rows(ref_server, bob)
    assert a_rows[("memories", shared)]["content"] == "alice secret"
    assert a_rows[("sessions", s_id)]["deleted_at"] is None
    assert a_rows[("edges", f"{shared}:{a_only}:related_to")]["deleted_at"] is None
    assert b_rows[("memories", shared)]["content"] == "bob text" and ("memories", a_only) not in b_rows
    assert not any(text in json.dumps(list(b_rows.values())) for text in ("alice secret", "alice 2", "alice session"))
    assert len(b_rows) == 3 and len(a_rows) == 4
    diff = api(ref_server, "/api/sync/diff", {"device_id": dev(bob), "memories": [
        {"id": shared, "content_hash": "0" * 16}, {"id": a_only, "content_hash": None}]}, key=bob).json()
    assert [m["content"] for m in diff["missing_memories"]] == ["bob text"]
    assert diff["server_missing_memory_ids"] == [a_only]
    status = api(ref_server, "/api/sync/status", {"device_id": dev(bob)}, key=bob).json()
    assert (status["memory_count"], status["session_count"], status["edge_count"]) == (1, 0, 0)
    a_status = api(ref_server, "/api/sync/status", {"device_id": dev(alice)}, key=alice).json()
    assert (a_status["memory_count"], a_status["session_count"], a_status["edge_count"]) == (2, 1, 1)


def test_diff_follows_rules_and_is_read_only(ref_server):
    key = ref_server.add_user()
    from contextfs_sync import content_hash
    push(ref_server, key, memories=[mem("same", "one"), mem("changed", "server text"),
                                    mem("gone", "x", deleted_at="2025-01-01T00:00:00Z"),
                                    mem("server-only", "s"), mem("nohash", "n")],
         sessions=[{"id": "s-both"}, {"id": "s-server"}, {"id": "s-dead", "deleted_at": "2025-01-01T00:00:00Z"}],
         edges=[{"from_id": "same", "to_id": "changed", "relation": "r"}])
    manifest = {"device_id": dev(key, "d"),
                "memories": [{"id": "same", "content_hash": content_hash("one"), "deleted_at": "2025-02-01T00:00:00Z"},
                             {"id": "changed", "content_hash": content_hash("client text")},
                             {"id": "gone", "content_hash": content_hash("x")},
                             {"id": "nohash", "content_hash": None},
                             {"id": "client-only", "content_hash": "abc"},
                             {"id": "client-deleted", "deleted_at": "2025-01-01T00:00:00Z"}],
                "sessions": [{"id": "s-both"}, {"id": "s-dead"}, {"id": "s-client"}],
                "edges": [{"id": "x:y:r"}]}
    diff = api(ref_server, "/api/sync/diff", manifest, key=key).json()
    assert sorted(m["id"] for m in diff["missing_memories"]) == ["changed", "nohash", "server-only"]
    assert all(m["embedding"] is None for m in diff["missing_memories"])
    assert diff["deleted_memory_ids"] == ["gone"] and diff["server_missing_memory_ids"] == ["client-only"]
    assert [s["id"] for s in diff["missing_sessions"]] == ["s-server"]
    assert diff["deleted_session_ids"] == ["s-dead"] and diff["server_missing_session_ids"] == ["s-client"]
    assert [e["id"] for e in diff["missing_edges"]] == ["same:changed:r"]
    assert diff["server_missing_edge_ids"] == ["x:y:r"]
    assert (diff["total_missing"], diff["total_updated"], diff["total_deleted"], diff["total_server_missing"]) \
        == (5, 1, 2, 3)
    assert diff["has_more"] is False and diff["next_offset"] == 0 and diff["success"] is True
    # Read-only: the manifest's deleted_at for "same" did not tombstone the server row.
    assert server_rows(ref_server, key)[("memories", "same")]["deleted_at"] is None
    bad = api(ref_server, "/api/sync/diff", {"device_id": "d", "memories": [{"content_hash": "x"}]}, key=key)
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "memories", 0, "id"]


def test_status_counts_pending_rows_for_this_device(ref_server):
    key = ref_server.add_user()
    resp = api(ref_server, "/api/sync/status", {"device_id": "never-seen"}, key=key)
    assert resp.status_code == 404 and resp.json() == {"detail": "Device not registered"}
    push(ref_server, key, dev(key, "writer"), [mem("a"), mem("b"), mem("c", deleted_at="2025-01-01T00:00:00Z")],
         sessions=[{"id": "s"}])
    api(ref_server, "/api/sync/register", {"device_id": dev(key, "reader"), "device_name": "r", "platform": "linux",
                                           "client_version": "0.1.0"}, key=key)
    status = api(ref_server, "/api/sync/status", {"device_id": dev(key, "reader")}, key=key).json()
    assert status["pending_pull_count"] == 4 and status["pending_push_count"] == 0
    assert (status["memory_count"], status["deleted_memory_count"], status["session_count"]) == (2, 1, 1)
    api(ref_server, "/api/sync/pull", {"device_id": dev(key, "reader"), "cursor": None, "limit": 3}, key=key)
    assert api(ref_server, "/api/sync/status", {"device_id": dev(key, "reader")}, key=key).json()["pending_pull_count"] == 1
    pull_all(ref_server, key, device=dev(key, "reader"))
    assert api(ref_server, "/api/sync/status", {"device_id": dev(key, "reader")}, key=key).json()["pending_pull_count"] == 0


def test_body_too_large_is_413_without_reading_it(ref_server):
    start = time.monotonic()
    status, headers, body = raw_http(ref_server, b"POST /api/sync/push HTTP/1.1\r\nHost: x\r\n"
                                                 b"Content-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n{")
    assert status == 413 and json.loads(body) == {"detail": "Request body too large"}
    assert time.monotonic() - start < 8  # answered without waiting for a gigabyte


def test_content_length_required_and_malformed_bodies(ref_server, two_users):
    status, _h, body = raw_http(ref_server, b"POST /api/sync/push HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status == 411 and json.loads(body) == {"detail": "Length Required"}
    status, _h, body = raw_http(ref_server, b"POST /api/sync/push HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n"
                                           b"Connection: close\r\n\r\n")
    assert status == 400
    for content in (b"\xff\xfe{}", b"not json", b"", b'{"device_id": NaN}', b'{"device_id": 1e400}'):
        resp = api(ref_server, "/api/sync/push", content=content, method="POST", key=two_users[0])
        assert resp.status_code == 422, content
        assert resp.json()["detail"][0]["type"] in ("json_invalid", "missing")
    lone = api(ref_server, "/api/sync/push", content=b'{"device_id": "d", "memories": [{"id": "x", '
                                                    b'"content": "\\ud800"}]}', method="POST", key=two_users[0])
    assert lone.status_code == 422


def test_deep_nesting_is_422_and_the_server_survives(ref_server, two_users):
    alice, _ = two_users
    ok_meta = {"a": {"b": {"c": {"d": [1, [2, [3]]]}}}}
    assert push(ref_server, alice, memories=[mem(uid(), metadata=ok_meta)])["accepted"] == 1
    for depth in (100, 100_000):
        content = b'{"device_id": "d", "memories": [{"id": "x", "content": "c", "metadata": ' + \
            b'{"a": ' * depth + b"1" + b"}" * depth + b"}]}"
        resp = api(ref_server, "/api/sync/push", content=content, method="POST", key=alice)
        assert resp.status_code == 422 and resp.json()["detail"][0]["type"] == "json_invalid"
    assert api(ref_server, "/health").status_code == 200
    assert "Traceback" not in ref_server.stderr()


def test_nul_bytes_in_ids_are_rejected_and_nothing_is_stored(ref_server):
    key = ref_server.add_user()
    good = uid()
    resp = api(ref_server, "/api/sync/push", {"device_id": "d", "memories": [mem(good), mem("bad\x00id")]}, key=key)
    assert resp.status_code == 422
    assert resp.json()["detail"][0]["loc"] == ["body", "memories", 1, "id"]
    edge = api(ref_server, "/api/sync/push", {"device_id": "d", "edges": [
        {"from_id": "a", "to_id": "b\x00", "relation": "r"}]}, key=key)
    assert edge.status_code == 422
    assert api(ref_server, "/api/sync/pull", {"device_id": "d\x00"}, key=key).status_code == 422
    assert server_rows(ref_server, key) == {}


@pytest.mark.parametrize("memory,loc_end", [
    ({"id": 5, "content": "c"}, "id"), ({"id": "x", "content": "c", "tags": "t"}, "tags"),
    ({"id": "x", "content": "c", "metadata": []}, "metadata"),
    ({"id": "x", "content": "c", "vector_clock": {"a": -1}}, "a"),
    ({"id": "x", "content": "c", "updated_at": "yesterday"}, "updated_at"),
    ({"id": "x", "content": "c", "encrypted": "yes"}, "encrypted"), ({"id": "", "content": "c"}, "id")])
def test_push_schema_errors_name_the_field(ref_server, two_users, memory, loc_end):
    resp = api(ref_server, "/api/sync/push", {"device_id": "d", "memories": [memory]}, key=two_users[0])
    assert resp.status_code == 422
    entry = resp.json()["detail"][0]
    assert entry["loc"][:3] == ["body", "memories", 0] and entry["loc"][-1] == loc_end
    assert set(entry) == {"type", "loc", "msg"}


def test_concurrent_pushes_and_cursor_pulls_never_skip(ref_server):
    key = ref_server.add_user()
    writers, pushes, per_push = 4, 40, 3
    errors = []

    def writer(w):
        try:
            for p in range(pushes):
                push(ref_server, key, dev(key, f"w{w}"), [mem(f"w{w}-{p}-{i}") for i in range(per_push)])
        except Exception as exc:  # surfaced by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    seen, cursor = [], None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        alive = any(t.is_alive() for t in threads)
        items, cursor = pull_all(ref_server, key, device=dev(key, "tail"), limit=7, cursor=cursor)
        seen += [i for _k, i, _o in items]
        if not alive:
            break
    for t in threads:
        t.join(10)
    assert not errors
    assert len(seen) == len(set(seen)) == writers * pushes * per_push


def test_login_success_failure_and_rate_limit(tmp_path):
    server = start_ref_server(tmp_path)
    try:
        first_key = server.add_user(email="dana@example.com", password="correct horse", name="Dana")
        server.add_user(email="keyonly@example.com")
        ok = api(server, "/api/auth/login", {"email": "Dana@Example.com", "password": "correct horse",
                                             "session_type": "CLI Session"})
        assert ok.status_code == 200
        body = ok.json()
        assert set(body) == {"user", "apiKey", "encryptionKey"} and body["encryptionKey"] is None
        assert body["user"]["email"] == "dana@example.com" and body["user"]["emailVerified"] is True
        assert set(body["user"]) == {"id", "email", "name", "emailVerified", "createdAt", "is_admin"}
        new_key = body["apiKey"]
        assert re.fullmatch(r"ctxfs_[A-Za-z0-9_-]{43}", new_key) and new_key != first_key
        assert api(server, "/api/auth/me", key=new_key).json()["email"] == "dana@example.com"
        salts = {api(server, "/api/auth/encryption-salt", key=k).json()["salt"] for k in (first_key, new_key)}
        assert len(salts) == 1  # one salt per user: every device derives the same E2EE key
        missing = api(server, "/api/auth/login", {"email": "dana@example.com"})
        assert missing.status_code == 422
        wrong = {"detail": "Invalid email or password"}
        assert api(server, "/api/auth/login", {"email": "keyonly@example.com", "password": ""}).json() == wrong
        assert api(server, "/api/auth/login", {"email": "nobody@example.com", "password": "x"}).json() == wrong
        for _ in range(3):
            resp = api(server, "/api/auth/login", {"email": "dana@example.com", "password": "guess"})
            assert resp.status_code == 401 and resp.json() == wrong
        limited = api(server, "/api/auth/login", {"email": "dana@example.com", "password": "correct horse"})
        assert limited.status_code == 429
        assert limited.json() == {"detail": "Too many login attempts; retry later"}
        assert 1 <= int(limited.headers["retry-after"]) <= 60
        other = api(server, "/api/auth/login", {"email": "keyonly@example.com", "password": "x"})
        assert other.status_code == 429  # the same client IP is limited too
        assert api(server, "/api/auth/me", key=new_key).status_code == 200  # keys still work
    finally:
        assert server.stop() == 0


def test_max_body_flag_and_sigterm_exits_cleanly(tmp_path):
    server = start_ref_server(tmp_path, "--max-body", "2048")
    key = server.add_user()
    small = push(server, key, memories=[mem("small", "x" * 100)])
    assert small["accepted"] == 1
    for i in range(6):
        push(server, key, memories=[mem(f"m{i}", "y" * 700)])
    pages = []
    cursor = None
    for _ in range(20):  # pages are cut at --max-body bytes of rows, never losing one
        page = api(server, "/api/sync/pull", {"device_id": dev(key), "cursor": cursor, "limit": 100}, key=key).json()
        pages.append([m["id"] for m in page["memories"]])
        cursor = page["next_cursor"]
        if not page["has_more"]:
            break
    assert len(pages) >= 4 and all(1 <= len(p) <= 2 for p in pages)  # ~900-byte rows, 2048-byte pages
    assert sorted(sum(pages, [])) == sorted(["small"] + [f"m{i}" for i in range(6)])
    resp = api(server, "/api/sync/push", {"device_id": "d", "memories": [mem("big", "x" * 3000)]}, key=key)
    assert resp.status_code == 413 and resp.json() == {"detail": "Request body too large"}
    assert server.stop(signal.SIGTERM) == 0
    assert "Traceback" not in server.stderr() and server.stderr().strip() == ""
    again = start_ref_server(tmp_path)  # same data dir: data survived the restart
    try:
        assert server_rows(again, key)[("memories", "small")]["content"] == "x" * 100
    finally:
        assert again.stop(signal.SIGINT) == 0


def test_server_port_in_use_is_a_clear_error(ref_server, tmp_path):
    proc = run_cli(tmp_path, "server", "run", "--port", str(ref_server.port), "--data", str(tmp_path / "d"),
                   timeout=30)
    assert proc.returncode == 1 and "Cannot listen" in proc.stderr and "Traceback" not in proc.stderr


def test_server_module_import_stays_light():
    code = "import sys, contextfs_sync; print(any(m in sys.modules for m in ('http.server', 'secrets', 'hmac')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr


# ---- tests: sync ---------------------------------------------------------------------------
# (sync engine, cloud CLI)


# ---- tests: MCP stdio server ---------------------------------------------------------------
# (issue 5)


# ---- tests: reliability and security -------------------------------------------------------
# (issue 7)
