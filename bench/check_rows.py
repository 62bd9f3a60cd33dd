"""The test and compute-sanitizer outcome of a device run as rows of the results log.

    python bench/check_rows.py OUT [--results FILE]   # OUT: the folder scripts/gpu_check.sh wrote

Rows: ``bench`` = ``gpu_check``, ``case`` = ``pytest`` or ``compute-sanitizer <tool>``,
``provider`` = ``pyloader``, no GB/s; ``config`` holds the counts (passed, skipped, failed, errors).
"""

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_rows  # noqa: E402


def counts(text: str) -> dict:
    """The last pytest summary line of ``text`` as {passed: n, skipped: n, ...}."""
    lines = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed)", ln)]
    return {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?)", lines[-1])} \
        if lines else {}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="the folder gpu_check.sh wrote its logs to")
    ap.add_argument("--results", help="append the rows to this JSON-lines results log")
    args = ap.parse_args()
    out = Path(args.out)
    env = environment()
    summary = out / "summary.txt"
    if summary.exists():  # the run's own GPU and commit, when the rows are made elsewhere afterwards
        text = summary.read_text()
        gpu = re.search(r"^(NVIDIA [^,]+),", text, re.M)
        commit = re.search(r"^commit (\S+)", text, re.M)
        torch_version = re.search(r"^torch (\S+)", text, re.M)
        env.update({k: m.group(1) for k, m in (("gpu", gpu), ("commit", commit), ("torch", torch_version)) if m})
        for k in ("host_cpus", "cpu", "cuda", "triton"):  # this machine's, not the run's
            env.pop(k, None)
    rows = []
    tests = out / "tests.log"
    if tests.exists():
        rows.append(dict(env, bench="gpu_check", case="pytest", provider="pyloader", gbps=None, ceiling_gbps=None,
                         **counts(tests.read_text())))
    sanitize = out / "sanitize.log"
    if sanitize.exists():
        for tool, body in re.findall(r"^===== (\w+)\n(.*?)(?=^===== \w+\n|\Z)", sanitize.read_text(), re.M | re.S):
            errors = re.findall(r"(?:ERROR SUMMARY: (\d+) error|RACECHECK SUMMARY: (\d+) hazard)", body)
            found = sum(int(a or b) for a, b in errors) if errors else None
            rows.append(dict(env, bench="gpu_check", case=f"compute-sanitizer {tool}", provider="pyloader",
                             gbps=None, ceiling_gbps=None, sanitizer_errors=found, **counts(body)))
    for r in rows:
        print({k: v for k, v in r.items() if k in ("case", "passed", "skipped", "failed", "sanitizer_errors")})
    write_rows(rows, args.results)


if __name__ == "__main__":
    main()
