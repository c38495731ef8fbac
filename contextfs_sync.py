"""contextfs-sync: keep an AI agent's local memories in sync across devices.

One auditable module, used three ways: the ``contextfs`` CLI, a stdio MCP server
(``contextfs mcp``) and a library you can vendor by copying this file. It speaks the
ContextFS Cloud wire protocol and ships a small self-hostable reference server.

Read it top to bottom: each numbered section only uses the sections above it.
Nothing happens at import time: no I/O, no heavy imports (httpx, chromadb and
cryptography are imported lazily where they are needed).
"""

# ---- 1. imports, version, constants -----------------------------------------------------

from __future__ import annotations

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
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "ContextFSError", "ConfigError", "NotConfigured", "NotFound", "StoreError",
    "AuthError", "ServerError", "CryptoError",
    "Memory", "Session", "Edge",
    "clock_compare", "clock_merge", "clock_tick", "content_hash", "conflict_copy_id",
    "Config", "load_config", "save_config", "contextfs_home", "mask_key",
    "Store", "open_store",
    "main",
]

DEFAULT_SERVER_URL = "https://api.contextfs.ai"
DEFAULT_SERVER_PORT = 8766
ENV_HOME = "CONTEXTFS_HOME"
ENV_API_KEY = "CONTEXTFS_API_KEY"
ENV_SERVER_URL = "CONTEXTFS_SERVER_URL"

# Exact user-facing messages from the seed contract (seed-sync-skill.md): word for word.
MSG_DISABLED = "Cloud sync is disabled. Run: contextfs cloud configure --enabled"
MSG_NO_KEY = "No API key configured. Run: contextfs cloud login"

MEMORY_TYPES = ("fact", "decision", "procedure", "error", "code", "note", "episodic", "user")
EMBEDDERS = ("default", "hash", "none")
DEFAULT_TTL_SECONDS = 24 * 3600
SQLITE_BUSY_TIMEOUT_MS = 10_000

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOT_CONFIGURED = 0, 1, 2, 3


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
    """The server is down, unreachable, or answered with an error."""


class CryptoError(ContextFSError):
    """End-to-end encryption failed (wrong passphrase, missing extra)."""


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


def normalize_ts(value: Optional[str]) -> Optional[str]:
    """Return a timestamp in our canonical UTC ``Z`` form (None stays None)."""
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


def clock_tick(clock: Clock, device_id: str) -> Clock:
    """A copy of ``clock`` with this device's counter incremented by one."""
    ticked = dict(clock)
    ticked[device_id] = ticked.get(device_id, 0) + 1
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

    @property
    def local_only(self) -> bool:
        """Drafts, temporary memories and unresolved conflict copies never leave the device."""
        return self.draft or self.expires_at is not None or self.conflict_of is not None

    def to_wire(self) -> dict:
        """The protocol's memory object (never an embedding)."""
        wire = {
            "id": self.id, "content": self.content, "type": self.type, "summary": self.summary,
            "tags": list(self.tags), "namespace_id": self.namespace_id,
            "source_repo": self.source_repo, "source_file": self.source_file,
            "session_id": self.session_id, "metadata": self.metadata,
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
        now = utc_now()
        encrypted = bool(obj.get("encrypted", False))
        return cls(
            id=mem_id, content=content, type=str(obj.get("type") or "fact"),
            summary=obj.get("summary"), tags=tags,
            namespace_id=str(obj.get("namespace_id") or "global"),
            source_repo=obj.get("source_repo"), source_file=obj.get("source_file"),
            session_id=obj.get("session_id"),
            metadata=_json_obj(obj.get("metadata"), "metadata"),
            extra={k: obj[k] for k in _MEMORY_WIRE_EXTRAS if obj.get(k) is not None},
            created_at=normalize_ts(obj.get("created_at")) or now,
            updated_at=normalize_ts(obj.get("updated_at")) or now,
            deleted_at=normalize_ts(obj.get("deleted_at")),
            vector_clock=_clock(obj.get("vector_clock")),
            content_hash=obj.get("content_hash") or ("" if encrypted else content_hash(content)),
            encrypted=encrypted,
        )


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
    dirty: bool = False
    seq: int = 0

    def to_wire(self) -> dict:
        """The protocol's session object (``repo`` travels as ``repo_path``)."""
        wire = {
            "id": self.id, "label": self.label, "tool": self.tool, "repo_path": self.repo,
            "started_at": self.started_at, "ended_at": self.ended_at, "summary": self.summary,
            "metadata": self.metadata, "created_at": self.started_at,
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
        now = utc_now()
        started = normalize_ts(obj.get("started_at")) or normalize_ts(obj.get("created_at")) or now
        return cls(
            id=obj["id"], label=obj.get("label"), tool=str(obj.get("tool") or "contextfs"),
            repo=obj.get("repo_path"), started_at=started,
            ended_at=normalize_ts(obj.get("ended_at")), summary=obj.get("summary"),
            metadata=_json_obj(obj.get("metadata"), "metadata"),
            extra={k: obj[k] for k in _SESSION_WIRE_EXTRAS if obj.get(k) is not None},
            updated_at=normalize_ts(obj.get("updated_at")) or started,
            deleted_at=normalize_ts(obj.get("deleted_at")),
            vector_clock=_clock(obj.get("vector_clock")),
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
        now = utc_now()
        return cls(
            from_id=obj["from_id"], to_id=obj["to_id"], relation=obj["relation"],
            weight=float(weight), metadata=_json_obj(obj.get("metadata"), "metadata"),
            extra={k: obj[k] for k in _EDGE_WIRE_EXTRAS if obj.get(k) is not None},
            created_at=normalize_ts(obj.get("created_at")) or now,
            updated_at=normalize_ts(obj.get("updated_at")) or now,
            deleted_at=normalize_ts(obj.get("deleted_at")),
            vector_clock=_clock(obj.get("vector_clock")),
        )


# ---- 4. pure sync logic ------------------------------------------------------------------
# Plain functions on plain data: no I/O. The sync engine (section 10) asks these what to do.

# Verdicts for an incoming cloud version against the local row.
APPLY_INSERT = "insert"          # not known locally: store the cloud version
APPLY_OVERWRITE = "overwrite"    # cloud is newer than a clean local row: take it
APPLY_SKIP = "skip"              # already have it (or newer and clean): nothing to do
APPLY_KEEP_LOCAL = "keep_local"  # local dirty row dominates: it will be pushed
APPLY_SETTLE = "settle"          # cloud holds our own write: adopt its clock, mark clean
APPLY_CONFLICT = "conflict"      # cloud wins under the id; local kept as <id>_local


def decide_incoming(local_clock: Optional[Clock], local_dirty: bool, same_version: bool,
                    cloud_clock: Clock) -> str:
    """The conflict rule: what to do with a cloud version given the local row's state.

    ``same_version`` says the two carry the same content and fields (our own accepted write,
    perhaps ticked by the server). Settle by clocks, not by push verdicts (design.md, Sync).
    """
    if local_clock is None:
        return APPLY_INSERT
    order = clock_compare(local_clock, cloud_clock)
    if not local_dirty:
        if order == "equal":
            return APPLY_SKIP
        if order == "after":
            return APPLY_SKIP  # an overlap re-read of an older version: keep what we have
        return APPLY_OVERWRITE  # before, or concurrent with a clean row: cloud wins, nothing lost
    if order == "after":
        return APPLY_KEEP_LOCAL
    if same_version or order == "equal":
        return APPLY_SETTLE if same_version else APPLY_CONFLICT
    return APPLY_CONFLICT


def conflict_copy_id(memory_id: str, taken: Callable[[str], bool]) -> str:
    """``<id>_local``, or ``<id>_local_2``, ``_3``, … when that id is already taken."""
    candidate = f"{memory_id}_local"
    n = 2
    while taken(candidate):
        candidate = f"{memory_id}_local_{n}"
        n += 1
    return candidate


def batches(items: Iterable[dict], max_count: int, max_bytes: int) -> Iterator[List[dict]]:
    """Split wire objects into batches bounded by count and by encoded JSON size."""
    batch: List[dict] = []
    size = 0
    for item in items:
        item_size = len(json.dumps(item, separators=(",", ":"), ensure_ascii=False).encode("utf-8")) + 1
        if batch and (len(batch) >= max_count or size + item_size > max_bytes):
            yield batch
            batch, size = [], 0
        batch.append(item)
        size += item_size
    if batch:
        yield batch


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
    ("cloud", "insecure"): bool,
    ("index", "embedder"): str,
}


def contextfs_home() -> Path:
    """``$CONTEXTFS_HOME``, or ``~/.contextfs``."""
    env = os.environ.get(ENV_HOME)
    return Path(env).expanduser() if env else Path.home() / ".contextfs"


@dataclass
class Config:
    """The user's config.toml plus environment overrides (env wins, and is never saved)."""

    home: Path
    data: dict = field(default_factory=dict)

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
    def embedder(self) -> str:
        """Which embedder the semantic index uses."""
        return self.get("index", "embedder", "default")


def _toml_line_of(text: str, table: str, key: str) -> int:
    """Line number (1-based) of ``key`` inside ``[table]`` in TOML text, or 0."""
    current = ""
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        header = re.match(r"\[\s*([^\[\]]+?)\s*\]$", stripped)
        if header:
            current = header.group(1).strip().strip('"')
            continue
        if current == table and re.match(rf'["\']?{re.escape(key)}["\']?\s*=', stripped):
            return number
    return 0


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
            line = _toml_line_of(text, "", table)
            raise ConfigError(f"{cfg.path}:{line}: '{table}' must be a table like [{table}]")
        if key in section and not isinstance(section[key], expected):
            line = _toml_line_of(text, table, key)
            raise ConfigError(
                f"{cfg.path}:{line}: {table}.{key} must be a {_toml_type_name(expected)}, "
                f"got {section[key]!r}; fix the file (it was not changed)")
    embedder = data.get("index", {}).get("embedder")
    if embedder is not None and embedder not in EMBEDDERS:
        line = _toml_line_of(text, "index", "embedder")
        raise ConfigError(f"{cfg.path}:{line}: index.embedder must be one of "
                          f"{', '.join(EMBEDDERS)}, got {embedder!r}")
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


def device_id(home: Path) -> str:
    """This device's stable id (hostname + random), created once in ``$CONTEXTFS_HOME/device_id``."""
    path = home / "device_id"
    try:
        existing = path.read_text(encoding="utf-8").strip()
        if existing:
            return existing
    except FileNotFoundError:
        pass
    import secrets
    import socket

    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname() or "device")[:19] or "device"
    new_id = f"{host}-{secrets.token_hex(6)}"[:32]
    ensure_home(home)
    try:  # O_EXCL: if two processes race, the first one's id wins
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(new_id)
        return new_id
    except FileExistsError:
        return path.read_text(encoding="utf-8").strip() or new_id


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
                   "conflict_of", "encrypted", "dirty", "seq")
_SESSION_COLUMNS = ("id", "label", "tool", "repo", "started_at", "ended_at", "summary", "metadata",
                    "extra", "updated_at", "deleted_at", "vector_clock", "dirty", "seq")
_EDGE_COLUMNS = ("id", "from_id", "to_id", "relation", "weight", "metadata", "extra",
                 "created_at", "updated_at", "deleted_at", "vector_clock", "dirty", "seq")
_JSON_COLUMNS = {"tags", "metadata", "extra", "vector_clock"}
_BOOL_COLUMNS = {"draft", "encrypted", "dirty"}


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=True)


def _to_row(obj: Any, columns: Tuple[str, ...]) -> tuple:
    values = []
    for col in columns:
        value = getattr(obj, col)
        if col in _JSON_COLUMNS:
            value = _dumps(value)
        elif col in _BOOL_COLUMNS:
            value = int(bool(value))
        values.append(value)
    return tuple(values)


def _from_row(cls: type, row: sqlite3.Row, columns: Tuple[str, ...]) -> Any:
    kwargs = {}
    for col in columns:
        value = row[col]
        if col in _JSON_COLUMNS:
            value = json.loads(value) if value else ({} if col != "tags" else [])
        elif col in _BOOL_COLUMNS:
            value = bool(value)
        if cls is Edge and col == "id":
            continue
        kwargs[col] = value
    return cls(**kwargs)


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
        obj.vector_clock = clock_tick(obj.vector_clock, self.device_id)
        obj.updated_at = utc_now()
        self._write(kind, obj, dirty=True)

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
        with self._lock, self.transaction():
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
        with self._lock, self.transaction():
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
            memory.conflict_of = None
            self._local_write("memory", memory)
        self._notify("upsert", [memory.id])
        return memory

    def delete(self, memory_id: str) -> Memory:
        """Delete a memory: a tombstone that syncs like any other change."""
        with self._lock, self.transaction():
            memory = self._get("memory", self.resolve_id(memory_id))
            if memory is None or memory.deleted_at:
                raise NotFound(f"No memory with id {memory_id!r} (see: contextfs list)")
            if memory.local_only and not memory.vector_clock:
                pass  # never synced: still a tombstone, so other code paths see one rule
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
        return [_from_row(Memory, r, _MEMORY_COLUMNS) for r in rows]

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
                return [SearchHit(_from_row(Memory, r, _MEMORY_COLUMNS), -float(r["rank"]),
                                  r["snip"], {"keyword": -float(r["rank"])}) for r in rows]
            return self._like_search(query, limit, where, params)

    def _like_search(self, query: str, limit: int, where: List[str], params: List[Any]) -> List[SearchHit]:
        words = [w.lower() for w in re.findall(r"\w+", query)] or [query.lower()]
        score_sql = " + ".join("(instr(lower(m.content || ' ' || coalesce(m.summary, '')), ?) > 0)"
                               for _ in words)
        sql = (f"SELECT m.*, ({score_sql}) AS score FROM memories m WHERE ({score_sql}) > 0"
               + "".join(f" AND {w}" for w in where) + " ORDER BY score DESC, m.updated_at DESC LIMIT ?")
        rows = self.conn.execute(sql, words + words + params + [limit]).fetchall()
        hits = []
        for r in rows:
            memory = _from_row(Memory, r, _MEMORY_COLUMNS)
            hits.append(SearchHit(memory, float(r["score"]), _like_snippet(memory.content, words),
                                  {"keyword": float(r["score"])}))
        return hits

    def purge_expired(self) -> int:
        """Remove expired temporary memories (they never left this device)."""
        now = utc_now()
        with self._lock:
            ids = [r[0] for r in self.conn.execute(
                "SELECT id FROM memories WHERE expires_at IS NOT NULL AND expires_at <= ?", (now,))]
            if ids:
                with self.transaction():
                    self.conn.executemany("DELETE FROM memories WHERE id = ?", [(i,) for i in ids])
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
                    "count(*) FILTER (WHERE dirty = 1 AND draft = 0 AND expires_at IS NULL "
                    "AND conflict_of IS NULL) FROM memories").fetchone()
            ses = q("SELECT count(*) FILTER (WHERE deleted_at IS NULL), count(*) FILTER (WHERE dirty = 1) "
                    "FROM sessions").fetchone()
            edg = q("SELECT count(*) FILTER (WHERE deleted_at IS NULL), count(*) FILTER (WHERE dirty = 1) "
                    "FROM edges").fetchone()
        return {"memories": mem[0], "drafts": mem[1], "temporary": mem[2], "conflicts": mem[3],
                "sessions": ses[0], "edges": edg[0],
                "pending_push": mem[4] + ses[1] + edg[1]}

    # -- edges -----------------------------------------------------------------------------

    def link(self, from_id: str, to_id: str, relation: str = "related_to", weight: float = 1.0,
             metadata: Optional[dict] = None) -> Edge:
        """Create (or revive/update) a relationship between two memories."""
        if not relation or not relation.strip():
            raise UsageError("Relation is empty: give --relation, e.g. related_to")
        with self._lock, self.transaction():
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
        with self._lock, self.transaction():
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
        return [_from_row(Edge, r, _EDGE_COLUMNS) for r in rows]

    # -- sessions --------------------------------------------------------------------------

    def session_start(self, label: Optional[str] = None, tool: str = "contextfs",
                      repo: Optional[str] = None) -> Session:
        """Start a session; new memories are attached to it until it ends."""
        import uuid

        now = utc_now()
        session = Session(id=str(uuid.uuid4()), label=label, tool=tool or "contextfs",
                          repo=repo, started_at=now)
        with self._lock, self.transaction():
            self._local_write("session", session)
            self.set_state("current_session", session.id)
        return session

    def session_end(self, session_id: Optional[str] = None, summary: Optional[str] = None) -> Session:
        """End a session (default: the current one), storing its summary."""
        with self._lock, self.transaction():
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
        return [_from_row(Session, r, _SESSION_COLUMNS) for r in rows]


class _Transaction:
    """BEGIN IMMEDIATE … COMMIT; nested use joins the outer transaction."""

    def __init__(self, store: Store):
        self.store = store
        self.outer = False

    def __enter__(self) -> "_Transaction":
        conn = self.store.conn
        self.store._lock.acquire()
        self.outer = not conn.in_transaction
        if self.outer:
            conn.execute("BEGIN IMMEDIATE")
        return self

    def __exit__(self, kind: Any, value: Any, tb: Any) -> None:
        try:
            if self.outer:
                if kind is None:
                    try:
                        self.store.conn.execute("COMMIT")
                    except sqlite3.Error:
                        self.store.conn.execute("ROLLBACK")
                        raise
                else:
                    self.store.conn.execute("ROLLBACK")
        finally:
            self.store._lock.release()


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


def _store_error(path: Path, exc: Exception) -> StoreError:
    text = str(exc)
    if "not a database" in text or "malformed" in text:
        return StoreError(f"{path} is not a valid SQLite database ({text}). It was left untouched: "
                          f"restore a backup, or move it aside (mv {path} {path}.bak) to start a new store "
                          f"and pull your memories again with: contextfs cloud sync")
    if "readonly" in text or "unable to open" in text:
        return StoreError(f"{path}: cannot write the local store ({text}); check the permissions of {path.parent}")
    if "full" in text:
        return StoreError(f"{path}: the disk is full ({text}); free some space and retry — nothing was lost")
    return StoreError(f"{path}: local database error: {text}")


def open_store(home: Optional[Path] = None) -> Store:
    """Open (creating and migrating if needed) the store at ``$CONTEXTFS_HOME/sync.db``."""
    home = Path(home) if home else contextfs_home()
    try:
        ensure_home(home)
        return Store(home / "sync.db", device_id(home))
    except OSError as exc:
        raise StoreError(f"{home}: cannot use the contextfs home ({exc.strerror})") from None


# ---- 7. semantic index -------------------------------------------------------------------


# ---- 8. crypto ---------------------------------------------------------------------------


# ---- 9. HTTP client ----------------------------------------------------------------------


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
    plan: List[dict] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    duration_ms: int = 0

    def summary(self) -> str:
        """One human line, e.g. ``pushed 12, pulled 3, 1 conflict kept as <id>_local``."""
        text = f"pushed {sum(self.pushed.values())}, pulled {sum(self.pulled.values())}"
        if self.conflicts:
            copies = ", ".join(copy for _id, copy in self.conflicts)
            text += f", {len(self.conflicts)} conflict{'s' if len(self.conflicts) != 1 else ''} kept as {copies}"
        return ("dry run: would have " + text) if self.dry_run else text

    def to_dict(self) -> dict:
        """A JSON-ready dict (``--json`` and MCP structuredContent)."""
        return {"direction": self.direction, "dry_run": self.dry_run, "pushed": dict(self.pushed),
                "pulled": dict(self.pulled), "rejected": self.rejected,
                "conflicts": [{"id": i, "local_copy": c} for i, c in self.conflicts],
                "plan": self.plan, "warnings": self.warnings, "duration_ms": self.duration_ms,
                "summary": self.summary()}


def require_cloud(cfg: Config) -> None:
    """Raise NotConfigured with the seed's exact message unless sync is enabled and keyed."""
    if not cfg.enabled:
        raise NotConfigured(MSG_DISABLED)
    if not cfg.api_key:
        raise NotConfigured(MSG_NO_KEY)


def cloud_sync(home: Optional[Path] = None, direction: str = "both", push_all: bool = False,
               force: bool = False, dry_run: bool = False) -> SyncReport:
    """Sync this device with the cloud: push, pull or both (push then pull)."""
    if direction not in ("push", "pull", "both"):
        raise UsageError(f"direction must be push, pull or both, not {direction!r}")
    cfg = load_config(home)
    require_cloud(cfg)
    raise ServerError("sync engine not built yet")  # WIP: replaced by the engine (issue 4)


def cloud_status(home: Optional[Path] = None, remote: bool = True) -> dict:
    """Sync status: enabled, server, masked key, device id, last push/pull, pending, conflicts."""
    cfg = load_config(home)
    with open_store(cfg.home) as store:
        counts = store.counts()
        return {"enabled": cfg.enabled, "server_url": cfg.server_url, "api_key": mask_key(cfg.api_key),
                "device_id": store.device_id, "last_push_at": store.state("last_push_at"),
                "last_pull_at": store.state("last_pull_at"), "pending_push": counts["pending_push"],
                "conflicts": counts["conflicts"], "local": counts}


# ---- 11. reference server ----------------------------------------------------------------


# ---- 12. MCP stdio server ----------------------------------------------------------------
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
    with open_store() as store:
        memory = store.save(args["content"], type=args["type"], tags=args["tags"], summary=args["summary"],
                            draft=args["draft"], ttl=ttl, metadata=args["metadata"])
    note = " as a draft (not synced until published)" if memory.draft else (
        f" as temporary until {memory.expires_at} (never synced)" if memory.expires_at else "")
    return f"Saved {memory.id} [{memory.type}]{note}", _mcp_memory(memory)


def _mcp_search(args: dict) -> Tuple[str, dict]:
    with open_store() as store:
        hits = search_memories(store, args["query"], limit=args["limit"], type=args["type"])
    results = [dict(_mcp_memory(h.memory), score=round(h.score, 6), snippet=h.snippet) for h in hits]
    text = "\n".join(f"{h.memory.id}  [{h.memory.type}] {_one_line(h.snippet, 200)}" for h in hits)
    return text or f"No memories match {args['query']!r}", {
        "query": args["query"], "count": len(results), "results": results}


def _mcp_list(args: dict) -> Tuple[str, dict]:
    with open_store() as store:
        memories = store.list(type=args["type"], tag=args["tag"], limit=args["limit"],
                              include_deleted=args["include_deleted"])
    text = "\n".join(_memory_line(m) for m in memories) or "No memories yet"
    return text, {"count": len(memories), "memories": [_mcp_memory(m) for m in memories]}


def _mcp_delete(args: dict) -> Tuple[str, dict]:
    with open_store() as store:
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
            "On conflict the cloud version wins and the local one is kept with a _local suffix. "
            "Drafts and temporary memories are never synced.",
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
            where = f" ({exc.filename})" if exc.filename else ""
            return _tool_error(f"{exc.strerror or exc}{where}; nothing was lost")
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


def serve_mcp() -> int:
    """Run the MCP server on stdin/stdout until stdin ends or SIGTERM; returns the exit code."""
    import signal

    server = McpServer(_claim_stdout())
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
    try:
        while stdin is not None and not server.closed:
            line = stdin.readline(MCP_MAX_MESSAGE_BYTES + 1)
            if not line:
                break  # EOF: the client is done with us
            if len(line) > MCP_MAX_MESSAGE_BYTES and not line.endswith(b"\n"):
                while line and not line.endswith(b"\n"):  # skip the rest of the oversized message
                    line = stdin.readline(MCP_MAX_MESSAGE_BYTES)
                server.send(_rpc_error(None, RPC_INVALID_REQUEST,
                                       f"Invalid Request: message larger than {MCP_MAX_MESSAGE_BYTES} bytes"))
                continue
            server.feed(line)
        server.wait(MCP_EXIT_GRACE_SECONDS)
    except _McpShutdown:
        server.wait(MCP_EXIT_GRACE_SECONDS)
    # Running calls that did not finish in the grace time are daemon threads: they stop with the
    # process. That is safe: the store commits in transactions and a sync resumes where it stopped.
    return EXIT_OK


# ---- 13. CLI -----------------------------------------------------------------------------
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


def memory_view(memory: Memory) -> dict:
    """A memory as shown by ``--json`` (no sync internals beyond dirty/conflict)."""
    view = memory.to_wire()
    view.update(draft=memory.draft, expires_at=memory.expires_at, conflict_of=memory.conflict_of,
                dirty=memory.dirty)
    return view


def _one_line(text: Optional[str], width: int = 72) -> str:
    flat = " ".join((text or "").split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _memory_line(memory: Memory) -> str:
    flags = "".join([" (draft)" if memory.draft else "", " (temporary)" if memory.expires_at else "",
                     f" (conflict copy of {memory.conflict_of})" if memory.conflict_of else "",
                     " (deleted)" if memory.deleted_at else ""])
    return f"{memory.id}  [{memory.type}] {_one_line(memory.summary or memory.content)}{flags}"


def _open(args: argparse.Namespace) -> Store:
    return open_store()


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
    with _open(args) as store:
        hits = search_memories(store, args.query, limit=args.limit, type=args.type)
    if args.json:
        _print_json([dict(memory_view(h.memory), score=round(h.score, 6), snippet=h.snippet,
                          scores={k: round(v, 6) for k, v in h.sources.items()}) for h in hits])
    elif not hits:
        print(f"No memories match {args.query!r}")
    else:
        for hit in hits:
            print(f"{hit.memory.id}  [{hit.memory.type}] {_one_line(hit.snippet, 90)}")
    return EXIT_OK


def search_memories(store: Store, query: str, limit: int = 10, type: Optional[str] = None) -> List[SearchHit]:
    """Search memories: keyword ranking, merged with semantic hits when the index is usable."""
    return store.search(query, limit=limit, type=type)


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


def _add_cloud_parsers(sub: Any, common: Any) -> None:
    """contextfs cloud … (issue 4)."""


def _add_index_parsers(sub: Any, common: Any) -> None:
    """contextfs index … (issue 6)."""


def _add_server_parsers(sub: Any, common: Any) -> None:
    """contextfs server … (issue 4: reference server)."""


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
    _add_server_parsers(sub, common)
    _add_mcp_parser(sub, common)
    return parser


# ---- 14. main ----------------------------------------------------------------------------

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
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"{exc.strerror or exc}{where}; nothing was lost", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("Interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover - the console script calls main()
    sys.exit(main())
