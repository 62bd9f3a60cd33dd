"""PNG bar charts regenerated from the results log: the rows of one bench, commit and case.

    python bench/plot.py --bench e2e --commit 31528b8 --case "synthetic deepseek-v3 slice fp8 10 layers warm" --out e2e.png
    python bench/plot.py --list                      # the (bench, commit, case) groups in the log
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pyloader.bench.plot import plot_rows  # noqa: E402

LOG = Path(__file__).resolve().parent / "results" / "results.jsonl"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--log", default=str(LOG), help="the results log (default: bench/results/results.jsonl)")
    ap.add_argument("--bench", help="e.g. e2e, dequant, assembly")
    ap.add_argument("--commit", help="the commit the rows were measured at (a prefix)")
    ap.add_argument("--case", help="the case, as its rows name it")
    ap.add_argument("--out", help="the PNG to write")
    ap.add_argument("--list", action="store_true", help="list the (bench, commit, case) groups and their row counts")
    args = ap.parse_args()
    rows = [json.loads(line) for line in Path(args.log).read_text().splitlines() if line.strip()]
    if args.list:
        groups = {}
        for r in rows:
            key = (r["bench"], r["commit"], r["case"])
            groups[key] = groups.get(key, 0) + 1
        for (bench, commit, case), n in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
            print(f"{bench:16s} {commit:12s} {n:4d}  {case}")
        return
    picked = [r for r in rows if r["bench"] == args.bench and str(r["commit"]).startswith(args.commit or "")
              and r["case"] == args.case and r.get("gbps") is not None]
    if not picked or not args.out:
        raise SystemExit("no rows match (see --list), or no --out")
    plot_rows(picked, args.out)
    print(f"wrote {args.out} ({len(picked)} rows)")


if __name__ == "__main__":
    main()
