"""`make bench`: run every benchmark script as its own process and print one table of figures.

Each benchmark prints, as its last line, one JSON object of figures; this collects them.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pandas as pd

BENCHMARKS = ("benchmarks.phantom", "benchmarks.embed", "benchmarks.train", "benchmarks.grid_iou", "benchmarks.predict",
              "benchmarks.hd95")


def run_benchmark(module: str) -> dict:
    """Run one benchmark module; return its figures (or the error that stopped it)."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", module], capture_output=True, encoding="utf-8")
    elapsed = time.perf_counter() - start
    sys.stderr.write(proc.stderr[-2000:])
    lines = [line for line in proc.stdout.strip().splitlines() if line.strip()]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}"}
    try:
        figures = json.loads(lines[-1])
    except json.JSONDecodeError:
        return {"error": "no JSON figures on the last line"}
    figures["benchmark_wall_s"] = round(elapsed, 1)
    return figures


def main() -> int:
    rows = []
    for module in BENCHMARKS:
        print(f"running {module} ...", flush=True)
        for name, value in run_benchmark(module).items():
            rows.append({"benchmark": module.split(".")[-1], "figure": name, "value": value})
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    return int(any(row["figure"] == "error" for row in rows))


if __name__ == "__main__":
    sys.exit(main())
