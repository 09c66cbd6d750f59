"""`make bench`: run every benchmark script as its own process and print one table of figures.

Each benchmark prints, as its last line, one JSON object of figures; this collects them, then prints the
ratios the performance goals (issue #23) are stated in, each with its target and whether it is met.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pandas as pd

BENCHMARKS = ("benchmarks.phantom", "benchmarks.embed", "benchmarks.train", "benchmarks.grid_iou", "benchmarks.predict",
              "benchmarks.hd95")
# (benchmark, figure, "<=" or ">=", target, what it says); the ratios are paired runs of one benchmark process.
GOALS = (
    ("predict", "reference_vs_top1_all_points_wall", "<=", 1.2, "reference grid rule / top1, every point accepted"),
    ("predict", "box_vs_bare_wall", "<=", 1.10, "desam_predict box / bare encoder forward"),
    ("predict", "grid_vs_bare_wall", "<=", 1.20, "desam_predict grid (default rule) / bare encoder forward"),
    ("predict", "encoder_speedup_vs_torch_wall", ">=", 1.5, "encoder forward speed-up over torch eager fp32"),
    ("train", "vit_b_data_wait_fraction", "<=", 0.10, "training data wait / step, vit_b features"),
    ("train", "vit_h_data_wait_fraction", "<=", 0.10, "training data wait / step, vit_h features"),
)


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


def goal_lines(rows: list[dict]) -> list[str]:
    """One line per goal whose figure was measured: the ratio, the target and whether it is met."""
    figures = {(row["benchmark"], row["figure"]): row["value"] for row in rows}
    lines = []
    for benchmark, figure, sense, target, text in GOALS:
        value = figures.get((benchmark, figure))
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        met = value <= target if sense == "<=" else value >= target
        lines.append(f"{text}: {value:.3f} (goal {sense} {target}) {'met' if met else 'NOT met'}")
    return lines


def main() -> int:
    rows = []
    for module in BENCHMARKS:
        print(f"running {module} ...", flush=True)
        for name, value in run_benchmark(module).items():
            rows.append({"benchmark": module.split(".")[-1], "figure": name, "value": value})
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    print("\ngoals (issue #23; the encoder speed-up is measured where desam_predict runs another runtime):")
    print("\n".join(goal_lines(rows)) or "none measured")
    return int(any(row["figure"] == "error" for row in rows))


if __name__ == "__main__":
    sys.exit(main())
