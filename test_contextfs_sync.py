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
# `contextfs mcp` always runs as a real subprocess: driven by the official `mcp` SDK client
# (test-only dependency) and by raw bytes for the protocol edge cases.

import queue
import re
import signal
import threading
import time


def _mcp_env(home, **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONTEXTFS_")}
    env["CONTEXTFS_HOME"] = str(home)
    env.update(extra)
    return env


class RawMcp:
    """`contextfs mcp` in a subprocess, spoken to in raw bytes; every stdout line must be JSON."""

    def __init__(self, home, **env):
        self.started = time.monotonic()
        self.proc = subprocess.Popen([CONTEXTFS, "mcp"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=_mcp_env(home, **env))
        self.lines = queue.Queue()
        self.stderr = []
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines.put), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr.append), daemon=True).start()
        self.next_id = 100

    @staticmethod
    def _pump(stream, put):
        for line in iter(stream.readline, b""):
            put(line)
        put(None)

    def send(self, data: bytes):
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def send_json(self, message):
        self.send(json.dumps(message).encode("utf-8") + b"\n")

    def recv(self, timeout=20):
        line = self.lines.get(timeout=timeout)
        assert line is not None, f"server closed stdout; stderr: {b''.join(l for l in self.stderr if l)!r}"
        assert line.endswith(b"\n")
        return json.loads(line)

    def request(self, method, params=None, timeout=20):
        self.next_id += 1
        message = {"jsonrpc": "2.0", "id": self.next_id, "method": method}
        if params is not None:
            message["params"] = params
        self.send_json(message)
        answer = self.recv(timeout)
        assert answer["id"] == self.next_id, answer
        return answer

    def initialize(self, version="2025-11-25"):
        answer = self.request("initialize", {"protocolVersion": version, "capabilities": {},
                                             "clientInfo": {"name": "raw-test", "version": "1"}})
        self.send_json({"jsonrpc": "2.0", "method": "notifications/initialized"})
        return answer["result"]

    def call(self, name, arguments=None):
        params = {"name": name} if arguments is None else {"name": name, "arguments": arguments}
        return self.request("tools/call", params)["result"]

    def rest_until_eof(self, timeout=20):
        """Close stdin and collect every remaining stdout line until the process exits."""
        self.proc.stdin.close()
        rest = []
        deadline = time.monotonic() + timeout
        while True:
            line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            if line is None:
                break
            rest.append(json.loads(line))
        self.proc.wait(timeout=timeout)
        return rest

    def stderr_text(self):
        return b"".join(l for l in self.stderr if l).decode("utf-8", "replace")

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait(timeout=10)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _walk_nulls(value, path="$"):
    if value is None:
        return [path]
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _walk_nulls(v, f"{path}.{k}")]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _walk_nulls(v, f"{path}[{i}]")]
    return []


def _sdk(home, scenario, mode="auto", **env):
    """Run ``scenario(client)`` against `contextfs mcp` with the official MCP SDK client."""
    import anyio
    from mcp.client import Client
    from mcp.client.stdio import StdioServerParameters

    params = StdioServerParameters(command=CONTEXTFS, args=["mcp"], env=_mcp_env(home, **env))

    async def main():
        with anyio.fail_after(60):
            async with Client(params, mode=mode, read_timeout_seconds=30) as client:
                return await scenario(client)

    return anyio.run(main)


def _enable_cloud(home, api_key=None, server_url=None):
    cfg = cfs.load_config(home)
    cfg.set("cloud", "enabled", True)
    cfg.set("cloud", "api_key", api_key)
    cfg.set("cloud", "server_url", server_url)
    cfs.save_config(cfg)


def test_mcp_sdk_client_lists_tools_and_manages_memories(home):
    async def scenario(client):
        listed = await client.list_tools()
        saved = await client.call_tool("contextfs_save", {"content": "The staging DB password rotates monthly",
                                                          "type": "procedure", "tags": ["ops", "db"]})
        found = await client.call_tool("contextfs_search", {"query": "staging password"})
        listing = await client.call_tool("contextfs_list", {"tag": "ops"})
        deleted = await client.call_tool("contextfs_delete", {"id": saved.structured_content["id"]})
        after = await client.call_tool("contextfs_list", {})
        status = await client.call_tool("contextfs_sync_status", {})
        return client.protocol_version, client.server_info, listed, saved, found, listing, deleted, after, status

    version, info, listed, saved, found, listing, deleted, after, status = _sdk(home, scenario)
    assert version == "2025-11-25" and info.name == "contextfs-sync" and info.version == cfs.__version__
    tools = {t.name: t for t in listed.tools}
    assert set(tools) == {"contextfs_sync", "contextfs_sync_status", "contextfs_save", "contextfs_search",
                          "contextfs_list", "contextfs_delete"}
    assert all(t.input_schema["type"] == "object" and t.output_schema["type"] == "object" for t in tools.values())
    sync_props = tools["contextfs_sync"].input_schema["properties"]
    assert sync_props["direction"]["default"] == "both" and sync_props["push_all"]["default"] is False
    assert sync_props["force"]["default"] is False
    memory_id = saved.structured_content["id"]
    assert not saved.is_error and saved.content[0].text == f"Saved {memory_id} [procedure]"
    assert saved.structured_content["tags"] == ["ops", "db"]
    assert [r["id"] for r in found.structured_content["results"]] == [memory_id]
    assert memory_id in found.content[0].text
    assert listing.structured_content["count"] == 1 and memory_id in listing.content[0].text
    assert not deleted.is_error and deleted.structured_content["deleted_at"]
    assert after.structured_content == {"count": 0, "memories": []}
    assert status.structured_content["enabled"] is False and "disabled" in status.content[0].text
    # The CLI sees the same store: the delete made by the MCP tool is there.
    assert cli_json(home, "list", "--deleted")[0]["id"] == memory_id


def test_mcp_sdk_client_sync_while_disabled_is_tool_error_with_seed_message(home):
    async def scenario(client):
        return await client.call_tool("contextfs_sync", {}), await client.call_tool(
            "contextfs_sync", {"direction": "push", "push_all": True})

    for result in _sdk(home, scenario, mode="legacy"):
        assert result.is_error is True
        assert [c.text for c in result.content] == [cfs.MSG_DISABLED]
        assert result.content[0].text == "Cloud sync is disabled. Run: contextfs cloud configure --enabled"


def test_mcp_sync_without_api_key_is_tool_error_with_seed_message(home):
    _enable_cloud(home)

    async def scenario(client):
        return await client.call_tool("contextfs_sync", {"direction": "pull"})

    result = _sdk(home, scenario)
    assert result.is_error is True and [c.text for c in result.content] == [cfs.MSG_NO_KEY]
    assert result.content[0].text == "No API key configured. Run: contextfs cloud login"


def test_mcp_sync_with_server_down_is_one_line_tool_error(home):
    import socket

    with socket.socket() as sock:  # a port that was free a moment ago: nobody listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    _enable_cloud(home, api_key="ctxfs_" + "k" * 40, server_url=f"http://127.0.0.1:{port}")
    with RawMcp(home) as mcp:
        mcp.initialize()
        result = mcp.call("contextfs_sync", {})
        assert result["isError"] is True and len(result["content"]) == 1
        text = result["content"][0]["text"]
        assert text and "\n" not in text and "Traceback" not in text
        assert mcp.request("ping")["result"] == {}  # still serving
        assert "Traceback" not in mcp.stderr_text()


def _cli_has_commands(*names):
    import argparse

    parser = cfs.build_parser()
    choices = [a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return all(any(name in c for c in choices) for name in names)


def _start_reference_server(data_dir, home):
    proc = subprocess.Popen([CONTEXTFS, "server", "run", "--port", "0", "--data", str(data_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=_mcp_env(home))
    lines = queue.Queue()
    threading.Thread(target=RawMcp._pump, args=(proc.stdout, lines.put), daemon=True).start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        assert line is not None, "reference server exited before listening"
        match = re.search(rb"listening on (http://\S+)", line)
        if match:
            return proc, match.group(1).decode()
    proc.kill()
    raise AssertionError("reference server did not report its address in 30 s")


@pytest.mark.skipif(not _cli_has_commands("server", "cloud"),
                    reason="needs the reference server and cloud CLI (other branches, merged later)")
def test_mcp_sync_moves_memories_to_a_second_device(tmp_path):
    data, device_a, device_b = tmp_path / "server-data", tmp_path / "device-a", tmp_path / "device-b"
    server, url = _start_reference_server(data, tmp_path / "server-home")
    try:
        added = run_cli(tmp_path / "server-home", "server", "add-user", "ada@example.com", "--data", str(data),
                        check=0)
        keys = re.findall(r"ctxfs_[A-Za-z0-9_\-]+", added.stdout)
        api_key = keys[0] if keys else added.stdout.split()[-1]
        for device in (device_a, device_b):
            run_cli(device, "cloud", "configure", "--enabled", "--server-url", url, check=0)
            run_cli(device, "cloud", "login", "--api-key", api_key, "--server", url, check=0)
        run_cli(device_a, "save", "Use port 5433 for the analytics replica", "--tags", "db", check=0)

        async def push(client):
            saved = await client.call_tool("contextfs_save", {"content": "Deploys freeze on Fridays",
                                                              "type": "decision"})
            return saved, await client.call_tool("contextfs_sync", {})

        async def pull(client):
            synced = await client.call_tool("contextfs_sync", {"direction": "pull"})
            found = await client.call_tool("contextfs_search", {"query": "analytics replica"})
            return synced, found, await client.call_tool("contextfs_sync_status", {})

        saved, pushed = _sdk(device_a, push)
        assert not pushed.is_error, pushed.content[0].text
        assert pushed.structured_content["pushed"]["memories"] >= 2
        pulled, found, status = _sdk(device_b, pull)
        assert not pulled.is_error, pulled.content[0].text
        assert not status.is_error and status.structured_content["enabled"] is True
        assert status.structured_content["last_pull_at"] and "Server has: " in status.content[0].text
        assert "error" not in status.structured_content.get("server", {})
        assert pulled.structured_content["pulled"]["memories"] >= 2
        assert found.structured_content["count"] == 1
        contents = {m["content"] for m in cli_json(device_b, "list")}
        assert {"Use port 5433 for the analytics replica", "Deploys freeze on Fridays"} <= contents
        assert saved.structured_content["id"] in {m["id"] for m in cli_json(device_b, "list")}
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.mark.skipif(not _cli_has_commands("cloud"), reason="needs the sync engine (merged later)")
def test_mcp_ping_is_answered_during_a_sync_that_hangs(home):
    import socket

    with socket.socket() as silent:  # accepts connections, never answers: a hung server
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        _enable_cloud(home, api_key="ctxfs_" + "k" * 40, server_url=f"http://127.0.0.1:{silent.getsockname()[1]}")
        with RawMcp(home) as mcp:
            mcp.initialize()
            mcp.send_json({"jsonrpc": "2.0", "id": "sync", "method": "tools/call",
                           "params": {"name": "contextfs_sync", "arguments": {}}})
            for n in range(3):
                assert mcp.request("ping")["result"] == {}
            assert mcp.call("contextfs_list", {})["structuredContent"]["count"] == 0
            started = time.monotonic()
            rest = mcp.rest_until_eof()  # the client leaves while the sync still waits
            elapsed = time.monotonic() - started
            assert mcp.proc.returncode == 0 and "Traceback" not in mcp.stderr_text()
    assert all(answer.get("id") == "sync" for answer in rest)
    print(f"exit after stdin EOF during a hung sync: {elapsed * 1000:.0f} ms")


@pytest.mark.parametrize("requested,answered", [
    ("2024-11-05", "2024-11-05"), ("2025-03-26", "2025-03-26"), ("2025-06-18", "2025-06-18"),
    ("2025-11-25", "2025-11-25"), ("2026-07-28", "2025-11-25"), ("1.0.0", "2025-11-25"),
])
def test_mcp_initialize_negotiates_protocol_version(home, requested, answered):
    with RawMcp(home) as mcp:
        result = mcp.initialize(requested)
    assert result["protocolVersion"] == answered
    assert result["serverInfo"]["name"] == "contextfs-sync"
    assert result["serverInfo"]["version"] == cfs.__version__
    assert "tools" in result["capabilities"] and result["instructions"]


def test_mcp_old_protocol_gets_json_text_instead_of_structured_content(home):
    with RawMcp(home) as mcp:
        mcp.initialize("2024-11-05")
        tools = mcp.request("tools/list")["result"]["tools"]
        assert tools and all("outputSchema" not in t and "title" not in t and "annotations" not in t
                             for t in tools)
        result = mcp.call("contextfs_save", {"content": "old clients read JSON text"})
    assert "structuredContent" not in result
    readable, data = (c["text"] for c in result["content"])
    assert readable.startswith("Saved ") and json.loads(data)["content"] == "old clients read JSON text"


@pytest.mark.parametrize("raw,code,req_id", [
    (b"{not json\n", -32700, None),
    (b'{"jsonrpc": "2.0", "id": 1, "method": "ping"\n', -32700, None),
    (b"\xff\xfe{}\n", -32700, None),
    (b"NaN\n", -32700, None),
    (b"[]\n", -32600, None),
    (b"42\n", -32600, None),
    (b'"ping"\n', -32600, None),
    (b'{"jsonrpc": "1.0", "id": 1, "method": "ping"}\n', -32600, 1),
    (b'{"id": 2, "method": "ping"}\n', -32600, 2),
    (b'{"jsonrpc": "2.0", "id": 3}\n', -32600, 3),
    (b'{"jsonrpc": "2.0", "id": 4, "method": 7}\n', -32600, 4),
    (b'{"jsonrpc": "2.0", "id": null, "method": "ping"}\n', -32600, None),
    (b'{"jsonrpc": "2.0", "id": true, "method": "ping"}\n', -32600, None),
    (b'{"jsonrpc": "2.0", "id": [1], "method": "ping"}\n', -32600, None),
    (b'{"jsonrpc": "2.0", "method": 5}\n', -32600, None),
    (b'{"jsonrpc": "2.0", "id": 5, "method": "resources/list"}\n', -32601, 5),
    (b'{"jsonrpc": "2.0", "id": "d", "method": "server/discover", "params": {}}\n', -32601, "d"),
    (b'{"jsonrpc": "2.0", "id": 6, "method": "tools/call", "params": {"name": "nope"}}\n', -32602, 6),
    (b'{"jsonrpc": "2.0", "id": 7, "method": "tools/call", "params": {}}\n', -32602, 7),
    (b'{"jsonrpc": "2.0", "id": 8, "method": "tools/call", "params": ["contextfs_list"]}\n', -32602, 8),
    (b'{"jsonrpc": "2.0", "id": 9, "method": "tools/call", '
     b'"params": {"name": "contextfs_list", "arguments": [1]}}\n', -32602, 9),
    (b'{"jsonrpc": "2.0", "id": 10, "method": "initialize", "params": {"capabilities": {}}}\n', -32602, 10),
    (b'{"jsonrpc": "2.0", "id": 11, "method": "tools/list", "params": {"cursor": "x"}}\n', -32602, 11),
])
def test_mcp_protocol_errors_get_standard_codes(home, raw, code, req_id):
    with RawMcp(home) as mcp:
        mcp.send(raw)
        answer = mcp.recv()
        assert answer["jsonrpc"] == "2.0" and answer["id"] == req_id
        assert answer["error"]["code"] == code and answer["error"]["message"]
        assert mcp.request("ping")["result"] == {}  # the session survives every error


def test_mcp_notifications_and_responses_get_no_reply(home):
    with RawMcp(home) as mcp:
        mcp.send_json({"jsonrpc": "2.0", "method": "notifications/initialized"})
        mcp.send_json({"jsonrpc": "2.0", "method": "notifications/cancelled",
                       "params": {"requestId": 12345, "reason": "unknown request"}})
        mcp.send_json({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": "malformed"})
        mcp.send_json({"jsonrpc": "2.0", "method": "notifications/no_such_thing", "params": {}})
        mcp.send_json({"jsonrpc": "2.0", "method": "tools/call", "params": {"name": "contextfs_list"}})
        mcp.send_json({"jsonrpc": "2.0", "id": 77, "result": {}})  # a response to nothing
        mcp.send(b"\n\r\n   \n")  # blank lines are not messages
        mcp.send_json({"jsonrpc": "2.0", "id": "last", "method": "ping"})
        assert mcp.recv() == {"jsonrpc": "2.0", "id": "last", "result": {}}
        assert mcp.rest_until_eof() == []


def test_mcp_answers_every_request_before_initialize(home):
    with RawMcp(home) as mcp:
        assert mcp.request("server/discover", {})["error"]["code"] == -32601
        assert mcp.request("ping")["result"] == {}
        assert len(mcp.request("tools/list")["result"]["tools"]) == 6
        assert mcp.initialize()["protocolVersion"] == "2025-11-25"


def test_mcp_batch_gets_one_array_of_answers(home):
    with RawMcp(home) as mcp:
        mcp.send_json([{"jsonrpc": "2.0", "id": 1, "method": "ping"},
                       {"jsonrpc": "2.0", "method": "notifications/initialized"},
                       {"jsonrpc": "2.0", "id": 2, "method": "nope"},
                       {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "contextfs_list"}}])
        answers = {a["id"]: a for a in mcp.recv()}
    assert set(answers) == {1, 2, 3}
    assert answers[1]["result"] == {} and answers[2]["error"]["code"] == -32601
    assert answers[3]["result"]["structuredContent"] == {"count": 0, "memories": []}


@pytest.mark.parametrize("tool,arguments,message", [
    ("contextfs_sync", {"direction": "sideways"}, "'direction' must be one of both, push, pull, not 'sideways'"),
    ("contextfs_sync", {"push_all": "yes"}, "'push_all' must be a boolean, got a string"),
    ("contextfs_sync", {"everything": True}, "unknown argument 'everything'"),
    ("contextfs_save", {}, "'content' is required"),
    ("contextfs_save", {"content": "   "}, "'content' must not be empty"),
    ("contextfs_save", {"content": "x", "tags": "a,b"}, "'tags' must be an array, got a string"),
    ("contextfs_save", {"content": "x", "tags": ["a", 2]}, "'tags' items must be a string, got a number"),
    ("contextfs_save", {"content": "x", "ttl": "1h"}, "'ttl' only applies with temporary=true"),
    ("contextfs_save", {"content": "x", "temporary": True, "ttl": "soon"}, "Invalid --ttl 'soon'"),
    ("contextfs_search", {"query": "x", "limit": 0}, "'limit' must be between 1 and 100, not 0"),
    ("contextfs_list", {"limit": True}, "'limit' must be an integer, got a boolean"),
    ("contextfs_delete", {"id": "0123456789abcdef"}, "No memory with id '0123456789abcdef'"),
])
def test_mcp_bad_tool_arguments_are_tool_errors(home, tool, arguments, message):
    with RawMcp(home) as mcp:
        mcp.initialize()
        result = mcp.call(tool, arguments)
    assert result["isError"] is True and "structuredContent" not in result
    assert message in result["content"][0]["text"]


def test_mcp_tool_arguments_accept_nulls_and_integral_floats(home):
    with RawMcp(home) as mcp:
        mcp.initialize()
        saved = mcp.call("contextfs_save", {"content": "nulls mean not given", "summary": None, "tags": None})
        listed = mcp.call("contextfs_list", {"limit": 5.0, "type": None})
    assert "isError" not in saved and saved["structuredContent"]["tags"] == []
    assert listed["structuredContent"]["count"] == 1


def test_mcp_answers_omit_null_fields(home):
    with RawMcp(home) as mcp:
        answers = [mcp.request("initialize", {"protocolVersion": "2025-11-25", "capabilities": {},
                                              "clientInfo": {"name": "t", "version": "1"}}),
                   mcp.request("tools/list")]
        answers.append(mcp.request("tools/call", {"name": "contextfs_save", "arguments": {"content": "no nulls"}}))
        answers.append(mcp.request("tools/call", {"name": "contextfs_list", "arguments": {}}))
        answers.append(mcp.request("tools/call", {"name": "contextfs_sync_status", "arguments": {}}))
        answers.append(mcp.request("tools/call", {"name": "contextfs_sync", "arguments": {}}))
    assert [_walk_nulls(a) for a in answers] == [[]] * len(answers)


def _lock_store(home):
    """Create the store, then hold its write lock from another connection (a long writer)."""
    cfs.open_store(home).close()
    conn = sqlite3.connect(str(home / "sync.db"), isolation_level=None)
    conn.execute("BEGIN IMMEDIATE")
    return conn


def test_mcp_ping_is_answered_while_a_tool_call_is_blocked(home):
    lock = _lock_store(home)
    with RawMcp(home) as mcp:
        mcp.initialize()
        mcp.send_json({"jsonrpc": "2.0", "id": "save", "method": "tools/call",
                       "params": {"name": "contextfs_save", "arguments": {"content": "waits for the lock"}}})
        for n in range(3):  # the save is stuck behind the lock; the reading loop is not
            assert mcp.request("ping")["result"] == {}
        assert mcp.request("tools/list")["result"]["tools"]
        lock.execute("ROLLBACK")
        answer = mcp.recv()
    lock.close()
    assert answer["id"] == "save" and answer["result"]["content"][0]["text"].startswith("Saved ")


def test_mcp_concurrent_tool_calls_on_a_new_home_all_succeed(home):
    # Concurrent calls each open the store; on a brand-new home they race to create it.
    with RawMcp(home) as mcp:
        mcp.initialize()
        for n in range(4):
            mcp.send_json({"jsonrpc": "2.0", "id": n, "method": "tools/call",
                           "params": {"name": "contextfs_save", "arguments": {"content": f"parallel {n}"}}})
        answers = {a["id"]: a["result"] for a in (mcp.recv() for _ in range(4))}
    assert sorted(answers) == [0, 1, 2, 3]
    assert all("isError" not in r for r in answers.values()), answers
    assert sorted(m["content"] for m in cli_json(home, "list")) == [f"parallel {n}" for n in range(4)]


def test_mcp_cancelled_call_gets_no_answer(home):
    lock = _lock_store(home)
    with RawMcp(home) as mcp:
        mcp.initialize()
        mcp.send_json({"jsonrpc": "2.0", "id": 41, "method": "tools/call",
                       "params": {"name": "contextfs_save", "arguments": {"content": "cancelled, still saved"}}})
        assert mcp.request("ping")["result"] == {}  # the call is running (blocked) by now
        mcp.send_json({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 41}})
        assert mcp.request("ping")["result"] == {}
        lock.execute("ROLLBACK")
        lock.close()
        rest = mcp.rest_until_eof()
    assert rest == []
    # A started write cannot be taken back halfway; it completes, and nothing is lost.
    assert [m["content"] for m in cli_json(home, "list")] == ["cancelled, still saved"]


def test_mcp_stdin_eof_ends_the_process_cleanly(home):
    with RawMcp(home) as mcp:
        mcp.initialize()
        started = time.monotonic()
        assert mcp.rest_until_eof() == []
        elapsed = time.monotonic() - started
        assert mcp.proc.returncode == 0, mcp.stderr_text()
    assert "Traceback" not in mcp.stderr_text()
    print(f"exit after stdin EOF: {elapsed * 1000:.0f} ms")


@pytest.mark.parametrize("busy", [False, True])
def test_mcp_sigterm_ends_the_process_cleanly(home, busy):
    lock = _lock_store(home) if busy else None
    with RawMcp(home) as mcp:
        mcp.initialize()
        if busy:  # a tool call is stuck behind a lock for up to 10 s
            mcp.send_json({"jsonrpc": "2.0", "id": 9, "method": "tools/call",
                           "params": {"name": "contextfs_save", "arguments": {"content": "blocked"}}})
            assert mcp.request("ping")["result"] == {}
        started = time.monotonic()
        mcp.proc.send_signal(signal.SIGTERM)
        returncode = mcp.proc.wait(timeout=10)
        elapsed = time.monotonic() - started
    if lock:
        lock.close()
    assert returncode == 0 and "Traceback" not in mcp.stderr_text(), mcp.stderr_text()
    print(f"exit after SIGTERM (busy={busy}): {elapsed * 1000:.0f} ms")


def test_mcp_oversized_message_is_refused_and_session_continues(home):
    with RawMcp(home) as mcp:
        mcp.send(b'{"jsonrpc": "2.0", "id": 1, "method": "ping", "params": {"pad": "'
                 + b"x" * (cfs.MCP_MAX_MESSAGE_BYTES + 10) + b'"}}\n')
        answer = mcp.recv()
        assert answer["id"] is None and answer["error"]["code"] == -32600
        assert mcp.request("ping")["result"] == {}


def test_mcp_stray_prints_go_to_stderr_not_the_protocol_stream():
    code = ("import os, sys, contextfs_sync as c\n"
            "out = c._claim_stdout()\n"
            "print('stray print')\n"
            "os.write(1, b'stray fd write\\n')\n"
            "out.write(b'protocol\\n'); out.flush()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"protocol\n"
    assert b"stray print" in proc.stderr and b"stray fd write" in proc.stderr


def test_mcp_check_arguments_fills_defaults():
    tool = {t.name: t for t in cfs.MCP_TOOLS}["contextfs_sync"]
    assert cfs.mcp_check_arguments(tool.name, tool.input_schema, {}) == {
        "direction": "both", "push_all": False, "force": False, "dry_run": False}
    assert cfs.mcp_check_arguments(tool.name, tool.input_schema, {"direction": "pull", "force": True}) == {
        "direction": "pull", "push_all": False, "force": True, "dry_run": False}


# ---- tests: reliability and security -------------------------------------------------------
# (issue 7)
