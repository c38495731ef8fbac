"""Shared test fixtures and helpers: device homes, the installed `contextfs` script, reference
servers on 127.0.0.1 (port 0) and HTTP helpers. Used by test_contextfs_sync.py (the client) and
test_contextfs_server.py (the server); tests import the helpers by name from here.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import httpx
import pytest


BIN = Path(sys.executable).parent
CONTEXTFS = str(BIN / "contextfs")


def cli_env(home, **extra):
    """This process's environment without CONTEXTFS_* variables, plus CONTEXTFS_HOME=home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONTEXTFS_")}
    env["CONTEXTFS_HOME"] = str(home)
    env.update(extra)
    return env


def run_cli(home, *args, input=None, env=None, timeout=60, check=None):
    """Run the installed `contextfs` console script in a subprocess with CONTEXTFS_HOME=home."""
    assert Path(CONTEXTFS).exists(), "install the package first: pip install -e '.[test]'"
    proc = subprocess.run([CONTEXTFS, *args], input=input, capture_output=True, text=True,
                          env=cli_env(home, **(env or {})), timeout=timeout)
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


# ---- shared helpers: reference server, recording proxy, HTTP calls ---------------------

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
        return proc.stdout.strip().splitlines()[-1]

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
    tmp_dir.mkdir(parents=True, exist_ok=True)
    home, data = tmp_dir / "server-home", tmp_dir / "server-data"
    env = cli_env(home)
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
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


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


def _secret_parts(key):
    """The whole key and a middle slice no mask ever shows (catches escaped or quoted copies)."""
    return [key, key[10:-5]]


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


class AnchorServer:
    """The public ContextFS Cloud server (../shared/anchor) at CONTEXTFS_ANCHOR_URL: ``.url``,
    ``.add_user()`` (a fresh tenant through its admin API), ``.memories(key)``."""

    def __init__(self, url, admin_key):
        self.url, self.admin_key = url.rstrip("/"), admin_key

    def add_user(self, name="Anchor Tester"):
        """Create a fresh user (enterprise tier: no device limit) and return its API key."""
        email = f"user-{uuid.uuid4().hex[:10]}@example.com"
        password = "Pw-" + uuid.uuid4().hex[:12] + "!"
        resp = http_client().post(self.url + "/api/admin/users", headers={"X-API-Key": self.admin_key}, json={
            "email": email, "name": name, "password": password, "tier": "enterprise",
            "send_welcome_email": False})
        assert resp.status_code in (200, 201), resp.text
        resp = http_client().post(self.url + "/api/auth/login", json={"email": email, "password": password})
        assert resp.status_code == 200, resp.text
        return resp.json()["apiKey"]

    def memories(self, key):
        """{id: object} of every memory this key's user can pull (a reader device of its own)."""
        reader = f"reader-{uuid.uuid4().hex[:8]}"
        rows, offset = {}, 0
        while True:
            page = http_client().post(self.url + "/api/sync/pull", headers={"X-API-Key": key}, json={
                "device_id": reader, "since_timestamp": None, "limit": 1000, "offset": offset}).json()
            rows.update((m["id"], m) for m in page["memories"])
            if not page["has_more"]:
                return rows
            offset = page["next_offset"]


@pytest.fixture(scope="session")
def anchor_server():
    """The real ContextFS Cloud server, when one runs (skipped otherwise: see ../shared/anchor)."""
    url = os.environ.get("CONTEXTFS_ANCHOR_URL")
    if not url:
        pytest.skip("set CONTEXTFS_ANCHOR_URL (and CONTEXTFS_ANCHOR_ADMIN_KEY) to test against ContextFS Cloud")
    admin = os.environ.get("CONTEXTFS_ANCHOR_ADMIN_KEY", "ctxfs_ANCHOR-local-test-key-000000000000000000000")
    try:
        http_client().get(url.rstrip("/") + "/health").raise_for_status()
    except httpx.HTTPError as exc:
        pytest.fail(f"CONTEXTFS_ANCHOR_URL={url} does not answer: {exc}")
    return AnchorServer(url, admin)
