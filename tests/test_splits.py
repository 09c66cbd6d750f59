"""splits_final.json: patient folds over the source selection, seeded, keyed, user edits respected."""
from __future__ import annotations

import json

import pytest

from desam_pipeline.data import splits
from desam_pipeline.io.results_layout import source_key
from desam_pipeline.utilities.errors import DesamError

CASES = [f"SiteA_Case{i:02d}" for i in range(7)] + [f"SiteB_Case{i:02d}" for i in range(5)]


def test_source_key_is_canonical():
    assert source_key(None) == "src-ALL"
    assert source_key([]) == "src-ALL"
    assert source_key(["RUNMC", "BMC", "RUNMC"]) == "src-BMC+RUNMC"


def test_a_fold_is_0_to_4_or_all():
    assert splits.parse_fold("3") == 3
    assert splits.parse_fold("all") == "all"
    for bad in ("5", "-1", "x"):
        with pytest.raises(DesamError, match="fold must be"):
            splits.parse_fold(bad)


def test_folds_partition_the_cases_by_patient():
    folds = splits.make_folds(CASES)
    assert len(folds) == 5
    vals = [case for fold in folds for case in fold["val"]]
    assert sorted(vals) == sorted(CASES)  # every case validated exactly once
    for fold in folds:
        assert not set(fold["train"]) & set(fold["val"])
        assert sorted(fold["train"] + fold["val"]) == sorted(CASES)
        assert 2 <= len(fold["val"]) <= 3
    assert splits.make_folds(list(reversed(CASES))) == folds  # order of the input does not matter
    assert splits.make_folds(CASES, seed=1) != folds


def test_fewer_cases_than_folds_give_one_fold_per_case():
    assert len(splits.make_folds(CASES[:3])) == 3
    assert splits.make_folds(CASES[:1]) == []
    with pytest.raises(DesamError, match="only fold 'all'"):
        splits.fold_cases([], 0, CASES[:1], "src-X")
    with pytest.raises(DesamError, match="fold 3 does not exist"):
        splits.fold_cases(splits.make_folds(CASES[:3]), 3, CASES[:3], "src-X")


def test_fold_all_trains_on_everything_and_validates_nothing():
    train, val = splits.fold_cases(splits.make_folds(CASES), "all", CASES, "src-ALL")
    assert train == sorted(CASES) and val == []


def test_file_is_keyed_by_source_and_user_edits_are_kept(tmp_path):
    site_a = [c for c in CASES if c.startswith("SiteA")]
    folds_a = splits.load_or_create_splits(tmp_path, "src-SiteA", site_a)
    folds_all = splits.load_or_create_splits(tmp_path, "src-ALL", CASES)
    stored = json.loads((tmp_path / splits.SPLITS_FILE).read_text(encoding="utf-8"))
    assert stored == {"src-SiteA": folds_a, "src-ALL": folds_all}

    edited = [{"train": site_a[:5], "val": site_a[5:6]}]  # a hand-made single fold leaving one case out
    stored["src-SiteA"] = edited
    (tmp_path / splits.SPLITS_FILE).write_text(json.dumps(stored), encoding="utf-8")
    assert splits.load_or_create_splits(tmp_path, "src-SiteA", site_a) == edited
    assert splits.fold_cases(edited, 0, site_a, "src-SiteA") == (site_a[:5], site_a[5:6])

    stored["src-SiteA"] = [{"train": site_a, "val": ["SiteC_Case00"]}]
    (tmp_path / splits.SPLITS_FILE).write_text(json.dumps(stored), encoding="utf-8")
    with pytest.raises(DesamError, match="outside the source selection: SiteC_Case00"):
        splits.load_or_create_splits(tmp_path, "src-SiteA", site_a)


def test_no_write_leaves_the_file_alone(tmp_path):
    splits.load_or_create_splits(tmp_path, "src-ALL", CASES, write=False)
    assert not (tmp_path / splits.SPLITS_FILE).exists()
    (tmp_path / splits.SPLITS_FILE).write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(DesamError, match="expected an object"):
        splits.load_or_create_splits(tmp_path, "src-ALL", CASES)
