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
# (raw HTTP)


# ---- tests: sync ---------------------------------------------------------------------------
# (sync engine, cloud CLI)


# ---- tests: MCP stdio server ---------------------------------------------------------------
# (issue 5)


# ---- tests: reliability and security -------------------------------------------------------
# (issue 7)
