"""desam_plan_and_embed: fingerprint, write-once plans, and the frozen-SAM cache (equivalence with
SamPredictor and the encoder blocks, resume, stale detection, sharding, slice selection)."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

from desam_pipeline.data import cache
from desam_pipeline.data.plan_io import load_plan, plan_hash
from desam_pipeline.data.preprocessing import preprocess_label, preprocess_volume
from desam_pipeline.data.slice_selection import select_slices
from desam_pipeline.io.atomic import read_json
from desam_pipeline.io.nifti_io import file_sha256
from desam_pipeline.network import encoders, sam_models
from desam_pipeline.utilities.errors import DesamError
from plans.fingerprint import PERCENTILES, compute_fingerprint, domain_table
from plans.plan_and_embed import main, plan_and_embed

from toy_data import write_toy_dataset


DATASET = "Dataset900_Toy"
REPO = Path(__file__).resolve().parents[1]
# Six slices keep the encoder work small: foreground at z 2..3, so a margin of 2 reaches both ends.
SHAPE = (40, 36, 6)


def embed(root: Path, **options) -> dict:
    return plan_and_embed("900", raw=str(root / "raw"), preprocessed=str(root / "pre"), **options)


def foreground_z(label_file: Path) -> list[int]:
    """Independent reference: axial indices whose slice holds a labelled voxel."""
    label = np.asarray(nib.load(str(label_file)).dataobj)
    return [z for z in range(label.shape[2]) if label[:, :, z].any()]


def tiny_sam(checkpoint: Path):
    sam = sam_models.build_sam("tiny")
    sam.load_state_dict(torch.load(checkpoint, weights_only=True))
    return sam.eval()


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("embed")
    write_toy_dataset(root / "raw", shape=SHAPE)
    return root


@pytest.fixture(scope="module")
def fp32_cache(toy_root, tiny_checkpoint) -> dict:
    """SiteA's foreground slices embedded in fp32 with the tiny SAM loaded from its .pth."""
    return embed(toy_root, encoder="tiny", checkpoint=str(tiny_checkpoint), domains=["SiteA"],
                 slices="foreground", precision="fp32", plans_name="Fp32")


def test_fingerprint_per_case_and_domain(toy_root):
    raw = toy_root / "raw" / DATASET
    fingerprint = compute_fingerprint(raw)
    assert sorted(fingerprint["cases"]) == ["SiteA_Case00", "SiteA_Case01", "SiteB_Case00", "SiteB_Case01"]
    case = fingerprint["cases"]["SiteB_Case01"]
    image = np.asarray(nib.load(str(raw / "imagesTr" / "SiteB_Case01_0000.nii.gz")).dataobj, np.float32)
    label_file = raw / "labelsTr" / "SiteB_Case01.nii.gz"
    assert case["domain"] == "SiteB" and case["shape"] == list(SHAPE)
    np.testing.assert_allclose(case["spacing"], [0.8, 0.8, 3.0], rtol=1e-6)
    np.testing.assert_allclose(list(case["intensity_percentiles"].values()), np.percentile(image, PERCENTILES))
    assert case["label_values"] == [0, 1]
    assert case["foreground_z"] == foreground_z(label_file)
    assert case["foreground_slices"] == len(foreground_z(label_file))
    summary = fingerprint["domains"]["SiteB"]
    assert summary["cases"] == 2 and summary["label_values"] == [0, 1]
    table = domain_table(fingerprint)
    assert list(table.index) == ["SiteA", "SiteB"] and table.loc["SiteA", "cases"] == 2
    # SiteB's gain is 1.5x SiteA's: the table must show the brighter site.
    assert table.loc["SiteB", "intensity p99.5"] > table.loc["SiteA", "intensity p99.5"]


def test_slice_selection_keeps_foreground_with_a_margin_or_all_slices():
    assert select_slices([3, 4, 5, 7], 10, "foreground") == [3, 4, 5, 7]
    assert select_slices([3, 4, 5, 9], 10, "foreground")[-1] == 9  # the last foreground slice is kept
    assert select_slices([3, 4, 5, 7], 10, "foreground_margin") == list(range(1, 10))
    assert select_slices([0, 1], 10, "foreground_margin") == [0, 1, 2, 3]
    assert select_slices([8, 9], 10, "foreground_margin") == [6, 7, 8, 9]
    assert select_slices([], 10, "foreground_margin") == []
    assert select_slices([4], 6, "all") == list(range(6))
    with pytest.raises(DesamError, match="unknown slice selection"):
        select_slices([4], 6, "some")


def test_case_writer_is_atomic_and_writes_plain_npy(tmp_path):
    rng = np.random.default_rng(0)
    neck = rng.standard_normal((5, 3, 4, 4)).astype(np.float16)
    with cache.CaseWriter(tmp_path, "C1", {"neck": ((5, 3, 4, 4), np.float16),
                                           "empty": ((0, 2), np.uint8)}) as writer:
        for start in range(0, 5, 2):
            writer.append({"neck": neck[start:start + 2]})
        assert cache.complete_cases(tmp_path) == []  # nothing visible before the commit
        size = writer.commit({"z": list(range(5))})
    np.save(tmp_path / "reference.npy", neck)
    assert (tmp_path / "C1" / "neck.npy").read_bytes() == (tmp_path / "reference.npy").read_bytes()
    case = cache.open_case(tmp_path / "C1")
    assert case["empty"].shape == (0, 2) and case["meta"]["z"] == list(range(5))
    assert size == sum(p.stat().st_size for p in (tmp_path / "C1").iterdir())
    # A writer that is not filled completely never publishes its case and leaves no temporary.
    with pytest.raises(ValueError, match="not filled: neck"):
        with cache.CaseWriter(tmp_path, "C2", {"neck": ((5, 3, 4, 4), np.float16)}) as writer:
            writer.append({"neck": neck[:2]})
            writer.commit({"z": []})
    assert cache.complete_cases(tmp_path) == ["C1"] and not list(tmp_path.glob(".tmp-*"))


@pytest.mark.slow
def test_cache_layout_plan_and_manifest(fp32_cache, toy_root, tiny_checkpoint):
    pre, raw = toy_root / "pre" / DATASET, toy_root / "raw" / DATASET
    plan = load_plan(pre, "Fp32")
    encoder = encoders.load_image_encoder("tiny", tiny_checkpoint)
    assert plan["tap_blocks"] == sam_models.tap_indices(encoder) and plan["tap_shapes"] == [[32, 64, 64]] * 3
    assert plan["family"] == "vit" and plan["neck_shape"] == [256, 64, 64]
    assert plan["checkpoint"] == str(tiny_checkpoint.resolve())
    assert plan["checkpoint_sha256"] == file_sha256(tiny_checkpoint)
    assert plan["slices"] == "foreground" and plan["precision"]["cpu"] == "fp32"
    assert plan["cache_dtype"] == "float16" and plan["slice_size"] == 256
    folder = cache.cache_dir(pre, "Fp32")
    assert cache.complete_cases(folder) == ["SiteA_Case00", "SiteA_Case01"]  # --domains SiteA only
    assert (pre / "dataset_fingerprint.json").is_file() and (pre / "dataset.json").is_file()
    for name in ["SiteA_Case00", "SiteA_Case01"]:
        case = cache.open_case(folder / name)
        meta, z = case["meta"], case["meta"]["z"]
        assert z == foreground_z(raw / "labelsTr" / f"{name}.nii.gz") and len(z) == 2
        assert meta["domain"] == "SiteA" and meta["shape"] == list(SHAPE)
        assert meta["plan_sha256"] == plan_hash(plan)
        image_nii = nib.load(str(raw / "imagesTr" / f"{name}_0000.nii.gz"))
        np.testing.assert_allclose(meta["affine"], image_nii.affine)
        volume = np.asarray(image_nii.dataobj, np.float32)
        label = np.asarray(nib.load(str(raw / "labelsTr" / f"{name}.nii.gz")).dataobj)
        assert case["image"].dtype == np.uint8 and case["image"].shape == (2, 256, 256)
        np.testing.assert_array_equal(case["image"], preprocess_volume(volume, plan)[z])
        np.testing.assert_array_equal(case["label"], preprocess_label(label)[z])
        assert set(np.unique(case["label"])) == {0, 1}
        assert case["neck"].shape == (2, 256, 64, 64) and case["neck"].dtype == np.float16
        for k in range(3):
            assert case[f"tap{k}"].shape == (2, 32, 64, 64) and case[f"tap{k}"].dtype == np.float16
    manifest = fp32_cache["manifest"]
    assert manifest == cache.update_manifest(folder, plan, plan_hash(plan))
    assert manifest["tap_blocks"] == [1, 3, 5] and manifest["dtype"] == "float16"
    assert manifest["cases"] == {"SiteA_Case00": {"domain": "SiteA", "slices": 2},
                                 "SiteA_Case01": {"domain": "SiteA", "slices": 2}}


@pytest.mark.slow
def test_neck_equals_sam_predictor_and_taps_equal_global_blocks(fp32_cache, tiny_checkpoint):
    case = cache.open_case(fp32_cache["cache_dir"] / "SiteA_Case01")
    sam = tiny_sam(tiny_checkpoint)
    picked = [0, 1]
    for i in picked:
        predictor = SamPredictor(sam)
        predictor.set_image(np.repeat(case["image"][i][..., None], 3, axis=-1))
        expected = predictor.get_image_embedding()[0].numpy()
        stored = case["neck"][i].astype(np.float32)
        # float16 storage: equal up to float16 rounding of the fp32 embedding
        np.testing.assert_allclose(stored, expected, rtol=2 ** -10, atol=1e-4)
    # Taps: run the blocks by hand and keep the global-attention ones but the last.
    encoder = sam.image_encoder
    global_blocks = [i for i, block in enumerate(encoder.blocks) if block.window_size == 0]
    with torch.no_grad():
        x = encoder.patch_embed(encoders.sam_input(np.asarray(case["image"][picked]), "cpu", encoder.img_size)) + encoder.pos_embed
        outputs = []
        for block in encoder.blocks:
            x = block(x)
            outputs.append(x.permute(0, 3, 1, 2).numpy())
    for k, index in enumerate(global_blocks[:-1]):
        expected = outputs[index]
        stored = case[f"tap{k}"][picked].astype(np.float32)
        scale = np.abs(expected).max()
        np.testing.assert_allclose(stored, expected, rtol=2 ** -10, atol=1e-4 * scale)
        # and it is not another block's output
        assert not np.allclose(stored, outputs[index + 1], rtol=1e-2, atol=1e-2 * scale)


@pytest.mark.slow
def test_checkpoint_and_variant_errors_are_one_line(toy_root, tiny_checkpoint, tmp_path, capsys):
    common = ["-d", "900", "--raw", str(toy_root / "raw"), "--preprocessed", str(tmp_path / "pre")]

    def error_of(*argv) -> str:
        with pytest.raises(SystemExit) as info:
            main([*common, *argv])
        assert info.value.code == 1
        message = capsys.readouterr().err.strip().splitlines()[-1]
        assert message.startswith("desam: error: ")
        return message

    assert "sam_vit_b_01ec64.pth" in error_of("--encoder", "vit_b")
    assert "sam_vit_h_4b8939.pth" in error_of()  # vit_h is the default encoder
    assert "a tiny checkpoint, not vit_b" in error_of("--encoder", "vit_b", "--checkpoint", str(tiny_checkpoint))
    state = torch.load(tiny_checkpoint, weights_only=True)
    state.pop("image_encoder.neck.0.weight")
    torch.save(state, tmp_path / "broken.pth")
    message = error_of("--encoder", "tiny", "--checkpoint", str(tmp_path / "broken.pth"))
    assert "does not match SAM tiny image_encoder" in message and "neck.0.weight" in message
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    assert "not a readable PyTorch checkpoint" in error_of("--encoder", "tiny", "--checkpoint",
                                                           str(tmp_path / "junk.pth"))
    assert "not found" in error_of("--encoder", "tiny", "--checkpoint", str(tmp_path / "missing.pth"))
    assert "unknown site(s) SiteC" in error_of("--encoder", "tiny", "--domains", "SiteC")
    assert "--part-id must be in 0..1" in error_of("--encoder", "tiny", "--num-parts", "2", "--part-id", "2")
    assert not (tmp_path / "pre" / DATASET / "DeSAMPlans_tiny").exists()


@pytest.mark.slow
def test_lifecycle_resume_stale_inputs_and_write_once_plan(tmp_path, tiny_checkpoint):
    write_toy_dataset(tmp_path / "raw", shape=SHAPE)
    options = dict(encoder="tiny", domains=["SiteB"], slices="foreground")
    first = embed(tmp_path, **options)
    pre = tmp_path / "pre" / DATASET
    # tiny without --checkpoint: the seeded tiny SAM is written next to the plan and recorded in it
    tiny_file = pre / "sam_tiny.pth"
    assert first["plan"]["checkpoint"] == str(tiny_file.resolve())
    assert first["plan"]["checkpoint_sha256"] == file_sha256(tiny_file)
    reference = torch.load(tiny_checkpoint, weights_only=True)
    assert all(torch.equal(v, reference[k]) for k, v in torch.load(tiny_file, weights_only=True).items())
    assert first["embedded"] == ["SiteB_Case00", "SiteB_Case01"] and first["slices"] == 4
    folder = first["cache_dir"]
    assert first["bytes_written"] == sum(p.stat().st_size for p in folder.glob("SiteB_Case0*/*"))

    # Nothing to do on a plain re-run.
    again = embed(tmp_path, encoder="tiny", domains=["SiteB"])
    assert again["embedded"] == [] and again["skipped"] == ["SiteB_Case00", "SiteB_Case01"]

    # A changed input file makes only its case stale.
    untouched = (folder / "SiteB_Case01" / "neck.npy").stat()
    image_file = tmp_path / "raw" / DATASET / "imagesTr" / "SiteB_Case00_0000.nii.gz"
    image = nib.load(str(image_file))
    nib.save(nib.Nifti1Image(np.sqrt(np.abs(np.asarray(image.dataobj))), image.affine), str(image_file))
    old_neck = np.array(cache.open_case(folder / "SiteB_Case00")["neck"])
    redone = embed(tmp_path, **options)
    assert redone["embedded"] == ["SiteB_Case00"]
    assert (folder / "SiteB_Case01" / "neck.npy").stat().st_ino == untouched.st_ino
    meta = cache.open_case(folder / "SiteB_Case00")["meta"]
    assert meta["input_sha256"] == cache.input_sha256(image_file, tmp_path / "raw" / DATASET / "labelsTr" /
                                                      "SiteB_Case00.nii.gz")
    assert not np.array_equal(cache.open_case(folder / "SiteB_Case00")["neck"], old_neck)

    # Resume after an interrupted run: a half-written temporary folder and a missing case.
    shutil.rmtree(folder / "SiteB_Case01")
    leftover = folder / ".tmp-99999999-SiteB_Case01"
    leftover.mkdir()
    (leftover / "neck.npy").write_bytes(b"half")
    (folder / ".tmp-99999998-SiteB_Case00.replaced").mkdir()
    assert cache.complete_cases(folder) == ["SiteB_Case00"]
    resumed = embed(tmp_path, **options)
    assert resumed["embedded"] == ["SiteB_Case01"]
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".tmp-")) == []
    assert cache.complete_cases(folder) == ["SiteB_Case00", "SiteB_Case01"]

    # The plan is written once: other choices need --overwrite or a new plans name.
    with pytest.raises(DesamError, match=r"plan exists with other choices \(slices: 'foreground' -> 'all'\)"):
        embed(tmp_path, encoder="tiny", domains=["SiteB"], slices="all")
    other_seed = sam_models.ensure_tiny_checkpoint(tmp_path / "other.pth", seed=1)
    with pytest.raises(DesamError, match="checkpoint_sha256"):
        embed(tmp_path, encoder="tiny", checkpoint=str(other_seed), domains=["SiteB"])
    old_hash = first["plan_sha256"]
    overwritten = embed(tmp_path, encoder="tiny", domains=["SiteB"], slices="foreground_margin", overwrite=True)
    assert overwritten["plan_sha256"] != old_hash
    assert overwritten["embedded"] == ["SiteB_Case00", "SiteB_Case01"]
    # foreground z 2..3 widened by 2 either side, clipped to the 6-slice volume
    assert cache.open_case(folder / "SiteB_Case01")["meta"]["z"] == list(range(6))
    assert load_plan(pre, "DeSAMPlans_tiny")["slices"] == "foreground_margin"
    # A new plans name makes a second plan and cache next to the first.
    other = embed(tmp_path, encoder="tiny", domains=["SiteB"], plans_name="Other", slices="foreground",
                  batch_size=3)
    assert other["plan"]["batch_size"]["cpu"] == 3 and other["embedded"] == ["SiteB_Case00", "SiteB_Case01"]
    assert cache.complete_cases(folder) == ["SiteB_Case00", "SiteB_Case01"]
    # Changing only the batch size rewrites the plan but keeps every case (same plan hash).
    rebatched = embed(tmp_path, encoder="tiny", domains=["SiteB"], plans_name="Other", batch_size=2,
                      overwrite=True)
    assert rebatched["embedded"] == [] and rebatched["plan_sha256"] == other["plan_sha256"]
    assert load_plan(pre, "Other")["batch_size"]["cpu"] == 2


def assert_same_cache(one: Path, two: Path, cases: list[str]) -> None:
    """Byte-identical case folders and the same manifest."""
    files = sorted(p.relative_to(one) for case in cases for p in (one / case).iterdir())
    assert len(files) == len(cases) * 7
    assert files == sorted(p.relative_to(two) for case in cases for p in (two / case).iterdir())
    for name in files:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    assert read_json(two / cache.MANIFEST) == read_json(one / cache.MANIFEST)


@pytest.fixture(scope="module")
def site_b_whole(toy_root, tiny_checkpoint) -> dict:
    """SiteB embedded by one process: the reference for the sharded runs."""
    return embed(toy_root, encoder="tiny", checkpoint=str(tiny_checkpoint), domains=["SiteB"], slices="foreground",
                 plans_name="SiteB")


@pytest.mark.slow
def test_two_parts_equal_one_part(toy_root, tiny_checkpoint, site_b_whole, tmp_path):
    options = dict(encoder="tiny", checkpoint=str(tiny_checkpoint), domains=["SiteB"], slices="foreground",
                   plans_name="SiteB", raw=str(toy_root / "raw"), preprocessed=str(tmp_path))
    parts = [plan_and_embed("900", num_parts=2, part_id=part, **options) for part in (0, 1)]
    assert parts[0]["embedded"] == ["SiteB_Case00"] and parts[1]["embedded"] == ["SiteB_Case01"]
    # the part that finishes last leaves the manifest complete
    assert sorted(parts[1]["manifest"]["cases"]) == ["SiteB_Case00", "SiteB_Case01"]
    assert_same_cache(site_b_whole["cache_dir"], parts[1]["cache_dir"], ["SiteB_Case00", "SiteB_Case01"])


def torchrun_embed(toy_root: Path, preprocessed: Path, *flags: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "plans.plan_and_embed", "-d", "900", "--raw", str(toy_root / "raw"),
               "--preprocessed", str(preprocessed), "--device", "cpu", *flags]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, encoding="utf-8", timeout=280, env=environment, cwd=REPO)


@pytest.mark.slow
@pytest.mark.torchrun
@pytest.mark.timeout(300)
def test_torchrun_two_ranks_equal_one_process(toy_root, tiny_checkpoint, site_b_whole, tmp_path):
    proc = torchrun_embed(toy_root, tmp_path, "--encoder", "tiny", "--checkpoint", str(tiny_checkpoint),
                          "--domains", "SiteB", "--slices", "foreground", "--plans-name", "SiteB")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "part 1/2: 1 cases, 0 complete, 1 to embed" in proc.stdout
    assert "part 2/2: 1 cases, 0 complete, 1 to embed" in proc.stdout
    assert proc.stdout.count("all 2 ranks done") == 1 and "2 cases in" in proc.stdout
    two = cache.cache_dir(tmp_path / DATASET, "SiteB")
    assert_same_cache(site_b_whole["cache_dir"], two, ["SiteB_Case00", "SiteB_Case01"])
    assert load_plan(tmp_path / DATASET, "SiteB") == site_b_whole["plan"]
    assert not [p for p in two.iterdir() if p.name.startswith(".tmp")]


@pytest.mark.slow
@pytest.mark.torchrun
@pytest.mark.timeout(300)
def test_torchrun_rank_zero_error_stops_every_rank(toy_root, tmp_path):
    proc = torchrun_embed(toy_root, tmp_path, "--encoder", "tiny", "--domains", "Nowhere")
    assert proc.returncode != 0
    # both ranks say it: rank 0 its own error, rank 1 that rank 0 stopped with it
    assert proc.stderr.count("desam: error: unknown site(s) Nowhere") == 1, proc.stderr[-3000:]
    assert proc.stderr.count("desam: error: rank 0 stopped: unknown site(s) Nowhere") == 1, proc.stderr[-3000:]
    assert not (tmp_path / DATASET).exists()


@pytest.mark.slow
def test_float16_overflow_is_an_error_naming_the_case(toy_root, tiny_checkpoint, tmp_path):
    state = torch.load(tiny_checkpoint, weights_only=True)
    state["image_encoder.neck.3.weight"] = state["image_encoder.neck.3.weight"] * 1e6
    torch.save(state, tmp_path / "loud.pth")
    with pytest.raises(DesamError, match="SiteB_Case00: neck features are not finite in float16"):
        plan_and_embed("900", raw=str(toy_root / "raw"), preprocessed=str(tmp_path / "pre"), encoder="tiny",
                       checkpoint=str(tmp_path / "loud.pth"), domains=["SiteB"], slices="foreground")
    assert list((tmp_path / "pre" / DATASET / "DeSAMPlans_tiny").iterdir()) == []


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_kill_9_mid_case_leaves_no_half_case(toy_root, tiny_checkpoint, tmp_path, capsys):
    pre = tmp_path / "pre"
    argv = ["-d", "900", "--encoder", "tiny", "--checkpoint", str(tiny_checkpoint), "--domains", "SiteA",
            "--slices", "all", "--batch-size", "1", "--raw", str(toy_root / "raw"), "--preprocessed", str(pre)]
    folder = pre / DATASET / "DeSAMPlans_tiny"
    proc = subprocess.Popen([sys.executable, "-m", "plans.plan_and_embed", *argv], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            temporaries = list(folder.glob(".tmp-*/neck.npy")) if folder.is_dir() else []
            if temporaries:
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.3)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert any(p.name.startswith(".tmp-") for p in folder.iterdir())
    finished = cache.complete_cases(folder)
    assert len(finished) < 2  # killed mid-case: at most the first case is there
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert cache.complete_cases(folder) == ["SiteA_Case00", "SiteA_Case01"]
    assert not any(p.name.startswith(".tmp-") for p in folder.iterdir())
    redone = [c for c in ["SiteA_Case00", "SiteA_Case01"] if c not in finished]
    sizes = sum(p.stat().st_size for c in redone for p in (folder / c).iterdir())
    match = re.search(r"done: (\d+) slices of (\d+) cases .*, (\d+) bytes written .*, (\d+) bytes per slice", out)
    assert match, out
    depth = SHAPE[2]
    assert int(match.group(1)) == depth * len(redone) and int(match.group(2)) == len(redone)
    assert int(match.group(3)) == sizes and int(match.group(4)) == round(sizes / (depth * len(redone)))
    for c in redone:
        arrays = cache.open_case(folder / c)
        assert arrays["meta"]["z"] == list(range(depth))
        assert np.all(np.abs(arrays["neck"]).reshape(depth, -1).max(axis=1) > 0)
