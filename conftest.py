"""Shared test fixtures and helpers: device homes, the installed `contextfs` script, reference
servers on 127.0.0.1 (port 0) and HTTP helpers. Used by test_contextfs_sync.py (the client) and
test_contextfs_server.py (the server); tests import the helpers by name from here.
"""
from __future__ import annotations

import json
import os
import re
import shutil
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
# No OS keyring in tests unless a test asks for one (keyrings.alt, installed for that test,
# would otherwise keep every test's E2EE key in this user's own data directory).
os.environ.setdefault("PYTHON_KEYRING_BACKEND", "keyring.backends.fail.Keyring")


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

    def backup(self, dest):
        """An online copy of server.db (SQLite's backup API) in ``dest``; returns ``dest``."""
        import sqlite3

        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        src, dst = sqlite3.connect(str(self.data / "server.db")), sqlite3.connect(str(dest / "server.db"))
        try:
            src.backup(dst)
        finally:
            src.close()
            dst.close()
        return dest

    def restore(self, backup, keep_high_water=True):
        """The operator's restore: stop, put the backup's server.db* in place (the high-water mark
        beside the database stays unless told), start again on the same port; returns self."""
        assert self.stop() == 0, self.stderr()
        for path in self.data.glob("server.db*"):
            if not (keep_high_water and path.name.endswith(".highwater")):
                path.unlink()
        for path in Path(backup).glob("server.db*"):
            shutil.copy2(path, self.data / path.name)
        fresh = start_ref_server(self.data.parent, "--port", str(self.port))
        self.proc, self.stderr_path = fresh.proc, fresh.stderr_path
        return self


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
    if isinstance(server, AnchorServer):
        return server.rows(key)
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
    return json.loads(proc.stdout) if proc.returncode in (0, 4) else proc  # 4: partial, a report too


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

    def add_user(self, email=None, name="Anchor Tester"):
        """Create a fresh user (enterprise tier: no device limit) and return its API key. Emails
        are made unique (ContextFS Cloud has one user per email across the whole server)."""
        email = f"{uuid.uuid4().hex[:10]}-{email or 'user@example.com'}"
        password = "Pw-" + uuid.uuid4().hex[:12] + "!"
        resp = http_client().post(self.url + "/api/admin/users", headers={"X-API-Key": self.admin_key}, json={
            "email": email, "name": name, "password": password, "tier": "enterprise",
            "send_welcome_email": False})
        assert resp.status_code in (200, 201), resp.text
        resp = http_client().post(self.url + "/api/auth/login", json={"email": email, "password": password})
        assert resp.status_code == 200, resp.text
        return resp.json()["apiKey"]

    def rows(self, key):
        """{(plural, id): object} of everything this key's user can pull, with a reader device of
        its own. Each list is paged on its own offset (the server's next_offset skips rows)."""
        reader, rows = f"reader-{uuid.uuid4().hex[:8]}", {}
        for plural in ("memories", "sessions", "edges"):
            offset = 0
            while True:
                page = http_client().post(self.url + "/api/sync/pull", headers={"X-API-Key": key}, json={
                    "device_id": reader, "since_timestamp": None, "limit": 1000, "offset": offset}).json()
                rows.update(((plural, obj["id"]), obj) for obj in page[plural])
                if len(page[plural]) < 1000:
                    break
                offset += 1000
        # Edges are served to every tenant (protocol.md gap 7): keep this account's.
        mine = {i for (plural, i) in rows if plural == "memories"}
        return {(plural, i): obj for (plural, i), obj in rows.items()
                if plural != "edges" or (obj["from_id"] in mine and obj["to_id"] in mine)}

    def memories(self, key):
        """{id: object} of every memory this key's user can pull, tombstones included."""
        return {i: obj for (plural, i), obj in self.rows(key).items() if plural == "memories"}


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


# ---- a faithful double of ContextFS Cloud (contextfs 0.2.35 server; protocol.md §4-§13) ---------
#
# What it reproduces, on purpose (each is a behaviour of the real service that our client must
# survive; protocol.md section in brackets): rows looked up by id across ALL users, and another
# user's row overwritten by a dominating clock [gap 7]; a server tick on insert [gap 15]; equal
# clocks overwrite [§6]; conflicts and stale rejections only counted, no per-item results [§4.2];
# metadata stored as {} [gap 5]; `encrypted` never stored, returned false [gap 6]; pulls filter
# on the CLIENT's updated_at (strictly after since), order by (updated_at, id), page each list by
# one shared offset and return next_offset = offset + the sum of the three lengths [§8 a-e]; edges
# unscoped, served to every user [gap 7]; diff tombstones live rows listed deleted in a manifest
# and returns no pagination [§4.4]; /status without auth, 404 for unknown devices, counting every
# tenant's memories [gap 9]; salts only on keys created "with_encryption" [§5.4].


def _double_ts(value):
    """Parse like pydantic: ISO-8601, naive means UTC. Returns an aware datetime or raises ValueError."""
    from datetime import datetime, timezone

    if not isinstance(value, str):
        raise ValueError("not a string")
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed.replace(tzinfo=timezone.utc) if parsed.tzinfo is None else parsed.astimezone(timezone.utc)


def _double_iso(value):
    """Serialise like pydantic v2: UTC with Z, no fraction when the microseconds are 0."""
    if value is None:
        return None
    text = value.strftime("%Y-%m-%dT%H:%M:%S") + (f".{value.microsecond:06d}" if value.microsecond else "")
    return text + "Z"


def _double_clock_order(server, client):
    """'before' (S < C), 'equal', 'after' (C < S) or 'concurrent' (protocol.md §6)."""
    keys = set(server) | set(client)
    less = any(server.get(k, 0) < client.get(k, 0) for k in keys)
    more = any(server.get(k, 0) > client.get(k, 0) for k in keys)
    return "concurrent" if less and more else "before" if less else "after" if more else "equal"


class CloudDouble:
    """ContextFS Cloud's sync service as a WSGI app over in-memory tables (thread-safe)."""

    MEMORY_FIELDS = ("id", "vector_clock", "content_hash", "deleted_at", "created_at", "updated_at",
                     "last_modified_by", "content", "type", "tags", "summary", "namespace_id", "repo_url",
                     "repo_name", "relative_path", "source_file", "source_repo", "source_tool", "project",
                     "session_id", "metadata", "embedding", "encrypted", "visibility")
    SESSION_FIELDS = ("id", "vector_clock", "content_hash", "deleted_at", "created_at", "updated_at",
                      "last_modified_by", "label", "namespace_id", "tool", "repo_url", "repo_name", "repo_path",
                      "branch", "started_at", "ended_at", "summary", "metadata")
    EDGE_FIELDS = ("id", "vector_clock", "content_hash", "deleted_at", "created_at", "updated_at",
                   "last_modified_by", "from_id", "to_id", "relation", "weight", "created_by", "metadata")
    # What an accepted update overwrites (§6); the rest keeps its first-pushed value.
    MEMORY_UPDATES = ("content", "type", "tags", "summary", "repo_url", "repo_name", "relative_path",
                      "updated_at", "content_hash", "deleted_at")
    SESSION_UPDATES = ("label", "summary", "ended_at", "updated_at", "deleted_at")
    EDGE_UPDATES = ("weight", "updated_at", "deleted_at")

    def __init__(self, admin_key):
        self.lock = threading.Lock()
        self.admin_key = admin_key
        self.users = {}      # user id -> {email, name, password}
        self.keys = {}       # api key -> {user_id, name, salt}
        self.devices = {}    # device id -> {user_id, last_sync_at, sync_cursor}
        self.memories = {}   # id -> row (dict of wire fields + user_id), across all users
        self.sessions = {}
        self.edges = {}      # (from_id, to_id, relation) -> row, no owner
        self.requests = []   # (path, device_id) of every call, for tests that count them

    # -- plumbing ------------------------------------------------------------------------------

    def __call__(self, environ, start_response):
        from datetime import datetime, timezone

        path, method = environ.get("PATH_INFO", ""), environ["REQUEST_METHOD"]
        length = int(environ.get("CONTENT_LENGTH") or 0)
        raw = environ["wsgi.input"].read(length) if length else b""
        now = datetime.now(timezone.utc)
        try:
            status, answer = self.route(method, path, raw, environ.get("HTTP_X_API_KEY"), now)
        except Exception as exc:  # the real service answers a plain-text 500
            start_response("500 Internal Server Error", [("Content-Type", "text/plain")])
            return [f"Internal Server Error ({type(exc).__name__}: {exc})".encode()]
        body = json.dumps(answer).encode()
        reason = {200: "OK", 201: "Created", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
                  404: "Not Found", 405: "Method Not Allowed", 422: "Unprocessable Entity"}[status]
        start_response(f"{status} {reason}", [("Content-Type", "application/json"),
                                              ("Content-Length", str(len(body)))])
        return [body]

    def route(self, method, path, raw, key, now):
        if path == "/health":
            return 200, {"status": "healthy", "service": "contextfs-sync", "timestamp": _double_iso(now)}
        try:
            body = json.loads(raw) if raw else {}
        except ValueError as exc:
            return 422, {"detail": [{"type": "json_invalid", "loc": ["body", 0], "msg": "JSON decode error",
                                     "input": {}, "ctx": {"error": str(exc)}}]}
        if path == "/api/auth/login" and method == "POST":
            return self.login(body)
        if path == "/api/sync/status" and method == "POST":  # no auth (gap 9)
            return self.status(body)
        with self.lock:
            auth = self.keys.get(key or "")
        if path == "/api/admin/users" and method == "POST":
            if key != self.admin_key:
                return 401, {"detail": "Invalid or missing API key"}
            return self.create_user(body)
        if auth is None:
            return 401, {"detail": "Invalid or missing API key"}
        user_id = auth["user_id"]
        handlers = {
            ("GET", "/api/auth/me"): lambda: (200, dict(id=user_id, email=self.users[user_id]["email"],
                                                          name=self.users[user_id]["name"],
                                                          provider="admin_created", is_admin=False)),
            ("GET", "/api/auth/encryption-salt"): lambda: (
                (200, {"salt": auth["salt"]}) if auth["salt"]
                else (404, {"detail": "No encryption salt configured for this API key"})),
            ("POST", "/api/auth/api-keys"): lambda: self.create_key(user_id, body),
            ("GET", "/api/billing/subscription"): lambda: (200, {
                "tier": "enterprise", "status": "active", "device_limit": -1, "memory_limit": -1,
                "current_period_end": None}),
            ("POST", "/api/sync/register"): lambda: self.register(user_id, body, now),
            ("POST", "/api/sync/push"): lambda: self.push(user_id, body, now),
            ("POST", "/api/sync/pull"): lambda: self.pull(user_id, body, now),
            ("POST", "/api/sync/diff"): lambda: self.diff(user_id, body, now),
        }
        handler = handlers.get((method, path))
        if handler is None:
            return 404, {"detail": "Not Found"}
        with self.lock:
            self.requests.append((path, body.get("device_id") if isinstance(body, dict) else None))
            return handler()

    @staticmethod
    def _missing(loc):
        return 422, {"detail": [{"type": "missing", "loc": list(loc), "msg": "Field required", "input": {}}]}

    # -- auth ----------------------------------------------------------------------------------

    def _new_key(self, user_id, name, salt=False):
        import base64
        import secrets

        key = "ctxfs_" + base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
        salt_text = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=") if salt else None
        self.keys[key] = {"user_id": user_id, "name": name, "salt": salt_text}
        return key

    def create_user(self, body):
        with self.lock:
            user_id = str(uuid.uuid4())
            self.users[user_id] = {"email": body["email"], "name": body.get("name"), "password": body["password"]}
        return 201, {"id": user_id, "email": body["email"]}

    def login(self, body):
        with self.lock:
            for user_id, user in self.users.items():
                if user["email"] == body.get("email") and user["password"] == body.get("password"):
                    key = self._new_key(user_id, body.get("session_type", "Web Session"))
                    return 200, {"user": {"id": user_id, "email": user["email"], "name": user["name"],
                                          "emailVerified": True, "createdAt": None, "is_admin": False},
                                 "apiKey": key, "encryptionKey": None}
        return 401, {"detail": "Invalid email or password"}

    def create_key(self, user_id, body):
        import base64
        import hashlib
        import hmac

        key = self._new_key(user_id, body.get("name") or "key", salt=body.get("with_encryption", True))
        salt = self.keys[key]["salt"]
        encryption_key = None
        if salt:  # HKDF-SHA256 (RFC 5869) of the key, as protocol.md §9 gives it
            prk = hmac.new(base64.urlsafe_b64decode(salt + "=" * (-len(salt) % 4)), key.encode(), hashlib.sha256).digest()
            okm = hmac.new(prk, b"contextfs-e2ee-v1\x01", hashlib.sha256).digest()
            encryption_key = base64.urlsafe_b64encode(okm).decode()
        return 200, {"id": str(uuid.uuid4()), "name": body.get("name"), "api_key": key,
                     "encryption_key": encryption_key, "key_prefix": key[6:14], "config_snippet": ""}

    # -- sync ----------------------------------------------------------------------------------

    def register(self, user_id, body, now):
        for field in ("device_id", "device_name", "platform", "client_version"):
            if not isinstance(body.get(field), str):
                return self._missing(("body", field))
        device = self.devices.setdefault(body["device_id"], {"registered_at": now, "sync_cursor": None})
        device.update(user_id=user_id, last_sync_at=now, device_name=body["device_name"],
                      platform=body["platform"], client_version=body["client_version"])  # reassigned (gap 8)
        return 200, {"device_id": body["device_id"], "device_name": device["device_name"],
                     "platform": device["platform"], "client_version": device["client_version"],
                     "registered_at": _double_iso(device["registered_at"]),
                     "last_sync_at": _double_iso(now), "sync_cursor": _double_iso(device["sync_cursor"])}

    def _touch(self, device_id, now):
        if device_id in self.devices:
            self.devices[device_id].update(last_sync_at=now, sync_cursor=now)

    def status(self, body):
        with self.lock:
            device = self.devices.get(body.get("device_id"))
            if device is None:
                return 404, {"detail": "Device not registered"}
            cursor = device["sync_cursor"]
            pending = sum(1 for m in self.memories.values() if cursor and m["updated_at"] > cursor)  # all tenants
            from datetime import datetime, timezone

            return 200, {"device_id": body["device_id"], "last_sync_at": _double_iso(device["last_sync_at"]),
                         "pending_push_count": 0, "pending_pull_count": pending,
                         "server_timestamp": _double_iso(datetime.now(timezone.utc))}

    def _entity(self, kind, obj, loc, now):
        """Validate one pushed entity like the service's pydantic models; (row, error)."""
        if not isinstance(obj, dict):
            return None, (422, {"detail": [{"type": "model_attributes_type", "loc": list(loc),
                                            "msg": "Input should be a valid dictionary", "input": obj}]})
        required = {"memory": ("id", "content"), "session": ("id",), "edge": ("id", "from_id", "to_id", "relation")}[kind]
        for field in required:
            if not isinstance(obj.get(field), str):
                return None, self._missing(loc + (field,))
        row = {"vector_clock": {}, "content_hash": None, "deleted_at": None, "created_at": now, "updated_at": now,
               "last_modified_by": None, "metadata": {}}
        if kind == "memory":
            row.update(type="fact", tags=[], summary=None, namespace_id="global", repo_url=None, repo_name=None,
                       relative_path=None, source_file=None, source_repo=None, source_tool=None, project=None,
                       session_id=None, embedding=None, encrypted=False, visibility="team_read")
        elif kind == "session":
            row.update(label=None, namespace_id="global", tool="contextfs", repo_url=None, repo_name=None,
                       repo_path=None, branch=None, started_at=now, ended_at=None, summary=None)
        else:
            row.update(weight=1.0, created_by=None)
        fields = {"memory": self.MEMORY_FIELDS, "session": self.SESSION_FIELDS, "edge": self.EDGE_FIELDS}[kind]
        for field in fields:
            if obj.get(field) is None:
                continue
            value = obj[field]
            if field in ("created_at", "updated_at", "deleted_at", "started_at", "ended_at"):
                try:
                    value = _double_ts(value)
                except ValueError:
                    return None, (422, {"detail": [{"type": "datetime_from_date_parsing", "loc": list(loc + (field,)),
                                                    "msg": "Input should be a valid datetime", "input": value}]})
            if field == "vector_clock" and not (isinstance(value, dict) and all(
                    isinstance(v, int) and not isinstance(v, bool) for v in value.values())):
                return None, (422, {"detail": [{"type": "int_type", "loc": list(loc + (field,)),
                                                "msg": "Input should be a valid integer", "input": value}]})
            row[field] = value
        return row, None

    def push(self, user_id, body, now):
        device = body.get("device_id")
        if not isinstance(device, str):
            return self._missing(("body", "device_id"))
        force = bool(body.get("force"))
        parsed = []
        for kind, plural in (("memory", "memories"), ("session", "sessions"), ("edge", "edges")):
            for i, obj in enumerate(body.get(plural) or []):
                row, error = self._entity(kind, obj, ("body", plural, i), now)
                if error:
                    return error
                parsed.append((kind, row))
        accepted = rejected = accepted_memories = rejected_memories = 0
        conflicts = []
        for kind, row in parsed:  # one transaction: nothing above failed, so all of it applies
            table = {"memory": self.memories, "session": self.sessions, "edge": self.edges}[kind]
            key = (row["from_id"], row["to_id"], row["relation"]) if kind == "edge" else row["id"]
            existing = table.get(key)  # by id across ALL users (gap 7)
            client = dict(row["vector_clock"])
            if existing is None:
                row["vector_clock"] = dict(client, **{device: client.get(device, 0) + 1})  # gap 15
                row["last_modified_by"] = device
                row["metadata"] = {}       # gap 5: stored in a column nothing reads
                row["encrypted"] = False   # gap 6
                if kind != "edge":
                    row["user_id"] = user_id
                if kind == "edge":
                    row["id"] = f"{row['from_id']}:{row['relation']}:{row['to_id']}"
                table[key] = row
                verdict = "accepted"
            else:
                order = _double_clock_order(existing["vector_clock"], client)
                if order in ("before", "equal") or force:
                    for field in {"memory": self.MEMORY_UPDATES, "session": self.SESSION_UPDATES,
                                  "edge": self.EDGE_UPDATES}[kind]:
                        existing[field] = row[field]
                    if kind == "memory" and row.get("embedding"):
                        existing["embedding"] = row["embedding"]
                    merged = dict(existing["vector_clock"])
                    for k, v in client.items():
                        merged[k] = max(merged.get(k, 0), v)
                    existing["vector_clock"], existing["last_modified_by"] = merged, device
                    verdict = "accepted"
                elif order == "after":
                    verdict = "rejected"
                else:
                    verdict = "conflict"
                    field = {"memory": "content", "session": "summary", "edge": None}[kind]
                    conflicts.append({
                        "entity_id": row["id"], "entity_type": kind, "client_clock": client,
                        "server_clock": existing["vector_clock"],
                        "client_content": row.get(field) if field else None,
                        "server_content": existing.get(field) if field else None,
                        "client_updated_at": _double_iso(row["updated_at"]),
                        "server_updated_at": _double_iso(existing["updated_at"])})
            accepted += verdict == "accepted"
            rejected += verdict == "rejected"
            if kind == "memory":
                accepted_memories += verdict == "accepted"
                rejected_memories += verdict == "rejected"
        self._touch(device, now)
        return 200, {"success": not conflicts, "status": "conflict" if conflicts else "partial" if rejected else "success",
                     "accepted": accepted, "rejected": rejected, "accepted_memories": accepted_memories,
                     "rejected_memories": rejected_memories, "accepted_sessions": 0, "rejected_sessions": 0,
                     "conflicts": conflicts, "server_timestamp": _double_iso(now), "message": None,
                     "pushed_items": []}

    def _wire(self, kind, row):
        fields = {"memory": self.MEMORY_FIELDS, "session": self.SESSION_FIELDS, "edge": self.EDGE_FIELDS}[kind]
        out = {}
        for field in fields:
            value = row.get(field)
            out[field] = _double_iso(value) if hasattr(value, "strftime") else value
        if kind == "memory":
            out.update(metadata={}, encrypted=False, visibility="team_read")
        return out

    def _visible(self, kind, user_id, namespaces):
        if kind == "edge":
            return list(self.edges.values())  # every tenant's edges (gap 7)
        table = self.memories if kind == "memory" else self.sessions
        return [r for r in table.values() if r.get("user_id") in (user_id, None)
                and (not namespaces or r["namespace_id"] in namespaces)]

    def pull(self, user_id, body, now):
        device = body.get("device_id")
        if not isinstance(device, str):
            return self._missing(("body", "device_id"))
        since = _double_ts(body["since_timestamp"]) if body.get("since_timestamp") else None
        limit, offset = int(body.get("limit") or 1000), int(body.get("offset") or 0)
        namespaces = body.get("namespace_ids")
        lists = {}
        for kind, plural in (("memory", "memories"), ("session", "sessions"), ("edge", "edges")):
            rows = [r for r in self._visible(kind, user_id, namespaces) if since is None or r["updated_at"] > since]
            order = (lambda r: (r["updated_at"], r["from_id"], r["to_id"])) if kind == "edge" else \
                (lambda r: (r["updated_at"], r["id"]))
            rows.sort(key=order)
            lists[plural] = [self._wire(kind, r) for r in rows[offset:offset + limit]]
        self._touch(device, now)
        has_more = any(len(v) >= limit for v in lists.values())
        return 200, dict(success=True, **lists, server_timestamp=_double_iso(now), has_more=has_more,
                         next_cursor=None,
                         next_offset=offset + sum(len(v) for v in lists.values()) if has_more else 0)

    def diff(self, user_id, body, now):
        missing = {"memories": [], "sessions": [], "edges": []}
        deleted = {"memories": [], "sessions": [], "edges": []}
        server_missing = {"memories": [], "sessions": [], "edges": []}
        updated = 0
        for kind, plural in (("memory", "memories"), ("session", "sessions"), ("edge", "edges")):
            entries = [e for e in body.get(plural) or [] if isinstance(e, dict) and isinstance(e.get("id"), str)]
            hashes = {e["id"]: e.get("content_hash") for e in entries}
            gone = {e["id"]: e["deleted_at"] for e in entries if e.get("deleted_at")}
            seen = set()
            for row in self._visible(kind, user_id, body.get("namespace_ids")):
                row_id = f"{row['from_id']}:{row['to_id']}:{row['relation']}" if kind == "edge" else row["id"]
                seen.add(row_id)
                if row["deleted_at"]:
                    if row_id in hashes:
                        deleted[plural].append(row_id)
                elif row_id in gone:  # rule 2: the manifest deletes, clock untouched
                    row["deleted_at"], row["updated_at"] = _double_ts(gone[row_id]), now
                elif kind != "memory":
                    if row_id not in hashes:
                        missing[plural].append(self._wire(kind, row))
                elif hashes.get(row_id) is None:
                    missing[plural].append(self._wire(kind, row))
                elif hashes[row_id] != row["content_hash"]:
                    missing[plural].append(self._wire(kind, row))
                    updated += 1
            server_missing[plural] = [i for i in hashes if i not in seen and i not in gone]
        self._touch(body.get("device_id"), now)
        return 200, {
            "success": True, **{f"missing_{k}": v for k, v in missing.items()},
            **{f"deleted_{k[:-1] if k != 'memories' else 'memory'}_ids": v for k, v in deleted.items()},
            **{f"server_missing_{k[:-1] if k != 'memories' else 'memory'}_ids": v for k, v in server_missing.items()},
            "total_missing": sum(len(v) for v in missing.values()), "total_updated": updated,
            "total_deleted": sum(len(v) for v in deleted.values()),
            "total_server_missing": sum(len(v) for v in server_missing.values()),
            "server_timestamp": _double_iso(now), "has_more": False, "next_offset": 0}


class DoubleServer(AnchorServer):
    """A CloudDouble served on 127.0.0.1 (port 0) by the stdlib, one thread per request."""

    def __init__(self):
        from socketserver import ThreadingMixIn
        from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

        class Quiet(WSGIRequestHandler):
            def log_message(self, *args):
                pass

        class Threading(ThreadingMixIn, WSGIServer):
            daemon_threads = True

        admin = "ctxfs_DOUBLE-admin-key-" + uuid.uuid4().hex
        self.app = CloudDouble(admin)
        self.httpd = make_server("127.0.0.1", 0, self.app, server_class=Threading, handler_class=Quiet)
        super().__init__(f"http://127.0.0.1:{self.httpd.server_port}", admin)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def backup(self, dest=None):
        """A copy of the synced tables (users, keys and devices are not rolled back)."""
        import copy

        with self.app.lock:
            return copy.deepcopy((self.app.memories, self.app.sessions, self.app.edges))

    def restore(self, backup):
        """The tables put back as ``backup()`` saw them."""
        import copy

        with self.app.lock:
            self.app.memories, self.app.sessions, self.app.edges = copy.deepcopy(backup)


@pytest.fixture(scope="module")
def cloud_double():
    """A CloudDouble on 127.0.0.1 shared by a test module (each test makes its own user)."""
    server = DoubleServer()
    yield server
    server.stop()


@pytest.fixture(params=["double", "anchor"])
def contextfs_cloud(request):
    """ContextFS Cloud: its in-suite double, and the real server when CONTEXTFS_ANCHOR_URL is set."""
    return request.getfixturevalue("cloud_double" if request.param == "double" else "anchor_server")
