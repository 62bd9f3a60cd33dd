"""Two (or more) versions of a benchmark in the same run, interleaved round by round: the host's
drift between minutes hits every version alike.

    python bench/interleave.py --rounds 3 --results bench/results/results.jsonl \
        --run old='cd /tmp/old && PYTHONPATH=/tmp/old python -m pyloader bench --checkpoint CK --json {out}' \
        --run new='python -m pyloader bench --checkpoint CK --results {out}'

Each command writes its rows to ``{out}`` (a JSON array or JSON lines); the rows are tagged with
the version's label and the round, appended to the results log, and summarised as the median and
range of each version's GB/s per case and provider. Rounds alternate the order (ABBA).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_rows  # noqa: E402


def read_rows(path: Path) -> list:
    text = path.read_text().strip() if path.exists() else ""
    if not text:
        return []
    if text.startswith("["):
        return json.loads(text)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", required=True, help="LABEL=COMMAND, the command writing its rows to {out}")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--results", help="append the tagged rows to this JSON-lines results log")
    args = ap.parse_args()
    runs = [tuple(r.split("=", 1)) for r in args.run]
    rows = []
    with tempfile.TemporaryDirectory(prefix="pyloader-interleave-") as tmp:
        for rnd in range(args.rounds):
            order = runs if rnd % 2 == 0 else runs[::-1]
            for label, command in order:
                out = Path(tmp) / f"{label}-{rnd}.json"
                print(f"== round {rnd} {label}", flush=True)
                done = subprocess.run(command.format(out=out), shell=True, env=dict(os.environ))
                if done.returncode != 0:
                    raise SystemExit(f"{label} failed in round {rnd} (exit {done.returncode})")
                tagged = [dict(r, version=label, round=rnd, interleaved=True) for r in read_rows(out)]
                write_rows(tagged, args.results)  # at once: a run stopped at its time limit keeps its rounds
                rows += tagged
    summary = {}
    for r in rows:
        if r.get("gbps") is None:
            continue
        summary.setdefault((r.get("case"), r.get("provider"), r["version"]), []).append(r["gbps"])
    table = [{"case": c, "provider": p, "version": v, "gbps_median": round(statistics.median(g), 2),
              "gbps_range": f"{min(g):.2f}-{max(g):.2f}", "n": len(g)} for (c, p, v), g in sorted(summary.items())]
    print_table(table, ["case", "provider", "version", "gbps_median", "gbps_range", "n"])


if __name__ == "__main__":
    main()
