"""The floor for bench_sync.py: the unavoidable work of a sync, with the standard library only.

No validation, no clocks, no conflict rule, no retries: read rows from SQLite, JSON-encode
them, POST them in the same batch sizes as contextfs (500 items / 2 MiB per request, sessions,
then memories, then edges) to a handler that decodes them and inserts them into SQLite; pull
them back in pages of 1000 rows ordered by a server sequence into a local table with the
same columns and the same full-text index as the contextfs store. Anything contextfs spends
beyond this is overhead to justify.

    python floor.py serve DATA_DIR          prints "listening on http://127.0.0.1:PORT"
    python floor.py push SYNC_DB URL        push every row of a contextfs store
    python floor.py pull DB URL             pull everything into a new database
    python floor.py noop URL                one request that finds nothing new (a no-op sync)
"""
from __future__ import annotations

import http.client
import http.server
import json
import sqlite3
import sys
import threading
from urllib.parse import urlsplit

BATCH_ITEMS = 500
BATCH_BYTES = 2 * 1024 * 1024
PAGE = 1000
TABLES = ("sessions", "memories", "edges")
JSON_COLUMNS = {"tags", "metadata", "extra", "vector_clock"}


def dumps(value):
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


# -- server ----------------------------------------------------------------------------------

SERVER_SCHEMA = """
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO counters VALUES ('seq', 0);
""" + "".join(f"""
CREATE TABLE IF NOT EXISTS {t} (user_id TEXT NOT NULL, id TEXT NOT NULL, updated_at TEXT,
    deleted_at TEXT, vector_clock TEXT, seq INTEGER NOT NULL, body TEXT NOT NULL,
    PRIMARY KEY (user_id, id));
CREATE INDEX IF NOT EXISTS {t}_seq ON {t} (user_id, seq);
""" for t in TABLES)


def serve(data_dir: str) -> None:
    import os

    os.makedirs(data_dir, exist_ok=True)
    path = os.path.join(data_dir, "floor.db")
    setup = sqlite3.connect(path, isolation_level=None)
    setup.execute("PRAGMA journal_mode = WAL")
    setup.executescript(SERVER_SCHEMA)
    setup.close()
    local = threading.local()

    def conn() -> sqlite3.Connection:
        if getattr(local, "conn", None) is None:
            local.conn = sqlite3.connect(path, isolation_level=None)
            local.conn.execute("PRAGMA synchronous = NORMAL")
        return local.conn

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            db = conn()
            if self.path == "/push":
                db.execute("BEGIN IMMEDIATE")
                seq = db.execute("SELECT value FROM counters WHERE name = 'seq'").fetchone()[0]
                rows = []
                for item in body["items"]:
                    seq += 1
                    rows.append(("u", item["id"], item.get("updated_at"), item.get("deleted_at"),
                                 dumps(item.get("vector_clock")), seq, dumps(item)))
                db.executemany(f"INSERT OR REPLACE INTO {body['table']} VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
                db.execute("UPDATE counters SET value = ? WHERE name = 'seq'", (seq,))
                db.execute("COMMIT")
                data = dumps({"accepted": len(rows)}).encode()
            else:  # /pull: the next page across the three tables, by sequence
                after = int(body["cursor"])
                db.execute("BEGIN")
                rows = []
                for t in TABLES:
                    rows += [(r[0], t, r[1]) for r in db.execute(
                        f"SELECT seq, body FROM {t} WHERE user_id = 'u' AND seq > ? ORDER BY seq LIMIT ?",
                        (after, PAGE + 1))]
                db.execute("COMMIT")
                rows.sort()
                more = len(rows) > PAGE
                rows = rows[:PAGE]
                parts = {t: [b for _s, k, b in rows if k == t] for t in TABLES}
                # Stored JSON is spliced into the answer as it is: no decode, no re-encode.
                data = ("{" + ",".join(f'"{t}":[' + ",".join(parts[t]) + "]" for t in TABLES)
                        + f',"has_more":{"true" if more else "false"},'
                        + f'"cursor":{rows[-1][0] if rows else after}}}').encode("utf-8")
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    print(f"listening on http://127.0.0.1:{server.server_address[1]}", flush=True)
    import signal

    signal.signal(signal.SIGTERM, lambda *a: threading.Thread(target=server.shutdown).start())
    server.serve_forever(poll_interval=0.2)


# -- client ----------------------------------------------------------------------------------

def post(http_conn: http.client.HTTPConnection, path: str, payload: bytes) -> dict:
    http_conn.request("POST", path, body=payload, headers={"Content-Type": "application/json"})
    response = http_conn.getresponse()
    data = response.read()
    if response.status != 200:
        raise SystemExit(f"floor: HTTP {response.status}")
    return json.loads(data)


def push(db_path: str, url: str) -> None:
    db = sqlite3.connect(db_path)
    db.row_factory = sqlite3.Row
    parts = urlsplit(url)
    http_conn = http.client.HTTPConnection(parts.hostname, parts.port)
    for table in TABLES:
        where = "draft = 0 AND expires_at IS NULL AND conflict_of IS NULL" if table == "memories" else "1"
        after = -1
        batch, size = [], 0

        def send():
            post(http_conn, "/push", ('{"table":"%s","items":[' % table + ",".join(batch) + "]}").encode("utf-8"))

        while True:
            rows = db.execute(f"SELECT rowid AS _r, * FROM {table} WHERE {where} AND rowid > ? "
                              f"ORDER BY rowid LIMIT {BATCH_ITEMS}", (after,)).fetchall()
            if not rows:
                break
            after = rows[-1]["_r"]
            for row in rows:
                item = {k: (json.loads(row[k]) if k in JSON_COLUMNS else row[k])
                        for k in row.keys() if k not in ("_r", "dirty", "seq", "draft", "expires_at")}
                text = dumps(item)
                if batch and (len(batch) >= BATCH_ITEMS or size + len(text) > BATCH_BYTES):
                    send()
                    batch, size = [], 0
                batch.append(text)
                size += len(text) + 1
        if batch:
            send()
    http_conn.close()


CLIENT_SCHEMA = """
CREATE TABLE memories (id TEXT PRIMARY KEY, type TEXT, content TEXT NOT NULL, summary TEXT, tags TEXT,
    namespace_id TEXT, source_repo TEXT, source_file TEXT, session_id TEXT, metadata TEXT, extra TEXT,
    created_at TEXT, updated_at TEXT, deleted_at TEXT, vector_clock TEXT, content_hash TEXT,
    encrypted INTEGER, dirty INTEGER, seq INTEGER);
CREATE TABLE sessions (id TEXT PRIMARY KEY, label TEXT, tool TEXT, repo TEXT, started_at TEXT,
    ended_at TEXT, summary TEXT, metadata TEXT, extra TEXT, updated_at TEXT, deleted_at TEXT,
    vector_clock TEXT, dirty INTEGER, seq INTEGER);
CREATE TABLE edges (id TEXT PRIMARY KEY, from_id TEXT, to_id TEXT, relation TEXT, weight REAL,
    metadata TEXT, extra TEXT, created_at TEXT, updated_at TEXT, deleted_at TEXT, vector_clock TEXT,
    dirty INTEGER, seq INTEGER);
CREATE TABLE sync_state (key TEXT PRIMARY KEY, value TEXT);
CREATE VIRTUAL TABLE memories_fts USING fts5(content, summary, tags, content='memories', content_rowid='rowid');
CREATE TRIGGER memories_fts_ai AFTER INSERT ON memories BEGIN
    INSERT INTO memories_fts(rowid, content, summary, tags) VALUES (new.rowid, new.content, new.summary, new.tags);
END;
"""
CLIENT_COLUMNS = {
    "memories": ("id", "type", "content", "summary", "tags", "namespace_id", "source_repo", "source_file",
                 "session_id", "metadata", "extra", "created_at", "updated_at", "deleted_at",
                 "vector_clock", "content_hash", "encrypted"),
    "sessions": ("id", "label", "tool", "repo", "started_at", "ended_at", "summary", "metadata", "extra",
                 "updated_at", "deleted_at", "vector_clock"),
    "edges": ("id", "from_id", "to_id", "relation", "weight", "metadata", "extra", "created_at",
              "updated_at", "deleted_at", "vector_clock"),
}


def pull(db_path: str, url: str) -> None:
    db = sqlite3.connect(db_path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")
    db.executescript(CLIENT_SCHEMA)
    parts = urlsplit(url)
    http_conn = http.client.HTTPConnection(parts.hostname, parts.port)
    cursor = 0
    while True:
        page = post(http_conn, "/pull", dumps({"cursor": cursor}).encode())
        db.execute("BEGIN IMMEDIATE")
        for table, columns in CLIENT_COLUMNS.items():
            rows = [tuple(dumps(item.get(c)) if c in JSON_COLUMNS else item.get(c) for c in columns)
                    for item in page[table]]
            if rows:
                # One statement per page: row by row, SQLite < 3.44 flushes FTS5's pending terms
                # at every trigger-fired statement journal, doubling the work (contextfs stages too).
                db.execute(f"CREATE TEMP TABLE IF NOT EXISTS stage_{table} ({', '.join(columns)})")
                db.executemany(f"INSERT INTO stage_{table} VALUES ({', '.join('?' * len(columns))})", rows)
                db.execute(f"INSERT OR REPLACE INTO {table} ({', '.join(columns)}, dirty, seq) "
                           f"SELECT {', '.join(columns)}, 0, 0 FROM stage_{table} ORDER BY rowid")
                db.execute(f"DELETE FROM stage_{table}")
        cursor = page["cursor"]
        db.execute("INSERT OR REPLACE INTO sync_state VALUES ('cursor', ?)", (str(cursor),))
        db.execute("COMMIT")
        if not page["has_more"]:
            break
    http_conn.close()
    db.close()


def noop(url: str) -> None:
    """A sync with nothing to do: start, ask for changes past the end once, get an empty page."""
    parts = urlsplit(url)
    http_conn = http.client.HTTPConnection(parts.hostname, parts.port)
    page = post(http_conn, "/pull", dumps({"cursor": 1 << 62}).encode())
    assert not page["has_more"]
    http_conn.close()


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    {"serve": serve, "push": push, "pull": pull, "noop": noop}[mode](*rest)
