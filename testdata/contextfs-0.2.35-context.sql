-- The public ContextFS client's store (context.db), made by contextfs 0.2.35 itself:
-- five memories, a session and a link saved, a sync with a server, then a save, an edit
-- and a delete after it (see test_import_contextfs_* in test_contextfs_sync.py).
-- Tables it reads; the full-text index tables are left out.
CREATE TABLE alembic_version (
	version_num VARCHAR(32) NOT NULL, 
	CONSTRAINT alembic_version_pkc PRIMARY KEY (version_num)
);
INSERT INTO alembic_version (version_num) VALUES ('009');
CREATE TABLE memories (
	id TEXT NOT NULL, 
	content TEXT NOT NULL, 
	type TEXT NOT NULL, 
	tags TEXT, 
	summary TEXT, 
	namespace_id TEXT NOT NULL, 
	source_file TEXT, 
	source_repo TEXT, 
	source_tool TEXT, 
	project TEXT, 
	session_id TEXT, 
	created_at TEXT NOT NULL, 
	updated_at TEXT NOT NULL, 
	metadata TEXT, vector_clock TEXT, content_hash TEXT, deleted_at TEXT, last_modified_by TEXT, repo_url TEXT, repo_name TEXT, relative_path TEXT, structured_data TEXT, authoritative INTEGER DEFAULT 0, 
	PRIMARY KEY (id)
);
INSERT INTO memories (id, content, type, tags, summary, namespace_id, source_file, source_repo, source_tool, project, session_id, created_at, updated_at, metadata, vector_clock, content_hash, deleted_at, last_modified_by, repo_url, repo_name, relative_path, structured_data, authoritative) VALUES ('5ffa9b71-534', 'Use uv for virtualenvs', 'decision', '["python", "tools"]', 'uv', 'global', 'pyproject.toml', 'git@github.com:me/app.git', NULL, NULL, '0cfadc82-61e3-4f54-84fb-42dce5fab184', '2026-12-04T17:53:28.593065', '2026-12-04T17:53:28.593069', '{"ticket": "T-1", "nested": {"n": 1}, "_vector_clock": {"public-ukvV3yFM": 1}, "_content_hash": "282179e6c880cad8"}', '{"public-ukvV3yFM": 1}', '282179e6c880cad8', NULL, NULL, NULL, NULL, NULL, NULL, 0);
INSERT INTO memories (id, content, type, tags, summary, namespace_id, source_file, source_repo, source_tool, project, session_id, created_at, updated_at, metadata, vector_clock, content_hash, deleted_at, last_modified_by, repo_url, repo_name, relative_path, structured_data, authoritative) VALUES ('ab115e92-112', 'pip install fails without --user — ünïcødé ✓', 'error', '[]', NULL, 'global', NULL, NULL, NULL, NULL, NULL, '2026-12-04T17:53:28.593099', '2026-12-04T17:53:28.593099', '{"_vector_clock": {"public-ukvV3yFM": 1}, "_content_hash": "9810b629d4092125"}', '{"public-ukvV3yFM": 1}', '9810b629d4092125', NULL, NULL, NULL, NULL, NULL, NULL, 0);
INSERT INTO memories (id, content, type, tags, summary, namespace_id, source_file, source_repo, source_tool, project, session_id, created_at, updated_at, metadata, vector_clock, content_hash, deleted_at, last_modified_by, repo_url, repo_name, relative_path, structured_data, authoritative) VALUES ('dd93f586-648', 'Deploy: run make release, tag, then announce', 'procedural', '["ops"]', NULL, 'global', NULL, NULL, NULL, NULL, NULL, '2026-12-04T17:53:28.593115', '2026-12-04T17:53:30.931836', '{"_vector_clock": {"public-ukvV3yFM": 1}, "_content_hash": "5f193e49f188c2d4"}', '{"public-ukvV3yFM": 1}', '5f193e49f188c2d4', NULL, NULL, NULL, NULL, NULL, NULL, 0);
INSERT INTO memories (id, content, type, tags, summary, namespace_id, source_file, source_repo, source_tool, project, session_id, created_at, updated_at, metadata, vector_clock, content_hash, deleted_at, last_modified_by, repo_url, repo_name, relative_path, structured_data, authoritative) VALUES ('740564e6-b40', 'deleted before any sync', 'fact', '[]', NULL, 'global', NULL, NULL, NULL, NULL, NULL, '2026-12-04T17:53:28.593123', '2026-12-04T17:53:28.625423+00:00', '{}', NULL, '9b5613505a0ed39a', '2026-12-04T17:53:28.625423+00:00', NULL, NULL, NULL, NULL, NULL, 0);
INSERT INTO memories (id, content, type, tags, summary, namespace_id, source_file, source_repo, source_tool, project, session_id, created_at, updated_at, metadata, vector_clock, content_hash, deleted_at, last_modified_by, repo_url, repo_name, relative_path, structured_data, authoritative) VALUES ('81d68195-208', 'deleted after a sync', 'fact', '[]', NULL, 'global', NULL, NULL, NULL, NULL, NULL, '2026-12-04T17:53:28.593129', '2026-12-04T17:53:30.940991+00:00', '{"_vector_clock": {"public-ukvV3yFM": 1}, "_content_hash": "0e206901afee6603"}', '{"public-ukvV3yFM": 1}', '0e206901afee6603', '2026-12-04T17:53:30.940991+00:00', NULL, NULL, NULL, NULL, NULL, 0);
INSERT INTO memories (id, content, type, tags, summary, namespace_id, source_file, source_repo, source_tool, project, session_id, created_at, updated_at, metadata, vector_clock, content_hash, deleted_at, last_modified_by, repo_url, repo_name, relative_path, structured_data, authoritative) VALUES ('1e572bcc-76a', 'Use uv for virtualenvs', 'decision', '["python", "tools"]', 'uv', 'global', NULL, 'git@github.com:me/app.git', NULL, NULL, NULL, '2026-12-04T17:47:08.169128+00:00', '2026-12-04T17:47:08.169133+00:00', '{"nested": {"n": 1}, "ticket": "T-1", "_vector_clock": {"public-ukvV3yFM": 1}, "_content_hash": "282179e6c880cad8"}', '{"public-ukvV3yFM": 1}', '282179e6c880cad8', NULL, NULL, NULL, NULL, NULL, NULL, 0);
INSERT INTO memories (id, content, type, tags, summary, namespace_id, source_file, source_repo, source_tool, project, session_id, created_at, updated_at, metadata, vector_clock, content_hash, deleted_at, last_modified_by, repo_url, repo_name, relative_path, structured_data, authoritative) VALUES ('d34c19c4-e36', 'pip install fails without --user — ünïcødé ✓', 'error', '[]', NULL, 'global', NULL, NULL, NULL, NULL, NULL, '2026-12-04T17:47:08.169160+00:00', '2026-12-04T17:47:08.169160+00:00', '{"_vector_clock": {"public-ukvV3yFM": 1}, "_content_hash": "9810b629d4092125"}', '{"public-ukvV3yFM": 1}', '9810b629d4092125', NULL, NULL, NULL, NULL, NULL, NULL, 0);
INSERT INTO memories (id, content, type, tags, summary, namespace_id, source_file, source_repo, source_tool, project, session_id, created_at, updated_at, metadata, vector_clock, content_hash, deleted_at, last_modified_by, repo_url, repo_name, relative_path, structured_data, authoritative) VALUES ('bf02334d-df9', 'Deploy: run make release, then tag', 'procedural', '["ops"]', NULL, 'global', NULL, NULL, NULL, NULL, NULL, '2026-12-04T17:47:08.169176+00:00', '2026-12-04T17:47:08.169176+00:00', '{"_vector_clock": {"public-ukvV3yFM": 1}, "_content_hash": "5f193e49f188c2d4"}', '{"public-ukvV3yFM": 1}', '5f193e49f188c2d4', NULL, NULL, NULL, NULL, NULL, NULL, 0);
INSERT INTO memories (id, content, type, tags, summary, namespace_id, source_file, source_repo, source_tool, project, session_id, created_at, updated_at, metadata, vector_clock, content_hash, deleted_at, last_modified_by, repo_url, repo_name, relative_path, structured_data, authoritative) VALUES ('3be4b31f-584', 'saved after the last sync', 'fact', '["late"]', NULL, 'global', NULL, NULL, NULL, NULL, NULL, '2026-12-04T17:53:30.923022', '2026-12-04T17:53:30.923027', '{}', NULL, 'a6985cb9b4bfe8af', NULL, NULL, NULL, NULL, NULL, NULL, 0);
CREATE TABLE sessions (
	id TEXT NOT NULL, 
	label TEXT, 
	namespace_id TEXT NOT NULL, 
	tool TEXT NOT NULL, 
	repo_path TEXT, 
	branch TEXT, 
	started_at TEXT NOT NULL, 
	ended_at TEXT, 
	summary TEXT, 
	metadata TEXT, vector_clock TEXT, content_hash TEXT, deleted_at TEXT, last_modified_by TEXT, repo_url TEXT, repo_name TEXT, device_name TEXT, memories_created TEXT DEFAULT '[]', 
	PRIMARY KEY (id)
);
INSERT INTO sessions (id, label, namespace_id, tool, repo_path, branch, started_at, ended_at, summary, metadata, vector_clock, content_hash, deleted_at, last_modified_by, repo_url, repo_name, device_name, memories_created) VALUES ('0cfadc82-61e3-4f54-84fb-42dce5fab184', 'refactor auth', 'global', 'claude-code', '/src/app', NULL, '2026-12-04T17:53:28.584081', '2026-12-04T17:53:28.612042+00:00', NULL, '{}', '{"public-ukvV3yFM": 1}', NULL, NULL, NULL, NULL, NULL, 'vm', '[]');
INSERT INTO sessions (id, label, namespace_id, tool, repo_path, branch, started_at, ended_at, summary, metadata, vector_clock, content_hash, deleted_at, last_modified_by, repo_url, repo_name, device_name, memories_created) VALUES ('a3195791-0c65-463c-b997-0475f5182de7', 'refactor auth', 'global', 'claude-code', '/src/app', NULL, '2026-12-04T17:47:08.153314+00:00', '2026-12-04T17:47:08.205190+00:00', NULL, NULL, '{"public-ukvV3yFM": 1, "vm-ec6c7bca0cc8": 1796406781}', NULL, NULL, NULL, NULL, NULL, NULL, '[]');
CREATE TABLE messages (
	id TEXT NOT NULL, 
	session_id TEXT NOT NULL, 
	role TEXT NOT NULL, 
	content TEXT NOT NULL, 
	timestamp TEXT NOT NULL, 
	metadata TEXT, 
	PRIMARY KEY (id)
);
CREATE TABLE namespaces (
	id TEXT NOT NULL, 
	name TEXT NOT NULL, 
	parent_id TEXT, 
	repo_path TEXT, 
	created_at TEXT NOT NULL, 
	metadata TEXT, 
	PRIMARY KEY (id)
);
CREATE TABLE memory_edges (
	from_id TEXT NOT NULL, 
	to_id TEXT NOT NULL, 
	relation TEXT NOT NULL, 
	weight FLOAT DEFAULT '1.0' NOT NULL, 
	created_at TEXT NOT NULL, 
	created_by TEXT, 
	metadata TEXT, vector_clock TEXT, deleted_at TEXT, last_modified_by TEXT, 
	PRIMARY KEY (from_id, to_id, relation)
);
INSERT INTO memory_edges (from_id, to_id, relation, weight, created_at, created_by, metadata, vector_clock, deleted_at, last_modified_by) VALUES ('5ffa9b71-534', 'dd93f586-648', 'references', 1.0, '2026-12-04T17:53:28.604650', 'contextfs', '{}', '{"public-ukvV3yFM": 1}', NULL, NULL);
INSERT INTO memory_edges (from_id, to_id, relation, weight, created_at, created_by, metadata, vector_clock, deleted_at, last_modified_by) VALUES ('1e572bcc-76a', 'bf02334d-df9', 'references', 1.0, '2026-12-04 17:53:29', NULL, NULL, '{"public-ukvV3yFM": 1}', NULL, NULL);
CREATE TABLE sync_state (
	id INTEGER NOT NULL, 
	device_id TEXT NOT NULL, 
	server_url TEXT, 
	last_sync_at DATETIME, 
	last_push_at DATETIME, 
	last_pull_at DATETIME, 
	device_tracker TEXT, 
	registered_at DATETIME, 
	created_at DATETIME DEFAULT CURRENT_TIMESTAMP, 
	updated_at DATETIME DEFAULT CURRENT_TIMESTAMP, 
	PRIMARY KEY (id), 
	UNIQUE (device_id)
);
INSERT INTO sync_state (id, device_id, server_url, last_sync_at, last_push_at, last_pull_at, device_tracker, registered_at, created_at, updated_at) VALUES (1, 'public-ukvV3yFM', 'http://127.0.0.1:8798', '2026-12-04T17:53:29.794614+00:00', '2026-12-04T17:53:29.794614+00:00', NULL, '{"devices": {"public-ukvV3yFM": "2026-12-04T17:53:29.769465+00:00"}, "prune_after_days": 30}', NULL, '2026-12-04 17:53:29', '2026-12-04 17:53:29');
