"""Nothing lost, round 2 (issue #24): names that are paths, label rules, concurrent training, mixed plans,
broken geometry, broken caches, long names and silent omissions."""
from __future__ import annotations

import ast
import json
import os
import shutil
import socket
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from test_nothing_lost import (dead_pid, evaluate_cli, live_pid, one_error_line, python,  # noqa: F401 (fixtures)
                               ref_pred, write_dataset)
from test_predict import run_cli as predict_cli
from test_predict import write_volume

from desam_pipeline.data import cache, dataset_checks, raw_dataset
from desam_pipeline.data.plan_io import plan_path
from desam_pipeline.inference import inputs, outputs
from desam_pipeline.io import atomic
from desam_pipeline.io.nifti_io import file_sha256, read_volume, save_like
from desam_pipeline.io.results_layout import model_folder_name
from desam_pipeline.training import trainer
from desam_pipeline.utilities.errors import DesamError

from toy_runs import COMMON, DATASET, fold_dir, run_cli

REPO = Path(__file__).resolve().parents[1]
TRAINING_LOCK = ".training.lock"  # in the fold folder while a run holds the fold
ESCAPES = ["../../../../raw/Dataset003_Small/labelsTr", "/tmp/elsewhere", "a/b", "..", "x y", "C:evil"]


def add_domain(folder: Path, case: str, site: str) -> None:
    info = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    info["domains"][case] = site
    (folder / "dataset.json").write_text(json.dumps(info), encoding="utf-8")


def labels_md5(folder: Path) -> dict[str, str]:
    return {p.name: file_sha256(p) for p in sorted((folder / "labelsTr").iterdir())}


# ---------------------------------------------------------------- item 1: names that are paths
@pytest.mark.parametrize("site", ESCAPES)
def test_verify_refuses_a_site_name_that_is_a_path(tmp_path, site):
    folder = write_dataset(tmp_path)
    add_domain(folder, "SiteB_Case00", site)
    problems = dataset_checks.verify_dataset(folder)
    assert problems and all("not a plain name" in p for p in problems), problems
    assert any(repr(site) in p and str(folder / "dataset.json") in p for p in problems)


def test_verify_refuses_a_case_id_that_is_not_a_plain_name(tmp_path):
    folder = write_dataset(tmp_path)
    for kind, old, new in (("imagesTr", "SiteA_Case00_0000", "Site A_0000"), ("labelsTr", "SiteA_Case00", "Site A")):
        (folder / kind / f"{old}.nii.gz").rename(folder / kind / f"{new}.nii.gz")
    problems = dataset_checks.verify_dataset(folder)
    assert any("case id 'Site A' is not a plain name" in p and "Site A_0000.nii.gz" in p for p in problems), problems


def test_evaluate_refuses_a_site_name_that_is_a_path_and_leaves_the_labels(tmp_path, capsys):
    from evaluation.evaluate import main

    folder = write_dataset(tmp_path)
    add_domain(folder, "SiteB_Case00", "../../../../raw/Dataset900_Toy/labelsTr")
    before = labels_md5(folder)
    with pytest.raises(SystemExit) as stop:
        main(["-d", "900", "--source", "SiteA", "--mode", "box", "--device", "cpu", "--raw", str(tmp_path / "raw"),
              "--preprocessed", str(tmp_path / "pre"), "--results", str(tmp_path / "res")])
    assert stop.value.code == 1
    line = one_error_line(capsys.readouterr().err)
    assert str(folder / "dataset.json") in line and "is not a plain name" in line
    assert labels_md5(folder) == before


@pytest.mark.parametrize("plans", ["../../outside", "/tmp/abs", "a/b"])
def test_plan_and_embed_refuses_a_plans_name_that_is_a_path(tmp_path, capsys, plans):
    from plans import plan_and_embed

    write_dataset(tmp_path)
    with pytest.raises(SystemExit) as stop:
        plan_and_embed.main(["-d", "900", "--encoder", "tiny", "--plans-name", plans, "--device", "cpu",
                             "--raw", str(tmp_path / "raw"), "--preprocessed", str(tmp_path / "pre")])
    assert stop.value.code == 1
    assert "--plans-name" in one_error_line(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_names_joined_into_the_trees_are_plain_names(tmp_path):
    for call in (lambda: plan_path(tmp_path, "../x"), lambda: cache.cache_dir(tmp_path, "../x"),
                 lambda: model_folder_name("../../Trainer", "P", "box", None),
                 lambda: model_folder_name("T", "/abs", "box", None),
                 lambda: model_folder_name("T", "P", "box", ["../x"]),
                 lambda: raw_dataset.domains({"domains": {"a": "../b"}}, tmp_path / "dataset.json")):
        with pytest.raises(DesamError, match="is not a plain name"):
            call()
    assert model_folder_name("T", "P", "box", ["B", "A"]) == "T__P__box__src-A+B"


def test_converters_refuse_site_names_that_are_paths(tmp_path):
    from dataset_conversion.raw_writer import SourceCase, check_cases

    with pytest.raises(DesamError, match=r"site name '\.\./x' is not a plain name"):
        check_cases([SourceCase("A_1", "../x", tmp_path / "a.nii.gz", tmp_path / "a_seg.nii.gz")])
    with pytest.raises(DesamError, match=r"case id 'a\.b' is not a plain name"):
        check_cases([SourceCase("a.b", "A", tmp_path / "a.nii.gz", tmp_path / "a_seg.nii.gz")])


@pytest.mark.parametrize("name", ["../x", "/tmp/x", "..", "", "a/../../x", "a/b"])
def test_writers_refuse_destinations_outside_their_tree(tmp_path, name):
    from desam_pipeline.baselines.external_predictions import locate
    from desam_pipeline.inference.prediction_cache import group_folder, prediction_file
    from evaluation import evaluation_cases
    from evaluation.report import report_folder

    writers = [lambda: evaluation_cases.prediction_path(tmp_path, evaluation_cases.EvalCase("c", name, False, ("0",))),
               lambda: prediction_file(tmp_path, name, "c"), lambda: locate(tmp_path, name, ["A"], None),
               lambda: group_folder(tmp_path, name)]
    if name not in ("", ".."):  # an empty or `..` case or trainer name still makes a plain file name
        writers += [lambda: outputs.output_path(tmp_path, name), lambda: outputs.quality_path(tmp_path, name),
                    lambda: report_folder(tmp_path, "box", "full", trainer=name),
                    lambda: outputs.probabilities_path(tmp_path, name)]
    for writer in writers:
        with pytest.raises(DesamError, match="refusing to write outside"):
            writer()
    from desam_pipeline.io.safe_names import contained
    assert contained(tmp_path, "site", "..case.nii.gz") == tmp_path / "site" / "..case.nii.gz"


def test_code_audit_names_from_user_files_reach_paths_only_through_the_checks():
    """A grep-level audit of the whole project.

    1. The "domains" of a dataset.json (case ids and site names) are read only by raw_dataset, whose
       `domains()` and `field_problems()` refuse names that are not plain names.
    2. Every path join (`folder / x`) of a site, trainer or plans name goes through a check in the same
       expression (check_name, contained, plan_path, cache_dir, model_folder_name, source_key) or in the same
       function (`check_name(<name>, ...)`), or is one of the few joins of the project's own constant tables.
    Case ids are not followed: they are file names listed from a folder (one path component) or keys of
    the checked "domains".
    """
    guards = {"check_name", "contained", "plan_path", "cache_dir", "model_folder_name", "source_key",
              "group_folder", "prediction_file"}
    untrusted = {"site", "sites", "site_name", "domain", "trainer", "plans", "plans_name"}
    constant_tables = {("dataset_conversion/make_phantom.py", "site_name"),  # SITES; unknown --sites refused
                       ("dataset_conversion/make_abdominal_phantom.py", "domain")}  # MODALITIES table
    domain_reads, unguarded = [], []
    for root in ("desam_pipeline", "evaluation", "plans", "dataset_conversion", "benchmarks"):
        for path in sorted((REPO / root).rglob("*.py")):
            relative = str(path.relative_to(REPO))
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for function in [tree, *[n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.Lambda))]]:
                checked = {a.id for n in ast.walk(function) if isinstance(n, ast.Call) and _called(n) == "check_name"
                           for a in n.args[:1] if isinstance(a, ast.Name)}
                for node in ast.walk(function):
                    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and isinstance(
                            node.right, (ast.Name, ast.Attribute, ast.JoinedStr, ast.Call, ast.Subscript)):
                        names = {n.id for n in ast.walk(node.right) if isinstance(n, ast.Name)} & untrusted
                        guarded = any(_called(n) in guards for n in ast.walk(node.right) if isinstance(n, ast.Call))
                        left = names - checked - {n for f, n in constant_tables if f == relative}
                        if left and not guarded:
                            unguarded.append(f"{relative}:{node.lineno}: {ast.unparse(node)}")
            if relative != "desam_pipeline/data/raw_dataset.py":
                domain_reads += [f"{relative}:{node.lineno}: {ast.unparse(node)}" for node in ast.walk(tree)
                                 if _reads_domains(node)]
    assert not domain_reads, "read the domains through raw_dataset.domains():\n" + "\n".join(domain_reads)
    assert not unguarded, "joins of unchecked names:\n" + "\n".join(sorted(set(unguarded)))


def _called(call: ast.Call) -> str | None:
    func = call.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None


def _reads_domains(node: ast.AST) -> bool:
    """`x["domains"]` or `x.get("domains", ...)`, except on the fingerprint (its own per-site summary)."""
    if isinstance(node, ast.Subscript):
        key, owner = node.slice, node.value
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get" and node.args:
        key, owner = node.args[0], node.func.value
    else:
        return False
    return isinstance(key, ast.Constant) and key.value == "domains" and getattr(owner, "id", None) != "fingerprint"


# ---------------------------------------------------------------- item 3: one foreground rule for both sides
@pytest.mark.parametrize("value", [255, 2])
def test_evaluate_folder_counts_any_positive_reference_value_as_foreground(ref_pred, tmp_path, capsys,  # noqa: F811
                                                                             value):
    import pandas as pd

    ref, pred = ref_pred
    mask = np.zeros((20, 20, 4), np.uint8)
    mask[5:15, 6:14, 1:3] = 1
    for path in ref.iterdir():
        affine = nib.load(str(path)).affine
        nib.save(nib.Nifti1Image(mask * value, affine), str(path))
        nib.save(nib.Nifti1Image(mask, affine), str(pred / path.name))
    assert evaluate_cli(ref, pred, "-o", tmp_path / "out.csv") == 0
    assert (pd.read_csv(tmp_path / "out.csv")["dice"] == 1.0).all()
    err = capsys.readouterr().err
    assert f"{ref / 'SiteA_Case00.nii.gz'}: label values [{value}]" in err and "label > 0" in err
    # with --labels 1 the reference's value is not foreground: said for the reference, not silently Dice 0
    assert evaluate_cli(ref, pred, "-o", tmp_path / "out.csv", "--labels", "1") == 0
    assert f"{ref / 'SiteA_Case00.nii.gz'}: label values [{value}]" in capsys.readouterr().err


def test_evaluate_folder_refuses_fractional_reference_values(ref_pred, capsys):  # noqa: F811
    ref, pred = ref_pred
    path = ref / "SiteA_Case00.nii.gz"
    image = nib.load(str(path))
    values = np.asarray(image.dataobj).astype(np.float32)
    values[0, 0, 0] = 0.5
    nib.save(nib.Nifti1Image(values, image.affine), str(path))
    assert evaluate_cli(ref, pred) == 1
    line = one_error_line(capsys.readouterr().err)
    assert str(path) in line and "must be integers" in line


# ---------------------------------------------------------------- item 6: geometry checked where a case is read
def nan_spacing(path: Path) -> None:
    image = nib.load(str(path))
    header = image.header.copy()
    header["pixdim"][1] = np.nan
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), image.affine, header), str(path))


def test_nan_voxel_size_is_named_by_verify_and_evaluate_folder(ref_pred, capsys):  # noqa: F811
    ref, pred = ref_pred
    folder = ref.parent
    nan_spacing(folder / "imagesTr" / "SiteA_Case00_0000.nii.gz")
    problems = dataset_checks.verify_dataset(folder)
    assert len(problems) == 1 and "SiteA_Case00_0000.nii.gz: voxel size" in problems[0], problems
    nan_spacing(ref / "SiteB_Case00.nii.gz")
    assert evaluate_cli(ref, pred) == 1
    line = one_error_line(capsys.readouterr().err)
    assert str(ref / "SiteB_Case00.nii.gz") in line and "finite and positive" in line
    with pytest.raises(DesamError, match="voxel size"):
        read_volume(ref / "SiteB_Case00.nii.gz")


# ---------------------------------------------------------------- item 7: completeness means every file, its size
def write_case(folder: Path, case: str = "C") -> Path:
    arrays = {"image": np.zeros((2, 8, 8), np.uint8), "label": np.ones((2, 8, 8), np.uint8),
              "neck": np.ones((2, 3, 4, 4), np.float16), "tap1": np.ones((2, 3, 4, 4), np.float16)}
    with cache.CaseWriter(folder, case, {k: (v.shape, v.dtype) for k, v in arrays.items()}) as writer:
        writer.append(arrays)
        writer.commit({"case": case, "z": [0, 1], "input_sha256": "i", "plan_sha256": "p"})
    return folder / case


def test_a_case_with_a_deleted_or_truncated_array_is_incomplete(tmp_path):
    case = write_case(tmp_path)
    assert cache.is_complete(case) and cache.complete_cases(tmp_path, "p") == ["C"]
    assert cache.case_status(case, "i", "p") == "complete"
    (case / "tap1.npy").unlink()
    assert not cache.is_complete(case) and cache.complete_cases(tmp_path) == []
    assert cache.case_status(case, "i", "p") == "incomplete"
    case = write_case(tmp_path)
    with open(case / "neck.npy", "r+b") as handle:
        handle.truncate(100)
    assert cache.case_status(case, "i", "p") == "incomplete"
    case = write_case(tmp_path)  # a folder written before sizes were recorded
    meta = json.loads((case / cache.META).read_text(encoding="utf-8"))
    del meta["files"]
    (case / cache.META).write_text(json.dumps(meta), encoding="utf-8")
    assert cache.case_status(case, "i", "p") == "incomplete"


# ---------------------------------------------------------------- item 9: temporaries fit any legal name
LONG = "x" * 243 + ".nii.gz"  # 250 bytes: a legal file name


def test_temporaries_of_the_longest_names_fit_and_keep_their_suffixes(tmp_path, live_pid):  # noqa: F811
    atomic.write_bytes(b"data", tmp_path / LONG)
    assert (tmp_path / LONG).read_bytes() == b"data"
    image = nib.Nifti1Image(np.zeros((4, 4, 2), np.float32), np.eye(4))
    save_like(np.ones((4, 4, 2)), image, tmp_path / ("y" * 240 + ".nii.gz"))
    assert nib.load(str(tmp_path / ("y" * 240 + ".nii.gz"))).shape == (4, 4, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([LONG, "y" * 240 + ".nii.gz"])
    for name in (LONG, "é" * 127 + ".gz", "short.nii.gz"):
        for pid in (live_pid, dead_pid()):
            temporary = atomic.temporary_name(name, pid)
            assert len(temporary.encode()) <= atomic.NAME_MAX and temporary.endswith(name[-7:])
            assert atomic.temporary_owner(temporary) == pid
            assert atomic.is_stale_temporary(temporary) == (pid != live_pid)
    assert atomic.temporary_name("short.nii.gz", 12) == ".tmp-12-short.nii.gz"
    assert atomic.temporary_name(LONG, 12) != atomic.temporary_name("z" + LONG[1:], 12)


def test_stale_case_temporaries_are_removed_also_mid_replace(tmp_path, live_pid):  # noqa: F811
    """Regression guard: short names keep the `.tmp-<pid>-<case>[.replaced]` form the cache cleans up."""
    dead = dead_pid()
    left = [tmp_path / f".tmp-{dead}-C", tmp_path / f".tmp-{dead}-C.replaced"]
    kept = [tmp_path / f".tmp-{live_pid}-C", tmp_path / f".tmp-{dead}-D"]
    for folder in left + kept:
        folder.mkdir()
    assert cache.remove_case_temporaries(tmp_path, ["C"]) == 2
    assert [p.exists() for p in left + kept] == [False, False, True, True]


# ---------------------------------------------------------------- item 10: what desam_predict reads and skips
def test_input_discovery_accepts_any_case_of_ending_and_names_what_it_skips(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("upper.NII.GZ", "lower.nii", "notes.txt"):
        (folder / name).touch()
    (folder / "sub").mkdir()
    (folder / "dangling.nii.gz").symlink_to(tmp_path / "gone.nii.gz")
    found = {c.case: c for c in inputs.discover_inputs(folder)}
    assert sorted(found) == ["dangling", "lower", "upper"]
    assert found["upper"].problem is None and found["lower"].problem is None
    assert "dangling.nii.gz: broken symbolic link" in found["dangling"].problem
    assert inputs.ignored_inputs(folder) == ["notes.txt: not a NIfTI file (cases are .nii.gz or .nii files)",
                                             "sub: a folder (cases are .nii.gz or .nii files)"]
    (folder / ("v" * 250 + ".nii")).touch()  # legal, but its mask's name would not be
    (long,) = [c for c in inputs.discover_inputs(folder) if c.case.startswith("v")]
    assert "longer than 255 bytes" in long.problem


# ---------------------------------------------------------------- item 4: one training run per fold
def test_a_fold_lock_names_its_holder_and_is_taken_over_when_the_holder_died(tmp_path, live_pid):  # noqa: F811
    from desam_pipeline.io import process_lock

    lock = tmp_path / "fold_0" / TRAINING_LOCK
    mine = process_lock.take(lock, "fold 0")
    assert json.loads(lock.read_text(encoding="utf-8"))["pid"] == os.getpid()
    process_lock.release(lock, mine)
    assert not lock.exists()
    lock.write_text(json.dumps({"pid": live_pid, "host": socket.gethostname(), "started": "then"}), encoding="utf-8")
    with pytest.raises(DesamError, match=f"fold 0 is in use by process {live_pid} on {socket.gethostname()}"):
        process_lock.take(lock, "fold 0")
    lock.write_text(json.dumps({"pid": live_pid, "host": "elsewhere", "started": "then"}), encoding="utf-8")
    with pytest.raises(DesamError, match=f"process {live_pid} on elsewhere.*if that run is gone, delete {lock}"):
        process_lock.take(lock, "fold 0")
    lock.write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname(), "started": "then"}),
                    encoding="utf-8")
    with process_lock.held(lock, "fold 0"):
        assert json.loads(lock.read_text(encoding="utf-8"))["pid"] == os.getpid()
    assert not lock.exists()


# The first run stops inside its lock (at on_train_start) until the test lets it go on.
HOLD_AT_START = ("import pathlib, sys, time\n"
                 "from desam_pipeline.training import train, trainer\n"
                 "original = trainer.DeSAMTrainer.on_train_start\n"
                 "def hold(self, *args, **kwargs):\n"
                 "    print('holding', flush=True)\n"
                 "    while not pathlib.Path(sys.argv[1]).exists():\n"
                 "        time.sleep(0.1)\n"
                 "    original(self, *args, **kwargs)\n"
                 "trainer.DeSAMTrainer.on_train_start = hold\n"
                 "train.main(sys.argv[2:])\n")


@pytest.mark.slow
def test_a_second_run_of_a_running_fold_is_refused_in_one_line(toy_cache, tmp_path, capsys):
    go = tmp_path / "go"
    first = python("-c", HOLD_AT_START, str(go), *COMMON, "--num-workers", "0", "--preprocessed",
                   str(toy_cache / "pre"), "--results", str(toy_cache / "locked"))
    lock = fold_dir(toy_cache, "locked") / TRAINING_LOCK
    try:
        assert first.stdout.readline().strip() == "holding", first.stderr.read()
        assert run_cli(toy_cache, "locked", "--num-workers", "0", "--seed", "0") == 1
        line = one_error_line(capsys.readouterr().err)
        assert f"process {first.pid} on {socket.gethostname()}" in line and str(lock) in line
        go.touch()
        out, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err
    log = (lock.parent / "training_log.txt").read_text(encoding="utf-8")
    assert log.count("started:") == 1 and "epoch 2/2" in log
    assert torch.load(lock.parent / "checkpoint_final.pth", weights_only=True)["config"]["seed"] == 7
    assert not lock.exists()


@pytest.mark.slow
def test_a_dead_runs_lock_is_taken_over_and_every_lock_is_released(toy_cache, monkeypatch):
    folder = fold_dir(toy_cache, "stale_lock")
    folder.mkdir(parents=True)
    (folder / TRAINING_LOCK).write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname()}),
                                        encoding="utf-8")
    original = trainer.DeSAMTrainer.on_epoch_end

    def interrupt(self, epoch, *args):
        original(self, epoch, *args)
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer.DeSAMTrainer, "on_epoch_end", interrupt)
    assert run_cli(toy_cache, "stale_lock", "--num-workers", "0") == 130
    assert not (folder / TRAINING_LOCK).exists()  # released on Ctrl-C too
    monkeypatch.undo()
    assert run_cli(toy_cache, "stale_lock", "--num-workers", "0", "-c") == 0
    assert (folder / "checkpoint_final.pth").is_file() and not (folder / TRAINING_LOCK).exists()


# ---------------------------------------------------------------- item 5: a model folder holds one plan
@pytest.mark.slow
def test_folds_of_two_plans_are_refused_and_continue_compares_the_plan(toy_cache, tmp_path, capsys,
                                                                        tiny_checkpoint):
    from desam_pipeline.training import train
    from plans.plan_and_embed import plan_and_embed

    root = tmp_path / "root"
    shutil.copytree(toy_cache / "pre", root / "pre")
    assert run_cli(root, "results", "--num-workers", "0") == 0
    model = fold_dir(root, "results").parent
    plans_before = file_sha256(model / "plans.json")
    # the same plans name planned again with other choices (every slice cached): another plan
    plan_and_embed("900", encoder="tiny", checkpoint=str(tiny_checkpoint), domains=["SiteA"], slices="all",
                   overwrite=True, raw=str(toy_cache / "raw"), preprocessed=str(root / "pre"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        train.main([COMMON[0], "1", *COMMON[2:], "--num-workers", "0", "--preprocessed", str(root / "pre"),
                    "--results", str(root / "results")])
    assert stop.value.code == 1
    line = one_error_line(capsys.readouterr().err)
    assert "fold_0" in line and "another plan" in line and "move" in line
    assert file_sha256(model / "plans.json") == plans_before and not (model / "fold_1").exists()
    assert run_cli(root, "results", "--num-workers", "0", "-c") == 1
    line = one_error_line(capsys.readouterr().err)
    assert "checkpoint_final.pth" in line and "plan sha256" in line


# ---------------------------------------------------------------- items 6, 9, 10 in desam_predict
@pytest.mark.slow
def test_predict_names_bad_geometry_long_names_and_skipped_entries_and_predicts_the_rest(predict_env, tmp_path,
                                                                                        capsys):
    folder, out = tmp_path / "in", tmp_path / "out"
    for name in ("a_nan.nii.gz", "b_good.NII.GZ", LONG):
        write_volume(folder / name, (30, 30, 2), np.diag([1.0, 1.0, 2.0, 1.0]))
    nan_spacing(folder / "a_nan.nii.gz")
    (folder / "c_dangling.nii.gz").symlink_to(tmp_path / "gone.nii.gz")
    (folder / "notes.txt").write_text("not an image", encoding="utf-8")
    assert predict_cli("-i", folder, "-o", out, "-m", predict_env.box, "-f", "0", *predict_env.roots) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert "a_nan.nii.gz: voxel size" in captured.err and "c_dangling.nii.gz: broken symbolic link" in captured.err
    assert f"ignored {folder / 'notes.txt'}: not a NIfTI file" in captured.err
    assert "2 predicted" in captured.out and "2 failed, 1 ignored (not NIfTI)" in captured.out
    assert sorted(p.name for p in out.glob("*.nii.gz")) == sorted(["b_good.nii.gz", LONG])
    assert sorted(p.name for p in (out / "quality").iterdir()) == sorted(["b_good.csv", LONG[:-7] + ".csv"])
    assert not [p for p in out.rglob(".tmp-*")]


# ---------------------------------------------------------------- item 7: a deleted cache file, end to end
@pytest.mark.slow
def test_a_deleted_cache_file_is_found_by_training_and_repaired_by_embedding(toy_cache, tmp_path, capsys,
                                                                             tiny_checkpoint):
    from plans import plan_and_embed

    root = tmp_path / "root"
    shutil.copytree(toy_cache / "pre", root / "pre")
    case = root / "pre" / DATASET / "DeSAMPlans_tiny" / "SiteA_Case00"
    (case / "tap1.npy").unlink()
    assert run_cli(root, "results", "--num-workers", "0") == 1
    line = one_error_line(capsys.readouterr().err)
    assert "SiteA_Case00" in line and "desam_plan_and_embed" in line
    assert not (root / "results").exists()
    with pytest.raises(SystemExit) as stop:
        plan_and_embed.main(["-d", "900", "--encoder", "tiny", "--checkpoint", str(tiny_checkpoint), "--domains",
                             "SiteA", "--device", "cpu", "--raw", str(toy_cache / "raw"),
                             "--preprocessed", str(root / "pre")])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert "1 complete, 1 to embed" in out and "1 cached case(s) incomplete, embedded again (SiteA_Case00)" in out
    assert cache.is_complete(case) and (case / "tap1.npy").is_file()
