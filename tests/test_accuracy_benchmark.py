"""The accuracy benchmark's miniature (`python -m benchmarks.accuracy --miniature`): every arm yields a scored,
complete table row under both protocols, the CSV/Markdown/figure are written, and a rerun skips finished arms.

The `--miniature` preset (tiny random SAM, 1 epoch, 3 x 3 grid, 2 DeSAM-P seeds, 1 augmented view), with the
phantom replaced by the toy raw dataset of the other tests (RUNMC 2 cases, BMC 1: 40x36x4 volumes, an
empty slice at each end and two with the blob): the phantom's 18-40 slices per case cost PDMM's 256x256 decoder
minutes per arm, the toy volumes' 4 fit the suite. Its figures say nothing about accuracy (that is the benchmark's
job). nnU-Net's real training (250 iterations per epoch), prediction and planning are replaced by the stand-ins of
nnunet_stand_in (each case's prediction is its ground truth; test_nnunet_baseline runs nnU-Net's planning for
real).
"""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from benchmarks import accuracy
from benchmarks.accuracy_arms import arm_table
from desam_pipeline.baselines import nnunet_baseline
from desam_pipeline.training.losses import DEFAULT_LOSS
from desam_pipeline.utilities.errors import DesamError

from nnunet_stand_in import fake_nnunet
from toy_data import write_toy_dataset


SITES = ("BMC",)


def write_toy_raw(ctx, settings) -> None:
    """The miniature's raw dataset, written once (as prepare_raw reuses the converted phantom)."""
    if not (ctx.raw / accuracy.DATASET / "dataset.json").is_file():
        write_toy_dataset(ctx.raw, accuracy.DATASET, sites=("RUNMC", "BMC"), cases_per_site={"RUNMC": 2, "BMC": 1},
                          shape=(40, 36, 4),
                          empty_slices=1)


def run_miniature(out, capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        accuracy.main(["--miniature", "--out", str(out)])
    assert stop.value.code == 0
    return capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.timeout(1800)  # 7.6 min on the 2 shared cores at load 9-12 (one run took over 10 min)
def test_miniature_scores_every_arm_under_both_protocols_and_resumes(tmp_path, monkeypatch, capsys):
    out = tmp_path / "bench"
    calls = []
    monkeypatch.setattr(nnunet_baseline, "run_nnunet", fake_nnunet(out / "raw" / accuracy.DATASET, calls,
                                                                    accuracy.DATASET, plan_for_real=False))
    monkeypatch.setattr(nnunet_baseline, "nnunet_version", lambda: "stand-in")
    monkeypatch.setattr(accuracy, "prepare_raw", write_toy_raw)
    printed = run_miniature(out, capsys)

    arms = arm_table(accuracy.MINIATURE["seeds"])
    table = pd.read_csv(out / "accuracy.csv")
    assert sorted(table["key"]) == sorted(a.name for a in arms for _ in ("full", "paper"))
    assert set(table.groupby("key")["protocol"].apply(frozenset)) == {frozenset({"full", "paper"})}
    for column in ["Dice BMC", "Dice mean unseen", "Dice in-domain"]:
        values = table[column]
        assert values.map(math.isfinite).all() and values.between(0, 1).all(), column
    for column in ["HD95 mm BMC", "HD95 mm mean unseen", "HD95 mm in-domain"]:
        assert column in table.columns  # NaN where a mask is empty (HD95 undefined), as desam_evaluate reports
    assert (table["wall s"] > 0).all()
    nnunet = table[table["key"] == "nnunet"]
    assert (nnunet["Dice BMC"] == 1.0).all() and (nnunet["HD95 mm BMC"] == 0.0).all()  # the stand-in's truth
    # slice detection over the unseen cases, on the full protocol's rows only (paper scores no empty slice)
    detection = ["FP slices % pooled unseen", "median components pooled unseen", "gate AUC pooled unseen"]
    full, paper = table[table["protocol"] == "full"], table[table["protocol"] == "paper"]
    assert full["FP slices % pooled unseen"].between(0, 100).all()
    assert (full["median components pooled unseen"] >= 0).all()
    assert paper[detection].isna().all().all()
    truth = full[full["key"] == "nnunet"].iloc[0]
    assert (truth["FP slices % pooled unseen"], truth["median components pooled unseen"]) == (0.0, 1.0)
    assert math.isnan(truth["gate AUC pooled unseen"])  # nnU-Net has no predicted IoU
    assert full.loc[full["family"] == "desam-p", "gate AUC pooled unseen"].between(0, 1).all()
    assert list(table.columns).index("HD95 mm in-domain") + 1 == list(table.columns).index(detection[0])
    assert nnunet["note"].str.contains("nnUNetTrainer_1epoch: 1 epoch\\(s\\) x 250 iterations").all()
    assert set(table.loc[table["family"] == "desam-p", "tied"]) == {"seed"}
    assert set(table["tied"].fillna("")) <= {"seed", "tied", ""}

    markdown = (out / "accuracy.md").read_text(encoding="utf-8")
    assert "### protocol full" in markdown and "### protocol paper" in markdown
    full_section, paper_section = markdown.split("### protocol paper")
    assert "| FP slices % pooled unseen |" in full_section and "FP slices %" not in paper_section
    assert "DeSAM-P seeds: mean unseen Dice" in markdown and "Against the best nnU-Net arm" in markdown
    assert (out / "accuracy.png").stat().st_size > 10_000
    assert "Under the full protocol, DeSAM-P reaches" in printed

    # prediction-only arms: the base arm's trained model in their own root, predicted with their option
    results = out / "results"
    for arm, option in (("checkpoint_best", ("checkpoint_name", "best")), ("grid_rule_reference", ("grid_rule", "reference"))):
        summary = json.loads(next((results / arm).rglob("evaluation/full/summary.json")).read_text(encoding="utf-8"))
        assert summary[option[0]] == option[1]
    base = json.loads(next((results / "desam_p_s0").rglob("evaluation/full/summary.json")).read_text(encoding="utf-8"))
    assert (base["checkpoint_name"], base["grid_rule"]) == ("final", "top1")
    # one cache: only the views arm trains on the augmented views, and every seed has its own model folder
    debug = {arm: json.loads(next((results / arm).rglob("fold_0/debug.json")).read_text(encoding="utf-8"))
             for arm in ("desam_p_s0", "desam_p_s1", "views")}
    assert [debug[a]["augmented_views"] for a in debug] == [False, False, True]
    assert [debug[a]["seed"] for a in debug] == [0, 1, 0]
    assert {debug[a]["train_slices"] for a in debug} == {"all"}  # the benchmark's default: every slice
    assert {debug[a]["loss"] for a in debug} == {DEFAULT_LOSS}
    assert {debug[a]["prim_lr_scale"] for a in debug} == {0.1}  # PRIM at the paper's 1e-4 beside PDMM's 1e-3
    # the final validation predicts as the arm is scored: the benchmark's grid and the arm's rule
    validation = json.loads(next((results / "desam_p_s0").rglob("fold_0/validation/summary.json")).read_text(
        encoding="utf-8"))
    assert (validation["prediction"]["grid"], validation["prediction"]["grid_rule"]) == (accuracy.MINIATURE["grid"],
                                                                                          "top1")

    # a rerun skips every finished arm and trains nothing; an arm scored before slice detection existed (no
    # per_slice.csv) is scored again from its saved predictions
    done = {p: p.stat().st_mtime_ns for p in results.glob("*/done.json")}
    next(results.glob("desam_p_s1/**/evaluation/full/per_slice.csv")).unlink()
    calls.clear()
    again = run_miniature(out, capsys)
    assert again.count("done earlier") == len(arms) and "$ desam_train" not in again and not calls
    assert "desam_p_s1: scored before slice detection" in again and again.count("$ desam_evaluate") == 1
    assert "0 to predict" in again
    assert {p: p.stat().st_mtime_ns for p in results.glob("*/done.json")} == done
    assert pd.read_csv(out / "accuracy.csv").equals(table)


@pytest.mark.slow
def test_the_pdmm_arm_trains_the_reference_layout_and_other_settings_are_refused(tmp_path, capsys):
    pdmm = [a for a in arm_table(3) if a.name == "pdmm_reference"]
    assert pdmm and pdmm[0].train_flags == ("--pdmm", "reference")
    with pytest.raises(SystemExit) as stop:
        accuracy.main(["--miniature", "--out", str(tmp_path), "--arms", "pdmm_nothing"])
    assert stop.value.code == 1 and "unknown arm(s) pdmm_nothing" in capsys.readouterr().err
    settings = accuracy.resolve_settings(accuracy.build_parser().parse_args(["--miniature", "--epochs", "2"]))
    accuracy.check_same_settings(tmp_path / "b", settings)
    with pytest.raises(DesamError, match="epochs: 2 -> 3"):
        accuracy.check_same_settings(tmp_path / "b", {**settings, "epochs": 3})
    # a record written before --train-slices existed ran on every slice: it matches `all`, not another rule
    assert settings["train_slices"] == "all"
    record = tmp_path / "b" / "benchmark.json"
    saved = json.loads(record.read_text(encoding="utf-8"))
    del saved["train_slices"]
    record.write_text(json.dumps(saved), encoding="utf-8")
    accuracy.check_same_settings(tmp_path / "b", settings)
    with pytest.raises(DesamError, match="train_slices: 'all' -> 'foreground_margin'"):
        accuracy.check_same_settings(tmp_path / "b", {**settings, "train_slices": "foreground_margin"})
    # ... and one learning rate for everything: it is refused beside PRIM at 0.1 x lr, accepted as 1
    del saved["prim_lr_scale"]
    record.write_text(json.dumps(saved), encoding="utf-8")
    with pytest.raises(DesamError, match="prim_lr_scale: 1.0 -> 0.1"):
        accuracy.check_same_settings(tmp_path / "b", settings)
    accuracy.check_same_settings(tmp_path / "b", {**settings, "prim_lr_scale": 1.0})
    with pytest.raises(SystemExit) as stop:  # refused before the phantom is made, not when an arm trains
        accuracy.main(["--miniature", "--out", str(tmp_path / "c"), "--prim-lr-scale", "0"])
    assert stop.value.code == 1 and "--prim-lr-scale must be a number > 0, got 0.0" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
