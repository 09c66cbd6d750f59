"""Training speed and memory on synthetic caches of vit_b- and vit_h-shaped features (CPU).

`python -m benchmarks.train` writes synthetic preprocessed datasets (a plan, a random SAM
checkpoint of the real size, case folders of random float16 features in the cache layout),
then runs the real DeSAMTrainer in one subprocess per configuration:

- step time at batch 8 with the default precision (bf16 autocast on CPU), and for vit_b also in fp32.
- data wait vs compute: batch-8 training steps with the default 2 loader workers; the time
  blocked on the loader against the time in `train_step` (target: wait <= 10% of a step). The
  first step (worker start-up) is left out and reported apart.
- peak RSS with vit_h features (1280-wide taps) at batch 8, for a cache of 100 and of 1000
  slices: the same training steps, then one sweep of the loader over the whole cache, so every
  slice is read (running the decoder on 1000 slices would take hours on a CPU). Main process and
  loader workers are reported apart; the two caches must agree within 5%.

1000 vit_h slices take about 32 GiB of disk: with too little free space the large cache is
shrunk to what fits, and the figures say so. The last line is one JSON object of figures.
"""
from __future__ import annotations

import argparse
import gc
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DATASET = "Dataset990_TrainBench"
SLICES_PER_CASE = 10
FREE_MARGIN_BYTES = 15 * 2 ** 30
WAIT_TARGET = 0.10
RSS_TOLERANCE = 0.05
WIDTHS = {"vit_b": 768, "vit_h": 1280}


def slice_bytes(width: int) -> int:
    """Bytes of one cached slice: image + label (uint8), neck and three taps (float16)."""
    return 2 * 256 * 256 + 2 * (256 + 3 * width) * 64 * 64


def make_plan(encoder: str, folder: Path) -> dict:
    """A random SAM of the real size saved as the plan's checkpoint (training maps only its decoder)."""
    from desam_pipeline.io.nifti_io import file_sha256
    from desam_pipeline.network.sam_models import build_sam, save_sam_checkpoint
    from plans.planner import make_plan as planner_make_plan
    sam = build_sam(encoder, seed=0)
    checkpoint = save_sam_checkpoint(sam, folder / f"sam_{encoder}_random.pth")
    return planner_make_plan(f"Bench_{encoder}", encoder, checkpoint, file_sha256(checkpoint), sam.image_encoder)


def write_dataset(root: Path, plan: dict, slices: int) -> Path:
    """Preprocessed dataset folder with dataset.json, the plan and `slices` cached slices of random features."""
    from desam_pipeline.data import cache
    from desam_pipeline.data.plan_io import plan_hash
    from desam_pipeline.io.atomic import write_json
    from plans.planner import save_plan
    folder = root / DATASET
    folder.mkdir(parents=True)
    save_plan(plan, folder)
    digest, width = plan_hash(plan), plan["tap_shapes"][0][0]  # a ViT: three taps of one width
    rng = np.random.default_rng(0)
    pool = {"neck": rng.standard_normal((4, 256, 64, 64)).astype(np.float16),
            "tap": rng.standard_normal((4, width, 64, 64)).astype(np.float16)}
    cases = {}
    for c, start in enumerate(range(0, slices, SLICES_PER_CASE)):
        count = min(SLICES_PER_CASE, slices - start)
        case = f"Bench_Case{c:04d}"
        label = np.zeros((count, 256, 256), np.uint8)
        label[:, 64 + c % 32:192, 80:200 - c % 40] = 1
        arrays = {"image": label * 200, "label": label, "neck": pool["neck"][np.arange(count) % 4],
                  **{f"tap{i}": pool["tap"][(np.arange(count) + i) % 4] for i in range(3)}}
        with cache.CaseWriter(cache.cache_dir(folder, plan["plans_name"]), case,
                              {k: (v.shape, v.dtype) for k, v in arrays.items()}) as writer:
            writer.append(arrays)
            writer.commit({"case": case, "domain": "Bench", "z": list(range(count)), "shape": [256, 256, count],
                           "spacing": [1.0, 1.0, 1.0], "affine": np.eye(4).tolist(), "input_sha256": "",
                           "plan_sha256": digest})
        cases[case] = "Bench"
    write_json({"labels": {"background": 0, "target": 1}, "domains": cases}, folder / "dataset.json")
    return folder


def child(config: dict) -> dict:
    """Run in a fresh process: `steps` real training steps, then optionally sweep the rest of the epoch."""
    import torch

    from desam_pipeline.data.slice_data import loader_batches
    from desam_pipeline.training.settings import TrainingSettings
    from desam_pipeline.training.trainer import DeSAMTrainer
    settings = TrainingSettings(mode="grid", epochs=1, batch_size=8, seed=0, device="cpu",
                                precision=config["precision"], num_workers=config["num_workers"])
    trainer = DeSAMTrainer(Path(config["preprocessed"]), Path(config["results"]), config["plans_name"], "all",
                           settings=settings)
    trainer.initialize()
    trainer.on_epoch_start(0)
    waits, computes, swept = [], [], 0
    sweep_start = None
    waited = time.perf_counter()
    for step, batch in enumerate(loader_batches(trainer.train_loader)):
        got = time.perf_counter()
        if step < config["steps"]:
            trainer.train_step(batch)
            waits.append(got - waited)
            computes.append(time.perf_counter() - got)
        elif not config["sweep"]:
            break
        else:
            sweep_start = sweep_start or got
        swept += len(batch["index"])
        waited = time.perf_counter()
    sweep_s = time.perf_counter() - sweep_start if sweep_start else 0.0
    main_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    del trainer, batch
    gc.collect()  # shuts the persistent workers down, so their peak shows in RUSAGE_CHILDREN
    return {"slices_read": swept, "first_wait_s": waits[0], "waits_s": waits[1:],
            "computes_s": computes[1:], "sweep_s": sweep_s, "threads": torch.get_num_threads(),
            "main_peak_rss_mib": main_peak,
            "worker_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def run_child(config: dict) -> dict:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.train", "--child", json.dumps(config)],
                          capture_output=True, encoding="utf-8")
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def wait_fraction(result: dict) -> float:
    wait, compute = sum(result["waits_s"]), sum(result["computes_s"])
    return wait / (wait + compute)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--small", type=int, default=100, help="slices of the small vit_h cache")
    parser.add_argument("--large", type=int, default=1000, help="slices of the large vit_h cache")
    parser.add_argument("--vit-b-slices", type=int, default=40)
    parser.add_argument("--steps", type=int, default=4, help="training steps per run (the first is warm-up)")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--work", default=None, help="folder for the synthetic data (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0

    work = Path(tempfile.mkdtemp(prefix="desam-train-bench-", dir=args.work))
    figures: dict = {}
    try:
        free = shutil.disk_usage(work).free
        needed = 2 ** 30 * 3 + slice_bytes(768) * args.vit_b_slices + slice_bytes(1280) * (args.small + args.large)
        large = args.large
        if needed > free - FREE_MARGIN_BYTES:
            spare = free - FREE_MARGIN_BYTES - (needed - slice_bytes(1280) * args.large)
            large = max(spare // slice_bytes(1280) // SLICES_PER_CASE * SLICES_PER_CASE, args.small)
            print(f"only {free / 2 ** 30:.0f} GiB free on {work}: large cache shrunk to {large} slices")
        figures["large_cache_slices"] = int(large)
        figures["large_cache_shrunk_for_disk"] = large != args.large
        runs, plans = {}, {}
        for encoder, slices, sweep in (("vit_b", args.vit_b_slices, False), ("vit_h", args.small, True),
                                       ("vit_h", large, True)):
            name = f"{encoder}_{slices}"
            start = time.perf_counter()
            if encoder not in plans:
                (work / encoder).mkdir()
                plans[encoder] = make_plan(encoder, work / encoder)
            plan = plans[encoder]
            preprocessed = write_dataset(work / name, plan, slices)
            print(f"{name}: wrote {slices} slices ({slices * slice_bytes(plan['tap_shapes'][0][0]) / 2 ** 30:.1f} GiB) "
                  f"in {time.perf_counter() - start:.0f} s", flush=True)
            # the default precision (bf16 autocast on CPU) everywhere; vit_b also in fp32 for the step time
            for precision in ("auto", "fp32") if encoder == "vit_b" else ("auto",):
                run = name if precision == "auto" else f"{name}_fp32"
                runs[run] = run_child({"preprocessed": str(preprocessed), "results": str(work / "results" / run),
                                       "plans_name": plan["plans_name"], "num_workers": args.num_workers,
                                       "steps": args.steps, "sweep": sweep, "precision": precision})
                result = runs[run]
                print(f"{run}: step {np.mean(np.add(result['waits_s'], result['computes_s'])):.1f} s "
                      f"(data wait {np.mean(result['waits_s']):.2f} s = {100 * wait_fraction(result):.1f}%, first "
                      f"batch {result['first_wait_s']:.1f} s), {result['slices_read']} slices read, main peak RSS "
                      f"{result['main_peak_rss_mib']:.0f} MiB, workers {result['worker_peak_rss_mib']:.0f} MiB",
                      flush=True)
            shutil.rmtree(preprocessed.parent)
        for encoder, name in (("vit_b", f"vit_b_{args.vit_b_slices}"), ("vit_h", f"vit_h_{args.small}")):
            result = runs[name]
            figures[f"{encoder}_step_s"] = round(float(np.mean(np.add(result["waits_s"], result["computes_s"]))), 2)
            figures[f"{encoder}_data_wait_s"] = round(float(np.mean(result["waits_s"])), 3)
            figures[f"{encoder}_data_wait_fraction"] = round(wait_fraction(result), 4)
            figures[f"{encoder}_first_batch_wait_s"] = round(result["first_wait_s"], 2)
        fp32 = runs[f"vit_b_{args.vit_b_slices}_fp32"]
        figures["vit_b_step_s_fp32"] = round(float(np.mean(np.add(fp32["waits_s"], fp32["computes_s"]))), 2)
        small, big = runs[f"vit_h_{args.small}"], runs[f"vit_h_{large}"]
        for key in ("main_peak_rss_mib", "worker_peak_rss_mib"):
            figures[f"vit_h_{key}_{args.small}"] = round(small[key])
            figures[f"vit_h_{key}_{large}"] = round(big[key])
        growth = big["main_peak_rss_mib"] / small["main_peak_rss_mib"] - 1
        worker_growth = big["worker_peak_rss_mib"] / small["worker_peak_rss_mib"] - 1
        figures["main_rss_growth"] = round(growth, 4)
        figures["worker_rss_growth"] = round(worker_growth, 4)
        figures["loader_sweep_slices_per_s"] = round(big["slices_read"] / max(big["sweep_s"], 1e-9), 1)
        figures["torch_threads"] = small["threads"]
        figures["num_workers"] = args.num_workers
        figures["data_wait_target_met"] = all(figures[f"{e}_data_wait_fraction"] <= WAIT_TARGET for e in WIDTHS)
        figures["rss_within_5_percent"] = abs(growth) <= RSS_TOLERANCE and abs(worker_growth) <= RSS_TOLERANCE
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
