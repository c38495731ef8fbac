"""contextfs_server: the contextfs-sync reference server, self-hostable.

A small server that speaks the ContextFS Cloud sync protocol (protocol.md) for the
``contextfs`` client and for the public ContextFS client. It is a plain WSGI application,
``create_app(data)``, over one storage interface: ``contextfs server run`` hosts it with the
standard library (threads, one process); in production run the same app under gunicorn::

    gunicorn -w 4 -b 0.0.0.0:8766 'contextfs_server:create_app("/srv/contextfs")'

Read it top to bottom: each numbered section only uses the sections above it. From
``contextfs_sync`` it takes only the I/O-free layers (errors, data model, clock rules, limits);
the client never imports this module except to run ``contextfs server …`` or ``contextfs demo``.
"""

# ---- 1. imports, constants, limits -------------------------------------------------------

from __future__ import annotations

import json
import os
import re
import sqlite3
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from contextfs_sync import (
    E2EE_CHECK_PREFIX, MAX_ID_CHARS, Clock, ContextFSError, Edge, Memory, ServerError, Session, UsageError,
    __version__,
    clock_compare, clock_merge, clock_tick, format_ts, prune_clock, normalize_ts, nul_path, parse_ts, utc_now,
)

__all__ = ["create_app", "ServerApp", "SQLiteStorage", "open_storage", "add_user", "make_server", "MAX_BODY"]

MAX_BODY = 32 * 1024 * 1024      # largest request body (a push batch); larger is 413
MAX_JSON_DEPTH = 64
MAX_CLOCK_ENTRIES = 1000         # devices in one vector clock
MAX_CREDENTIAL_CHARS = 1024      # login email/password: keeps the rate limiter's memory bounded
PULL_LIMIT_MAX = 5000
LOGIN_MAX_FAILURES = 5
LOGIN_WINDOW_SECONDS = 60
ENV_SERVER_LOG = "CONTEXTFS_SERVER_LOG"
_SCRYPT_PARAMS = {"n": 2 ** 14, "r": 8, "p": 1, "dklen": 32}
_KEY_USED_GRANULARITY_S = 10     # last_used_at is refreshed at most this often (no write per read)

# Optional string fields per entity (wrong types are 422, like the anchor's pydantic models).
_STRING_FIELDS = {
    "memory": ("type", "summary", "namespace_id", "source_repo", "source_file", "source_tool",
               "project", "session_id", "repo_url", "repo_name", "relative_path", "visibility",
               "content_hash", "last_modified_by"),
    "session": ("label", "namespace_id", "tool", "repo_url", "repo_name", "repo_path", "branch",
                "summary", "content_hash", "last_modified_by"),
    "edge": ("id", "created_by", "content_hash", "last_modified_by"),
}
_TS_FIELDS = {
    "memory": ("created_at", "updated_at", "deleted_at"),
    "session": ("created_at", "updated_at", "deleted_at", "started_at", "ended_at"),
    "edge": ("created_at", "updated_at", "deleted_at"),
}
# Never stored from a client: ownership is the authenticated user, embeddings never travel.
_DROPPED_FIELDS = ("embedding", "user_id", "team_id", "seq")
# The wire list each kind travels in, in the order pushes are applied and pulls are answered.
WIRE_LISTS = {"memory": "memories", "session": "sessions", "edge": "edges"}


# ---- 2. request validation ---------------------------------------------------------------
# Bodies are parsed under a budget (size, depth, strict UTF-8, no NaN) and checked field by
# field; every problem is a FastAPI-style 422 entry, as the anchor answers, and nothing is
# written unless the whole request is valid.

class AccountEncrypted(Exception):
    """A push that asked not to go into an end-to-end encrypted account met one."""


class _HTTPError(Exception):
    """An HTTP error answer: status, FastAPI-style ``detail`` and extra headers."""

    def __init__(self, status: int, detail: Any, headers: Optional[Dict[str, str]] = None):
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail
        self.headers = headers or {}


def _unauthorized() -> _HTTPError:
    return _HTTPError(401, "Invalid or missing API key", {"WWW-Authenticate": "ApiKey"})


def _json_invalid(position: int, error: str) -> _HTTPError:
    return _HTTPError(422, [{"type": "json_invalid", "loc": ["body", position], "msg": "JSON decode error",
                             "input": {}, "ctx": {"error": error}}])


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):  # 1e400: would be sent back as invalid JSON
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _json_too_deep(value: Any, limit: int) -> bool:
    """Whether containers nest deeper than ``limit`` (iterative: no recursion on hostile input)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node
        if depth > limit:
            return True
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def decode_json_body(raw: bytes) -> Any:
    """Decode a request body as strict UTF-8 JSON, or raise the anchor's 422 ``json_invalid``."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _json_invalid(exc.start, "Invalid UTF-8") from None
    if not text.strip():
        raise _HTTPError(422, [{"type": "missing", "loc": ["body"], "msg": "Field required", "input": None}])
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except json.JSONDecodeError as exc:
        raise _json_invalid(exc.pos, exc.msg) from None
    except ValueError as exc:  # NaN / Infinity
        raise _json_invalid(0, str(exc)) from None
    except RecursionError:
        raise _json_invalid(0, "JSON nested too deeply") from None
    if isinstance(value, (dict, list)) and _json_too_deep(value, MAX_JSON_DEPTH):
        raise _json_invalid(0, f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    # Lone surrogates (\ud800) decode fine but cannot be stored or sent back. Valid UTF-8 text
    # cannot hold one, so only a \uD8xx-\uDFxx escape can make one: re-encode only then.
    if "\\ud" in text or "\\uD" in text:
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise _json_invalid(0, f"invalid unicode escape ({exc.reason})") from None
    return value


_TYPE_CHECKS: Dict[str, Tuple[Callable[[Any], bool], str, str]] = {
    "str": (lambda v: isinstance(v, str), "string_type", "Input should be a valid string"),
    "list": (lambda v: isinstance(v, list), "list_type", "Input should be a valid list"),
    "dict": (lambda v: isinstance(v, dict), "dict_type", "Input should be a valid dictionary"),
    "bool": (lambda v: isinstance(v, bool), "bool_type", "Input should be a valid boolean"),
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "int_type",
            "Input should be a valid integer"),
    "number": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "float_type",
               "Input should be a valid number"),
}


class _Schema:
    """Checks a request body and collects FastAPI-style 422 entries ``{type, loc, msg}``."""

    MAX_ERRORS = 50

    def __init__(self) -> None:
        self.errors: List[dict] = []

    def add(self, kind: str, loc: Tuple[Any, ...], msg: str) -> None:
        """Record one validation error."""
        if len(self.errors) < self.MAX_ERRORS:
            self.errors.append({"type": kind, "loc": list(loc), "msg": msg})

    def raise_if_any(self) -> None:
        """Raise 422 with every collected error."""
        if self.errors:
            raise _HTTPError(422, self.errors)

    def field(self, obj: dict, key: str, loc: Tuple[Any, ...], kind: str, required: bool = False,
              nullable: bool = True, default: Any = None) -> Any:
        """``obj[key]`` checked against ``kind``; ``default`` when absent (or null, if nullable)."""
        if key not in obj:
            if required:
                self.add("missing", loc + (key,), "Field required")
            return default
        value = obj[key]
        if value is None and nullable and not required:
            return default
        check, error_type, msg = _TYPE_CHECKS[kind]
        if not check(value):
            self.add(error_type, loc + (key,), msg)
            return default
        return value

    def ident(self, obj: dict, key: str, loc: Tuple[Any, ...], required: bool = True) -> Optional[str]:
        """A required, non-empty id string without NUL characters."""
        value = self.field(obj, key, loc, "str", required=required)
        if value is None:
            return None
        if value == "":
            self.add("string_too_short", loc + (key,), "String should have at least 1 character")
            return None
        if "\x00" in value:
            self.add("string_pattern_mismatch", loc + (key,), "String should not contain NUL characters")
            return None
        if len(value) > MAX_ID_CHARS:
            self.add("string_too_long", loc + (key,), f"String should have at most {MAX_ID_CHARS} characters")
            return None
        return value

    def timestamp(self, obj: dict, key: str, loc: Tuple[Any, ...]) -> Optional[str]:
        """An optional ISO-8601 timestamp, normalised to UTC ``Z``."""
        value = self.field(obj, key, loc, "str")
        try:
            return normalize_ts(value)
        except (ValueError, OverflowError):
            self.add("datetime_from_date_parsing", loc + (key,), "Input should be a valid datetime")
            return None

    def str_list(self, obj: dict, key: str, loc: Tuple[Any, ...], max_items: int = 1000) -> Optional[List[str]]:
        """An optional list of strings (bounded: each becomes an SQL parameter)."""
        value = self.field(obj, key, loc, "list")
        if value is None:
            return None
        if len(value) > max_items:
            self.add("too_long", loc + (key,), f"List should have at most {max_items} items")
            return None
        for i, item in enumerate(value):
            if not isinstance(item, str):
                self.add("string_type", loc + (key, i), "Input should be a valid string")
        return value

    def obj(self, value: Any, loc: Tuple[Any, ...]) -> bool:
        """Whether a list item is an object (records the error if not)."""
        if isinstance(value, dict):
            return True
        self.add("model_attributes_type", loc,
                 "Input should be a valid dictionary or object to extract fields from")
        return False


def _check_entity(schema: _Schema, kind: str, obj: Any, loc: Tuple[Any, ...]) -> bool:
    """Validate one pushed memory/session/edge; True when it is usable."""
    before = len(schema.errors)
    if not schema.obj(obj, loc):
        return False
    if kind == "edge":
        for key in ("from_id", "to_id", "relation"):
            schema.ident(obj, key, loc)
    else:
        schema.ident(obj, "id", loc)
    if kind == "memory":
        schema.field(obj, "content", loc, "str", required=True)
        schema.field(obj, "encrypted", loc, "bool")
        tags = schema.field(obj, "tags", loc, "list")
        for i, tag in enumerate(tags or []):
            if not isinstance(tag, str):
                schema.add("string_type", loc + ("tags", i), "Input should be a valid string")
        embedding = schema.field(obj, "embedding", loc, "list")  # dropped, but typed like the anchor's
        for i, value in enumerate(embedding or []):
            if not _TYPE_CHECKS["number"][0](value):
                schema.add("float_type", loc + ("embedding", i), "Input should be a valid number")
                break
    if kind == "edge":
        schema.field(obj, "weight", loc, "number")
    for key in _STRING_FIELDS[kind]:
        schema.field(obj, key, loc, "str")
    for key in _TS_FIELDS[kind]:
        schema.timestamp(obj, key, loc)
    schema.field(obj, "metadata", loc, "dict")
    clock = schema.field(obj, "vector_clock", loc, "dict")
    if clock is not None and len(clock) > MAX_CLOCK_ENTRIES:
        schema.add("too_long", loc + ("vector_clock",), f"Clock should have at most {MAX_CLOCK_ENTRIES} entries")
        clock = None
    for device, count in (clock or {}).items():
        if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count < 2 ** 63:
            schema.add("int_type", loc + ("vector_clock", device[:MAX_ID_CHARS]),
                       "Input should be a non-negative 64-bit integer")
        elif len(device) > MAX_ID_CHARS:
            schema.add("string_too_long", loc + ("vector_clock",), f"Device ids have at most {MAX_ID_CHARS} characters")
    if len(schema.errors) == before:
        where = nul_path(obj)  # in any text, tag, metadata key or value: never storable upstream
        if where is not None:
            schema.add("string_pattern_mismatch", loc + tuple(where), "String should not contain NUL characters")
    return len(schema.errors) == before


def _stored_entity(kind: str, obj: dict) -> Tuple[Tuple[str, ...], dict, Clock]:
    """(key, stored JSON object, incoming clock) for a validated entity.

    The whole object is kept (metadata, encrypted, unknown keys) with its standard fields
    normalised by the data model; the data-model helpers raise ValueError on bad input.
    """
    body = {k: v for k, v in obj.items() if k not in _DROPPED_FIELDS}
    if kind == "memory":
        mem = Memory.from_wire(obj)
        body.update(id=mem.id, content=mem.content, type=mem.type, tags=mem.tags,
                    namespace_id=mem.namespace_id, metadata=mem.metadata, encrypted=mem.encrypted,
                    created_at=mem.created_at, updated_at=mem.updated_at, deleted_at=mem.deleted_at,
                    content_hash=mem.content_hash or None)
        if mem.deleted_at is not None:
            body["summary"] = None  # a tombstone keeps nothing of what the memory said (from_wire erased the rest)
        return (mem.id,), body, mem.vector_clock
    if kind == "session":
        ses = Session.from_wire(obj)
        body.update(id=ses.id, tool=ses.tool, namespace_id=str(obj.get("namespace_id") or "global"),
                    metadata=ses.metadata, started_at=ses.started_at, ended_at=ses.ended_at,
                    created_at=normalize_ts(obj.get("created_at")) or ses.started_at,
                    updated_at=ses.updated_at, deleted_at=ses.deleted_at, content_hash=None)
        return (ses.id,), body, ses.vector_clock
    edge = Edge.from_wire(obj)
    body.update(id=edge.id, from_id=edge.from_id, to_id=edge.to_id, relation=edge.relation,
                weight=edge.weight, metadata=edge.metadata, created_at=edge.created_at,
                updated_at=edge.updated_at, deleted_at=edge.deleted_at, content_hash=None)
    return (edge.from_id, edge.to_id, edge.relation), body, edge.vector_clock


def _wire_row(kind: str, body_json: str) -> dict:
    """A stored row as sent to clients (memories always carry ``"embedding": null``)."""
    obj = json.loads(body_json)
    if kind == "memory":
        obj["embedding"] = None
    return obj


def _wire_row_json(kind: str, body_json: str) -> str:
    """``_wire_row`` as JSON text, without decoding the stored row when it can be avoided."""
    if kind != "memory":
        return body_json
    if '"embedding"' not in body_json and body_json.endswith("}") and body_json != "{}":
        return body_json[:-1] + ',"embedding":null}'  # the key _wire_row appends last
    return _json_text(_wire_row(kind, body_json))


def _json_text(value: Any) -> str:
    """How the server encodes answers: compact, UTF-8 (not ASCII-escaped)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class _RawJSON:
    """An answer (or part of one) already encoded as JSON text."""

    def __init__(self, text: str):
        self.text = text


def _raw_json_object(pairs: List[Tuple[str, Any]]) -> _RawJSON:
    """A JSON object from (key, value) pairs in order; _RawJSON values are inserted as they are."""
    return _RawJSON("{" + ",".join(_json_text(k) + ":" + (v.text if isinstance(v, _RawJSON) else _json_text(v))
                                   for k, v in pairs) + "}")



# ---- 3. storage --------------------------------------------------------------------------
# One interface between the app and its data: named methods taking and returning plain values
# (strings, dicts, lists), with every connection and every SQL statement of the server inside
# the backend class. A second backend (PostgreSQL) is one more class with the same methods.
#
# The SQLite backend keeps one file (server.db) in WAL mode and one connection per thread.
# Isolation: every entity row is keyed by (user_id, id) — edges by (user_id, from_id, to_id,
# relation) — so two users can hold the same id and neither can read or touch the other's row.
# Ordering: every row write takes the next value of one server-wide sequence inside its write
# transaction. SQLite serialises writers, so a reader can never see seq N+1 committed while N
# is still invisible: `seq > cursor` paging neither skips nor repeats rows.

DB_NAME = "server.db"
BUSY_TIMEOUT_MS = 10_000
CACHE_KIB = 8 * 1024             # SQLite page cache per connection (one per request thread)
WAL_CHECKPOINT_PAGES = 8000      # auto-checkpoint after this many WAL pages (~32 MiB)

_SCHEMA = """
BEGIN IMMEDIATE;
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO counters VALUES ('seq', 0);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('storage_id', lower(hex(randomblob(16))));
CREATE TABLE IF NOT EXISTS users (
    id TEXT PRIMARY KEY, email TEXT NOT NULL UNIQUE, name TEXT, password_hash TEXT,
    password_salt TEXT, e2ee_salt TEXT NOT NULL, created_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY, user_id TEXT NOT NULL REFERENCES users (id), name TEXT,
    key_hash TEXT NOT NULL UNIQUE, key_prefix TEXT NOT NULL, is_active INTEGER NOT NULL DEFAULT 1,
    created_at TEXT NOT NULL, last_used_at TEXT);
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT NOT NULL, user_id TEXT NOT NULL, device_name TEXT, platform TEXT,
    client_version TEXT, registered_at TEXT NOT NULL, last_sync_at TEXT, sync_cursor TEXT,
    served_seq INTEGER, PRIMARY KEY (user_id, device_id));
CREATE TABLE IF NOT EXISTS memories (
    user_id TEXT NOT NULL, id TEXT NOT NULL, namespace_id TEXT, content_hash TEXT,
    updated_at TEXT, deleted_at TEXT, vector_clock TEXT NOT NULL, last_modified_by TEXT,
    received_at TEXT NOT NULL, seq INTEGER NOT NULL, body TEXT NOT NULL,
    PRIMARY KEY (user_id, id));
CREATE TABLE IF NOT EXISTS sessions (
    user_id TEXT NOT NULL, id TEXT NOT NULL, namespace_id TEXT, content_hash TEXT,
    updated_at TEXT, deleted_at TEXT, vector_clock TEXT NOT NULL, last_modified_by TEXT,
    received_at TEXT NOT NULL, seq INTEGER NOT NULL, body TEXT NOT NULL,
    PRIMARY KEY (user_id, id));
CREATE TABLE IF NOT EXISTS edges (
    user_id TEXT NOT NULL, from_id TEXT NOT NULL, to_id TEXT NOT NULL, relation TEXT NOT NULL,
    id TEXT NOT NULL, namespace_id TEXT, content_hash TEXT, updated_at TEXT, deleted_at TEXT,
    vector_clock TEXT NOT NULL, last_modified_by TEXT, received_at TEXT NOT NULL,
    seq INTEGER NOT NULL, body TEXT NOT NULL, PRIMARY KEY (user_id, from_id, to_id, relation));
CREATE INDEX IF NOT EXISTS memories_user_seq ON memories (user_id, seq);
CREATE INDEX IF NOT EXISTS sessions_user_seq ON sessions (user_id, seq);
CREATE INDEX IF NOT EXISTS edges_user_seq ON edges (user_id, seq);
PRAGMA user_version = 1;
COMMIT;
"""
_SCHEMA_VERSION = 1

# kind -> (table, key columns)
_TABLES = {
    "memory": ("memories", ("id",)),
    "session": ("sessions", ("id",)),
    "edge": ("edges", ("from_id", "to_id", "relation")),
}

# A validated pushed item: (kind, key, body to store, incoming clock).
PushItem = Tuple[str, Tuple[str, ...], dict, Clock]
# The clock rule, applied to each pushed item inside the storage's write transaction:
# (kind, incoming body, incoming clock, stored clock or None, stored body getter)
#   -> (verdict "accepted" | "rejected" | "conflict", clock stored or kept, conflict entry or None).
PushRule = Callable[[str, dict, Clock, Optional[Clock], Callable[[], dict]], Tuple[str, Clock, Optional[dict]]]
# A pulled row: (server seq, kind, stored body as JSON text).
PulledRow = Tuple[int, str, str]

_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, sort_keys=True)


def _stored_json(value: Any) -> str:
    """Compact, key-sorted JSON text: how bodies and clocks are kept."""
    return _ENCODER.encode(value)


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    conn.execute("PRAGMA synchronous = NORMAL")
    # Random-id primary-key inserts touch pages all over the index: with SQLite's default 2 MiB
    # cache a 100k-memory push re-reads them ~450k times. 8 MiB per connection (allocated as
    # used; one connection per request thread) and rarer checkpoints cut a large push's server
    # CPU by ~10% and its wall time by ~15%.
    conn.execute(f"PRAGMA cache_size = -{CACHE_KIB}")
    conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_CHECKPOINT_PAGES}")
    return conn


class _Tx:
    """``with _Tx(conn, immediate):`` — BEGIN [IMMEDIATE] … COMMIT, ROLLBACK on error."""

    def __init__(self, conn: sqlite3.Connection, immediate: bool):
        self.conn = conn
        self.immediate = immediate

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE" if self.immediate else "BEGIN")
        return self.conn

    def __exit__(self, kind: Any, value: Any, tb: Any) -> None:
        if kind is None:
            try:
                self.conn.execute("COMMIT")
                return
            except sqlite3.Error:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                raise
        if self.conn.in_transaction:  # a failed write may have rolled back already
            self.conn.execute("ROLLBACK")


def _namespace_filter(kind: str, namespaces: Optional[List[str]]) -> Tuple[str, List[Any]]:
    if not namespaces or kind == "edge":  # like the anchor: edges are never namespace-filtered
        return "", []
    return f" AND namespace_id IN ({', '.join('?' * len(namespaces))})", list(namespaces)


class SQLiteStorage:
    """The server's data in one SQLite file: users, API keys, devices and synced rows."""

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path).expanduser()
        self._local = threading.local()
        self._create()
        self._check_high_water()

    # -- the high-water mark: a database restored from a backup gets a new storage id ---------
    # server.db.highwater, beside the database and not part of it, records the storage id and
    # the highest seq this database ever handed out. A database that opens with a lower highest
    # seq has gone back in time (a backup restored, or a power cut that lost committed pages):
    # it gets a new storage id, so every device pulls everything again and uploads what it lacks
    # (protocol.md §6 e). Comparing seqs in the clients alone misses it once other devices have
    # pushed past the restored seq. A lagging mark (say, two workers racing) can only hide a
    # restore, never invent one.

    @property
    def _high_water_path(self) -> Path:
        return self.path.with_name(self.path.name + ".highwater")

    def _check_high_water(self) -> None:
        try:
            mark = json.loads(self._high_water_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            mark = None
        top = self.top_seq()
        if isinstance(mark, dict) and mark.get("storage_id") == self.storage_id() \
                and isinstance(mark.get("top_seq"), int) and mark["top_seq"] > top:
            conn = self._conn()
            with _Tx(conn, immediate=True):
                conn.execute("UPDATE meta SET value = lower(hex(randomblob(16))) WHERE name = 'storage_id'")
            old_id, self._storage_id = self._storage_id, None
            print(f"contextfs server: {self.path} went back from seq {mark['top_seq']} to {top} (restored from "
                  f"a backup?); new storage id {self.storage_id()} (was {old_id}): devices will pull everything "
                  f"again and upload what it lacks", file=sys.stderr)
        self._write_high_water(top)

    def _write_high_water(self, top: int) -> None:
        tmp = self._high_water_path.with_name(f"{self._high_water_path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            tmp.write_text(json.dumps({"storage_id": self.storage_id(), "top_seq": top}), encoding="utf-8")
            os.replace(tmp, self._high_water_path)
        except OSError:
            pass  # best effort: the mark only ever adds a check

    def top_seq(self) -> int:
        """The highest seq handed out so far (in this thread's transaction, if one is open)."""
        return self._conn().execute("SELECT value FROM counters WHERE name = 'seq'").fetchone()[0]

    def _create(self) -> None:
        """Create the data directory (0700) and the database (0600) if needed; check the schema."""
        data_dir = self.path.parent
        try:
            if not data_dir.exists():
                data_dir.mkdir(parents=True, mode=0o700)
                os.chmod(data_dir, 0o700)
            fresh = not self.path.exists()
            conn = _connect(self.path)
        except (OSError, sqlite3.Error) as exc:
            raise ServerError(f"{data_dir}: cannot use the server data directory ({exc}); "
                              f"check its permissions or pass another --data DIR") from None
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > _SCHEMA_VERSION:
                raise ServerError(f"{self.path} was written by a newer contextfs-sync (schema {version}); upgrade")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.executescript(_SCHEMA)
            if fresh:
                os.chmod(self.path, 0o600)
        except sqlite3.DatabaseError as exc:
            raise ServerError(f"{self.path}: not a usable server database ({exc})") from None
        finally:
            conn.close()

    def _conn(self) -> sqlite3.Connection:
        """This thread's connection (sqlite3 connections must not be shared between threads)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = _connect(self.path)
        return conn

    def storage_id(self) -> str:
        """This database's random id, made when it was created: a new or replaced database has
        another one (a copy restored from a backup keeps it; its lower highest seq tells)."""
        if getattr(self, "_storage_id", None) is None:
            self._storage_id = self._conn().execute("SELECT value FROM meta WHERE name = 'storage_id'").fetchone()[0]
        return self._storage_id

    @staticmethod
    def is_busy(exc: BaseException) -> bool:
        """Whether an error means "the database is busy: retry" (the app answers 503)."""
        return isinstance(exc, sqlite3.OperationalError) and ("locked" in str(exc) or "busy" in str(exc))

    # -- users and API keys ----------------------------------------------------------------

    def create_user(self, user: dict, key: dict) -> None:
        """Store a new user and its first API key together; ContextFSError if the email is taken."""
        conn = self._conn()
        with _Tx(conn, immediate=True):
            if conn.execute("SELECT 1 FROM users WHERE email = ?", (user["email"],)).fetchone():
                raise ContextFSError(f"User {user['email']} already exists in {self.path}; "
                                     f"choose another email (or log in with its password)")
            conn.execute("INSERT INTO users (id, email, name, password_hash, password_salt, e2ee_salt, "
                         "created_at) VALUES (:id, :email, :name, :password_hash, :password_salt, "
                         ":e2ee_salt, :created_at)", user)
            self._insert_key(conn, key)

    def add_key(self, key: dict) -> None:
        """Store a new API key (its id, user_id, name, key_hash, key_prefix, created_at)."""
        conn = self._conn()
        with _Tx(conn, immediate=True):
            self._insert_key(conn, key)

    @staticmethod
    def _insert_key(conn: sqlite3.Connection, key: dict) -> None:
        conn.execute("INSERT INTO api_keys (id, user_id, name, key_hash, key_prefix, is_active, created_at) "
                     "VALUES (:id, :user_id, :name, :key_hash, :key_prefix, 1, :created_at)", key)

    def list_keys(self, user_id: str, hidden_names: Tuple[str, ...]) -> List[dict]:
        """This user's API keys (never their hashes), oldest first, without those named in
        ``hidden_names`` (the login sessions' keys)."""
        marks = ", ".join("?" * len(hidden_names)) or "NULL"
        return [dict(r) for r in self._conn().execute(
            "SELECT id, name, key_prefix, is_active, created_at, last_used_at FROM api_keys "
            f"WHERE user_id = ? AND coalesce(name, '') NOT IN ({marks}) ORDER BY created_at, id",
            (user_id,) + tuple(hidden_names))]

    def end_key(self, user_id: str, key_id: str, delete: bool) -> bool:
        """Revoke (deactivate) or delete one of this user's API keys; False if it has no such key."""
        conn = self._conn()
        with _Tx(conn, immediate=True):
            sql = ("DELETE FROM api_keys WHERE id = ? AND user_id = ?" if delete
                   else "UPDATE api_keys SET is_active = 0 WHERE id = ? AND user_id = ?")
            return conn.execute(sql, (key_id, user_id)).rowcount > 0

    def user_by_email(self, email: str) -> Optional[dict]:
        """The user with this (normalised) email, with its password hash and salt, or None."""
        row = self._conn().execute("SELECT * FROM users WHERE email = ?", (email,)).fetchone()
        return dict(row) if row is not None else None

    def user_for_key(self, key_hash: str) -> Optional[dict]:
        """The user owning the active API key with this SHA-256, with the key's id, hash and last use."""
        row = self._conn().execute(
            "SELECT k.id AS key_id, k.key_hash, k.last_used_at, u.id, u.email, u.name, u.e2ee_salt "
            "FROM api_keys k JOIN users u ON u.id = k.user_id WHERE k.key_hash = ? AND k.is_active = 1",
            (key_hash,)).fetchone()
        return dict(row) if row is not None else None

    def touch_key(self, key_id: str, when: str) -> None:
        """Record when an API key was last used."""
        self._conn().execute("UPDATE api_keys SET last_used_at = ? WHERE id = ?", (when, key_id))

    # -- devices ---------------------------------------------------------------------------

    @staticmethod
    def _claim_device(conn: sqlite3.Connection, user_id: str, device_id: str, now: str) -> None:
        """Auto-register an unknown device for this user.

        Devices are keyed by (user, device id): another account registering the same id gets its
        own entry, so a device can never be taken over (protocol.md gap 8) and one machine can
        switch accounts."""
        row = conn.execute("SELECT user_id FROM devices WHERE user_id = ? AND device_id = ?",
                           (user_id, device_id)).fetchone()
        if row is None:
            conn.execute("INSERT INTO devices (device_id, user_id, device_name, registered_at, last_sync_at) "
                         "VALUES (?, ?, ?, ?, ?)", (device_id, user_id, device_id, now, now))
        else:
            conn.execute("UPDATE devices SET last_sync_at = ? WHERE user_id = ? AND device_id = ?",
                         (now, user_id, device_id))

    def register_device(self, user_id: str, device_id: str, name: str, platform: str,
                        client_version: str, now: str) -> dict:
        """Register (or update) this user's device and return its row."""
        conn = self._conn()
        with _Tx(conn, immediate=True):
            self._claim_device(conn, user_id, device_id, now)
            conn.execute("UPDATE devices SET device_name = ?, platform = ?, client_version = ? "
                         "WHERE user_id = ? AND device_id = ?", (name, platform, client_version, user_id, device_id))
            row = conn.execute("SELECT * FROM devices WHERE user_id = ? AND device_id = ?",
                               (user_id, device_id)).fetchone()
        return dict(row)

    def device_status(self, user_id: str, device_id: str) -> Optional[dict]:
        """This device's last sync, rows changed since it was last served, and the user's live
        counts (``pending``, ``memory``, ``session``, ``edge``, ``deleted_memory``); None if unknown."""
        conn = self._conn()
        with _Tx(conn, immediate=False):
            device = conn.execute("SELECT * FROM devices WHERE device_id = ? AND user_id = ?",
                                  (device_id, user_id)).fetchone()
            if device is None:
                return None
            served = device["served_seq"] or 0
            status = {"last_sync_at": device["last_sync_at"], "pending": 0}
            for kind, (table, _key) in _TABLES.items():
                row = conn.execute(
                    f"SELECT count(*) FILTER (WHERE seq > ?), count(*) FILTER (WHERE deleted_at IS NULL), "
                    f"count(*) FILTER (WHERE deleted_at IS NOT NULL) FROM {table} WHERE user_id = ?",
                    (served, user_id)).fetchone()
                status["pending"] += row[0]
                status[kind] = row[1]
                if kind == "memory":
                    status["deleted_memory"] = row[2]
        return status

    # -- sync ------------------------------------------------------------------------------

    def push(self, user_id: str, device_id: str, items: List[PushItem], rule: PushRule,
             now: str, refuse_if_encrypted: bool = False
             ) -> Tuple[List[Tuple[str, Clock, Optional[dict]]], Optional[Tuple[int, int]]]:
        """Apply pushed items under ``rule`` in ONE transaction.

        ``refuse_if_encrypted`` (a client without an E2EE passphrase asks it): nothing is
        written, and AccountEncrypted is raised, when the account holds an E2EE key check row
        (checked in the same transaction, so a check written meanwhile is seen).

        Returns each item's (verdict, clock, conflict entry) in order, and the (first, last)
        server seqs the accepted rows were stored at (None when nothing was accepted).
        Per request, not per item: one query per kind for the stored clocks, one counter
        update, one executemany per kind. Items apply in order, as if one by one: a later item
        with the same key sees the earlier one's write.
        """
        conn = self._conn()
        outcomes: List[Tuple[str, Clock, Optional[dict]]] = []
        with _Tx(conn, immediate=True):
            if refuse_if_encrypted and conn.execute(
                    # A range over the (user_id, id) key: one index seek, whatever the account holds.
                    "SELECT 1 FROM memories WHERE user_id = ? AND id >= ? AND id < ? AND deleted_at IS NULL LIMIT 1",
                    (user_id, E2EE_CHECK_PREFIX, E2EE_CHECK_PREFIX[:-1] + chr(ord(E2EE_CHECK_PREFIX[-1]) + 1))
            ).fetchone():
                raise AccountEncrypted()
            self._claim_device(conn, user_id, device_id, now)
            received_at = utc_now()  # taken under the write lock: see changes_since
            known = self._stored_clocks(conn, user_id, items)
            bodies: Dict[Tuple[str, Tuple[str, ...]], str] = {}  # written earlier in this request
            first_seq = seq = self.top_seq()  # the same connection: inside this transaction
            writes: Dict[str, List[tuple]] = {kind: [] for kind in _TABLES}
            for kind, key, entity, clock in items:
                stored_text = known.get((kind, key))

                def stored_body(kind: str = kind, key: Tuple[str, ...] = key) -> dict:
                    text = bodies.get((kind, key))
                    if text is None:
                        table, key_columns = _TABLES[kind]
                        where = " AND ".join(f"{c} = ?" for c in key_columns)
                        text = conn.execute(f"SELECT body FROM {table} WHERE user_id = ? AND {where}",
                                            (user_id,) + key).fetchone()[0]
                    return json.loads(text)

                verdict, stored, conflict = rule(kind, entity, clock,
                                                 json.loads(stored_text) if stored_text is not None else None,
                                                 stored_body)
                outcomes.append((verdict, stored, conflict))
                if verdict != "accepted":
                    continue
                seq += 1
                body = _stored_json(dict(entity, vector_clock=stored, last_modified_by=device_id))
                clock_text = _stored_json(stored)
                known[(kind, key)], bodies[(kind, key)] = clock_text, body
                extra_key = key if kind == "edge" else ()  # an edge's key is not its id
                writes[kind].append((user_id, entity["id"]) + extra_key + (
                    entity.get("namespace_id"), entity.get("content_hash"), entity.get("updated_at"),
                    entity.get("deleted_at"), clock_text, device_id, received_at, seq, body))
            for kind, rows in writes.items():
                if rows:
                    table, key_columns = _TABLES[kind]
                    columns = ("user_id", "id") + (key_columns if kind == "edge" else ()) + (
                        "namespace_id", "content_hash", "updated_at", "deleted_at", "vector_clock",
                        "last_modified_by", "received_at", "seq", "body")
                    conn.executemany(f"INSERT OR REPLACE INTO {table} ({', '.join(columns)}) "
                                     f"VALUES ({', '.join('?' * len(columns))})", rows)
            if seq > first_seq:
                conn.execute("UPDATE counters SET value = ? WHERE name = 'seq'", (seq,))
        if seq > first_seq:
            self._write_high_water(seq)
        return outcomes, ((first_seq + 1, seq) if seq > first_seq else None)

    @staticmethod
    def _stored_clocks(conn: sqlite3.Connection, user_id: str,
                       items: List[PushItem]) -> Dict[Tuple[str, Tuple[str, ...]], str]:
        """The stored vector_clock (JSON text) of every item key that exists, one query per kind."""
        known: Dict[Tuple[str, Tuple[str, ...]], str] = {}
        for kind, (table, key_columns) in _TABLES.items():
            keys = [list(key) for k, key, _entity, _clock in items if k == kind]
            if not keys:
                continue
            n = len(key_columns)
            picks = ", ".join(f"json_extract(value, '$[{i}]')" for i in range(n))
            for row in conn.execute(
                    f"SELECT {', '.join(key_columns)}, vector_clock FROM {table} WHERE user_id = ? AND "
                    f"({', '.join(key_columns)}) IN (SELECT {picks} FROM json_each(?))",
                    (user_id, _stored_json(keys))):
                known[(kind, tuple(row[:n]))] = row[n]
        return known

    def changes_after(self, user_id: str, device_id: str, after: int, limit: int,
                      namespaces: Optional[List[str]], exclude_own: Optional[Tuple[int, int]],
                      now: str, page: Callable[[List[PulledRow], bool, int], Tuple[List[PulledRow], bool, int]],
                      peek: bool = False) -> Tuple[List[PulledRow], bool, int, int]:
        """Up to ``limit`` rows with a server seq above ``after``, in seq order, in ONE transaction
        that also registers the device and saves the cursor it is handed.

        ``exclude_own`` (first, last) leaves out the rows this device itself wrote at those seqs
        (it holds them already, exactly as stored). ``page(rows, has_more, top_seq)`` (the app's
        paging rule) returns (rows to send, has_more, next cursor). Returns (rows, has_more,
        next cursor, the last seq handed out so far). ``peek`` reads only: the device is not
        registered or touched."""
        conn = self._conn()
        own_sql, own_args = "", []
        if exclude_own is not None:
            own_sql = " AND NOT (seq BETWEEN ? AND ? AND last_modified_by = ?)"
            own_args = [exclude_own[0], exclude_own[1], device_id]
        rows: List[PulledRow] = []
        # One transaction: one snapshot across the three tables, and the device's cursor saved
        # with the very rows it describes. A peek takes no write lock.
        with _Tx(conn, immediate=not peek):
            if not peek:
                self._claim_device(conn, user_id, device_id, now)
            for kind, (table, _key) in _TABLES.items():
                ns_sql, ns_args = _namespace_filter(kind, namespaces)
                rows += [(r[0], kind, r[1]) for r in conn.execute(
                    f"SELECT seq, body FROM {table} WHERE user_id = ? AND seq > ?{ns_sql}{own_sql} "
                    f"ORDER BY seq LIMIT ?", [user_id, after] + ns_args + own_args + [limit + 1])]
            top_seq = self.top_seq()
            rows.sort()
            rows, has_more, next_cursor = page(rows[:limit], len(rows) > limit, top_seq)
            if not peek:
                conn.execute("UPDATE devices SET served_seq = ?, sync_cursor = ? WHERE device_id = ? AND user_id = ?",
                             (next_cursor, now, device_id, user_id))
        return rows, has_more, next_cursor, top_seq

    def changes_since(self, user_id: str, device_id: str, since: Optional[str], limit: int, offset: int,
                      namespaces: Optional[List[str]], now: str,
                      peek: bool = False) -> Tuple[Dict[str, List[str]], bool, int, str]:
        """The anchor's paging: each kind's rows received after ``since``, ``limit`` from ``offset``.

        Filters on the server's receive time, never on client clocks. Taken under the write
        lock, so the returned timestamp and the snapshot agree: every later push stamps
        received_at after it, and 1 µs of slack means an equal stamp is re-sent, never skipped
        (protocol.md §8 bugs b-d). Returns (kind -> stored bodies, has_more, top seq, timestamp).
        ``peek`` reads only: the device is not registered or touched.
        """
        conn = self._conn()
        lists: Dict[str, List[str]] = {}
        has_more, top = False, 0
        with _Tx(conn, immediate=True):
            if not peek:
                self._claim_device(conn, user_id, device_id, now)
            timestamp = format_ts(datetime.now(timezone.utc) - timedelta(microseconds=1))
            for kind, (table, _key) in _TABLES.items():
                ns_sql, ns_args = _namespace_filter(kind, namespaces)
                since_sql = " AND received_at > ?" if since else ""
                page = conn.execute(
                    f"SELECT seq, body FROM {table} WHERE user_id = ?{since_sql}{ns_sql} "
                    f"ORDER BY seq LIMIT ? OFFSET ?",
                    [user_id] + ([since] if since else []) + ns_args + [limit + 1, offset]).fetchall()
                has_more = has_more or len(page) > limit
                lists[kind] = [r[1] for r in page[:limit]]
                top = max([top] + [r[0] for r in page[:limit]])
            if not peek:
                conn.execute("UPDATE devices SET served_seq = max(coalesce(served_seq, 0), ?), "
                             "sync_cursor = ? WHERE user_id = ? AND device_id = ?",
                             (top, timestamp, user_id, device_id))
        return lists, has_more, top, timestamp

    def manifest_rows(self, user_id: str, namespaces: Optional[List[str]]) -> Dict[str, List[dict]]:
        """Every row of this user (``id``, ``content_hash``, ``deleted_at``, ``vector_clock``,
        ``body``) by kind, in seq order, from one snapshot."""
        conn = self._conn()
        out: Dict[str, List[dict]] = {}
        with _Tx(conn, immediate=False):
            for kind, (table, _key) in _TABLES.items():
                ns_sql, ns_args = _namespace_filter(kind, namespaces)
                out[kind] = [dict(r) for r in conn.execute(
                    f"SELECT id, content_hash, deleted_at, vector_clock, body FROM {table} WHERE user_id = ?{ns_sql} "
                    f"ORDER BY seq", [user_id] + ns_args)]
        return out


def open_storage(data: Union[str, Path]) -> SQLiteStorage:
    """The storage for ``data``: a data directory (its ``server.db``) or a ``sqlite:///path`` URL.

    ``sqlite:///rel/server.db`` is relative to the working directory, ``sqlite:////abs/server.db``
    absolute (the usual SQLAlchemy form)."""
    text = str(data)
    if text.startswith("sqlite:///"):
        path = Path(text[len("sqlite:///"):])
        if not path.name:
            raise UsageError(f"{text}: name the database file, e.g. sqlite:////srv/contextfs/server.db")
        return SQLiteStorage(path)
    if re.match(r"^[a-z][a-z0-9+.-]*://", text):
        raise UsageError(f"{text.split('://')[0]}:// storage is not supported; "
                         f"give a data directory or a sqlite:/// URL")
    return SQLiteStorage(Path(text).expanduser() / DB_NAME)


# ---- 4. the WSGI app ---------------------------------------------------------------------
# create_app(data) is the whole server as a WSGI callable: routing, body limits, JSON
# validation, authentication, per-user isolation (the user always comes from the API key,
# never from the body) and the clock rule. Hosts only carry bytes.

def _key_hash(key: str) -> str:
    import hashlib

    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def _hash_password(password: str, salt_hex: Optional[str] = None) -> Tuple[str, str]:
    """(scrypt hash hex, salt hex) with n=2**14, r=8, p=1."""
    import hashlib
    import secrets

    salt = bytes.fromhex(salt_hex) if salt_hex else secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8", "surrogatepass"), salt=salt, **_SCRYPT_PARAMS)
    return digest.hex(), salt.hex()


def _new_key(user_id: str, name: str) -> Tuple[str, dict]:
    """A new API key and the record storage keeps of it (only its SHA-256 and a short prefix)."""
    import secrets
    import uuid

    key = "ctxfs_" + secrets.token_urlsafe(32)
    return key, {"id": str(uuid.uuid4()), "user_id": user_id, "name": name, "key_hash": _key_hash(key),
                 "key_prefix": key[6:14], "created_at": utc_now()}


def _normalize_email(email: str) -> str:
    email = (email or "").strip().lower()
    if not re.fullmatch(r"[^@\s\x00]+@[^@\s\x00]+", email):
        raise UsageError(f"Invalid email {email!r}: give an address like alice@example.com")
    return email


def add_user(data: Union[str, Path], email: str, password: Optional[str] = None,
             name: Optional[str] = None) -> str:
    """Create a user on the server at ``data`` and return its first API key (shown once)."""
    import secrets
    import uuid

    email = _normalize_email(email)
    if password is not None and password == "":
        raise UsageError("The password is empty; give a non-empty password (or none: API keys only)")
    storage = open_storage(data)
    pw_hash, pw_salt = _hash_password(password) if password is not None else (None, None)
    user_id = str(uuid.uuid4())
    key, record = _new_key(user_id, "Initial Key")
    storage.create_user({"id": user_id, "email": email, "name": name, "password_hash": pw_hash,
                         "password_salt": pw_salt, "e2ee_salt": secrets.token_urlsafe(32),
                         "created_at": utc_now()}, record)
    return key


def push_verdict(kind: str, entity: dict, clock: Clock, stored_clock: Optional[Clock],
                 stored_body: Callable[[], dict], force: bool = False) -> Tuple[str, Clock, Optional[dict]]:
    """The server's clock rule for one pushed item: (verdict, clock stored or kept, conflict).

    New: accepted as sent (no server tick on insert, protocol.md gap 15). Dominated by the
    stored clock: rejected. Concurrent: a conflict, reported with both sides; so are equal
    clocks with other data (protocol.md §6 b: a rolled-back device re-issuing a clock for
    another text). Otherwise (newer, equal with the same data, or ``force``): accepted with the
    two clocks merged. Every stored clock is pruned to CLOCK_KEEP entries (prune_clock).
    """
    if stored_clock is None:
        return "accepted", prune_clock(clock), None
    order = clock_compare(stored_clock, clock)
    if order == "after" and not force:
        return "rejected", stored_clock, None
    if order == "equal" and not force and not _same_data(kind, entity, stored_body()):
        order = "concurrent"
    if order == "concurrent" and not force:
        server_obj = stored_body()
        field_name = {"memory": "content", "session": "summary"}.get(kind)
        return "conflict", stored_clock, {
            "entity_id": entity["id"], "entity_type": kind, "client_clock": clock,
            "server_clock": stored_clock,
            "client_content": entity.get(field_name) if field_name else None,
            "server_content": server_obj.get(field_name) if field_name else None,
            "client_updated_at": entity.get("updated_at"),
            "server_updated_at": server_obj.get("updated_at")}
    return "accepted", prune_clock(clock_merge(clock, stored_clock)), None


def _same_data(kind: str, entity: dict, stored: dict) -> bool:
    """Whether a pushed item carries what is stored (clocks and timestamps aside)."""
    if bool(entity.get("deleted_at")) != bool(stored.get("deleted_at")):
        return False
    if entity.get("deleted_at"):
        return True
    if kind == "memory":
        return entity.get("content_hash") == stored.get("content_hash")
    if kind == "session":
        return (entity.get("summary"), entity.get("label")) == (stored.get("summary"), stored.get("label"))
    return entity.get("weight") == stored.get("weight")


class _LoginLimiter:
    """Slows password guessing: more than N failures per email or client IP in a window → 429."""

    def __init__(self, max_failures: int = LOGIN_MAX_FAILURES, window: float = LOGIN_WINDOW_SECONDS):
        self.max_failures = max_failures
        self.window = window
        self._lock = threading.Lock()
        self._failures: Dict[str, List[float]] = {}

    def attempt(self, keys: List[str]) -> float:
        """Reserve an attempt (counted as a failure until :meth:`succeeded`) or raise 429."""
        import math

        now = time.monotonic()
        with self._lock:
            if len(self._failures) > 10_000:  # keep memory bounded under a spray of emails
                self._failures = {k: v for k, v in self._failures.items() if v and v[-1] > now - self.window}
            wait = 0.0
            for key in keys:
                recent = [t for t in self._failures.get(key, []) if t > now - self.window]
                self._failures[key] = recent
                if len(recent) >= self.max_failures:
                    wait = max(wait, recent[0] + self.window - now)
            if wait > 0:
                raise _HTTPError(429, "Too many login attempts; retry later",
                                 {"Retry-After": str(max(1, math.ceil(wait)))})
            for key in keys:
                self._failures[key].append(now)
            return now

    def succeeded(self, keys: List[str], token: float) -> None:
        """Forget the reserved attempt: a successful login is not a failure."""
        with self._lock:
            for key in keys:
                failures = self._failures.get(key, [])
                if token in failures:
                    failures.remove(token)




_Endpoint = Tuple[Callable[..., Any], bool, bool]  # (handler, needs auth, has JSON body)


class ServerApp:
    """The reference server as a WSGI application over one storage backend."""

    def __init__(self, storage: SQLiteStorage, max_body: int = MAX_BODY):
        self.storage = storage
        self.max_body = max_body
        self.limiter = _LoginLimiter()
        # path -> method -> (handler, needs auth, has JSON body)
        self.routes: Dict[str, Dict[str, _Endpoint]] = {
            "/health": {"GET": (self.health, False, False)},
            "/api/auth/login": {"POST": (self.login, False, True)},
            "/api/auth/me": {"GET": (self.me, True, False)},
            "/api/auth/encryption-salt": {"GET": (self.encryption_salt, True, False)},
            "/api/auth/api-keys": {"GET": (self.list_keys, True, False), "POST": (self.create_key, True, True)},
            "/api/auth/api-keys/revoke": {"POST": (self.revoke_key, True, True)},
            "/api/auth/api-keys/{key_id}": {"DELETE": (self.delete_key, True, False)},
            "/api/billing/subscription": {"GET": (self.subscription, True, False)},
            "/api/sync/register": {"POST": (self.register, True, True)},
            "/api/sync/push": {"POST": (self.push, True, True)},
            "/api/sync/pull": {"POST": (self.pull, True, True)},
            "/api/sync/diff": {"POST": (self.diff, True, True)},
            "/api/sync/status": {"POST": (self.status, True, True)},
        }

    # -- WSGI ------------------------------------------------------------------------------

    def __call__(self, environ: Dict[str, Any], start_response: Callable[..., Any]) -> List[bytes]:
        """The WSGI entry point: every answer is JSON, errors included (``{"detail": …}``)."""
        from http import HTTPStatus

        status, payload, headers = self.respond(environ)
        data = (payload.text if isinstance(payload, _RawJSON) else _json_text(payload)).encode("utf-8")
        start_response(f"{status} {HTTPStatus(status).phrase}",
                       [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
                       + list(headers.items()))
        return [data]

    def respond(self, environ: Dict[str, Any]) -> Tuple[int, Any, Dict[str, str]]:
        """(status, JSON payload, extra headers) for one request; never raises."""
        try:
            endpoint = self.route(environ.get("REQUEST_METHOD", "GET"), environ.get("PATH_INFO") or "/")
            raw = self.read_body(environ) if endpoint[2] else None
            return 200, self.call(endpoint, raw, environ), {}
        except _HTTPError as exc:
            return exc.status, {"detail": exc.detail}, exc.headers
        except Exception as exc:  # never a traceback to the client; the operator sees it
            if self.storage.is_busy(exc):
                return 503, {"detail": "Server busy; retry"}, {"Retry-After": "1"}
            import traceback

            traceback.print_exc(file=environ.get("wsgi.errors") or sys.stderr)
            return 500, {"detail": "Internal Server Error"}, {}

    def route(self, method: str, path: str) -> _Endpoint:
        """The endpoint for a request, or raise 404/405."""
        methods, key_id = self.routes.get(path), None
        if methods is None:
            match = re.fullmatch(r"/api/auth/api-keys/([A-Za-z0-9_.-]{1,100})", path)
            if match is not None:
                methods, key_id = self.routes["/api/auth/api-keys/{key_id}"], match.group(1)
        if methods is None:
            raise _HTTPError(404, "Not Found")
        if method not in methods:
            raise _HTTPError(405, "Method Not Allowed", {"Allow": ", ".join(sorted(methods))})
        handler, needs_auth, has_body = methods[method]
        if key_id is not None:
            import functools

            handler = functools.partial(handler, key_id=key_id)
        return handler, needs_auth, has_body

    def read_body(self, environ: Dict[str, Any]) -> bytes:
        """The request body: a Content-Length is required and at most ``max_body`` is read."""
        if environ.get("HTTP_TRANSFER_ENCODING"):
            raise _HTTPError(411, "Length Required")  # chunked bodies are not supported
        length = environ.get("CONTENT_LENGTH")
        if length is None or length == "":
            raise _HTTPError(411, "Length Required")
        if not re.fullmatch(r"\s*\d{1,15}\s*", length):
            raise _HTTPError(400, "Invalid Content-Length")
        size = int(length)
        if size > self.max_body:
            raise _HTTPError(413, "Request body too large")  # not read: the host closes the connection
        data = environ["wsgi.input"].read(size) if size else b""
        if len(data) < size:
            raise _HTTPError(400, "Incomplete request body")
        return data

    def call(self, endpoint: _Endpoint, raw: Optional[bytes], environ: Dict[str, Any]) -> Any:
        """Run an endpoint in the anchor's check order: JSON syntax, then auth, then schema."""
        handler, needs_auth, has_body = endpoint
        body = decode_json_body(raw or b"") if has_body else None
        user = self.authenticate(environ.get("HTTP_X_API_KEY")) if needs_auth else None
        if has_body and not isinstance(body, dict):
            raise _HTTPError(422, [{"type": "model_attributes_type", "loc": ["body"],
                                    "msg": "Input should be a valid dictionary or object to extract fields from"}])
        return handler(user, body, environ.get("REMOTE_ADDR") or "")

    def authenticate(self, key: Optional[str]) -> dict:
        """The user owning an active API key, or raise 401."""
        import hmac

        key = (key or "").strip()
        if not key.startswith("ctxfs_") or len(key) > 256:
            raise _unauthorized()
        digest = _key_hash(key)
        user = self.storage.user_for_key(digest)
        if user is None or not hmac.compare_digest(user["key_hash"], digest):
            raise _unauthorized()
        now = datetime.now(timezone.utc)
        last = parse_ts(user["last_used_at"]) if user["last_used_at"] else None
        if last is None or (now - last).total_seconds() >= _KEY_USED_GRANULARITY_S:
            self.storage.touch_key(user["key_id"], format_ts(now))
        return user

    # -- auth and misc endpoints -----------------------------------------------------------

    def health(self, user: Any, body: Any, ip: str) -> dict:
        """GET /health"""
        return {"status": "healthy", "service": "contextfs-sync", "timestamp": utc_now()}

    def login(self, user: Any, body: dict, ip: str) -> dict:
        """POST /api/auth/login: email + password → a new API key (rate limited)."""
        import hmac

        schema = _Schema()
        email = schema.field(body, "email", ("body",), "str", required=True)
        password = schema.field(body, "password", ("body",), "str", required=True)
        for name, value in (("email", email), ("password", password)):
            if value is not None and len(value) > MAX_CREDENTIAL_CHARS:
                schema.add("string_too_long", ("body", name),
                           f"String should have at most {MAX_CREDENTIAL_CHARS} characters")
        session_type = schema.field(body, "session_type", ("body",), "str", default="Web Session")
        schema.raise_if_any()
        email = email.strip().lower()
        keys = [f"email:{email}", f"ip:{ip}"]
        token = self.limiter.attempt(keys)
        row = self.storage.user_by_email(email)
        if row is not None and row["password_hash"]:
            ok = hmac.compare_digest(_hash_password(password, row["password_salt"])[0], row["password_hash"])
        else:
            _hash_password(password, "00" * 16)  # same cost whether or not the user exists
            ok = False
        if not ok:
            raise _HTTPError(401, "Invalid email or password")
        self.limiter.succeeded(keys, token)
        key, record = _new_key(row["id"], session_type[:100] or "Web Session")
        self.storage.add_key(record)
        return {"user": {"id": row["id"], "email": row["email"], "name": row["name"], "emailVerified": True,
                         "createdAt": None, "is_admin": False},
                "apiKey": key, "encryptionKey": None}

    def me(self, user: dict, body: Any, ip: str) -> dict:
        """GET /api/auth/me"""
        return {"id": user["id"], "email": user["email"], "name": user["name"], "provider": "password",
                "is_admin": False}

    def encryption_salt(self, user: dict, body: Any, ip: str) -> dict:
        """GET /api/auth/encryption-salt: none, as on ContextFS Cloud without E2EE. A salt here
        turns the public client's automatic encryption on (with a key derived from each API
        key, which other devices cannot share); our clients salt their passphrase key with
        the account id instead (protocol.md §9)."""
        raise _HTTPError(404, "No encryption salt configured for this API key")

    # Keys made by logging in are the sessions' own; the key list leaves them out (protocol.md §5.4).
    _SESSION_KEY_NAMES = ("Login Session", "OAuth Session", "Web Session", "CLI Session")

    def list_keys(self, user: dict, body: Any, ip: str) -> dict:
        """GET /api/auth/api-keys: this user's keys, masked (a prefix, never the key)."""
        return {"keys": [dict(k, is_active=bool(k["is_active"]))
                         for k in self.storage.list_keys(user["id"], self._SESSION_KEY_NAMES)]}

    def create_key(self, user: dict, body: dict, ip: str) -> dict:
        """POST /api/auth/api-keys {name, with_encryption}: a new key for this user, shown once.

        No encryption key comes with it (see encryption_salt); the returned id is the stored
        key's, so it can be revoked (the anchor returns another: protocol.md gap 22)."""
        schema = _Schema()
        name = schema.field(body, "name", ("body",), "str", required=True, nullable=False)
        schema.field(body, "with_encryption", ("body",), "bool", default=True)
        schema.raise_if_any()
        key, record = _new_key(user["id"], str(name).strip()[:100] or "API key")
        self.storage.add_key(record)
        snippet = f"cloud:\n  enabled: true\n  api_key: {key}\n  server_url: <this server's URL>\n"
        return {"id": record["id"], "name": record["name"], "api_key": key, "encryption_key": None,
                "key_prefix": record["key_prefix"], "config_snippet": snippet}

    def _end_key(self, user: dict, key_id: str, delete: bool) -> dict:
        word = "delete" if delete else "revoke"
        if key_id == user["key_id"]:
            raise _HTTPError(400, f"Cannot {word} the API key currently in use")
        if not self.storage.end_key(user["id"], key_id, delete):
            raise _HTTPError(404, "API key not found")  # another user's key is "not found" too
        return {"status": "deleted" if delete else "revoked"}

    def revoke_key(self, user: dict, body: dict, ip: str) -> dict:
        """POST /api/auth/api-keys/revoke {key_id}: the key stops working."""
        schema = _Schema()
        key_id = schema.field(body, "key_id", ("body",), "str", required=True, nullable=False)
        schema.raise_if_any()
        return self._end_key(user, str(key_id), delete=False)

    def delete_key(self, user: dict, body: Any, ip: str, key_id: str = "") -> dict:
        """DELETE /api/auth/api-keys/{key_id}: the key is removed."""
        return self._end_key(user, key_id, delete=True)

    def subscription(self, user: dict, body: Any, ip: str) -> dict:
        """GET /api/billing/subscription: a self-hosted server has no limits."""
        return {"tier": "self-hosted", "status": "active", "device_limit": -1, "memory_limit": -1,
                "current_period_end": None}

    # -- sync endpoints --------------------------------------------------------------------

    def register(self, user: dict, body: dict, ip: str) -> dict:
        """POST /api/sync/register → DeviceInfo. A device id is never reassigned to another user."""
        schema = _Schema()
        device_id = schema.ident(body, "device_id", ("body",))
        fields = {k: schema.field(body, k, ("body",), "str", required=True)
                  for k in ("device_name", "platform", "client_version")}
        schema.raise_if_any()
        row = self.storage.register_device(user["id"], device_id, fields["device_name"], fields["platform"],
                                           fields["client_version"], utc_now())
        return {k: row[k] for k in ("device_id", "device_name", "platform", "client_version", "registered_at",
                                    "last_sync_at", "sync_cursor")}

    def push(self, user: dict, body: dict, ip: str) -> dict:
        """POST /api/sync/push: apply items by the clock rule, all in one transaction."""
        server_timestamp = utc_now()
        schema = _Schema()
        device_id = schema.ident(body, "device_id", ("body",))
        force = schema.field(body, "force", ("body",), "bool", default=False)
        schema.timestamp(body, "last_sync_timestamp", ("body",))  # ignored, but typed like the anchor's
        schema.field(body, "backend_type", ("body",), "str")
        items: List[PushItem] = []
        for kind, plural in WIRE_LISTS.items():
            entries = schema.field(body, plural, ("body",), "list", nullable=False, default=[])
            for i, obj in enumerate(entries or []):
                if not _check_entity(schema, kind, obj, ("body", plural, i)):
                    continue
                try:
                    items.append((kind,) + _stored_entity(kind, obj))
                except ValueError as exc:
                    schema.add("value_error", ("body", plural, i), f"Value error, {exc}")
        schema.raise_if_any()  # nothing is written unless the whole request is valid

        def rule(*args: Any) -> Tuple[str, Clock, Optional[dict]]:
            return push_verdict(*args, force=bool(force))

        try:
            outcomes, seq_range = self.storage.push(user["id"], device_id, items, rule, server_timestamp,
                                                    refuse_if_encrypted=body.get("refuse_if_encrypted") is True)
        except AccountEncrypted:
            # Our extension: a client without a passphrase never puts plain text into an account
            # another device encrypts (issue 27). Other clients do not ask, and are not refused.
            raise _HTTPError(409, {"code": "e2ee_required", "message": "This account's memories are end-to-end "
                                   "encrypted; this device has no passphrase, so nothing was stored"}) from None
        counts = {"accepted": 0, "rejected": 0, "accepted_memories": 0, "rejected_memories": 0,
                  "accepted_sessions": 0, "rejected_sessions": 0}
        conflicts: List[dict] = []
        results: List[dict] = []
        for (kind, _key, entity, _clock), (verdict, stored, conflict) in zip(items, outcomes):
            if verdict == "conflict":
                conflicts.append(conflict)
            else:
                counts[verdict] += 1
                if kind != "edge":
                    counts[f"{verdict}_{WIRE_LISTS[kind]}"] += 1
            results.append({"entity_type": kind, "id": entity["id"], "status": verdict, "vector_clock": stored})
        status = "conflict" if conflicts else ("partial" if counts["rejected"] else "success")
        # seq_range (our extension): the server seqs this request's accepted rows were stored at.
        return dict(success=not conflicts, status=status, **counts, conflicts=conflicts,
                    server_timestamp=server_timestamp, message=None, pushed_items=[], results=results,
                    seq_range=list(seq_range) if seq_range else None)

    def pull(self, user: dict, body: dict, ip: str) -> Any:
        """POST /api/sync/pull: by server sequence (``cursor``) or, for anchor clients, by time."""
        server_timestamp = utc_now()
        schema = _Schema()
        device_id = schema.ident(body, "device_id", ("body",))
        since = schema.timestamp(body, "since_timestamp", ("body",))
        limit = schema.field(body, "limit", ("body",), "int", default=1000)
        offset = schema.field(body, "offset", ("body",), "int", default=0)
        namespaces = schema.str_list(body, "namespace_ids", ("body",))
        # peek (our extension, for `cloud sync --dry-run`): read only, no device state moves.
        peek = bool(schema.field(body, "peek", ("body",), "bool", default=False))
        cursor_mode = "cursor" in body  # our extension; anchor clients never send the key
        after = 0
        if body.get("cursor") is not None:
            raw_cursor = body["cursor"]
            text = str(raw_cursor) if isinstance(raw_cursor, (str, int)) and not isinstance(raw_cursor, bool) else ""
            if re.fullmatch(r"\d{1,18}", text):
                after = int(text)
            else:
                schema.add("value_error", ("body", "cursor"), "Value error, not a cursor returned by this server")
        own = body.get("exclude_own_seqs")  # our extension: see CloudClient.pull
        if own is not None and not (isinstance(own, list) and len(own) == 2 and all(
                isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2 ** 62 for x in own)):
            schema.add("value_error", ("body", "exclude_own_seqs"), "Value error, expected [first_seq, last_seq]")
            own = None
        schema.raise_if_any()
        limit = min(max(limit, 1), PULL_LIMIT_MAX)
        offset = min(max(offset, 0), 2 ** 62)
        if cursor_mode:
            return self._pull_after_cursor(user["id"], device_id, after, limit, namespaces,
                                           tuple(own) if own is not None else None, server_timestamp, peek)

        bodies, has_more, top, server_timestamp = self.storage.changes_since(
            user["id"], device_id, since, limit, offset, namespaces, server_timestamp, peek=peek)
        lists = {kind: [_wire_row(kind, text) for text in bodies[kind]] for kind in WIRE_LISTS}
        # Each list is paged on its own, so the next offset is the longest list's length
        # (the anchor's sum of lengths skips rows: protocol.md §8 bug a).
        next_offset = offset + max(len(v) for v in lists.values()) if has_more else 0
        return {"success": True, "memories": lists["memory"], "sessions": lists["session"],
                "edges": lists["edge"], "server_timestamp": server_timestamp, "has_more": has_more,
                "next_cursor": str(top), "next_offset": next_offset}

    def _pull_after_cursor(self, user_id: str, device_id: str, after: int, limit: int,
                           namespaces: Optional[List[str]], own: Optional[Tuple[int, int]],
                           server_timestamp: str, peek: bool = False) -> _RawJSON:
        """Cursor-mode pull: the rows after a server seq, as one JSON text."""
        max_body = self.max_body

        def page(rows: List[PulledRow], has_more: bool, top_seq: int) -> Tuple[List[PulledRow], bool, int]:
            # A page also stops at max_body bytes of rows (at least one row), so a client that
            # can push a batch can pull it back and a page never grows without bound.
            size = 0
            for n, (_seq, _kind, body_json) in enumerate(rows):
                size += len(body_json)
                if n and size > max_body:
                    rows, has_more = rows[:n], True
                    break
            next_cursor = rows[-1][0] if rows else after
            if own is not None and not has_more and not namespaces:
                # Everything up to the excluded range's end was sent or left out on purpose: move
                # past it (never past the last seq handed out), or the next sync would fetch it.
                next_cursor = max(next_cursor, min(own[1], top_seq))
            return rows, has_more, next_cursor

        rows, has_more, next_cursor, top_seq = self.storage.changes_after(
            user_id, device_id, after, limit, namespaces, own, server_timestamp, page, peek=peek)
        # The stored rows are spliced into the answer as they are (no decode, no re-encode):
        # the bytes are the same as encoding _wire_row() of each.
        pieces: Dict[str, List[str]] = {kind: [] for kind in WIRE_LISTS}
        for _seq, kind, body_json in rows:
            pieces[kind].append(_wire_row_json(kind, body_json))
        return _raw_json_object(
            [("success", True)]
            + [(plural, _RawJSON("[" + ",".join(pieces[kind]) + "]")) for kind, plural in WIRE_LISTS.items()]
            + [("server_timestamp", server_timestamp), ("has_more", has_more),
               ("next_cursor", str(next_cursor)), ("next_offset", 0),
               # Our extension (protocol.md §6 e): a client whose cursor is past top_seq, or that
               # sees another storage_id, knows this server went back and re-uploads what it lacks.
               ("storage_id", self.storage.storage_id()), ("top_seq", top_seq)])

    def diff(self, user: dict, body: dict, ip: str) -> dict:
        """POST /api/sync/diff: compare a client manifest with this user's rows.

        A manifest memory with ``deleted_at`` deletes the server's row (the anchor's rule 2:
        the public client sends its deletes no other way) only when its ``content_hash`` is
        the one stored: the device deleted the version the server holds, so the tombstone is
        causally after it and goes in through the push clock rule (ticked for the device). A
        stale device whose copy predates a newer edit deletes nothing: the edit wins, as in a
        delete-against-edit conflict.
        """
        server_timestamp = utc_now()
        schema = _Schema()
        device_id = schema.ident(body, "device_id", ("body",))
        namespaces = schema.str_list(body, "namespace_ids", ("body",))
        manifests: Dict[str, Dict[str, dict]] = {}
        for kind, plural in WIRE_LISTS.items():
            manifests[kind] = {}
            entries = schema.field(body, plural, ("body",), "list", nullable=False, default=[])
            for i, entry in enumerate(entries or []):
                loc = ("body", plural, i)
                if not schema.obj(entry, loc):
                    continue
                entry_id = schema.ident(entry, "id", loc)
                content = schema.field(entry, "content_hash", loc, "str")
                schema.timestamp(entry, "updated_at", loc)
                deleted = schema.timestamp(entry, "deleted_at", loc)
                if entry_id is not None:
                    manifests[kind][entry_id] = {"content_hash": content, "deleted_at": deleted}
        schema.raise_if_any()

        out: Dict[str, Any] = {"success": True}
        totals = {"total_missing": 0, "total_updated": 0, "total_deleted": 0, "total_server_missing": 0}
        stored = self.storage.manifest_rows(user["id"], namespaces)
        # A row deleted here was live at the hash the manifest has: the loop below reports
        # nothing for it either way (the anchor reports nothing for its rule 2 either).
        self._apply_manifest_deletes(user["id"], device_id, manifests["memory"], stored["memory"], server_timestamp)
        for kind, plural in WIRE_LISTS.items():
            manifest = manifests[kind]
            missing: List[dict] = []
            deleted: List[str] = []
            known = set()
            for row in stored[kind]:
                known.add(row["id"])
                entry = manifest.get(row["id"])
                if row["deleted_at"]:
                    if entry is not None:
                        deleted.append(row["id"])  # rule 1
                elif entry is None:
                    missing.append(_wire_row(kind, row["body"]))  # rule 3
                elif kind == "memory" and entry["content_hash"] is None:
                    missing.append(_wire_row(kind, row["body"]))  # rule 3 (no hash)
                elif kind == "memory" and entry["content_hash"] != row["content_hash"]:
                    missing.append(_wire_row(kind, row["body"]))  # rule 4
                    totals["total_updated"] += 1
            server_missing = [i for i, e in manifest.items() if i not in known and not e["deleted_at"]]
            out[f"missing_{plural}"] = missing
            out[f"deleted_{kind}_ids"] = deleted
            out[f"server_missing_{kind}_ids"] = server_missing  # rule 5
            totals["total_missing"] += len(missing)
            totals["total_deleted"] += len(deleted)
            totals["total_server_missing"] += len(server_missing)
        out.update(totals, server_timestamp=server_timestamp, has_more=False, next_offset=0)
        return out

    def _apply_manifest_deletes(self, user_id: str, device_id: str, manifest: Dict[str, dict],
                                rows: List[dict], now: str) -> None:
        """Tombstone the live memories a manifest lists as deleted at the stored hash."""
        items: List[PushItem] = []
        for row in rows:
            entry = manifest.get(row["id"])
            if (entry is None or not entry["deleted_at"] or row["deleted_at"]
                    or not entry["content_hash"] or entry["content_hash"] != row["content_hash"]):
                continue
            obj = json.loads(row["body"])
            obj.update(deleted_at=entry["deleted_at"], updated_at=now,
                       vector_clock=clock_tick(json.loads(row["vector_clock"] or "{}"), device_id))
            items.append(("memory",) + _stored_entity("memory", obj))
        if items:
            self.storage.push(user_id, device_id, items, push_verdict, now)

    def status(self, user: dict, body: dict, ip: str) -> dict:
        """POST /api/sync/status: this device's sync state and this user's row counts."""
        schema = _Schema()
        device_id = schema.ident(body, "device_id", ("body",))
        schema.raise_if_any()
        server_timestamp = utc_now()
        state = self.storage.device_status(user["id"], device_id)
        if state is None:
            raise _HTTPError(404, "Device not registered")
        return {"device_id": device_id, "last_sync_at": state["last_sync_at"], "pending_push_count": 0,
                "pending_pull_count": state["pending"], "server_timestamp": server_timestamp,
                "memory_count": state["memory"], "session_count": state["session"],
                "edge_count": state["edge"], "deleted_memory_count": state["deleted_memory"]}


def create_app(data: Union[str, Path], max_body: int = MAX_BODY) -> ServerApp:
    """The server as a WSGI application over ``data``: a data directory or a ``sqlite:///`` URL."""
    return ServerApp(open_storage(data), max_body=max_body)


# ---- 5. hosts ----------------------------------------------------------------------------
# `contextfs server run` hosts the app on the standard library: a threading HTTP/1.1 server
# with keep-alive, one thread (and one SQLite connection) per client connection. For more
# than one process, run the same app under gunicorn (README: "Hosting the server"):
#     gunicorn -w 4 -b 127.0.0.1:8766 'contextfs_server:create_app("/srv/contextfs")'

def _server_log_enabled() -> bool:
    return os.environ.get(ENV_SERVER_LOG, "") not in ("", "0")


class _BodyReader:
    """``wsgi.input`` for the stdlib host: reads at most the declared length, and counts it."""

    def __init__(self, rfile: Any, length: int):
        self.rfile = rfile
        self.left = length

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes of the body (all of what is left when ``size`` is negative)."""
        size = self.left if size is None or size < 0 else min(size, self.left)
        data = self.rfile.read(size) if size > 0 else b""
        self.left -= len(data)
        if len(data) < size:
            self.left = -1  # the client sent less than it declared: the connection is unusable
        return data


def _make_handler(app: ServerApp) -> type:
    """The request handler class, built here so that importing the module skips http.server."""
    import http.server
    from urllib.parse import unquote, urlsplit

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = f"contextfs-sync/{__version__}"
        sys_version = ""
        timeout = 60  # idle keep-alive connections and slow senders release their thread
        disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms ACK stall

        def version_string(self) -> str:
            return self.server_version

        def do_GET(self) -> None:
            length_header = (self.headers.get("Content-Length") or "").strip()
            chunked = bool(self.headers.get("Transfer-Encoding"))
            length = int(length_header) if re.fullmatch(r"\d{1,15}", length_header) else 0
            body = _BodyReader(self.rfile, length)
            answer: List[Any] = []

            def start_response(status: str, headers: List[Tuple[str, str]], exc_info: Any = None) -> Callable:
                answer[:] = [status, headers]
                return self.wfile.write

            data = b"".join(app(self._environ(body, urlsplit(self.path), unquote), start_response))
            if chunked or body.left != 0 or (length_header not in ("", "0") and length == 0):
                self.close_connection = True  # an unread body would corrupt the next request
            code, reason = answer[0].split(" ", 1)
            self._respond(int(code), reason, answer[1], data)
            if length > app.max_body:
                self._linger_close()

        do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = do_GET

        def _environ(self, body: _BodyReader, url: Any, unquote: Callable[..., str]) -> Dict[str, Any]:
            """The WSGI environ of this request (PEP 3333)."""
            host, port = self.server.server_address[:2]
            environ = {
                "REQUEST_METHOD": self.command, "SCRIPT_NAME": "", "QUERY_STRING": url.query,
                "PATH_INFO": unquote(url.path, "latin-1"), "SERVER_NAME": str(host), "SERVER_PORT": str(port),
                "SERVER_PROTOCOL": self.request_version, "REMOTE_ADDR": self.client_address[0],
                "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.input": body,
                "wsgi.errors": sys.stderr, "wsgi.multithread": True, "wsgi.multiprocess": False,
                "wsgi.run_once": False,
            }
            for name in self.headers.keys():
                key = name.upper().replace("-", "_")
                key = key if key in ("CONTENT_LENGTH", "CONTENT_TYPE") else "HTTP_" + key
                environ.setdefault(key, self.headers.get(name))  # the first of repeated headers
            return environ

        def _respond(self, code: int, reason: str, headers: List[Tuple[str, str]], data: bytes) -> None:
            try:
                self.send_response(code, reason)
                for name, value in headers:
                    self.send_header(name, value)
                if self.close_connection:
                    self.send_header("Connection", "close")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

        def _respond_json(self, code: int, detail: str) -> None:
            data = _json_text({"detail": detail}).encode("utf-8")
            self._respond(code, self.responses.get(code, ("Error",))[0],
                          [("Content-Type", "application/json"), ("Content-Length", str(len(data)))], data)

        def _linger_close(self) -> None:
            # Closing with unread data makes TCP send a reset that can destroy our 413 before the
            # client reads it: half-close, then discard a bounded amount for a short while.
            import socket

            self.close_connection = True
            deadline = time.monotonic() + 2.0
            budget = 4 * 1024 * 1024
            try:
                self.connection.shutdown(socket.SHUT_WR)
                self.connection.settimeout(0.5)
                while budget > 0 and time.monotonic() < deadline:
                    chunk = self.connection.recv(65536)
                    if not chunk:
                        break
                    budget -= len(chunk)
            except OSError:
                pass

        def handle_expect_100(self) -> bool:
            length = (self.headers.get("Content-Length") or "").strip()
            if length.isdigit() and int(length) > app.max_body:
                self.close_connection = True
                self._respond_json(413, "Request body too large")
                return False
            return super().handle_expect_100()

        def send_error(self, code: int, message: Optional[str] = None, explain: Optional[str] = None) -> None:
            # Errors raised by http.server itself (bad request line, huge headers): JSON too.
            self.close_connection = True
            self._respond_json(code, message or self.responses.get(code, ("Error",))[0])

        def log_message(self, format: str, *args: Any) -> None:
            if _server_log_enabled():
                sys.stderr.write(f"{self.address_string()} - [{self.log_date_time_string()}] {format % args}\n")

    return Handler


def make_server(data: Union[str, Path], host: str = "127.0.0.1", port: int = 0,
                max_body: int = MAX_BODY) -> Any:
    """The app on a stdlib threading server (``.server_address``, ``.serve_forever()``, ``.shutdown()``)."""
    import http.server
    import socket
    import socketserver

    app = create_app(data, max_body=max_body)

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        def server_bind(self) -> None:
            # HTTPServer.server_bind does a reverse DNS lookup (getfqdn); it can hang offline.
            socketserver.TCPServer.server_bind(self)
            self.server_name, self.server_port = host, self.server_address[1]

        def handle_error(self, request: Any, client_address: Any) -> None:
            kind = sys.exc_info()[0]
            if kind is not None and issubclass(kind, (ConnectionError, TimeoutError)):
                return  # a client went away: not worth a traceback
            super().handle_error(request, client_address)

    try:
        server = Server((host, port), _make_handler(app))
    except OSError as exc:
        raise ServerError(f"Cannot listen on {host}:{port}: {exc.strerror or exc}; "
                          f"is another server running there? Choose another --port") from None
    server.app = app
    return server
