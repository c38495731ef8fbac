"""Soak: many seeded ``kill -9`` trials of ``contextfs cloud sync``, plus fault-proxy runs.

    python benchmarks/soak_kill.py                        # 200 kill trials, 3 fault runs
    python benchmarks/soak_kill.py --trials 1000 --seed 5 --fault-runs 5 --fault-rounds 100

Needs the installed package with its test extra (``pip install -e '.[test]'``): it starts the
reference server (``contextfs server run --port 0`` on 127.0.0.1) and drives the real
``contextfs`` console script. The trial logic is the test suite's own (KillTrials, FaultProxy,
run_fault_rounds in test_contextfs_sync.py), run many more times than the suite does: a sync is
SIGKILLed at a seeded point of push or pull (while the proxy holds its Nth request, just after
the proxy answered it, or after a seeded delay); then ``PRAGMA integrity_check`` must be ok, the
next sync must complete, and every memory written so far must be on the device as written.
After the last trial both devices sync and must equal the server. Exit status 1 if anything
was lost, duplicated or broken.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import contextfs_sync as cfs  # noqa: E402
import test_contextfs_sync as suite  # noqa: E402  (the suite's trial logic, not a copy of it)


def kill_soak(root: Path, server, trials: int, seed: int) -> dict:
    """Run ``trials`` kill trials; returns the table's figures and the problems seen."""
    runner = suite.KillTrials(root / "kill", server, seed=seed)
    problems = []
    started = time.monotonic()
    try:
        for number in range(trials):
            result = runner.trial(number, suite.KillTrials.side_of(number))
            problems += [f"trial {number} ({result['side']}, {result['trigger']}): {p}" for p in result["problems"]]
            if (number + 1) % 20 == 0:
                print(f"  {number + 1}/{trials} trials, {len(runner.expected)} memories, "
                      f"{time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
        final = runner.final_check()
        tally = runner.tally()
    finally:
        runner.stop()
    results = runner.results
    killed = [r for r in results if r["killed"]]
    return {
        "trials": len(results),
        "killed": len(killed),
        "killed mid-push": sum(1 for r in killed if r["at"] == "/api/sync/push"),
        "killed mid-pull": sum(1 for r in killed if r["at"] == "/api/sync/pull"),
        "killed elsewhere (register, timer)": sum(1 for r in killed if r["at"] not in ("/api/sync/push",
                                                                                      "/api/sync/pull")),
        "fresh-device trials": sum(1 for r in results if r["side"] == "fresh"),
        "integrity ok": sum(1 for r in results if r["integrity"] == "ok"),
        "next sync ok, nothing lost": sum(1 for r in results if not r["problems"]),
        "converged": "yes" if not final else "NO",
        "memories written": tally["written"],
        "lost": tally["lost"],
        "duplicated": tally["duplicated"],
        "seconds": round(time.monotonic() - started),
        "problems": problems + final,
    }


def fault_soak(root: Path, server, runs: int, rounds: int, seed: int) -> list:
    """``runs`` seeded fault-proxy runs (rate 0.45, every fault kind); one summary per run."""
    cfs.PUSH_BATCH_ITEMS, cfs.PULL_PAGE_SIZE = 8, 12   # many requests per sync: many places to fail
    return [suite.run_fault_rounds(root / "faults", server, seed + i, rounds) for i in range(runs)]


def main() -> int:
    """Parse arguments, run the soak, print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=200, help="kill -9 trials (default 200)")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--fault-runs", type=int, default=3, help="fault-proxy runs (default 3; 0 = none)")
    parser.add_argument("--fault-rounds", type=int, default=60, help="rounds per fault run (default 60)")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="contextfs-soak-"))
    (tmp / "server").mkdir()
    server = suite.start_ref_server(tmp / "server")
    try:
        print(f"kill -9 soak: {args.trials} trials, seed {args.seed}", file=sys.stderr, flush=True)
        kill = kill_soak(tmp, server, args.trials, args.seed)
        print(f"fault soak: {args.fault_runs} runs of {args.fault_rounds} rounds", file=sys.stderr, flush=True)
        faults = fault_soak(tmp, server, args.fault_runs, args.fault_rounds, args.seed)
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\nkill -9 trials (seed {args.seed})")
    width = max(map(len, kill))
    for name, value in kill.items():
        if name != "problems":
            print(f"  {name:<{width}}  {value}")
    if faults:
        print(f"\nfault-proxy runs ({args.fault_rounds} rounds each, fault rate 0.45)")
        print(f"  {'seed':>4}  {'requests':>8}  {'faults':>6}  {'completed':>9}  {'stopped':>7}  "
              f"{'memories':>8}  {'lost':>4}  {'duplicated':>10}")
        for f in faults:
            print(f"  {f['seed']:>4}  {f['requests']:>8}  {f['faults']:>6}  {f['completed']:>9}  {f['stopped']:>7}  "
                  f"{f['memories']:>8}  {f['lost']:>4}  {f['duplicated']:>10}")
        kinds = {}
        for f in faults:
            for kind, n in f["injected"].items():
                kinds[kind] = kinds.get(kind, 0) + n
        print("  faults by kind: " + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())))
    problems = kill["problems"] + [p for f in faults for p in f["problems"]]
    for problem in problems[:20]:
        print(f"PROBLEM: {problem}")
    ok = not problems and kill["lost"] == 0 and kill["duplicated"] == 0 and kill["converged"] == "yes"
    print("\nresult: " + ("OK: nothing lost, nothing duplicated" if ok else f"FAILED ({len(problems)} problems)"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
