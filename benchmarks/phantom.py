"""`python -m benchmarks.phantom`: time the default phantom (6 sites x 4 cases) and its conversion.

Also prints the per-site size figures that drive the demo's SAM cost: slices per volume and slices
holding prostate (embedding with the default "foreground_margin" plan encodes about the latter
plus 2 x 2 margin slices; full-volume prediction encodes all slices). Target: generation under ~20 s.
Last line: one JSON object of figures.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import pandas as pd

from dataset_conversion.convert_prostate_multisite import convert_prostate_multisite
from dataset_conversion.make_phantom import DEFAULT_CASES_PER_SITE, make_phantom


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        source = make_phantom(Path(tmp) / "phantom", DEFAULT_CASES_PER_SITE, seed=0)
        generate_s = time.perf_counter() - start
        start = time.perf_counter()
        convert_prostate_multisite(source, Path(tmp) / "raw")
        convert_s = time.perf_counter() - start
        cases = json.loads((source / "phantom.json").read_text(encoding="utf-8"))["cases"]
    table = pd.DataFrame(cases.values())
    table["slices"] = table["shape"].map(lambda shape: shape[2])
    per_site = table.groupby("site", sort=False).agg(
        cases=("case", "count"), slices=("slices", "sum"), prostate_slices=("prostate_slices", "sum"),
        prostate_ml=("prostate_ml", "mean"))
    print(per_site.round(1).to_string())
    figures = {
        "phantom_generate_s": round(generate_s, 2), "phantom_convert_and_verify_s": round(convert_s, 2),
        "phantom_cases": int(len(table)), "phantom_slices": int(table["slices"].sum()),
        "phantom_prostate_slices": int(table["prostate_slices"].sum()),
    }
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
