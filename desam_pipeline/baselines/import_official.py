"""`desam_import_official CKPT --mode {grid,box} -d DATASET --source SITE`: a model trained by the DeSAM
reference code, as a desam model folder.

The reference scripts save `model.state_dict()` of the whole SAM: `image_encoder.*` (frozen),
`prompt_encoder.*` (frozen), and `mask_decoder.*`, SAM's decoder with the PDMM under `mask_decoder.pimm.*`.
Its PRIM and PDMM weights are mapped by name onto desam's DeSAM with the `reference` PDMM layout, strictly:
every key of the file is either loaded or one of the parts the reference's forward pass never uses, and
anything else is a one-line error. The fold is written as desam_train writes one (plan files, and a
checkpoint_final.pth without training state), with `imported_from.json` naming the file and its sha256,
so desam_predict, desam_evaluate and desam_report work on it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from desam_pipeline.data.plan_io import load_plan, plan_hash
from desam_pipeline.data.prompts import MODES
from desam_pipeline.data.splits import parse_fold
from desam_pipeline.io.atomic import write_json
from desam_pipeline.io.nifti_io import file_sha256
from desam_pipeline.io.results_layout import CHECKPOINT_FINAL, IMPORT_RECORD, Checkpoint, model_folder_name
from desam_pipeline.network import DeSAM, encoders, sam_models
from desam_pipeline.network.pdmm import PDMM, SEResBlock
from desam_pipeline.network.prim import UNUSED_DECODER_PARTS
from desam_pipeline.training.train import find_plans_name
from desam_pipeline.training.fold_files import copy_plan_files
from desam_pipeline.utilities.errors import DesamError, cli_entry
from desam_pipeline.utilities.paths import Trees, add_root_arguments

DEFAULT_TRAINER_NAME = "DeSAMOfficial"
PIMM = "mask_decoder.pimm."
# desam SEResBlock parameter -> the reference's UnetResSEBlock parameter (MONAI convolutions are `<name>.conv`).
BLOCK_NAMES = {"conv1.weight": "conv1.conv.weight", "conv2.weight": "conv2.conv.weight",
               "se.gate.0.weight": "se.fc.0.weight", "se.gate.2.weight": "se.fc.2.weight",
               "residual.0.weight": "conv3.conv.weight"}
UNUSED_REASONS = {
    "image_encoder.": "the frozen image encoder (desam uses the plan's encoder features; compared with the "
                      "plan's SAM checkpoint)",
    **{f"mask_decoder.{part}.": "SAM's mask head, not in the reference's forward pass"
       for part in UNUSED_DECODER_PARTS},
    PIMM + "seg_outputs.0.": "the first up-block's head, returned only with deep supervision (off in the scripts)",
}


def _block(ours: str, theirs: str, block: SEResBlock) -> dict[str, str]:
    return {f"{ours}.{name}": f"{theirs}.{BLOCK_NAMES[name]}" for name in block.state_dict()}


def pdmm_key_map(pdmm: PDMM) -> dict[str, str]:
    """desam PDMM state key -> the reference's key under `mask_decoder.pimm.` (reference layout only).

    The reference's context branch d (0 deep, 1 middle, 2 shallow) is `block_init` then, per x2
    up-sampling i, `residual_block.i.0` (transposed convolution) and `residual_block.i.1`.
    """
    mapping: dict[str, str] = {}
    for d, name in enumerate(("deep", "middle", "shallow")):
        branch = getattr(pdmm, name)
        parts = [branch] if isinstance(branch, SEResBlock) else list(branch)
        mapping.update(_block(name if len(parts) == 1 else f"{name}.0", f"conv_blocks_context.{d}.block_init",
                              parts[0]))
        for i in range((len(parts) - 1) // 2):
            theirs = f"conv_blocks_context.{d}.residual_block.{i}"
            mapping[f"{name}.{2 * i + 1}.weight"] = f"{theirs}.0.conv.weight"
            mapping.update(_block(f"{name}.{2 * i + 2}", f"{theirs}.1", parts[2 * i + 2]))
    mapping.update(_block("bottleneck", "mask_embedding_fusion", pdmm.bottleneck))
    for u, (up, decoder) in enumerate(((pdmm.up1, pdmm.decoder1), (pdmm.up2, pdmm.decoder2))):
        mapping[f"up{u + 1}.weight"] = f"conv_blocks_localization.{u}.transp_conv.conv.weight"
        mapping.update(_block(f"decoder{u + 1}", f"conv_blocks_localization.{u}.res_block", decoder))
    mapping["head.weight"] = "seg_outputs.1.weight"
    return {f"pdmm.{k}": PIMM + v for k, v in mapping.items()}


def unused_reason(key: str, state: dict[str, torch.Tensor]) -> str | None:
    """Why the reference's forward pass never uses `key`, or None if it does."""
    for prefix, reason in UNUSED_REASONS.items():
        if key.startswith(prefix):
            return reason
    if key.startswith(PIMM) and key.endswith(".conv3.conv.weight"):
        conv1 = state.get(key[:-len("conv3.conv.weight")] + "conv1.conv.weight")
        if conv1 is not None and conv1.shape[0] == conv1.shape[1]:
            return "the 1x1 residual convolution of a block whose channels do not change (built, never used)"
    return None


def convert(path: Path, state: dict[str, torch.Tensor], plan: dict) -> tuple[DeSAM, dict[str, int]]:
    """DeSAM (reference PDMM layout) for the plan's encoder and taps with the file's PRIM and PDMM weights,
    and the number of unused keys per reason; a key neither used nor explained is a one-line error."""
    encoder = plan["encoder"]
    found = encoders.detect_encoder(state, path)
    if found != encoder:
        raise DesamError(f"{path}: its image encoder is {found}, but the plan's is {encoder}")
    net = DeSAM.for_encoder(encoder, plan["tap_shapes"], pdmm="reference")
    sam_models.load_submodule(net.prim.prompt_encoder, state, "prompt_encoder", path, encoder)
    decoder = {k: v for k, v in state.items() if not k.startswith(PIMM)}
    sam_models.load_submodule(net.prim.mask_decoder, decoder, "mask_decoder", path, encoder,
                              optional=UNUSED_DECODER_PARTS)
    mapping = pdmm_key_map(net.pdmm)
    own = net.state_dict()
    absent = [theirs for theirs in mapping.values() if theirs not in state]
    wrong = [f"{theirs} {tuple(state[theirs].shape)} vs {tuple(own[ours].shape)}" for ours, theirs in mapping.items()
             if theirs in state and state[theirs].shape != own[ours].shape]
    if absent or wrong:
        first = (wrong or absent)[0]
        raise DesamError(f"{path}: its PDMM does not fit encoder {encoder} with taps {plan['tap_shapes']} "
                         f"({len(wrong)} mis-shaped, {len(absent)} missing; first: {first})")
    own.update({ours: state[theirs] for ours, theirs in mapping.items()})
    net.load_state_dict(own)
    used = set(mapping.values()) | {k for k in state if k.startswith(("prompt_encoder.", "mask_decoder."))
                                    and not k.startswith(PIMM) and unused_reason(k, state) is None}
    unused: dict[str, int] = {}
    for key in state:
        if key in used:
            continue
        reason = unused_reason(key, state)
        if reason is None:
            raise DesamError(f"{path}: key {key} is neither a PRIM/PDMM weight desam maps nor a part the reference "
                             f"never uses; not a checkpoint of the DeSAM reference code for {encoder}?")
        unused[reason] = unused.get(reason, 0) + 1
    return net, unused


def check_image_encoder(path: Path, state: dict[str, torch.Tensor], plan: dict) -> bool:
    """The file's frozen image encoder is the plan's SAM checkpoint's (the features PDMM was trained on).

    False when the plan's checkpoint is not on this machine (nothing to compare with)."""
    sam_path = Path(plan["checkpoint"])
    if not sam_path.is_file():
        return False
    sam = encoders.read_encoder_state(sam_path, plan["encoder"])
    ours = {k for k in state if k.startswith("image_encoder.")}
    theirs = {k for k in sam if k.startswith("image_encoder.")}
    differ = sorted(k for k in ours & theirs if not torch.equal(state[k], sam[k]))
    if ours != theirs or differ:
        first = (differ or sorted(ours ^ theirs))[0]
        raise DesamError(f"{path}: its image encoder is not the plan's SAM checkpoint {sam_path} (first difference: "
                         f"{first}); the model was trained on other features; plan and embed with that SAM first")
    return True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="desam_import_official",
        description="Turn a checkpoint saved by the DeSAM reference training scripts (desam_model_best.pth) into a "
                    "desam model folder for desam_predict, desam_evaluate and desam_report.")
    parser.add_argument("checkpoint", metavar="CKPT", help="the reference's saved state dict (the whole SAM)")
    parser.add_argument("--mode", choices=MODES, required=True,
                        help="grid: trained by desam_train_gridpoints.py; box: by desam_train_wholebox.py")
    parser.add_argument("-d", "--dataset", required=True, help="dataset number or DatasetNNN_Name (planned and "
                                                               "embedded with the SAM the model was trained on)")
    parser.add_argument("--source", nargs="+", metavar="SITE", required=True,
                        help="the site(s) the model was trained on (names the model folder)")
    parser.add_argument("--plans-name", default=None, help="the plan (default: the dataset's only plan)")
    parser.add_argument("--fold", default="all",
                        help="the fold folder to write, 0-4 or 'all' (default all: the reference split its cases "
                             "its own way, so no desam fold's held-out cases are known to be unseen by the model)")
    parser.add_argument("-tr", "--trainer", default=DEFAULT_TRAINER_NAME, metavar="NAME",
                        help=f"the trainer part of the model folder name (default {DEFAULT_TRAINER_NAME}; pass it "
                             "as -tr to desam_predict, desam_evaluate and desam_report)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint of that fold")
    add_root_arguments(parser, "preprocessed", "results")
    return parser


def import_official(args: argparse.Namespace) -> Path:
    """Write the fold; returns the model folder."""
    trees = Trees(args.dataset, preprocessed=args.preprocessed, results=args.results)
    if not trees.preprocessed.is_dir():
        raise DesamError(f"{trees.preprocessed}: not found; run desam_plan_and_embed -d {args.dataset} first")
    if not args.trainer.isidentifier():
        raise DesamError(f"-tr {args.trainer!r}: a model folder's trainer part must be an identifier")
    plans_name = find_plans_name(trees.preprocessed, args.plans_name)
    plan = load_plan(trees.preprocessed, plans_name)
    fold = parse_fold(args.fold)
    sources = sorted(set(args.source))
    model_dir = trees.results / model_folder_name(args.trainer, plans_name, args.mode, sources)
    target = model_dir / f"fold_{fold}" / CHECKPOINT_FINAL
    if target.exists() and not args.overwrite:
        raise DesamError(f"{target}: exists; pass --overwrite to replace it")
    path = Path(args.checkpoint)
    state = sam_models.read_state_dict(path)
    net, unused = convert(path, state, plan)
    compared = check_image_encoder(path, state, plan)
    record = {"imported_from": str(path.resolve()), "sha256": file_sha256(path), "mode": args.mode,
              "encoder": plan["encoder"], "pdmm": "reference", "image_encoder_checked": compared,
              "unused_keys": unused, "command": sys.argv}
    config = {"trainer": args.trainer, "plans_name": plans_name, "fold": fold, "sources": sources,
              "mode": args.mode, "pdmm": "reference", "imported": record}
    copy_plan_files(trees.preprocessed, plans_name, model_dir)
    write_json(record, target.parent / IMPORT_RECORD)
    Checkpoint(network=net.inference_state_dict(),
               network_config={"network": type(net).__name__, **net.config, "encoder": plan["encoder"],
                               "mode": args.mode},
               config=config, plan_sha256=plan_hash(plan)).save(target)
    if not compared:
        print(f"desam_import_official: note: the plan's SAM checkpoint {plan['checkpoint']} is not here, so the "
              "file's image encoder was not compared with it", file=sys.stderr)
    print(f"desam_import_official: {path} -> {target} ({sum(unused.values())} unused keys: "
          + "; ".join(f"{n} {reason}" for reason, n in unused.items()) + ")")
    return model_dir


@cli_entry
def main(argv: list[str] | None = None) -> int:
    import_official(build_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    main()
