"""The reference server's tests: raw HTTP against a real `contextfs server run --port 0`
subprocess, the WSGI app under gunicorn, and the client module vendored alone.

Fixtures and helpers come from conftest.py.
"""
from __future__ import annotations

import hashlib
import json
import re
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

import contextfs_server

from conftest import (
    _secret_parts, api, dev, make_device, mem, pull_all, push, raw_http, run_cli, server_rows, start_ref_server,
    sync, uid,
)


# ---- tests: reference server ---------------------------------------------------------------
# Raw HTTP against a real `contextfs server run --port 0` subprocess. `ref_server` (module
# scope) is shared: tests use fresh ids/users so they do not depend on each other. The sync
# tests reuse `ref_server`, `start_ref_server` and `RefServer.add_user`.


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
    ("POST", "/api/sync/diff"), ("POST", "/api/sync/status"), ("GET", "/api/auth/api-keys"),
    ("POST", "/api/auth/api-keys"), ("POST", "/api/auth/api-keys/revoke"), ("DELETE", "/api/auth/api-keys/some-id")])
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


def test_api_keys_list_create_revoke_delete_per_user(ref_server, two_users):
    """protocol.md §5.4, as the public client's `cloud api-key list/create/revoke` uses it."""
    alice, bob = two_users
    made = api(ref_server, "/api/auth/api-keys", {"name": "ci runner", "with_encryption": True}, key=alice).json()
    assert set(made) == {"id", "name", "api_key", "encryption_key", "key_prefix", "config_snippet"}
    assert made["encryption_key"] is None and made["key_prefix"] == made["api_key"][6:14]
    assert made["api_key"] in made["config_snippet"]
    new_key = made["api_key"]
    assert api(ref_server, "/api/auth/me", key=new_key).json()["name"] == "Alice"
    listed = api(ref_server, "/api/auth/api-keys", key=alice).json()["keys"]
    assert [k["name"] for k in listed if k["id"] == made["id"]] == ["ci runner"]  # the stored id (gap 22)
    assert all(set(k) == {"id", "name", "key_prefix", "is_active", "created_at", "last_used_at"} for k in listed)
    assert new_key not in json.dumps(listed)
    assert made["id"] not in json.dumps(api(ref_server, "/api/auth/api-keys", key=bob).json())
    # Another user's key is not found; the key in use cannot revoke itself.
    assert api(ref_server, "/api/auth/api-keys/revoke", {"key_id": made["id"]}, key=bob).status_code == 404
    assert api(ref_server, f"/api/auth/api-keys/{made['id']}", key=bob, method="DELETE").status_code == 404
    itself = api(ref_server, "/api/auth/api-keys/revoke", {"key_id": made["id"]}, key=new_key)
    assert itself.status_code == 400 and itself.json() == {"detail": "Cannot revoke the API key currently in use"}
    assert api(ref_server, "/api/auth/api-keys/revoke", {"key_id": made["id"]}, key=alice).json() == {
        "status": "revoked"}
    assert api(ref_server, "/api/auth/me", key=new_key).status_code == 401
    assert [k["is_active"] for k in api(ref_server, "/api/auth/api-keys", key=alice).json()["keys"]
            if k["id"] == made["id"]] == [False]
    assert api(ref_server, f"/api/auth/api-keys/{made['id']}", key=alice, method="DELETE").json() == {
        "status": "deleted"}
    assert made["id"] not in json.dumps(api(ref_server, "/api/auth/api-keys", key=alice).json())
    missing = api(ref_server, "/api/auth/api-keys", {"with_encryption": False}, key=alice)
    assert missing.status_code == 422 and missing.json()["detail"][0]["loc"] == ["body", "name"]


def test_get_endpoints_shapes(ref_server, two_users):
    alice, bob = two_users
    me = api(ref_server, "/api/auth/me", key=alice).json()
    assert set(me) == {"id", "email", "name", "provider", "is_admin"} and me["name"] == "Alice"
    # No salt, as on ContextFS Cloud without E2EE: a salt would switch the public client's
    # automatic encryption on, under keys other devices cannot derive (issue 11, item 6).
    salt = api(ref_server, "/api/auth/encryption-salt", key=alice)
    assert salt.status_code == 404 and salt.json() == {"detail": "No encryption salt configured for this API key"}
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


def test_register_and_devices_are_per_account(ref_server, two_users):
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
    # Bob registering the same device id gets his own entry: Alice's device is not taken over.
    bobs = api(ref_server, "/api/sync/register", dict(info, device_name="bob's"), key=bob)
    assert bobs.status_code == 200 and bobs.json()["device_name"] == "bob's"
    assert api(ref_server, "/api/sync/register", info, key=alice).json()["device_name"] == "laptop"
    push(ref_server, bob, device, [mem(uid())])
    assert api(ref_server, "/api/sync/status", {"device_id": device}, key=bob).json()["memory_count"] == 1
    assert api(ref_server, "/api/sync/status", {"device_id": device}, key=alice).status_code == 200
    assert api(ref_server, "/api/sync/status", {"device_id": uid("never")}, key=alice).status_code == 404
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
    resp, res = one("v2", {"a": 2})  # equal clock, same data: S <= C (a retried push)
    assert res["status"] == "accepted"
    resp, res = one("v2, re-issued", {"a": 2})  # equal clock, other data: concurrent (§6 b)
    assert res["status"] == "conflict" and resp["conflicts"][0]["server_content"] == "v2"
    resp, res = one("v2-again", {"a": 2}, force=True)
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


def test_stored_clocks_are_pruned_and_a_stale_version_never_wins(ref_server, two_users):
    """1,000 CI devices editing one memory (issue 20, item 4): the server keeps 64 entries, the
    oldest writers folded into one ~pruned entry, so the next device's edit still goes in and
    a device whose clock predates the pruning gets a conflict, never an overwrite."""
    alice, _ = two_users
    m = uid()
    clock = {}
    for n in range(100):  # each device pulls the stored clock, edits, pushes
        clock = dict(clock, **{f"ci-{n:03d}": 1_800_000_000 + n})
        res = push(ref_server, alice, f"ci-{n:03d}-{alice[6:12]}", [mem(m, f"edit {n}", clock)])["results"][0]
        assert res["status"] == "accepted", (n, res)
        clock = res["vector_clock"]
        assert len(clock) <= 64
    assert clock["~pruned"] == 1_800_000_000 + 36 and "ci-036" not in clock and clock["ci-099"] == 1_800_000_099
    stale = {f"ci-{n:03d}": 1_800_000_000 + n for n in range(99)}  # saw edit 98, not 99
    stale["ci-050"] += 1000                                      # … and edited it again
    res = push(ref_server, alice, None, [mem(m, "stale edit", stale)])["results"][0]
    assert res["status"] == "conflict"
    assert server_rows(ref_server, alice)[("memories", m)]["content"] == "edit 99"
    newer = dict(clock, **{"ci-050": 1_900_000_000})
    assert push(ref_server, alice, None, [mem(m, "after the prune", newer)])["results"][0]["status"] == "accepted"


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


def test_diff_follows_rules_and_applies_only_informed_deletes(ref_server):
    key = ref_server.add_user()
    from contextfs_sync import content_hash
    push(ref_server, key, memories=[mem("same", "one"), mem("changed", "server text"),
                                    mem("gone", "x", deleted_at="2025-01-01T00:00:00Z"),
                                    mem("server-only", "s"), mem("nohash", "n")],
         sessions=[{"id": "s-both"}, {"id": "s-server"}, {"id": "s-dead", "deleted_at": "2025-01-01T00:00:00Z"}],
         edges=[{"from_id": "same", "to_id": "changed", "relation": "r"}])
    manifest = {"device_id": dev(key, "d"),
                "memories": [{"id": "same", "content_hash": content_hash("one"), "deleted_at": "2025-02-01T00:00:00Z"},
                             {"id": "changed", "content_hash": content_hash("client text"),
                              "deleted_at": "2025-02-01T00:00:00Z"},
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
    # The public client deletes only through a manifest (issue 11, item 7): "same" was deleted
    # at the version the server holds, so it is a tombstone now, ticked for that device and
    # sent to every other device; "changed" was deleted at an older version, so the newer
    # edit wins and stays.
    rows = server_rows(ref_server, key)
    same = rows[("memories", "same")]
    assert same["deleted_at"] == "2025-02-01T00:00:00.000000Z" and same["content"] == ""
    assert same["vector_clock"][dev(key, "d")] >= 1 and same["last_modified_by"] == dev(key, "d")
    assert rows[("memories", "changed")]["deleted_at"] is None
    assert rows[("memories", "changed")]["content"] == "server text"
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
        ids = {api(server, "/api/auth/me", key=k).json()["id"] for k in (first_key, new_key)}
        assert len(ids) == 1  # one account id: every device salts its E2EE key the same
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


def test_importing_the_client_never_imports_the_server_or_its_plumbing():
    code = ("import sys, contextfs_sync; print([m for m in ('contextfs_server', 'http.server', 'secrets', 'hmac', "
            "'wsgiref') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr


def test_server_imports_only_the_clients_io_free_layers():
    """Every name contextfs_server takes from contextfs_sync is defined above the client's
    section 5 (config): errors, data model, clock rules, limits. The client has no server names."""
    client = Path(contextfs_server.__file__).with_name("contextfs_sync.py").read_text(encoding="utf-8")
    lower_layers = client[:client.index("# ---- 5. config")]
    server_src = Path(contextfs_server.__file__).read_text(encoding="utf-8")
    imported = re.search(r"from contextfs_sync import \((.*?)\)", server_src, re.S).group(1)
    names = [n.strip() for n in imported.replace("\n", " ").split(",") if n.strip()]
    assert len(names) > 5
    for name in names:
        assert re.search(rf"^(?:def |class ){re.escape(name)}\b|^{re.escape(name)} = ", lower_layers, re.M), name
    assert server_src.count("import contextfs_sync") == 0 and server_src.count("from contextfs_sync") == 1
    for gone in ("class SyncServerApp", "def make_server", "def server_add_user", "SERVER_MAX_BODY", "_HTTPError",
                 "def decode_json_body", "_LoginLimiter", "CREATE TABLE IF NOT EXISTS users", "def create_app"):
        assert gone not in client, gone


def test_all_server_sql_is_in_the_storage_class():
    """The app and the hosts hold no connection and no SQL: only section 3 (storage) does."""
    src = Path(contextfs_server.__file__).read_text(encoding="utf-8")
    outside = src[src.index("# ---- 2. request"):src.index("# ---- 3. storage")] + src[src.index("# ---- 4. the WSGI"):]
    for needle in ("sqlite3", "execute(", "SELECT ", "INSERT INTO", "UPDATE ", "DELETE FROM", "BEGIN", "_conn("):
        assert needle not in outside, needle


def _gunicorn(tmp_path, app_spec):
    """Start gunicorn (2 sync workers) on 127.0.0.1 with a free port; returns (process, url)."""
    gunicorn = Path(sys.executable).with_name("gunicorn")
    log = tmp_path / "gunicorn.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen([str(gunicorn), "-w", "2", "-b", "127.0.0.1:0", "--graceful-timeout", "5",
                                 app_spec], stdout=subprocess.DEVNULL, stderr=err, cwd=tmp_path)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        match = re.search(r"Listening at: (http://127\.0\.0\.1:\d+)", log.read_text(errors="replace"))
        if match and "Booting worker" in log.read_text(errors="replace"):
            return proc, match.group(1), log
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"gunicorn did not start: {log.read_text(errors='replace')}")


class _Url:
    def __init__(self, url):
        self.url = url


def test_the_app_under_gunicorn_syncs_two_devices_with_the_installed_script(tmp_path):
    data = tmp_path / "srv"
    key = run_cli(tmp_path / "admin", "server", "add-user", "gunicorn@example.com", "--data", str(data),
                  check=0).stdout.strip()
    proc, url, log = _gunicorn(tmp_path, f'contextfs_server:create_app("{data}")')
    try:
        server = _Url(url)
        laptop, desktop = make_device(tmp_path, "laptop", server, key), make_device(tmp_path, "desktop", server, key)
        run_cli(laptop, "save", "Deploys go through the staging cluster first", "--type", "decision", check=0)
        run_cli(laptop, "session", "start", "--label", "gunicorn", check=0)
        report = sync(laptop)
        assert report["pushed"]["memories"] == 1, report
        assert sync(desktop)["pulled"]["memories"] == 1
        [found] = json.loads(run_cli(desktop, "search", "staging", "--json", check=0).stdout)
        assert found["content"] == "Deploys go through the staging cluster first"
        run_cli(desktop, "edit", found["id"], "Deploys go through staging, then canary", check=0)
        sync(desktop)
        sync(laptop)
        assert json.loads(run_cli(laptop, "show", found["id"], "--json", check=0).stdout)["content"] == \
            "Deploys go through staging, then canary"
        # The same validation and errors as `contextfs server run`: JSON answers from the app.
        assert api(server, "/api/sync/push", {"device_id": "x"}, key="ctxfs_wrong").status_code == 401
        bad = api(server, "/api/sync/push", content=b"{", method="POST", key=key)
        assert bad.status_code == 422 and bad.json()["detail"][0]["type"] == "json_invalid"
        assert api(server, "/nope").json() == {"detail": "Not Found"}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert "Traceback" not in log.read_text(errors="replace")


def test_create_app_takes_a_sqlite_url_and_refuses_other_schemes(tmp_path):
    key = contextfs_server.add_user(f"sqlite:///{tmp_path}/db/server.db", "url@example.com")
    assert (tmp_path / "db" / "server.db").exists()
    app = contextfs_server.create_app(f"sqlite:///{tmp_path}/db/server.db")
    assert app.storage.user_for_key(contextfs_server._key_hash(key))["email"] == "url@example.com"
    with pytest.raises(contextfs_server.UsageError, match="not supported"):
        contextfs_server.create_app("postgresql://localhost/contextfs")


def test_the_app_is_plain_wsgi(tmp_path):
    """Called directly with a PEP 3333 environ: no host involved."""
    import io

    app = contextfs_server.create_app(tmp_path / "data")
    key = contextfs_server.add_user(tmp_path / "data", "wsgi@example.com")
    answers = []

    def call(method, path, body=b"", **headers):
        environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "CONTENT_LENGTH": str(len(body)),
                   "wsgi.input": io.BytesIO(body), "wsgi.errors": io.StringIO(), "REMOTE_ADDR": "127.0.0.1"}
        environ.update({"HTTP_" + k.upper(): v for k, v in headers.items()})
        chunks = app(environ, lambda status, hdrs, exc_info=None: answers.append((status, dict(hdrs))))
        return answers[-1][0], json.loads(b"".join(chunks))

    assert call("GET", "/health")[0] == "200 OK"
    status, body = call("POST", "/api/sync/push", json.dumps(
        {"device_id": "d1", "memories": [{"id": "m1", "content": "plain WSGI", "vector_clock": {"d1": 1}}]}).encode(),
        x_api_key=key)
    assert status == "200 OK" and body["accepted_memories"] == 1
    status, body = call("POST", "/api/sync/pull", b'{"device_id": "d2", "cursor": null}', x_api_key=key)
    assert [m["content"] for m in body["memories"]] == ["plain WSGI"]
    assert re.fullmatch(r"[0-9a-f]{32}", body["storage_id"]) and body["top_seq"] == 1  # protocol.md §6 e
    statements = []
    app.storage._conn().set_trace_callback(statements.append)  # this thread's connection
    status, body = call("POST", "/api/sync/pull", b'{"device_id": "d3", "cursor": "0"}', x_api_key=key)
    app.storage._conn().set_trace_callback(None)
    assert body["next_cursor"] == "1"
    # Registering the device, reading the page and saving its cursor: one write transaction.
    assert [s.split()[0] for s in statements if s.split()[0] in ("BEGIN", "COMMIT")] == ["BEGIN", "COMMIT"]
    device = app.storage.device_status(app.storage.user_for_key(contextfs_server._key_hash(key))["id"], "d3")
    assert device is not None and device["pending"] == 0
    assert call("POST", "/api/sync/pull", b"x" * 10, x_api_key=key)[0] == "422 Unprocessable Entity"
    assert call("DELETE", "/health")[0] == "405 Method Not Allowed" and answers[-1][1]["Allow"] == "GET"
    small = contextfs_server.ServerApp(app.storage, max_body=8)
    environ = {"REQUEST_METHOD": "POST", "PATH_INFO": "/api/sync/pull", "CONTENT_LENGTH": "9",
               "wsgi.input": io.BytesIO(b"x" * 9), "wsgi.errors": io.StringIO()}
    assert json.loads(b"".join(small(environ, lambda *a: None))) == {"detail": "Request body too large"}


def _only_httpx_path(target):
    """A directory holding httpx and its dependencies, symlinked from this environment (offline)."""
    import importlib.metadata as md

    target.mkdir()
    todo, seen = ["httpx"], set()
    while todo:
        name = todo.pop()
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # a dependency for another Python version
        if dist.metadata["Name"].lower() in seen:
            continue
        seen.add(dist.metadata["Name"].lower())
        for req in dist.requires or []:
            if "extra ==" not in req:
                todo.append(re.match(r"[A-Za-z0-9._-]+", req).group(0))
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if Path(str(f)).parts}
        for top in tops:
            if top.endswith((".dist-info", ".pth")) or top in ("..", "__pycache__", "bin"):
                continue
            source = Path(dist.locate_file(top))
            if source.exists() and not (target / top).exists():
                (target / top).symlink_to(source)
    return seen


def test_vendored_client_alone_with_only_httpx_syncs_two_homes(tmp_path, ref_server):
    vendor = tmp_path / "vendor"
    vendor.mkdir()
    (vendor / "contextfs_sync.py").write_bytes(
        Path(contextfs_server.__file__).with_name("contextfs_sync.py").read_bytes())
    dists = _only_httpx_path(tmp_path / "deps")
    assert "httpx" in dists and not {"chromadb", "cryptography", "mcp", "contextfs-sync"} & dists
    key = ref_server.add_user()
    script = f"""
import json, os, sys
sys.path[:0] = [{str(vendor)!r}, {str(tmp_path / "deps")!r}]
import contextfs_sync
assert contextfs_sync.__file__.startswith({str(vendor)!r})
for absent in ("contextfs_server", "chromadb", "cryptography", "mcp"):
    try:
        __import__(absent)
    except ImportError:
        continue
    raise SystemExit(absent + " is importable: not a vendored environment")
main = contextfs_sync.main
home = sys.argv[1]
os.environ["CONTEXTFS_HOME"] = home
codes = [main(["cloud", "login", "--api-key", {key!r}, "--server", {ref_server.url!r}]),
         main(["cloud", "configure", "--enabled"])]
if sys.argv[2] == "save":
    codes.append(main(["save", "Vendored clients sync too", "--type", "fact"]))
codes.append(main(["cloud", "sync"]))
codes.append(main(["search", "vendored", "--json"]))
print("CODES", json.dumps(codes))
"""
    outputs = {}
    for name, step in (("laptop", "save"), ("desktop", "pull")):
        proc = subprocess.run([sys.executable, "-S", "-c", script, str(tmp_path / name), step],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        codes = json.loads(proc.stdout.split("CODES ")[-1])
        assert codes and all(code == 0 for code in codes), (codes, proc.stdout, proc.stderr)
        outputs[name] = proc.stdout
    assert "Vendored clients sync too" in outputs["desktop"]


def test_server_stores_only_key_hashes_and_no_key_ever_lands_in_its_files(tmp_path):
    server = start_ref_server(tmp_path)
    try:
        keys = [server.add_user(email=f"k{i}@example.com", password="pw-" + "x" * 8 if i == 0 else None)
                for i in range(3)]
        login = api(server, "/api/auth/login", {"email": "k0@example.com", "password": "pw-xxxxxxxx"})
        keys.append(login.json()["apiKey"])
        for key in keys:                              # use each key: last_used_at and devices get written
            push(server, key, f"d-{key[6:12]}", [{"id": f"m-{key[6:12]}", "content": "c"}])
            assert api(server, "/api/auth/me", key=key).status_code == 200
    finally:
        assert server.stop() == 0
    files = [p for p in Path(server.data).rglob("*") if p.is_file()]
    assert any(p.name == "server.db" for p in files)
    blob = b"".join(p.read_bytes() for p in files)
    for key in keys:
        for part in _secret_parts(key):
            assert part.encode() not in blob, part
        assert hashlib.sha256(key.encode()).hexdigest().encode() in blob  # stored as its hash
    # The lookup is by hash and the comparison hmac.compare_digest (read: _authenticate): a
    # timing probe of a 64-hex-char hash lookup over HTTP is not a meaningful unit test.


# Wrong-typed values for every field of a push (loc suffix expected in the 422 answer).
_WRONG_TYPES = {
    "memories": [("id", 5), ("content", 5), ("content", None), ("type", 1), ("tags", "t"), ("tags", [1]),
                 ("summary", []), ("namespace_id", {}), ("repo_url", 1), ("repo_name", 1), ("relative_path", 1),
                 ("source_file", 1), ("source_repo", 1), ("source_tool", 1), ("project", 1), ("session_id", 1),
                 ("metadata", []), ("metadata", "m"), ("embedding", "e"), ("embedding", ["x"]), ("encrypted", "no"),
                 ("visibility", 1), ("vector_clock", []), ("vector_clock", {"d": "1"}), ("vector_clock", {"d": -1}),
                 ("vector_clock", {"d": 2 ** 63}), ("vector_clock", {"d": 1.5}), ("content_hash", 1),
                 ("deleted_at", 12), ("deleted_at", "yesterday"), ("created_at", True), ("updated_at", "2025-13-45"),
                 ("last_modified_by", 1)],
    "sessions": [("id", None), ("label", 1), ("namespace_id", 1), ("tool", 1), ("repo_url", 1), ("repo_name", 1),
                 ("repo_path", 1), ("branch", 1), ("summary", 1), ("metadata", []), ("started_at", "soon"),
                 ("ended_at", 1), ("deleted_at", []), ("vector_clock", "x"), ("content_hash", 1)],
    "edges": [("from_id", 1), ("to_id", None), ("relation", ["r"]), ("weight", "heavy"), ("weight", True),
              ("created_by", 1), ("metadata", 1), ("vector_clock", {"d": None}), ("deleted_at", 0), ("id", 1)],
}
_VALID = {"memories": {"content": "c"}, "sessions": {}, "edges": {"from_id": "a", "to_id": "b", "relation": "r"}}


def _push_raw(server, key, content):
    return api(server, "/api/sync/push", content=content, method="POST", key=key,
               headers={"Content-Type": "application/json"})


def test_hostile_push_bodies_get_a_clear_4xx_and_store_nothing(ref_server):
    rel_server = ref_server
    key = ref_server.add_user()
    device = f"d-{uuid.uuid4().hex[:8]}"
    cases = []
    for plural, fields in _WRONG_TYPES.items():
        for name, value in fields:
            bad = dict(_VALID[plural], **({} if plural == "edges" else {"id": f"bad-{name}"}))
            bad[name] = value
            body = {"device_id": device, "memories": [{"id": "innocent", "content": "stored only if all valid"}],
                    plural: ([] if plural != "memories" else [{"id": "innocent", "content": "x"}]) + [bad]}
            cases.append((f"{plural}.{name}={value!r}", body, name))
    for name, value in [("device_id", 5), ("device_id", None), ("memories", "x"), ("memories", [5]),
                        ("sessions", {}), ("edges", 3), ("force", "yes"), ("last_sync_timestamp", 5),
                        ("backend_type", 5)]:
        body = {"device_id": device, "memories": [{"id": "innocent", "content": "x"}]}
        body[name] = value
        cases.append((f"{name}={value!r}", body, name))
    for label, body, field_name in cases:
        resp = api(rel_server, "/api/sync/push", body, key=key)
        assert resp.status_code == 422, (label, resp.text)
        detail = resp.json()["detail"]
        assert any(field_name in entry["loc"] and entry["msg"] for entry in detail), (label, detail)

    # Huge strings: a 100 KB id, and content of several MB under and over the body limit.
    resp = api(rel_server, "/api/sync/push", {"device_id": device, "memories": [
        {"id": "i" * 100_000, "content": "c"}]}, key=key)
    assert resp.status_code == 422 and resp.json()["detail"][0]["type"] == "string_too_long"
    over = api(rel_server, "/api/sync/push", {"device_id": device, "memories": [
        {"id": "too-big", "content": "o" * (contextfs_server.MAX_BODY + 1024)}]}, key=key)
    assert over.status_code == 413 and over.json() == {"detail": "Request body too large"}

    # Invalid unicode: lone surrogate escapes anywhere, and bytes that are not UTF-8.
    for where in ('"id": "\\ud800x", "content": "c"', '"id": "u1", "content": "a\\udfffb"',
                  '"id": "u2", "content": "c", "tags": ["\\udc80"]', '"id": "u3", "content": "c", "summary": "\\ud83d"',
                  '"id": "u4", "content": "c", "metadata": {"\\ud800": 1}',
                  '"id": "u5", "content": "c", "metadata": {"k": ["\\ude00"]}'):
        resp = _push_raw(rel_server, key, ('{"device_id": "%s", "memories": [{%s}]}' % (device, where)).encode())
        assert resp.status_code == 422 and "surrogate" in resp.text, (where, resp.text)
    for raw in (b"\xed\xa0\x80", b"\xc0\xaf", b"\xff", b"\xf4\x90\x80\x80"):  # surrogate, overlong, invalid, > U+10FFFF
        content = b'{"device_id": "d", "memories": [{"id": "b", "content": "' + raw + b'"}]}'
        resp = _push_raw(rel_server, key, content)
        assert resp.status_code == 422 and resp.json()["detail"][0]["type"] == "json_invalid", raw

    # NUL characters: in ids, text, tags, metadata keys and values, session and edge fields.
    nul_cases = [("memories", {"id": "n\x00", "content": "c"}, ["id"]),
                 ("memories", {"id": "n1", "content": "a\x00b"}, ["content"]),
                 ("memories", {"id": "n2", "content": "c", "summary": "\x00"}, ["summary"]),
                 ("memories", {"id": "n3", "content": "c", "tags": ["ok", "t\x00"]}, ["tags", 1]),
                 ("memories", {"id": "n4", "content": "c", "metadata": {"a": {"b": ["x", "\x00"]}}},
                  ["metadata", "a", "b", 1]),
                 ("memories", {"id": "n5", "content": "c", "metadata": {"k\x00": 1}}, ["metadata", "k\\0"]),
                 ("sessions", {"id": "s1", "summary": "end\x00"}, ["summary"]),
                 ("sessions", {"id": "s2", "label": "\x00"}, ["label"]),
                 ("edges", {"from_id": "a", "to_id": "b", "relation": "r\x00"}, ["relation"]),
                 ("edges", {"from_id": "a", "to_id": "b", "relation": "r", "metadata": {"v": "\x00"}},
                  ["metadata", "v"])]
    for plural, obj, loc_end in nul_cases:
        resp = api(rel_server, "/api/sync/push", {"device_id": device, plural: [obj]}, key=key)
        assert resp.status_code == 422, (obj, resp.text)
        entry = resp.json()["detail"][0]
        assert entry["loc"] == ["body", plural, 0] + loc_end and "NUL" in entry["msg"], entry
    assert server_rows(rel_server, key) == {}             # not one of them was stored

    # Several MB under the limit is accepted and comes back byte-exact.
    big = "".join(chr(0x20 + (i % 0x5e)) for i in range(4 * 1024 * 1024)) + "🙂" * 1000
    assert push(rel_server, key, device, [{"id": "big", "content": big}])["accepted"] == 1
    assert server_rows(rel_server, key)[("memories", "big")]["content"] == big
    assert api(rel_server, "/health").status_code == 200
    print(f"\nhostile bodies: {len(cases)} wrong types, 2 huge, 10 bad unicode, {len(nul_cases)} NUL: "
          f"all 4xx, nothing stored")


def test_server_run_help_states_the_servers_own_body_limit(tmp_path):
    out = run_cli(tmp_path / "home", "server", "run", "--help", check=0).stdout
    assert f"default {contextfs_server.MAX_BODY}:" in " ".join(out.split())


def test_a_tombstone_is_stored_without_the_text_it_arrived_with(ref_server):
    """Another client may push a delete that still carries the memory's text: it is not kept."""
    key = ref_server.add_user()
    push(ref_server, key, memories=[mem("gone", "the secret", {"d": 1}, summary="secret", tags=["t"],
                                        metadata={"k": "v"})])
    push(ref_server, key, memories=[mem("gone", "the secret", {"d": 2}, summary="secret", tags=["t"],
                                        metadata={"k": "v"}, deleted_at="2026-01-01T00:00:00Z")])
    row = server_rows(ref_server, key)[("memories", "gone")]
    assert row["deleted_at"] and row["content"] == "" and row["summary"] is None
    assert row["tags"] == [] and row["metadata"] == {}
    db = sqlite3.connect(Path(ref_server.data) / "server.db")
    try:
        assert not any(b"the secret" in (r[0] or "").encode() for r in db.execute("SELECT body FROM memories"))
    finally:
        db.close()
