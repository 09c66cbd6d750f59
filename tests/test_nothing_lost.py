"""Nothing lost, ever: finished folds, full disks, kills mid-save, stale temporaries and concurrent first runs."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from test_predict import run_cli as predict_cli
from test_predict import write_volume

from desam_pipeline.data.plan_io import load_plan
from desam_pipeline.io import atomic, nifti_io
from desam_pipeline.io.nifti_io import file_sha256
from desam_pipeline.training import trainer
from plans.plan_and_embed import TINY_CHECKPOINT_NAME

from toy_data import write_toy_dataset
from toy_runs import final_state, fold_dir, run_cli

REPO = Path(__file__).resolve().parents[1]
DATASET = "Dataset900_Toy"


def python(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, encoding="utf-8",
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def full_disk(real, fail):
    """`real` until `fail(target)` holds; then half the bytes reach the temporary and ENOSPC is raised
    without a file name, as write() does on a full disk."""
    def write(data, target):
        if not fail(Path(target)):
            return real(data, target)
        with atomic.atomic_path(target) as tmp:
            tmp.write_bytes(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return write


def one_error_line(err: str) -> str:
    lines = [line[line.index("desam: error:"):] for line in err.splitlines() if "desam: error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err  # progress bars may share the error's line
    return lines[0]


def folder_state(folder: Path) -> dict[str, str]:
    return {p.name: file_sha256(p) for p in sorted(folder.iterdir()) if p.is_file()}


# ---------------------------------------------------------------- item 2: the tiny checkpoint's bytes
@pytest.mark.slow
def test_tiny_checkpoint_bytes_do_not_depend_on_the_process(tmp_path):
    script = "import sys; from desam_pipeline.network.sam_models import ensure_tiny_checkpoint as e; e(sys.argv[1])"
    runs = [python("-c", script, str(tmp_path / name)) for name in ("a.pth", "b.pth")]
    assert [run.wait(timeout=120) for run in runs] == [0, 0], [run.stderr.read() for run in runs]
    assert file_sha256(tmp_path / "a.pth") == file_sha256(tmp_path / "b.pth")


@pytest.mark.slow
def test_two_concurrent_first_runs_of_plan_and_embed_both_succeed(tmp_path):
    write_toy_dataset(tmp_path / "raw", cases_per_site=1, shape=(40, 36, 6))
    args = ["-m", "plans.plan_and_embed", "-d", "900", "--encoder", "tiny", "--slices", "foreground",
            "--device", "cpu", "--raw", str(tmp_path / "raw"), "--preprocessed", str(tmp_path / "pre")]
    runs = [python(*args) for _ in range(2)]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    pre = tmp_path / "pre" / DATASET
    plan = load_plan(pre, "DeSAMPlans_tiny")
    assert plan["checkpoint_sha256"] == file_sha256(pre / TINY_CHECKPOINT_NAME)
    assert not [p for p in pre.rglob(".tmp-*")]
    third = python(*args)
    out, err = third.communicate(timeout=300)
    assert third.returncode == 0, err
    assert "2 complete, 0 to embed" in out


# ---------------------------------------------------------------- item 3: a finished fold
@pytest.mark.slow
def test_a_finished_fold_needs_continue_or_overwrite(toy_cache, capsys, monkeypatch):
    assert run_cli(toy_cache, "finished", "--num-workers", "0") == 0
    folder = fold_dir(toy_cache, "finished")
    before = folder_state(folder)
    capsys.readouterr()

    assert run_cli(toy_cache, "finished", "--num-workers", "0") == 1
    line = one_error_line(capsys.readouterr().err)
    assert "checkpoint_final.pth" in line and "finished" in line and "-c" in line and "--overwrite" in line
    assert folder_state(folder) == before

    assert run_cli(toy_cache, "finished", "--num-workers", "0", "-c") == 0
    assert "nothing to do" in capsys.readouterr().out
    assert folder_state(folder) == before

    original = trainer.DeSAMTrainer.on_epoch_end

    def stop_after_first_epoch(self, epoch, *args):
        original(self, epoch, *args)
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer.DeSAMTrainer, "on_epoch_end", stop_after_first_epoch)
    assert run_cli(toy_cache, "finished", "--num-workers", "0", "--overwrite") == 130
    # started over: the old run's final checkpoint and validation are gone, not mixed with the new run
    assert not (folder / "checkpoint_final.pth").exists() and not (folder / "validation").exists()
    assert torch.load(folder / "checkpoint_latest.pth", weights_only=True)["epoch"] == 1
    log = (folder / "training_log.txt").read_text(encoding="utf-8")
    assert log.count("started:") == 1 and "epoch 2/2" not in log


@pytest.mark.slow
def test_negative_num_workers_is_refused(toy_cache, capsys):
    assert run_cli(toy_cache, "workers", "--num-workers", "-1") == 1
    assert "--num-workers" in one_error_line(capsys.readouterr().err)


# ---------------------------------------------------------------- item 4: a full disk while training
@pytest.mark.slow
def test_training_on_a_full_disk_stops_in_one_line_and_resumes(toy_cache, trained_fold, capsys, monkeypatch,
                                                               live_pid):
    folder = fold_dir(toy_cache, "full")
    failing = full_disk(atomic.write_bytes, lambda target: target.name == "checkpoint_latest.pth"
                        and target.is_file())  # the second epoch's checkpoint
    monkeypatch.setattr(atomic, "write_bytes", failing)
    assert run_cli(toy_cache, "full", "--num-workers", "0") == 1
    line = one_error_line(capsys.readouterr().err)
    assert str(folder / "checkpoint_latest.pth") in line and "no space left on device" in line
    assert not list(folder.glob(".tmp-*"))
    assert torch.load(folder / "checkpoint_latest.pth", weights_only=True)["epoch"] == 1
    assert not (folder / "checkpoint_final.pth").exists()
    assert "epoch 2/2" not in (folder / "training_log.txt").read_text(encoding="utf-8")

    monkeypatch.undo()  # space freed; a kill had also left a temporary, and another run writes one now
    dead, alive = plant_temporaries(folder, "checkpoint_latest.pth", live_pid)
    assert run_cli(toy_cache, "full", "--num-workers", "0", "-c") == 0
    assert not dead.exists() and alive.exists()
    resumed, reference = final_state(folder), final_state(trained_fold)
    for key, value in reference["network"].items():
        assert torch.equal(resumed["network"][key], value), key


# ---------------------------------------------------------------- item 8: stale temporaries
def dead_pid() -> int:
    finished = subprocess.Popen(["true"])
    finished.wait()
    return finished.pid


@pytest.fixture
def live_pid():
    sleeper = subprocess.Popen(["sleep", "120"])
    yield sleeper.pid
    sleeper.kill()
    sleeper.wait()


def plant_temporaries(folder: Path, name: str, live: int) -> tuple[Path, Path]:
    """A temporary left by a killed writer and one a running writer is still filling."""
    folder.mkdir(parents=True, exist_ok=True)
    dead, alive = folder / f".tmp-{dead_pid()}-{name}", folder / f".tmp-{live}-{name}"
    for path in (dead, alive):
        path.write_bytes(b"half")
    return dead, alive


def test_remove_stale_temporaries_spares_live_writers(tmp_path, live_pid):
    dead, alive = plant_temporaries(tmp_path, "checkpoint_latest.pth", live_pid)
    (tmp_path / ".tmp-notapid-x").write_text("kept", encoding="utf-8")
    (tmp_path / f".tmp-{dead_pid()}-folder").mkdir()
    assert atomic.remove_stale_temporaries(tmp_path) == 2
    assert not dead.exists() and alive.exists() and (tmp_path / ".tmp-notapid-x").exists()


# ---------------------------------------------------------------- predict: items 1, 4, 6, 8, 9


@pytest.mark.slow
def test_predict_never_overwrites_an_input(predict_env, tmp_path, capsys):
    folder = tmp_path / "in"
    write_volume(folder / "a.nii.gz", (30, 30, 2), np.eye(4))
    original = file_sha256(folder / "a.nii.gz")
    (tmp_path / "link").symlink_to(folder)
    (folder / "sub").mkdir()
    for output in (folder, f"{folder}/", folder / "sub" / "..", tmp_path / "link"):
        assert predict_cli("-i", folder / "a.nii.gz", "-o", output, "-m", predict_env.box, "-f", "0", *predict_env.roots) == 1
        line = one_error_line(capsys.readouterr().err)
        assert "a.nii.gz" in line and "would overwrite an input file" in line
        assert file_sha256(folder / "a.nii.gz") == original
    # a plainly named case next to its nnU-Net-named input is fine: a_0000.nii.gz -> a.nii.gz
    (folder / "a.nii.gz").rename(folder / "b_0000.nii.gz")
    assert predict_cli("-i", folder / "b_0000.nii.gz", "-o", folder, "-m", predict_env.box, "-f", "0", *predict_env.roots) == 0
    assert (folder / "b.nii.gz").is_file()


@pytest.mark.slow
def test_rgb_and_complex_inputs_fail_per_case_and_later_cases_are_predicted(predict_env, tmp_path, capsys):
    inputs, out = tmp_path / "in", tmp_path / "out"
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    inputs.mkdir()
    rgb = np.zeros((30, 30, 2), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, affine), str(inputs / "a_rgb.nii.gz"))
    nib.save(nib.Nifti1Image(np.ones((30, 30, 2), np.complex64), affine), str(inputs / "b_complex.nii.gz"))
    write_volume(inputs / "c_good.nii.gz", (30, 30, 2), affine)
    write_volume(inputs / "d_singleton.nii.gz", (30, 30, 2), affine)
    four = nib.load(str(inputs / "d_singleton.nii.gz"))
    nib.save(nib.Nifti1Image(np.asarray(four.dataobj)[..., None], affine), str(inputs / "d_singleton.nii.gz"))
    assert predict_cli("-i", inputs, "-o", out, "-m", predict_env.box, "-f", "0", *predict_env.roots) == 1
    err = capsys.readouterr().err
    assert "a_rgb.nii.gz" in err and "b_complex.nii.gz" in err and "not a real scalar intensity" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in out.glob("*.nii.gz")) == ["c_good.nii.gz", "d_singleton.nii.gz"]
    # documented: an (X, Y, Z, 1) input is read as 3D and its mask is (X, Y, Z)
    assert nib.load(str(out / "d_singleton.nii.gz")).shape == (30, 30, 2)


@pytest.mark.slow
def test_iou_threshold_must_be_finite(predict_env, tmp_path, capsys):
    path = tmp_path / "x.nii.gz"
    write_volume(path, (20, 20, 1), np.eye(4))
    for value in ("nan", "inf", "-inf"):
        assert predict_cli("-i", path, "-o", tmp_path / "o", "-m", predict_env.grid, f"--iou-threshold={value}",
                           *predict_env.roots) == 1
        assert "--iou-threshold" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_predict_on_a_full_disk_stops_in_one_line_and_continues(predict_env, tmp_path, capsys, monkeypatch,
                                                                live_pid):
    inputs, out = tmp_path / "in", tmp_path / "out"
    for case in ("a", "b"):
        write_volume(inputs / f"{case}.nii.gz", (30, 30, 2), np.eye(4))
    real_save = nifti_io.nib.save

    def save(image, filename):
        if Path(filename).name.endswith("-b.nii.gz"):
            Path(filename).write_bytes(b"\x1f\x8b half a mask")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(image, filename)

    monkeypatch.setattr(nifti_io.nib, "save", save)
    assert predict_cli("-i", inputs, "-o", out, "-m", predict_env.box, "-f", "0", *predict_env.roots) == 1
    line = one_error_line(capsys.readouterr().err)
    assert str(out / "b.nii.gz") in line and "no space left on device" in line
    # the finished mask and the run's record (desam_predict writes prediction.json first), no part of b
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == ["a.nii.gz", "prediction.json"]
    assert not [p for p in out.rglob(".tmp-*")]
    monkeypatch.undo()
    dead, alive = plant_temporaries(out, "b.nii.gz", live_pid)
    assert predict_cli("-i", inputs, "-o", out, "-m", predict_env.box, "-f", "0", "--continue", *predict_env.roots) == 0
    assert "1 predicted" in capsys.readouterr().out
    assert (out / "b.nii.gz").is_file() and not dead.exists() and alive.exists()


# ---------------------------------------------------------------- embed on a full disk
@pytest.mark.slow
def test_embedding_on_a_full_disk_stops_in_one_line_and_resumes(tmp_path, tiny_checkpoint, capsys, monkeypatch):
    from desam_pipeline.data import cache
    from plans import plan_and_embed

    write_toy_dataset(tmp_path / "raw", cases_per_site=1, shape=(40, 36, 6))
    argv = ["-d", "900", "--encoder", "tiny", "--checkpoint", str(tiny_checkpoint), "--slices", "foreground",
            "--device", "cpu", "--raw", str(tmp_path / "raw"), "--preprocessed", str(tmp_path / "pre")]
    folder = tmp_path / "pre" / DATASET / "DeSAMPlans_tiny"

    class FullDisk:
        def __init__(self, handle):
            self.handle = handle

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.handle, name)

    def open_(path, mode="r", *args):
        handle = open(path, mode, *args)
        return FullDisk(handle) if "SiteB_Case00" in str(path) and "w" in mode else handle

    monkeypatch.setattr(cache, "open", open_, raising=False)
    with pytest.raises(SystemExit) as stop:
        plan_and_embed.main(argv)
    assert stop.value.code == 1
    line = one_error_line(capsys.readouterr().err)
    assert str(folder / "SiteB_Case00") in line and "no space left on device" in line
    assert cache.complete_cases(folder) == ["SiteA_Case00"] and not list(folder.glob(".tmp-*"))
    monkeypatch.undo()
    with pytest.raises(SystemExit) as stop:
        plan_and_embed.main(argv)
    assert stop.value.code == 0
    assert "1 complete, 1 to embed" in capsys.readouterr().out
    assert cache.complete_cases(folder) == ["SiteA_Case00", "SiteB_Case00"]


def test_unknown_domain_writes_nothing(tmp_path, capsys):
    from plans import plan_and_embed

    write_toy_dataset(tmp_path / "raw", cases_per_site=1, shape=(40, 36, 6))
    with pytest.raises(SystemExit) as stop:
        plan_and_embed.main(["-d", "900", "--encoder", "tiny", "--domains", "FOO", "--device", "cpu",
                             "--raw", str(tmp_path / "raw"), "--preprocessed", str(tmp_path / "pre")])
    assert stop.value.code == 1
    assert "FOO" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "pre").exists() or not any((tmp_path / "pre").rglob("*.*"))


# ---------------------------------------------------------------- item 9: a validation case with no cached slice
@pytest.mark.slow
def test_a_validation_case_without_cached_slices_is_not_scored(toy_cache, tmp_path):
    from desam_pipeline.data import cache
    from desam_pipeline.training import validation
    from desam_pipeline.training.settings import TrainingSettings
    from desam_pipeline.training.trainer import DeSAMTrainer

    settings = TrainingSettings(mode="box", epochs=1, batch_size=2, device="cpu", precision="fp32", num_workers=0)
    run = DeSAMTrainer(toy_cache / "pre" / DATASET, tmp_path, "DeSAMPlans_tiny", 0, sources=["SiteA"], settings=settings)
    run.initialize()
    arrays = cache.open_case(run.cache_dir / run.val_cases[0])
    layout = {k: ((0, *v.shape[1:]), v.dtype) for k, v in arrays.items() if k != "meta"}
    with cache.CaseWriter(tmp_path / "cache", "Empty", layout) as writer:
        writer.commit({**arrays["meta"], "case": "Empty", "z": []})
    result = validation.validate_case(run.network, tmp_path / "cache" / "Empty", run.plan, "box",
                                      run.validation_settings(), tmp_path / "validation", 2, run.device, "fp32")
    assert result["dice"] is None and result["hd95"] is None
    assert not (tmp_path / "validation").exists()


# ---------------------------------------------------------------- items 5, 6, 9: desam_verify_dataset
def write_dataset(tmp_path: Path, **changes) -> Path:
    import json

    folder = write_toy_dataset(tmp_path / "raw", cases_per_site=1, shape=(20, 20, 4))
    info = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    info.update(changes)
    (folder / "dataset.json").write_text(json.dumps(info), encoding="utf-8")
    return folder


@pytest.mark.parametrize("field, value", [
    ("labels", "background, prostate"), ("labels", {"background": 0, "prostate": 1.5}),
    ("labels", {"background": 0, "prostate": [1, 2]}), ("domains", ["SiteA", "SiteB"]), ("domains", None),
    ("domains", {"SiteA_Case00": 1, "SiteB_Case00": 2}), ("file_ending", 5), ("channel_names", {}),
    ("channel_names", "T2"), ("numTraining", "2")])
def test_verify_names_a_wrong_typed_field(tmp_path, capsys, field, value):
    from desam_pipeline.data import dataset_checks

    write_dataset(tmp_path, **{field: value})
    with pytest.raises(SystemExit) as stop:
        dataset_checks.main(["-d", "900", "--raw", str(tmp_path / "raw")])
    assert stop.value.code == 1
    captured = capsys.readouterr()
    assert f"'{field}' must be" in captured.out and "Traceback" not in captured.err


def test_verify_rejects_rgb_and_complex_images_per_case(tmp_path):
    from desam_pipeline.data import dataset_checks

    folder = write_dataset(tmp_path)
    affine = np.diag([0.8, 0.8, 3.0, 1.0])
    rgb = np.zeros((20, 20, 4), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, affine), str(folder / "imagesTr" / "SiteA_Case00_0000.nii.gz"))
    nib.save(nib.Nifti1Image(np.ones((20, 20, 4), np.complex64), affine),
             str(folder / "imagesTr" / "SiteB_Case00_0000.nii.gz"))
    problems = dataset_checks.verify_dataset(folder)
    assert len(problems) == 2 and all("not a real scalar intensity" in p for p in problems)


# ---------------------------------------------------------------- items 5, 7, 9: desam_evaluate_folder
def evaluate_cli(*args) -> int:
    from evaluation.evaluate_folder import main

    with pytest.raises(SystemExit) as stop:
        main([str(a) for a in args])
    return stop.value.code


@pytest.fixture
def ref_pred(tmp_path) -> tuple[Path, Path]:
    folder = write_dataset(tmp_path)
    pred = tmp_path / "pred"
    pred.mkdir()
    for path in (folder / "labelsTr").iterdir():
        (pred / path.name).write_bytes(path.read_bytes())
    return folder / "labelsTr", pred


def test_evaluate_folder_writes_into_an_existing_output_folder(ref_pred, tmp_path):
    ref, pred = ref_pred
    (tmp_path / "report").mkdir()
    assert evaluate_cli(ref, pred, "-o", tmp_path / "report") == 0
    assert (tmp_path / "report" / "evaluation.csv").is_file()


def test_evaluate_folder_refuses_an_empty_prediction_folder(ref_pred, tmp_path, capsys):
    ref, _ = ref_pred
    (tmp_path / "none").mkdir()
    assert evaluate_cli(ref, tmp_path / "none") == 1
    assert "no prediction files" in one_error_line(capsys.readouterr().err)


def test_evaluate_folder_names_odd_predicted_values(ref_pred, capsys):
    ref, pred = ref_pred
    path = next(pred.iterdir())
    image = nib.load(str(path))
    values = np.asarray(image.dataobj).astype(np.float32)
    values[0, 0, 0] = 5
    nib.save(nib.Nifti1Image(values, image.affine), str(path))
    assert evaluate_cli(ref, pred) == 0
    assert f"{path}: label values [5]" in capsys.readouterr().err
    values[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(values, image.affine), str(path))
    assert evaluate_cli(ref, pred) == 1
    assert "must be integers" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("field, value", [("domains", ["SiteA"]), ("domains", None), ("file_ending", 5)])
def test_evaluate_folder_names_a_wrong_typed_dataset_json_field(ref_pred, tmp_path, capsys, field, value):
    import json

    ref, pred = ref_pred
    (tmp_path / "d.json").write_text(json.dumps({field: value}), encoding="utf-8")
    assert evaluate_cli(ref, pred, "--dataset-json", tmp_path / "d.json") == 1
    assert f"'{field}' must be" in one_error_line(capsys.readouterr().err)


# ---------------------------------------------------------------- kill -9 mid-save, every atomic writer
WRITERS = {
    "write_json": "from desam_pipeline.io.atomic import write_json as w; w({'a': 1}, TARGET)",
    "write_bytes": "from desam_pipeline.io.atomic import write_bytes as w; w(b'x' * 1000, TARGET)",
    "sam_checkpoint": "from desam_pipeline.network.sam_models import build_sam, save_sam_checkpoint as w; "
                      "w(build_sam('tiny', seed=0), TARGET)",
    "nifti": "import nibabel as nib, numpy as np; from desam_pipeline.io.nifti_io import save_like as w; "
             "w(np.ones((4, 4, 2)), nib.Nifti1Image(np.zeros((4, 4, 2), np.float32), np.eye(4)), TARGET)",
    "csv": "import pandas as pd; from evaluation.tables import write_csv as w; w(pd.DataFrame({'a': [1]}), TARGET)",
    "progress_plot": "from desam_pipeline.training.progress_plot import plot_progress as w; "
                     "from desam_pipeline.training.schedule import HISTORY_KEYS; w({k: [1.0, 0.5] for k in HISTORY_KEYS}, TARGET)",
}
HANG_BEFORE_RENAME = ("import os, sys, time; real = os.replace\n"
                      "def hang(src, dst):\n"
                      "    print('written', flush=True); time.sleep(120)\n"
                      "os.replace = hang\n")
TARGET_NAMES = {"nifti": "out.nii.gz", "csv": "out.csv", "progress_plot": "progress.png",
                "sam_checkpoint": "sam.pth", "write_bytes": "checkpoint_latest.pth", "write_json": "plan.json"}


SLOW_WRITERS = ("progress_plot", "sam_checkpoint")  # their subprocess imports matplotlib or torch: seconds


@pytest.mark.parametrize("writer", [pytest.param(w, marks=pytest.mark.slow) if w in SLOW_WRITERS else w
                                    for w in sorted(WRITERS)])
def test_kill_9_mid_save_leaves_the_old_file_and_a_stale_temporary(tmp_path, writer):
    target = tmp_path / TARGET_NAMES[writer]
    target.write_bytes(b"the previous complete version")
    code = HANG_BEFORE_RENAME + WRITERS[writer].replace("TARGET", repr(str(target)))
    child = python("-c", code)
    try:
        assert child.stdout.readline().strip() == "written", child.stderr.read()
        child.kill()  # SIGKILL
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert target.read_bytes() == b"the previous complete version"
    (temporary,) = [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    assert temporary.name == f".tmp-{child.pid}-{target.name}" and temporary.stat().st_size > 0
    assert atomic.remove_stale_temporaries(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


# ---------------------------------------------------------------- item 4: phantom and evaluate_folder on a bad disk
def test_phantom_on_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    from dataset_conversion import make_phantom

    def save(image, filename):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(make_phantom.nib, "save", save)
    with pytest.raises(SystemExit) as stop:
        make_phantom.main([str(tmp_path / "phantom"), "--cases-per-site", "1", "--sites", "RUNMC"])
    assert stop.value.code == 1
    line = one_error_line(capsys.readouterr().err)
    assert str(tmp_path / "phantom") in line and "no space left on device" in line
    assert list(tmp_path.iterdir()) == []


def test_evaluate_folder_into_a_read_only_folder_is_one_line(ref_pred, tmp_path, capsys, monkeypatch):
    import pandas as pd

    def read_only(self, path, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    ref, pred = ref_pred
    monkeypatch.setattr(pd.DataFrame, "to_csv", read_only)
    assert evaluate_cli(ref, pred, "-o", tmp_path / "out.csv") == 1
    line = one_error_line(capsys.readouterr().err)
    assert "out.csv" in line and "read-only file system" in line
    assert not (tmp_path / "out.csv").exists()
