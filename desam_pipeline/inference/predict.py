"""`desam_predict -i IN -o OUT -m MODEL_FOLDER`: segment NIfTI volumes with a trained DeSAM model.

Cases are split over `--num-parts/--part-id`, or over the ranks of `torchrun -m desam_pipeline.inference.predict`;
each case is written by exactly one part. Under torchrun the ranks meet at the end to gather their
results (a gloo group: it only carries the summary) and rank 0 merges quality.csv; separate parts each merge it
under a file lock when they finish, so the last one to finish leaves it complete.

An (X, Y, Z, 1) input is read as the 3D volume it holds and its mask is written as (X, Y, Z); RGB, vector
and complex inputs fail like any other bad case. A run whose outputs would replace one of its input
files stops before writing anything.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from desam_pipeline.data.prompts import MODES
from desam_pipeline.inference import predictor
from desam_pipeline.inference.inputs import CaseInput, discover_inputs
from desam_pipeline.inference.model import load_model
from desam_pipeline.inference.outputs import QUALITY_DIR, merge_quality, output_path
from desam_pipeline.inference.record import write_record
from desam_pipeline.inference.settings import FILE_HANDLING, PredictionSettings
from desam_pipeline.io.atomic import remove_stale_temporaries
from desam_pipeline.io.results_layout import find_model_folder
from desam_pipeline.utilities import distributed
from desam_pipeline.utilities.errors import DesamError, cli_entry
from desam_pipeline.utilities.paths import Trees, add_root_arguments
from desam_pipeline.utilities.runtime import select_device, shard, shard_spec, tune_malloc
from desam_pipeline.utilities.setting_flags import add_setting_flags, settings_from_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="desam_predict", description="Segment NIfTI volumes with a trained DeSAM model folder.")
    add_setting_flags(parser, PredictionSettings, exclude=FILE_HANDLING)
    parser.add_argument("-i", "--input", required=True,
                        help="folder of <case>_0000.nii.gz (nnU-Net naming) or plain .nii.gz files, or one file")
    parser.add_argument("-o", "--output", required=True, help="output folder: <case>.nii.gz, quality.csv")
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("-m", "--model-folder", help="a <Trainer>__<plans>__<mode>__src-<SITES> folder written by "
                                                    "desam_train")
    model.add_argument("-d", "--dataset", help="dataset number or name: its model folder is found in the results tree")
    parser.add_argument("--source", nargs="+", metavar="SITE", default=None,
                        help="with -d: the source site(s) the model was trained on")
    parser.add_argument("--mode", choices=MODES, default=None, help="with -d: the model's mode")
    parser.add_argument("--plans-name", default=None, help="with -d: the model's plan")
    parser.add_argument("-tr", "--trainer", default=None, metavar="NAME",
                        help="with -d: the trainer class that trained the model (default: any)")
    parser.add_argument("-f", "--folds", nargs="+", default=None,
                        help="folds to average (default: every numbered fold with the chosen checkpoint, else 'all')")
    add_setting_flags(parser, PredictionSettings, names=FILE_HANDLING)
    parser.add_argument("--num-parts", type=int, default=None, help="split the cases into this many parts")
    parser.add_argument("--part-id", type=int, default=None, help="the part to predict (0-based)")
    add_root_arguments(parser, "preprocessed", "results")
    return parser


def model_folder(args: argparse.Namespace) -> Path:
    """-m as given, or the single model folder of -d matching --source/--mode/--plans-name/-tr."""
    if args.model_folder:
        given = [flag for flag, value in (("--source", args.source), ("--mode", args.mode),
                                          ("--plans-name", args.plans_name), ("-tr", args.trainer)) if value]
        if given:
            raise DesamError(f"{', '.join(given)} select a model folder with -d; -m names one already")
        return Path(args.model_folder)
    trees = Trees(args.dataset, preprocessed=args.preprocessed, results=args.results)
    return find_model_folder(trees.results, args.source, args.mode, args.plans_name, args.trainer)


def refuse_overwriting_inputs(cases: list[CaseInput], out_dir: Path) -> None:
    """No case's outputs may be one of the input files, however either is spelled (links, `..`, slashes)."""
    inputs = {path.resolve() for case in cases for path in case.files}
    for case in cases:
        for target in (output_path(out_dir, case.case), out_dir / f"{case.case}.npz"):
            if target.resolve() in inputs:
                raise DesamError(f"{target}: the output of case {case.case} would overwrite an input file; "
                                 f"choose another output folder")


def summarise(results: list[predictor.CaseResult], out_dir: Path, part: str) -> int:
    """Print what was done and list the failed cases; the exit code (1 when any case failed)."""
    counts = {s: sum(r.status == s for r in results) for s in ("predicted", "skipped", "failed")}
    slices = sum(r.slices for r in results)
    cached = sum(r.cached_slices for r in results)
    print(f"desam_predict{part}: {counts['predicted']} predicted ({slices} slices, {cached} from the embedding "
          f"cache), {counts['skipped']} skipped (output exists), {counts['failed']} failed -> {out_dir}", flush=True)
    failed = [r for r in results if r.status == "failed"]
    for result in failed:
        print(f"  failed: {result.case}: {result.message}", file=sys.stderr)
    return 1 if failed else 0


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tune_malloc()
    num_parts, part_id = shard_spec(args.num_parts, args.part_id)
    input_path, out_dir = Path(args.input), Path(args.output)
    if out_dir.resolve() == input_path.resolve():
        raise DesamError(f"{out_dir}: the output folder must not be the input folder")
    settings = settings_from_args(PredictionSettings, args).validate()
    device = select_device(settings.device)
    model = load_model(model_folder(args), args.folds, device, settings.checkpoint_name)
    run = predictor.resolve_run(model.plan, settings, device)
    cases = discover_inputs(input_path, model.num_channels)
    refuse_overwriting_inputs(cases, out_dir)
    for folder in (out_dir, out_dir / QUALITY_DIR):
        remove_stale_temporaries(folder)
    engine = predictor.build_predictor(model, run, args.preprocessed)
    mine = shard(cases, num_parts, part_id)
    part = f" part {part_id + 1}/{num_parts}" if num_parts > 1 else ""
    with distributed.process_group() as in_group:
        print(f"desam_predict{part}: {len(mine)} of {len(cases)} cases, model {model.folder.name} ({model.mode} "
              f"mode, folds {', '.join(model.folds)}), {device.type} {run.precision}, batch "
              f"{run.batch_size}, {len(engine.cache_index)} cached cases of the plan", flush=True)
        if not in_group or distributed.rank() == 0:
            write_record(out_dir, model, run)
        results = engine.predict_cases(mine, out_dir, show_progress=not in_group or part_id == 0)
        if not in_group:
            merge_quality(out_dir)
            return summarise(results, out_dir, part)
        results = [r for part_results in distributed.gather(results) for r in part_results]
        if distributed.rank() != 0:
            return int(any(r.status == "failed" for r in results))
        merge_quality(out_dir)
        return summarise(results, out_dir, "")


if __name__ == "__main__":
    main()
