"""DeSAMTrainer: trains PRIM + PDMM on cached SAM features of the source domains, one fold at a time.

One class with plain hooks (on_train_start, on_epoch_start, train_step, validation_step,
on_epoch_end, on_train_end) and override points for subclasses (build_network, build_loss,
build_optimizer, build_data_loaders, validation_settings; `desam_train -tr NAME` picks a subclass by its
class name); every hyper-parameter is in the `TrainingSettings` it is given (`training.settings`). The
final validation is `training.validation`'s. Outputs follow nnU-Net's layout
(`desam_pipeline.io.results_layout`), the model folder named after the trainer class:

    <results>/<Dataset>/<TrainerClass>__<plans>__<mode>__src-<SITES|ALL>/
        plans.json dataset.json dataset_fingerprint.json
        fold_<k>/ checkpoint_{latest,best,final}.pth training_log.txt progress.png debug.json
                  validation/<case>.nii.gz validation/summary.json

Under torchrun the trainer runs DistributedDataParallel: each rank takes batch_size / world_size
slices of every global batch, losses and metrics are all-reduced, and only rank 0 writes.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from desam_pipeline.data import cache, slice_data, splits
from desam_pipeline.data.plan_io import check_structure, load_plan, plan_hash, verify_sam_checkpoint
from desam_pipeline.inference.settings import PredictionSettings
from desam_pipeline.io.atomic import write_json
from desam_pipeline.io.results_layout import CHECKPOINT_BEST, CHECKPOINT_FINAL, CHECKPOINT_LATEST, Checkpoint, \
    class_folder, model_folder_name, source_key, stored_calibration
from desam_pipeline.network import DeSAM, encoders
from desam_pipeline.training import fold_files, validation
from desam_pipeline.training.losses import desam_loss
from desam_pipeline.training.progress_plot import plot_progress
from desam_pipeline.training.schedule import (EMA_MOMENTUM, HISTORY_KEYS, POLY_EXPONENT, epoch_line, epoch_record,
                                              poly_lr, reduce_validation, restored_history, training_precision,
                                              validation_sums)
from desam_pipeline.training.settings import TrainingSettings, resume_differences
from desam_pipeline.utilities import distributed
from desam_pipeline.utilities.errors import DesamError
from desam_pipeline.utilities.reproducibility import compute, rng_state, seed_everything, set_rng_state, versions
from desam_pipeline.utilities.runtime import autocast, select_device


class DeSAMTrainer:
    """Train and validate DeSAM for one fold of one source selection from a plan's embedding cache."""

    MIN_EPOCHS = 1

    def __init__(self, preprocessed_dir: Path, results_dir: Path, plans_name: str, fold: int | str,
                 sources: list[str] | None = None, settings: TrainingSettings | None = None):
        self.settings = (settings or TrainingSettings()).validate(self.MIN_EPOCHS)
        self.preprocessed_dir = Path(preprocessed_dir)
        self.plans_name = plans_name
        self.fold = splits.parse_fold(fold)
        self.sources = sorted(set(sources)) if sources else None
        self.mode = self.settings.mode
        self.loss_weights = self.settings.resolved_loss_weights()
        self.distributed = distributed.in_group()
        self.world_size = dist.get_world_size() if self.distributed else 1
        self.rank = distributed.rank()
        self.local_batch_size = self.settings.local_batch_size(self.world_size)
        self.device = select_device(self.settings.device)
        self.precision = training_precision(self.settings.precision, self.device)
        self.model_dir = Path(results_dir) / model_folder_name(type(self).__name__, plans_name, self.mode, self.sources)
        if self.settings.label is not None:  # one structure of several: its own model folder inside
            self.model_dir = class_folder(self.model_dir, self.settings.label)
        self.fold_dir = self.model_dir / f"fold_{self.fold}"
        self.history: dict[str, list[float]] = {k: [] for k in HISTORY_KEYS}
        self.best_ema = -math.inf
        self.start_epoch, self.finished = 0, False  # finished: resumed from checkpoint_final.pth, nothing to train
        self._initialized = False

    # ---------------------------------------------------------------- set-up
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def print(self, text: str) -> None:
        if self.is_main:
            tqdm.write(text, file=sys.stdout)

    def config(self) -> dict:
        """Every hyper-parameter of the run, as resolved (debug.json, checkpoints, resume checks)."""
        return {"trainer": type(self).__name__, "plans_name": self.plans_name, "fold": self.fold,
                "sources": self.sources, **dataclasses.asdict(self.settings),
                "loss_weights": list(self.loss_weights), "device": str(self.device), "precision": self.precision,
                "local_batch_size": self.local_batch_size, "world_size": self.world_size,
                "lr_schedule": f"poly {POLY_EXPONENT} per epoch", "optimizer": "Adam",
                "dice_ema_momentum": EMA_MOMENTUM, "split_seed": splits.SPLIT_SEED}

    def initialize(self) -> None:
        """Plan, split, cache check, data loaders, network, optimizer; never the image encoder."""
        if self._initialized:
            return
        self.plan = load_plan(self.preprocessed_dir, self.plans_name)
        self.plan_sha256, self.cache_dir = plan_hash(self.plan), cache.cache_dir(self.preprocessed_dir, self.plans_name)
        self.structures = self.training_structures()
        self.case_domains, source_cases = fold_files.source_cases(self.preprocessed_dir, self.sources)
        key = source_key(self.sources)
        folds = splits.load_or_create_splits(self.preprocessed_dir, key, source_cases, write=self.is_main)
        self.train_cases, self.val_cases = splits.fold_cases(folds, self.fold, source_cases, key)
        fold_files.require_cached(self.cache_dir, self.plan, self.plans_name, source_cases, self.case_domains,
                                  self.preprocessed_dir.name)
        seed_everything(self.settings.seed + self.rank)  # distinct per rank; DDP broadcasts rank 0's weights
        self.build_data_loaders()
        verify_sam_checkpoint(self.plan, missing_hint="put the file back or re-run desam_plan_and_embed with "
                                                      "--checkpoint (training starts from its decoder)")
        self.network = self.build_network().to(self.device)
        # Box mode has no IoU loss, so the weights that only feed the IoU head get no gradient: DDP must look for them.
        self.model = DistributedDataParallel(
            self.network, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=self.mode == "box") if self.distributed else self.network
        self.loss_fn = self.build_loss()
        self.optimizer = self.build_optimizer()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        self._initialized = True

    # ---------------------------------------------------------------- override points
    def training_structures(self) -> list[int | None]:
        """The label values the network segments, one per structure index: the `--label` one of a plan with
        several structures, else None (label > 0); a wrong `--label` is a one-line error."""
        check_structure(self.plan, self.settings.label, self.plans_name)
        return [self.settings.label]

    def structure_inputs(self, batch: dict) -> dict[str, torch.Tensor]:
        """Extra network inputs of a batch besides features and prompts (a joint network's structures)."""
        return {}

    def validated_structures(self) -> list[tuple[int | None, torch.nn.Module, Path]]:
        """(label value, network, mask folder) of each structure the final validation scores."""
        return [(self.settings.label, self.network, self.fold_dir / validation.VALIDATION)]

    def build_data_loaders(self) -> None:
        """Set train_data, val_data (each held-out slice once, whatever the training sampling), train_sampler,
        train_loader and val_loader (None without held-out cases)."""
        settings = self.settings
        common = dict(frame=encoders.family(self.plan["encoder"]).prompt_frame, slices=settings.train_slices,
                      structures=self.structures, hard_negatives=settings.hard_negatives)
        self.train_data = slice_data.SliceDataset([self.cache_dir / c for c in self.train_cases], self.mode,
                                                  settings.seed, slice_data.TRAIN_STREAM, sampling=settings.sampling,
                                                  use_views=settings.augmented_views, **common)
        self.val_data = slice_data.SliceDataset([self.cache_dir / c for c in self.val_cases], self.mode,
                                                settings.seed, slice_data.VAL_STREAM, sampling="slices", **common)
        if len(self.train_data) == 0:
            raise DesamError(f"{self.cache_dir}: the training cases of fold {self.fold} have no cached slices")
        pin, workers, timeout = self.device.type == "cuda", settings.num_workers, settings.loader_timeout_s
        self.train_sampler = slice_data.train_sampler(self.train_data, settings.seed, self.world_size, self.rank)
        self.train_loader = slice_data.make_loader(self.train_data, self.train_sampler, self.local_batch_size,
                                                   workers, pin, timeout)
        self.val_loader = slice_data.make_loader(
            self.val_data, slice_data.val_sampler(self.val_data, self.world_size, self.rank),
            self.local_batch_size, workers, pin, timeout) if self.val_cases else None

    def build_network(self) -> torch.nn.Module:
        """DeSAM with PRIM from the plan's SAM checkpoint (on CPU). A network takes (neck, taps, points=
        or boxes=) and gives (mask logits, IoU), has `prim`/`pdmm` for `inference`, a `config` dict
        and `inference_state_dict()`; the predictor rebuilds it from the checkpoint's network_config."""
        return DeSAM.from_sam_checkpoint(self.plan["checkpoint"], self.plan["encoder"], self.plan["tap_shapes"],
                                         pdmm=self.settings.pdmm)

    def build_loss(self) -> Callable[..., tuple[torch.Tensor, dict]]:
        """(logits, target, iou_pred=None, iou_target=None) -> (total, detached parts): the `loss` setting's
        Dice (+ BCE) (+ L1 IoU)."""
        return functools.partial(desam_loss, weights=self.loss_weights, loss=self.settings.loss)

    def build_optimizer(self) -> torch.optim.Optimizer:
        """Adam over the network's trainable parameters; with `prim_lr_scale` != 1 PRIM's in a second group at that
        multiple of lr. Each group's `lr_scale` scales the per-epoch poly_lr."""
        trainable = [p for p in self.network.parameters() if p.requires_grad]
        prim = getattr(self.network, "prim", None)
        prim_ids = {id(p) for p in prim.parameters()} if prim is not None else set()
        scale = self.settings.prim_lr_scale
        if scale == 1.0 or not prim_ids:
            groups = [{"params": trainable, "lr_scale": 1.0}]
        else:
            groups = [{"params": [p for p in trainable if id(p) not in prim_ids], "lr_scale": 1.0},
                      {"params": [p for p in trainable if id(p) in prim_ids], "lr_scale": scale}]
        return torch.optim.Adam([{**g, "lr": self.settings.lr * g["lr_scale"]} for g in groups if g["params"]])

    def validation_settings(self) -> PredictionSettings:
        """How the final validation predicts: the prediction defaults (`inference.settings`) with the run's grid
        size and rule."""
        return PredictionSettings(grid=self.settings.val_grid, grid_rule=self.settings.val_grid_rule)

    # ---------------------------------------------------------------- hooks
    def on_train_start(self, continue_training: bool, overwrite: bool = False) -> None:
        fold_files.check_finished(self.fold_dir, continue_training, overwrite)
        self.initialize()
        if self.is_main:
            fold_files.tidy_fold(self.model_dir, self.fold_dir, overwrite)
        distributed.barrier()
        if continue_training:
            newest = fold_files.newest_checkpoint(self.fold_dir)
            if newest is None:
                self.print(f"no checkpoint in {self.fold_dir}; starting from scratch")
            else:
                self.load_checkpoint(newest)
                if self.fold_done():
                    self.print(f"{self.fold_dir}: fold finished (checkpoint_final.pth and its validation); "
                               f"nothing to do (--overwrite trains it again)")
                    return
                self.print(f"resuming from {newest.name} after epoch {self.start_epoch}")
        if self.is_main:
            self.fold_dir.mkdir(parents=True, exist_ok=True)
            # a structure's model folder, and the multi-structure folder around it, each stand alone
            for folder in (self.model_dir, *([self.model_dir.parent] if self.settings.label is not None else [])):
                fold_files.copy_plan_files(self.preprocessed_dir, self.plans_name, folder)
            write_json(self.debug_info(), self.fold_dir / fold_files.DEBUG_FILE)
            resumed = continue_training and (self.fold_dir / fold_files.LOG_FILE).is_file()
            fold_files.append_log(self.fold_dir, f"{'resumed' if resumed else 'started'}: {self.model_dir.name}/fold_"
                                  f"{self.fold}, {len(self.train_cases)} train cases ({len(self.train_data)} slices), "
                                  f"{len(self.val_cases)} validation cases ({len(self.val_data)} slices), device "
                                  f"{self.device}, world size {self.world_size}", "a" if resumed else "w")

    def fold_done(self) -> bool:
        """Resumed from checkpoint_final.pth with the final validation written (or none to do)."""
        return self.finished and (not self.val_cases or fold_files.validation_written(self.fold_dir))

    def on_epoch_start(self, epoch: int) -> None:
        self.network.train()
        self.train_sampler.set_epoch(epoch)
        for group in self.optimizer.param_groups:
            # optimizer states saved before prim_lr_scale existed restore one group without lr_scale
            group["lr"] = poly_lr(self.settings.lr, epoch, self.settings.epochs) * group.get("lr_scale", 1.0)

    def _forward(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.device
        neck = batch["neck"].to(device, non_blocking=True).float()
        taps = [batch[f"tap{i}"].to(device, non_blocking=True).float() for i in range(3)]
        extra = self.structure_inputs(batch)
        if self.mode == "grid":
            points = (batch["coords"].to(device), batch["point_labels"].to(device))
            return model(neck, taps, points=points, **extra)
        return model(neck, taps, boxes=batch["box"].to(device), **extra)

    def _loss(self, logits: torch.Tensor, iou: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict]:
        target = batch["label"].to(self.device, non_blocking=True)
        if self.mode == "grid":
            return self.loss_fn(logits, target, iou, batch["iou_target"].to(self.device))
        return self.loss_fn(logits, target)

    def train_step(self, batch: dict) -> float:
        """One optimiser step on this rank's part of a global batch; returns the local mean loss."""
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device, self.precision):
            logits, iou = self._forward(self.model, batch)
        loss, _ = self._loss(logits, iou, batch)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return float(loss.detach())

    @torch.no_grad()
    def validation_step(self, batch: dict) -> dict[str, float | list]:
        """Sums over this rank's held-out slices: loss, Dice counts at logits > 0, IoU-head agreements, and in
        grid mode each click's predicted IoU and whether it was on the object (for the gate's AUC)."""
        with autocast(self.device, self.precision):
            logits, iou = self._forward(self.network, batch)
        loss, _ = self._loss(logits, iou, batch)
        count = logits.shape[0]
        pred = logits[:, 0] > 0
        target = batch["label"].to(self.device) > 0
        sums = {"loss": float(loss) * count, "count": count, "tp": float((pred & target).sum()),
                "fp": float((pred & ~target).sum()), "fn": float((~pred & target).sum()), "iou_agree": 0.0,
                "iou_scores": [], "on_object": []}
        if self.mode == "grid":
            on_object = batch["iou_target"].to(self.device) > 0.5
            agree = (iou[:, 0].float() > 0.5) == on_object
            sums["iou_agree"] = float(agree.sum())
            sums["iou_scores"], sums["on_object"] = iou[:, 0].float().tolist(), on_object.tolist()
        return sums

    def on_epoch_end(self, epoch: int, train: dict, val: dict, epoch_time: float, data_wait: float) -> None:
        """Log, plot, EMA of validation Dice, checkpoints (rank 0 writes)."""
        grid_mode = self.mode == "grid"
        previous = self.history["val_dice_ema"][-1] if self.history["val_dice_ema"] else None
        record = epoch_record(train, val, grid_mode, previous, self.optimizer.param_groups[0]["lr"], epoch_time,
                              data_wait)
        for key, value in record.items():
            self.history[key].append(value)
        line, ema = epoch_line(epoch, self.settings.epochs, record, grid_mode), record["val_dice_ema"]
        self.print(line)
        self.start_epoch = epoch + 1
        is_best = math.isfinite(ema) and ema > self.best_ema
        if is_best:
            self.best_ema = ema
        states = distributed.gather(rng_state())
        if not self.is_main:
            return
        self.save_checkpoint(self.fold_dir / CHECKPOINT_LATEST, states)  # first: the log never runs ahead
        if is_best:
            self.save_checkpoint(self.fold_dir / CHECKPOINT_BEST, states)
            self.print(f"new best moving-average validation Dice {ema:.4f}")
        fold_files.append_log(self.fold_dir, line)
        plot_progress(self.history, self.fold_dir / fold_files.PROGRESS_PLOT)

    def on_train_end(self) -> None:
        states = distributed.gather(rng_state())
        if self.is_main:
            self.save_checkpoint(self.fold_dir / CHECKPOINT_FINAL, states)
            fold_files.append_log(self.fold_dir, f"training finished after {self.settings.epochs} epochs")

    # ---------------------------------------------------------------- loops
    def run_training(self, continue_training: bool = False, overwrite: bool = False) -> None:
        """Train from epoch 0 (or, with `continue_training`, from the newest checkpoint), then validate.

        A finished fold needs `continue_training` (then only a missing final validation is done) or
        `overwrite` (start over, the old run's files removed first).
        """
        self.initialize()  # before the lock: a run that cannot start leaves no fold folder behind
        with fold_files.fold_lock(self.model_dir, self.fold, self.plan_sha256):
            self.on_train_start(continue_training, overwrite)
            if self.fold_done():
                return
            for epoch in range(self.start_epoch, self.settings.epochs):
                self.run_epoch(epoch)
            if not self.finished:
                self.on_train_end()
            distributed.barrier()
            self.perform_final_validation()

    def run_epoch(self, epoch: int) -> None:
        self.on_epoch_start(epoch)
        start = time.perf_counter()
        data_wait = 0.0
        train = {"loss": 0.0, "count": 0}
        bar = tqdm(total=len(self.train_loader), desc=f"epoch {epoch + 1}/{self.settings.epochs}", unit="batch",
                   disable=not self.is_main, leave=False, file=sys.stdout)
        waited = time.perf_counter()
        for batch in slice_data.loader_batches(self.train_loader):
            data_wait += time.perf_counter() - waited
            count = len(batch["index"])
            train["loss"] += self.train_step(batch) * count
            train["count"] += count
            bar.update()
            waited = time.perf_counter()
        bar.close()
        self.network.eval()
        val = validation_sums()
        for batch in slice_data.loader_batches(self.val_loader) if self.val_loader else ():
            for key, value in self.validation_step(batch).items():
                val[key] += value
        self.on_epoch_end(epoch, distributed.all_reduce(train, device=self.device),
                          reduce_validation(val, self.device), time.perf_counter() - start,
                          distributed.all_reduce({"wait": data_wait}, "max", self.device)["wait"])

    # ---------------------------------------------------------------- files
    def debug_info(self) -> dict:
        return {**self.config(), "dataset": self.preprocessed_dir.name, "plan_sha256": self.plan_sha256,
                "encoder": self.plan["encoder"], "tap_shapes": self.plan["tap_shapes"],
                "sam_checkpoint": self.plan["checkpoint"], "cache_dir": str(self.cache_dir),
                "train_cases": self.train_cases, "val_cases": self.val_cases,
                "train_slice_count": len(self.train_data), "val_slice_count": len(self.val_data),
                "network": self.network.config, "parameter_counts": self.network.parameter_counts(),
                "versions": versions(), "compute": compute(), "command": sys.argv}

    def network_config(self) -> dict:
        """What rebuilding the network needs besides its weights."""
        return {"network": type(self.network).__name__, **self.network.config, "encoder": self.plan["encoder"],
                "mode": self.mode}

    def save_checkpoint(self, target: Path, rng_states: list[dict]) -> None:
        Checkpoint(network=self.network.inference_state_dict(), network_config=self.network_config(),
                   optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict(), epoch=self.start_epoch,
                   history=self.history, best_ema=self.best_ema, rng=rng_states,
                   sampler={"seed": self.settings.seed, "next_epoch": self.start_epoch}, config=self.config(),
                   plan_sha256=self.plan_sha256).save(target)

    def load_checkpoint(self, path: Path) -> None:
        """Restore weights, optimizer, scaler, history, epoch and RNG states; refuse a different run."""
        checkpoint = Checkpoint.load(path)
        if not checkpoint.has_training_state:
            raise DesamError(f"{path}: holds no training state (optimizer, scaler, RNG); cannot resume from it")
        differ = resume_differences(checkpoint.config, self.config(), checkpoint.plan_sha256, self.plan_sha256)
        if differ:
            raise DesamError(f"{path}: was trained with other settings ({'; '.join(differ)}); "
                             f"start a new run without -c or use the original flags")
        self.network.load_state_dict(checkpoint.network)
        self.optimizer.load_state_dict(checkpoint.optimizer)
        self.scaler.load_state_dict(checkpoint.scaler)
        self.start_epoch = int(checkpoint.epoch)
        self.history = restored_history(checkpoint.history)
        self.best_ema = float(checkpoint.best_ema)
        self.finished = path.name == CHECKPOINT_FINAL
        set_rng_state(checkpoint.rng[self.rank] if len(checkpoint.rng) == self.world_size else checkpoint.rng[0])

    def store_gate_calibration(self, calibrations: dict[int | None, dict | None]) -> dict | None:
        """Write the final validation's gate calibration into checkpoint_final.pth (`--iou-threshold calibrated`
        predicts with it) and log it; returns what was stored: the one structure's calibration, or a joint
        network's per structure (`results_layout.Checkpoint`)."""
        final = self.fold_dir / CHECKPOINT_FINAL
        checkpoint = Checkpoint.load(final)
        checkpoint.gate_calibration = stored_calibration(calibrations)
        checkpoint.save(final)
        for value, calibration in calibrations.items():
            line = (f"gate calibration{'' if value is None else f' of label {value}'}: " +
                    ("no threshold (the held-out slices lack one kind, or none separates them)" if calibration is None
                     else f"threshold {calibration['threshold']:.4f} at a {calibration['grid']}x{calibration['grid']} "
                          f"grid (Youden's J {calibration['youden_j']:.3f}, {calibration['slices_with']} slices with "
                          f"the structure, {calibration['slices_without']} without)"))
            self.print(line)
            fold_files.append_log(self.fold_dir, line)
        return checkpoint.gate_calibration

    # ---------------------------------------------------------------- final validation
    def run_validation_only(self) -> None:
        """`--val-only`: validate checkpoint_final.pth of this fold."""
        self.initialize()
        if not (final := self.fold_dir / CHECKPOINT_FINAL).is_file():
            raise DesamError(f"{final}: not found; train this fold first")
        with fold_files.fold_lock(self.model_dir, self.fold, self.plan_sha256):
            self.load_checkpoint(final)
            self.perform_final_validation()

    def perform_final_validation(self) -> None:
        """Predict and score each held-out case on its rank (`training.validation`); rank 0 writes summary.json."""
        if not self.val_cases:
            self.print(f"fold {self.fold}: no held-out cases, no final validation")
            return
        settings = self.validation_settings()
        mine = [self.cache_dir / case for case in self.val_cases[self.rank::self.world_size]]
        summaries, calibrations = {}, {}
        for value, network, out_dir in self.validated_structures():
            results = validation.validate_cases(network, mine, self.plan, self.mode, settings, out_dir,
                                                self.local_batch_size, self.device, self.precision, self.case_domains,
                                                value, show_progress=self.is_main)
            results = {k: v for part in distributed.gather(results) for k, v in part.items()}
            cases = {case: results[case] for case in self.val_cases}
            summaries[value] = validation.summarise(cases, self.fold, self.mode, self.plan, settings)
            calibrations[value] = validation.gate_calibration(cases, settings)
            if self.mode == "grid" and self.is_main and (warning := validation.closed_gate_warning(cases, settings)):
                line = f"WARNING{'' if value is None else f' (label {value})'}: {warning}"
                self.print(line)
                fold_files.append_log(self.fold_dir, line)
        if not self.is_main:
            return
        summary = next(iter(summaries.values())) if len(summaries) == 1 else validation.structures_summary(summaries)
        if self.mode == "grid":
            summary["gate_calibration"] = self.store_gate_calibration(calibrations)
        out_dir = self.fold_dir / validation.VALIDATION
        write_json(summary, out_dir / validation.SUMMARY)  # last: its presence marks the fold finished
        dice = summary["mean"]["dice"]
        self.print(f"validation of fold {self.fold}: mean Dice {dice if dice is not None else 'n/a'} over "
                   f"{len(self.val_cases)} cases -> {out_dir / validation.SUMMARY}")

