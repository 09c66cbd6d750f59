"""Trainers by class name, for `desam_train -tr NAME` (as nnU-Net's -tr): DeSAMTrainer and every subclass.

A subclass is known once its module is imported; the built-in ones (`desam_pipeline.training.sam_trainers` and
`desam_pipeline.training.joint_trainer`) always are.
"""
from __future__ import annotations

from desam_pipeline.io.results_layout import DEFAULT_TRAINER
from desam_pipeline.training import joint_trainer, sam_trainers  # noqa: F401  (registers the built-in subclasses
from desam_pipeline.training.trainer import DeSAMTrainer
from desam_pipeline.utilities.errors import DesamError


def trainer_classes() -> dict[str, type[DeSAMTrainer]]:
    """Class name -> class for DeSAMTrainer and all its (indirect) subclasses."""
    found, pending = {}, [DeSAMTrainer]
    while pending:
        cls = pending.pop()
        found[cls.__name__] = cls
        pending.extend(cls.__subclasses__())
    return dict(sorted(found.items()))


def trainer_class(name: str = DEFAULT_TRAINER) -> type[DeSAMTrainer]:
    """The trainer class called `name`; an unknown name is a one-line error listing the known ones."""
    classes = trainer_classes()
    if name not in classes:
        raise DesamError(f"unknown trainer {name!r}; known trainers: {', '.join(classes)}")
    return classes[name]
