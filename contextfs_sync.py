"""contextfs-sync: keep an AI agent's local memories in sync across devices.

One auditable module, used three ways: the ``contextfs`` CLI, a stdio MCP server
(``contextfs mcp``) and a library you can vendor by copying this file. It speaks the
ContextFS Cloud wire protocol. The self-hostable reference server is a module of its own,
contextfs_server.py, which this one imports only to run ``contextfs server …`` or the demo.

Read it top to bottom: each numbered section only uses the sections above it.
Nothing happens at import time: no I/O, no heavy imports (httpx, chromadb and
cryptography are imported lazily where they are needed).
"""

# ---- 1. imports, version, constants -----------------------------------------------------

from __future__ import annotations

import itertools
import json
import os
import re
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Container, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

__version__ = "0.1.0"

__all__ = [
    "__version__",
    # errors
    "ContextFSError", "UsageError", "ConfigError", "NotConfigured", "NotFound", "StoreError",
    "AuthError", "ServerError", "CryptoError", "MassDeleteError",
    # data model and pure sync logic
    "Memory", "Session", "Edge", "SearchHit",
    "clock_compare", "clock_merge", "clock_tick", "content_hash", "decide_incoming",
    "conflict_copy_id", "batches", "parse_ttl", "mask_key", "Op", "plan_push", "plan_page",
    # config and local store
    "Config", "load_config", "save_config", "contextfs_home", "device_id", "Store", "open_store",
    # search, crypto, client, sync
    "search_memories", "encrypt_content", "decrypt_content", "derive_passphrase_key",
    "CloudClient", "SyncEngine", "SyncReport", "cloud_sync", "cloud_status", "cloud_check", "cloud_rekey",
    "cloud_reset_e2ee",
    # semantic index, CLI
    "open_indexed_store", "index_status", "rebuild_index", "main",
]

DEFAULT_SERVER_URL = "https://api.contextfs.ai"
DEFAULT_SERVER_PORT = 8766
ENV_HOME = "CONTEXTFS_HOME"
ENV_API_KEY = "CONTEXTFS_API_KEY"
ENV_SERVER_URL = "CONTEXTFS_SERVER_URL"

# Exact user-facing messages from the seed contract (seed-sync-skill.md): word for word.
MSG_DISABLED = "Cloud sync is disabled. Run: contextfs cloud configure --enabled"
MSG_NO_KEY = "No API key configured. Run: contextfs cloud login"
MSG_E2EE_WRONG_KEY = ("This passphrase does not open this account's end-to-end encrypted memories "
                      "(its key check failed){}. Run: contextfs cloud configure --e2ee with the passphrase "
                      "your other devices use")
# The E2EE key check's reserved ids (section 8), which our server also knows (it refuses a plain
# push into an account holding one), and its own namespace: a diff of it alone is cheap.
E2EE_CHECK_PREFIX = "contextfs-e2ee-check-"
E2EE_CHECK_NAMESPACE = "contextfs-e2ee"

MSG_E2EE_NO_KEY = ("This account's memories are end-to-end encrypted and this device has no passphrase; "
                   "nothing was pushed (it would have gone up unencrypted). Run: contextfs cloud configure --e2ee")

# Suggested types: the values every ContextFS client understands (protocol.md §3.1: the public
# client's pull fails on a type outside its enum, so we suggest none outside it).
MEMORY_TYPES = ("fact", "decision", "procedural", "error", "code", "episodic", "user", "todo")
EMBEDDERS = ("default", "hash", "none")
DEFAULT_TTL_SECONDS = 24 * 3600
SQLITE_BUSY_TIMEOUT_MS = 10_000
MAX_ID_CHARS = 512          # ids, device ids, relations: the server refuses longer ones (422)

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOT_CONFIGURED = 0, 1, 2, 3
EXIT_PARTIAL = 4  # a sync that completed but left rows the server refused pending


# ---- 2. errors ---------------------------------------------------------------------------

class ContextFSError(Exception):
    """An expected failure: one line a user can act on, and the exit code for the CLI."""

    exit_code = EXIT_ERROR

    def __init__(self, message: str, exit_code: Optional[int] = None):
        super().__init__(message)
        self.message = message
        if exit_code is not None:
            self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message


class UsageError(ContextFSError):
    """Bad arguments (exit 2)."""

    exit_code = EXIT_USAGE


class ConfigError(ContextFSError):
    """config.toml is malformed or holds a value of the wrong type."""


class NotConfigured(ContextFSError):
    """Cloud sync is disabled, or no API key is configured (exit 3)."""

    exit_code = EXIT_NOT_CONFIGURED


class NotFound(ContextFSError):
    """An id that does not exist locally."""


class StoreError(ContextFSError):
    """The local SQLite store cannot be opened or written."""


class AuthError(ContextFSError):
    """The server refused our API key or credentials (exit 3: log in again)."""

    exit_code = EXIT_NOT_CONFIGURED


class ServerError(ContextFSError):
    """The server is down, unreachable, or answered with an error (``status`` 0 when it never answered)."""

    def __init__(self, message: str, exit_code: Optional[int] = None, status: int = 0, detail: str = ""):
        super().__init__(message, exit_code)
        self.status = status
        self.detail = detail


class CryptoError(ContextFSError):
    """End-to-end encryption failed (wrong passphrase, missing extra)."""


class SyncBusy(ContextFSError):
    """Another sync holds this home's sync lock (past the wait allowed)."""


class MassDeleteError(ContextFSError):
    """A sync would delete a large part of the store; it stops unless forced."""


# ---- 3. data model -----------------------------------------------------------------------

Clock = Dict[str, int]


def utc_now() -> str:
    """Current time as ISO-8601 UTC with microseconds and a ``Z`` suffix."""
    return format_ts(datetime.now(timezone.utc))


def format_ts(dt: datetime) -> str:
    """Format an aware datetime as ISO-8601 UTC with ``Z`` (the protocol's form)."""
    dt = dt.astimezone(timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_ts(value: Optional[str]) -> Optional[datetime]:
    """Parse ISO-8601 with ``Z``, an offset, or none (naive = UTC, per protocol.md §1)."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError(f"timestamp must be a string, got {type(value).__name__}")
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    dt = datetime.fromisoformat(text)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.astimezone(timezone.utc)


_CANONICAL_TS = re.compile(r"[1-9]\d{3}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")


def normalize_ts(value: Optional[str]) -> Optional[str]:
    """Return a timestamp in our canonical UTC ``Z`` form (None stays None)."""
    if isinstance(value, str) and len(value) == 27 and _CANONICAL_TS.fullmatch(value):
        # Already canonical (every synced row is): validate the date, skip the strftime.
        datetime.fromisoformat(value[:-1])
        return value
    dt = parse_ts(value)
    return format_ts(dt) if dt else None


def content_hash(content: str) -> str:
    """First 16 hex chars of SHA-256 over the UTF-8 plaintext (protocol.md §7)."""
    import hashlib

    return hashlib.sha256(content.encode("utf-8")).hexdigest()[:16]


def clock_compare(a: Clock, b: Clock) -> str:
    """Compare vector clocks: 'equal', 'before' (a < b), 'after' (a > b) or 'concurrent'."""
    a_less = b_less = False
    for key in set(a) | set(b):
        x, y = a.get(key, 0), b.get(key, 0)
        if x < y:
            a_less = True
        elif x > y:
            b_less = True
        if a_less and b_less:
            return "concurrent"
    if a_less:
        return "before"
    if b_less:
        return "after"
    return "equal"


def clock_merge(a: Clock, b: Clock) -> Clock:
    """Component-wise maximum of two clocks (zero entries dropped)."""
    merged = {k: max(a.get(k, 0), b.get(k, 0)) for k in set(a) | set(b)}
    return {k: v for k, v in sorted(merged.items()) if v > 0}


CLOCK_KEEP = 64              # entries a server keeps in a stored clock (prune_clock)
CLOCK_PRUNED = "~pruned"     # the entry that stands for the ones pruned (no device has this id)


def prune_clock(clock: Clock, keep: int = CLOCK_KEEP) -> Clock:
    """``clock`` cut to at most ``keep`` entries, for storing: the entries with the smallest
    counters (with time-based counters, the oldest writers) give way to one ``~pruned`` entry
    holding the largest counter dropped.

    The rule that makes this safe: a clock that does not carry ``~pruned`` can never be newer
    than a pruned one (it lacks that entry), so pruning can only turn "newer" into
    "concurrent" (a conflict copy), never let a stale version win or hide an edit. A device
    that has pulled the pruned clock carries the entry and moves on normally.
    """
    if len(clock) <= keep:
        return dict(clock)
    floor = clock.get(CLOCK_PRUNED, 0)
    ranked = sorted(((v, k) for k, v in clock.items() if k != CLOCK_PRUNED), reverse=True)
    kept, dropped = ranked[:keep - 1], ranked[keep - 1:]
    pruned = {k: v for v, k in kept}
    pruned[CLOCK_PRUNED] = max([floor] + [v for v, _k in dropped])
    return dict(sorted(pruned.items()))


def clock_tick(clock: Clock, device_id: str, now: Optional[float] = None) -> Clock:
    """A copy of ``clock`` with this device's entry set to ``max(previous + 2, Unix seconds)``.

    Syncthing's rule for version vectors: a counter that also tracks the wall clock never
    repeats, even when the store it lives in is rolled back (a home restored from a backup,
    a power cut that loses the end of the WAL). A rolled-back device would otherwise mint
    ``{D: 2}`` a second time for a different text, and every device that already holds the
    first ``{D: 2}`` would take the second for the version it has.

    The step is 2, not 1: ContextFS Cloud adds 1 to the pushing device's entry when it
    inserts a row (protocol.md gap 15) and does not say so, so a write made before that row's
    echo is pulled (within a second of the first push) would mint the server's value again,
    for another text; the server overwrites on equal clocks, and every other device would see
    equal clocks with different text. ``now`` is for tests.
    """
    ticked = dict(clock)
    seconds = int(time.time() if now is None else now)
    ticked[device_id] = max(ticked.get(device_id, 0) + 2, seconds)
    return ticked


def _json_obj(value: Any, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be an object")
    return value


def _clock(value: Any) -> Clock:
    clock = _json_obj(value, "vector_clock")
    for k, v in clock.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError("vector_clock values must be non-negative integers")
    return {k: v for k, v in clock.items() if v > 0}


# Wire fields we do not model as columns still round-trip: they live in ``extra``.
_MEMORY_WIRE_EXTRAS = ("repo_url", "repo_name", "relative_path", "source_tool", "project", "visibility")
_SESSION_WIRE_EXTRAS = ("namespace_id", "repo_url", "repo_name", "branch")
_EDGE_WIRE_EXTRAS = ("created_by",)


@dataclass
class Memory:
    """One memory: a fact, decision, procedure, error, … with its sync bookkeeping."""

    id: str
    content: str
    type: str = "fact"
    summary: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    namespace_id: str = "global"
    source_repo: Optional[str] = None
    source_file: Optional[str] = None
    session_id: Optional[str] = None
    metadata: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    created_at: str = ""
    updated_at: str = ""
    deleted_at: Optional[str] = None
    draft: bool = False
    expires_at: Optional[str] = None
    vector_clock: Clock = field(default_factory=dict)
    content_hash: str = ""
    conflict_of: Optional[str] = None
    encrypted: bool = False
    dirty: bool = False
    seq: int = 0
    sealed: bool = False   # the server holds it end-to-end encrypted (as far as this device knows); never sent
    last_modified_by: Optional[str] = None   # set by servers on pulled rows; never stored or sent

    @property
    def local_only(self) -> bool:
        """Drafts and temporary memories never leave the device (conflict copies do: backups)."""
        return self.draft or self.expires_at is not None

    def to_wire(self) -> dict:
        """The protocol's memory object (never an embedding; a tombstone carries no text)."""
        if self.deleted_at is not None:
            # A deleted memory (say, a pasted secret) must not upload what it said: only the
            # fields that identify it and order the delete travel.
            return {"id": self.id, "content": "", "type": self.type, "summary": None, "tags": [],
                    "namespace_id": self.namespace_id, "metadata": {}, "created_at": self.created_at,
                    "updated_at": self.updated_at, "deleted_at": self.deleted_at,
                    "vector_clock": self.vector_clock, "content_hash": content_hash(""),
                    "encrypted": False}
        metadata = self.metadata
        if self.conflict_of is not None and metadata.get("conflict_of") != self.conflict_of:
            metadata = dict(metadata, conflict_of=self.conflict_of)  # the mark other devices read
        wire = {
            "id": self.id, "content": self.content, "type": self.type, "summary": self.summary,
            "tags": list(self.tags), "namespace_id": self.namespace_id,
            "source_repo": self.source_repo, "source_file": self.source_file,
            "session_id": self.session_id, "metadata": metadata,
            "created_at": self.created_at, "updated_at": self.updated_at,
            "deleted_at": self.deleted_at, "vector_clock": self.vector_clock,
            "content_hash": self.content_hash, "encrypted": self.encrypted,
        }
        for key, value in self.extra.items():
            wire.setdefault(key, value)
        return wire

    @classmethod
    def from_wire(cls, obj: dict) -> "Memory":
        """Validate and build a Memory from a protocol object (raises ValueError)."""
        if not isinstance(obj, dict):
            raise ValueError("memory must be an object")
        mem_id, content = obj.get("id"), obj.get("content")
        if not isinstance(mem_id, str) or not mem_id:
            raise ValueError("memory id must be a non-empty string")
        if not isinstance(content, str):
            raise ValueError(f"memory {mem_id}: content must be a string")
        tags = obj.get("tags") or []
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise ValueError(f"memory {mem_id}: tags must be a list of strings")
        metadata = _json_obj(obj.get("metadata"), "metadata")
        created, updated = normalize_ts(obj.get("created_at")), normalize_ts(obj.get("updated_at"))
        if created is None or updated is None:  # utc_now() only when needed: it is not free
            now = utc_now()
            created, updated = created or now, updated or now
        encrypted = bool(obj.get("encrypted", False))
        conflict_of = metadata.get("conflict_of")
        modified_by = obj.get("last_modified_by")
        memory = cls(
            id=mem_id, content=content, type=str(obj.get("type") or "fact"),
            summary=obj.get("summary"), tags=tags,
            namespace_id=str(obj.get("namespace_id") or "global"),
            source_repo=obj.get("source_repo"), source_file=obj.get("source_file"),
            session_id=obj.get("session_id"), metadata=metadata,
            extra={k: obj[k] for k in _MEMORY_WIRE_EXTRAS if obj.get(k) is not None},
            created_at=created, updated_at=updated,
            deleted_at=normalize_ts(obj.get("deleted_at")),
            vector_clock=_clock(obj.get("vector_clock")),
            content_hash=obj.get("content_hash") or ("" if encrypted else content_hash(content)),
            encrypted=encrypted,
            conflict_of=conflict_of if isinstance(conflict_of, str) and conflict_of else None,
            last_modified_by=modified_by if isinstance(modified_by, str) else None,
        )
        if memory.deleted_at is not None:
            memory.erase()  # another client's tombstone may still carry its text
        return memory

    def erase(self) -> None:
        """Drop what a tombstone must not keep: the text and everything that describes it."""
        self.content, self.summary, self.tags, self.metadata = "", None, [], {}
        self.conflict_of = None  # a resolved copy is no longer anybody's conflict
        self.content_hash, self.encrypted = content_hash(""), False


@dataclass
class Session:
    """A working session of an agent, with its summary."""

    id: str
    label: Optional[str] = None
    tool: str = "contextfs"
    repo: Optional[str] = None
    started_at: str = ""
    ended_at: Optional[str] = None
    summary: Optional[str] = None
    metadata: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    updated_at: str = ""
    deleted_at: Optional[str] = None
    vector_clock: Clock = field(default_factory=dict)
    conflict_of: Optional[str] = None
    dirty: bool = False
    seq: int = 0

    def to_wire(self) -> dict:
        """The protocol's session object (``repo`` travels as ``repo_path``)."""
        metadata = self.metadata
        if self.conflict_of is not None and metadata.get("conflict_of") != self.conflict_of:
            metadata = dict(metadata, conflict_of=self.conflict_of)
        wire = {
            "id": self.id, "label": self.label, "tool": self.tool, "repo_path": self.repo,
            "started_at": self.started_at, "ended_at": self.ended_at, "summary": self.summary,
            "metadata": metadata, "created_at": self.started_at,
            "updated_at": self.updated_at, "deleted_at": self.deleted_at,
            "vector_clock": self.vector_clock, "content_hash": None,
        }
        for key, value in self.extra.items():
            wire.setdefault(key, value)
        return wire

    @classmethod
    def from_wire(cls, obj: dict) -> "Session":
        """Validate and build a Session from a protocol object (raises ValueError)."""
        if not isinstance(obj, dict) or not isinstance(obj.get("id"), str) or not obj["id"]:
            raise ValueError("session id must be a non-empty string")
        started = normalize_ts(obj.get("started_at")) or normalize_ts(obj.get("created_at")) or utc_now()
        metadata = _json_obj(obj.get("metadata"), "metadata")
        conflict_of = metadata.get("conflict_of")
        return cls(
            id=obj["id"], label=obj.get("label"), tool=str(obj.get("tool") or "contextfs"),
            repo=obj.get("repo_path"), started_at=started,
            ended_at=normalize_ts(obj.get("ended_at")), summary=obj.get("summary"),
            metadata=metadata,
            extra={k: obj[k] for k in _SESSION_WIRE_EXTRAS if obj.get(k) is not None},
            updated_at=normalize_ts(obj.get("updated_at")) or started,
            deleted_at=normalize_ts(obj.get("deleted_at")),
            vector_clock=_clock(obj.get("vector_clock")),
            conflict_of=conflict_of if isinstance(conflict_of, str) and conflict_of else None,
        )


@dataclass
class Edge:
    """A relationship between two memories; its identity is (from_id, to_id, relation)."""

    from_id: str
    to_id: str
    relation: str = "related_to"
    weight: float = 1.0
    metadata: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    created_at: str = ""
    updated_at: str = ""
    deleted_at: Optional[str] = None
    vector_clock: Clock = field(default_factory=dict)
    dirty: bool = False
    seq: int = 0

    @property
    def id(self) -> str:
        """The client's edge id, ``from:to:relation`` (protocol.md §3.3; never parsed)."""
        return f"{self.from_id}:{self.to_id}:{self.relation}"

    def to_wire(self) -> dict:
        """The protocol's edge object."""
        wire = {
            "id": self.id, "from_id": self.from_id, "to_id": self.to_id,
            "relation": self.relation, "weight": self.weight, "metadata": self.metadata,
            "created_at": self.created_at, "updated_at": self.updated_at,
            "deleted_at": self.deleted_at, "vector_clock": self.vector_clock,
            "content_hash": None,
        }
        for key, value in self.extra.items():
            wire.setdefault(key, value)
        return wire

    @classmethod
    def from_wire(cls, obj: dict) -> "Edge":
        """Validate and build an Edge from a protocol object, matching on its three fields."""
        if not isinstance(obj, dict):
            raise ValueError("edge must be an object")
        for key in ("from_id", "to_id", "relation"):
            if not isinstance(obj.get(key), str) or not obj[key]:
                raise ValueError(f"edge {key} must be a non-empty string")
        weight = obj.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ValueError("edge weight must be a number")
        metadata = _json_obj(obj.get("metadata"), "metadata")
        created, updated = normalize_ts(obj.get("created_at")), normalize_ts(obj.get("updated_at"))
        if created is None or updated is None:
            now = utc_now()
            created, updated = created or now, updated or now
        return cls(
            from_id=obj["from_id"], to_id=obj["to_id"], relation=obj["relation"],
            weight=float(weight), metadata=metadata,
            extra={k: obj[k] for k in _EDGE_WIRE_EXTRAS if obj.get(k) is not None},
            created_at=created, updated_at=updated,
            deleted_at=normalize_ts(obj.get("deleted_at")),
            vector_clock=_clock(obj.get("vector_clock")),
        )


# Display forms shared by the CLI and the MCP server (both format with these).

def memory_view(memory: Memory) -> dict:
    """A memory as shown by ``--json`` (no sync internals beyond dirty/conflict)."""
    view = memory.to_wire()
    view.update(draft=memory.draft, expires_at=memory.expires_at, conflict_of=memory.conflict_of,
                dirty=memory.dirty)
    return view


def conflict_view(copy: Any) -> dict:
    """A conflict copy (of a memory or a session) as shown by ``--json``, with its ``kind``."""
    if isinstance(copy, Session):
        view = copy.to_wire()
        view.update(kind="session", conflict_of=copy.conflict_of, dirty=copy.dirty)
        return view
    return dict(memory_view(copy), kind="memory")


def _one_line(text: Optional[str], width: int = 72) -> str:
    flat = " ".join((text or "").split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _memory_line(memory: Memory) -> str:
    flags = "".join([" (draft)" if memory.draft else "", " (temporary)" if memory.expires_at else "",
                     f" (conflict copy of {memory.conflict_of})" if memory.conflict_of else "",
                     " (deleted)" if memory.deleted_at else ""])
    return f"{memory.id}  [{memory.type}] {_one_line(memory.summary or memory.content)}{flags}"


# ---- 4. pure sync logic ------------------------------------------------------------------
# Plain functions on plain data: no I/O. The sync engine (section 10) asks these what to do.

# Verdicts for an incoming cloud version against the local row.
APPLY_INSERT = "insert"          # not known locally: store the cloud version
APPLY_OVERWRITE = "overwrite"    # cloud is newer than a clean local row: take it
APPLY_SKIP = "skip"              # already have it (or newer and clean): nothing to do
APPLY_KEEP_LOCAL = "keep_local"  # local dirty row dominates: it will be pushed
APPLY_SETTLE = "settle"          # cloud holds the same data: adopt its clock, mark clean
APPLY_CONFLICT = "conflict"      # cloud wins under the id; local kept as <id>_local
APPLY_DELETE_UNDONE = "delete_undone"  # our delete lost to a concurrent edit: the edit is kept, reported
APPLY_IGNORE = "ignore"          # not this account's row (an edge to memories we cannot see)
APPLY_PUBLISH = "publish"        # our newer version is a draft/temporary here, the server has it: publish ours


def decide_incoming(local_clock: Optional[Clock], local_dirty: bool,
                    same_version: Union[bool, Callable[[], bool]], cloud_clock: Clock) -> str:
    """The conflict rule: what to do with a cloud version given the local row's state.

    ``same_version`` says the two carry the same user data (our own accepted write, perhaps
    ticked by the server); it may be a function, called only when the answer matters. Settle
    by clocks, not by push verdicts (design.md, Sync). The rule, as a table:

    =========  ==========  ==============  =====================================
    local      clocks      same data?      verdict
    =========  ==========  ==============  =====================================
    none       -           -               insert
    clean      equal       yes / no        skip / conflict (a counter re-used)
    clean      local newer -               skip (an overlap re-read)
    clean      cloud newer -               overwrite
    clean      concurrent  yes / no        settle / conflict (never lose a version)
    dirty      local newer -               keep_local (it is pushed next)
    dirty      other       yes / no        settle / conflict
    =========  ==========  ==============  =====================================

    plan_page takes a local draft or temporary memory whose id the server holds for published
    (it was, before this home was restored from an older copy: publishing is for good), and
    turns its keep_local into publish.

    Equal clocks with different data are concurrent, not equal: a store rolled back by a
    restore can re-mint a published clock (clock_tick guards that too). Concurrent clocks over
    the same data (two devices deleted, or wrote, the same thing) settle on the cloud's clock,
    so the device ends up with the server's row and its next edit is not a conflict. A conflict keeps the
    cloud version under the id and the local one as ``<id>_local`` (plan_page adds the
    delete-against-edit case on top of this table).
    """
    if local_clock is None:
        return APPLY_INSERT
    order = clock_compare(local_clock, cloud_clock)
    if order == "after":
        return APPLY_KEEP_LOCAL if local_dirty else APPLY_SKIP
    if not local_dirty and order == "before":
        return APPLY_OVERWRITE
    same = same_version() if callable(same_version) else same_version
    if not same:
        return APPLY_CONFLICT
    return APPLY_SKIP if order == "equal" and not local_dirty else APPLY_SETTLE


_COPY_ID = re.compile(r"^(.+)_local(?:_[0-9]+)?$")  # what conflict_copy_id() names


def conflict_copy_id(memory_id: str, taken: Callable[[str], bool]) -> str:
    """``<id>_local``, or ``<id>_local_2``, ``_3``, … when that id is already taken."""
    candidate = f"{memory_id}_local"
    n = 2
    while taken(candidate):
        candidate = f"{memory_id}_local_{n}"
        n += 1
    return candidate


def same_version(kind: str, local: Any, cloud: Any) -> bool:
    """True when two versions carry the same user data (clocks and timestamps aside)."""
    if (local.deleted_at is None) != (cloud.deleted_at is None):
        return False
    if local.deleted_at is not None:
        return True  # two tombstones: nothing left to tell apart
    if kind == "memory":
        return (local.content_hash == cloud.content_hash and local.type == cloud.type
                and local.tags == cloud.tags and local.summary == cloud.summary
                and local.metadata == cloud.metadata)
    if kind == "session":
        return (local.summary == cloud.summary and local.label == cloud.label
                and local.ended_at == cloud.ended_at and local.metadata == cloud.metadata)
    return local.weight == cloud.weight and local.metadata == cloud.metadata


def plan_import(kind: str, theirs: Any, ours: Optional[Any], changed: bool) -> str:
    """What an import does with one row of another client's store (pure). ``changed``: that
    client changed the row after it last published it (or never did). Answers ``"add"`` (not
    here yet), ``"update"`` (theirs is newer), ``"copy"`` (both sides changed it: ours stays,
    theirs is kept beside it as a conflict copy), ``"skip"`` (already here as it is, or
    older: what makes a second import change nothing) or ``"unpublished_delete"`` (deleted
    there before it was ever synced: there is nothing to bring)."""
    if ours is None:
        return "add" if theirs.deleted_at is None or theirs.vector_clock else "unpublished_delete"
    if same_version(kind, ours, theirs):
        return "skip"
    order = clock_compare(theirs.vector_clock, ours.vector_clock)
    if order == "after" or (order == "equal" and changed):
        return "update"
    if order == "concurrent" or (order == "before" and changed):
        return "copy" if kind != "edge" and theirs.deleted_at is None else "skip"
    return "skip"


@dataclass
class Op:
    """One step of a sync plan: a row to send, or what to write locally for one pulled row.

    ``op`` is "push" or one of the APPLY_* verdicts. ``row`` is the row to push, or the cloud
    version to write; ``copy`` is a conflict's local version under its new ``<id>_local`` id.
    """

    op: str
    kind: str
    id: str
    row: Any = None
    copy: Any = None
    deletes_live: bool = False   # writes a tombstone over a live local memory (mass-delete guard)
    quiet: bool = False          # only the clock moves (say, our own write echoed with a server tick)
    server_behind: bool = False  # the server holds an older version than our clean row: upload ours again

    @property
    def changes_local(self) -> bool:
        """Whether applying this op writes anything to the store."""
        return self.op not in (APPLY_SKIP, APPLY_KEEP_LOCAL, APPLY_IGNORE)

    def to_dict(self) -> dict:
        """The op as a dry-run plan entry."""
        entry = {"op": self.op, "kind": self.kind, "id": self.id,
                 "deleted": getattr(self.row, "deleted_at", None) is not None}
        if self.copy is not None:
            entry["local_copy"] = self.copy.id
        return entry


def plan_push(kind: str, rows: Iterable[Any], local_only_ids: Container[str] = frozenset()) -> List[Op]:
    """The push ops for pushable rows: drafts and temporary memories never leave the device,
    and an edge goes only when both of its ends can (``local_only_ids`` names the ones that
    cannot), so no device ever receives a link to a memory it can never open."""
    ops = []
    for row in rows:
        if kind == "memory" and row.local_only:
            continue
        if kind == "edge" and (row.from_id in local_only_ids or row.to_id in local_only_ids):
            continue
        ops.append(Op("push", kind, row.id, row))
    return ops


def plan_page(page: Dict[str, List[Any]], local_rows: Dict[str, Dict[str, Any]], taken_ids: Container[str],
              device: str = "", drops_metadata: bool = False,
              known_memory_ids: Optional[Container[str]] = None, copies_by_id: bool = False,
              imported_from: Container[str] = frozenset()) -> List[Op]:
    """The local writes for one pulled page (sessions, memories, then edges), over plain data.

    ``local_rows`` holds the local version of every id in the page (by kind); ``taken_ids``
    the memory and session ids already in the store, so that conflict copies are named against
    the store AND this page (a page may bring another device's ``X_local`` with a conflicting
    ``X``). ``drops_metadata`` says the server is known to store no metadata: its empty object
    then never replaces ours, and neither does the empty echo of our own write (``device``).
    Edges are kept only when both ends are memories of this account: ``known_memory_ids``
    (the store's) or this page's; None accepts every edge. ``copies_by_id``: the server may
    have dropped the ``conflict_of`` mark (ContextFS Cloud stores no metadata), so a live row
    named ``<id>_local[_N]`` that is new here is taken for the conflict copy it is.
    """
    ops: List[Op] = []
    page_ids = {kind: {obj.id for obj in page.get(kind, ())} for kind in ("memory", "session")}
    chosen: set = set()
    for kind in ("session", "memory", "edge"):
        locals_of_kind = local_rows.get(kind, {})

        def taken(candidate: str, kind: str = kind) -> bool:
            return candidate in chosen or candidate in page_ids.get(kind, ()) or candidate in taken_ids

        for cloud in page.get(kind, ()):
            if kind == "edge" and known_memory_ids is not None and not all(
                    end in page_ids["memory"] or end in known_memory_ids for end in (cloud.from_id, cloud.to_id)):
                ops.append(Op(APPLY_IGNORE, kind, cloud.id, cloud))
                continue
            local = locals_of_kind.get(cloud.id)
            if local is not None and kind != "edge" and not cloud.metadata and local.metadata and (
                    drops_metadata or getattr(cloud, "last_modified_by", None) in (device, *imported_from)):
                # A server that drops metadata echoes {} for what we wrote: keep ours. So it does
                # for what the client whose store `contextfs import contextfs` brought in wrote
                # (``imported_from``, its device ids), which we hold with its metadata.
                cloud.metadata = dict(local.metadata)
                cloud.conflict_of = cloud.conflict_of or local.conflict_of
            if copies_by_id and kind != "edge" and cloud.conflict_of is None and cloud.deleted_at is None:
                # Only a row new here, or one this device already holds as a copy, is marked: a
                # copy resolved here by editing it stays resolved here.
                base = _COPY_ID.match(cloud.id)
                if base is not None and (local is None or local.conflict_of is not None):
                    cloud.conflict_of = local.conflict_of if local is not None else base.group(1)
            republish = kind == "memory" and local is not None and local.local_only
            if republish:
                # The server holds this id, so the memory was published (by this home before it
                # was restored from an older copy, or by a copy of it): publishing is for good.
                # Left a draft here, our newer version (or its conflict copy) would never leave.
                local = _published(local)
            verdict = decide_incoming(local.vector_clock if local is not None else None,
                                      bool(local is not None and local.dirty),
                                      lambda: same_version(kind, local, cloud), cloud.vector_clock)
            if republish and verdict == APPLY_KEEP_LOCAL:
                verdict = APPLY_PUBLISH
            op = Op(verdict, kind, cloud.id, local if verdict == APPLY_PUBLISH else cloud,
                    quiet=verdict == APPLY_PUBLISH)
            if verdict == APPLY_SKIP and not local.dirty and clock_compare(local.vector_clock, cloud.vector_clock) == "after":
                # The server's current row is older than what this device synced: the server
                # went back (restored from a backup). Ours goes up again.
                op.server_behind = True
            if verdict == APPLY_OVERWRITE and same_version(kind, local, cloud):
                op.quiet = True  # written (the clock), but nothing new to report
            if verdict == APPLY_CONFLICT and kind != "edge":
                if local.deleted_at is not None and cloud.deleted_at is None:
                    op.op = APPLY_DELETE_UNDONE  # our delete raced an edit: keep the edit, say so
                elif local.deleted_at is None:
                    # Two devices' copies of one conflict may meet under the same name (each
                    # chose X_local before it saw the other's): ours becomes X_local_2, a copy
                    # of X like the other, never a copy of a copy.
                    original = cloud.id
                    if local.conflict_of is not None and cloud.conflict_of == local.conflict_of:
                        original = local.conflict_of
                    copy_id = conflict_copy_id(original, taken)
                    chosen.add(copy_id)
                    op.copy = _conflict_copy(local, copy_id, original, device)
            if kind == "memory" and cloud.deleted_at is not None and local is not None \
                    and local.deleted_at is None and op.changes_local and verdict not in (APPLY_SETTLE, APPLY_PUBLISH):
                op.deletes_live = True
            ops.append(op)
    return ops


def _published(local: Memory) -> Memory:
    """A copy of a local draft or temporary memory, published (neither any more)."""
    import copy as _copy

    published = _copy.copy(local)
    published.draft, published.expires_at = False, None
    return published


def _conflict_copy(local: Any, copy_id: str, original_id: str, device: str) -> Any:
    """The local version of a conflicting row, kept under ``copy_id`` and marked as a copy."""
    import copy as _copy

    kept = _copy.copy(local)
    kept.id, kept.conflict_of = copy_id, original_id
    if isinstance(kept, Memory):
        kept.sealed = False  # a new row: the server has never held it
    kept.metadata = dict(local.metadata, conflict_of=original_id)
    kept.vector_clock = clock_tick({}, device) if device else {}
    return kept


MASS_DELETE_MIN = 50         # a sync deleting more than this many memories …
MASS_DELETE_FRACTION = 0.25  # … and more than this share of them stops unless --force


def is_mass_delete(deletions: int, total: int) -> bool:
    """True when ``deletions`` of ``total`` memories is too many to apply without --force."""
    return deletions > MASS_DELETE_MIN and deletions > MASS_DELETE_FRACTION * max(total, 1)


def batches(items: Iterable[dict], max_count: int, max_bytes: int) -> Iterator[List[dict]]:
    """Split wire objects into batches bounded by count and by encoded JSON size."""
    for batch in encoded_batches(((item, wire_json(item)) for item in items), max_count, max_bytes):
        yield [item for item, _data in batch]


def wire_json(obj: Any) -> bytes:
    """Compact UTF-8 JSON, exactly as request bodies are encoded."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def encoded_batches(items: Iterable[Tuple[Any, bytes]], max_count: int,
                    max_bytes: int) -> Iterator[List[Tuple[Any, bytes]]]:
    """Split (key, encoded JSON) pairs into batches bounded by count and by total size."""
    batch: List[Tuple[Any, bytes]] = []
    size = 0
    for key, data in items:
        item_size = len(data) + 1
        if batch and (len(batch) >= max_count or size + item_size > max_bytes):
            yield batch
            batch, size = [], 0
        batch.append((key, data))
        size += item_size
    if batch:
        yield batch


def nul_path(value: Any) -> Optional[List[Any]]:
    """Path (keys/indexes) to the first string (or key) holding a NUL character, or None.

    SQL servers (the ContextFS Cloud anchor stores JSON in PostgreSQL) cannot store NUL in text,
    so a memory holding one could never be pushed: the store refuses it, the server answers 422.
    """
    stack: List[Tuple[Any, List[Any]]] = [(value, [])]
    while stack:
        node, path = stack.pop()
        if isinstance(node, str):
            if "\x00" in node:
                return path
        elif isinstance(node, dict):
            for key, child in node.items():
                if isinstance(key, str) and "\x00" in key:
                    return path + [key.replace("\x00", "\\0")]
                stack.append((child, path + [key]))
        elif isinstance(node, (list, tuple)):
            stack.extend((child, path + [i]) for i, child in enumerate(node))
    return None


def parse_ttl(text: str) -> int:
    """Parse a TTL like ``90s``, ``30m``, ``1h``, ``2d``, ``1w`` or plain seconds."""
    match = re.fullmatch(r"\s*(\d+)\s*([smhdw]?)\s*", text or "")
    if not match or int(match.group(1)) <= 0:
        raise UsageError(f"Invalid --ttl {text!r}: use a positive number with s, m, h, d or w (e.g. 30m, 1h, 7d)")
    factor = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[match.group(2)]
    return int(match.group(1)) * factor


def mask_key(key: Optional[str]) -> str:
    """Mask an API key for display: ``ctxfs_abcd…wxyz`` (never the whole key)."""
    if not key:
        return "(none)"
    body = key[6:] if key.startswith("ctxfs_") else key
    if len(body) < 12:
        return "ctxfs_…" if key.startswith("ctxfs_") else "…"
    prefix = "ctxfs_" if key.startswith("ctxfs_") else ""
    return f"{prefix}{body[:4]}…{body[-4:]}"


# ---- 5. config ---------------------------------------------------------------------------

# Known keys and their types; anything else in the file is kept as-is on save.
_CONFIG_SCHEMA: Dict[Tuple[str, str], type] = {
    ("cloud", "enabled"): bool,
    ("cloud", "server_url"): str,
    ("cloud", "api_key"): str,
    ("cloud", "e2ee"): bool,
    ("cloud", "e2ee_key"): str,
    ("cloud", "e2ee_old_key"): str,   # only while `cloud rekey` runs (its resume point)
    ("cloud", "e2ee_previous_key"): str,  # after a passphrase change: reads rows still under it
    ("cloud", "insecure"): bool,
    ("cloud", "auto_sync"): bool,       # while `contextfs mcp` runs (AutoSync)
    ("cloud", "sync_interval"): str,    # a duration: "30s", "5m", "1h"
    ("cloud", "push_delay"): str,       # how long after a local write auto-sync pushes it
    ("index", "embedder"): str,
}
AUTO_SYNC_INTERVAL = "5m"
AUTO_SYNC_PUSH_DELAY = "5s"


_DURATION_LEAST = {"sync_interval": 1.0, "push_delay": 0.0}  # seconds, per [cloud] key


def duration_problem(key: str, value: Any) -> Optional[str]:
    """What is wrong with ``value`` for the duration setting cloud.``key``, or None."""
    try:
        seconds = parse_duration(value)
    except (ValueError, TypeError):
        return f"must be a duration like \"30s\", \"5m\" or \"1h\", got {value!r}"
    least = _DURATION_LEAST[key]
    return f"must be at least {least:g}s, got {value!r}" if seconds < least else None


def parse_duration(text: str) -> float:
    """Seconds in a duration such as "45s", "5m", "1h" or "90" (seconds); ValueError otherwise."""
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(s|m|h)?\s*", text or "")
    if not match:
        raise ValueError(f"{text!r} is not a duration like 30s, 5m or 1h")
    return float(match.group(1)) * {"s": 1, "m": 60, "h": 3600}[match.group(2) or "s"]


def contextfs_home() -> Path:
    """``$CONTEXTFS_HOME``, or ``~/.contextfs``."""
    env = os.environ.get(ENV_HOME)
    return Path(env).expanduser() if env else Path.home() / ".contextfs"


@dataclass
class Config:
    """The user's config.toml plus environment overrides (env wins, and is never saved)."""

    home: Path
    data: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        # Never the secrets: a Config may end up in a log line or an exception's repr.
        return f"Config(home={str(self.home)!r}, api_key={mask_key(self.api_key)!r})"

    @property
    def path(self) -> Path:
        """Location of config.toml."""
        return self.home / "config.toml"

    def get(self, table: str, key: str, default: Any = None) -> Any:
        """A value from the file (no env override)."""
        section = self.data.get(table)
        return section.get(key, default) if isinstance(section, dict) else default

    def set(self, table: str, key: str, value: Any) -> None:
        """Set (or with None, remove) a value; call :func:`save_config` to persist."""
        section = self.data.setdefault(table, {})
        if value is None:
            section.pop(key, None)
        else:
            section[key] = value

    @property
    def enabled(self) -> bool:
        """Whether cloud sync is enabled."""
        return bool(self.get("cloud", "enabled", False))

    @property
    def server_url(self) -> str:
        """Server base URL (env ``CONTEXTFS_SERVER_URL`` overrides), no trailing slash."""
        url = os.environ.get(ENV_SERVER_URL) or self.get("cloud", "server_url") or DEFAULT_SERVER_URL
        return url.rstrip("/")

    @property
    def api_key(self) -> Optional[str]:
        """API key (env ``CONTEXTFS_API_KEY`` overrides)."""
        return os.environ.get(ENV_API_KEY) or self.get("cloud", "api_key") or None

    @property
    def e2ee(self) -> bool:
        """Whether end-to-end encryption is on."""
        return bool(self.get("cloud", "e2ee", False))

    @property
    def auto_sync(self) -> bool:
        """Whether `contextfs mcp` syncs by itself (cloud.auto_sync, on by default; needs sync on)."""
        return self.enabled and bool(self.get("cloud", "auto_sync", True))

    @property
    def sync_interval(self) -> float:
        """Seconds between auto-sync rounds (cloud.sync_interval, default 5m)."""
        return parse_duration(self.get("cloud", "sync_interval") or AUTO_SYNC_INTERVAL)

    @property
    def push_delay(self) -> float:
        """Seconds auto-sync waits after a local write before pushing it (cloud.push_delay, default 5s)."""
        return parse_duration(self.get("cloud", "push_delay") or AUTO_SYNC_PUSH_DELAY)

    @property
    def embedder(self) -> str:
        """Which embedder the semantic index uses."""
        return self.get("index", "embedder", "default")


_TOML_KEY = r'(?:"[^"]*"|\'[^\']*\'|[A-Za-z0-9_-]+)'


def _toml_key_parts(dotted: str) -> List[str]:
    return [part.strip().strip('"\'') for part in re.findall(rf"{_TOML_KEY}", dotted)]


def _toml_position(text: str, table: str, key: str) -> Tuple[int, int]:
    """(line, column), 1-based, where ``table.key`` (or the root ``key`` when ``table`` is "")
    is set in TOML text: under a ``[table]`` header (comments and quotes allowed), as a dotted
    key (``table.key = …``) or inside an inline table (``table = {key = …}``). (0, 0) if not found."""
    target = [table, key] if table else [key]
    current: List[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        header = re.match(rf"\s*\[\s*({_TOML_KEY}(?:\s*\.\s*{_TOML_KEY})*)\s*\]\s*(?:#.*)?$", line)
        if header:
            current = _toml_key_parts(header.group(1))
            continue
        assignment = re.match(rf"\s*({_TOML_KEY}(?:\s*\.\s*{_TOML_KEY})*)\s*=", line)
        if not assignment:
            continue
        path = current + _toml_key_parts(assignment.group(1))
        if path == target:
            return number, assignment.start(1) + 1
        if path == target[:-1]:  # an inline table: find the key inside it
            inner = re.search(rf"[{{,]\s*([\"']?{re.escape(key)}[\"']?)\s*=", line[assignment.end():])
            return number, (assignment.end() + inner.start(1) + 1) if inner else assignment.start(1) + 1
    return 0, 0


def load_config(home: Optional[Path] = None) -> Config:
    """Load and validate ``$CONTEXTFS_HOME/config.toml`` (missing file = defaults)."""
    home = Path(home) if home else contextfs_home()
    cfg = Config(home=home)
    try:
        raw = cfg.path.read_bytes()
    except FileNotFoundError:
        return cfg
    except OSError as exc:
        raise ConfigError(f"{cfg.path}: cannot read config ({exc.strerror})") from None
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on Python < 3.11 only
        import tomli as tomllib
    try:
        text = raw.decode("utf-8")
        data = tomllib.loads(text)
    except UnicodeDecodeError:
        raise ConfigError(f"{cfg.path}: not valid UTF-8; fix or remove the file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{cfg.path}: invalid TOML: {exc}; fix the file (it was not changed)") from None
    for (table, key), expected in _CONFIG_SCHEMA.items():
        section = data.get(table)
        if section is None:
            continue
        if not isinstance(section, dict):
            line, column = _toml_position(text, "", table)
            raise ConfigError(f"{cfg.path}:{line}:{column}: '{table}' must be a table like [{table}]")
        if key in section and not isinstance(section[key], expected):
            line, column = _toml_position(text, table, key)
            raise ConfigError(
                f"{cfg.path}:{line}:{column}: {table}.{key} must be a {_toml_type_name(expected)}, "
                f"got {section[key]!r}; fix the file (it was not changed)")
    embedder = data.get("index", {}).get("embedder")
    if embedder is not None and embedder not in EMBEDDERS:
        line, column = _toml_position(text, "index", "embedder")
        raise ConfigError(f"{cfg.path}:{line}:{column}: index.embedder must be one of "
                          f"{', '.join(EMBEDDERS)}, got {embedder!r}")
    for key in _DURATION_LEAST:
        value = data.get("cloud", {}).get(key)
        problem = duration_problem(key, value) if value is not None else None
        if problem:
            line, column = _toml_position(text, "cloud", key)
            raise ConfigError(f"{cfg.path}:{line}:{column}: cloud.{key} {problem}; fix the file (it was not changed)")
    cfg.data = data
    return cfg


def _toml_type_name(kind: type) -> str:
    return {bool: "boolean (true or false)", str: "string in quotes", int: "integer"}.get(kind, kind.__name__)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # a JSON string is a valid TOML basic string
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise ConfigError(f"cannot write {type(value).__name__} to TOML")


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def dump_toml(data: dict) -> str:
    """Serialise nested dicts of plain values as TOML (tables for dicts, inline below)."""
    lines: List[str] = []

    def emit(table: dict, path: List[str]) -> None:
        scalars = [(k, v) for k, v in table.items() if not isinstance(v, dict)]
        tables = [(k, v) for k, v in table.items() if isinstance(v, dict)]
        if path and (scalars or not tables):
            lines.append(f"[{'.'.join(_toml_key(p) for p in path)}]")
        for key, value in scalars:
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
        if scalars:
            lines.append("")
        for key, value in tables:
            emit(value, path + [key])

    emit(data, [])
    return "\n".join(lines).rstrip() + "\n"


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write a file atomically (temp file in the same dir, fsync, rename) with ``mode``."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with _suppress(OSError):
            os.unlink(tmp)
        raise


class _suppress:
    """contextlib.suppress without importing contextlib at start-up."""

    def __init__(self, *kinds: type):
        self.kinds = kinds

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, value: Any, tb: Any) -> bool:
        return kind is not None and issubclass(kind, self.kinds)


def ensure_home(home: Path) -> Path:
    """Create the home directory with mode 0700 if needed."""
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    return home


def save_config(cfg: Config) -> None:
    """Save config.toml atomically with mode 0600 (its dir 0700); unknown keys are kept."""
    ensure_home(cfg.home)
    with _suppress(OSError):
        os.chmod(cfg.home, 0o700)
    try:
        atomic_write(cfg.path, dump_toml(cfg.data).encode("utf-8"), 0o600)
    except OSError as exc:
        raise ConfigError(f"{cfg.path}: cannot save config ({exc.strerror}); nothing was changed") from None


def installation_fingerprint(home: Path) -> str:
    """What tells this installation from a copy of it: the OS machine id (where there is one),
    the hostname and the home's absolute path, hashed."""
    import hashlib
    import socket

    machine = ""
    for candidate in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        with _suppress(OSError):
            machine = Path(candidate).read_text(encoding="utf-8").strip()
            break
    parts = "\0".join((machine, socket.gethostname() or "", str(Path(home).resolve())))
    return hashlib.sha256(parts.encode("utf-8", "surrogateescape")).hexdigest()[:32]


def _new_device_id() -> str:
    import secrets
    import socket

    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname() or "device")[:19] or "device"
    return f"{host}-{secrets.token_hex(6)}"[:32]


DEVICE_ID_FILE = "sync_device_id"


def device_id(home: Path) -> str:
    """This installation's id (hostname + random), kept in ``$CONTEXTFS_HOME/sync_device_id``.

    One id per installation: beside it, ``device_fingerprint`` records where it was made
    (installation_fingerprint). A home copied to another machine or path, a cloned VM image or
    a restored CI cache no longer matches, so it gets a new id, and ``device_id.previous``
    keeps the old one for the user to see (cloud status; the next sync says it once). Two
    installations sharing an id would take each other's rows for their own.

    Not ``device_id``: the public ContextFS client keeps its own id there, in the same default
    home (~/.contextfs), and two clients ticking one vector-clock entry would take each other's
    concurrent edits for newer ones. An id earlier versions of ours kept in ``device_id`` moves
    here, unless the public client lives in this home too (its ``context.db`` or
    ``config.yaml``): then the file is left to it, and this installation takes an id of its own.
    """
    path, fp_path = home / DEVICE_ID_FILE, home / "device_fingerprint"
    fingerprint = installation_fingerprint(home)
    try:
        existing = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        existing = _adopt_legacy_device_id(home, path)
    if existing:
        try:
            recorded = fp_path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            recorded = ""
        if recorded == fingerprint:
            return existing
        if not recorded:  # made before fingerprints existed: this installation adopts it
            atomic_write(fp_path, fingerprint.encode("ascii"), 0o600)
            return existing
        # A copy of another installation's home: a new id, and the old one kept for the user.
        atomic_write(home / "device_id.previous", existing.encode("utf-8"), 0o600)
        atomic_write(path, _new_device_id().encode("utf-8"), 0o600)
        atomic_write(fp_path, fingerprint.encode("ascii"), 0o600)
        return path.read_text(encoding="utf-8").strip()  # a racing process may have won: use its id
    new_id = _new_device_id()
    ensure_home(home)
    held = _write_if_absent(path, new_id)
    if held != new_id:
        return held  # a racing process's id won
    atomic_write(fp_path, fingerprint.encode("ascii"), 0o600)
    return new_id


def _write_if_absent(path: Path, text: str) -> str:
    """Create ``path`` (0600) holding ``text`` unless it exists (O_EXCL: of two racing
    processes the first one wins); returns what the file holds."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
    except FileExistsError:
        return path.read_text(encoding="utf-8").strip() or text
    return text


def public_client_lives_in(home: Path) -> bool:
    """Whether the public ContextFS client keeps its files in this home (~/.contextfs)."""
    return (home / "context.db").exists() or (home / "config.yaml").exists()


def _adopt_legacy_device_id(home: Path, path: Path) -> str:
    """An id an earlier version of ours kept in ``device_id`` (a fingerprint or our sync.db
    beside it), moved to ``path``; "" when there is none, or the file is the public client's."""
    legacy = home / "device_id"
    try:
        old = legacy.read_text(encoding="utf-8").strip()
    except (FileNotFoundError, NotADirectoryError):
        return ""
    ours = (home / "device_fingerprint").exists() or (home / "sync.db").exists()
    if not old or not ours or public_client_lives_in(home):
        return ""
    held = _write_if_absent(path, old)
    if held != old:
        return held  # a racing process wrote another id first
    with _suppress(OSError):
        legacy.unlink()  # so a public client installed here later makes its own
    return old


def previous_device_id(home: Path) -> Optional[str]:
    """The id this home had before it was found to be a copy of another installation, if any."""
    try:
        return (home / "device_id.previous").read_text(encoding="utf-8").strip() or None
    except FileNotFoundError:
        return None


# ---- 6. local store ----------------------------------------------------------------------
# SQLite in WAL mode. Every local write takes a new value of a local monotonic counter (`seq`)
# and sets dirty = 1; a push clears dirty only where seq is unchanged, so a write that raced the
# push stays dirty. Rows written by a pull are clean. Deletes are tombstones (deleted_at).

_MIGRATIONS: List[str] = [
    # 1: the first schema
    """
    CREATE TABLE memories (
        id TEXT PRIMARY KEY, type TEXT NOT NULL DEFAULT 'fact', content TEXT NOT NULL,
        summary TEXT, tags TEXT NOT NULL DEFAULT '[]', namespace_id TEXT NOT NULL DEFAULT 'global',
        source_repo TEXT, source_file TEXT, session_id TEXT, metadata TEXT NOT NULL DEFAULT '{}',
        created_at TEXT NOT NULL, updated_at TEXT NOT NULL, deleted_at TEXT,
        draft INTEGER NOT NULL DEFAULT 0, expires_at TEXT, vector_clock TEXT NOT NULL DEFAULT '{}',
        content_hash TEXT NOT NULL DEFAULT '', dirty INTEGER NOT NULL DEFAULT 0,
        seq INTEGER NOT NULL DEFAULT 0);
    CREATE TABLE sessions (
        id TEXT PRIMARY KEY, label TEXT, tool TEXT NOT NULL DEFAULT 'contextfs', repo TEXT,
        started_at TEXT NOT NULL, ended_at TEXT, summary TEXT, metadata TEXT NOT NULL DEFAULT '{}',
        updated_at TEXT NOT NULL, deleted_at TEXT, vector_clock TEXT NOT NULL DEFAULT '{}',
        dirty INTEGER NOT NULL DEFAULT 0, seq INTEGER NOT NULL DEFAULT 0);
    CREATE TABLE edges (
        id TEXT PRIMARY KEY, from_id TEXT NOT NULL, to_id TEXT NOT NULL, relation TEXT NOT NULL,
        weight REAL NOT NULL DEFAULT 1.0, metadata TEXT NOT NULL DEFAULT '{}',
        created_at TEXT NOT NULL, updated_at TEXT NOT NULL, deleted_at TEXT,
        vector_clock TEXT NOT NULL DEFAULT '{}', dirty INTEGER NOT NULL DEFAULT 0,
        seq INTEGER NOT NULL DEFAULT 0, UNIQUE (from_id, to_id, relation));
    CREATE TABLE sync_state (key TEXT PRIMARY KEY, value TEXT);
    CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
    INSERT INTO counters VALUES ('seq', 0);
    """,
    # 2: conflict copies, E2EE flag and wire fields we do not model as columns
    """
    ALTER TABLE memories ADD COLUMN conflict_of TEXT;
    ALTER TABLE memories ADD COLUMN encrypted INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE memories ADD COLUMN extra TEXT NOT NULL DEFAULT '{}';
    ALTER TABLE sessions ADD COLUMN extra TEXT NOT NULL DEFAULT '{}';
    ALTER TABLE edges ADD COLUMN extra TEXT NOT NULL DEFAULT '{}';
    """,
    # 3: indexes for the push scan (dirty by seq) and listing
    """
    CREATE INDEX memories_dirty ON memories (dirty, seq);
    CREATE INDEX memories_updated ON memories (updated_at);
    CREATE INDEX sessions_dirty ON sessions (dirty, seq);
    CREATE INDEX edges_dirty ON edges (dirty, seq);
    """,
    # 4: session conflict copies
    """
    ALTER TABLE sessions ADD COLUMN conflict_of TEXT;
    """,
    # 5: expired temporary memories are purged by every command: find them without a table scan
    """
    CREATE INDEX memories_expires ON memories (expires_at) WHERE expires_at IS NOT NULL;
    """,
    # 6: which memories the server holds end-to-end encrypted (one never comes back plain)
    """
    ALTER TABLE memories ADD COLUMN sealed INTEGER NOT NULL DEFAULT 0;
    """,
]

# Full-text search: an external-content FTS5 table kept in step by triggers. Created outside
# the numbered migrations because an SQLite build without FTS5 must still work (LIKE search).
_FTS_SCHEMA = """
CREATE VIRTUAL TABLE IF NOT EXISTS memories_fts USING fts5(
    content, summary, tags, content='memories', content_rowid='rowid');
CREATE TRIGGER IF NOT EXISTS memories_fts_ai AFTER INSERT ON memories BEGIN
    INSERT INTO memories_fts(rowid, content, summary, tags)
    VALUES (new.rowid, new.content, new.summary, new.tags);
END;
CREATE TRIGGER IF NOT EXISTS memories_fts_ad AFTER DELETE ON memories BEGIN
    INSERT INTO memories_fts(memories_fts, rowid, content, summary, tags)
    VALUES ('delete', old.rowid, old.content, old.summary, old.tags);
END;
CREATE TRIGGER IF NOT EXISTS memories_fts_au AFTER UPDATE OF content, summary, tags ON memories BEGIN
    INSERT INTO memories_fts(memories_fts, rowid, content, summary, tags)
    VALUES ('delete', old.rowid, old.content, old.summary, old.tags);
    INSERT INTO memories_fts(rowid, content, summary, tags)
    VALUES (new.rowid, new.content, new.summary, new.tags);
END;
"""

_MEMORY_COLUMNS = ("id", "type", "content", "summary", "tags", "namespace_id", "source_repo",
                   "source_file", "session_id", "metadata", "extra", "created_at", "updated_at",
                   "deleted_at", "draft", "expires_at", "vector_clock", "content_hash",
                   "conflict_of", "encrypted", "dirty", "seq", "sealed")
_SESSION_COLUMNS = ("id", "label", "tool", "repo", "started_at", "ended_at", "summary", "metadata",
                    "extra", "updated_at", "deleted_at", "vector_clock", "conflict_of", "dirty", "seq")
_EDGE_COLUMNS = ("id", "from_id", "to_id", "relation", "weight", "metadata", "extra",
                 "created_at", "updated_at", "deleted_at", "vector_clock", "dirty", "seq")
_JSON_COLUMNS = {"tags", "metadata", "extra", "vector_clock"}
_BOOL_COLUMNS = {"draft", "encrypted", "dirty", "sealed"}


STORE_CACHE_KIB = 16 * 1024          # SQLite page cache of a store connection
STORE_WAL_CHECKPOINT_PAGES = 8000    # auto-checkpoint after this many WAL pages (~32 MiB)

_EMPTY_TEXT: Dict[type, str] = {dict: "{}", list: "[]"}
_ENCODER: Any = None


def _dumps(value: Any) -> str:
    global _ENCODER
    if _ENCODER is None:  # json.dumps with options builds a new encoder per call: reuse one
        _ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, sort_keys=True)
    return _ENCODER.encode(value)


def _to_row(obj: Any, columns: Tuple[str, ...]) -> tuple:
    values = []
    for col in columns:
        value = getattr(obj, col)
        if col in _JSON_COLUMNS:
            value = _dumps(value) if value else _EMPTY_TEXT.get(type(value)) or _dumps(value)
        elif col in _BOOL_COLUMNS:
            value = int(bool(value))
        values.append(value)
    return tuple(values)


def _from_row(cls: type, row: sqlite3.Row, columns: Tuple[str, ...]) -> Any:
    return _from_rows(cls, [row], columns)[0]


_EMPTY_JSON: Dict[str, Callable[[], Any]] = {"{}": dict, "[]": list}


def _from_rows(cls: type, rows: List[sqlite3.Row], columns: Tuple[str, ...]) -> List[Any]:
    """Rows of one query as objects: column positions are looked up once, not per row and name."""
    if not rows:
        return []
    position = {name: i for i, name in enumerate(rows[0].keys())}
    plan = [(col, position[col], 1 if col in _JSON_COLUMNS else 2 if col in _BOOL_COLUMNS else 0)
            for col in columns if not (cls is Edge and col == "id")]
    loads, empty = json.loads, _EMPTY_JSON
    objs = []
    for row in rows:
        kwargs = {}
        for col, i, conv in plan:
            value = row[i]
            if conv == 1:
                if not value:
                    value = {} if col != "tags" else []
                else:
                    make = empty.get(value)
                    value = make() if make is not None else loads(value)
            elif conv == 2:
                value = bool(value)
            kwargs[col] = value
        objs.append(cls(**kwargs))
    return objs


# Rows that may leave the device: drafts and temporary memories never do (conflict copies do,
# as backups). Edges to a draft or temporary memory wait: see plan_push.
_PUSHABLE = {
    "memory": "draft = 0 AND expires_at IS NULL",
    "session": "1 = 1",
    "edge": "1 = 1",
}

_KINDS = {
    "memory": ("memories", Memory, _MEMORY_COLUMNS),
    "session": ("sessions", Session, _SESSION_COLUMNS),
    "edge": ("edges", Edge, _EDGE_COLUMNS),
}


@dataclass
class SearchHit:
    """One search result: the memory, a score (higher is better) and a snippet."""

    memory: Memory
    score: float
    snippet: str
    sources: Dict[str, float] = field(default_factory=dict)


def _fts_query(query: str) -> str:
    """Turn free text into a safe FTS5 query: each word quoted, prefix-matched, OR-ed."""
    words = re.findall(r"\w+", query, flags=re.UNICODE)
    return " OR ".join(f'"{w}"*' for w in words)


class Store:
    """The local memory store: one SQLite file in WAL mode (``$CONTEXTFS_HOME/sync.db``)."""

    def __init__(self, path: Path, device: str):
        self.path = Path(path)
        self.device_id = device
        self._lock = threading.RLock()
        self.fts = True
        self.on_change: List[Callable[[str, List[str]], None]] = []  # hooks (semantic index)
        try:
            self.conn = sqlite3.connect(str(self.path), timeout=SQLITE_BUSY_TIMEOUT_MS / 1000,
                                        isolation_level=None, check_same_thread=False)
            self.conn.row_factory = sqlite3.Row
            self.conn.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            for attempt in range(SQLITE_BUSY_TIMEOUT_MS // 50):
                try:  # a new file's switch to WAL answers BUSY at once (no busy handler) while
                    self.conn.execute("PRAGMA journal_mode = WAL")  # another connection opens it
                    break
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) or attempt == SQLITE_BUSY_TIMEOUT_MS // 50 - 1:
                        raise
                    time.sleep(0.05)
            self.conn.execute("PRAGMA synchronous = NORMAL")
            # A bulk pull writes ~1 KB rows plus their full-text index: a 16 MiB page cache (used
            # only as needed) and checkpoints every 32 MiB of WAL instead of every 4 MiB halve
            # the pread/pwrite/fsync traffic of a first pull (measured: 100k memories, -15%).
            self.conn.execute(f"PRAGMA cache_size = -{STORE_CACHE_KIB}")
            self.conn.execute(f"PRAGMA wal_autocheckpoint = {STORE_WAL_CHECKPOINT_PAGES}")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise _store_error(self.path, exc) from None

    # -- plumbing --------------------------------------------------------------------------

    def close(self) -> None:
        """Close the database connection."""
        with self._lock:
            self.conn.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def transaction(self) -> "_Transaction":
        """``with store.transaction():`` — BEGIN IMMEDIATE … COMMIT, ROLLBACK on error."""
        return _Transaction(self)

    def _migrate(self, upto: Optional[int] = None) -> None:
        target = len(_MIGRATIONS) if upto is None else upto
        version = self.conn.execute("PRAGMA user_version").fetchone()[0]
        if version > len(_MIGRATIONS):
            raise StoreError(f"{self.path} was written by a newer contextfs-sync (schema {version}); "
                             f"upgrade: pip install -U contextfs-sync")
        for number in range(version + 1, target + 1):
            with self.transaction():
                # Re-read under the write lock: another connection may have just migrated.
                if self.conn.execute("PRAGMA user_version").fetchone()[0] >= number:
                    continue
                for statement in _split_sql(_MIGRATIONS[number - 1]):
                    self.conn.execute(statement)
                self.conn.execute(f"PRAGMA user_version = {number}")
        if upto is None:
            self._ensure_fts()

    def _ensure_fts(self) -> None:
        exists = self.conn.execute(
            "SELECT 1 FROM sqlite_master WHERE name = 'memories_fts'").fetchone()
        if exists:
            return
        try:
            with self.transaction():
                for statement in _split_sql(_FTS_SCHEMA, triggers=True):
                    self.conn.execute(statement)
                self.conn.execute("INSERT INTO memories_fts(memories_fts) VALUES ('rebuild')")
        except sqlite3.OperationalError as exc:
            if "fts5" not in str(exc).lower():
                raise
            self.fts = False  # this SQLite has no FTS5: search falls back to LIKE

    def _next_seq(self) -> int:
        self.conn.execute("UPDATE counters SET value = value + 1 WHERE name = 'seq'")
        return self.conn.execute("SELECT value FROM counters WHERE name = 'seq'").fetchone()[0]

    def _notify(self, event: str, ids: List[str]) -> None:
        for hook in self.on_change:
            hook(event, ids)

    def state(self, key: str, default: Optional[str] = None) -> Optional[str]:
        """A value from the sync_state table."""
        row = self.conn.execute("SELECT value FROM sync_state WHERE key = ?", (key,)).fetchone()
        return row[0] if row else default

    def set_state(self, key: str, value: Optional[str]) -> None:
        """Set (or with None, delete) a sync_state value (inside or outside a transaction)."""
        with self._lock:
            if value is None:
                self.conn.execute("DELETE FROM sync_state WHERE key = ?", (key,))
            else:
                self.conn.execute("INSERT INTO sync_state (key, value) VALUES (?, ?) "
                                  "ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value))

    # -- generic row access ----------------------------------------------------------------

    def _get(self, kind: str, row_id: str) -> Any:
        table, cls, columns = _KINDS[kind]
        row = self.conn.execute(f"SELECT * FROM {table} WHERE id = ?", (row_id,)).fetchone()
        return _from_row(cls, row, columns) if row else None

    def _write(self, kind: str, obj: Any, dirty: bool) -> None:
        """Insert or replace a row. Local writes (dirty) take a new seq and tick the clock."""
        table, _cls, columns = _KINDS[kind]
        if dirty:
            obj.seq = self._next_seq()
            obj.dirty = True
        values = _to_row(obj, columns)
        assignments = ", ".join(f"{c} = excluded.{c}" for c in columns if c != "id")
        self.conn.execute(
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))}) "
            f"ON CONFLICT(id) DO UPDATE SET {assignments}", values)

    def _local_write(self, kind: str, obj: Any) -> None:
        if kind == "memory" and obj.deleted_at is not None:
            # The text goes from this device as it goes from the server (to_wire): a deleted
            # memory, say a pasted secret, is kept nowhere in its tombstone.
            obj.erase()
        elif kind == "session" and obj.deleted_at is not None:
            obj.conflict_of = None
        obj.vector_clock = clock_tick(obj.vector_clock, self.device_id)
        obj.updated_at = utc_now()
        self._write(kind, obj, dirty=True)

    def import_rows(self, kind: str, rows: List[Tuple[Any, str]]) -> None:
        """Write rows another client's store held, in one transaction, keeping their ids,
        timestamps and clocks. How each goes: ``"published"``, clean (the server holds it as
        it is); ``"unpushed"``, up at the next sync as it was (a version that client published
        elsewhere); ``"changed"``, up at the next sync as a new version of this device (its
        tick on the clock: that client never published it)."""
        with self.transaction():
            for obj, how in rows:
                if how == "changed":
                    obj.vector_clock = clock_tick(obj.vector_clock, self.device_id)
                self._write(kind, obj, dirty=how != "published")
        if kind == "memory":
            self._notify("upsert", [obj.id for obj, _changed in rows if obj.deleted_at is None])

    def republish(self, memories: Iterable[Memory]) -> int:
        """Write these memories again as new local versions (clock ticked, pushed next): live
        ones this device holds, or tombstones over server rows; returns how many."""
        count = 0
        with self.transaction():
            for memory in memories:
                self._local_write("memory", memory)
                count += 1
        return count

    def get_row(self, kind: str, row_id: str) -> Any:
        """A memory, session or edge by exact id, or None."""
        with self._lock:
            return self._get(kind, row_id)

    # -- memories --------------------------------------------------------------------------

    def save(self, content: str, type: str = "fact", tags: Optional[List[str]] = None,
             summary: Optional[str] = None, draft: bool = False, ttl: Optional[int] = None,
             metadata: Optional[dict] = None, session_id: Optional[str] = None,
             source_repo: Optional[str] = None, source_file: Optional[str] = None,
             namespace_id: str = "global", memory_id: Optional[str] = None) -> Memory:
        """Save a new memory; ``ttl`` seconds makes it temporary (local-only until it expires)."""
        import uuid

        if not isinstance(content, str) or not content.strip():
            raise UsageError("Memory content is empty: give the text to save (or - to read stdin)")
        _refuse_nul(content=content, type=type, tags=tags, summary=summary, metadata=metadata)
        type = (type or "fact").strip() or "fact"
        now = utc_now()
        memory = Memory(
            id=memory_id or uuid.uuid4().hex, content=content, type=type,
            summary=summary, tags=_clean_tags(tags), namespace_id=namespace_id,
            source_repo=source_repo, source_file=source_file,
            session_id=session_id if session_id is not None else self.state("current_session"),
            metadata=dict(metadata or {}), created_at=now, updated_at=now, draft=draft,
            expires_at=format_ts(datetime.now(timezone.utc) + timedelta(seconds=ttl)) if ttl else None,
            content_hash=content_hash(content),
        )
        with self.transaction():
            if self._get("memory", memory.id) is not None:
                raise UsageError(f"Memory {memory.id} already exists")
            self._local_write("memory", memory)
        self._notify("upsert", [memory.id])
        return memory

    def resolve_id(self, memory_id: str, include_deleted: bool = False) -> str:
        """Exact id, or a unique prefix of at least 6 characters (CLI convenience only)."""
        with self._lock:
            if self._get("memory", memory_id) is not None:
                return memory_id
            if len(memory_id) >= 6:
                escaped = memory_id.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
                rows = self.conn.execute(
                    "SELECT id FROM memories WHERE id LIKE ? ESCAPE '\\'"
                    + ("" if include_deleted else " AND deleted_at IS NULL") + " LIMIT 2",
                    (escaped + "%",)).fetchall()
                if len(rows) == 1:
                    return rows[0][0]
                if len(rows) > 1:
                    raise UsageError(f"Memory id prefix {memory_id!r} is ambiguous; give more characters")
        raise NotFound(f"No memory with id {memory_id!r} (see: contextfs list)")

    def get(self, memory_id: str, include_deleted: bool = True) -> Memory:
        """A memory by id (or unique prefix); raises NotFound."""
        with self._lock:
            memory = self._get("memory", self.resolve_id(memory_id, include_deleted=True))
        if memory is None or (memory.deleted_at and not include_deleted):
            raise NotFound(f"No memory with id {memory_id!r} (see: contextfs list)")
        return memory

    def edit(self, memory_id: str, content: Optional[str] = None, type: Optional[str] = None,
             tags: Optional[List[str]] = None, summary: Optional[str] = None,
             metadata: Optional[dict] = None, publish: bool = False) -> Memory:
        """Change a memory; ``publish`` turns a draft into a normal (syncable) memory."""
        if content is not None and not content.strip():
            raise UsageError("Memory content is empty: give the new text (or - to read stdin)")
        _refuse_nul(content=content, type=type, tags=tags, summary=summary, metadata=metadata)
        with self.transaction():
            memory = self._get("memory", self.resolve_id(memory_id))
            if memory is None or memory.deleted_at:
                raise NotFound(f"No memory with id {memory_id!r} (see: contextfs list)")
            if content is not None:
                memory.content = content
                memory.content_hash = content_hash(content)
            if type is not None:
                memory.type = type.strip() or memory.type
            if tags is not None:
                memory.tags = _clean_tags(tags)
            if summary is not None:
                memory.summary = summary or None
            if metadata is not None:
                memory.metadata = dict(metadata)
            if publish:
                memory.draft = False
                memory.expires_at = None
            # Editing a conflict copy is one way of resolving it: it becomes a normal memory.
            if memory.conflict_of is not None:
                memory.conflict_of = None
                memory.metadata = {k: v for k, v in memory.metadata.items() if k != "conflict_of"}
            self._local_write("memory", memory)
        self._notify("upsert", [memory.id])
        return memory

    def delete(self, memory_id: str) -> Memory:
        """Delete a memory: a tombstone that syncs like any other change."""
        with self.transaction():
            memory = self._get("memory", self.resolve_id(memory_id))
            if memory is None or memory.deleted_at:
                raise NotFound(f"No memory with id {memory_id!r} (see: contextfs list)")
            # The text goes from this device as it goes from the server (to_wire): a deleted
            # memory, say a pasted secret, is not kept anywhere in the tombstone.
            memory.deleted_at = utc_now()
            self._local_write("memory", memory)
        self._notify("delete", [memory.id])
        return memory

    def list(self, type: Optional[str] = None, tag: Optional[str] = None, limit: int = 50,
             include_deleted: bool = False, conflicts_only: bool = False) -> List[Memory]:
        """Memories, newest first, optionally filtered by type or tag."""
        self.purge_expired()
        where, params = self._filters(type, include_deleted)
        if tag:
            where.append("EXISTS (SELECT 1 FROM json_each(memories.tags) WHERE value = ?)")
            params.append(tag)
        if conflicts_only:
            where.append("conflict_of IS NOT NULL")
        sql = "SELECT * FROM memories"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY updated_at DESC, id LIMIT ?"
        with self._lock:
            rows = self.conn.execute(sql, params + [max(0, int(limit))]).fetchall()
        return _from_rows(Memory, rows, _MEMORY_COLUMNS)

    @staticmethod
    def _filters(type: Optional[str], include_deleted: bool) -> Tuple[List[str], List[Any]]:
        where: List[str] = []
        params: List[Any] = []
        if not include_deleted:
            where.append("deleted_at IS NULL")
        if type:
            where.append("type = ?")
            params.append(type)
        return where, params

    def search(self, query: str, limit: int = 10, type: Optional[str] = None) -> List[SearchHit]:
        """Keyword search (FTS5 bm25 ranking with a snippet; LIKE when FTS5 is missing)."""
        self.purge_expired()
        if not query or not query.strip():
            raise UsageError("Search query is empty")
        where, params = self._filters(type, include_deleted=False)
        where = [f"m.{w}" for w in where]
        fts_query = _fts_query(query)
        with self._lock:
            if self.fts and fts_query:
                sql = ("SELECT m.*, bm25(memories_fts, 1.0, 0.5, 0.5) AS rank, "
                       "snippet(memories_fts, 0, '[', ']', '…', 12) AS snip "
                       "FROM memories_fts JOIN memories m ON m.rowid = memories_fts.rowid "
                       "WHERE memories_fts MATCH ?" + "".join(f" AND {w}" for w in where) +
                       " ORDER BY rank LIMIT ?")
                rows = self.conn.execute(sql, [fts_query] + params + [limit]).fetchall()
                return [SearchHit(memory, -float(r["rank"]), r["snip"], {"keyword": -float(r["rank"])})
                        for memory, r in zip(_from_rows(Memory, rows, _MEMORY_COLUMNS), rows)]
            return self._like_search(query, limit, where, params)

    def _like_search(self, query: str, limit: int, where: List[str], params: List[Any]) -> List[SearchHit]:
        words = [w.lower() for w in re.findall(r"\w+", query)] or [query.lower()]
        score_sql = " + ".join("(instr(lower(m.content || ' ' || coalesce(m.summary, '')), ?) > 0)"
                               for _ in words)
        sql = (f"SELECT m.*, ({score_sql}) AS score FROM memories m WHERE ({score_sql}) > 0"
               + "".join(f" AND {w}" for w in where) + " ORDER BY score DESC, m.updated_at DESC LIMIT ?")
        rows = self.conn.execute(sql, words + words + params + [limit]).fetchall()
        return [SearchHit(memory, float(r["score"]), _like_snippet(memory.content, words),
                          {"keyword": float(r["score"])})
                for memory, r in zip(_from_rows(Memory, rows, _MEMORY_COLUMNS), rows)]

    def purge_expired(self) -> int:
        """Remove expired temporary memories (they never left this device)."""
        now = utc_now()
        with self._lock:
            if self.conn.execute("SELECT 1 FROM memories WHERE expires_at IS NOT NULL AND expires_at <= ? "
                                 "LIMIT 1", (now,)).fetchone() is None:
                return 0  # the common case: no write transaction at all
            with self.transaction():
                # Decide and delete in one statement, under the write lock: a memory published
                # (expires_at cleared) a moment ago is no longer expired and stays.
                ids = [r[0] for r in self.conn.execute(
                    "DELETE FROM memories WHERE expires_at IS NOT NULL AND expires_at <= ? RETURNING id", (now,))]
        if ids:
            self._notify("delete", ids)
        return len(ids)

    def counts(self) -> Dict[str, int]:
        """Counts for status output: live memories, drafts, temporary, conflicts, dirty rows, …"""
        q = self.conn.execute
        with self._lock:
            mem = q("SELECT count(*) FILTER (WHERE deleted_at IS NULL), "
                    "count(*) FILTER (WHERE deleted_at IS NULL AND draft = 1), "
                    "count(*) FILTER (WHERE deleted_at IS NULL AND expires_at IS NOT NULL), "
                    "count(*) FILTER (WHERE deleted_at IS NULL AND conflict_of IS NOT NULL), "
                    "count(*) FILTER (WHERE dirty = 1 AND draft = 0 AND expires_at IS NULL), "
                    "count(*) FILTER (WHERE deleted_at IS NULL AND dirty = 0 AND sealed = 0 AND draft = 0 "
                    "AND expires_at IS NULL) FROM memories").fetchone()
            ses = q("SELECT count(*) FILTER (WHERE deleted_at IS NULL), count(*) FILTER (WHERE dirty = 1), "
                    "count(*) FILTER (WHERE deleted_at IS NULL AND conflict_of IS NOT NULL) FROM sessions").fetchone()
            edg = q("SELECT count(*) FILTER (WHERE deleted_at IS NULL), count(*) FILTER (WHERE dirty = 1) "
                    "FROM edges").fetchone()
        return {"memories": mem[0], "drafts": mem[1], "temporary": mem[2], "conflicts": mem[3] + ses[2],
                "sessions": ses[0], "edges": edg[0],
                "pending_push": mem[4] + ses[1] + edg[1], "synced_unencrypted": mem[5]}

    # -- conflict copies -------------------------------------------------------------------

    def conflicts(self) -> List[Any]:
        """Unresolved conflict copies (``<id>_local``) of memories, then of sessions, newest first."""
        with self._lock:
            sessions = _from_rows(Session, self.conn.execute(
                "SELECT * FROM sessions WHERE conflict_of IS NOT NULL AND deleted_at IS NULL "
                "ORDER BY updated_at DESC").fetchall(), _SESSION_COLUMNS)
        return self.list(limit=10_000, conflicts_only=True) + sessions

    def resolve_conflict(self, memory_id: str, keep: str) -> Any:
        """Resolve a conflict: keep 'cloud' (drop the copy) or 'local' (its text wins next push).

        ``memory_id`` may be the original id or the copy's id, of a memory or a session.
        Keeping local makes the copy's data a new version of the original whose clock dominates
        the cloud's, so it wins. Copies are synced (backups), so dropping one is a tombstone:
        resolving on one device resolves on every device.
        """
        if keep not in ("local", "cloud"):
            raise UsageError("--keep must be local or cloud")
        with self.transaction():
            kind, copies = "memory", []
            for kind in ("memory", "session"):
                table, cls, columns = _KINDS[kind]
                row = self._get(kind, memory_id)
                if row is not None and row.conflict_of and not row.deleted_at:
                    copies = [row]
                else:
                    copies = _from_rows(cls, self.conn.execute(
                        f"SELECT * FROM {table} WHERE conflict_of = ? AND deleted_at IS NULL "
                        "ORDER BY updated_at DESC", (memory_id,)).fetchall(), columns)
                if copies:
                    break
            if not copies:
                raise NotFound(f"No unresolved conflict for {memory_id!r} (see: contextfs cloud conflicts)")
            if keep == "local" and len(copies) > 1:
                raise UsageError(f"{memory_id} has {len(copies)} conflict copies; resolve one copy id at a time: "
                                 + ", ".join(c.id for c in copies))
            original = self._get(kind, copies[0].conflict_of)
            if keep == "local":
                copy = copies[0]
                if original is None and kind == "memory":
                    original = Memory(id=copy.conflict_of, content=copy.content, created_at=copy.created_at)
                elif original is None:
                    original = Session(id=copy.conflict_of, started_at=copy.started_at)
                names = (("content", "type", "summary", "tags", "metadata", "source_repo", "source_file",
                          "session_id", "content_hash") if kind == "memory"
                         else ("label", "tool", "repo", "ended_at", "summary", "metadata"))
                for name in names:
                    setattr(original, name, getattr(copy, name))
                original.metadata = {k: v for k, v in original.metadata.items() if k != "conflict_of"}
                original.deleted_at = None
                self._local_write(kind, original)
            for copy in copies:  # a tombstone, so that every device drops its copy too
                copy.deleted_at = utc_now()
                self._local_write(kind, copy)
        if kind == "memory":
            self._notify("delete", [c.id for c in copies])
            if keep == "local":
                self._notify("upsert", [original.id])
        return original if original is not None else copies[0]

    # -- what the sync engine reads and writes (all of its SQL is here) ----------------------

    def pushable_rows(self, kind: str, push_all: bool, after: int, limit: int) -> Tuple[List[Any], int]:
        """A chunk of rows to push (dirty ones, or with push_all every syncable one) after a key,
        and the key to continue from (keyset paging: memory use stays flat)."""
        table, cls, columns = _KINDS[kind]
        where = _PUSHABLE[kind]
        if push_all:
            order, key_sql = "rowid", "rowid > ?"
        else:
            where += " AND dirty = 1"
            order, key_sql = "seq", "seq > ?"
        with self._lock:
            rows = self.conn.execute(
                f"SELECT rowid AS _rowid, * FROM {table} WHERE {where} AND {key_sql} "
                f"ORDER BY {order} LIMIT ?", (after, limit)).fetchall()
        if not rows:
            return [], after
        return _from_rows(cls, rows, columns), rows[-1]["_rowid"] if push_all else rows[-1]["seq"]

    def local_only_ids(self, ids: Iterable[str]) -> set:
        """Which of these memory ids are drafts or temporary (or not in the store at all)."""
        ids = list(set(ids))
        with self._lock:
            ok = {r[0] for r in self.conn.execute(
                f"SELECT id FROM memories WHERE id IN (SELECT value FROM json_each(?)) AND {_PUSHABLE['memory']}",
                (_dumps(ids),))}
        return set(ids) - ok

    def existing_ids(self, kind: str, ids: Iterable[str]) -> set:
        """Which of these ids are rows of this kind in the store (one query)."""
        with self._lock:
            return {r[0] for r in self.conn.execute(
                f"SELECT id FROM {_KINDS[kind][0]} WHERE id IN (SELECT value FROM json_each(?))",
                (_dumps(list(set(ids))),))}

    def pending_deletions(self) -> Tuple[int, int]:
        """(memory deletions waiting to be pushed, memories the server would hold before them).

        The whole store is counted only when there are enough deletions to matter."""
        where = _PUSHABLE["memory"]
        with self._lock:
            deletions = self.conn.execute(
                f"SELECT count(*) FROM memories WHERE dirty = 1 AND deleted_at IS NOT NULL AND {where}").fetchone()[0]
            total = 0
            if deletions > MASS_DELETE_MIN:
                total = self.conn.execute(
                    f"SELECT count(*) FROM memories WHERE {where} AND (deleted_at IS NULL OR dirty = 1)").fetchone()[0]
        return deletions, total

    def mark_pushed(self, kind: str, settled: Dict[str, Tuple[int, Optional[Clock]]], sealed: bool = False) -> None:
        """Mark pushed rows clean (and take the server's clock when it sent one), but only rows
        not rewritten since they were read: a write that raced the push stays dirty. ``sealed``:
        the memories went up end-to-end encrypted."""
        if not settled:
            return
        table = _KINDS[kind][0]
        also = f", sealed = {int(sealed)}" if kind == "memory" else ""
        with self.transaction():
            self.conn.executemany(
                f"UPDATE {table} SET dirty = 0, vector_clock = coalesce(?, vector_clock){also} "
                f"WHERE id = ? AND seq = ? AND dirty = 1",
                [(_dumps(clock) if clock else None, row_id, seq) for row_id, (seq, clock) in settled.items()])

    def change_mark(self) -> int:
        """The local write counter: it moves whenever something is written here to be pushed."""
        with self._lock:
            return self.conn.execute("SELECT value FROM counters WHERE name = 'seq'").fetchone()[0]

    def mark_dirty(self, kind: str, ids: Iterable[str]) -> int:
        """Make clean syncable rows dirty again (the server lost them): they are pushed next."""
        table = _KINDS[kind][0]
        count = 0
        with self.transaction():
            for row_id in ids:
                seq = self._next_seq()
                count += self.conn.execute(
                    f"UPDATE {table} SET dirty = 1, seq = ? WHERE id = ? AND dirty = 0 AND {_PUSHABLE[kind]}",
                    (seq, row_id)).rowcount
        return count

    def local_versions(self, kind: str, ids: List[str]) -> Dict[str, Any]:
        """The local rows for these ids (one query)."""
        table, cls, columns = _KINDS[kind]
        with self._lock:
            rows = self.conn.execute(
                f"SELECT * FROM {table} WHERE id IN (SELECT value FROM json_each(?))", (_dumps(ids),)).fetchall()
        return {r["id"]: obj for r, obj in zip(rows, _from_rows(cls, rows, columns))}

    def ids(self, kind: str) -> "_StoreIds":
        """A container answering ``id in store.ids(kind)`` with one indexed lookup per question."""
        return _StoreIds(self, _KINDS[kind][0])

    def live_memory_count(self) -> int:
        """Live memories that are not conflict copies (the mass-delete guard's total)."""
        with self._lock:
            return self.conn.execute(
                "SELECT count(*) FROM memories WHERE deleted_at IS NULL AND conflict_of IS NULL").fetchone()[0]

    def manifest(self, kind: str = "memory", keyed: Optional[Callable[[str], str]] = None
                 ) -> List[Tuple[str, Optional[str], bool, bool]]:
        """(id, content_hash, deleted, dirty) of every syncable row of a kind (for /api/sync/diff;
        sessions and edges have no hash). ``keyed`` turns the plain hash of a live memory the
        server holds sealed into the one it was sent with (keyed_content_hash)."""
        table = _KINDS[kind][0]
        hashed = "content_hash" if kind == "memory" else "NULL"
        sealed = "sealed" if kind == "memory" and keyed is not None else "0"
        if kind == "edge":  # an edge's id is from_id:to_id:relation (Edge.id)
            ident = "from_id || ':' || to_id || ':' || relation"
            where = f"from_id IN (SELECT id FROM memories WHERE {_PUSHABLE['memory']}) " \
                    f"AND to_id IN (SELECT id FROM memories WHERE {_PUSHABLE['memory']})"
        else:
            ident, where = "id", _PUSHABLE[kind]
        with self._lock:
            return [(r[0], keyed(r[1]) if r[4] and r[2] is None and r[1] else r[1], r[2] is not None, bool(r[3]))
                    for r in self.conn.execute(f"SELECT {ident}, {hashed}, deleted_at, dirty, {sealed} FROM {table} "
                                               f"WHERE {where}")]

    def apply_page(self, ops: List[Op], cursor_key: Optional[str] = None,
                   cursor: Optional[str] = None) -> Tuple[List[str], List[str]]:
        """Apply one page's ops in ONE transaction together with its cursor (CouchDB-style
        checkpoint: the cursor never runs ahead of what is committed). Returns the memory ids
        written live and those written as tombstones (for the semantic index)."""
        upserted: List[str] = []
        deleted: List[str] = []
        with self.transaction():
            for kind in ("session", "memory", "edge"):
                writes = []
                for op in ops:
                    if op.kind != kind or not op.changes_local:
                        continue
                    if op.op == APPLY_PUBLISH:  # ours, published as it is (clock and all): pushed next
                        self._write(kind, op.row, dirty=True)
                        continue
                    if op.copy is not None:  # the local version, kept under its new id: pushed next
                        self._write(kind, op.copy, dirty=True)
                        if kind == "memory":
                            upserted.append(op.copy.id)
                    op.row.dirty, op.row.seq = False, 0
                    writes.append(op.row)
                    if kind == "memory":
                        (deleted if op.row.deleted_at else upserted).append(op.row.id)
                if writes:
                    self._write_many(kind, writes)
            if cursor_key is not None and cursor is not None:
                self.set_state(cursor_key, cursor)
        return upserted, deleted

    def _write_many(self, kind: str, objs: List[Any]) -> None:
        table, _cls, columns = _KINDS[kind]
        conn = self.conn
        assignments = ", ".join(f"{c} = excluded.{c}" for c in columns if c != "id")
        upsert = f"ON CONFLICT(id) DO UPDATE SET {assignments}"
        rows = [_to_row(o, columns) for o in objs]
        if kind != "memory" or not self.fts:
            conn.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))}) "
                             f"{upsert}", rows)
            return
        # The FTS triggers make every row its own statement journal, and SQLite (< 3.44) flushes
        # FTS5's pending terms at each one: a page of 1,000 tiny index segments to merge, twice
        # the work of the whole pull. Staged in an untyped temp table (values kept exactly as
        # bound), the page goes in as ONE statement: one flush per page.
        stage = "temp._pull_stage_memories"
        conn.execute(f"CREATE TEMP TABLE IF NOT EXISTS _pull_stage_memories ({', '.join(columns)})")
        conn.execute(f"DELETE FROM {stage}")
        conn.executemany(f"INSERT INTO {stage} VALUES ({', '.join('?' * len(columns))})", rows)
        conn.execute(f"INSERT INTO {table} ({', '.join(columns)}) SELECT {', '.join(columns)} FROM {stage} "
                     f"WHERE true ORDER BY rowid {upsert}")  # WHERE: the upsert needs it after a SELECT
        conn.execute(f"DELETE FROM {stage}")

    # -- edges -----------------------------------------------------------------------------

    def link(self, from_id: str, to_id: str, relation: str = "related_to", weight: float = 1.0,
             metadata: Optional[dict] = None) -> Edge:
        """Create (or revive/update) a relationship between two memories."""
        if not relation or not relation.strip():
            raise UsageError("Relation is empty: give --relation, e.g. related_to")
        if len(relation.strip()) > MAX_ID_CHARS:  # the server would refuse it and every later push
            raise UsageError(f"Relation is longer than {MAX_ID_CHARS} characters; use a short name")
        _refuse_nul(relation=relation, metadata=metadata)
        with self.transaction():
            from_id = self.resolve_id(from_id)
            to_id = self.resolve_id(to_id)
            edge = Edge(from_id=from_id, to_id=to_id, relation=relation.strip())
            existing = self._get("edge", edge.id)
            if existing is not None:
                edge = existing
                edge.deleted_at = None
            else:
                edge.created_at = utc_now()
            edge.weight = float(weight)
            if metadata is not None:
                edge.metadata = dict(metadata)
            self._local_write("edge", edge)
        return edge

    def unlink(self, from_id: str, to_id: str, relation: str = "related_to") -> Edge:
        """Delete a relationship (a tombstone that syncs)."""
        with self.transaction():
            edge = self._get("edge", Edge(from_id, to_id, relation).id)
            if edge is None or edge.deleted_at:
                raise NotFound(f"No relationship {from_id} -[{relation}]-> {to_id}")
            edge.deleted_at = utc_now()
            self._local_write("edge", edge)
        return edge

    def edges(self, memory_id: Optional[str] = None, include_deleted: bool = False) -> List[Edge]:
        """Relationships, optionally those touching one memory."""
        sql, params = "SELECT * FROM edges WHERE 1=1", []
        if not include_deleted:
            sql += " AND deleted_at IS NULL"
        if memory_id:
            sql += " AND (from_id = ? OR to_id = ?)"
            params += [memory_id, memory_id]
        with self._lock:
            rows = self.conn.execute(sql + " ORDER BY created_at", params).fetchall()
        return _from_rows(Edge, rows, _EDGE_COLUMNS)

    # -- sessions --------------------------------------------------------------------------

    def session_start(self, label: Optional[str] = None, tool: str = "contextfs",
                      repo: Optional[str] = None) -> Session:
        """Start a session; new memories are attached to it until it ends."""
        import uuid

        _refuse_nul(label=label, tool=tool, repo=repo)
        now = utc_now()
        session = Session(id=str(uuid.uuid4()), label=label, tool=tool or "contextfs",
                          repo=repo, started_at=now)
        with self.transaction():
            self._local_write("session", session)
            self.set_state("current_session", session.id)
        return session

    def session_end(self, session_id: Optional[str] = None, summary: Optional[str] = None) -> Session:
        """End a session (default: the current one), storing its summary."""
        _refuse_nul(summary=summary)
        with self.transaction():
            sid = session_id or self.state("current_session")
            if not sid:
                raise NotFound("No session is running (start one: contextfs session start)")
            session = self._get("session", sid)
            if session is None or session.deleted_at:
                raise NotFound(f"No session with id {sid!r} (see: contextfs session list)")
            session.ended_at = session.ended_at or utc_now()
            if summary is not None:
                session.summary = summary
            self._local_write("session", session)
            if self.state("current_session") == sid:
                self.set_state("current_session", None)
        return session

    def sessions(self, limit: int = 50) -> List[Session]:
        """Sessions, newest first."""
        with self._lock:
            rows = self.conn.execute("SELECT * FROM sessions WHERE deleted_at IS NULL "
                                     "ORDER BY started_at DESC LIMIT ?", (limit,)).fetchall()
        return _from_rows(Session, rows, _SESSION_COLUMNS)


class _Transaction:
    """BEGIN IMMEDIATE … COMMIT; nested use joins the outer transaction."""

    def __init__(self, store: Store):
        self.store = store
        self.outer = False

    def __enter__(self) -> "_Transaction":
        conn = self.store.conn
        self.store._lock.acquire()
        try:
            self.outer = not conn.in_transaction
            if self.outer:
                conn.execute("BEGIN IMMEDIATE")
        except BaseException:  # no __exit__ follows a failed __enter__: release here
            self.store._lock.release()
            raise
        return self

    def __exit__(self, kind: Any, value: Any, tb: Any) -> None:
        conn = self.store.conn
        try:
            if self.outer:
                if kind is None:
                    try:
                        conn.execute("COMMIT")
                    except sqlite3.Error:
                        if conn.in_transaction:
                            conn.execute("ROLLBACK")
                        raise
                # A failed write (disk full, I/O error) may have rolled back already: a second
                # ROLLBACK would fail and hide the real error.
                elif conn.in_transaction:
                    conn.execute("ROLLBACK")
        finally:
            self.store._lock.release()


class _StoreIds:
    """``id in ids`` for one table: an indexed lookup per question, nothing loaded up front."""

    def __init__(self, store: Store, table: str):
        self.store, self.table = store, table

    def __contains__(self, row_id: object) -> bool:
        with self.store._lock:
            return self.store.conn.execute(f"SELECT 1 FROM {self.table} WHERE id = ?", (row_id,)).fetchone() is not None


def _split_sql(script: str, triggers: bool = False) -> List[str]:
    """Split a schema script into statements (trigger bodies kept whole)."""
    if not triggers:
        return [s.strip() for s in script.split(";") if s.strip()]
    parts = re.split(r";\s*\n(?=CREATE)", script.strip())
    return [p.strip().rstrip(";") + (";" if p.strip().upper().endswith("END") else "")
            for p in parts if p.strip()]


def _clean_tags(tags: Optional[Iterable[str]]) -> List[str]:
    seen: List[str] = []
    for tag in tags or []:
        tag = tag.strip()
        if tag and tag not in seen:
            seen.append(tag)
    return seen


def _like_snippet(text: str, words: List[str], width: int = 80) -> str:
    lower = text.lower()
    positions = [lower.find(w) for w in words if lower.find(w) >= 0]
    start = max(0, min(positions) - width // 3) if positions else 0
    piece = text[start:start + width]
    return ("…" if start else "") + piece + ("…" if start + width < len(text) else "")


def _refuse_nul(**fields: Any) -> None:
    """Refuse text holding NUL (see nul_path): it could never be pushed, so it is never saved."""
    for name, value in fields.items():
        if value is not None and nul_path(value) is not None:
            raise UsageError(f"The {name} contains a NUL character (\\0), which sync servers cannot store; "
                             f"remove it (nothing was saved)")


_WRITE_FAILURES = ("SQLITE_FULL", "SQLITE_IOERR_WRITE", "SQLITE_IOERR_SHMSIZE", "SQLITE_IOERR_TRUNCATE",
                   "SQLITE_IOERR_FSYNC", "SQLITE_IOERR_SHMOPEN", "SQLITE_IOERR_SHMMAP", "SQLITE_IOERR_MMAP")


def _store_error(path: Path, exc: Exception) -> StoreError:
    text = str(exc)
    if "not a database" in text or "malformed" in text:
        # "Untouched" would be a promise SQLite cannot keep: damage deep in the file shows only
        # when a page is read, after other pages may have been written. We never replace it.
        return StoreError(f"{path} is not a valid SQLite database ({text}). contextfs will not repair or "
                          f"replace it: restore a backup, or move it aside (mv {path} {path}.bak) to start a new store "
                          f"and pull your memories again with: contextfs cloud sync")
    if "readonly" in text or "unable to open" in text:
        return StoreError(f"{path}: cannot write the local store ({text}); check the permissions of {path.parent}")
    name = getattr(exc, "sqlite_errorname", "")  # Python 3.11+
    if "full" in text or name in _WRITE_FAILURES or (
            "I/O error" in text and (not name or _free_bytes(path.parent) < 1024 * 1024)):
        # A full disk (ENOSPC) or a file size limit (EFBIG) surfaces as SQLITE_FULL or as an
        # I/O error on write/extend; a completely full disk often as a plain I/O error.
        return StoreError(f"{path}: cannot write: the disk is full or the file is too large ({text}); "
                          f"free some space and retry — nothing was lost")
    return StoreError(f"{path}: local database error: {text}")


def _os_error_line(exc: OSError) -> str:
    """One line for a failed file operation (a full disk named as such)."""
    import errno

    where = f" ({exc.filename})" if exc.filename else ""
    if exc.errno in (errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", -1)):
        return (f"Cannot write{where}: the disk is full or the file is too large ({exc.strerror}); "
                f"free some space and retry — nothing was lost")
    return f"{exc.strerror or exc}{where}; nothing was lost"


def _free_bytes(directory: Path) -> int:
    try:
        st = os.statvfs(directory)
        return st.f_bavail * st.f_frsize
    except (OSError, AttributeError):  # no statvfs (Windows): assume there is room
        return 1 << 62


class PublicStore:
    """The public ContextFS client's store (``context.db`` of contextfs 0.2.35), opened
    read-only: its memories, sessions and relationships as our rows. Its schema (alembic
    migrations of that version): ``memories``, ``sessions``, ``memory_edges`` with a
    ``vector_clock`` column each, and ``sync_state`` (one row per device: ``last_sync_at``)."""

    NEEDED = {"memories": {"id", "content", "type", "tags", "summary", "namespace_id", "created_at", "updated_at",
                           "metadata", "vector_clock", "deleted_at"},
              "sessions": {"id", "label", "tool", "started_at", "ended_at", "summary", "metadata"},
              "memory_edges": {"from_id", "to_id", "relation", "weight", "created_at"}}

    def __init__(self, path: Path):
        self.path = path
        problem = "it does not exist" if not path.is_file() else None
        if problem is None:
            try:
                self.conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
                self.conn.row_factory = sqlite3.Row
                tables = {name: {r[1] for r in self.conn.execute(f"PRAGMA table_info({name})")}
                          for (name,) in self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            except sqlite3.Error as exc:
                problem = f"not an SQLite database ({exc})"
            else:
                missing = [f"{table}.{column}" for table, columns in self.NEEDED.items()
                           for column in sorted(columns - tables.get(table, set()))]
                if missing:
                    problem = f"not a ContextFS store (no {', '.join(missing[:3])})"
                self.has_sessions_clock = "vector_clock" in tables.get("sessions", set())
                self.has_edges_clock = "vector_clock" in tables.get("memory_edges", set())
                self.has_sync_state = "sync_state" in tables
        if problem is not None:
            raise UsageError(f"{path}: {problem}; nothing was imported")

    def close(self) -> None:
        """Close the connection."""
        self.conn.close()

    def last_sync(self) -> Tuple[Optional[datetime], Optional[str]]:
        """When it last synced, and with which server (None, None if never)."""
        if not self.has_sync_state:
            return None, None
        row = self.conn.execute("SELECT last_sync_at, server_url FROM sync_state "
                                "WHERE last_sync_at IS NOT NULL ORDER BY last_sync_at DESC LIMIT 1").fetchone()
        if row is None:
            return None, None
        return _public_ts(row[0]), row[1]

    def devices(self) -> List[str]:
        """The device ids it synced as."""
        if not self.has_sync_state:
            return []
        return [r[0] for r in self.conn.execute("SELECT device_id FROM sync_state") if r[0]]

    def counts(self) -> Dict[str, int]:
        """Rows per table (for progress)."""
        return {table: self.conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] for table in self.NEEDED}

    def memories(self) -> Iterator[Tuple[Memory, Optional[str], Optional[str]]]:
        """(memory, the content hash it had when that client last pushed it, updated_at as
        written) for every memory, in rowid order."""
        for row in self.conn.execute("SELECT * FROM memories ORDER BY rowid"):
            metadata = _public_json(row["metadata"], dict)
            clock = _public_json(row["vector_clock"], dict) or metadata.get("_vector_clock") or {}
            pushed_hash = metadata.pop("_content_hash", None)
            metadata.pop("_vector_clock", None)
            keys = row.keys()
            wire = {"id": row["id"], "content": row["content"], "type": row["type"],
                    "tags": [t for t in _public_json(row["tags"], list) if isinstance(t, str)],
                    "summary": row["summary"], "namespace_id": row["namespace_id"],
                    "source_repo": row["source_repo"] if "source_repo" in keys else None,
                    "source_file": row["source_file"] if "source_file" in keys else None,
                    "session_id": row["session_id"] if "session_id" in keys else None,
                    "metadata": metadata, "created_at": _public_ts_text(row["created_at"]),
                    "updated_at": _public_ts_text(row["updated_at"]),
                    "deleted_at": _public_ts_text(row["deleted_at"]), "vector_clock": clock,
                    **{k: row[k] for k in _MEMORY_WIRE_EXTRAS if k in keys and row[k] is not None}}
            yield Memory.from_wire(wire), pushed_hash if isinstance(pushed_hash, str) else None, row["updated_at"]

    def sessions(self) -> Iterator[Session]:
        """Every session as ours (its repo_path is our repo)."""
        for row in self.conn.execute("SELECT * FROM sessions ORDER BY rowid"):
            keys = row.keys()
            wire = {"id": row["id"], "label": row["label"], "tool": row["tool"],
                    "repo_path": row["repo_path"] if "repo_path" in keys else None,
                    "started_at": _public_ts_text(row["started_at"]), "ended_at": _public_ts_text(row["ended_at"]),
                    "summary": row["summary"], "metadata": _public_json(row["metadata"], dict),
                    "updated_at": _public_ts_text(row["ended_at"] or row["started_at"]),
                    "deleted_at": _public_ts_text(row["deleted_at"]) if "deleted_at" in keys else None,
                    "vector_clock": _public_json(row["vector_clock"], dict) if self.has_sessions_clock else {},
                    **{k: row[k] for k in _SESSION_WIRE_EXTRAS if k in keys and row[k] is not None}}
            yield Session.from_wire(wire)

    def edges(self) -> Iterator[Edge]:
        """Every relationship as ours."""
        for row in self.conn.execute("SELECT * FROM memory_edges ORDER BY rowid"):
            keys = row.keys()
            yield Edge.from_wire({
                "from_id": row["from_id"], "to_id": row["to_id"], "relation": row["relation"],
                "weight": row["weight"] if row["weight"] is not None else 1.0,
                "metadata": _public_json(row["metadata"], dict) if "metadata" in keys else {},
                "created_at": _public_ts_text(row["created_at"]), "updated_at": _public_ts_text(row["created_at"]),
                "deleted_at": _public_ts_text(row["deleted_at"]) if "deleted_at" in keys else None,
                "vector_clock": _public_json(row["vector_clock"], dict) if self.has_edges_clock else {}})


def _public_json(text: Any, kind: type) -> Any:
    """A JSON column of the public client's store, or an empty ``kind`` when it is not one."""
    try:
        value = json.loads(text) if isinstance(text, str) and text else None
    except ValueError:
        value = None
    return value if isinstance(value, kind) else kind()


def _public_ts(text: Any) -> Optional[datetime]:
    """A timestamp of the public client's store: naive ones are the machine's local time (it
    writes datetime.now() without a zone), aware ones as they say."""
    if not isinstance(text, str) or not text.strip():
        return None
    try:
        dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00").replace(" ", "T"))
    except ValueError:
        return None
    return (dt.astimezone() if dt.tzinfo is None else dt).astimezone(timezone.utc)


def _public_ts_text(text: Any) -> Optional[str]:
    """The same timestamp in our form, as the server holds it (the public client sends naive
    ones as written, and servers read them as UTC: protocol.md §1), so the versions match."""
    if not isinstance(text, str) or not text.strip():
        return None
    try:
        return normalize_ts(text.strip().replace(" ", "T"))
    except ValueError:
        return None


def open_store(home: Optional[Path] = None) -> Store:
    """Open (creating and migrating if needed) the store at ``$CONTEXTFS_HOME/sync.db``."""
    home = Path(home) if home else contextfs_home()
    try:
        ensure_home(home)
        return Store(home / "sync.db", device_id(home))
    except OSError as exc:
        raise StoreError(f"{home}: cannot use the contextfs home ({exc.strerror})") from None


# ---- 7. semantic index -------------------------------------------------------------------
# Derived data: one ChromaDB collection under $CONTEXTFS_HOME/chroma whose ids are memory ids.
# SQLite stays the source of truth, so the index can be deleted and rebuilt at any time; and
# because it is only a search aid, a failure here never fails a save or a sync: the index is
# marked stale (one warning line) and search falls back to keywords until `index rebuild`.
# Embeddings never leave the device (protocol.md §10): nothing here touches the wire.

INDEX_DIRNAME = "chroma"
INDEX_COLLECTION = "memories"
INDEX_SEARCH_EF = 200
INDEX_BATCH = 256                     # memories read, embedded and upserted per step
INDEX_STALE_KEY = "index_stale"       # sync_state: why the index needs a rebuild
SEMANTIC_HINT = "pip install 'contextfs-sync[semantic]'"
REBUILD_HINT = "run: contextfs index rebuild"
MINILM_MODEL = "all-MiniLM-L6-v2"
RRF_K = 60                            # reciprocal-rank fusion constant (Cormack et al. 2009)


class IndexUnavailable(ContextFSError):
    """The semantic index or its embedding model cannot be used (search keeps working)."""


def chromadb_installed() -> bool:
    """Whether the optional ``chromadb`` package can be imported (checked without importing it)."""
    import importlib.util

    try:
        return importlib.util.find_spec("chromadb") is not None
    except (ImportError, ValueError):
        return False


def index_path(home: Path) -> Path:
    """Where the persistent index lives: ``$CONTEXTFS_HOME/chroma``."""
    return Path(home) / INDEX_DIRNAME


def index_text(memory: Memory) -> str:
    """The text embedded for a memory: summary, content and tags."""
    parts = [memory.summary or "", memory.content, " ".join(memory.tags)]
    return "\n".join(p for p in parts if p)


def _indexable(memory: Optional[Memory]) -> bool:
    # Ciphertext (a row we could not decrypt) would only pollute the vector space.
    return memory is not None and not memory.deleted_at and not memory.encrypted


_HASH_STOPWORDS = frozenset(
    "a an and are as at be been but by can do does for from had has have how i if in into is it "
    "its me my no not of on or our so than that the their them then there these they this to "
    "was we were what when where which who will with you your".split())


class HashEmbedder:
    """Offline, deterministic feature hashing of words and character trigrams (384 dims).

    Honest lexical vectors: they match shared words and shared word pieces ("deploy" and
    "deployments", "migrate" and "migrations"), never synonyms. Lower quality than MiniLM,
    but needs no model, no network, and is identical on every machine.
    """

    name = "hash"
    model_id = "hash-v1"
    dim = 384
    min_similarity = 0.2  # vector-only hits below this are noise from common trigrams

    def __call__(self, texts: List[str]) -> List[List[float]]:
        """Embed texts as L2-normalised vectors."""
        return [self._embed(text) for text in texts]

    def _embed(self, text: str) -> List[float]:
        import math
        import zlib

        weights: Dict[str, float] = {}
        for word in re.findall(r"\w+", text.lower()):
            if word in _HASH_STOPWORDS or len(word) < 2:
                continue
            weights[word] = weights.get(word, 0.0) + 1.0
            padded = f"<{word}>"
            for i in range(len(padded) - 2):
                gram = "#" + padded[i:i + 3]
                weights[gram] = weights.get(gram, 0.0) + 0.5
        vector = [0.0] * self.dim
        for feature, weight in weights.items():
            h = zlib.crc32(feature.encode("utf-8"))
            # Sublinear term frequency; the sign bit spreads collisions around zero.
            value = 1.0 + math.log(weight) if weight >= 1 else weight
            vector[h % self.dim] += value if h & 0x80000000 else -value
        norm = math.sqrt(sum(v * v for v in vector))
        return [v / norm for v in vector] if norm else vector


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 (384 dims) on onnxruntime from local files: ``model.onnx`` + ``tokenizer.json``.

    The same model ChromaDB's default embedding function runs; we run it ourselves so that we
    control where the files come from and never download at save or sync time.
    """

    name = "default"
    model_id = MINILM_MODEL
    dim = 384
    min_similarity = 0.25

    def __init__(self, model_file: Path, tokenizer_file: Path, source: str = ""):
        import onnxruntime
        from tokenizers import Tokenizer

        self.source = source or str(model_file.parent)
        self.tokenizer = Tokenizer.from_file(str(tokenizer_file))
        self.tokenizer.enable_truncation(max_length=256)  # sentence-transformers' max_seq_length
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        self.session = onnxruntime.InferenceSession(str(model_file), sess_options=options,
                                                    providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}

    def __call__(self, texts: List[str]) -> List[List[float]]:
        """Embed texts: mean pooling over tokens, L2-normalised (as sentence-transformers does)."""
        import numpy as np

        out = []
        for start in range(0, len(texts), 32):
            encoded = self.tokenizer.encode_batch(texts[start:start + 32])
            ids = np.array([e.ids for e in encoded], dtype=np.int64)
            mask = np.array([e.attention_mask for e in encoded], dtype=np.int64)
            feed = {"input_ids": ids, "attention_mask": mask}
            if "token_type_ids" in self.inputs:
                feed["token_type_ids"] = np.zeros_like(ids)
            hidden = self.session.run(None, {k: v for k, v in feed.items() if k in self.inputs})[0]
            if hidden.ndim == 3:  # token states: pool them; some exports pool already
                weights = mask[:, :, None].astype(hidden.dtype)
                hidden = (hidden * weights).sum(1) / np.clip(weights.sum(1), 1e-9, None)
            norms = np.linalg.norm(hidden, axis=1, keepdims=True)
            out.extend((hidden / np.clip(norms, 1e-12, None)).astype(np.float32).tolist())
        return out


def _chroma_model_dir() -> Path:
    """Where ChromaDB keeps all-MiniLM-L6-v2 after its first-use download."""
    return Path.home() / ".cache" / "chroma" / "onnx_models" / MINILM_MODEL / "onnx"


def _minilm_files() -> Optional[Tuple[Path, Path, str]]:
    """Local (model.onnx, tokenizer.json, description) for MiniLM, or None: never downloads."""
    cache = _chroma_model_dir()
    if (cache / "model.onnx").is_file() and (cache / "tokenizer.json").is_file():
        return cache / "model.onnx", cache / "tokenizer.json", f"chromadb cache ({cache})"
    return None


def _download_minilm() -> None:
    """Let ChromaDB fetch its default model into its cache (only on an explicit rebuild)."""
    from chromadb.utils.embedding_functions import ONNXMiniLM_L6_V2

    ONNXMiniLM_L6_V2()(["warm-up"])


_EMBEDDERS: Dict[str, Any] = {}


def load_embedder(name: str, allow_download: bool = False) -> Any:
    """The embedder for ``[index] embedder``; raises IndexUnavailable if its model is not local."""
    if name in _EMBEDDERS:
        return _EMBEDDERS[name]
    if name == "hash":
        embedder: Any = HashEmbedder()
    elif name == "default":
        files = _minilm_files()
        if files is None and allow_download:
            try:
                _download_minilm()
            except Exception as exc:
                raise IndexUnavailable(f"cannot download {MINILM_MODEL} ({_one_reason(exc)}); set [index] embedder = \"hash\" "
                                       f"in config.toml to index offline") from None
            files = _minilm_files()
        if files is None:
            # Saves and syncs never wait on a download: only `index rebuild` fetches the model.
            raise IndexUnavailable(f"{MINILM_MODEL} is not downloaded yet; or set [index] "
                                   f'embedder = "hash" to stay offline')
        try:
            embedder = MiniLMEmbedder(*files)
        except Exception as exc:
            raise IndexUnavailable(f"cannot load {MINILM_MODEL} from {files[2]} ({_one_reason(exc)})") from None
    else:
        raise IndexUnavailable(f"no embedder {name!r} (use one of: {', '.join(EMBEDDERS)})")
    _EMBEDDERS[name] = embedder
    return embedder


def _one_reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 160 else text[:159] + "…"


class SemanticIndex:
    """The ChromaDB collection for one home and one embedder (no documents stored: SQLite has them)."""

    def __init__(self, home: Path, embedder: Any):
        self.path = index_path(home)
        self.embedder = embedder
        self._collection: Any = None
        self._client: Any = None

    @property
    def collection(self) -> Any:
        """The collection, opened (and created) on first use."""
        if self._collection is None:
            import chromadb
            from chromadb.config import Settings

            self._client = chromadb.PersistentClient(
                path=str(self.path), settings=Settings(anonymized_telemetry=False))
            self._collection = self._client.get_or_create_collection(
                INDEX_COLLECTION, embedding_function=None,
                metadata={"hnsw:space": "cosine", "embedder": self.embedder.model_id,
                          # HNSW is approximate and built on several threads: a wide search
                          # beam keeps recall ~1 at memory-store sizes (the default ef is 10).
                          "hnsw:search_ef": INDEX_SEARCH_EF, "hnsw:construction_ef": INDEX_SEARCH_EF})
        return self._collection

    def _run(self, operation: Callable[[Any], Any]) -> Any:
        # Another process may have rebuilt the collection, or the user deleted chroma/ (it is
        # derived data), since we opened it: reopen once with a fresh client before giving up.
        try:
            return operation(self.collection)
        except Exception:
            client, self._client, self._collection = self._client, None, None
            close = getattr(client, "close", None)  # chromadb >= 1.x releases its SQLite handles
            if close is not None:
                with _suppress(Exception):
                    close()
            return operation(self.collection)

    @property
    def built_with(self) -> str:
        """The embedder id recorded when the collection was created."""
        return (self._run(lambda c: c.metadata) or {}).get("embedder", "")

    def check_embedder(self) -> None:
        """Raise IndexUnavailable when the collection holds another embedder's vectors."""
        if self.built_with != self.embedder.model_id:
            raise IndexUnavailable(f"the index was built with {self.built_with or 'another embedder'!r}, "
                                   f"config asks for {self.embedder.model_id!r}")

    def count(self) -> int:
        """Number of vectors in the index."""
        return int(self._run(lambda c: c.count()))

    def upsert(self, memories: List[Memory]) -> None:
        """Embed and store memories (one batch; callers batch)."""
        if memories:
            vectors = self.embedder([index_text(m) for m in memories])
            ids = [m.id for m in memories]
            self._run(lambda c: c.upsert(ids=ids, embeddings=vectors))

    def delete(self, ids: List[str]) -> None:
        """Remove ids (missing ids are fine)."""
        for start in range(0, len(ids), INDEX_BATCH):
            chunk = list(ids[start:start + INDEX_BATCH])
            self._run(lambda c: c.delete(ids=chunk))

    def refresh(self, store: Store, ids: List[str]) -> None:
        """Re-embed these memories from the store in batches; deleted or missing ones leave the index."""
        self.check_embedder()
        for start in range(0, len(ids), INDEX_BATCH):
            chunk = list(dict.fromkeys(ids[start:start + INDEX_BATCH]))
            rows = _memories_by_id(store, chunk)
            live: List[Memory] = []
            gone: List[str] = []
            for i in chunk:
                if _indexable(rows.get(i)):
                    live.append(rows[i])
                else:
                    gone.append(i)
            self.upsert(live)
            if gone:
                self.delete(gone)

    def query(self, text: str, n: int) -> List[Tuple[str, float]]:
        """Nearest memory ids with cosine similarity (1 is identical), best first."""
        total = self.count()
        if total == 0 or n <= 0:
            return []
        vector = self.embedder([text])
        result = self._run(lambda c: c.query(query_embeddings=vector, n_results=min(n, total),
                                             include=["distances"]))
        return [(i, 1.0 - float(d)) for i, d in zip(result["ids"][0], result["distances"][0])]

    def reset(self) -> None:
        """Drop the collection and start an empty one for the configured embedder."""
        _ = self.collection
        with _suppress(Exception):
            self._client.delete_collection(INDEX_COLLECTION)
        self._collection = None
        _ = self.collection


_INDEXES: Dict[Tuple[str, str], SemanticIndex] = {}


def open_index(home: Path, embedder_name: str, allow_download: bool = False) -> SemanticIndex:
    """The (cached per process) index for a home; raises IndexUnavailable or chromadb's errors."""
    if not chromadb_installed():
        raise IndexUnavailable(f"chromadb is not installed: {SEMANTIC_HINT}")
    key = (str(Path(home).resolve()), embedder_name)
    if key not in _INDEXES:
        _INDEXES[key] = SemanticIndex(home, load_embedder(embedder_name, allow_download))
    return _INDEXES[key]


def _memories_by_id(store: Store, ids: List[str]) -> Dict[str, Memory]:
    if not ids:
        return {}
    with store._lock:
        rows = store.conn.execute(f"SELECT * FROM memories WHERE id IN ({', '.join('?' * len(ids))})",
                                  ids).fetchall()
    return {m.id: m for m in _from_rows(Memory, rows, _MEMORY_COLUMNS)}


def _indexable_count(store: Store) -> int:
    with store._lock:
        return store.conn.execute(
            "SELECT count(*) FROM memories WHERE deleted_at IS NULL AND encrypted = 0").fetchone()[0]


def _indexable_ids(store: Store, after: str, limit: int) -> List[str]:
    with store._lock:
        return [r[0] for r in store.conn.execute(
            "SELECT id FROM memories WHERE deleted_at IS NULL AND encrypted = 0 AND id > ? "
            "ORDER BY id LIMIT ?", (after, limit))]


def _index_enabled(cfg: Config) -> bool:
    return cfg.embedder != "none" and chromadb_installed()


def stale_line(reason: str) -> str:
    """The one warning line for a stale index."""
    return f"semantic index is stale ({reason}); {REBUILD_HINT}"


def mark_stale(store: Store, reason: str) -> str:
    """Remember that the index needs a rebuild (kept in sync_state); returns the warning line."""
    with _suppress(Exception):
        store.set_state(INDEX_STALE_KEY, reason)
    return stale_line(reason)


def _failure_reason(exc: BaseException, home: Path) -> str:
    if isinstance(exc, ContextFSError):
        return exc.message
    return f"cannot write {index_path(home)}: {_one_reason(exc)}"


def _reraise_if_fatal(exc: BaseException) -> None:
    # Chroma's Rust core can surface panics as BaseException subclasses: those we absorb,
    # but an interrupt or exit must still stop the program.
    if isinstance(exc, (KeyboardInterrupt, SystemExit)):
        raise exc


def index_after_pull(store: Store, cfg: Config, upserted: List[str], deleted: List[str]) -> Optional[str]:
    """Re-embed pulled memories and drop pulled tombstones; never raises. Returns None or one warning line.

    Called by the sync engine after the pulled rows are committed, so a failed index never
    fails or rolls back a sync.
    """
    home = store.path.parent
    try:
        if not _index_enabled(cfg):
            return None
        stale = store.state(INDEX_STALE_KEY)
        if stale:
            return stale_line(stale)  # a rebuild will read everything anyway
        index = open_index(home, cfg.embedder)
        index.refresh(store, list(upserted))
        index.delete(list(deleted))
        return None
    except BaseException as exc:
        _reraise_if_fatal(exc)
        return mark_stale(store, _failure_reason(exc, home))


def _warn_stderr(line: str) -> None:
    print(line, file=sys.stderr)


def open_indexed_store(home: Optional[Path] = None) -> Store:
    """Open the store with the semantic index following its local writes (CLI and MCP use this)."""
    store = open_store(home)
    attach_index(store)
    return store


def attach_index(store: Store, cfg: Optional[Config] = None,
                 warn: Callable[[str], None] = _warn_stderr) -> None:
    """Keep the semantic index in step with this store's local writes (a failure only warns once)."""
    if getattr(store, "_index_attached", False):
        return
    store._index_attached = True  # type: ignore[attr-defined]
    home = store.path.parent

    def on_change(event: str, ids: List[str]) -> None:
        try:
            config = cfg or load_config(home)
            if not _index_enabled(config) or store.state(INDEX_STALE_KEY):
                return  # off, not installed, or already waiting for a rebuild: nothing to keep up
            index = open_index(home, config.embedder)
            if event == "delete":
                index.delete(ids)
            else:
                index.refresh(store, ids)
        except BaseException as exc:
            _reraise_if_fatal(exc)
            warn(mark_stale(store, _failure_reason(exc, home)))

    store.on_change.append(on_change)


def index_status(store: Store, cfg: Config) -> dict:
    """Embedder, state (ok, stale, off, unavailable), vectors indexed vs memories in the store."""
    home = store.path.parent
    status = {"embedder": cfg.embedder, "path": str(index_path(home)), "state": "ok", "reason": None,
              "indexed": None, "memories": _indexable_count(store), "model": None}
    if cfg.embedder == "none":
        return dict(status, state="off", reason='[index] embedder = "none" in config.toml')
    if not chromadb_installed():
        return dict(status, state="unavailable", reason=f"chromadb is not installed: {SEMANTIC_HINT}")
    try:
        index = open_index(home, cfg.embedder)
        status["model"] = getattr(index.embedder, "source", None) or index.embedder.model_id
        if index.path.exists():
            status["indexed"] = index.count()
            index.check_embedder()
        else:
            status["indexed"] = 0
    except BaseException as exc:
        _reraise_if_fatal(exc)
        mark_stale(store, _failure_reason(exc, home))
    reason = store.state(INDEX_STALE_KEY)
    if reason is None and status["indexed"] != status["memories"]:
        reason = f"{status['indexed']} of {status['memories']} memories indexed"
    if reason:
        status.update(state="stale", reason=reason)
    return status


def rebuild_index(store: Store, cfg: Config,
                  progress: Optional[Callable[[int, int], None]] = None) -> dict:
    """Re-create the index from SQLite in batches; clears the stale mark. Raises IndexUnavailable."""
    home = store.path.parent
    if cfg.embedder == "none":
        raise UsageError('The semantic index is off ([index] embedder = "none" in config.toml); '
                         'set it to "default" or "hash" to build one')
    if not chromadb_installed():
        raise IndexUnavailable(f"Cannot rebuild the semantic index: chromadb is not installed: {SEMANTIC_HINT}")
    started = time.monotonic()
    try:
        index = open_index(home, cfg.embedder, allow_download=True)
        index.reset()
        total, done, after = _indexable_count(store), 0, ""
        while True:
            ids = _indexable_ids(store, after, INDEX_BATCH)
            if not ids:
                break
            index.refresh(store, ids)
            done, after = done + len(ids), ids[-1]
            if progress:
                progress(done, total)
    except BaseException as exc:
        _reraise_if_fatal(exc)
        reason = _failure_reason(exc, home)
        mark_stale(store, reason)
        raise IndexUnavailable(f"Cannot rebuild the semantic index: {reason}") from None
    store.set_state(INDEX_STALE_KEY, None)
    return {"embedder": cfg.embedder, "model": getattr(index.embedder, "source", None) or index.embedder.model_id,
            "indexed": done, "path": str(index.path), "seconds": round(time.monotonic() - started, 3)}


def _semantic_hits(store: Store, cfg: Config, query: str, n: int,
                   notes: Optional[List[str]]) -> Optional[List[Tuple[str, float]]]:
    """Vector candidates, or None when the index is off, unavailable or stale (keyword-only)."""
    if not _index_enabled(cfg):
        return None
    home = store.path.parent
    stale = store.state(INDEX_STALE_KEY)
    try:
        if not stale:
            index = open_index(home, cfg.embedder)
            if not index.path.exists():
                indexed = 0
            else:
                index.check_embedder()
                indexed = index.count()
            expected = _indexable_count(store)
            if indexed == expected:
                if expected == 0:
                    return []
                return [(i, s) for i, s in index.query(query, n) if s >= index.embedder.min_similarity]
            stale = f"{indexed} of {expected} memories indexed"
    except BaseException as exc:
        _reraise_if_fatal(exc)
        stale = _failure_reason(exc, home)
        mark_stale(store, stale)
    if notes is not None:
        notes.append(stale_line(stale) + "; showing keyword matches only")
    return None


def search_memories(store: Store, query: str, limit: int = 10, type: Optional[str] = None,
                    cfg: Optional[Config] = None, notes: Optional[List[str]] = None) -> List[SearchHit]:
    """Search memories: keyword (FTS5) ranking fused with semantic hits when the index is usable.

    Fusion is reciprocal-rank (score = Σ 1/(60 + rank) over the two rankings), so the two
    very different score scales never have to be compared; ``hit.sources`` keeps the raw
    keyword (bm25) and semantic (cosine similarity) scores. Without a usable index the result
    is the plain keyword search, scored by bm25. ``notes`` collects a reason for a fallback.
    """
    cfg = cfg or load_config(store.path.parent)
    pool = max(limit * 3, 30)
    keyword = store.search(query, limit=pool, type=type)
    vector = _semantic_hits(store, cfg, query, pool, notes) if limit > 0 else None
    if vector is None:
        return keyword[:limit]
    fused: Dict[str, SearchHit] = {}
    for rank, hit in enumerate(keyword, 1):
        fused[hit.memory.id] = SearchHit(hit.memory, 1.0 / (RRF_K + rank), hit.snippet, dict(hit.sources))
    memories = _memories_by_id(store, [i for i, _s in vector if i not in fused])
    words = [w.lower() for w in re.findall(r"\w+", query)]
    for rank, (mem_id, similarity) in enumerate(vector, 1):
        hit = fused.get(mem_id)
        if hit is None:
            memory = memories.get(mem_id)
            if memory is None or memory.deleted_at or (type and memory.type != type):
                continue  # the index can trail the store by a moment; SQLite decides
            hit = fused[mem_id] = SearchHit(memory, 0.0, _like_snippet(memory.content, words), {})
        hit.score += 1.0 / (RRF_K + rank)
        hit.sources["semantic"] = similarity
    ranked = sorted(fused.values(), key=lambda h: (-h.score, h.memory.id))
    return ranked[:limit]


# ---- 8. crypto ---------------------------------------------------------------------------
# Wire format (protocol.md §9): AES-256-GCM, 12-byte random nonce, no AAD, base64url WITH '='
# padding of nonce‖ciphertext‖tag, "encrypted": true, content_hash over the plaintext.
# Our key: scrypt over the user's passphrase, salted with a salt made from the account's id
# (GET /api/auth/me) — the same on every device of the account, on any server, and never sent.
# Not the server's /api/auth/encryption-salt: ContextFS Cloud gives each API key its own salt
# (so two devices would derive two keys), and a salt there switches the public client's
# automatic encryption on. The public client's HKDF-over-the-API-key key is still derived, to
# read what it encrypted (and checked against its test vector).

E2EE_EXTRA_HINT = "pip install 'contextfs-sync[e2ee]'"
_SCRYPT_N, _SCRYPT_R, _SCRYPT_P = 2 ** 15, 8, 1


def b64url_decode(text: str) -> bytes:
    """Decode base64url with or without '=' padding."""
    import base64

    text = text.strip()
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def b64url_encode(data: bytes, pad: bool = True) -> str:
    """Encode base64url, with '=' padding unless ``pad`` is False."""
    import base64

    text = base64.urlsafe_b64encode(data).decode("ascii")
    return text if pad else text.rstrip("=")


def _aesgcm() -> Any:
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    except ImportError:
        raise CryptoError(f"End-to-end encryption needs the e2ee extra: {E2EE_EXTRA_HINT}") from None
    return AESGCM


def account_salt(user_id: str) -> str:
    """The scrypt salt of an account's passphrase key: a hash of its user id (base64url)."""
    import hashlib

    return b64url_encode(hashlib.sha256(b"contextfs-sync e2ee salt v1\0" + user_id.encode("utf-8")).digest(),
                         pad=False)


def derive_passphrase_key(passphrase: str, salt: str) -> bytes:
    """Our E2EE key: scrypt(passphrase, account salt) → 32 bytes (stdlib only)."""
    import hashlib

    if not passphrase:
        raise CryptoError("The E2EE passphrase is empty")
    return hashlib.scrypt(passphrase.encode("utf-8"), salt=b64url_decode(salt), n=_SCRYPT_N,
                          r=_SCRYPT_R, p=_SCRYPT_P, maxmem=64 * 1024 * 1024, dklen=32)


def derive_anchor_key(api_key: str, salt: str) -> bytes:
    """The anchor's key: HKDF-SHA256(IKM = whole API key, salt, info 'contextfs-e2ee-v1')."""
    import hashlib
    import hmac

    # RFC 5869 with one output block (32 bytes = one SHA-256 block): no dependency needed.
    prk = hmac.new(b64url_decode(salt), api_key.encode("utf-8"), hashlib.sha256).digest()
    return hmac.new(prk, b"contextfs-e2ee-v1" + b"\x01", hashlib.sha256).digest()


# The key check (issue 27): the first device to turn E2EE on for an account stores a known text
# sealed under its key, as one memory row with a reserved, per-account id (ContextFS Cloud looks
# rows up by id across accounts) that both servers keep like any other. A passphrase is accepted,
# and a device pushes, only when its key opens it; a device without a key pushes nothing into an
# account that has one. The row never enters a local store; it travels in the clear as ciphertext
# (content_hash over the ciphertext, "encrypted": false), so no client tries to decrypt it.
# Since version 2 the check also carries the account's content-hash key: a random secret,
# made once with the check and carried over by `cloud rekey`, that keys the content_hash of
# every memory sealed in our format (see keyed_content_hash).
_E2EE_CHECK_TEXT = "contextfs-sync e2ee key check v1"
_E2EE_CHECK_TEXT_V2 = "contextfs-sync e2ee key check v2"


def e2ee_check_id(user_id: str) -> str:
    """The id of an account's E2EE key check row."""
    import hashlib

    return E2EE_CHECK_PREFIX + hashlib.sha256(b"contextfs-sync e2ee check v1\0" + user_id.encode("utf-8")).hexdigest()[:24]


def seal_key_check(key: bytes, hash_key: Optional[bytes]) -> str:
    """The key check's content, sealed under ``key``: the known text and the account's
    content-hash key (new_hash_key() for a new check; a rekey carries the old one over, and
    None, an account with plain hashes, stays a version 1 check)."""
    if hash_key is None:
        return encrypt_content(key, _E2EE_CHECK_TEXT)
    return encrypt_content(key, json.dumps({"check": _E2EE_CHECK_TEXT_V2, "hash_key": b64url_encode(hash_key)}))


def new_hash_key() -> bytes:
    """A new account content-hash key (random, 32 bytes)."""
    return os.urandom(32)


def open_key_check(key: bytes, sealed: str) -> Tuple[bool, Optional[bytes]]:
    """(whether ``key`` opens an account's key check, the content-hash key it carries: None in a
    version 1 check, whose account keeps plain content hashes)."""
    _aesgcm()  # a missing extra is named, not taken for a wrong key
    try:
        text = decrypt_content(key, sealed)
    except CryptoError:
        return False, None
    if text == _E2EE_CHECK_TEXT:
        return True, None
    try:
        fields = json.loads(text)
        hash_key = b64url_decode(fields["hash_key"]) if fields.get("check") == _E2EE_CHECK_TEXT_V2 else b""
    except (ValueError, TypeError, KeyError, AttributeError):
        return False, None
    return (True, hash_key) if len(hash_key) == 32 else (False, None)


def key_opens_check(key: bytes, sealed: str) -> bool:
    """Whether ``key`` opens an account's key check."""
    return open_key_check(key, sealed)[0]


def keyed_content_hash(hash_key: bytes, plain_hash: str) -> str:
    """The content_hash a memory sealed in our format carries: an HMAC of the plaintext's hash
    under the account's content-hash key, so the server cannot confirm a guess of the text
    while equal texts still have equal hashes (diff manifests and equal-clock checks work)."""
    import hashlib
    import hmac

    return hmac.new(hash_key, b"contextfs-sync content hash v1\0" + plain_hash.encode("ascii"),
                    hashlib.sha256).hexdigest()[:16]


def _keyer(hash_key: Optional[bytes]) -> Optional[Callable[[str], str]]:
    """keyed_content_hash under ``hash_key`` as a function of the plain hash (None: no key)."""
    return None if hash_key is None else (lambda plain: keyed_content_hash(hash_key, plain))


def encrypt_content(key: bytes, plaintext: str, nonce: Optional[bytes] = None, bind: Optional[str] = None) -> str:
    """Encrypt memory content to the wire form (random nonce unless given). With ``bind`` (the
    memory id) it is our format: marked, and bound to that id (it opens under no other)."""
    nonce = nonce if nonce is not None else os.urandom(12)
    sealed = _aesgcm()(key).encrypt(nonce, plaintext.encode("utf-8"), None if bind is None else _bound_to(bind))
    token = b64url_encode(nonce + sealed, pad=True)
    return token if bind is None else SEALED_MARK + token


def decrypt_content(key: bytes, token: str, bind: Optional[str] = None) -> str:
    """Decrypt wire-form content; a wrong key, or our format under another id than ``bind``,
    raises CryptoError (never returns ciphertext)."""
    aesgcm = _aesgcm()
    aad = None
    if token.startswith(SEALED_MARK):
        token, aad = token[len(SEALED_MARK):], _bound_to(bind or "")
    try:
        raw = b64url_decode(token)
        if len(raw) < 12 + 16:
            raise ValueError("too short")
        return aesgcm(key).decrypt(raw[:12], raw[12:], aad).decode("utf-8")
    except Exception as exc:  # InvalidTag, bad base64, bad UTF-8: all mean "cannot decrypt"
        raise CryptoError(f"cannot decrypt content ({type(exc).__name__})") from None


# Our format (issue 27): "cfs2." + base64url(nonce‖ciphertext‖tag), the AES-GCM associated data
# naming the format and the memory id, so a ciphertext moved to another row, or served for
# another id, does not open. The mark tells it from the public client's format (no mark, no
# associated data; '.' is not base64url), since ContextFS Cloud drops the "encrypted" flag.
SEALED_MARK = "cfs2."


def _bound_to(memory_id: str) -> bytes:
    return b"contextfs-sync e2ee v2\0" + memory_id.encode("utf-8")


def seal_memory(key: bytes, wire: dict, hash_key: Optional[bytes] = None) -> dict:
    """A wire memory sealed in our format: content, summary, tags, metadata and source repo and
    file travel inside one ciphertext bound to the id; outside it they are empty (the id, type,
    namespace, session id, timestamps, clock and content_hash stay visible; the hash keyed with
    ``hash_key``, the account's content-hash key, when it has one)."""
    fields = {"content": wire["content"], "summary": wire.get("summary"), "tags": wire.get("tags") or [],
              "metadata": wire.get("metadata") or {}, "source_repo": wire.get("source_repo"),
              "source_file": wire.get("source_file"), "pad": ""}
    size = len(json.dumps(fields, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
    fields["pad"] = " " * (padded_size(size) - size)  # the server sees a size bucket, not the length
    payload = json.dumps(fields, ensure_ascii=False, separators=(",", ":"))
    hashed = keyed_content_hash(hash_key, wire["content_hash"]) if hash_key and wire.get("content_hash") else \
        wire.get("content_hash")
    return dict(wire, content=encrypt_content(key, payload, bind=wire["id"]), summary=None, tags=[], metadata={},
                source_repo=None, source_file=None, encrypted=True, content_hash=hashed)


def seal_field(key: bytes, text: Optional[str], bind: str) -> Optional[str]:
    """One text field sealed in our format, bound to ``bind`` (a session's label or summary).
    The nonce is derived from the key, binding and text (synthetic, as in SIV): the same field
    sealed twice is the same ciphertext, so a version sent again is the same version to any
    server that compares fields; only equal texts look equal."""
    import hashlib
    import hmac

    if text is None:
        return None
    nonce = hmac.new(key, _bound_to(bind) + b"\0" + text.encode("utf-8"), hashlib.sha256).digest()[:12]
    return encrypt_content(key, text, nonce=nonce, bind=bind)


def padded_size(size: int) -> int:
    """The bucket a sealed payload of ``size`` bytes is padded to: 256 B, doubling to 64 KiB,
    then whole 64 KiB steps."""
    bucket = 256
    while bucket < size and bucket < 64 * 1024:
        bucket *= 2
    return bucket if size <= bucket else -(-size // (64 * 1024)) * 64 * 1024


def open_memory(key: bytes, memory: Any, hash_key: Optional[bytes] = None) -> bool:
    """Decrypt a pulled memory in place (our format, or the public client's and older ones:
    content only); False, and the memory untouched, unless it opens and matches content_hash
    (keyed with ``hash_key`` in our format, or plain: an account's rows from before it had one)."""
    try:
        plaintext = decrypt_content(key, memory.content, bind=memory.id)
    except CryptoError:
        return False
    fields: Dict[str, Any] = {"content": plaintext}
    if memory.content.startswith(SEALED_MARK):
        try:
            fields = json.loads(plaintext)
        except ValueError:
            return False
        if not (isinstance(fields, dict) and isinstance(fields.get("content"), str)
                and isinstance(fields.get("summary"), (str, type(None))) and isinstance(fields.get("tags"), list)
                and all(isinstance(t, str) for t in fields["tags"]) and isinstance(fields.get("metadata"), dict)):
            return False
    plain_hash = content_hash(fields["content"])
    if memory.content_hash and memory.content_hash != plain_hash and not (
            hash_key and "metadata" in fields and memory.content_hash == keyed_content_hash(hash_key, plain_hash)):
        return False
    memory.content = fields["content"]
    if "metadata" in fields:
        memory.summary, memory.tags, memory.metadata = fields["summary"], fields["tags"], fields["metadata"]
        memory.source_repo, memory.source_file = fields.get("source_repo"), fields.get("source_file")
        mark = fields["metadata"].get("conflict_of")
        memory.conflict_of = mark if isinstance(mark, str) and mark else memory.conflict_of
    memory.content_hash, memory.encrypted, memory.sealed = plain_hash, False, True
    return True


# ---- 9. HTTP client ----------------------------------------------------------------------

CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 60.0
MAX_RETRIES = 4          # attempts after the first, for connect errors, 429 and 5xx
MAX_BACKOFF = 8.0        # seconds; a server's Retry-After is honoured up to MAX_RETRY_AFTER
MAX_RETRY_AFTER = 30.0
_LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")
# What an API key may hold: anything else cannot go in a header, and httpx's error would quote it.
_API_KEY_CHARS = re.compile(r"[\x21-\x7e]+")


def check_server_url(url: str, insecure: bool = False) -> str:
    """Validate a server URL; plain http:// is refused for non-loopback hosts unless insecure."""
    from urllib.parse import urlsplit

    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"Invalid server URL {url!r}: use https://host[:port]")
    host = parts.hostname
    try:  # an address, not a prefix: http://127.evil.example is not loopback
        import ipaddress

        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host in _LOOPBACK_HOSTS
    if parts.scheme == "http" and not loopback and not insecure:
        raise ConfigError(f"Refusing plain http:// to {host}: your API key would travel unencrypted. "
                          f"Use https://, or pass --insecure if you really mean it")
    return url.strip().rstrip("/")


def _retry_after(value: Optional[str]) -> Optional[float]:
    if not value:
        return None
    try:
        return max(0.0, min(float(value), MAX_RETRY_AFTER))
    except ValueError:
        parsed = None
        with _suppress(Exception):
            from email.utils import parsedate_to_datetime

            parsed = parsedate_to_datetime(value)
        if parsed is None:
            return None
        return max(0.0, min((parsed - datetime.now(timezone.utc)).total_seconds(), MAX_RETRY_AFTER))


def _detail(response: Any) -> str:
    try:
        detail = response.json().get("detail")
    except Exception:
        return response.text[:200].strip() or response.reason_phrase
    if isinstance(detail, list):  # FastAPI validation errors
        parts = [f"{'.'.join(str(p) for p in d.get('loc', []))}: {d.get('msg')}" for d in detail[:3]
                 if isinstance(d, dict)]
        return "; ".join(parts) or "invalid request"
    return str(detail)


def _import_httpx() -> Any:
    """Import httpx without its optional command-line client (click, rich, pygments).

    ``import httpx`` also imports ``httpx._main`` when click and rich happen to be installed
    (chromadb pulls them in): ~40 ms of every sync's start-up for a CLI we never run. Hiding
    that one submodule during the first import makes httpx fall back to its stub ``main``.
    """
    if "httpx" in sys.modules:
        return sys.modules["httpx"]
    hidden = "httpx._main" not in sys.modules
    if hidden:
        sys.modules["httpx._main"] = None  # type: ignore[assignment]  # import raises ImportError
    try:
        import httpx
    finally:
        if hidden and sys.modules.get("httpx._main", 0) is None:
            del sys.modules["httpx._main"]
    return httpx


class CloudClient:
    """A ContextFS Cloud API client: X-API-Key auth, timeouts, retries with backoff, clear errors."""

    def __init__(self, server_url: str, api_key: Optional[str] = None, insecure: bool = False,
                 retries: int = MAX_RETRIES, timeout: float = READ_TIMEOUT,
                 sleep: Callable[[float], None] = time.sleep):
        httpx = _import_httpx()

        self.server_url = check_server_url(server_url, insecure)
        self.api_key = api_key
        self.retries = retries
        self.sleep = sleep
        self.requests = 0  # counted for tests and benchmarks (requests per sync)
        headers = {"User-Agent": f"contextfs-sync/{__version__}", "Accept": "application/json"}
        # TLS verification cannot be turned off from here. A plain http:// base URL (loopback, or
        # --insecure) never does TLS (no redirects are followed), so it gets a verifying context
        # without the CA bundle instead of paying ~30 ms to load certifi at every start.
        verify: Any = True
        if self.server_url.startswith("http://"):
            import ssl

            verify = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self._http = httpx.Client(base_url=self.server_url, headers=headers, verify=verify,
                                  timeout=httpx.Timeout(timeout, connect=CONNECT_TIMEOUT),
                                  follow_redirects=False)

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> "CloudClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CloudClient({self.server_url!r}, api_key={mask_key(self.api_key)!r})"

    def request(self, method: str, path: str, body: Optional[dict] = None, auth: bool = True,
                raw_body: Optional[bytes] = None) -> dict:
        """Send one API call with retries; returns the decoded JSON object or raises a ContextFSError.

        ``raw_body`` is a request body already encoded as JSON (push sends its items encoded once).
        """
        import httpx

        headers = {}
        if auth:
            if not self.api_key:
                raise NotConfigured(MSG_NO_KEY)
            if not _API_KEY_CHARS.fullmatch(self.api_key):
                raise AuthError("The API key holds spaces, control or non-ASCII characters, so it cannot be "
                                "sent (it is not shown here); check it, or run: contextfs cloud login")
            headers["X-API-Key"] = self.api_key
        content = raw_body
        if body is not None:
            content = wire_json(body)
        if content is not None:
            headers["Content-Type"] = "application/json"
        attempt = 0
        while True:
            attempt += 1
            wait: Optional[float] = None
            problem = ""
            try:
                self.requests += 1
                response = self._http.request(method, path, content=content, headers=headers)
            except httpx.TimeoutException as exc:
                problem = f"timed out ({type(exc).__name__})"
            except httpx.TransportError as exc:
                problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            else:
                status = response.status_code
                if status == 429 or status >= 500:
                    wait = _retry_after(response.headers.get("Retry-After"))
                    problem = f"HTTP {status}" + (f" ({_detail(response)})" if status == 429 else "")
                elif status >= 400:
                    raise self._error(status, response, path)
                else:
                    try:
                        data = response.json()
                        if not isinstance(data, dict):
                            raise ValueError("not a JSON object")
                        return data
                    except ValueError:
                        # A truncated or garbled body: sync calls are idempotent, so retry.
                        problem = "an invalid (truncated or non-JSON) response"
            if attempt > self.retries:
                raise ServerError(f"Cannot sync with {self.server_url}: {problem} after {attempt} tries; "
                                  f"check the server and try again (nothing was lost)")
            if wait is None:
                import random

                wait = min(MAX_BACKOFF, 0.25 * (2 ** (attempt - 1))) * (0.5 + random.random() / 2)
            self.sleep(wait)

    def _error(self, status: int, response: Any, path: str) -> ContextFSError:
        detail = _detail(response)
        if status == 401:
            return AuthError(f"The server rejected the API key ({detail}). Run: contextfs cloud login")
        if status == 403:
            message = f"Forbidden by {self.server_url}: {detail}"
        elif status == 404:
            message = f"{self.server_url}{path} not found ({detail}); is the server URL right?"
        elif status == 413:
            message = f"The server refused a request as too large ({detail}); try again with a smaller batch"
        else:
            message = f"The server refused the request (HTTP {status}): {detail}"
        return ServerError(message, status=status, detail=detail)

    # -- endpoints ---------------------------------------------------------------------------

    def health(self) -> dict:
        """GET /health."""
        return self.request("GET", "/health", auth=False)

    def login(self, email: str, password: str) -> dict:
        """POST /api/auth/login → {user, apiKey, encryptionKey}."""
        try:
            return self.request("POST", "/api/auth/login",
                                {"email": email, "password": password, "session_type": "CLI Session"},
                                auth=False)
        except AuthError:
            raise AuthError("Invalid email or password") from None

    def me(self) -> dict:
        """GET /api/auth/me: who the key belongs to (verifies the key)."""
        return self.request("GET", "/api/auth/me")

    def encryption_salt(self) -> str:
        """GET /api/auth/encryption-salt: the account's E2EE salt."""
        salt = self.request("GET", "/api/auth/encryption-salt").get("salt")
        if not isinstance(salt, str) or not salt:
            raise ServerError("The server returned no encryption salt; E2EE is not available there")
        return salt

    def register(self, device: str, device_name: str, platform: str) -> dict:
        """POST /api/sync/register."""
        return self.request("POST", "/api/sync/register", {
            "device_id": device, "device_name": device_name, "platform": platform,
            "client_version": __version__})

    def push(self, device: str, memories: List[dict], sessions: List[dict], edges: List[dict],
             force: bool = False) -> dict:
        """POST /api/sync/push."""
        return self.request("POST", "/api/sync/push", {
            "device_id": device, "memories": memories, "sessions": sessions, "edges": edges,
            "last_sync_timestamp": None, "backend_type": None, "force": force})

    def push_encoded(self, device: str, plural: str, items: List[bytes], force: bool = False,
                     refuse_if_encrypted: bool = False) -> dict:
        """POST /api/sync/push of one list whose items are already JSON-encoded (same body as push).

        ``refuse_if_encrypted`` (our extension, sent by a device without an E2EE passphrase):
        our server stores nothing and answers 409 ``e2ee_required`` when the account holds an
        E2EE key check; ContextFS Cloud ignores the field."""
        lists = {name: b"[" + b",".join(items) + b"]" if name == plural else b"[]"
                 for name in ("memories", "sessions", "edges")}
        body = (b'{"device_id":' + json.dumps(device, ensure_ascii=False).encode("utf-8")
                + b',"memories":' + lists["memories"] + b',"sessions":' + lists["sessions"]
                + b',"edges":' + lists["edges"] + b',"last_sync_timestamp":null,"backend_type":null,"force":'
                + (b"true" if force else b"false")
                + (b',"refuse_if_encrypted":true' if refuse_if_encrypted else b"") + b"}")
        return self.request("POST", "/api/sync/push", raw_body=body)

    def pull(self, device: str, cursor: Optional[str], since: Optional[str], limit: int,
             offset: int = 0, exclude_own: Optional[Tuple[int, int]] = None, peek: bool = False) -> dict:
        """POST /api/sync/pull (``cursor`` is our server's extension; anchors ignore it).

        ``exclude_own`` = (first, last) server seq of this device's pushes in this sync (also
        our extension): the server leaves out the rows we wrote in that range, which we already
        hold exactly as stored, instead of sending them straight back. ``peek`` (our extension,
        for --dry-run) asks the server to change no device state.
        """
        body = {"device_id": device, "since_timestamp": since, "namespace_ids": None,
                "backend_type": None, "limit": limit, "offset": offset, "cursor": cursor}
        if exclude_own is not None:
            body["exclude_own_seqs"] = list(exclude_own)
        if peek:
            body["peek"] = True
        return self.request("POST", "/api/sync/pull", body)

    def diff(self, device: str, memories: List[dict], sessions: List[dict], edges: List[dict],
             namespace_ids: Optional[List[str]] = None) -> dict:
        """POST /api/sync/diff with a manifest of local rows (memories and sessions of
        ``namespace_ids`` only, when given; edges are never filtered)."""
        return self.request("POST", "/api/sync/diff", {
            "device_id": device, "memories": memories, "sessions": sessions, "edges": edges,
            "namespace_ids": namespace_ids})

    def status(self, device: str) -> dict:
        """POST /api/sync/status."""
        return self.request("POST", "/api/sync/status", {"device_id": device})


# ---- 10. sync engine ---------------------------------------------------------------------

@dataclass
class SyncReport:
    """What a sync did (or, with dry_run, would do)."""

    direction: str = "both"
    dry_run: bool = False
    pushed: Dict[str, int] = field(default_factory=lambda: {"memories": 0, "sessions": 0, "edges": 0})
    pulled: Dict[str, int] = field(default_factory=lambda: {"memories": 0, "sessions": 0, "edges": 0})
    rejected: int = 0
    conflicts: List[Tuple[str, str]] = field(default_factory=list)  # (id, local copy id)
    deletes_undone: List[str] = field(default_factory=list)  # our deletes that lost to an edit elsewhere
    refused: Dict[str, str] = field(default_factory=dict)    # id -> why the server refused it
    unreadable: Dict[str, str] = field(default_factory=dict)  # pulled, left out: id -> why
    plan: List[dict] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    duration_ms: int = 0

    def summary(self) -> str:
        """One human line, e.g. ``pushed 12, pulled 3, 1 conflict kept as <id>_local``."""
        text = f"pushed {sum(self.pushed.values())}, pulled {sum(self.pulled.values())}"
        if self.conflicts:
            copies = ", ".join(copy for _id, copy in self.conflicts)
            text += f", {len(self.conflicts)} conflict{'s' if len(self.conflicts) != 1 else ''} kept as {copies}"
        if self.deletes_undone:
            text += (f", {len(self.deletes_undone)} delete{'s' if len(self.deletes_undone) != 1 else ''} undone by "
                     f"a newer edit on another device ({', '.join(self.deletes_undone)}; delete again to remove)")
        if self.refused:
            text += (f", {len(self.refused)} refused by the server and left pending: "
                     + "; ".join(f"{i} ({why})" for i, why in list(self.refused.items())[:5]))
        if self.unreadable:
            text += (f", {len(self.unreadable)} pulled memor{'y' if len(self.unreadable) == 1 else 'ies'} left out "
                     f"(tried again next sync): " + "; ".join(f"{i} ({why})" for i, why in list(self.unreadable.items())[:5]))
        return ("dry run: would have " + text) if self.dry_run else text

    def to_dict(self) -> dict:
        """A JSON-ready dict (``--json`` and MCP structuredContent)."""
        return {"direction": self.direction, "dry_run": self.dry_run, "pushed": dict(self.pushed),
                "pulled": dict(self.pulled), "rejected": self.rejected,
                "conflicts": [{"id": i, "local_copy": c} for i, c in self.conflicts],
                "deletes_undone": list(self.deletes_undone), "refused": dict(self.refused),
                "unreadable": dict(self.unreadable),
                "plan": self.plan, "warnings": self.warnings, "duration_ms": self.duration_ms,
                "summary": self.summary()}


def require_cloud(cfg: Config) -> None:
    """Raise NotConfigured with the seed's exact message unless sync is enabled and keyed."""
    if not cfg.enabled:
        raise NotConfigured(MSG_DISABLED)
    if not cfg.api_key:
        raise NotConfigured(MSG_NO_KEY)


PUSH_BATCH_ITEMS = 500
PUSH_BATCH_BYTES = 2 * 1024 * 1024
PULL_PAGE_SIZE = 1000
PULL_OVERLAP_SECONDS = 600   # re-read window for timestamp-cursor (anchor) servers
PULL_MAX_PAGES = 1_000_000   # a server whose paging never ends is an error, not a hang
PULL_MAX_HELD_EDGES = 100_000  # edges waiting for an end memory later in the same pull
LOCK_TIMEOUT_SECONDS = 30.0
PLAN_LIMIT = 1000            # dry-run plan entries listed (counts are always complete)


class SyncLock:
    """An exclusive lock on ``$CONTEXTFS_HOME/sync.lock``: one sync at a time (bounded wait)."""

    def __init__(self, home: Path, timeout: float = LOCK_TIMEOUT_SECONDS):
        self.path = home / "sync.lock"
        self.timeout = timeout
        self.handle: Any = None

    def __enter__(self) -> "SyncLock":
        ensure_home(self.path.parent)
        self.handle = open(self.path, "a+")
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: msvcrt locks the first byte
            import msvcrt

            self._lock = lambda: msvcrt.locking(self.handle.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            self._lock = lambda: fcntl.flock(self.handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                self._lock()
                break
            except OSError:
                if time.monotonic() >= deadline:
                    self.handle.close()
                    raise SyncBusy(f"Another sync is still running (lock {self.path} held for "
                                         f"{self.timeout:.0f}s); try again when it finishes") from None
                time.sleep(0.1)
        with _suppress(OSError):  # the pid is only a hint for humans: a full disk must not block
            self.handle.seek(0)
            self.handle.truncate()
            self.handle.write(str(os.getpid()))
            self.handle.flush()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.handle.close()  # closing the file releases the lock


def _mass_delete_message(where: str, deletions: int, total: int) -> str:
    return (f"This sync would delete {deletions} of {total} memories {where} (more than "
            f"{int(MASS_DELETE_FRACTION * 100)}%); nothing more was changed. Check with: contextfs cloud sync "
            f"--dry-run, and if it is what you want, run: contextfs cloud sync --force")


_WIRE_LISTS = {"memory": "memories", "session": "sessions", "edge": "edges"}


KEYRING_SERVICE = "contextfs-sync"
_IN_KEYRING = "keyring"  # cloud.e2ee_key when the key itself is in the OS keyring


def _keyring() -> Any:
    """The ``keyring`` module when it is installed (optional: pip install keyring), else None."""
    try:
        import keyring
    except ImportError:
        return None
    return keyring


def _keyring_user(cfg: Config) -> str:
    return f"e2ee-key:{Path(cfg.home).resolve()}"


def set_e2ee_key(cfg: Config, key: Optional[bytes]) -> Optional[str]:
    """Keep this device's E2EE key (None forgets it): in the OS keyring when ``keyring`` is
    installed and has a working backend, else in config.toml (written 0600). Returns where."""
    kr = _keyring() if key is not None or cfg.get("cloud", "e2ee_key") == _IN_KEYRING else None
    if key is None:
        if kr is not None:
            with _suppress(Exception):
                kr.delete_password(KEYRING_SERVICE, _keyring_user(cfg))
        cfg.set("cloud", "e2ee_key", None)
        return None
    text = b64url_encode(key)
    if kr is not None:
        try:
            kr.set_password(KEYRING_SERVICE, _keyring_user(cfg), text)
            if kr.get_password(KEYRING_SERVICE, _keyring_user(cfg)) == text:
                cfg.set("cloud", "e2ee_key", _IN_KEYRING)
                return "keyring"
        except Exception:  # no usable backend (a server, a container, a locked keyring)
            pass
    cfg.set("cloud", "e2ee_key", text)
    return "config"


def e2ee_key(cfg: Config) -> Optional[bytes]:
    """The E2EE key for this device, or None when E2EE is off."""
    if not cfg.e2ee:
        return None
    stored = cfg.get("cloud", "e2ee_key")
    if stored == _IN_KEYRING:
        kr = _keyring()
        try:
            stored = kr.get_password(KEYRING_SERVICE, _keyring_user(cfg)) if kr is not None else None
        except Exception:
            stored = None
        if not stored:
            raise NotConfigured("This device's E2EE key is kept in the OS keyring, which cannot give it now (not "
                                "installed, locked, or another user). Run: contextfs cloud configure --e2ee")
    if not stored:
        raise NotConfigured("E2EE is on but no passphrase was entered on this device. "
                            "Run: contextfs cloud configure --e2ee")
    key = b64url_decode(stored)
    if len(key) != 32:
        raise ConfigError(f"{cfg.path}: cloud.e2ee_key is not a valid key; run: contextfs cloud configure --e2ee")
    return key


def account_id(client: "CloudClient") -> str:
    """The id of the account this API key belongs to (GET /api/auth/me): E2EE salts and key
    checks hang on it."""
    user_id = client.me().get("id")
    if not isinstance(user_id, str) or not user_id:
        raise ServerError(f"{client.server_url} did not say which account this API key belongs to "
                          "(GET /api/auth/me); E2EE needs it")
    return user_id


def synced_live_memory_ids(store: Store) -> List[str]:
    """The live memories this device holds as the server had them (clean): what a passphrase
    change uploads again."""
    return [i for i, _h, deleted, dirty in store.manifest("memory") if not deleted and not dirty]


def lookup_key_check(client: "CloudClient", device: str, check_id: str,
                     manifest: Sequence[dict] = ()) -> Tuple[Optional[Memory], List[Memory]]:
    """The account's key check (None when it has none: its content is the sealed text) and the
    other memories the server returned, in one /api/sync/diff: with the check's id under a hash
    no content has, a live check always comes back; so does every memory not in ``manifest``."""
    response = client.diff(device, [*manifest, {"id": check_id, "content_hash": "-"}], [], [])
    check, others = None, []
    for item in response.get("missing_memories") or []:
        try:
            memory = Memory.from_wire(item)
        except ValueError:
            continue
        if memory.id == check_id:
            check = memory if memory.deleted_at is None and memory.content else None
        elif not memory.id.startswith(E2EE_CHECK_PREFIX):
            others.append(memory)
    return check, others


def probe_key_check(client: "CloudClient", device: str, check_id: str, edge_ids: Sequence[str]) -> Optional[Memory]:
    """The account's key check, asked for cheaply: a diff of the check's namespace alone (our
    edges listed, since a diff never filters them, so only links we lack come back). Finds
    checks written since E2EE_CHECK_NAMESPACE existed."""
    response = client.diff(device, [{"id": check_id, "content_hash": "-"}], [], [{"id": i} for i in edge_ids],
                           namespace_ids=[E2EE_CHECK_NAMESPACE])
    for item in response.get("missing_memories") or []:
        if isinstance(item, dict) and item.get("id") == check_id:
            try:
                memory = Memory.from_wire(item)
            except ValueError:
                return None
            return memory if memory.deleted_at is None and memory.content else None
    return None


def key_check_wire(check_id: str, sealed: str, device: str, replaces: Optional[Memory] = None) -> dict:
    """The key check as a memory on the wire (plain as far as any server or client can tell);
    newer than the check it ``replaces`` (a rekey)."""
    now = utc_now()
    return Memory(id=check_id, content=sealed, type="fact", tags=["contextfs-e2ee-check"],
                  namespace_id=E2EE_CHECK_NAMESPACE,
                  summary="contextfs-sync: end-to-end encryption key check (not a memory; keep it)",
                  created_at=now, updated_at=now,
                  vector_clock=clock_tick(replaces.vector_clock if replaces is not None else {}, device),
                  content_hash=content_hash(sealed)).to_wire()


class SyncEngine:
    """Plans and applies a sync between one Store and one CloudClient (design.md, Sync).

    Plan, then apply (Atuin): the pure planners of section 4 turn rows and pulled pages into
    ops, and this class sends the push ops and has the store apply each page's ops in one
    transaction with its cursor. A dry run plans the same way and sends nothing that changes
    state anywhere (no register, pulls marked ``peek``, no diff).
    """

    def __init__(self, store: Store, client: CloudClient, cfg: Config, key: Optional[bytes] = None,
                 progress: Optional[Callable[[str], None]] = None, old_key: Optional[bytes] = None):
        self.store = store
        self.client = client
        self.cfg = cfg
        self.key = key
        self.old_key = old_key  # during a rekey: rows still under it are read, then uploaded again
        self._under_old_key: List[str] = []
        self.opened_with_old_key = 0
        self.progress = progress or (lambda message: None)
        # Cursors belong to one server and one account: switching either starts afresh.
        self.scope = _sync_scope(client.server_url, client.api_key)
        # (first, last) server seq of the rows this sync pushed and settled: the pull that follows
        # asks the server to leave them out instead of sending them straight back. Only a push
        # in this same run sets it, so a store without a cursor (lost sync.db) still gets all.
        self._own_seqs: Optional[Tuple[int, int]] = None
        self._anchor_keys: Optional[List[bytes]] = None
        self._cursorless = False  # the server pages by time (ContextFS Cloud), learned per pull
        self._unreadable: Dict[str, str] = {}  # pulled rows left out: id -> why (tried again next sync)
        self._unreadable_before = bool(store.state(f"unreadable|{self.scope}"))
        self._keys_lock = threading.Lock()
        self._damaged = 0  # pulled memories whose content did not match their hash
        self._hash_key: Optional[bytes] = None  # the account's content-hash key (_content_hash_key)
        self._hash_key_known = False
        self._gated = False  # _e2ee_gate passed
        self._imported_from = frozenset(json.loads(store.state("import_writers") or "[]"))

    def run(self, direction: str = "both", push_all: bool = False, force: bool = False,
            dry_run: bool = False) -> SyncReport:
        """Push, pull or both (push then pull)."""
        report = SyncReport(direction=direction, dry_run=dry_run)
        self.store.purge_expired()
        if not dry_run:
            self._register()
            self._say_if_copied(report)
        if direction in ("push", "both"):
            self.push(report, push_all=push_all, force=force, dry_run=dry_run)
        if direction in ("pull", "both"):
            repush = self.pull(report, dry_run=dry_run, force=force)
            if (repush or report.conflicts) and direction == "both" and not dry_run:
                # What the server turned out to be missing, and the conflict copies this pull
                # made: they are backups, so they go up now, not on some later sync.
                self.push(report, force=force)
        if self._damaged:
            report.warnings.append(f"{self._damaged} pulled memor{'y' if self._damaged == 1 else 'ies'} did not match "
                                   f"{'its' if self._damaged == 1 else 'their'} content hash (damaged on the server or "
                                   f"on the way); the local copies were kept")
        report.unreadable = dict(self._unreadable)
        if not dry_run:
            self.store.set_state(f"refused|{self.scope}", _dumps(report.refused) if report.refused else None)
            if direction != "push":
                self.store.set_state(f"unreadable|{self.scope}", _dumps(report.unreadable) if report.unreadable else None)
        return report

    def _say_if_copied(self, report: SyncReport) -> None:
        """Once: this home turned out to be a copy of another installation (see device_id)."""
        previous = previous_device_id(self.store.path.parent)
        if previous and self.store.state("copied_home_said") != self.store.device_id:
            report.warnings.append(
                f"This home is a copy of another installation (device {previous}); it syncs as its own "
                f"device, {self.store.device_id}, from now on")
            self.store.set_state("copied_home_said", self.store.device_id)

    def _register(self) -> None:
        key = f"registered|{self.scope}"
        if self.store.state(key) == self.store.device_id:
            return
        register_device(self.client, self.store.device_id)
        self.store.set_state(key, self.store.device_id)

    # -- push --------------------------------------------------------------------------------

    def push_ops(self, kind: str, push_all: bool = False) -> Iterator[Op]:
        """The push plan for one kind, chunk by chunk (memory use stays flat)."""
        after = -1
        while True:
            rows, after = self.store.pushable_rows(kind, push_all, after, PUSH_BATCH_ITEMS)
            if not rows:
                return
            held: Container[str] = frozenset()
            if kind == "edge":
                held = self.store.local_only_ids([e.from_id for e in rows] + [e.to_id for e in rows])
            yield from plan_push(kind, rows, held)

    def _wire(self, kind: str, obj: Any) -> dict:
        wire = obj.to_wire()
        if kind == "memory" and self.key is not None and wire["deleted_at"] is None:
            self._e2ee_gate()  # the content-hash key comes with the key check
            wire = seal_memory(self.key, wire, self._content_hash_key())
        elif kind == "session" and self.key is not None and wire["deleted_at"] is None:
            for name in ("label", "summary"):
                wire[name] = seal_field(self.key, wire[name], f"session/{obj.id}/{name}")
        return wire

    def push(self, report: SyncReport, push_all: bool = False, force: bool = False,
             dry_run: bool = False) -> None:
        """Send dirty (or, with push_all, all) syncable rows in bounded batches."""
        deletions, total = self.store.pending_deletions()
        if is_mass_delete(deletions, total) and not force:
            if not dry_run:
                raise MassDeleteError(_mass_delete_message("on the server", deletions, total))
            report.warnings.append(_mass_delete_message("on the server", deletions, total))
        if dry_run:
            for kind in ("session", "memory", "edge"):
                for op in self.push_ops(kind, push_all):
                    report.pushed[_WIRE_LISTS[kind]] += 1
                    if len(report.plan) < PLAN_LIMIT:
                        report.plan.append(op.to_dict())
            return
        batches = self._push_batches_of(push_all)
        first = next(batches, None)  # encoded, not sent
        if first is not None:
            self._e2ee_gate()
            self._push_batches(report, itertools.chain([first], batches), force)
        self.store.set_state("last_push_at", utc_now())
        if self._own_seqs is not None:
            # The highest seq our own rows were stored at: a server whose highest seq is lower
            # lost them, even if this device's pull cursor is behind (it pushed, never pulled).
            known = int(self.store.state(f"pushed_seq|{self.scope}") or 0)
            self.store.set_state(f"pushed_seq|{self.scope}", str(max(known, self._own_seqs[1])))

    # -- end-to-end encryption: the key check ----------------------------------------------

    def _check_id(self) -> str:
        """This account's key check id (the account id is asked once per server and key)."""
        state = f"account|{self.scope}"
        user_id = self.store.state(state)
        if not user_id:
            user_id = account_id(self.client)
            self.store.set_state(state, user_id)
        return e2ee_check_id(user_id)

    def _lookup_key_check(self) -> Optional[Memory]:
        """Ask the server for the key check. Our synced rows are listed, so only what we lack
        comes back (rows not pushed yet are left out: listing them only costs bytes)."""
        manifest = [{"id": i, "content_hash": h} for i, h, _deleted, dirty
                    in self.store.manifest("memory", _keyer(self._hash_key)) if not dirty]
        check, _others = lookup_key_check(self.client, self.store.device_id, self._check_id(), manifest)
        self.store.set_state(f"e2ee_check|{self.scope}", check.content if check is not None else "-")
        return check

    def _seen_check(self, look_again_if_none: bool = False) -> str:
        """The account's key check as last seen here ("-": it had none), looked up when never
        seen on this server and account (or, with ``look_again_if_none``, when none was)."""
        sealed = self.store.state(f"e2ee_check|{self.scope}")
        if sealed is None or (sealed == "-" and look_again_if_none):
            check = self._lookup_key_check()
            sealed = check.content if check is not None else "-"
        return sealed

    def _e2ee_gate(self) -> None:
        """Before anything is pushed: no plaintext into an account that has a key check, no rows
        under a key that fails it; the first device with E2EE on an account writes the check.
        Once per engine."""
        if self._gated:
            return
        # Never looked on this server and account, or about to write a check: look (again).
        sealed = self._seen_check(look_again_if_none=self.key is not None)
        if self.key is None and sealed == "-" and self._pages_by_time():
            # A server without our refuse_if_encrypted check (ContextFS Cloud): another device
            # may have turned E2EE on since our last pull. Ask before pushing plain text.
            edges = [i for i, _h, _deleted, dirty in self.store.manifest("edge") if not dirty]
            check = probe_key_check(self.client, self.store.device_id, self._check_id(), edges)
            if check is not None:
                sealed = check.content
                self.store.set_state(f"e2ee_check|{self.scope}", sealed)
        if self.key is None:
            if sealed != "-":
                raise NotConfigured(MSG_E2EE_NO_KEY)
        elif sealed == "-":
            self._write_key_check()
        elif not key_opens_check(self.key, sealed):
            raise CryptoError(MSG_E2EE_WRONG_KEY.format("; nothing was pushed"))
        self._gated = True

    def _pages_by_time(self) -> bool:
        """Whether this server is known to page by time, not by our seq cursor (ContextFS
        Cloud: it sent no storage id to an earlier pull of ours)."""
        return (self.store.state(f"storage_id|{self.scope}") is None
                and self.store.state(f"pull_since|{self.scope}") is not None)

    def _write_key_check(self) -> None:
        """Store this account's key check, sealed under this device's key."""
        sealed = seal_key_check(self.key, new_hash_key())
        device = self.store.device_id
        response = self.client.push(device, [key_check_wire(self._check_id(), sealed, device)], [], [])
        results = response.get("results")
        if isinstance(results, list):   # our server: one verdict per item
            accepted = any(isinstance(r, dict) and r.get("status") == "accepted" for r in results)
        else:                           # ContextFS Cloud: counts only
            accepted = not response.get("rejected") and not response.get("conflicts")
        if accepted:
            self.store.set_state(f"e2ee_check|{self.scope}", sealed)
            return
        # Another device wrote one first: ours must open it.
        found = self._lookup_key_check()
        if found is None:
            raise ServerError("The server did not keep this account's E2EE key check; nothing was pushed")
        if not key_opens_check(self.key, found.content):
            raise CryptoError(MSG_E2EE_WRONG_KEY.format("; nothing was pushed"))

    def _content_hash_key(self) -> Optional[bytes]:
        """The account's content-hash key, from its key check (looked up if never seen here):
        None without E2EE, or on an account whose check predates it (plain hashes)."""
        if self.key is None:
            return None
        if not self._hash_key_known:
            sealed = self._seen_check()
            for key in (self.key, self.old_key):  # mid-rekey the check may be under either
                opens, hash_key = open_key_check(key, sealed) if key is not None and sealed != "-" else (False, None)
                if opens:
                    self._hash_key, self._hash_key_known = hash_key, True
                    break
        return self._hash_key

    def _keyed(self) -> Optional[Callable[[str], str]]:
        """What turns a sealed memory's plain hash into the one the server holds (None: plain)."""
        return _keyer(self._content_hash_key())

    def _key_checked(self) -> bool:
        """Whether this device's key opens the account's key check (as last seen)."""
        sealed = self.store.state(f"e2ee_check|{self.scope}")
        return self.key is not None and bool(sealed) and sealed != "-" and key_opens_check(self.key, sealed)

    def _note_key_check(self, memory: Memory) -> None:
        """A pulled key check: remembered (never stored as a memory), and it must open with our key."""
        sealed = memory.content if memory.deleted_at is None and memory.content else "-"
        self.store.set_state(f"e2ee_check|{self.scope}", sealed)
        if self.key is not None and sealed != "-" and not key_opens_check(self.key, sealed):
            raise CryptoError(MSG_E2EE_WRONG_KEY.format(": it was probably changed on another device (cloud rekey); "
                                                        "nothing was stored"))

    def _push_batches_of(self, push_all: bool) -> Iterator[Tuple[str, List[Tuple[Tuple[str, int], bytes]]]]:
        """(kind, batch) to push, in order: sessions and memories before edges, so an edge never
        arrives before its ends. Each item is encoded once: its size bounds the batch and its
        bytes go in the body."""
        for kind in ("session", "memory", "edge"):
            encoded = (((op.id, op.row.seq), wire_json(self._wire(kind, op.row)))
                       for op in self.push_ops(kind, push_all))
            for batch in encoded_batches(encoded, PUSH_BATCH_ITEMS, PUSH_BATCH_BYTES):
                yield kind, batch

    def _push_batches(self, report: SyncReport, batches: Iterator[Tuple[str, List[Tuple[Tuple[str, int], bytes]]]],
                      force: bool) -> None:
        """Send batches one request at a time, overlapping our work with the server's.

        While the server handles batch k (a worker thread waits for its answer), this thread
        settles batch k-1 and reads and encodes batch k+1: on two cores a large push costs about
        the larger of the two sides instead of their sum. Requests stay strictly in order, and
        a failed request stops the push exactly where a sequential one would (later batches are
        never sent; earlier ones are settled). A batch the server refuses for what one item
        holds (HTTP 413/422) is split until that item is found: it is named, left pending, and
        the rest goes on (one refused row never blocks the others).
        """
        device = self.store.device_id

        def send(kind: str, batch: List[Tuple[Tuple[str, int], bytes]]) -> dict:
            return self.client.push_encoded(device, _WIRE_LISTS[kind], [data for _key, data in batch], force,
                                            refuse_if_encrypted=self.key is None)

        def settle(kind: str, batch: List[Tuple[Tuple[str, int], bytes]], response: dict) -> None:
            accepted = self._settle_push(kind, dict(key for key, _data in batch), response)
            self._note_own_seqs(response)
            report.pushed[_WIRE_LISTS[kind]] += accepted
            report.rejected += len(batch) - accepted
            self.progress(f"pushed {sum(report.pushed.values())}")

        def outcome(kind: str, batch: List[Tuple[Tuple[str, int], bytes]], future: Any) -> None:
            try:
                response = future.result()
            except ServerError as exc:
                if exc.status == 409 and "e2ee_required" in (exc.detail or ""):
                    # Another device turned E2EE on since our last look (our server checks it
                    # as it stores; this batch and the rest stay here): remember the check.
                    self._lookup_key_check()
                    raise NotConfigured(MSG_E2EE_NO_KEY) from None
                if exc.status not in (413, 422):
                    raise
                self._push_split(kind, batch, exc, send, settle, report)
                return
            settle(kind, batch, response)

        first = next(batches, None)
        if first is None:
            return
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="contextfs-push")
        try:
            kind, batch = first
            inflight = pool.submit(send, kind, batch)
            for next_kind, next_batch in batches:   # batch k+1 is encoded while k is in flight
                done = inflight
                try:
                    done.result()
                except ServerError:
                    pass  # outcome() below decides: split a refused batch, or stop
                else:
                    inflight = pool.submit(send, next_kind, next_batch)
                outcome(kind, batch, done)          # … and k settles while k+1 is in flight
                if inflight is done:
                    inflight = pool.submit(send, next_kind, next_batch)
                kind, batch = next_kind, next_batch
            outcome(kind, batch, inflight)
        finally:
            pool.shutdown(wait=True)

    def _push_split(self, kind: str, batch: List[Tuple[Tuple[str, int], bytes]], exc: "ServerError",
                    send: Callable[..., dict], settle: Callable[..., None], report: SyncReport) -> None:
        """Find the item(s) of a refused batch by halving it; push the rest."""
        if len(batch) == 1:
            (row_id, _seq), _data = batch[0]
            report.refused[row_id] = exc.detail or exc.message
            return
        middle = len(batch) // 2
        for half in (batch[:middle], batch[middle:]):
            try:
                response = send(kind, half)
            except ServerError as inner:
                if inner.status not in (413, 422):
                    raise
                self._push_split(kind, half, inner, send, settle, report)
            else:
                settle(kind, half, response)

    def _note_own_seqs(self, response: dict) -> None:
        """Widen the server seq range our pushes in this sync were stored at (reference server)."""
        span = response.get("seq_range")
        if not (isinstance(span, list) and len(span) == 2 and span[0] <= span[1]
                and all(isinstance(x, int) and not isinstance(x, bool) for x in span)):
            return
        own = self._own_seqs
        self._own_seqs = (span[0], span[1]) if own is None else (min(own[0], span[0]), max(own[1], span[1]))

    def _settle_push(self, kind: str, seqs: Dict[str, int], response: dict) -> int:
        """Mark accepted rows clean (only if not rewritten meanwhile); return how many were accepted."""
        results = response.get("results")
        settled: Dict[str, Tuple[int, Optional[Clock]]] = {}
        if isinstance(results, list):  # our reference server's per-item verdicts
            for item in results:
                if (isinstance(item, dict) and item.get("status") == "accepted"
                        and item.get("entity_type") == kind and item.get("id") in seqs):
                    clock = item.get("vector_clock")
                    settled[item["id"]] = (seqs[item["id"]], clock if isinstance(clock, dict) else None)
        else:
            # An anchor server reports stale rejections only as counts: if anything in the batch
            # was not accepted we cannot tell which, so all stay dirty and the pull settles them.
            conflicts = response.get("conflicts") or []
            if not response.get("rejected") and not conflicts:
                settled = {row_id: (seq, None) for row_id, seq in seqs.items()}
        self.store.mark_pushed(kind, settled, sealed=self.key is not None)
        return len(settled)

    # -- pull --------------------------------------------------------------------------------

    def pull(self, report: SyncReport, dry_run: bool = False, force: bool = False) -> bool:
        """Fetch cloud changes page by page; each page commits together with its cursor.

        Returns True when rows were found missing on the server and marked for the next push.
        """
        self._deletions = 0
        # The mass-delete guard compares deletions with the live count before this pull. That
        # count scans the table, so it is taken only once more than MASS_DELETE_MIN deletions
        # have come in (below that the guard cannot trip): as the count then, minus what this
        # pull's earlier pages changed (_live_delta). An ordinary pull never scans.
        self._force = force
        self._live_before: Optional[int] = None
        self._live_delta = 0
        self._held_edges: List[Any] = []
        self._server_behind: Dict[str, List[str]] = {}  # kind -> ids (Op.server_behind)
        self._published_again = 0  # drafts here that the server holds published (APPLY_PUBLISH)
        cursor_key, since_key = f"pull_cursor|{self.scope}", f"pull_since|{self.scope}"
        storage_key = f"storage_id|{self.scope}"
        cursor = self.store.state(cursor_key)
        since = self.store.state(since_key)
        if since:  # timestamp cursors (anchor servers) re-read an overlap window; applying is idempotent
            since = format_ts(parse_ts(since) - timedelta(seconds=PULL_OVERLAP_SECONDS))
        offset, first_timestamp = 0, None
        restored = False
        timestamp_server = False

        def fetch(cursor: Optional[str], offset: int) -> Tuple[dict, Dict[str, List[Any]]]:
            response = self.client.pull(self.store.device_id, cursor, since, PULL_PAGE_SIZE, offset,
                                        exclude_own=self._own_seqs, peek=dry_run)
            return response, self._parse_page(response)

        # Page k+1 is fetched and decoded by a worker thread while this one applies page k (the
        # server's work overlaps ours). Pages still apply strictly in order, each in its own
        # transaction with its cursor; an error in page k+1 surfaces after page k is applied,
        # exactly as without the overlap. A one-page pull starts no thread.
        pool: Any = None
        prefetched: Any = None
        try:
            for page_number in range(PULL_MAX_PAGES):
                response, page = prefetched.result() if prefetched is not None else fetch(cursor, offset)
                prefetched = None
                if page_number == 0 and not restored and self._server_went_back(response, cursor, storage_key):
                    # The server lost rows since we last pulled (restored from an older copy, or a
                    # new database): start again from nothing, as a first sync would.
                    restored = True
                    report.warnings.append(
                        f"The server {self.client.server_url} was restored from an older copy or reset; "
                        f"pulling everything again and re-uploading what it is missing")
                    cursor, since, offset, self._own_seqs = None, None, 0, None
                    if not dry_run:
                        self.store.set_state(f"pushed_seq|{self.scope}", None)
                    response, page = fetch(cursor, offset)
                if page_number == 0 and not dry_run and isinstance(response.get("storage_id"), str):
                    self.store.set_state(storage_key, response["storage_id"])
                first_timestamp = first_timestamp or response.get("server_timestamp")
                next_cursor = response.get("next_cursor")
                if next_cursor is not None and not isinstance(next_cursor, str):
                    next_cursor = str(next_cursor)
                timestamp_server = timestamp_server or next_cursor is None
                self._cursorless = timestamp_server  # not our server: it may drop conflict marks
                page_cursor = next_cursor  # stored with this page (None from anchor servers)
                more, problem = bool(response.get("has_more")), None
                next_offset = 0
                if more and next_cursor is not None:
                    if next_cursor == cursor:
                        problem = "The server's pull paging did not advance; stopping (nothing was lost)"
                elif more:
                    # Anchor paging: advance by the longest list, never by next_offset (protocol.md §8).
                    step = max(len(page["memory"]), len(page["session"]), len(page["edge"]))
                    if step == 0:
                        problem = "The server said it has more rows but sent none; stopping"
                    next_cursor, next_offset = cursor, offset + step
                if more and problem is None:
                    if pool is None:
                        from concurrent.futures import ThreadPoolExecutor

                        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="contextfs-pull")
                    prefetched = pool.submit(fetch, next_cursor, next_offset)
                self._apply(page, report, dry_run, cursor_key, page_cursor)
                self.progress(f"pulled {sum(report.pulled.values())}")
                if not more:
                    break
                if problem is not None:
                    raise ServerError(problem)
                cursor, offset = next_cursor, next_offset
            else:  # pragma: no cover - needs a server that pages forever
                raise ServerError("The server's pull paging never ended; stopping (nothing was lost)")
        finally:
            if pool is not None:
                pool.shutdown(wait=True)
        if self._held_edges:  # edges whose ends came in a later page of this pull
            held, self._held_edges = self._held_edges, []
            self._apply({"memory": [], "session": [], "edge": held}, report, dry_run, None, None, hold=False)
        repush = False
        after_import = self.store.state("reconcile_next_sync") == "1"
        if (timestamp_server or restored or self._unreadable_before or after_import) and not dry_run:
            # A timestamp cursor misses rows pushed late with an old updated_at (protocol.md §8 b):
            # reconcile by content with the diff endpoint, as the public client's own sync does.
            repush = self._reconcile(report)
            if after_import:
                self.store.set_state("reconcile_next_sync", None)
        if self._under_old_key and not dry_run:  # a rekey's stragglers: up again under the new key
            repush = self.store.mark_dirty("memory", self._under_old_key) > 0 or repush
            self._under_old_key = []
        behind = sum(self.store.mark_dirty(kind, ids) for kind, ids in self._server_behind.items()) \
            if self._server_behind and not dry_run else 0
        if behind:
            report.warnings.append(f"The server held an older version of {behind} row{'' if behind == 1 else 's'} "
                                   f"this device had synced (restored from a backup?); uploading ours again")
            repush = True
        if self._published_again and not dry_run:
            n = self._published_again
            report.warnings.append(f"{n} memor{'y' if n == 1 else 'ies'} kept here as draft or temporary had been published "
                                   f"(this home was restored from an older copy?); published again, with the changes made here")
            repush = True
        if dry_run and self._deletions > MASS_DELETE_MIN:
            live_total = self._live_total()
            if is_mass_delete(self._deletions, live_total):
                report.warnings.append(_mass_delete_message("on this device", self._deletions, live_total))
        if not dry_run:
            if first_timestamp:
                self.store.set_state(since_key, normalize_ts(first_timestamp))
            self.store.set_state("last_pull_at", utc_now())
        return repush

    def _server_went_back(self, response: dict, cursor: Optional[str], storage_key: str) -> bool:
        """True when the server is not the one our cursor came from: another storage id, or a
        highest seq below our cursor or below the seq our own last push was stored at (both are
        our server's extensions; others send neither)."""
        storage_id, top = response.get("storage_id"), response.get("top_seq")
        known = self.store.state(storage_key)
        if isinstance(storage_id, str) and known and storage_id != known:
            return True
        if not (isinstance(top, int) and not isinstance(top, bool)):
            return False
        pushed = int(self.store.state(f"pushed_seq|{self.scope}") or 0)
        return max(int(cursor) if cursor and cursor.isdigit() else 0, pushed) > top

    def _apply(self, page: Dict[str, List[Any]], report: SyncReport, dry_run: bool,
               cursor_key: Optional[str], cursor: Optional[str], hold: bool = True) -> None:
        """Plan one page against the store, check the mass-delete guard, apply it (or, in a dry
        run, record the plan)."""
        store = self.store
        page = dict(page)
        page["memory"] = self._vet_memories(page.get("memory", []), page.pop("unverified", None))
        page["session"] = [session for session in page.get("session", []) if self._open_session(session)]
        local_rows = {kind: store.local_versions(kind, [obj.id for obj in objs]) if objs else {}
                      for kind, objs in page.items()}
        taken = _TakenIds(store)
        # The page's edge ends that are memories here, in one query (not one lookup per end).
        edges = page.get("edge", [])
        known = store.existing_ids("memory", [e.from_id for e in edges] + [e.to_id for e in edges]) if edges else set()
        ops = plan_page(page, local_rows, taken, device=store.device_id,
                        drops_metadata=self._drops_metadata(), known_memory_ids=known,
                        imported_from=self._imported_from,
                        copies_by_id=self._cursorless)
        for op in ops:
            if op.server_behind:
                self._server_behind.setdefault(op.kind, []).append(op.id)
            if op.op == APPLY_IGNORE:
                if hold and len(self._held_edges) < PULL_MAX_HELD_EDGES:
                    self._held_edges.append(op.row)
                continue
            if not op.changes_local:
                continue
            if op.deletes_live:
                self._deletions += 1
            if op.op != APPLY_SETTLE and not op.quiet:
                report.pulled[_WIRE_LISTS[op.kind]] += 1
            if op.copy is not None:
                report.conflicts.append((op.id, op.copy.id))
            if op.op == APPLY_DELETE_UNDONE:
                report.deletes_undone.append(op.id)
            if op.op == APPLY_PUBLISH:
                self._published_again += 1
            if dry_run and len(report.plan) < PLAN_LIMIT:
                report.plan.append(op.to_dict())
        if dry_run:
            return
        if not self._force and self._deletions > MASS_DELETE_MIN and is_mass_delete(self._deletions,
                                                                                    self._live_total()):
            # Checked after counting the whole page (so the message gives the real number) and
            # before writing any of it.
            raise MassDeleteError(_mass_delete_message("on this device", self._deletions, self._live_total()))
        memory_before = local_rows.get("memory", {})
        self._live_delta += sum(
            (op.row.deleted_at is None) - bool(memory_before.get(op.id) is not None
                                               and memory_before[op.id].deleted_at is None
                                               and memory_before[op.id].conflict_of is None)
            for op in ops if op.kind == "memory" and op.changes_local)
        upserted, deleted = store.apply_page(ops, cursor_key, cursor)
        if upserted or deleted:
            warning = index_after_pull(store, self.cfg, upserted, deleted)
            if warning and warning not in report.warnings:
                report.warnings.append(warning)

    def _drops_metadata(self) -> bool:
        """Whether this server is known to store no metadata (learned from its echoes)."""
        return self.store.state(f"drops_metadata|{self.scope}") == "1"

    def _reconcile(self, report: SyncReport) -> bool:
        """Compare every syncable row with the server (/api/sync/diff: memories by content hash,
        sessions and links by id): pull what the pages missed, and mark for upload what the
        server lacks though this device had synced it. True if any was marked."""
        manifests = {kind: self.store.manifest(kind, self._keyed() if kind == "memory" else None)
                     for kind in ("memory", "session", "edge")}
        # No deleted_at in the manifest: ContextFS Cloud would apply it (its diff rule 2).
        response = self.client.diff(
            self.store.device_id, [{"id": i, "content_hash": h} for i, h, _deleted, _dirty in manifests["memory"]],
            [{"id": i} for i, _h, _deleted, _dirty in manifests["session"]],
            [{"id": i} for i, _h, _deleted, _dirty in manifests["edge"]])
        page = self._parse_page({"memories": response.get("missing_memories") or [],
                                 "sessions": [], "edges": response.get("missing_edges") or []})
        if page["memory"] or page["edge"]:
            self._apply(page, report, False, None, None, hold=False)
        marked = 0
        for kind, field_name in (("memory", "server_missing_memory_ids"), ("session", "server_missing_session_ids"),
                                 ("edge", "server_missing_edge_ids")):
            # Tombstones too: a server that lost a delete would let a stale device revive the row.
            clean = {i for i, _h, _deleted, dirty in manifests[kind] if not dirty}
            lost = [i for i in response.get(field_name) or [] if isinstance(i, str) and i in clean]
            marked += self.store.mark_dirty(kind, lost) if lost else 0
        if marked:
            report.warnings.append(f"The server was missing {marked} row{'' if marked == 1 else 's'} this device "
                                   f"had synced; uploading {'it' if marked == 1 else 'them'} again")
        return marked > 0

    def _live_total(self) -> int:
        """Live memories before this pull: counted now, less what its applied pages changed."""
        if self._live_before is None:
            self._live_before = self.store.live_memory_count() - self._live_delta
        return self._live_before

    @staticmethod
    def _parse_page(response: dict) -> Dict[str, List[Any]]:
        """A pull response as rows by kind, plus ``"unverified"``: the positions of memories whose
        content does not simply match its hash (they need _readable). Pure, so it runs on the
        prefetch worker: hashing every pulled text there overlaps the applying thread's writes."""
        page: Dict[str, List[Any]] = {}
        for kind, (_table, cls, _cols) in _KINDS.items():
            items = response.get(_WIRE_LISTS[kind]) or []
            if not isinstance(items, list):
                raise ServerError(f"Invalid pull response: {_WIRE_LISTS[kind]} is not a list")
            try:
                page[kind] = [cls.from_wire(item) for item in items]
            except ValueError as exc:
                raise ServerError(f"Invalid {kind} in the pull response ({exc}); nothing was applied") from None
        page["unverified"] = [n for n, memory in enumerate(page["memory"]) if not _hash_matches(memory)]
        return page

    def _vet_memories(self, memories: List[Memory], unverified: Optional[List[int]] = None) -> List[Memory]:
        """The pulled memories that may be stored, decrypted; learns whether the server drops
        metadata. Reads the store, so it runs on the applying thread, never on the prefetch
        worker (one SQLite connection is not to be used from two threads at once).
        ``unverified`` (from _parse_page) names the only ones that need a closer look."""
        suspect = set(range(len(memories)) if unverified is None else unverified)
        readable = []
        for n, memory in enumerate(memories):
            if memory.id.startswith(E2EE_CHECK_PREFIX):
                self._note_key_check(memory)
            elif n not in suspect or self._readable(memory):
                readable.append(memory)
        if self.key is not None:
            # A memory the server held encrypted never comes back as plain text unnoticed (a
            # server, or a client without the passphrase, rewriting it): refused and named.
            plain = [m.id for m in readable if not m.sealed and m.deleted_at is None]
            local = self.store.local_versions("memory", plain) if plain else {}
            downgraded = {i for i, row in local.items() if row.sealed and row.deleted_at is None}
            for memory_id in downgraded:
                self._unreadable[memory_id] = "came back unencrypted though the server held it end-to-end encrypted"
            readable = [m for m in readable if m.id not in downgraded]
        self._learn_metadata_drop(readable)
        return readable

    def _learn_metadata_drop(self, memories: List[Memory]) -> None:
        """A server that echoes our own write with empty metadata stores none (ContextFS Cloud,
        protocol.md gap 5): remember it, so its empty objects never wipe ours."""
        if self._drops_metadata():
            return
        device = self.store.device_id
        echoes = [m for m in memories if m.last_modified_by == device and not m.metadata and not m.deleted_at]
        if not echoes:
            return
        local = self.store.local_versions("memory", [m.id for m in echoes])
        if any(local.get(m.id) is not None and local[m.id].metadata and local[m.id].content_hash == m.content_hash
               for m in echoes):
            self.store.set_state(f"drops_metadata|{self.scope}", "1")

    def _readable(self, memory: Memory) -> bool:
        """Decrypt a pulled memory in place; False if it must not be stored (damaged).

        Content is trusted only when it matches its content_hash (of the plaintext). A server
        may drop the ``encrypted`` flag (ContextFS Cloud does: protocol.md gap 6), so content
        that does not match its hash is tried as ciphertext with every key this device has:
        the passphrase key, then the public client's key derived from our API key.
        """
        if _hash_matches(memory):
            return True
        if memory.deleted_at is not None and not memory.content:
            memory.encrypted, memory.content_hash = False, content_hash("")
            return True
        looks_sealed = memory.encrypted or _looks_like_ciphertext(memory.content)
        keys = [k for k in (self.key, self.old_key) if k is not None] + \
            (self._public_client_keys() if looks_sealed else [])
        hash_key = self._content_hash_key() if self.key is not None else None
        for key in keys:
            if open_memory(key, memory, hash_key):
                if key is self.old_key:
                    self._under_old_key.append(memory.id)
                    self.opened_with_old_key += 1
                return True
        if looks_sealed:
            if self.key is None:
                _aesgcm()  # names the missing extra when cryptography is not installed
                raise CryptoError(f"Memory {memory.id} is end-to-end encrypted and this device has no passphrase. "
                                  f"Run: contextfs cloud configure --e2ee (nothing was stored)", EXIT_NOT_CONFIGURED)
            if self._key_checked():
                # The key is right (it opens the account's key check): this row was damaged or
                # tampered with. It alone is left out; the rest of the sync goes on.
                self._unreadable[memory.id] = "failed its integrity check"
                return False
            raise CryptoError(f"Cannot decrypt memory {memory.id}: wrong E2EE passphrase on this device? "
                              f"Run: contextfs cloud configure --e2ee (nothing was stored)")
        # Plain text that does not match its hash: damaged on the way. Never let it replace
        # what we hold; a memory we do not have yet is stored with the hash of what it says.
        if self.store.get_row("memory", memory.id) is not None:
            self._damaged += 1
            return False
        memory.content_hash = content_hash(memory.content)
        return True

    def _open_session(self, session: Session) -> bool:
        """Decrypt a pulled session's sealed label and summary in place; False if it must not be stored."""
        for name in ("label", "summary"):
            value = getattr(session, name)
            if not (isinstance(value, str) and value.startswith(SEALED_MARK)):
                continue
            for key in (self.key, self.old_key):
                if key is None:
                    continue
                try:
                    setattr(session, name, decrypt_content(key, value, bind=f"session/{session.id}/{name}"))
                    break
                except CryptoError:
                    continue
            else:
                if self.key is None:
                    _aesgcm()
                    raise CryptoError(f"Session {session.id} is end-to-end encrypted and this device has no passphrase. "
                                      f"Run: contextfs cloud configure --e2ee (nothing was stored)", EXIT_NOT_CONFIGURED)
                self._unreadable[session.id] = "failed its integrity check"
                return False
        return True

    def _public_client_keys(self) -> List[bytes]:
        """The key the public ContextFS client derives from this API key and its salt, if any."""
        with self._keys_lock:
            if self._anchor_keys is None:
                self._anchor_keys = []
                try:
                    salt = self.client.encryption_salt()
                except ContextFSError:
                    salt = None
                if salt and self.client.api_key:
                    self._anchor_keys.append(derive_anchor_key(self.client.api_key, salt))
            return self._anchor_keys


class _TakenIds:
    """Ids a conflict copy may not take: any memory or session id already in the store."""

    def __init__(self, store: Store):
        self.memories, self.sessions = store.ids("memory"), store.ids("session")

    def __contains__(self, row_id: object) -> bool:
        return row_id in self.memories or row_id in self.sessions


def _hash_matches(memory: "Memory") -> bool:
    """True when a pulled memory's content is plaintext that matches its content_hash (or it
    carries no hash to check): it can be stored as it is."""
    expected = memory.content_hash
    return not memory.encrypted and (not expected or content_hash(memory.content) == expected)


def _looks_like_ciphertext(text: str) -> bool:
    """Whether content has the wire form of sealed content (base64url of nonce‖ciphertext‖tag)."""
    if text.startswith(SEALED_MARK):
        text = text[len(SEALED_MARK):]
    return len(text) >= 40 and re.fullmatch(r"[A-Za-z0-9_-]+={0,2}", text) is not None


def _last_sync_rows(store: Store, cfg: Config, what: str) -> Dict[str, str]:
    """Rows the last sync with this server and account left aside: ``refused`` by the server,
    or pulled and ``unreadable`` here; id -> why."""
    try:
        url = check_server_url(cfg.server_url, True)
    except ContextFSError:
        return {}
    return json.loads(store.state(f"{what}|{_sync_scope(url, cfg.api_key)}") or "{}")


def _sync_scope(server_url: str, api_key: Optional[str]) -> str:
    """The key prefix of one server and account's sync state (cursors, refused rows)."""
    import hashlib

    return f"{server_url}|{hashlib.sha256((api_key or '').encode()).hexdigest()[:12]}"


def register_device(client: CloudClient, device: str) -> dict:
    """Register this device with the server (name and platform as the public client sends them)."""
    import platform
    import socket

    return client.register(device, socket.gethostname() or "device", platform.system().lower())


def _client_for(cfg: Config) -> CloudClient:
    return CloudClient(cfg.server_url, cfg.api_key, insecure=bool(cfg.get("cloud", "insecure", False)))


def cloud_sync(home: Optional[Path] = None, direction: str = "both", push_all: bool = False,
               force: bool = False, dry_run: bool = False,
               progress: Optional[Callable[[str], None]] = None,
               lock_timeout: float = LOCK_TIMEOUT_SECONDS, retries: Optional[int] = None) -> SyncReport:
    """Sync this device with the cloud: push, pull or both (push then pull); SyncBusy if
    another sync holds the lock for more than ``lock_timeout`` seconds. ``retries``: attempts
    after the first for a request that fails on the way (default MAX_RETRIES)."""
    if direction not in ("push", "pull", "both"):
        raise UsageError(f"direction must be push, pull or both, not {direction!r}")
    started = time.monotonic()
    cfg = load_config(home)
    require_cloud(cfg)
    key = e2ee_key(cfg)
    if cfg.get("cloud", "e2ee_old_key"):
        raise NotConfigured("A passphrase change (contextfs cloud rekey) was interrupted on this device; finish it "
                            "first: contextfs cloud rekey (with the same new passphrase)")
    previous = cfg.get("cloud", "e2ee_previous_key")
    with SyncLock(cfg.home, lock_timeout), open_store(cfg.home) as store, _client_for(cfg) as client:
        if retries is not None:
            client.retries = retries
        engine = SyncEngine(store, client, cfg, key, progress,
                            old_key=b64url_decode(previous) if previous and key is not None else None)
        report = engine.run(direction, push_all, force, dry_run)
    if previous and direction == "both" and not dry_run and not engine.opened_with_old_key:
        # A whole sync found nothing left under the previous passphrase: forget it.
        cfg.set("cloud", "e2ee_previous_key", None)
        save_config(cfg)
    report.duration_ms = int((time.monotonic() - started) * 1000)
    return report


class AutoSync:
    """Syncs by itself while `contextfs mcp` (or `cloud sync --watch`) runs: once at start, a
    push ``push_delay`` after local writes (any process's: it watches the store's write
    counter; more writes within the delay push it back, up to 6 delays), and a full sync every
    ``sync_interval``. It runs on its own thread, so it never blocks a tool call; it never
    overlaps another sync (a round that finds the sync lock held waits for the next second);
    after a failure nothing runs for 5 s, then twice as long after each further failure (15
    min at most), and never sooner than the interval. Each
    round's result and the next run are kept in the store (state ``auto_sync``) for ``cloud
    status`` and ``contextfs_sync_status``. The config is read again every round, so turning
    sync or auto-sync off (or on) takes effect without a restart."""

    TICK = 1.0           # seconds between looks at the store's write counter
    FIRST_RETRY = 5.0    # seconds after the first failure
    MAX_RETRY = 900.0    # seconds: the longest wait the doubling reaches

    def __init__(self, home: Optional[Path] = None, on_round: Optional[Callable[[dict], None]] = None,
                 owner: str = "contextfs mcp", always: bool = False):
        self.home = home
        self.always = always  # `cloud sync --watch`: runs whenever sync is on, whatever cloud.auto_sync says
        self.on_round = on_round or (lambda result: None)
        self.owner = owner
        self.failures = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "AutoSync":
        """Run in a daemon thread (it stops with the process, or at stop())."""
        self._thread = threading.Thread(target=self.run, name="contextfs-auto-sync", daemon=True)
        self._thread.start()
        return self

    def alive(self) -> bool:
        """Whether the loop's thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the loop to end and wait up to ``timeout`` for a running round."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def run(self) -> None:
        """The loop: until stop(), or the process ends."""
        next_full = time.monotonic()          # once at start
        push_due: Optional[float] = None      # a debounced push after local writes
        first_change: Optional[float] = None
        mark: Optional[int] = None
        while not self._stop.is_set():
            now = time.monotonic()
            try:
                cfg = load_config(self.home)
                on = (cfg.enabled if self.always else cfg.auto_sync) and bool(cfg.api_key)
                current = self._change_mark(cfg) if on else None
            except ContextFSError as exc:     # a broken config.toml or sync.db: said, then wait
                self._record(None, {"at": utc_now(), "ok": False, "error": exc.message}, None)
                self._stop.wait(30.0)
                continue
            if not on:
                next_full, push_due, first_change, mark = now, None, None, None  # sync at once when turned on
                self._stop.wait(self.TICK)
                continue
            if mark is not None and current != mark:
                first_change = first_change or now
                push_due = min(now + cfg.push_delay, first_change + 6 * max(cfg.push_delay, self.TICK))
            mark = current
            direction = ("both" if now >= next_full else None if self.failures  # backing off: nothing before then
                         else "push" if push_due is not None and now >= push_due else None)
            if direction is not None:
                result = self._round(cfg, direction)
                if result is None:            # another sync holds the lock: try again shortly
                    self._stop.wait(self.TICK)
                    continue
                # `mark` stays as read before the round: a write made during it moves the
                # counter and is pushed next (so may the round's own conflict copies: that
                # push finds nothing left to send and costs no request).
                push_due = first_change = None
                if result["ok"]:
                    self.failures = 0
                    wait = cfg.sync_interval
                else:
                    self.failures += 1
                    wait = max(cfg.sync_interval, min(self.MAX_RETRY, self.FIRST_RETRY * 2 ** (self.failures - 1)))
                if direction == "both" or not result["ok"]:
                    next_full = time.monotonic() + wait
                self._record(cfg, result, next_full)
                self.on_round(result)
            self._stop.wait(self.TICK)

    def _change_mark(self, cfg: Config) -> Optional[int]:
        if not (cfg.home / "sync.db").exists():
            return None
        with open_store(cfg.home) as store:
            return store.change_mark()

    def _round(self, cfg: Config, direction: str) -> Optional[dict]:
        """One sync; its result, or None when another sync held the lock."""
        started = utc_now()
        try:
            # One retry per request: while the server is down, the rounds themselves back off.
            report = cloud_sync(cfg.home, direction=direction, lock_timeout=0.0, retries=1)
        except SyncBusy:
            return None
        except ContextFSError as exc:
            return {"at": started, "direction": direction, "ok": False, "error": exc.message}
        except Exception as exc:  # a bug costs one round, never the agent's session
            return {"at": started, "direction": direction, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
        return {"at": started, "direction": direction, "ok": True, "summary": report.summary(),
                "partial": bool(report.refused or report.unreadable)}

    def _record(self, cfg: Optional[Config], result: dict, next_full: Optional[float]) -> None:
        """Keep the last result and the next run where `cloud status` reads them."""
        state = dict(result, pid=os.getpid(), owner=self.owner, failures=self.failures)
        if next_full is not None:
            state["next_at"] = _utc_in(next_full - time.monotonic())
        home = cfg.home if cfg is not None else contextfs_home() if self.home is None else Path(self.home)
        if not (home / "sync.db").exists():
            return
        with _suppress(ContextFSError, sqlite3.Error), open_store(home) as store:
            store.set_state("auto_sync", _dumps(state))


def _utc_in(seconds: float) -> str:
    """The UTC time ``seconds`` from now, as utc_now() writes it."""
    return format_ts(datetime.now(timezone.utc) + timedelta(seconds=max(0.0, seconds)))


def auto_sync_status(cfg: Config, store: "Store") -> dict:
    """What auto-sync is doing here: on or off, and, while a process runs it, its last round
    and next run."""
    out: Dict[str, Any] = {"enabled": cfg.auto_sync, "interval_seconds": cfg.sync_interval,
                           "push_delay_seconds": cfg.push_delay, "running": False}
    raw = store.state("auto_sync")
    try:
        state = json.loads(raw) if raw else None
    except ValueError:
        state = None
    if isinstance(state, dict):
        out["running"] = _pid_alive(state.get("pid"))
        out["last"] = {k: state[k] for k in ("at", "direction", "ok", "summary", "error", "partial") if k in state}
        out["failures_in_a_row"] = state.get("failures", 0)
        out["owner"] = state.get("owner")
        if out["running"] and state.get("next_at"):
            out["next_at"] = state["next_at"]
    return out


def auto_sync_line(auto: dict) -> str:
    """auto_sync_status() in one line, for `cloud status` and contextfs_sync_status."""
    every = f"every {_duration_text(auto['interval_seconds'])}, {_duration_text(auto['push_delay_seconds'])} after writes"
    if auto.get("running"):
        line = f"running in {auto.get('owner')} ({every})"
    elif auto["enabled"]:
        line = f"on ({every}) while contextfs mcp runs; not running now"
    else:
        line = "off (cloud.auto_sync = false, or sync disabled)"
    last = auto.get("last")
    if last:
        line += (f"; last {last.get('at')}: {last.get('summary')}" if last.get("ok")
                 else f"; last {last.get('at')} failed: {last.get('error')}")
    if auto.get("next_at"):
        line += f"; next {auto['next_at']}"
    return line


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def cloud_rekey(home: Optional[Path], passphrase: str,
                progress: Optional[Callable[[str], None]] = None) -> dict:
    """Re-encrypt every memory on the server under a new passphrase. Resumable: after a crash,
    run it again with the same new passphrase (until then this device's syncs stop and say so).

    Order: sync under the current key; save the new key with the old one kept beside it (the
    resume point); move the key check to the new key (other devices' passphrases stop opening
    it, so they stop and are told); mark every memory for upload and sync (rows still under
    the old key, pushed meanwhile by a device that did not know yet, are read with the old key
    and uploaded again); forget the old key.
    """
    cfg = load_config(home)
    require_cloud(cfg)
    if not cfg.e2ee:
        raise UsageError("End-to-end encryption is off on this device; turn it on first: contextfs cloud configure --e2ee")
    current, resuming = e2ee_key(cfg), cfg.get("cloud", "e2ee_old_key")
    with SyncLock(cfg.home), open_store(cfg.home) as store, _client_for(cfg) as client:
        user_id = account_id(client)
        new = derive_passphrase_key(passphrase, account_salt(user_id))
        if resuming:
            old = b64url_decode(resuming)
            if new != current:
                raise UsageError("An unfinished passphrase change to another passphrase is pending here; run "
                                 "contextfs cloud rekey again with that one; nothing was changed")
        else:
            if new == current:
                raise UsageError("That is the passphrase in use; nothing was changed")
            SyncEngine(store, client, cfg, current, progress).run("both")
            old = current
            cfg.set("cloud", "e2ee_old_key", b64url_encode(old))
            set_e2ee_key(cfg, new)
            save_config(cfg)
        engine = SyncEngine(store, client, cfg, new, progress, old_key=old)
        check = engine._lookup_key_check()
        if check is None or not key_opens_check(new, check.content):
            if check is not None and not key_opens_check(old, check.content):
                raise CryptoError("This account's key check opens with neither the old nor the new passphrase: "
                                  "another device changed it meanwhile. Nothing more was changed here")
            # The content-hash key carries over: the re-uploads below keep their hashes, so every
            # server takes them as the versions they are (same clock, same data).
            hash_key = open_key_check(old, check.content)[1] if check is not None else None
            device = store.device_id
            sealed = seal_key_check(new, hash_key)
            client.push(device, [key_check_wire(engine._check_id(), sealed, device, replaces=check)], [], [])
            check = engine._lookup_key_check()
            if check is None or not key_opens_check(new, check.content):
                raise ServerError("The server did not take the new key check; run contextfs cloud rekey again")
        marked = 0
        if store.state(f"rekey_marked|{engine.scope}") != "1":
            marked = store.mark_dirty("memory", synced_live_memory_ids(store))
            store.set_state(f"rekey_marked|{engine.scope}", "1")
        report = engine.run("both")
        store.set_state(f"rekey_marked|{engine.scope}", None)
    cfg.set("cloud", "e2ee_previous_key", resuming or b64url_encode(old))  # stragglers, see cloud_sync
    cfg.set("cloud", "e2ee_old_key", None)
    save_config(cfg)
    return {"reencrypted": report.pushed["memories"], "marked": marked, "report": report.to_dict()}


def cloud_reset_e2ee(home: Optional[Path], passphrase: str, keep_unreadable: bool = False,
                     confirm: Callable[[dict], bool] = lambda plan: True,
                     progress: Optional[Callable[[str], None]] = None) -> dict:
    """Start an account's end-to-end encryption over under a new passphrase (the old one is
    lost). ``confirm(plan)`` sees what will happen first: every memory this device holds goes
    up again under the new key; the server's memories this device does not hold cannot be read
    by anyone, and are deleted there unless ``keep_unreadable``."""
    cfg = load_config(home)
    require_cloud(cfg)
    with SyncLock(cfg.home), open_store(cfg.home) as store, _client_for(cfg) as client:
        user_id = account_id(client)
        new = derive_passphrase_key(passphrase, account_salt(user_id))
        manifest = store.manifest("memory")
        local = {i for i, _h, _deleted, _dirty in manifest}
        check, others = lookup_key_check(client, store.device_id, e2ee_check_id(user_id),
                                         [{"id": i, "content_hash": h} for i, h, _d, _dirty in manifest])
        # What the server holds that this device does not: sealed, it is lost with the passphrase.
        lost = [m for m in others if m.id not in local and m.deleted_at is None and not _hash_matches(m)]
        mine = [m for m in store.list(limit=10_000_000) if not m.local_only]
        plan = {"reupload": len(mine), "unreadable": [m.id for m in lost], "keep_unreadable": keep_unreadable}
        if not confirm(plan):
            raise UsageError("Nothing was changed")
        device = store.device_id
        # A new content-hash key too: every memory goes up again as a new version anyway.
        client.push(device, [key_check_wire(e2ee_check_id(user_id), seal_key_check(new, new_hash_key()), device,
                                            replaces=check)], [], [])
        for memory in lost:
            memory.deleted_at = utc_now()   # a tombstone newer than what nobody can read
        store.republish(mine + ([] if keep_unreadable else lost))
        cfg.set("cloud", "e2ee", True)
        set_e2ee_key(cfg, new)
        for name in ("e2ee_old_key", "e2ee_previous_key"):
            cfg.set("cloud", name, None)
        save_config(cfg)
        engine = SyncEngine(store, client, cfg, new, progress)
        store.set_state(f"e2ee_check|{engine.scope}", None)  # looked up again before the push
        report = engine.run("both")
    return {"reuploaded": len(mine), "deleted_on_server": 0 if keep_unreadable else len(lost),
            "kept_unreadable": len(lost) if keep_unreadable else 0, "report": report.to_dict()}


IMPORT_BATCH = 500  # rows per transaction


def public_store_path(source: Optional[Path] = None) -> Path:
    """Where the public ContextFS client keeps its store: ``source`` (its data directory or
    the file itself), else ``$CONTEXTFS_DATA_DIR`` or ``~/.contextfs``, then ``context.db``."""
    if source is None:
        env = os.environ.get("CONTEXTFS_DATA_DIR")
        source = Path(env).expanduser() if env else Path.home() / ".contextfs"
    source = Path(source).expanduser()
    return source / "context.db" if source.is_dir() else source


def import_contextfs(source: Optional[Path] = None, home: Optional[Path] = None, dry_run: bool = False,
                     progress: Optional[Callable[[str], None]] = None) -> dict:
    """Bring the public ContextFS client's memories, sessions and relationships into this
    store, keeping ids, types, tags, timestamps, metadata and vector clocks (its file is only
    read). Each imported row goes up at the next sync: as it was when that client published
    it (so a server that has it takes it as the same version: no duplicate, no conflict), or,
    changed since or never published, as a new version of this device. Running it again
    changes nothing; a row both clients changed keeps ours and theirs as a conflict copy."""
    path = public_store_path(source)
    reader = PublicStore(path)
    cfg = load_config(home)
    result: Dict[str, Any] = {"source": str(path), "dry_run": dry_run}
    try:
        last_sync, server = reader.last_sync()
        # What it published is on the server it synced with; a row goes up to another one.
        published = "published" if server and server.rstrip("/") == cfg.server_url else "unpushed"
        total = sum(reader.counts().values())
        done = 0
        with open_store(cfg.home) as store:
            writers = set(reader.devices())
            if not dry_run:
                # Its writes echo back from a server that drops metadata with {}: ours stays
                # (plan_page); and the next sync compares everything with the server once.
                known = set(json.loads(store.state("import_writers") or "[]"))
                store.set_state("import_writers", _dumps(sorted(known | writers)))
                store.set_state("reconcile_next_sync", "1")
            copies_held = {(c.conflict_of, getattr(c, "content_hash", None) or c.summary) for c in store.conflicts()}
            for kind, plural, rows in (("session", "sessions", reader.sessions()),
                                       ("memory", "memories", reader.memories()),
                                       ("edge", "edges", reader.edges())):
                counts = {"add": 0, "update": 0, "copy": 0, "skip": 0, "unpublished_delete": 0}
                batch: List[Tuple[Any, str]] = []
                for item in rows:
                    obj, changed = _import_row(kind, item, last_sync)
                    ours = store.get_row(kind, obj.id)
                    action = plan_import(kind, obj, ours, changed)
                    if action == "copy":
                        mark = (obj.id, getattr(obj, "content_hash", None) or obj.summary)
                        if mark in copies_held:
                            action = "skip"  # kept beside ours by an earlier import
                        else:
                            copies_held.add(mark)
                            obj = _conflict_copy(obj, conflict_copy_id(obj.id, lambda i: store.get_row(kind, i) is not None),
                                                 obj.id, "")
                            changed = True
                    counts[action] += 1
                    if action in ("add", "update", "copy"):
                        if changed and action != "copy":
                            obj.vector_clock = _as_it_would_push(obj.vector_clock, writers)
                        batch.append((obj, "changed" if changed else published))
                    if len(batch) >= IMPORT_BATCH:
                        if not dry_run:
                            store.import_rows(kind, batch)
                        batch = []
                    done += 1
                    if progress and done % 100 == 0:
                        progress(f"importing: {done}/{total}")
                if batch and not dry_run:
                    store.import_rows(kind, batch)
                result[plural] = {"added": counts["add"], "updated": counts["update"],
                                  "conflict_copies": counts["copy"], "unchanged": counts["skip"],
                                  "deleted_before_any_sync": counts["unpublished_delete"]}
    finally:
        reader.close()
    return result


def _import_row(kind: str, item: Any, last_sync: Optional[datetime]) -> Tuple[Any, bool]:
    """(our row, whether the public client changed it after it last published it)."""
    if kind == "memory":
        memory, pushed_hash, written = item
        changed = (not memory.vector_clock or memory.deleted_at is not None
                   or pushed_hash != content_hash(memory.content) or _after(written, last_sync))
        return memory, changed
    if kind == "session":
        # Its store keeps no time a session was last changed: every session goes up as a new
        # version of this device (a few rows; never a conflict, and a second import skips it).
        return item, True
    return item, not item.vector_clock or item.deleted_at is not None


def _as_it_would_push(clock: Clock, writers: Iterable[str]) -> Clock:
    """A changed row's clock as the public client would send it: its push bumps its own entry
    by 1 from the stored clock (protocol.md §6), and ContextFS Cloud stores a row it inserts
    one further; so our new version, ticked on top, dominates whatever the server holds."""
    return {device: count + 1 if device in writers else count for device, count in clock.items()}


def _after(written: Optional[str], last_sync: Optional[datetime]) -> bool:
    """Whether the public client wrote a row after its last sync (or never synced): unknown
    counts as after, so the row goes up as a new version rather than be taken as published."""
    when = _public_ts(written)
    return last_sync is None or when is None or when > last_sync


def cloud_status(home: Optional[Path] = None, remote: bool = True) -> dict:
    """Sync status: enabled, server, masked key, device id, last push/pull, pending, conflicts."""
    cfg = load_config(home)
    with open_store(cfg.home) as store:
        counts = store.counts()
        status: Dict[str, Any] = {
            "enabled": cfg.enabled, "server_url": cfg.server_url, "api_key": mask_key(cfg.api_key),
            "e2ee": cfg.e2ee, "device_id": store.device_id, "previous_device_id": previous_device_id(cfg.home),
            "last_push_at": store.state("last_push_at"), "last_pull_at": store.state("last_pull_at"),
            "pending_push": counts["pending_push"], "conflicts": counts["conflicts"], "local": counts,
            "refused": _last_sync_rows(store, cfg, "refused"),
            "unreadable": _last_sync_rows(store, cfg, "unreadable"),
            "auto_sync": auto_sync_status(cfg, store),
            "server": None}
        if remote and cfg.enabled and cfg.api_key:
            try:
                with _client_for(cfg) as client:
                    client.retries = 1
                    server = client.status(store.device_id)
                keys = ["memory_count", "session_count", "edge_count", "pending_pull_count", "last_sync_at"]
                if "memory_count" not in server:
                    # ContextFS Cloud counts every tenant's memories there (protocol.md gap 9).
                    keys.remove("pending_pull_count")
                status["server"] = {k: server.get(k) for k in keys if k in server}
            except ServerError as exc:
                if exc.status == 404 and "not registered" in exc.detail.lower():
                    status["server"] = {"registered": False}
                else:
                    status["server"] = {"error": exc.message}
            except ContextFSError as exc:
                status["server"] = {"error": exc.message}
    return status


def cloud_check(home: Optional[Path] = None) -> dict:
    """Compare local and server manifests with the diff endpoint; report the differences."""
    cfg = load_config(home)
    require_cloud(cfg)
    with open_store(cfg.home) as store, _client_for(cfg) as client:
        manifest = []
        local_hashes: Dict[str, Tuple[str, bool]] = {}
        synced = set()  # rows this device holds clean: the server had them when it last synced
        keyed = SyncEngine(store, client, cfg, e2ee_key(cfg))._keyed() if cfg.e2ee else None
        for row_id, row_hash, deleted, dirty in store.manifest("memory", keyed):
            if not dirty:
                synced.add(row_id)
            # deleted_at is left out on purpose: an anchor server would apply it (diff rule 2);
            # updated_at too: every server ignores it (protocol.md §4.4).
            manifest.append({"id": row_id, "content_hash": row_hash})
            local_hashes[row_id] = (row_hash, deleted)
        response = client.diff(store.device_id, manifest, [], [])
    only_server, differ = [], []
    for item in response.get("missing_memories") or []:
        if not isinstance(item, dict):
            continue
        if str(item.get("id")).startswith(E2EE_CHECK_PREFIX):
            continue  # the account's E2EE key check: never a local row
        if item.get("id") not in local_hashes:
            only_server.append(item.get("id"))
        elif item.get("deleted_at") is None or not local_hashes[item["id"]][1]:
            differ.append(item.get("id"))
    deleted_on_server = [i for i in response.get("deleted_memory_ids") or [] if not local_hashes.get(i, ("", True))[1]]
    only_local = [i for i in response.get("server_missing_memory_ids") or [] if not local_hashes.get(i, ("", True))[1]]
    result: Dict[str, Any] = {"only_local": only_local, "only_server": only_server, "different": differ,
                              "deleted_on_server_only": deleted_on_server}
    result["in_sync"] = not any(result.values())
    # Rows this device had synced that the server no longer has: it went back in time (restored
    # from an older copy, or reset). Named, since timestamp servers give no other sign of it.
    result["server_lost"] = [i for i in only_local if i in synced]
    return result


# ---- 11. MCP stdio server ----------------------------------------------------------------
# JSON-RPC 2.0, one message per line on stdin/stdout, per the MCP specification (revisions
# 2024-11-05 to 2025-11-25). Hand-rolled so that `contextfs mcp` starts fast and needs no SDK.
# The reading loop answers protocol requests itself and hands each tool call to a worker
# thread, so `ping` (and everything else) is answered while a long sync runs. stdout carries
# protocol only: the server keeps a private duplicate of file descriptor 1 and points fd 1 and
# sys.stdout at stderr, so a stray print, or a library writing to fd 1 directly, cannot corrupt
# the stream. Tools call the same functions as the CLI; their failures are tool results with
# ``isError: true`` and the error's exact one-line message, never protocol errors or crashes.

MCP_PROTOCOL_VERSIONS = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")  # oldest first
MCP_SERVER_NAME = "contextfs-sync"
MCP_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
MCP_MAX_CONCURRENT_CALLS = 4
MCP_EXIT_GRACE_SECONDS = 0.5  # on EOF/SIGTERM, time left to running calls to deliver their answer

RPC_PARSE_ERROR = -32700
RPC_INVALID_REQUEST = -32600
RPC_METHOD_NOT_FOUND = -32601
RPC_INVALID_PARAMS = -32602
RPC_INTERNAL_ERROR = -32603

MCP_INSTRUCTIONS = (
    "contextfs keeps this agent's memories (facts, decisions, procedures, errors, ...) on this device "
    "and syncs them with a ContextFS-compatible server. Prefer these tools over the CLI: "
    "contextfs_sync() syncs (push then pull; direction='push' or 'pull' for one way), "
    "contextfs_sync_status() shows whether sync is set up, contextfs_save/search/list/delete manage "
    "memories. When a tool reports that sync is disabled or no API key is configured, show the user "
    "the command the message names; do not retry.")


def _mcp_at_least(version: str, minimum: str) -> bool:
    return MCP_PROTOCOL_VERSIONS.index(version) >= MCP_PROTOCOL_VERSIONS.index(minimum)


def mcp_negotiate_version(requested: str) -> str:
    """The protocol version to answer: the client's if we support it, else our newest."""
    return requested if requested in MCP_PROTOCOL_VERSIONS else MCP_PROTOCOL_VERSIONS[-1]


class McpError(Exception):
    """A JSON-RPC error answer (code, message) for one request."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def _rpc_error(req_id: Any, code: int, message: str) -> dict:
    # ``id`` is the one field that stays null: JSON-RPC requires it when the id is unknown.
    return {"jsonrpc": "2.0", "id": req_id, "error": {"code": code, "message": message}}


def _drop_none(data: dict, deep: bool = False) -> dict:
    """A copy without None values (MCP clients choke on null optional fields); ``deep`` for nested dicts."""
    return {k: (_drop_none(v, deep) if deep and isinstance(v, dict) else v)
            for k, v in data.items() if v is not None}


# -- tool argument checking: the subset of JSON Schema our input schemas use ----------------

_JSON_TYPES: Dict[str, Tuple[type, ...]] = {
    "string": (str,), "boolean": (bool,), "integer": (int,), "object": (dict,), "array": (list,)}


def _json_type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return {str: "a string", dict: "an object", list: "an array"}.get(type(value), type(value).__name__)


def mcp_check_arguments(tool: str, schema: dict, arguments: dict) -> dict:
    """Validate tool arguments against the tool's input schema; return them with defaults filled.

    Raises UsageError with one line naming the argument. A null counts as "not given", because
    some clients send every optional argument, unset ones as null.
    """
    props: Dict[str, dict] = schema.get("properties", {})
    unknown = sorted(set(arguments) - set(props))
    if unknown and schema.get("additionalProperties") is False:
        expected = ", ".join(props) or "none"
        raise UsageError(f"Invalid arguments for {tool}: unknown argument {unknown[0]!r} (expected: {expected})")
    values: Dict[str, Any] = {}
    for name, spec in props.items():
        value = arguments.get(name)
        if value is None:
            if name in schema.get("required", ()):
                raise UsageError(f"Invalid arguments for {tool}: {name!r} is required")
            values[name] = spec.get("default")
        else:
            values[name] = _check_value(f"Invalid arguments for {tool}: {name!r}", spec, value)
    return values


def _check_value(what: str, spec: dict, value: Any) -> Any:
    kind = spec["type"]
    if kind == "integer" and isinstance(value, float) and value.is_integer():
        value = int(value)  # 5.0 from a JSON encoder that writes every number as a float
    if not isinstance(value, _JSON_TYPES[kind]) or (kind == "integer" and isinstance(value, bool)):
        article = "an" if kind[0] in "aeiou" else "a"
        raise UsageError(f"{what} must be {article} {kind}, got {_json_type_name(value)}")
    if "enum" in spec and value not in spec["enum"]:
        raise UsageError(f"{what} must be one of {', '.join(map(str, spec['enum']))}, not {value!r}")
    if kind == "integer" and not spec.get("minimum", value) <= value <= spec.get("maximum", value):
        raise UsageError(f"{what} must be between {spec['minimum']} and {spec['maximum']}, not {value}")
    if kind == "string" and spec.get("minLength") and not value.strip():
        raise UsageError(f"{what} must not be empty")
    if kind == "array" and "items" in spec:
        for item in value:
            _check_value(f"{what} items", spec["items"], item)
    return value


# -- the tools -----------------------------------------------------------------------------

_NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}
_COUNTS_SCHEMA = {"type": "object", "additionalProperties": {"type": "integer"}}
_STRINGS_SCHEMA = {"type": "array", "items": {"type": "string"}}
_MEMORY_SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "string"}, "content": {"type": "string"}, "type": {"type": "string"},
        "summary": {"type": "string"}, "tags": _STRINGS_SCHEMA, "metadata": {"type": "object"},
        "created_at": {"type": "string"}, "updated_at": {"type": "string"},
        "deleted_at": {"type": "string"}, "draft": {"type": "boolean"},
        "expires_at": {"type": "string"}, "conflict_of": {"type": "string"},
    },
    "required": ["id", "content", "type", "tags"],
}
_SEARCH_HIT_SCHEMA = {
    "type": "object",
    "properties": dict(_MEMORY_SCHEMA["properties"], score={"type": "number"}, snippet={"type": "string"}),
    "required": ["id", "content", "type", "score"],
}

_SYNC_INPUT = {
    "type": "object",
    "properties": {
        "direction": {"type": "string", "enum": ["both", "push", "pull"], "default": "both",
                      "description": "both = push local changes, then pull the cloud's; push or pull = one way"},
        "push_all": {"type": "boolean", "default": False,
                     "description": "push every memory, not only changed ones (repairs a server that lost data)"},
        "force": {"type": "boolean", "default": False, "description": "overwrite the server's versions"},
        "dry_run": {"type": "boolean", "default": False, "description": "only report what would be done"},
    },
    "additionalProperties": False,
}
_SYNC_OUTPUT = {
    "type": "object",
    "properties": {
        "direction": {"type": "string"}, "dry_run": {"type": "boolean"},
        "pushed": _COUNTS_SCHEMA, "pulled": _COUNTS_SCHEMA, "rejected": {"type": "integer"},
        "conflicts": {"type": "array", "items": {"type": "object", "properties": {
            "id": {"type": "string"}, "local_copy": {"type": "string"}}}},
        "warnings": _STRINGS_SCHEMA, "summary": {"type": "string"},
    },
    "required": ["direction", "pushed", "pulled", "conflicts", "summary"],
}
_STATUS_OUTPUT = {
    "type": "object",
    "properties": {
        "enabled": {"type": "boolean"}, "server_url": {"type": "string"}, "api_key": {"type": "string"},
        "device_id": {"type": "string"}, "last_push_at": {"type": "string"},
        "last_pull_at": {"type": "string"}, "pending_push": {"type": "integer"},
        "conflicts": {"type": "integer"},
    },
    "required": ["enabled", "server_url"],
}
_SAVE_INPUT = {
    "type": "object",
    "properties": {
        "content": {"type": "string", "minLength": 1, "description": "the memory text"},
        "type": {"type": "string", "default": "fact",
                 "description": f"memory type: {', '.join(MEMORY_TYPES)} (or your own)"},
        "tags": dict(_STRINGS_SCHEMA, description="tags, e.g. [\"auth\", \"backend\"]"),
        "summary": {"type": "string", "description": "one-line summary"},
        "metadata": {"type": "object", "description": "extra JSON metadata"},
        "draft": {"type": "boolean", "default": False, "description": "keep it local until published"},
        "temporary": {"type": "boolean", "default": False,
                      "description": "local-only memory that expires (never synced)"},
        "ttl": {"type": "string", "description": "lifetime of a temporary memory: 30m, 1h, 7d (default 24h)"},
    },
    "required": ["content"],
    "additionalProperties": False,
}
_SEARCH_INPUT = {
    "type": "object",
    "properties": {
        "query": {"type": "string", "minLength": 1, "description": "words to look for"},
        "limit": {"type": "integer", "minimum": 1, "maximum": 100, "default": 10},
        "type": {"type": "string", "description": "only memories of this type"},
    },
    "required": ["query"],
    "additionalProperties": False,
}
_SEARCH_OUTPUT = {
    "type": "object",
    "properties": {"query": {"type": "string"}, "count": {"type": "integer"},
                   "results": {"type": "array", "items": _SEARCH_HIT_SCHEMA}},
    "required": ["query", "count", "results"],
}
_LIST_INPUT = {
    "type": "object",
    "properties": {
        "type": {"type": "string", "description": "only memories of this type"},
        "tag": {"type": "string", "description": "only memories with this tag"},
        "limit": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 50},
        "include_deleted": {"type": "boolean", "default": False},
    },
    "additionalProperties": False,
}
_LIST_OUTPUT = {
    "type": "object",
    "properties": {"count": {"type": "integer"}, "memories": {"type": "array", "items": _MEMORY_SCHEMA}},
    "required": ["count", "memories"],
}
_DELETE_INPUT = {
    "type": "object",
    "properties": {"id": {"type": "string", "minLength": 1,
                          "description": "memory id (or a unique prefix of 6+ characters)"}},
    "required": ["id"],
    "additionalProperties": False,
}


def _mcp_memory(memory: Memory) -> dict:
    return _drop_none(memory_view(memory))


def _mcp_sync(args: dict) -> Tuple[str, dict]:
    report = cloud_sync(direction=args["direction"], push_all=args["push_all"], force=args["force"],
                        dry_run=args["dry_run"])
    lines = [f"Sync ({report.direction}): {report.summary()}"]
    if report.rejected:
        lines.append(f"{report.rejected} change(s) rejected by the server")
    if report.conflicts:
        lines.append("Conflicts: the cloud version won; your version is kept as the _local copy "
                     "(see: contextfs cloud conflicts)")
    lines += [f"warning: {w}" for w in report.warnings]
    return "\n".join(lines), report.to_dict()


def _mcp_sync_status(args: dict) -> Tuple[str, dict]:
    status = _drop_none(cloud_status(), deep=True)
    enabled = bool(status.get("enabled"))
    lines = [f"Cloud sync: {'enabled' if enabled else 'disabled (enable: contextfs cloud configure --enabled)'}",
             f"Server: {status.get('server_url')}",
             f"API key: {status.get('api_key', '(none)')}"]
    if status.get("api_key", "(none)") == "(none)":
        lines[-1] += " (log in: contextfs cloud login)"
    lines += [f"Device: {status.get('device_id')}",
              f"Last push: {status.get('last_push_at', 'never')}",
              f"Last pull: {status.get('last_pull_at', 'never')}",
              f"Pending push: {status.get('pending_push', 0)}",
              f"Auto-sync: {auto_sync_line(status['auto_sync'])}",
              f"Conflicts: {status.get('conflicts', 0)}"]
    remote = status.get("server")
    if isinstance(remote, dict) and remote.get("error"):
        lines.append(f"Server check: {remote['error']}")
    elif isinstance(remote, dict):
        lines.append("Server has: " + ", ".join(f"{v} {k.replace('_count', '').replace('_', ' ')}"
                                                for k, v in remote.items() if k.endswith("_count")))
    return "\n".join(lines), status


def _mcp_save(args: dict) -> Tuple[str, dict]:
    if args["ttl"] is not None and not args["temporary"]:
        raise UsageError("Invalid arguments for contextfs_save: 'ttl' only applies with temporary=true")
    ttl = parse_ttl(args["ttl"]) if args["ttl"] else (DEFAULT_TTL_SECONDS if args["temporary"] else None)
    with open_indexed_store() as store:
        memory = store.save(args["content"], type=args["type"], tags=args["tags"], summary=args["summary"],
                            draft=args["draft"], ttl=ttl, metadata=args["metadata"])
    note = " as a draft (not synced until published)" if memory.draft else (
        f" as temporary until {memory.expires_at} (never synced)" if memory.expires_at else "")
    return f"Saved {memory.id} [{memory.type}]{note}", _mcp_memory(memory)


def _mcp_search(args: dict) -> Tuple[str, dict]:
    with open_indexed_store() as store:
        hits = search_memories(store, args["query"], limit=args["limit"], type=args["type"])
    results = [dict(_mcp_memory(h.memory), score=round(h.score, 6), snippet=h.snippet) for h in hits]
    text = "\n".join(f"{h.memory.id}  [{h.memory.type}] {_one_line(h.snippet, 200)}" for h in hits)
    return text or f"No memories match {args['query']!r}", {
        "query": args["query"], "count": len(results), "results": results}


def _mcp_list(args: dict) -> Tuple[str, dict]:
    with open_indexed_store() as store:
        memories = store.list(type=args["type"], tag=args["tag"], limit=args["limit"],
                              include_deleted=args["include_deleted"])
    text = "\n".join(_memory_line(m) for m in memories) or "No memories yet"
    return text, {"count": len(memories), "memories": [_mcp_memory(m) for m in memories]}


def _mcp_delete(args: dict) -> Tuple[str, dict]:
    with open_indexed_store() as store:
        memory = store.delete(args["id"])
    return f"Deleted {memory.id} (the delete syncs to your other devices)", _mcp_memory(memory)


@dataclass
class McpTool:
    """One MCP tool: its schemas, hints, and the function that runs it (args -> text, data)."""

    name: str
    title: str
    description: str
    input_schema: dict
    output_schema: dict
    run: Callable[[dict], Tuple[str, dict]]
    read_only: bool = False
    destructive: bool = False
    open_world: bool = False

    def describe(self, version: str) -> dict:
        """The tool as listed by ``tools/list`` for the negotiated protocol version."""
        tool: Dict[str, Any] = {"name": self.name, "description": self.description,
                                "inputSchema": self.input_schema}
        if _mcp_at_least(version, "2025-03-26"):
            tool["annotations"] = {"title": self.title, "readOnlyHint": self.read_only,
                                   "destructiveHint": self.destructive, "idempotentHint": self.read_only,
                                   "openWorldHint": self.open_world}
        if _mcp_at_least(version, "2025-06-18"):  # title, outputSchema, structuredContent
            tool["title"] = self.title
            tool["outputSchema"] = self.output_schema
        return tool


MCP_TOOLS: Tuple[McpTool, ...] = (
    McpTool("contextfs_sync", "Sync memories with the cloud",
            "Sync this device's memories, relationships and session summaries with the ContextFS "
            "server. direction='both' (default) pushes local changes then pulls the cloud's; "
            "'push' or 'pull' go one way. push_all=true pushes every memory, not only changed ones. "
            "On conflict the cloud version wins and the local one is kept with a _local suffix; "
            "that copy is synced too (a backup every device lists until one resolves it). A delete "
            "that loses to a newer edit elsewhere is reported, and the edit kept. "
            "Drafts and temporary memories are never synced, nor links to them.",
            _SYNC_INPUT, _SYNC_OUTPUT, _mcp_sync, open_world=True),
    McpTool("contextfs_sync_status", "Cloud sync status",
            "Show whether cloud sync is enabled and logged in, the server, this device, the last "
            "push/pull and how many changes wait to be pushed.",
            _NO_ARGUMENTS, _STATUS_OUTPUT, _mcp_sync_status, read_only=True, open_world=True),
    McpTool("contextfs_save", "Save a memory",
            "Save a memory (a fact, decision, procedure, error, ...) on this device; it syncs on the "
            "next contextfs_sync unless it is a draft or temporary.",
            _SAVE_INPUT, _MEMORY_SCHEMA, _mcp_save),
    McpTool("contextfs_search", "Search memories",
            "Search this device's memories by keywords (and meaning, when the semantic index is on).",
            _SEARCH_INPUT, _SEARCH_OUTPUT, _mcp_search, read_only=True),
    McpTool("contextfs_list", "List memories",
            "List this device's memories, newest first, optionally by type or tag.",
            _LIST_INPUT, _LIST_OUTPUT, _mcp_list, read_only=True),
    McpTool("contextfs_delete", "Delete a memory",
            "Delete a memory by id; the delete syncs to the other devices.",
            _DELETE_INPUT, _MEMORY_SCHEMA, _mcp_delete, destructive=True),
)


def _mcp_log(message: str) -> None:
    try:
        sys.stderr.write(f"contextfs mcp: {message}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass  # no stderr to log to: nothing else we can do


class McpServer:
    """One MCP session: turns JSON-RPC lines into answers written to ``out`` (a binary stream)."""

    def __init__(self, out: Any, tools: Iterable[McpTool] = MCP_TOOLS,
                 max_concurrent_calls: int = MCP_MAX_CONCURRENT_CALLS):
        self.out = out
        self.tools = {tool.name: tool for tool in tools}
        self.protocol_version: Optional[str] = None
        self.initialized = False
        self.closed = False
        self._write_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._call_slots = threading.BoundedSemaphore(max_concurrent_calls)
        self._running: Dict[Any, bool] = {}  # id of a running tools/call -> cancelled?
        self._workers: List[threading.Thread] = []
        self._methods: Dict[str, Callable[[dict], dict]] = {
            "initialize": self._initialize, "ping": lambda params: {},
            "tools/list": self._tools_list, "tools/call": self._tools_call}

    @property
    def version(self) -> str:
        """The negotiated protocol version (our newest until ``initialize``)."""
        return self.protocol_version or MCP_PROTOCOL_VERSIONS[-1]

    # -- transport -------------------------------------------------------------------------

    def send(self, message: Any) -> None:
        """Write one message as one line; ASCII-only JSON, so no byte can look like a line break."""
        data = json.dumps(message, separators=(",", ":")).encode("ascii") + b"\n"
        with self._write_lock:
            if self.closed:
                return
            try:
                self.out.write(data)
                self.out.flush()
            except (OSError, ValueError):  # the client closed our stdout: nobody is listening
                self.closed = True

    def feed(self, line: bytes) -> None:
        """Handle one line from the client. Tool calls and batches run on worker threads."""
        line = line.strip()
        if not line:
            return
        try:
            message = json.loads(line.decode("utf-8"), parse_constant=_reject_json_constant)
        except ValueError as exc:  # also UnicodeDecodeError
            self.send(_rpc_error(None, RPC_PARSE_ERROR, f"Parse error: {exc}"))
            return
        if isinstance(message, list):  # a JSON-RPC batch (2025-03-26 allows them)
            if not message:
                self.send(_rpc_error(None, RPC_INVALID_REQUEST, "Invalid Request: empty batch"))
            else:
                self._start_worker(self._run_batch, message)
            return
        req_id = message.get("id") if isinstance(message, dict) else None
        if (isinstance(message, dict) and message.get("method") == "tools/call"
                and isinstance(req_id, (str, int)) and not isinstance(req_id, bool)):
            with self._state_lock:
                self._running[req_id] = False
            self._start_worker(self._run_call, message)
            return
        answer = self.handle(message)
        if answer is not None:
            self.send(answer)

    def _start_worker(self, target: Callable[[Any], None], message: Any) -> None:
        worker = threading.Thread(target=target, args=(message,), name="contextfs-mcp-call", daemon=True)
        with self._state_lock:
            self._workers = [w for w in self._workers if w.is_alive()]
            self._workers.append(worker)
        worker.start()

    def _run_call(self, message: dict) -> None:
        with self._call_slots:
            answer = self.handle(message)
        with self._state_lock:
            cancelled = self._running.pop(message["id"], False)
        if answer is not None and not cancelled:  # a cancelled request gets no answer (spec)
            self.send(answer)

    def _run_batch(self, messages: list) -> None:
        with self._call_slots:
            answers = [a for a in (self.handle(m) for m in messages) if a is not None]
        if answers:
            self.send(answers)

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for running tool calls; True if none is left."""
        deadline = time.monotonic() + timeout
        with self._state_lock:
            workers = list(self._workers)
        for worker in workers:
            worker.join(max(0.0, deadline - time.monotonic()))
        return not any(w.is_alive() for w in workers)

    # -- JSON-RPC --------------------------------------------------------------------------

    def handle(self, message: Any) -> Optional[dict]:
        """Answer one decoded message: a response dict, or None (notifications, responses)."""
        if not isinstance(message, dict):
            return _rpc_error(None, RPC_INVALID_REQUEST, "Invalid Request: a message must be a JSON object")
        req_id = message.get("id")
        id_ok = isinstance(req_id, (str, int)) and not isinstance(req_id, bool)
        if "method" not in message and ("result" in message or "error" in message):
            return None  # a response; we never send requests, so there is nothing to match it to
        method = message.get("method")
        problem = ("'jsonrpc' must be \"2.0\"" if message.get("jsonrpc") != "2.0" else
                   "'method' must be a string" if not isinstance(method, str) else
                   "'id' must be a string or an integer" if "id" in message and not id_ok else None)
        if problem:
            return _rpc_error(req_id if id_ok else None, RPC_INVALID_REQUEST, f"Invalid Request: {problem}")
        params = message.get("params")
        if "id" not in message:
            self._notification(method, params)
            return None
        if params is not None and not isinstance(params, dict):
            return _rpc_error(req_id, RPC_INVALID_PARAMS, "Invalid params: 'params' must be an object")
        handler = self._methods.get(method)
        if handler is None:
            return _rpc_error(req_id, RPC_METHOD_NOT_FOUND, f"Method not found: {method}")
        try:
            result = handler(params or {})
        except McpError as exc:
            return _rpc_error(req_id, exc.code, exc.message)
        except Exception as exc:  # a bug must cost one answer, never the session
            import traceback

            _mcp_log(f"internal error in {method}:\n{traceback.format_exc()}")
            return _rpc_error(req_id, RPC_INTERNAL_ERROR, f"Internal error: {type(exc).__name__}: {exc}")
        return {"jsonrpc": "2.0", "id": req_id, "result": result}

    def _notification(self, method: str, params: Any) -> None:
        if method == "notifications/initialized":
            self.initialized = True
        elif method == "notifications/cancelled" and isinstance(params, dict):
            with self._state_lock:
                if params.get("requestId") in self._running:
                    self._running[params["requestId"]] = True
        # Other notifications (progress, roots/list_changed, ...) need nothing from us.

    def _initialize(self, params: dict) -> dict:
        requested = params.get("protocolVersion")
        if not isinstance(requested, str):
            raise McpError(RPC_INVALID_PARAMS, "Invalid params: 'protocolVersion' must be a string")
        version = mcp_negotiate_version(requested)
        with self._state_lock:
            self.protocol_version = version
        info = {"name": MCP_SERVER_NAME, "version": __version__}
        if _mcp_at_least(version, "2025-06-18"):
            info["title"] = "contextfs memory sync"
        return {"protocolVersion": version, "capabilities": {"tools": {"listChanged": False}},
                "serverInfo": info, "instructions": MCP_INSTRUCTIONS}

    def _tools_list(self, params: dict) -> dict:
        if params.get("cursor") is not None:  # one page only: we never hand out a cursor
            raise McpError(RPC_INVALID_PARAMS, "Invalid params: unknown cursor")
        return {"tools": [tool.describe(self.version) for tool in self.tools.values()]}

    def _tools_call(self, params: dict) -> dict:
        name, arguments = params.get("name"), params.get("arguments")
        if not isinstance(name, str):
            raise McpError(RPC_INVALID_PARAMS, "Invalid params: 'name' must be a string")
        tool = self.tools.get(name)
        if tool is None:
            raise McpError(RPC_INVALID_PARAMS, f"Unknown tool: {name}")
        if arguments is not None and not isinstance(arguments, dict):
            raise McpError(RPC_INVALID_PARAMS, "Invalid params: 'arguments' must be an object")
        return self.call_tool(tool, arguments or {})

    def call_tool(self, tool: McpTool, arguments: dict) -> dict:
        """Run a tool: a result with text and structured content, or ``isError`` and one line."""
        try:
            text, data = tool.run(mcp_check_arguments(tool.name, tool.input_schema, arguments))
        except ContextFSError as exc:
            return _tool_error(exc.message)
        except sqlite3.Error as exc:
            return _tool_error(_store_error(contextfs_home() / "sync.db", exc).message)
        except OSError as exc:
            return _tool_error(_os_error_line(exc))
        except Exception as exc:  # a bug in a tool is reported to the model, not fatal to the server
            import traceback

            _mcp_log(f"internal error in tool {tool.name}:\n{traceback.format_exc()}")
            return _tool_error(f"{tool.name} failed: {type(exc).__name__}: {exc}")
        content = [{"type": "text", "text": text}]
        if _mcp_at_least(self.version, "2025-06-18"):
            return {"content": content, "structuredContent": data}
        # Older clients have no structuredContent: give them the data as JSON text (spec advice).
        content.append({"type": "text", "text": json.dumps(data, ensure_ascii=False)})
        return {"content": content}


def _tool_error(message: str) -> dict:
    return {"content": [{"type": "text", "text": message}], "isError": True}


def _reject_json_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


class _McpShutdown(Exception):
    """Raised in the main thread by SIGTERM to leave the blocking read."""


def _claim_stdout() -> Any:
    """A private binary handle on stdout for protocol messages; fd 1 and sys.stdout go to stderr."""
    try:
        sys.stdout.flush()
        out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    except (OSError, AttributeError, ValueError):  # no real file descriptors (embedded use)
        out = sys.stdout.buffer
    sys.stdout = sys.stderr
    return out


def _mcp_read_stdin(fd: int, server: "McpServer", lines: "queue.Queue[Optional[bytes]]") -> None:
    """Stdin reader thread: one message per line onto ``lines``, then None at EOF.

    Reads the raw descriptor (no buffered-reader lock a daemon thread could hold at exit)."""
    pending = bytearray()
    skipping = False  # inside a message already refused as oversized
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except InterruptedError:
            continue
        except OSError:
            break  # stdin closed under us: treat as EOF
        if not chunk:
            break
        pending += chunk
        while True:
            end = pending.find(b"\n")
            if end < 0:
                if len(pending) > MCP_MAX_MESSAGE_BYTES and not skipping:
                    skipping = True
                    server.send(_mcp_oversized_error())
                if skipping:
                    pending.clear()
                break
            line = bytes(pending[:end + 1])
            del pending[:end + 1]
            if skipping:
                skipping = False  # that newline ended the refused message
            elif end > MCP_MAX_MESSAGE_BYTES:
                server.send(_mcp_oversized_error())
            else:
                lines.put(line)
    if pending and not skipping:
        lines.put(bytes(pending))  # a last message without its newline
    lines.put(None)


def _mcp_oversized_error() -> dict:
    return _rpc_error(None, RPC_INVALID_REQUEST, f"Invalid Request: message larger than {MCP_MAX_MESSAGE_BYTES} bytes")


def _mcp_log_round(result: dict) -> None:
    """A failed auto-sync round, on stderr (the MCP client's log); good rounds say nothing."""
    if not result["ok"]:
        _mcp_log(f"auto-sync: {result['error']}")


def serve_mcp() -> int:
    """Run the MCP server on stdin/stdout until stdin ends or SIGTERM; returns the exit code."""
    import queue
    import signal

    server = McpServer(_claim_stdout())
    auto = AutoSync(on_round=_mcp_log_round).start()
    stdin = getattr(sys.stdin, "buffer", None)
    if stdin is not None and stdin.isatty():
        _mcp_log("waiting for an MCP client on stdin; your MCP client starts this command "
                 "(see the README). Ctrl-D ends it.")
    terminating = []

    def on_sigterm(signum: int, frame: Any) -> None:
        if not terminating:  # raise once: a second signal during shutdown must not interrupt it
            terminating.append(signum)
            raise _McpShutdown()

    try:
        signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:  # not the main thread: the host process owns signal handling
        pass
    # The main thread waits on a queue with a timeout, never in read(): a SIGTERM that lands
    # just before a blocking read() would otherwise wait for the client's next message.
    lines: "queue.Queue[Optional[bytes]]" = queue.Queue()
    if stdin is not None:
        threading.Thread(target=_mcp_read_stdin, args=(stdin.fileno(), server, lines),
                         name="contextfs-mcp-stdin", daemon=True).start()
    try:
        while stdin is not None and not server.closed:
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                continue
            if line is None:
                break  # EOF: the client is done with us
            server.feed(line)
        server.wait(MCP_EXIT_GRACE_SECONDS)
    except _McpShutdown:
        server.wait(MCP_EXIT_GRACE_SECONDS)
    auto.stop(MCP_EXIT_GRACE_SECONDS)
    # Running calls that did not finish in the grace time are daemon threads: they stop with the
    # process. That is safe: the store commits in transactions and a sync resumes where it stopped.
    return EXIT_OK


# ---- 12. CLI -----------------------------------------------------------------------------
# argparse, one small function per command; all output formatting lives here.

def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=False))


def _read_text_arg(text: Optional[str]) -> Optional[str]:
    """TEXT, or ``-`` for standard input."""
    if text == "-":
        return sys.stdin.read()
    return text


def _split_tags(text: Optional[str]) -> Optional[List[str]]:
    if text is None:
        return None
    return [t for t in (p.strip() for p in text.split(",")) if t]


def _open(args: argparse.Namespace) -> Store:
    return open_indexed_store()  # local writes keep the semantic index in step


def cmd_save(args: argparse.Namespace) -> int:
    """contextfs save TEXT|- …"""
    content = _read_text_arg(args.text)
    if args.ttl and not args.temporary:
        raise UsageError("--ttl only applies to --temporary memories")
    ttl = parse_ttl(args.ttl) if args.ttl else (DEFAULT_TTL_SECONDS if args.temporary else None)
    metadata = _parse_metadata(args.metadata)
    with _open(args) as store:
        memory = store.save(content or "", type=args.type, tags=_split_tags(args.tags),
                            summary=args.summary, draft=args.draft, ttl=ttl, metadata=metadata,
                            source_repo=args.source_repo, source_file=args.source_file)
    if args.json:
        _print_json(memory_view(memory))
    else:
        note = " as a draft (not synced until: contextfs edit ID --publish)" if memory.draft else (
            f" as temporary until {memory.expires_at} (never synced)" if memory.expires_at else "")
        print(f"Saved {memory.id} [{memory.type}]{note}")
    return EXIT_OK


def _parse_metadata(text: Optional[str]) -> Optional[dict]:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--metadata must be a JSON object: {exc.msg} at column {exc.colno}") from None
    if not isinstance(value, dict):
        raise UsageError("--metadata must be a JSON object, e.g. '{\"ticket\": \"ABC-1\"}'")
    return value


def cmd_search(args: argparse.Namespace) -> int:
    """contextfs search QUERY"""
    notes: List[str] = []
    with _open(args) as store:
        hits = search_memories(store, args.query, limit=args.limit, type=args.type, notes=notes)
    for note in notes:
        print(note, file=sys.stderr)
    if args.json:
        _print_json([dict(memory_view(h.memory), score=round(h.score, 6), snippet=h.snippet,
                          scores={k: round(v, 6) for k, v in h.sources.items()}) for h in hits])
    elif not hits:
        print(f"No memories match {args.query!r}")
    else:
        for hit in hits:
            print(f"{hit.memory.id}  [{hit.memory.type}] {_one_line(hit.snippet, 90)}")
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    """contextfs list"""
    with _open(args) as store:
        memories = store.list(type=args.type, tag=args.tag, limit=args.limit,
                              include_deleted=args.deleted)
    if args.json:
        _print_json([memory_view(m) for m in memories])
    elif not memories:
        print("No memories yet. Save one: contextfs save \"what you learned\"")
    else:
        for memory in memories:
            print(_memory_line(memory))
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    """contextfs show ID"""
    with _open(args) as store:
        memory = store.get(args.id)
        edges = store.edges(memory.id)
    if args.json:
        _print_json(dict(memory_view(memory), edges=[e.to_wire() for e in edges]))
        return EXIT_OK
    print(f"id:         {memory.id}")
    print(f"type:       {memory.type}")
    for label, value in (("summary", memory.summary), ("tags", ", ".join(memory.tags) or None),
                         ("session", memory.session_id), ("source", memory.source_repo),
                         ("file", memory.source_file), ("draft", "yes" if memory.draft else None),
                         ("expires", memory.expires_at), ("conflict", memory.conflict_of and
                                                          f"local copy of {memory.conflict_of}"),
                         ("deleted", memory.deleted_at),
                         ("metadata", _dumps(memory.metadata) if memory.metadata else None)):
        if value:
            print(f"{label + ':':<11} {value}")
    print(f"created:    {memory.created_at}")
    print(f"updated:    {memory.updated_at}{'  (not yet synced)' if memory.dirty and not memory.local_only else ''}")
    for edge in edges:
        other = edge.to_id if edge.from_id == memory.id else edge.from_id
        arrow = "->" if edge.from_id == memory.id else "<-"
        print(f"link:       {arrow} {other} ({edge.relation})")
    print()
    print(memory.content)
    return EXIT_OK


def cmd_edit(args: argparse.Namespace) -> int:
    """contextfs edit ID [TEXT|-] …"""
    content = _read_text_arg(args.text)
    if all(v is None for v in (content, args.type, args.tags, args.summary, args.metadata)) and not args.publish:
        raise UsageError("Nothing to change: give new TEXT, --type, --tags, --summary, --metadata or --publish")
    with _open(args) as store:
        memory = store.edit(args.id, content=content, type=args.type, tags=_split_tags(args.tags),
                            summary=args.summary, metadata=_parse_metadata(args.metadata),
                            publish=args.publish)
    if args.json:
        _print_json(memory_view(memory))
    else:
        print(f"Updated {memory.id}" + (" (published)" if args.publish else ""))
    return EXIT_OK


def cmd_delete(args: argparse.Namespace) -> int:
    """contextfs delete ID"""
    with _open(args) as store:
        memory = store.delete(args.id)
    if args.json:
        _print_json(memory_view(memory))
    else:
        print(f"Deleted {memory.id}")
    return EXIT_OK


def cmd_link(args: argparse.Namespace) -> int:
    """contextfs link FROM TO [--relation R]"""
    with _open(args) as store:
        if args.delete:
            edge = store.unlink(store.resolve_id(args.from_id), store.resolve_id(args.to_id), args.relation)
        else:
            edge = store.link(args.from_id, args.to_id, args.relation, weight=args.weight)
    if args.json:
        _print_json(edge.to_wire())
    else:
        verb = "Unlinked" if args.delete else "Linked"
        print(f"{verb} {edge.from_id} -[{edge.relation}]-> {edge.to_id}")
    return EXIT_OK


def cmd_session(args: argparse.Namespace) -> int:
    """contextfs session start|end|list"""
    with _open(args) as store:
        if args.session_command == "start":
            sessions = [store.session_start(label=args.label, tool=args.tool, repo=args.repo)]
        elif args.session_command == "end":
            sessions = [store.session_end(session_id=args.id, summary=args.summary)]
        else:
            sessions = store.sessions(limit=args.limit)
    if args.json:
        _print_json([s.to_wire() for s in sessions] if args.session_command == "list" else sessions[0].to_wire())
    elif args.session_command == "start":
        print(f"Started session {sessions[0].id}" + (f" ({sessions[0].label})" if sessions[0].label else ""))
    elif args.session_command == "end":
        print(f"Ended session {sessions[0].id}")
    elif not sessions:
        print("No sessions yet. Start one: contextfs session start --label \"what you work on\"")
    else:
        for s in sessions:
            state = f"ended {s.ended_at}" if s.ended_at else "running"
            print(f"{s.id}  {s.label or '-'}  started {s.started_at}  {state}"
                  + (f"\n    {_one_line(s.summary, 100)}" if s.summary else ""))
    return EXIT_OK


def _add_memory_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("save", parents=[common], help="save a memory")
    p.add_argument("text", metavar="TEXT", help="the memory text, or - to read standard input")
    p.add_argument("--type", default="fact", help=f"memory type ({', '.join(MEMORY_TYPES)}, or your own)")
    p.add_argument("--tags", help="comma-separated tags")
    p.add_argument("--summary", help="one-line summary")
    p.add_argument("--metadata", help="JSON object of extra metadata")
    p.add_argument("--source-repo", help="repository the memory is about")
    p.add_argument("--source-file", help="file the memory is about")
    p.add_argument("--draft", action="store_true", help="keep it local until published")
    p.add_argument("--temporary", action="store_true", help="local-only memory that expires (default 24h)")
    p.add_argument("--ttl", help="lifetime of a --temporary memory: 30m, 1h, 7d, …")
    p.set_defaults(func=cmd_save)

    p = sub.add_parser("search", parents=[common], help="search memories")
    p.add_argument("query", metavar="QUERY")
    p.add_argument("--limit", type=int, default=10)
    p.add_argument("--type")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("list", parents=[common], help="list memories, newest first")
    p.add_argument("--type")
    p.add_argument("--tag")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--deleted", action="store_true", help="include deleted memories")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("show", parents=[common], help="show one memory")
    p.add_argument("id", metavar="ID")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("edit", parents=[common], help="change a memory (or publish a draft)")
    p.add_argument("id", metavar="ID")
    p.add_argument("text", metavar="TEXT", nargs="?", help="new text, or - to read standard input")
    p.add_argument("--type")
    p.add_argument("--tags", help="comma-separated tags (replaces the old ones)")
    p.add_argument("--summary")
    p.add_argument("--metadata", help="JSON object (replaces the old metadata)")
    p.add_argument("--publish", action="store_true", help="publish a draft or temporary memory so it syncs")
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser("delete", parents=[common], help="delete a memory (the delete syncs)")
    p.add_argument("id", metavar="ID")
    p.set_defaults(func=cmd_delete)

    p = sub.add_parser("link", parents=[common], help="relate two memories")
    p.add_argument("from_id", metavar="FROM_ID")
    p.add_argument("to_id", metavar="TO_ID")
    p.add_argument("--relation", default="related_to", help="e.g. related_to, supersedes, caused_by, resolves")
    p.add_argument("--weight", type=float, default=1.0)
    p.add_argument("--delete", action="store_true", help="remove the relationship")
    p.set_defaults(func=cmd_link)

    p = sub.add_parser("session", help="agent sessions and their summaries")
    ssub = p.add_subparsers(dest="session_command", metavar="start|end|list", required=True)
    sp = ssub.add_parser("start", parents=[common], help="start a session")
    sp.add_argument("--label")
    sp.add_argument("--tool", default="contextfs")
    sp.add_argument("--repo")
    sp = ssub.add_parser("end", parents=[common], help="end the current session")
    sp.add_argument("--summary")
    sp.add_argument("--id", help="session id (default: the current one)")
    sp = ssub.add_parser("list", parents=[common], help="list sessions")
    sp.add_argument("--limit", type=int, default=50)
    p.set_defaults(func=cmd_session)


def _progress_printer() -> Optional[Callable[[str], None]]:
    """Progress on stderr when it is a terminal; nothing when piped."""
    if not sys.stderr.isatty():
        return None

    def show(message: str) -> None:
        sys.stderr.write(f"\r{message}   ")
        sys.stderr.flush()
    return show


def _read_secret(prompt: str, from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    import getpass

    return getpass.getpass(prompt)


def cmd_cloud_login(args: argparse.Namespace) -> int:
    """contextfs cloud login [--email E] [--api-key KEY] [--server URL]"""
    cfg = load_config()
    server = check_server_url(args.server or cfg.server_url, args.insecure or bool(cfg.get("cloud", "insecure")))
    who = ""
    if args.api_key:
        key = sys.stdin.readline().strip() if args.api_key == "-" else args.api_key.strip()
    elif args.email or args.password_stdin or sys.stdin.isatty():
        email = args.email or input("Email: ").strip()
        password = _read_secret("Password: ", args.password_stdin)
        with CloudClient(server, insecure=True) as client:
            key = str(client.login(email, password).get("apiKey") or "")
        who = email
    else:  # a key piped on standard input
        key = sys.stdin.readline().strip()
    if not key:
        raise UsageError("No API key given (use --api-key KEY, pipe the key on stdin, or --email)")
    with CloudClient(server, key, insecure=True) as client:  # URL already checked above
        client.retries = 1
        try:
            me = client.me()
            who = who or str(me.get("email") or me.get("name") or "")
        except AuthError:
            raise AuthError("The server rejected that API key (nothing was saved). "
                            "Check the key, or run: contextfs cloud login --email YOU@EXAMPLE.COM") from None
        # Register now, as the public client does: ContextFS Cloud answers status only for
        # registered devices. A refusal (say, its device limit) is said, not fatal: syncs retry.
        try:
            with open_store(cfg.home) as store:
                register_device(client, store.device_id)
        except ServerError as exc:
            print(f"Note: this device is not registered yet ({exc.detail or exc.message}); "
                  "the next sync tries again", file=sys.stderr)
    cfg.set("cloud", "api_key", key)
    if args.server:
        cfg.set("cloud", "server_url", server)
    if args.insecure:
        cfg.set("cloud", "insecure", True)
    save_config(cfg)
    print(f"Logged in to {server}" + (f" as {who}" if who else "") + f". API key {mask_key(key)} saved to {cfg.path}")
    if not cfg.enabled:
        print("Next: contextfs cloud configure --enabled")
    return EXIT_OK


def cmd_cloud_logout(args: argparse.Namespace) -> int:
    """contextfs cloud logout"""
    cfg = load_config()
    had_key = bool(cfg.get("cloud", "api_key"))
    cfg.set("cloud", "api_key", None)
    set_e2ee_key(cfg, None)
    cfg.set("cloud", "e2ee_old_key", None)
    cfg.set("cloud", "e2ee_previous_key", None)
    save_config(cfg)
    print(f"Logged out: API key removed from {cfg.path}" if had_key else "Not logged in")
    if os.environ.get(ENV_API_KEY):
        print(f"Note: {ENV_API_KEY} is still set in your environment")
    return EXIT_OK


def cmd_cloud_configure(args: argparse.Namespace) -> int:
    """contextfs cloud configure [--enabled|--disabled] [--server-url URL] [--e2ee|--no-e2ee]"""
    cfg = load_config()
    if args.insecure:
        cfg.set("cloud", "insecure", True)
    if args.server_url:
        cfg.set("cloud", "server_url", check_server_url(args.server_url, bool(cfg.get("cloud", "insecure"))))
    if args.enabled is not None:
        cfg.set("cloud", "enabled", args.enabled)
    if args.auto_sync is not None:
        cfg.set("cloud", "auto_sync", args.auto_sync)
    for name in _DURATION_LEAST:
        value = getattr(args, name)
        if value is not None:
            problem = duration_problem(name, value)
            if problem:
                raise UsageError(f"--{name.replace('_', '-')} {problem}; nothing was changed")
            cfg.set("cloud", name, value.strip())
    if args.e2ee is True:
        _aesgcm()  # fail early, naming the extra, when cryptography is missing
        if not cfg.api_key:
            raise NotConfigured(MSG_NO_KEY)
        with _client_for(cfg) as client:
            user_id = account_id(client)
            passphrase = _ask_passphrase("E2EE passphrase (the same on every device): ", args.passphrase_stdin,
                                         args.weak)
            key = derive_passphrase_key(passphrase, account_salt(user_id))
            try:
                before = e2ee_key(cfg)
            except ContextFSError:
                before = None
            with open_store(cfg.home) as store:
                _verify_or_write_key_check(client, store.device_id, user_id, key)
                if before is not None and before != key:
                    # The passphrase changed (cloud rekey on another device): what this device
                    # pushed under the old key in the meantime goes up again under the new one,
                    # and the old key stays, for reading only, until a sync finds nothing under it.
                    store.mark_dirty("memory", synced_live_memory_ids(store))
                    cfg.set("cloud", "e2ee_previous_key", b64url_encode(before))
        cfg.set("cloud", "e2ee", True)
        set_e2ee_key(cfg, key)
    elif args.e2ee is False:
        if cfg.e2ee and cfg.enabled and cfg.api_key and not args.yes:
            _confirm_plaintext(cfg)
        cfg.set("cloud", "e2ee", False)
        set_e2ee_key(cfg, None)
        for name in ("e2ee_old_key", "e2ee_previous_key"):
            cfg.set("cloud", name, None)
    save_config(cfg)
    view = {"enabled": cfg.enabled, "server_url": cfg.server_url, "api_key": mask_key(cfg.api_key),
            "e2ee": cfg.e2ee, "auto_sync": bool(cfg.get("cloud", "auto_sync", True)),
            "sync_interval": _duration_text(cfg.sync_interval), "push_delay": _duration_text(cfg.push_delay)}
    if cfg.e2ee:
        view["e2ee_key_kept_in"] = "OS keyring" if cfg.get("cloud", "e2ee_key") == _IN_KEYRING else str(cfg.path)
    if args.json:
        _print_json(view)
    else:
        print(f"Cloud configuration saved to {cfg.path}")
        for key, value in view.items():
            print(f"  {key}: {value}")
    return EXIT_OK


E2EE_MIN_PASSPHRASE = 12  # characters, unless --weak


def _ask_passphrase(prompt: str, from_stdin: bool, weak: bool = False) -> str:
    """Read a passphrase (twice at a terminal); refuse a short one unless ``weak``."""
    passphrase = _read_secret(prompt, from_stdin)
    if len(passphrase) < E2EE_MIN_PASSPHRASE and not weak:
        raise UsageError(f"The passphrase is shorter than {E2EE_MIN_PASSPHRASE} characters: anyone who gets the "
                         f"server's data could guess it. Choose a longer one (or pass --weak); nothing was changed")
    if not from_stdin and sys.stdin.isatty():
        if _read_secret("Repeat the passphrase: ", False) != passphrase:
            raise UsageError("The passphrases do not match; nothing was changed")
    return passphrase


def _verify_or_write_key_check(client: CloudClient, device: str, user_id: str, key: bytes) -> None:
    """A new passphrase must open the account's key check; an account without one gets one
    (unless it holds encrypted memories this key cannot open: then it is refused too)."""
    check_id = e2ee_check_id(user_id)
    check, others = lookup_key_check(client, device, check_id)
    if check is not None:
        if not key_opens_check(key, check.content):
            raise CryptoError(MSG_E2EE_WRONG_KEY.format("; nothing was changed"))
        return
    # No check yet (the first device, or content encrypted before checks existed): the key must
    # open what the account already holds sealed, if anything.
    sealed_rows = [m for m in others if m.deleted_at is None and not _hash_matches(m)
                   and (m.encrypted or _looks_like_ciphertext(m.content))]
    if sealed_rows and not any(open_memory(key, m) for m in sealed_rows[:20]):
        raise CryptoError(MSG_E2EE_WRONG_KEY.format("; nothing was changed"))
    client.push(device, [key_check_wire(check_id, seal_key_check(key, new_hash_key()), device)], [], [])


def _confirm_plaintext(cfg: Config) -> None:
    """Turning E2EE off on an account whose memories are encrypted: say what follows, and ask."""
    say = ("This account's memories are end-to-end encrypted. Without a passphrase this device can no "
           "longer read them, and its syncs stop before pushing: new memories stay on this device "
           "(nothing goes up unencrypted).")
    if not sys.stdin.isatty():
        raise UsageError(say + " To turn E2EE off here anyway, run again with --yes")
    print(say, file=sys.stderr)
    if input("Turn end-to-end encryption off on this device? [y/N] ").strip().lower() not in ("y", "yes"):
        raise UsageError("Nothing was changed")


def cmd_cloud_rekey(args: argparse.Namespace) -> int:
    """contextfs cloud rekey [--passphrase-stdin] [--weak]"""
    passphrase = _ask_passphrase("New E2EE passphrase: ", args.passphrase_stdin, args.weak)
    progress = None if args.json else _progress_printer()
    result = cloud_rekey(None, passphrase, progress)
    if progress:
        sys.stderr.write("\r")
    if args.json:
        _print_json(result)
        return EXIT_OK
    print(f"Re-encrypted {result['reencrypted']} memories under the new passphrase.")
    print("On each other device run: contextfs cloud configure --e2ee (with the new passphrase); "
          "until then their syncs stop and say why.")
    for warning in result["report"]["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)
    return EXIT_OK


def cmd_cloud_reset_e2ee(args: argparse.Namespace) -> int:
    """contextfs cloud reset-e2ee [--passphrase-stdin] [--weak] [--keep-unreadable] [--yes]"""
    passphrase = _ask_passphrase("New E2EE passphrase: ", args.passphrase_stdin, args.weak)

    def confirm(plan: dict) -> bool:
        lost = len(plan["unreadable"])
        if not lost:
            say = "A lost passphrase cannot be recovered; every memory on the server is also on this device, so none is lost. "
        else:
            fate = ("they stay there, unreadable" if plan["keep_unreadable"]
                    else "they will be deleted from the server (--keep-unreadable leaves them)")
            say = (f"A lost passphrase cannot be recovered, and neither can what it encrypted: the server holds "
                   f"{lost} memor{'y' if lost == 1 else 'ies'} this device does not have, which nobody can read any "
                   f"more; {fate}. ")
        say += (f"This device's {plan['reupload']} memories will be uploaded again under the new passphrase, and "
                f"every other device must then enter it (contextfs cloud configure --e2ee).")
        if args.yes:
            print(say, file=sys.stderr)
            return True
        if not sys.stdin.isatty() or args.passphrase_stdin:
            raise UsageError(say + " To go ahead, run again with --yes; nothing was changed")
        print(say, file=sys.stderr)
        return input("Start this account's end-to-end encryption over? [y/N] ").strip().lower() in ("y", "yes")

    result = cloud_reset_e2ee(None, passphrase, args.keep_unreadable, confirm, None if args.json else _progress_printer())
    if args.json:
        _print_json(result)
        return EXIT_OK
    sys.stderr.write("\r")
    print(f"End-to-end encryption started over: {result['reuploaded']} memories uploaded again under the new "
          f"passphrase, {result['deleted_on_server']} unreadable deleted from the server"
          + (f", {result['kept_unreadable']} unreadable kept" if result["kept_unreadable"] else "") + ".")
    print("On each other device run: contextfs cloud configure --e2ee (with the new passphrase).")
    return EXIT_OK


def cmd_cloud_sync(args: argparse.Namespace) -> int:
    """contextfs cloud sync [--direction push|pull|both] [--all] [--force] [--dry-run] [--watch]"""
    if args.watch:
        return _watch(args)
    progress = None if args.json else _progress_printer()
    report = cloud_sync(direction=args.direction, push_all=args.all, force=args.force,
                        dry_run=args.dry_run, progress=progress)
    if progress:
        sys.stderr.write("\r")
    done = EXIT_PARTIAL if report.refused or report.unreadable else EXIT_OK
    if args.json:
        _print_json(report.to_dict())
        return done
    for step in report.plan:
        print(f"  would {step['op']} {step['kind']} {step['id']}" + (" (delete)" if step.get("deleted") else ""))
    print(report.summary())
    for original, copy in report.conflicts:
        print(f"  conflict: {original} now has the cloud version; your local version is kept as {copy} "
              f"(resolve: contextfs cloud resolve {copy} --keep local|cloud)")
    if report.rejected:
        print(f"  {report.rejected} item(s) not accepted by the server yet; they stay pending and "
              f"settle on the next pull")
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return done


def _watch(args: argparse.Namespace) -> int:
    """`cloud sync --watch`: AutoSync in the foreground, one line per round, until Ctrl-C."""
    if args.dry_run or args.all or args.force or args.direction != "both":
        raise UsageError("--watch syncs both ways with the defaults; leave out --direction, --all, --force and --dry-run")
    cfg = load_config()
    require_cloud(cfg)

    def said(result: dict) -> None:
        if args.json:
            _print_json(result)
        elif result["ok"]:
            print(f"{result['at']}  {result['direction']}: {result['summary']}", flush=True)
        else:
            print(f"{result['at']}  {result['direction']} failed: {result['error']}", file=sys.stderr, flush=True)

    auto = AutoSync(on_round=said, owner="contextfs cloud sync --watch", always=True)
    if not args.json:
        print(f"Watching: a sync now, every {_duration_text(cfg.sync_interval)}, and "
              f"{_duration_text(cfg.push_delay)} after local writes. Ctrl-C ends it.", flush=True)
    import signal

    def on_sigterm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # `kill` ends it as cleanly as Ctrl-C

    with _suppress(ValueError):  # not the main thread: the host process owns signals
        signal.signal(signal.SIGTERM, on_sigterm)
    auto.start()
    try:
        while auto.alive():
            time.sleep(0.2)
    except KeyboardInterrupt:
        if not args.json:
            print("Stopping (a running sync finishes first)…", file=sys.stderr, flush=True)
        auto.stop(LOCK_TIMEOUT_SECONDS)
    return EXIT_OK


def _duration_text(seconds: float) -> str:
    """60 → '1m', 5 → '5s', 90 → '90s'."""
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def cmd_cloud_status(args: argparse.Namespace) -> int:
    """contextfs cloud status"""
    status = cloud_status(remote=True)
    if args.json:
        _print_json(status)
        return EXIT_OK
    local = status["local"]
    print(f"Cloud sync:   {'enabled' if status['enabled'] else 'disabled'}")
    print(f"Server:       {status['server_url']}")
    print(f"API key:      {status['api_key']}")
    print(f"E2EE:         {'on' if status['e2ee'] else 'off'}")
    if status["e2ee"] and status["local"]["synced_unencrypted"]:
        print(f"Unencrypted:  {status['local']['synced_unencrypted']} memories are on the server in plain text "
              f"(synced before E2EE, or written by a client without it); contextfs cloud sync --all "
              f"uploads them encrypted")
    print(f"Device:       {status['device_id']}" + (
        f" (this home is a copy of device {status['previous_device_id']}'s)" if status["previous_device_id"] else ""))
    print(f"Last push:    {status['last_push_at'] or 'never'}")
    print(f"Last pull:    {status['last_pull_at'] or 'never'}")
    print(f"Local:        {local['memories']} memories ({local['drafts']} drafts, {local['temporary']} "
          f"temporary), {local['sessions']} sessions, {local['edges']} relationships")
    print(f"Pending push: {status['pending_push']}")
    print(f"Auto-sync:    {auto_sync_line(status['auto_sync'])}")
    print(f"Conflicts:    {status['conflicts']}" + (" (see: contextfs cloud conflicts)" if status['conflicts'] else ""))
    for row_id, why in status["refused"].items():
        print(f"Refused:      {row_id} (the server said: {why}); left pending")
    for row_id, why in status["unreadable"].items():
        print(f"Unreadable:   {row_id} ({why}); not stored here, tried again at the next sync")
    server = status["server"]
    if server and "error" in server:
        print(f"Server state: unavailable ({server['error']})")
    elif server and server.get("registered") is False:
        print("Server state: reachable; this device is not registered yet (the next sync registers it)")
    elif server:
        names = {"memory_count": "memories", "session_count": "sessions", "edge_count": "edges"}
        counts = ", ".join(f"{server[k]} {name}" for k, name in names.items() if k in server)
        print(f"Server state: {counts or 'reachable'}"
              + (f"; {server['pending_pull_count']} to pull" if server.get("pending_pull_count") is not None else ""))
    if not status["enabled"]:
        print(MSG_DISABLED)
    elif status["api_key"] == "(none)":
        print(MSG_NO_KEY)
    return EXIT_OK


def cmd_cloud_conflicts(args: argparse.Namespace) -> int:
    """contextfs cloud conflicts"""
    with _open(args) as store:
        copies = store.conflicts()
    if args.json:
        _print_json([conflict_view(c) for c in copies])
    elif not copies:
        print("No conflicts")
    else:
        for copy in copies:
            what = (f"session summary: {_one_line(copy.summary, 50)}" if isinstance(copy, Session)
                    else _one_line(copy.content, 60))
            print(f"{copy.id}  local copy of {copy.conflict_of}: {what}")
        print("Resolve: contextfs cloud resolve ID --keep local|cloud")
    return EXIT_OK


def cmd_cloud_resolve(args: argparse.Namespace) -> int:
    """contextfs cloud resolve ID --keep local|cloud"""
    with _open(args) as store:
        memory = store.resolve_conflict(args.id, args.keep)
    if args.json:
        _print_json(conflict_view(memory))
    elif args.keep == "local":
        print(f"Resolved {memory.id}: your local version wins and will be pushed on the next sync")
    else:
        print(f"Resolved {memory.conflict_of or memory.id}: kept the cloud version, dropped the local copy")
    return EXIT_OK


def cmd_cloud_check(args: argparse.Namespace) -> int:
    """contextfs cloud check"""
    result = cloud_check()
    if args.json:
        _print_json(result)
        return EXIT_OK
    if result["in_sync"]:
        print("In sync: every local memory matches the server")
        return EXIT_OK
    labels = {"only_local": "only on this device (push them: contextfs cloud sync)",
              "only_server": "only on the server (pull them: contextfs cloud sync)",
              "different": "different content on the two sides",
              "deleted_on_server_only": "deleted on the server but live here"}
    if result["server_lost"]:
        print(f"The server is missing {len(result['server_lost'])} memories this device had already synced: "
              "it was probably restored from an older copy or reset. contextfs cloud sync uploads them again")
    for key, label in labels.items():
        if result[key]:
            print(f"{len(result[key])} {label}:")
            for row_id in result[key][:20]:
                print(f"  {row_id}")
            if len(result[key]) > 20:
                print(f"  … and {len(result[key]) - 20} more")
    return EXIT_OK


def _add_cloud_parsers(sub: Any, common: Any) -> None:
    """contextfs cloud login|logout|configure|sync|status|conflicts|resolve|check."""
    p = sub.add_parser("cloud", help="sync with a ContextFS Cloud compatible server")
    csub = p.add_subparsers(dest="cloud_command", metavar="COMMAND", required=True)
    sp = csub.add_parser("login", help="authenticate and save an API key")
    sp.add_argument("--email")
    sp.add_argument("--api-key", help="an existing API key (or - to read it from stdin)")
    sp.add_argument("--server", help="server URL (saved)")
    sp.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    sp.add_argument("--insecure", action="store_true", help="allow plain http:// to a non-loopback host")
    sp.set_defaults(func=cmd_cloud_login)
    sp = csub.add_parser("logout", help="forget the API key")
    sp.set_defaults(func=cmd_cloud_logout)
    sp = csub.add_parser("configure", parents=[common], help="enable/disable sync, server URL, E2EE")
    group = sp.add_mutually_exclusive_group()
    group.add_argument("--enabled", dest="enabled", action="store_true", default=None)
    group.add_argument("--disabled", dest="enabled", action="store_false")
    sp.add_argument("--server-url")
    group = sp.add_mutually_exclusive_group()
    group.add_argument("--e2ee", dest="e2ee", action="store_true", default=None,
                       help="end-to-end encrypt memory content (asks for a passphrase)")
    group.add_argument("--no-e2ee", dest="e2ee", action="store_false")
    sp.add_argument("--yes", action="store_true", help="with --no-e2ee: do not ask for confirmation")
    sp.add_argument("--passphrase-stdin", action="store_true", help="read the E2EE passphrase from stdin")
    sp.add_argument("--weak", action="store_true", help=f"accept a passphrase shorter than {E2EE_MIN_PASSPHRASE} characters")
    sp.add_argument("--insecure", action="store_true", help="allow plain http:// to a non-loopback host")
    group = sp.add_mutually_exclusive_group()
    group.add_argument("--auto-sync", dest="auto_sync", action="store_true", default=None,
                       help="sync by itself while contextfs mcp runs (the default)")
    group.add_argument("--no-auto-sync", dest="auto_sync", action="store_false")
    sp.add_argument("--sync-interval", metavar="DURATION", help=f"auto-sync period, e.g. 30s, 5m, 1h "
                    f"(default {AUTO_SYNC_INTERVAL})")
    sp.add_argument("--push-delay", metavar="DURATION", help=f"how soon auto-sync pushes a local write "
                    f"(default {AUTO_SYNC_PUSH_DELAY})")
    sp.set_defaults(func=cmd_cloud_configure)
    sp = csub.add_parser("rekey", parents=[common], help="re-encrypt everything under a new E2EE passphrase")
    sp.add_argument("--passphrase-stdin", action="store_true", help="read the new passphrase from stdin")
    sp.add_argument("--weak", action="store_true", help=f"accept a passphrase shorter than {E2EE_MIN_PASSPHRASE} characters")
    sp.set_defaults(func=cmd_cloud_rekey)
    sp = csub.add_parser("reset-e2ee", parents=[common],
                         help="lost the E2EE passphrase: start the account's encryption over")
    sp.add_argument("--passphrase-stdin", action="store_true", help="read the new passphrase from stdin")
    sp.add_argument("--weak", action="store_true", help=f"accept a passphrase shorter than {E2EE_MIN_PASSPHRASE} characters")
    sp.add_argument("--keep-unreadable", action="store_true",
                    help="leave the memories nobody can read on the server instead of deleting them")
    sp.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    sp.set_defaults(func=cmd_cloud_reset_e2ee)
    sp = csub.add_parser("sync", parents=[common], help="push then pull (default)")
    sp.add_argument("--direction", choices=("push", "pull", "both"), default="both")
    sp.add_argument("--all", action="store_true", help="push every syncable memory, not just changes")
    sp.add_argument("--force", action="store_true", help="overwrite the server's versions")
    sp.add_argument("--dry-run", action="store_true", help="show what would happen; change nothing")
    sp.add_argument("--watch", action="store_true",
                    help="keep syncing: every cloud.sync_interval, and shortly after local writes (Ctrl-C ends it)")
    sp.set_defaults(func=cmd_cloud_sync)
    for name, func, text in (("status", cmd_cloud_status, "show sync status"),
                             ("conflicts", cmd_cloud_conflicts, "list conflict copies (<id>_local)"),
                             ("check", cmd_cloud_check, "compare local and server content")):
        sp = csub.add_parser(name, parents=[common], help=text)
        sp.set_defaults(func=func)
    sp = csub.add_parser("resolve", parents=[common], help="resolve a conflict")
    sp.add_argument("id", metavar="ID", help="the memory id or its _local copy id")
    sp.add_argument("--keep", choices=("local", "cloud"), required=True)
    sp.set_defaults(func=cmd_cloud_resolve)


def cmd_index_status(args: argparse.Namespace) -> int:
    """contextfs index status"""
    cfg = load_config()
    with _open(args) as store:
        status = index_status(store, cfg)
    if args.json:
        _print_json(status)
        return EXIT_OK
    notes = {"hash": " (offline feature hashing: lexical, lower quality than default)",
             "default": f" ({MINILM_MODEL})", "none": " (semantic search off)"}
    print(f"embedder:   {status['embedder']}{notes.get(status['embedder'], '')}")
    if status["model"] and status["model"] != HashEmbedder.model_id:
        print(f"model:      {status['model']}")
    print(f"index:      {status['path']}")
    indexed = "-" if status["indexed"] is None else status["indexed"]
    print(f"indexed:    {indexed} of {status['memories']} memories")
    state = status["state"]
    if state == "stale":
        state = f"stale ({status['reason']}); {REBUILD_HINT}"
    elif state in ("off", "unavailable"):
        state = f"{state} ({status['reason']}); search uses keywords only"
    print(f"state:      {state}")
    return EXIT_OK


def cmd_index_rebuild(args: argparse.Namespace) -> int:
    """contextfs index rebuild"""
    cfg = load_config()
    tty = sys.stderr.isatty()

    def progress(done: int, total: int) -> None:
        print(f"\rindexing {done}/{total} memories…", end="", file=sys.stderr, flush=True)

    with _open(args) as store:
        try:
            result = rebuild_index(store, cfg, progress=progress if tty else None)
        finally:
            if tty:
                print(file=sys.stderr)
    if args.json:
        _print_json(result)
    else:
        print(f"Indexed {result['indexed']} memories with the {result['embedder']} embedder "
              f"in {result['seconds']:.1f}s ({result['path']})")
    return EXIT_OK


def _add_import_parsers(sub: Any, common: Any) -> None:
    """contextfs import contextfs [PATH] (issue 14)."""
    p = sub.add_parser("import", help="bring in memories from another tool's store")
    isub = p.add_subparsers(dest="import_source", metavar="contextfs", required=True)
    sp = isub.add_parser("contextfs", parents=[common],
                         help="from the public ContextFS client (its ~/.contextfs/context.db)")
    sp.add_argument("path", nargs="?", metavar="PATH",
                    help="its data directory or context.db (default: $CONTEXTFS_DATA_DIR or ~/.contextfs)")
    sp.add_argument("--dry-run", action="store_true", help="count what would be imported; change nothing")
    sp.set_defaults(func=cmd_import_contextfs)


def cmd_import_contextfs(args: argparse.Namespace) -> int:
    """contextfs import contextfs [PATH] [--dry-run]"""
    progress = None if args.json else _progress_printer()
    result = import_contextfs(Path(args.path) if args.path else None, dry_run=args.dry_run, progress=progress)
    if progress:
        sys.stderr.write("\r")
    if args.json:
        _print_json(result)
        return EXIT_OK
    verb = "Would import" if args.dry_run else "Imported"
    print(f"{verb} from {result['source']}:")
    for plural in ("memories", "sessions", "edges"):
        c = result[plural]
        name = "relationships" if plural == "edges" else plural
        print(f"  {name}: {c['added']} new, {c['updated']} updated, {c['conflict_copies']} kept as conflict copies, "
              f"{c['unchanged']} already here" + (f", {c['deleted_before_any_sync']} deleted there before any sync "
                                                  f"(left out)" if c["deleted_before_any_sync"] else ""))
    if not args.dry_run and any(result[p]["added"] or result[p]["updated"] or result[p]["conflict_copies"]
                                for p in ("memories", "sessions", "edges")):
        print("They go up at the next sync: contextfs cloud sync")
    return EXIT_OK


def _add_index_parsers(sub: Any, common: Any) -> None:
    """contextfs index … (issue 6)."""
    p = sub.add_parser("index", help="the local semantic index (derived data, never synced)")
    isub = p.add_subparsers(dest="index_command", metavar="status|rebuild", required=True)
    sp = isub.add_parser("status", parents=[common], help="embedder, indexed count vs store, stale?")
    sp.set_defaults(func=cmd_index_status)
    sp = isub.add_parser("rebuild", parents=[common], help="re-create the index from the local store")
    sp.set_defaults(func=cmd_index_rebuild)


def _server_module() -> Any:
    """The reference server (contextfs_server.py): imported only by `contextfs server …` and `demo`."""
    try:
        import contextfs_server
    except ImportError as exc:
        if exc.name != "contextfs_server":
            raise
        raise ContextFSError("The reference server (contextfs_server.py) is not installed next to this client; "
                             "install it with: pip install contextfs-sync") from None
    return contextfs_server


def _server_data_dir(arg: Optional[str]) -> Union[Path, str]:
    """``--data DIR`` (or a ``sqlite:///`` URL), or ``$CONTEXTFS_HOME/server``."""
    if arg and "://" in arg:
        return arg
    if arg:
        return Path(arg).expanduser().resolve()
    home = contextfs_home()
    with _suppress(OSError):
        ensure_home(home)
    return (home / "server").resolve()


def cmd_server_run(args: argparse.Namespace) -> int:
    """contextfs server run [--host H] [--port P] [--data DIR] [--max-body BYTES]"""
    import signal

    server_module = _server_module()
    max_body = server_module.MAX_BODY if args.max_body is None else args.max_body
    if max_body < 1:
        raise UsageError("--max-body must be a positive number of bytes")
    data = _server_data_dir(args.data)
    server = server_module.make_server(data, host=args.host, port=args.port, max_body=max_body)
    port = server.server_address[1]
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"contextfs server listening on http://{host}:{port} (data: {data})", flush=True)

    def stop(signum: int, frame: Any) -> None:
        # shutdown() waits for serve_forever() to return, so it must run on another thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
    return EXIT_OK


def cmd_server_add_user(args: argparse.Namespace) -> int:
    """contextfs server add-user EMAIL [--name N] [--password-stdin]"""
    password = None
    if args.password_stdin:
        password = sys.stdin.read()
        password = password[:-1] if password.endswith("\n") else password
        password = password[:-1] if password.endswith("\r") else password
        if not password:
            raise UsageError("--password-stdin: standard input is empty; pipe the password in")
    key = _server_module().add_user(_server_data_dir(args.data), args.email, password=password, name=args.name)
    if args.json:
        _print_json({"email": args.email.strip().lower(), "api_key": key})
    else:
        print(key)
    return EXIT_OK


def _add_server_parsers(sub: Any, common: Any) -> None:
    """contextfs server … (issue 4: reference server)."""
    p = sub.add_parser("server", help="run the self-hosted reference sync server")
    ssub = p.add_subparsers(dest="server_command", metavar="run|add-user", required=True)
    data_help = "server data directory (default: $CONTEXTFS_HOME/server)"
    sp = ssub.add_parser("run", help="serve the sync API until SIGTERM/Ctrl-C")
    sp.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    sp.add_argument("--port", type=int, default=DEFAULT_SERVER_PORT,
                    help=f"port (default {DEFAULT_SERVER_PORT}; 0 picks a free one)")
    sp.add_argument("--data", metavar="DIR", help=data_help)
    sp.add_argument("--max-body", type=int, metavar="BYTES",
                    help="largest accepted request body (default 33554432: 32 MiB)")
    sp.set_defaults(func=cmd_server_run)
    sp = ssub.add_parser("add-user", parents=[common], help="create a user and print its API key once")
    sp.add_argument("email", metavar="EMAIL")
    sp.add_argument("--data", metavar="DIR", help=data_help)
    sp.add_argument("--name", help="display name")
    sp.add_argument("--password-stdin", action="store_true",
                    help="read a password (for contextfs cloud login) from standard input")
    sp.set_defaults(func=cmd_server_add_user)


def cmd_mcp(args: argparse.Namespace) -> int:
    """contextfs mcp: serve the contextfs tools to an MCP client on stdin/stdout."""
    return serve_mcp()


def _add_mcp_parser(sub: Any, common: Any) -> None:
    """contextfs mcp (issue 5)."""
    p = sub.add_parser(
        "mcp", help="run the MCP server on stdin/stdout (Claude Code, Claude Desktop, Cursor, Codex, …)",
        description="Serve contextfs_sync, contextfs_sync_status, contextfs_save, contextfs_search, "
                    "contextfs_list and contextfs_delete to an MCP client over stdio. Your MCP client "
                    "starts this command; you do not run it by hand. Environment: CONTEXTFS_HOME "
                    "(which memory store), CONTEXTFS_SERVER_URL and CONTEXTFS_API_KEY (override config.toml).")
    p.set_defaults(func=cmd_mcp)


def run_demo(keep: bool = False) -> int:
    """Start a local reference server, sync two device homes, and show a conflict kept as _local."""
    import shutil
    import tempfile

    server_module = _server_module()
    root = Path(tempfile.mkdtemp(prefix="contextfs-demo-"))
    server = server_module.make_server(root / "server", "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        key = server_module.add_user(root / "server", "demo@example.com")
        print(f"1. Reference server on {url} (data in {root}), user demo@example.com, key {mask_key(key)}")
        homes = {}
        for name in ("laptop", "desktop"):
            cfg = Config(home=root / name)
            cfg.data = {"cloud": {"enabled": True, "server_url": url, "api_key": key}, "index": {"embedder": "none"}}
            save_config(cfg)
            homes[name] = cfg.home
        with open_store(homes["laptop"]) as laptop:
            laptop.session_start(label="demo session")
            uv = laptop.save("Use uv to create virtualenvs: uv venv && uv pip install -e .", type="decision",
                             tags=["python", "tooling"], summary="uv for virtualenvs")
            err = laptop.save("pip install fails with 'externally-managed-environment' outside a venv",
                              type="error", tags=["python"])
            laptop.link(uv.id, err.id, "resolves")
            laptop.save("A half-finished idea", draft=True)
            laptop.session_end(summary="Switched the project to uv")
        print("2. laptop: saved a decision, an error, a relationship, a session summary and a draft")
        print(f"3. laptop:  contextfs cloud sync  ->  {cloud_sync(homes['laptop']).summary()}"
              "  (the draft stays local)")
        print(f"4. desktop: contextfs cloud sync  ->  {cloud_sync(homes['desktop']).summary()}")
        with open_store(homes["desktop"]) as desktop:
            hit = desktop.search("virtualenvs")[0]
            print(f"   desktop: contextfs search virtualenvs  ->  {hit.memory.id}  [{hit.memory.type}] {hit.snippet}")
            desktop.edit(uv.id, content="Use uv for virtualenvs; pin the version in CI")
        with open_store(homes["laptop"]) as laptop:
            laptop.edit(uv.id, content="Use uv for virtualenvs and for running tools (uvx)")
        print("5. Both devices edit the same memory while offline")
        print(f"   laptop:  contextfs cloud sync  ->  {cloud_sync(homes['laptop']).summary()}")
        print(f"   desktop: contextfs cloud sync  ->  {cloud_sync(homes['desktop']).summary()}")
        with open_store(homes["desktop"]) as desktop:
            cloud_version = desktop.get(uv.id).content
            copies = desktop.conflicts()
        print(f"6. desktop: {uv.id} now holds the cloud version: {cloud_version!r}")
        for copy in copies:
            print(f"   desktop: the local text is kept as {copy.id}: {copy.content!r}")
        where = f"CONTEXTFS_HOME={homes['desktop']} " if keep else ""
        print(f"   resolve with: {where}contextfs cloud resolve {uv.id}_local --keep local|cloud"
              + ("" if keep else "  (run the demo with --keep to try it)"))
        print("Demo complete: memories, a session and a relationship synced; the conflict lost nothing.")
    finally:
        server.shutdown()
        server.server_close()
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    """contextfs demo [--keep]"""
    return run_demo(keep=args.keep)


def build_parser() -> argparse.ArgumentParser:
    """The ``contextfs`` argument parser."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="contextfs", description="Keep your AI agent's memories in sync across devices.")
    parser.add_argument("--version", action="version", version=f"contextfs-sync {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print JSON for machines")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_memory_parsers(sub, common)
    _add_cloud_parsers(sub, common)
    _add_index_parsers(sub, common)
    _add_import_parsers(sub, common)
    _add_server_parsers(sub, common)
    _add_mcp_parser(sub, common)
    p = sub.add_parser("demo", help="sync two devices through a local reference server, end to end")
    p.add_argument("--keep", action="store_true", help="keep the demo's temporary directory")
    p.set_defaults(func=cmd_demo)
    return parser


# ---- 13. main ----------------------------------------------------------------------------

def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the ``contextfs`` console script; returns the exit code."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv in (["--version"], ["-V"]):  # fast path: no parser, no imports
        print(f"contextfs-sync {__version__}")
        return EXIT_OK
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(args.func(args) or 0)
    except ContextFSError as exc:
        print(exc.message, file=sys.stderr)
        return exc.exit_code
    except sqlite3.Error as exc:
        print(_store_error(contextfs_home() / "sync.db", exc).message, file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:
        print(_os_error_line(exc), file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("Interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover - the console script calls main()
    sys.exit(main())
