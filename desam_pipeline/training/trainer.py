"""DeSAMTrainer: trains PRIM + PDMM on cached SAM features of the source domains, one fold at a time.

One class with plain hooks (on_train_start, on_epoch_start, train_step, validation_step,
on_epoch_end, on_train_end) and override points for subclasses (build_network, build_loss,
build_optimizer, build_data_loaders; `desam_train -tr NAME` picks a subclass by its class name);
every hyper-parameter is a constructor argument. Outputs follow nnU-Net's layout
(`desam_pipeline.io.results_layout`), the model folder named after the trainer class:

    <results>/<Dataset>/<TrainerClass>__<plans>__<mode>__src-<SITES|ALL>/
        plans.json dataset.json dataset_fingerprint.json
        fold_<k>/ checkpoint_{latest,best,final}.pth training_log.txt progress.png debug.json
                  validation/<case>.nii.gz validation/summary.json

Under torchrun the trainer runs DistributedDataParallel: each rank takes batch_size / world_size
slices of every global batch, losses and metrics are all-reduced, and only rank 0 writes.

Why over 500 lines: the training loop, its exact resume (checkpoint, RNG and history round trip) and
the DDP reductions share the trainer's state on every line; split across modules they would pass
that state back and forth. Helpers without that state live elsewhere (reproducibility, slice_data,
losses, results_layout, progress_plot); subclasses change it through the build_* override points.
"""
from __future__ import annotations

import contextlib
import functools
import math
import random
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Callable, Iterator

import nibabel as nib
import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from desam_pipeline.data import cache, slice_data, splits
from desam_pipeline.data.orientation import from_slices, plan_orientation
from desam_pipeline.data.plan_io import load_plan, plan_hash, plan_path
from desam_pipeline.data.prompts import MODES
from desam_pipeline.data.raw_dataset import domains
from desam_pipeline.inference import slice_prediction
from desam_pipeline.io import process_lock
from desam_pipeline.io.atomic import atomic_path, read_json, remove_stale_temporaries, write_json
from desam_pipeline.io.nifti_io import file_sha256
from desam_pipeline.io.results_layout import CHECKPOINT_FINAL, CHECKPOINTS, Checkpoint, model_folder_name, source_key
from desam_pipeline.network import DeSAM, encoders
from desam_pipeline.network.pdmm import check_layout
from desam_pipeline.training.losses import LOSS_WEIGHTS, LOSSES, desam_loss
from desam_pipeline.training.progress_plot import plot_progress
from desam_pipeline.utilities import distributed
from desam_pipeline.utilities.errors import DesamError
from desam_pipeline.utilities.metrics import METRICS, compute_metrics
from desam_pipeline.utilities.reproducibility import rng_state, set_rng_state, versions
from desam_pipeline.utilities.runtime import autocast, resolve_precision, select_device

POLY_EXPONENT = 0.9
EMA_MOMENTUM = 0.9
COPIED_FILES = ("dataset.json", "dataset_fingerprint.json")
HISTORY_KEYS = ("train_loss", "val_loss", "val_dice", "val_dice_ema", "iou_accuracy", "lr",
                "epoch_time", "data_wait")
# Hyper-parameters that must match for `-c` to continue the same run exactly.
RESUME_KEYS = ("mode", "epochs", "batch_size", "lr", "loss", "loss_weights", "seed", "plans_name", "fold", "sources",
               "pdmm", "augmented_views", "train_slices")
# What checkpoints written before a key existed ran with.
RESUME_DEFAULTS = {"loss": "paper", "pdmm": "desam", "augmented_views": True, "train_slices": "all"}
# Held in the fold folder while a run trains or validates it (pid, host, start): one run per fold at a time.
TRAINING_LOCK = ".training.lock"


def poly_lr(initial_lr: float, epoch: int, epochs: int, exponent: float = POLY_EXPONENT) -> float:
    """nnU-Net's polynomial decay, stepped once per epoch."""
    return initial_lr * (1 - epoch / epochs) ** exponent


def _nan_to_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def training_precision(precision: str, device: torch.device) -> str:
    """`auto` is fp16 autocast with loss scaling on CUDA (the reference's AMP) and bf16 autocast on CPU.

    Weights and optimizer state stay float32 either way. bf16 halves PDMM's step time on CPUs with
    AVX-512 BF16 (8.3 -> 4.2 s per batch of 4 on this project's 2 cores).
    """
    if precision == "auto":
        return "fp16" if device.type == "cuda" else "bf16"
    return resolve_precision(precision, device)


def copy_plan_files(preprocessed_dir: Path, plans_name: str, model_dir: Path) -> None:
    """plans.json, dataset.json, dataset_fingerprint.json into the model folder: it stands alone."""
    sources = {"plans.json": plan_path(preprocessed_dir, plans_name)}
    sources.update({name: preprocessed_dir / name for name in COPIED_FILES})
    for name, source in sources.items():
        if not source.is_file():
            raise DesamError(f"{source}: not found; run desam_plan_and_embed for this dataset first")
        with atomic_path(model_dir / name) as tmp:
            shutil.copyfile(source, tmp)


def check_model_plan(model_dir: Path, plan_sha256: str, fold: int | str) -> None:
    """A model folder belongs to one plan: a fold of another plan than the folder's other trained folds is refused."""
    plans = model_dir / "plans.json"
    theirs = plan_hash(read_json(plans)) if plans.is_file() else plan_sha256
    others = sorted(folder.name for folder in model_dir.glob("fold_*") if folder.name != f"fold_{fold}"
                    and any((folder / name).is_file() for name in CHECKPOINTS))
    if theirs != plan_sha256 and others:
        raise DesamError(f"{plans}: {', '.join(others)} of this model folder were trained on another plan (sha256 "
                         f"{theirs[:12]}..., this run's is {plan_sha256[:12]}...); a model folder holds one plan: "
                         f"re-plan with the choices those folds used, or move {model_dir.name} aside to train a new "
                         "model on this plan")


class DeSAMTrainer:
    """Train and validate DeSAM for one fold of one source selection from a plan's embedding cache."""

    MIN_EPOCHS = 1

    def __init__(self, preprocessed_dir: Path, results_dir: Path, plans_name: str, fold: int | str,
                 sources: list[str] | None = None, mode: str = "grid", epochs: int = 50, batch_size: int = 8,
                 lr: float = 1e-4, loss_weights: tuple[float, float, float] | None = None, seed: int = 0,
                 device: str = "auto", precision: str = "auto", num_workers: int = 2,
                 loader_timeout_s: float = slice_data.DEFAULT_LOADER_TIMEOUT_S, loss: str = "paper",
                 pdmm: str = "desam", augmented_views: bool = True, train_slices: str = "all"):
        if mode not in MODES:
            raise DesamError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if loss not in LOSSES:
            raise DesamError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
        if epochs < self.MIN_EPOCHS or batch_size < 1 or not lr > 0:
            raise DesamError(f"epochs ({epochs}) must be >= {self.MIN_EPOCHS}, batch size ({batch_size}) >= 1 "
                             f"and lr ({lr}) > 0")
        if num_workers < 0:
            raise DesamError(f"--num-workers must be 0 (load in this process) or more, got {num_workers}")
        self.preprocessed_dir = Path(preprocessed_dir)
        self.plans_name = plans_name
        self.fold = splits.parse_fold(fold)
        self.sources = sorted(set(sources)) if sources else None
        self.mode, self.epochs, self.batch_size, self.lr = mode, int(epochs), int(batch_size), float(lr)
        self.loss = loss
        self.pdmm = check_layout(pdmm)
        self.augmented_views = bool(augmented_views)  # False: train on the original slices of a cache with views
        self.train_slices = train_slices  # which cached slices train and validate (slice_data.cached_positions)
        weights = LOSS_WEIGHTS[loss] if loss_weights is None else tuple(map(float, loss_weights))
        self.loss_weights = weights if mode == "grid" else (weights[0], weights[1], 0.0)
        self.seed, self.num_workers, self.loader_timeout_s = int(seed), int(num_workers), loader_timeout_s
        self.distributed = distributed.in_group()
        self.world_size = dist.get_world_size() if self.distributed else 1
        self.rank = distributed.rank()
        if self.batch_size % self.world_size:
            raise DesamError(f"batch size {self.batch_size} does not divide over {self.world_size} processes; "
                             f"use a multiple of {self.world_size}")
        self.local_batch_size = self.batch_size // self.world_size
        self.device = select_device(device)
        self.precision = training_precision(precision, self.device)
        self.model_dir = Path(results_dir) / model_folder_name(type(self).__name__, plans_name, mode, self.sources)
        self.fold_dir = self.model_dir / f"fold_{self.fold}"
        self.log_file = self.fold_dir / "training_log.txt"
        self.history: dict[str, list[float]] = {k: [] for k in HISTORY_KEYS}
        self.best_ema = -math.inf
        self.start_epoch = 0
        self.finished = False  # resumed from checkpoint_final.pth: nothing left to train
        self._initialized = False

    # ---------------------------------------------------------------- set-up
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def config(self) -> dict:
        """Every hyper-parameter of the run (debug.json, checkpoints, resume checks)."""
        return {"trainer": type(self).__name__, "plans_name": self.plans_name, "fold": self.fold,
                "sources": self.sources, "mode": self.mode, "epochs": self.epochs,
                "batch_size": self.batch_size, "local_batch_size": self.local_batch_size,
                "world_size": self.world_size, "lr": self.lr, "lr_schedule": f"poly {POLY_EXPONENT} per epoch",
                "optimizer": "Adam", "loss": self.loss, "loss_weights": list(self.loss_weights), "pdmm": self.pdmm,
                "seed": self.seed, "augmented_views": self.augmented_views,
                "train_slices": self.train_slices,
                "device": str(self.device), "precision": self.precision, "num_workers": self.num_workers,
                "loader_timeout_s": self.loader_timeout_s, "dice_ema_momentum": EMA_MOMENTUM,
                "split_seed": splits.SPLIT_SEED}

    def initialize(self) -> None:
        """Plan, split, cache check, data loaders, network, optimizer; never the image encoder."""
        if self._initialized:
            return
        self.plan = load_plan(self.preprocessed_dir, self.plans_name)
        self.plan_sha256 = plan_hash(self.plan)
        self.cache_dir = cache.cache_dir(self.preprocessed_dir, self.plans_name)
        source_cases = self._source_cases()
        key = source_key(self.sources)
        folds = splits.load_or_create_splits(self.preprocessed_dir, key, source_cases, write=self.is_main)
        self.train_cases, self.val_cases = splits.fold_cases(folds, self.fold, source_cases, key)
        self._require_cached(source_cases)
        self._seed_everything()
        self.build_data_loaders()
        self._check_sam_checkpoint()
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
    def build_data_loaders(self) -> None:
        """Set train_data, val_data, train_sampler, train_loader and val_loader (None without held-out cases)."""
        frame = encoders.family(self.plan["encoder"]).prompt_frame
        self.train_data = slice_data.SliceDataset([self.cache_dir / c for c in self.train_cases], self.mode,
                                                  self.seed, slice_data.TRAIN_STREAM, frame=frame,
                                                  use_views=self.augmented_views, slices=self.train_slices)
        self.val_data = slice_data.SliceDataset([self.cache_dir / c for c in self.val_cases], self.mode,
                                                self.seed, slice_data.VAL_STREAM, frame=frame,
                                                slices=self.train_slices)
        if len(self.train_data) == 0:
            raise DesamError(f"{self.cache_dir}: the training cases of fold {self.fold} have no cached slices")
        pin = self.device.type == "cuda"
        self.train_sampler = slice_data.train_sampler(self.train_data, self.seed, self.world_size, self.rank)
        self.train_loader = slice_data.make_loader(self.train_data, self.train_sampler, self.local_batch_size,
                                                   self.num_workers, pin, self.loader_timeout_s)
        self.val_loader = slice_data.make_loader(
            self.val_data, slice_data.val_sampler(self.val_data, self.world_size, self.rank),
            self.local_batch_size, self.num_workers, pin, self.loader_timeout_s) if self.val_cases else None

    def build_network(self) -> torch.nn.Module:
        """DeSAM with PRIM from the plan's SAM checkpoint (on CPU). A network takes (neck, taps, points=
        or boxes=) and gives (mask logits, IoU), has `prim`/`pdmm` for `inference`, a `config` dict
        and `inference_state_dict()`; the predictor rebuilds it from the checkpoint's network_config."""
        return DeSAM.from_sam_checkpoint(self.plan["checkpoint"], self.plan["encoder"], self.plan["tap_shapes"],
                                         pdmm=self.pdmm)

    def build_loss(self) -> Callable[..., tuple[torch.Tensor, dict]]:
        """(logits, target, iou_pred=None, iou_target=None) -> (total, detached parts): the `loss` setting's
        Dice (+ BCE) (+ L1 IoU)."""
        return functools.partial(desam_loss, weights=self.loss_weights, loss=self.loss)

    def build_optimizer(self) -> torch.optim.Optimizer:
        """Adam over the network's trainable parameters (the learning rate is set per epoch by poly_lr)."""
        return torch.optim.Adam([p for p in self.network.parameters() if p.requires_grad], lr=self.lr)

    # ---------------------------------------------------------------- checks
    def _check_sam_checkpoint(self) -> None:
        """PRIM starts from the decoder of the SAM whose encoder made the cache: the same file, by hash."""
        path = Path(self.plan["checkpoint"])
        if not path.is_file():
            raise DesamError(f"{path}: the plan's SAM checkpoint is not there (training starts from its decoder); "
                             f"put the file back or re-run desam_plan_and_embed with --checkpoint")
        if file_sha256(path) != self.plan["checkpoint_sha256"]:
            raise DesamError(f"{path}: sha256 differs from the plan's checkpoint_sha256; this is not the SAM "
                             f"checkpoint the cache was made with")

    def _source_cases(self) -> list[str]:
        dataset_file = self.preprocessed_dir / "dataset.json"
        if not dataset_file.is_file():
            raise DesamError(f"{dataset_file}: not found; run desam_plan_and_embed for this dataset first")
        self.dataset_json = read_json(dataset_file)
        self.case_domains = domains(self.dataset_json, dataset_file)
        known = sorted(set(self.case_domains.values()))
        unknown = [s for s in self.sources or [] if s not in known]
        if unknown:
            raise DesamError(f"unknown source site(s) {', '.join(unknown)}; {self.preprocessed_dir.name} "
                             f"has {', '.join(known)}")
        cases = sorted(c for c, site in self.case_domains.items() if not self.sources or site in self.sources)
        if not cases:
            raise DesamError(f"{dataset_file}: no cases with a domain to train on")
        return cases

    def _require_cached(self, cases: list[str]) -> None:
        """Every source case complete in the cache and embedded with this plan, else the command that fixes it."""
        fresh = set(cache.complete_cases(self.cache_dir, self.plan_sha256))
        missing = [c for c in cases if c not in fresh]
        if missing:
            listed = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
            sites = sorted({self.case_domains[c] for c in missing})
            raise DesamError(f"{self.cache_dir}: {len(missing)} source case(s) not cached with this plan "
                             f"({listed}); run: desam_plan_and_embed -d {self.preprocessed_dir.name} "
                             f"--encoder {self.plan['encoder']} --checkpoint {self.plan['checkpoint']} "
                             f"--plans-name {self.plans_name} --domains {' '.join(sites)}")

    def _seed_everything(self) -> None:
        """Distinct but reproducible global seeds per rank (DDP broadcasts rank 0's initial weights)."""
        seed = self.seed + self.rank
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    # ---------------------------------------------------------------- hooks
    def on_train_start(self, continue_training: bool, overwrite: bool = False) -> None:
        self.check_finished_fold(continue_training, overwrite)
        self.initialize()
        if self.is_main:
            for folder in (self.model_dir, self.fold_dir, self.fold_dir / "validation"):
                remove_stale_temporaries(folder)
            if overwrite:
                self.clear_fold()
        distributed.barrier()
        if continue_training:
            newest = self.newest_checkpoint()
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
            self._copy_plan_files()
            write_json(self.debug_info(), self.fold_dir / "debug.json")
            mode = "a" if continue_training and self.log_file.is_file() else "w"
            with open(self.log_file, mode) as log:
                log.write(f"{datetime.now():%Y-%m-%d %H:%M:%S} {'resumed' if mode == 'a' else 'started'}: "
                          f"{self.model_dir.name}/fold_{self.fold}, {len(self.train_cases)} train cases "
                          f"({len(self.train_data)} slices), {len(self.val_cases)} validation cases "
                          f"({len(self.val_data)} slices), device {self.device}, world size {self.world_size}\n")

    def check_finished_fold(self, continue_training: bool, overwrite: bool) -> None:
        """A finished fold (checkpoint_final.pth) is retrained only with an explicit `overwrite`."""
        final = self.fold_dir / "checkpoint_final.pth"
        if final.is_file() and not continue_training and not overwrite:
            raise DesamError(f"{final}: this fold is finished; pass -c to keep it (nothing left to train) or "
                             f"--overwrite to train it again from scratch")

    def fold_done(self) -> bool:
        """Resumed from checkpoint_final.pth with the final validation written (or none to do)."""
        return self.finished and (not self.val_cases or (self.fold_dir / "validation" / "summary.json").is_file())

    def clear_fold(self) -> None:
        """Remove a previous run's checkpoints, log, plot and validation, so no mixed folder survives."""
        for name in (*CHECKPOINTS, "training_log.txt", "progress.png", "debug.json"):
            (self.fold_dir / name).unlink(missing_ok=True)
        shutil.rmtree(self.fold_dir / "validation", ignore_errors=True)

    def on_epoch_start(self, epoch: int) -> None:
        self.network.train()
        self.train_sampler.set_epoch(epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = poly_lr(self.lr, epoch, self.epochs)

    def _forward(self, model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.device
        neck = batch["neck"].to(device, non_blocking=True).float()
        taps = [batch[f"tap{i}"].to(device, non_blocking=True).float() for i in range(3)]
        if self.mode == "grid":
            points = (batch["coords"].to(device), batch["point_labels"].to(device))
            return model(neck, taps, points=points)
        return model(neck, taps, boxes=batch["box"].to(device))

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
    def validation_step(self, batch: dict) -> dict[str, float]:
        """Sums over this rank's held-out slices: loss, Dice counts at logits > 0, IoU-head agreements."""
        with autocast(self.device, self.precision):
            logits, iou = self._forward(self.network, batch)
        loss, _ = self._loss(logits, iou, batch)
        count = logits.shape[0]
        pred = logits[:, 0] > 0
        target = batch["label"].to(self.device) > 0
        sums = {"loss": float(loss) * count, "count": count, "tp": float((pred & target).sum()),
                "fp": float((pred & ~target).sum()), "fn": float((~pred & target).sum()), "iou_agree": 0.0}
        if self.mode == "grid":
            agree = (iou[:, 0].float() > 0.5) == (batch["iou_target"].to(self.device) > 0.5)
            sums["iou_agree"] = float(agree.sum())
        return sums

    def on_epoch_end(self, epoch: int, train: dict, val: dict, epoch_time: float, data_wait: float) -> None:
        """Log, plot, EMA of validation Dice, checkpoints (rank 0 writes)."""
        lr = self.optimizer.param_groups[0]["lr"]
        train_loss = train["loss"] / max(train["count"], 1)
        if val["count"]:
            val_loss = val["loss"] / val["count"]
            denominator = 2 * val["tp"] + val["fp"] + val["fn"]
            val_dice = 2 * val["tp"] / denominator if denominator else 1.0
            iou_accuracy = val["iou_agree"] / val["count"] if self.mode == "grid" else math.nan
            previous = self.history["val_dice_ema"][-1] if self.history["val_dice_ema"] else None
            ema = val_dice if previous is None else EMA_MOMENTUM * previous + (1 - EMA_MOMENTUM) * val_dice
        else:
            val_loss = val_dice = iou_accuracy = ema = math.nan
        for key, value in zip(HISTORY_KEYS, (train_loss, val_loss, val_dice, ema, iou_accuracy, lr,
                                             epoch_time, data_wait)):
            self.history[key].append(float(value))
        line = (f"epoch {epoch + 1}/{self.epochs}  train_loss {train_loss:.4f}  val_loss {val_loss:.4f}  "
                f"val_dice {val_dice:.4f}  ema {ema:.4f}"
                + (f"  iou_acc {iou_accuracy:.3f}" if self.mode == "grid" else "")
                + f"  lr {lr:.3g}  {epoch_time:.1f}s (data wait {data_wait:.1f}s)")
        self.print(line)
        self.start_epoch = epoch + 1
        is_best = math.isfinite(ema) and ema > self.best_ema
        if is_best:
            self.best_ema = ema
        states = distributed.gather(rng_state())
        if not self.is_main:
            return
        self.save_checkpoint(self.fold_dir / "checkpoint_latest.pth", states)  # first: the log never runs ahead
        if is_best:
            self.save_checkpoint(self.fold_dir / "checkpoint_best.pth", states)
            self.print(f"new best moving-average validation Dice {ema:.4f}")
        with open(self.log_file, "a") as log:
            log.write(f"{datetime.now():%Y-%m-%d %H:%M:%S} {line}\n")
        plot_progress(self.history, self.fold_dir / "progress.png")

    def on_train_end(self) -> None:
        states = distributed.gather(rng_state())
        if self.is_main:
            self.save_checkpoint(self.fold_dir / CHECKPOINT_FINAL, states)
            with open(self.log_file, "a") as log:
                log.write(f"{datetime.now():%Y-%m-%d %H:%M:%S} training finished after {self.epochs} epochs\n")

    # ---------------------------------------------------------------- loops
    def run_training(self, continue_training: bool = False, overwrite: bool = False) -> None:
        """Train from epoch 0 (or, with `continue_training`, from the newest checkpoint), then validate.

        A finished fold needs `continue_training` (then only a missing final validation is done) or
        `overwrite` (start over, the old run's files removed first).
        """
        self.initialize()  # before the lock: a run that cannot start leaves no fold folder behind
        distributed.on_rank_zero(lambda: check_model_plan(self.model_dir, self.plan_sha256, self.fold))
        with self.fold_lock():
            self.on_train_start(continue_training, overwrite)
            if self.fold_done():
                return
            for epoch in range(self.start_epoch, self.epochs):
                self.run_epoch(epoch)
            if not self.finished:
                self.on_train_end()
            distributed.barrier()
            self.perform_final_validation()

    @contextlib.contextmanager
    def fold_lock(self) -> Iterator[None]:
        """One run per fold at a time: rank 0 holds fold_<k>/.training.lock, which names its process, for the block."""
        with contextlib.ExitStack() as stack:
            distributed.on_rank_zero(lambda: stack.enter_context(process_lock.held(
                self.fold_dir / TRAINING_LOCK, f"fold {self.fold} of {self.model_dir.name}")))
            yield

    def run_epoch(self, epoch: int) -> None:
        self.on_epoch_start(epoch)
        start = time.perf_counter()
        data_wait = 0.0
        train = {"loss": 0.0, "count": 0}
        bar = tqdm(total=len(self.train_loader), desc=f"epoch {epoch + 1}/{self.epochs}", unit="batch",
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
        val = {"loss": 0.0, "count": 0, "tp": 0.0, "fp": 0.0, "fn": 0.0, "iou_agree": 0.0}
        for batch in slice_data.loader_batches(self.val_loader) if self.val_loader else ():
            for key, value in self.validation_step(batch).items():
                val[key] += value
        self.on_epoch_end(epoch, self._all_reduce(train), self._all_reduce(val),
                          time.perf_counter() - start, self._all_reduce({"wait": data_wait}, "max")["wait"])

    # ---------------------------------------------------------------- distributed helpers
    def _all_reduce(self, sums: dict[str, float], op: str = "sum") -> dict[str, float]:
        if not self.distributed:
            return sums
        keys = sorted(sums)
        values = torch.tensor([float(sums[k]) for k in keys], dtype=torch.float64,
                              device=self.device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(values, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return dict(zip(keys, values.tolist()))

    def print(self, text: str) -> None:
        if self.is_main:
            tqdm.write(text, file=sys.stdout)

    # ---------------------------------------------------------------- files
    def _copy_plan_files(self) -> None:
        copy_plan_files(self.preprocessed_dir, self.plans_name, self.model_dir)

    def debug_info(self) -> dict:
        return {**self.config(), "dataset": self.preprocessed_dir.name, "plan_sha256": self.plan_sha256,
                "encoder": self.plan["encoder"], "tap_shapes": self.plan["tap_shapes"],
                "sam_checkpoint": self.plan["checkpoint"], "cache_dir": str(self.cache_dir),
                "train_cases": self.train_cases, "val_cases": self.val_cases,
                "train_slice_count": len(self.train_data), "val_slice_count": len(self.val_data),
                "network": self.network.config, "parameter_counts": self.network.parameter_counts(),
                "versions": versions(), "command": sys.argv}

    def network_config(self) -> dict:
        """What rebuilding the network needs besides its weights."""
        return {"network": type(self.network).__name__, **self.network.config, "encoder": self.plan["encoder"],
                "mode": self.mode}

    def save_checkpoint(self, target: Path, rng_states: list[dict]) -> None:
        Checkpoint(network=self.network.inference_state_dict(), network_config=self.network_config(),
                   optimizer=self.optimizer.state_dict(), scaler=self.scaler.state_dict(), epoch=self.start_epoch,
                   history=self.history, best_ema=self.best_ema, rng=rng_states,
                   sampler={"seed": self.seed, "next_epoch": self.start_epoch}, config=self.config(),
                   plan_sha256=self.plan_sha256).save(target)

    def newest_checkpoint(self) -> Path | None:
        """checkpoint_final, else latest, else best (nnU-Net's order for `-c`)."""
        for name in CHECKPOINTS:
            if (self.fold_dir / name).is_file():
                return self.fold_dir / name
        return None

    def load_checkpoint(self, path: Path) -> None:
        """Restore weights, optimizer, scaler, history, epoch and RNG states; refuse a different run."""
        checkpoint = Checkpoint.load(path)
        if not checkpoint.has_training_state:
            raise DesamError(f"{path}: holds no training state (optimizer, scaler, RNG); cannot resume from it")
        saved = checkpoint.config
        differ = [f"{k} {saved.get(k, RESUME_DEFAULTS.get(k))!r} -> {getattr(self, k)!r}" for k in RESUME_KEYS
                  if _comparable(saved.get(k, RESUME_DEFAULTS.get(k))) != _comparable(getattr(self, k))]
        if checkpoint.plan_sha256 not in (None, self.plan_sha256):  # None: a checkpoint that did not record it
            differ.append(f"plan sha256 {checkpoint.plan_sha256[:12]}... -> {self.plan_sha256[:12]}...")
        if differ:
            raise DesamError(f"{path}: was trained with other settings ({'; '.join(differ)}); "
                             f"start a new run without -c or use the original flags")
        self.network.load_state_dict(checkpoint.network)
        self.optimizer.load_state_dict(checkpoint.optimizer)
        self.scaler.load_state_dict(checkpoint.scaler)
        self.start_epoch = int(checkpoint.epoch)
        self.history = {k: list(checkpoint.history[k]) for k in HISTORY_KEYS}
        self.best_ema = float(checkpoint.best_ema)
        self.finished = path.name == CHECKPOINT_FINAL
        states = checkpoint.rng
        set_rng_state(states[self.rank] if len(states) == self.world_size else states[0])

    # ---------------------------------------------------------------- final validation
    def run_validation_only(self) -> None:
        """`--val-only`: validate checkpoint_final.pth of this fold."""
        self.initialize()
        final = self.fold_dir / CHECKPOINT_FINAL
        if not final.is_file():
            raise DesamError(f"{final}: not found; train this fold first")
        with self.fold_lock():
            self.load_checkpoint(final)
            self.perform_final_validation()

    def perform_final_validation(self) -> None:
        """Predict each held-out case from the cache and score it in 3D on the cached 256x256 grid.

        Slices outside the cache hold no foreground (the plan caches foreground slices plus a
        margin, or all slices), so they are background in both reference and prediction. The
        in-plane spacing is the original one scaled by original size / 256. Masks are written as
        NIfTI on that grid (`desam_predict` writes them in the original geometry).
        """
        if not self.val_cases:
            self.print(f"fold {self.fold}: no held-out cases, no final validation")
            return
        out_dir = self.fold_dir / "validation"
        results = {}
        mine = self.val_cases[self.rank::self.world_size]
        for case in tqdm(mine, desc="validation", unit="case", disable=not self.is_main, file=sys.stdout):
            results[case] = self._validate_case(case, out_dir)
        results = {k: v for part in distributed.gather(results) for k, v in part.items()}
        if not self.is_main:
            return
        cases = {case: results[case] for case in self.val_cases}
        metric_names = [k for k in next(iter(cases.values())) if k != "domain"]
        mean = {}
        for name in metric_names:
            values = [v[name] for v in cases.values() if v[name] is not None]
            mean[name] = float(np.mean(values)) if values else None
            mean[f"{name}_cases_excluded"] = len(cases) - len(values)
        size = int(self.plan["slice_size"])
        summary = {"fold": self.fold, "mode": self.mode, "checkpoint": CHECKPOINT_FINAL,
                   "grid": f"cached {size}x{size} slices; in-plane spacing scaled by original size / {size}",
                   "postprocessing": "none", "cases": cases, "mean": mean}
        write_json(summary, out_dir / "summary.json")
        self.print(f"validation of fold {self.fold}: mean Dice {mean['dice'] if mean['dice'] is not None else 'n/a'}"
                   f" over {len(cases)} cases -> {out_dir / 'summary.json'}")

    def _validate_case(self, case: str, out_dir: Path) -> dict:
        arrays = cache.open_case(self.cache_dir / case)
        meta = arrays["meta"]
        if not meta["z"]:  # nothing cached, so nothing predicted: no score rather than a free Dice of 1
            self.print(f"fold {self.fold}: validation case {case} has no cached slices; left out of the mean")
            return {"domain": meta.get("domain", self.case_domains.get(case)), **{k: None for k in METRICS}}
        probabilities, _ = slice_prediction.predict_slices(
            self.network, arrays["neck"], [arrays[f"tap{i}"] for i in range(3)], self.mode,
            batch_size=self.local_batch_size, device=self.device, precision=self.precision)
        axis, size = int(self.plan["slice_axis"]), int(self.plan["slice_size"])
        shape = [int(s) for s in meta["shape"]]
        grid_shape = [shape[a] if a == axis else size for a in range(len(shape))]
        at = tuple(np.asarray(meta["z"], dtype=int) if a == axis else slice(None) for a in range(len(shape)))
        prediction = np.zeros(grid_shape, bool)
        reference = np.zeros_like(prediction)
        orientation = plan_orientation(self.plan)
        prediction[at] = from_slices(probabilities > 0.5, axis, orientation)
        reference[at] = from_slices(np.asarray(arrays["label"]) > 0, axis, orientation)
        spacing = tuple(float(meta["spacing"][a]) * (1 if a == axis else shape[a] / size) for a in range(len(shape)))
        metrics = compute_metrics(reference, prediction, spacing)
        self._save_mask(prediction, meta, out_dir / f"{case}.nii.gz", axis, size)
        return {"domain": meta.get("domain", self.case_domains.get(case)),
                **{k: _nan_to_none(float(v)) for k, v in metrics.items()}}

    @staticmethod
    def _save_mask(mask: np.ndarray, meta: dict, target: Path, slice_axis: int, slice_size: int) -> None:
        """NIfTI on the plan's slice grid: the in-plane axes rescaled so voxel centres line up with the original."""
        affine = np.asarray(meta["affine"], dtype=np.float64).copy()
        for axis, size in enumerate(meta["shape"]):
            if axis == slice_axis:
                continue
            factor = size / slice_size
            affine[:3, 3] += affine[:3, axis] * (factor - 1) / 2
            affine[:3, axis] *= factor
        with atomic_path(target) as tmp:
            nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), str(tmp))


def _comparable(value):
    """Lists and tuples compare equal (JSON round trips turn tuples into lists)."""
    return list(value) if isinstance(value, (list, tuple)) else value
