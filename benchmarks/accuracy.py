"""`make bench-accuracy`: single-source generalisation on the seeded phantom, DeSAM against its baselines.

    python -m benchmarks.accuracy [--out bench_accuracy] [--encoder litemedsam] [--arms NAME ...] [--miniature]

Source RUNMC, fold 0. Stages run in this process through their `main(argv)` (as `make demo` does):
phantom -> convert -> ONE plan and embedding cache -> per arm: train (or reuse) -> `desam_evaluate` under
both protocols (full, paper) -> one table (OUT/accuracy.csv, .md, .png), printed with a comparison paragraph
written from the numbers. Arms (benchmarks/accuracy_arms.py): zero-shot SAM box/grid, coupled fine-tuning
box/grid, DeSAM-B, DeSAM-P x --seeds, --loss reference, --checkpoint-name best and --grid-rule reference
(prediction only, on DeSAM-P seed 0's model), augmented views, nnU-Net v2 (shortened schedule, stated in the
table), and the reference PDMM layout (`desam_train --pdmm reference`).

One cache serves every arm. The plan caches every slice (`--slices all`), so predicting any slice of an
unseen volume reads the cache (the predictor's CacheIndex finds a case by shape, affine and identical
preprocessed slices) instead of running the encoder again per arm. It also caches --views augmented views of
the RUNMC slices: views change the plan's hash, so a second plan for the views arm would need every unseen
site embedded again; instead every other arm trains with `desam_train --no-augmented-views` (the originals
only). Every arm trains with desam_train's defaults unless its row says otherwise: every slice of the source
volumes (`--train-slices all`), the batch Dice loss and balanced clicks (`--loss batch --sampling balanced`),
so PDMM and the IoU gate learn the empty slices a user's volume has; `--train-slices foreground_margin`
reproduces the earlier runs, which trained on the gland and 2 slices either side. Every trained arm trains
PRIM at 0.1 x lr (`desam_train --prim-lr-scale 0.1`, as `make demo`: the paper's 1e-4 beside PDMM's 1e-3; a
coupled arm's whole decoder is its PRIM); `--prim-lr-scale 1` reproduces the runs before 2026-12-08, one
rate for everything.

Resumable: phantom, conversion and embedding reuse their output; an arm with OUT/results/<arm>/done.json
(its wall time) is skipped; an interrupted arm resumes its training (-c) and reuses saved predictions.

Sizing (budget: 90 min on 2 cores with litemedsam). Measured on 2 quiet cores (2026-11-30, the defaults):
litemedsam encodes 0.62 s per slice (433 slices plus 2 views of RUNMC's 57: 340 s); a DeSAM training epoch
of 10 steps at batch 4 plus its validation takes about 25 s; a DeSAM arm predicts and scores its ~395 slices
in about 220 s (0.55 s per slice, both protocols), SAM's own decoder (coupled, zero-shot) in about a third
of that, the reference grid rule (PDMM per accepted point) in 560 s; nnU-Net's 1-epoch schedule took 370 s
with its start-ups. The whole default run took 63 min. The run prints an estimate from the real slice counts
before embedding; if the machine is slower, --epochs 4 or --cases-per-site 2 is the lever (fold 0 then
trains on one RUNMC case).
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from datetime import datetime
from pathlib import Path

import nibabel as nib

from benchmarks import accuracy_table
from benchmarks.accuracy_arms import (SOURCE, Arm, Context, arm_table, describe, model_folder, run_arm, score_arm,
                                     scored_with_detection)
from dataset_conversion import convert_prostate_multisite, make_phantom
from desam_pipeline.baselines.external_predictions import read_record
from desam_pipeline.data.raw_dataset import domains, image_path, list_cases, load_dataset_json
from desam_pipeline.data.slice_selection import SLICE_MODES
from desam_pipeline.io.atomic import read_json, write_json
from desam_pipeline.network.encoders import ENCODERS
from desam_pipeline.training.settings import TrainingSettings
from desam_pipeline.utilities.errors import DesamError, cli_entry
from desam_pipeline.utilities.paths import dataset_name
from evaluation.demo import run as run_stage
from plans import plan_and_embed

DATASET_ID = 1
DATASET = dataset_name(DATASET_ID, convert_prostate_multisite.DEFAULT_NAME)
DEFAULTS = {"out": "bench_accuracy", "encoder": "litemedsam", "sites": list(make_phantom.SITE_ORDER),
            "cases_per_site": 3, "phantom_seed": 0, "epochs": 5, "batch_size": 4, "lr": "1e-3", "grid": 5,
            "seeds": 3, "views": 2, "nnunet_trainer": "nnUNetTrainer_1epoch", "train_slices": "all",
            "prim_lr_scale": 0.1}
MINIATURE = {"out": "bench_accuracy_miniature", "encoder": "tiny", "sites": [SOURCE, "BMC"], "cases_per_site": 2,
             "epochs": 1, "grid": 3, "seeds": 2, "views": 1}
# Seconds on 2 quiet cores: per encoded slice, per DeSAM training step at batch 4, per slice predicted by a
# DeSAM decoder (SAM's own decoder, coupled or zero-shot: about a fifth), the nnU-Net arm as a whole.
COSTS = {"litemedsam": {"encode": 0.62, "step": 2.0, "decode": 0.55},
         "tiny": {"encode": 0.12, "step": 4.0, "decode": 0.4}}
NNUNET_S = 370
# What a benchmark.json written before a setting existed ran with.
LEGACY_SETTINGS = {"train_slices": "all", "prim_lr_scale": 1.0}
SETTINGS = ("encoder", "sites", "cases_per_site", "phantom_seed", "epochs", "batch_size", "lr", "grid", "views",
            "nnunet_trainer", "sam_checkpoint", "train_slices", "prim_lr_scale")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__.splitlines()[0])
    parser.add_argument("--out", help=f"output folder (default {DEFAULTS['out']})")
    parser.add_argument("--encoder", choices=ENCODERS, help="SAM encoder (default litemedsam)")
    parser.add_argument("--sam-checkpoint", help="the encoder's SAM .pth when the plan needs one")
    parser.add_argument("--sites", nargs="+", choices=make_phantom.SITE_ORDER, help="phantom sites (default all six)")
    parser.add_argument("--cases-per-site", type=int)
    parser.add_argument("--phantom-seed", type=int, help="seed of the phantom (default 0)")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", help="initial learning rate (default 1e-3, 10x the paper's, for the short schedule)")
    parser.add_argument("--grid", type=int, help="grid mode: K x K points per slice at prediction (default 5)")
    parser.add_argument("--seeds", type=int, help="DeSAM-P seeds (default 3; the spread needs at least 2)")
    parser.add_argument("--views", type=int, help="augmented views of the RUNMC slices (default 2)")
    parser.add_argument("--nnunet-trainer", help="nnU-Net trainer class (default nnUNetTrainer_1epoch)")
    parser.add_argument("--train-slices", choices=SLICE_MODES,
                        help="desam_train --train-slices for every trained arm (default all: every slice of the "
                             "source volumes; foreground_margin: the gland and 2 slices either side, as earlier runs)")
    parser.add_argument("--prim-lr-scale", type=float, metavar="S",
                        help="desam_train --prim-lr-scale for every trained arm: PRIM's (SAM's decoder's) learning "
                             "rate as a multiple of --lr (default 0.1, as make demo; 1: one rate, as runs before "
                             "2026-12-08)")
    parser.add_argument("--arms", nargs="+", metavar="ARM", help="run only these arms (default: every arm)")
    parser.add_argument("--miniature", action="store_true",
                        help="tiny encoder, RUNMC + BMC x 2 cases, 1 epoch, 3 x 3 grid, 2 seeds, 1 view (CI)")
    return parser


def resolve_settings(args: argparse.Namespace) -> dict:
    """Defaults, then the miniature preset, then the flags given."""
    given = {k: v for k, v in vars(args).items() if v is not None and k not in ("miniature",)}
    settings = {**DEFAULTS, **(MINIATURE if args.miniature else {}), **given}
    settings.setdefault("sam_checkpoint", None)
    if SOURCE not in settings["sites"] or len(settings["sites"]) < 2:
        raise DesamError(f"--sites must include the source {SOURCE} and at least one unseen site")
    if settings["seeds"] < 1 or settings["cases_per_site"] < 2 or settings["epochs"] < 1:
        raise DesamError("--seeds and --epochs must be >= 1 and --cases-per-site >= 2 (fold 0 holds one out)")
    TrainingSettings(prim_lr_scale=settings["prim_lr_scale"]).validate()  # desam_train's check, before anything is made
    return settings


def check_same_settings(out: Path, settings: dict) -> None:
    """OUT keeps one configuration: a rerun with other settings would mix results, so it is refused."""
    wanted = {key: settings[key] for key in SETTINGS}
    record = out / "benchmark.json"
    if record.is_file():
        saved = read_json(record)
        changed = [f"{k}: {saved.get(k, LEGACY_SETTINGS.get(k))!r} -> {v!r}" for k, v in wanted.items()
                   if saved.get(k, LEGACY_SETTINGS.get(k)) != v]
        if changed:
            raise DesamError(f"{record}: {out} was run with other settings ({'; '.join(changed)}); "
                             f"use another --out")
    else:
        out.mkdir(parents=True, exist_ok=True)
        write_json(wanted, record)


def prepare_raw(ctx: Context, settings: dict) -> None:
    """The phantom and its conversion (reused when present)."""
    phantom = ctx.out / "phantom"
    if not (phantom / "phantom.json").is_file():
        run_stage(make_phantom.main, "desam_make_phantom",
                  [str(phantom), "--cases-per-site", str(settings["cases_per_site"]), "--seed",
                   str(settings["phantom_seed"]), "--sites", *settings["sites"], "--overwrite"])
    if not (ctx.raw / DATASET / "dataset.json").is_file():
        run_stage(convert_prostate_multisite.main, "desam_convert_prostate_multisite",
                  [str(phantom), "-d", str(DATASET_ID), "--raw", str(ctx.raw)])


def embed(ctx: Context, settings: dict) -> float:
    """The one plan and embedding cache (reused when done); returns its wall time."""
    record = ctx.out / "embedding_done.json"
    if record.is_file():
        return float(read_json(record)["wall_s"])
    start = time.perf_counter()
    common = ["-d", str(DATASET_ID), "--encoder", settings["encoder"], "--plans-name", ctx.plans_name,
              "--slices", "all", "--raw", str(ctx.raw), "--preprocessed", str(ctx.preprocessed),
              *(["--checkpoint", settings["sam_checkpoint"]] if settings["sam_checkpoint"] else [])]
    run_stage(plan_and_embed.main, "desam_plan_and_embed",
              [*common, "--domains", SOURCE, "--augmented-views", str(settings["views"])])
    unseen = [site for site in settings["sites"] if site != SOURCE]
    run_stage(plan_and_embed.main, "desam_plan_and_embed", [*common, "--domains", *unseen])
    wall = time.perf_counter() - start
    write_json({"wall_s": wall}, record)
    return wall


def slice_counts(raw: Path) -> dict[str, int]:
    """Slices per site of the raw dataset (from the NIfTI headers)."""
    dataset_json = load_dataset_json(raw)
    sites, counts = domains(dataset_json), {}
    for case in list_cases(raw, dataset_json):
        depth = nib.load(image_path(raw, case, dataset_json)).shape[2]
        counts[sites[case]] = counts.get(sites[case], 0) + int(depth)
    return counts


def estimate(arms: list[Arm], counts: dict[str, int], settings: dict) -> str:
    """A sizing note from the real slice counts and COSTS (the encoder's, else litemedsam's)."""
    cost = COSTS.get(settings["encoder"], COSTS["litemedsam"])
    source, total = counts[SOURCE], sum(counts.values())
    folds = min(5, settings["cases_per_site"])
    steps = math.ceil(source * (1 - 1 / folds) / settings["batch_size"])
    predicted = total - source + source / folds
    embed = (total + settings["views"] * source) * cost["encode"]
    trained = [a for a in arms if a.trainer not in (None, "ZeroShotSAMTrainer") and a.base is None]
    weight = {True: 0.3, False: 1.0}  # SAM's own decoder trains and predicts at a fraction of PDMM's cost
    per_epoch = steps * cost["step"] + source / folds * cost["decode"]  # training steps + validation
    train_s = sum(weight[a.trainer == "CoupledSAMTrainer"] for a in trained) * settings["epochs"] * per_epoch
    predict_s = sum(weight[a.trainer in ("CoupledSAMTrainer", "ZeroShotSAMTrainer")]
                    for a in arms if a.trainer) * predicted * cost["decode"]
    nnunet_s = NNUNET_S if any(a.trainer is None for a in arms) else 0
    whole = embed + train_s + predict_s + nnunet_s
    return (f"estimate ({settings['encoder']}, 2 quiet cores): {total} slices ({source} RUNMC, "
            f"{settings['views']} views), embedding ~{embed / 60:.0f} min; {len(trained)} trainings x "
            f"{settings['epochs']} epochs x {steps} steps ~{train_s / 60:.0f} min; {len(arms)} arms predicting "
            f"~{predicted:.0f} slices each ~{predict_s / 60:.0f} min; nnU-Net ~{nnunet_s / 60:.0f} min; "
            f"total ~{whole / 60:.0f} min plus scoring")


def select_arms(settings: dict, names: list[str] | None) -> tuple[list[Arm], dict[str, Arm]]:
    table = arm_table(settings["seeds"])
    by_name = {arm.name: arm for arm in table}
    unknown = [n for n in names or [] if n not in by_name]
    if unknown:
        raise DesamError(f"unknown arm(s) {', '.join(unknown)}; arms: {', '.join(by_name)}")
    chosen = [a for a in table if not names or a.name in names]
    return chosen, by_name


def arm_note(arm: Arm, ctx: Context) -> str:
    """The arm's note; nnU-Net's states its shortened schedule from its record."""
    if arm.trainer is None:
        return read_record(model_folder(arm, ctx))["description"]
    return arm.note


def run_arms(arms: list[Arm], by_name: dict[str, Arm], ctx: Context) -> None:
    """Each arm not done yet: train/predict/score, then its done-record with the wall time."""
    for number, arm in enumerate(arms, 1):
        record = ctx.results(arm) / "done.json"
        if record.is_file():
            print(f"[{number}/{len(arms)}] {arm.name}: done earlier in {read_json(record)['wall_s']:.0f} s, "
                  f"skipped", flush=True)
            continue
        print(f"\n[{number}/{len(arms)}] {arm.name} ({arm.label}): {describe(arm, ctx)}", flush=True)
        start = time.perf_counter()
        run_arm(arm, ctx, by_name)
        wall = time.perf_counter() - start
        write_json({"arm": arm.name, "label": arm.label, "wall_s": wall, "stages": describe(arm, ctx)}, record)
        print(f"[{number}/{len(arms)}] {arm.name} finished in {wall:.0f} s", flush=True)


def collect(table_arms: list[Arm], ctx: Context) -> list[dict]:
    """Rows of every arm with a done-record (earlier --arms subsets included); an arm scored before slice
    detection existed is scored again first (its saved predictions are reused)."""
    rows = []
    for arm in table_arms:
        record = ctx.results(arm) / "done.json"
        if record.is_file():
            if not scored_with_detection(arm, ctx):
                print(f"{arm.name}: scored before slice detection; scoring its saved predictions again", flush=True)
                score_arm(arm, ctx)
            arm = Arm(**{**arm.__dict__, "note": arm_note(arm, ctx)})
            rows += accuracy_table.arm_rows(arm, model_folder(arm, ctx), float(read_json(record)["wall_s"]))
    return rows


def header(settings: dict, embed_s: float, counts: dict[str, int]) -> list[str]:
    return [f"- date {datetime.now():%Y-%m-%d %H:%M}, machine: {platform.machine()} {os.cpu_count()} cores "
            f"({platform.processor() or platform.platform()})",
            f"- encoder {settings['encoder']}; phantom seed {settings['phantom_seed']}, sites "
            f"{', '.join(settings['sites'])}, {settings['cases_per_site']} cases per site, slices per site "
            f"{counts}; source {SOURCE}, fold 0",
            f"- desam schedule: {settings['epochs']} epoch(s), batch {settings['batch_size']}, lr {settings['lr']} "
            f"(PRIM at {settings['prim_lr_scale']} x lr); "
            f"grid {settings['grid']} x {settings['grid']}; {settings['views']} augmented view(s) for the views arm; "
            f"training slices: {settings['train_slices']} (desam_train --train-slices)",
            f"- nnU-Net: {settings['nnunet_trainer']} (shortened schedule; see its note)",
            f"- shared embedding (--slices all): {embed_s:.0f} s, not in the arms' wall times; a prediction-only "
            f"arm's wall time excludes its base arm's training"]


@cli_entry
def main(argv: list[str] | None = None) -> int:
    settings = resolve_settings(build_parser().parse_args(argv))
    out = Path(settings["out"]).resolve()
    check_same_settings(out, settings)
    ctx = Context(out=out, dataset=DATASET, plans_name=f"BenchPlans_{settings['encoder']}", epochs=settings["epochs"],
                  batch_size=settings["batch_size"], lr=str(settings["lr"]), grid=settings["grid"],
                  nnunet_trainer=settings["nnunet_trainer"], sam_checkpoint=settings["sam_checkpoint"],
                  train_slices=settings["train_slices"], prim_lr_scale=str(settings["prim_lr_scale"]),
                  run_stage=run_stage)
    arms, by_name = select_arms(settings, settings.get("arms"))
    start = time.perf_counter()
    prepare_raw(ctx, settings)
    counts = slice_counts(ctx.raw / DATASET)
    print(estimate(arms, counts, settings), flush=True)
    embed_s = embed(ctx, settings)
    run_arms(arms, by_name, ctx)
    table, spread = accuracy_table.build_table(collect(list(by_name.values()), ctx))
    paths = accuracy_table.write_outputs(table, spread, header(settings, embed_s, counts), out)
    print("\n" + paths["md"].read_text(encoding="utf-8"))
    print(f"written: {', '.join(str(p) for p in paths.values())} ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
