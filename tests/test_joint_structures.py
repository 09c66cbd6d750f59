"""A joint DeSAM (several structures, one network): structure tokens in PRIM's prompt, the network bound to one
structure, samples drawn per structure, and the per-structure calibration a checkpoint stores."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from desam_pipeline.data import cache, slice_data
from desam_pipeline.io.results_layout import stored_calibration, structure_calibration
from desam_pipeline.network import encoders
from desam_pipeline.network.desam import DeSAM
from desam_pipeline.network.grid_iou import prompt_ious

TAPS = [[8, 128, 128], [8, 64, 64], [8, 64, 64]]


def inputs(batch: int = 2, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    neck = torch.randn(batch, 256, 64, 64, generator=generator)
    taps = [torch.randn(batch, *shape, generator=generator) for shape in TAPS]
    points = (torch.rand(batch, 1, 2, generator=generator) * 256, torch.ones(batch, 1, dtype=torch.int64))
    return neck, taps, points


def networks() -> tuple[DeSAM, DeSAM]:
    torch.manual_seed(0)
    single = DeSAM.for_encoder("litemedsam", TAPS).eval()
    joint = DeSAM.for_encoder("litemedsam", TAPS, structures=[1, 2, 4]).eval()
    joint.load_state_dict({**single.state_dict(), "prim.structure_tokens": torch.zeros(3, 256)})
    return single, joint


@torch.no_grad()
def test_a_joint_network_with_zero_tokens_prompts_as_a_single_structure_one():
    single, joint = networks()
    assert "prim.structure_tokens" not in single.state_dict()  # checkpoints of one structure load as before
    neck, taps, points = inputs()
    logits, iou = single(neck, taps, points=points)
    joint_logits, joint_iou = joint(neck, taps, points=points, structures=torch.tensor([0, 2]))
    assert torch.equal(logits, joint_logits) and torch.equal(iou, joint_iou)


def test_structure_tokens_start_at_the_scale_of_sams_point_embeddings():
    torch.manual_seed(0)
    net = DeSAM.from_sam_checkpoint(encoders.packaged_checkpoint(), "litemedsam", TAPS, structures=[1, 2, 3, 4])
    foreground = float(net.prim.prompt_encoder.point_embeddings[1].weight.norm())
    norms = net.prim.structure_tokens.norm(dim=1)
    assert torch.all((norms > 0.7 * foreground) & (norms < 1.3 * foreground))
    distances = torch.cdist(net.prim.structure_tokens, net.prim.structure_tokens)
    assert distances[~torch.eye(4, dtype=torch.bool)].min() > foreground  # four distinct structures
    torch.manual_seed(0)
    again = DeSAM.from_sam_checkpoint(encoders.packaged_checkpoint(), "litemedsam", TAPS, structures=[1, 2, 3, 4])
    assert torch.equal(again.prim.structure_tokens, net.prim.structure_tokens)  # seeded by torch's generator


@torch.no_grad()
def test_the_structure_token_changes_the_prompt_and_the_bound_network_is_the_joint_one():
    _, joint = networks()
    joint.prim.structure_tokens.normal_()
    neck, taps, points = inputs()
    logits, iou = joint(neck, taps, points=points, structures=torch.tensor([0, 2]))
    other_logits, other_iou = joint(neck, taps, points=points, structures=torch.tensor([1, 1]))
    assert not torch.allclose(iou, other_iou) and not torch.allclose(logits, other_logits)
    for position, value in enumerate((1, 4)):  # indices 0 and 2 are labels 1 and 4
        bound = joint.for_structure(value)
        bound_logits, bound_iou = bound(neck, taps, points=points)
        assert torch.equal(bound_logits[position], logits[position]) and torch.equal(bound_iou[position], iou[position])
    bound = joint.for_structure(2)
    assert bound.pdmm is joint.pdmm and bound.prim.mask_decoder is joint.prim.mask_decoder
    assert bound.prim.structure_tokens is joint.prim.structure_tokens and joint.prim.structure is None
    # the fast grid IoUs of the bound network are its dense PRIM's
    dense = bound.prim(neck[:1].expand(2, -1, -1, -1), points=points)[1][:, 0]
    assert torch.allclose(prompt_ious(bound, neck[:1], points=points), dense, atol=1e-5)
    with pytest.raises(ValueError, match="needs the structure"):
        joint(neck, taps, points=points)
    with pytest.raises(ValueError, match="not a structure"):
        joint.for_structure(3)
    with pytest.raises(ValueError, match="takes no structure"):
        networks()[0](neck, taps, points=points, structures=torch.tensor([0, 0]))


@torch.no_grad()
def test_a_joint_network_rebuilds_from_its_inference_state():
    _, joint = networks()
    joint.prim.structure_tokens.normal_()
    rebuilt = DeSAM.from_inference_state(joint.inference_state_dict(), joint.config).eval()
    assert rebuilt.config["structures"] == [1, 2, 4]
    neck, taps, points = inputs()
    for value in (1, 2, 4):
        assert torch.equal(rebuilt.for_structure(value)(neck, taps, points=points)[1],
                           joint.for_structure(value)(neck, taps, points=points)[1])


def write_two_structure_case(folder: Path, case: str, slices: int = 6) -> np.ndarray:
    """Structure 1 on slices 1-3 (left), structure 2 on slices 2-4 (right); slices 0 and 5 empty."""
    label = np.zeros((slices, 256, 256), np.uint8)
    label[1:4, 60:120, 30:100] = 1
    label[2:5, 140:200, 150:230] = 2
    rng = np.random.default_rng(0)
    arrays = {"image": label * 100, "label": label,
              "neck": rng.standard_normal((slices, 256, 64, 64)).astype(np.float16),
              **{f"tap{i}": rng.standard_normal((slices, 8, 64, 64)).astype(np.float16) for i in range(3)}}
    with cache.CaseWriter(folder, case, {k: (v.shape, v.dtype) for k, v in arrays.items()}) as writer:
        writer.append(arrays)
        writer.commit({"case": case, "domain": "A", "z": list(range(slices)), "shape": [256, 256, slices],
                       "spacing": [1.0, 1.0, 1.0], "affine": np.eye(4).tolist(), "input_sha256": "",
                       "plan_sha256": ""})
    return label


def test_joint_samples_are_drawn_per_structure_with_that_structures_target(tmp_path):
    label = write_two_structure_case(tmp_path, "A_00")
    data = slice_data.SliceDataset([tmp_path / "A_00"], "grid", 0, frame=256, hard_negatives=0.0,
                                   sampling="balanced", structures=[1, 2])
    positives = 3 + 3  # slices holding structure 1, then those holding structure 2
    assert len(data) == 2 * positives
    drawn_off = set()
    for epoch in range(4):
        for index in range(len(data)):
            sample = data[(epoch, index)]
            k, _, s = data._draw(epoch, index)[0]
            value = (1, 2)[k]
            assert int(sample["structure"]) == k
            assert np.array_equal(sample["label"], (label[s] == value).astype(np.uint8))
            x, y = (int(v) for v in sample["coords"][0])
            on_object = index < positives
            assert bool(label[s, y, x] == value) == on_object and float(sample["iou_target"]) == float(on_object)
            if on_object:
                assert k == (0 if index < 3 else 1) and sample["label"].any()
            else:
                drawn_off.add(k)
    assert drawn_off == {0, 1}
    # every slice once per structure when not balanced (validation)
    every = slice_data.SliceDataset([tmp_path / "A_00"], "grid", 0, frame=256, hard_negatives=0.0,
                                    sampling="slices", structures=[1, 2])
    assert len(every) == 2 * 6
    assert sorted(every._draw(0, i)[0] for i in range(len(every))) == [(k, 0, s) for k in (0, 1) for s in range(6)]


def test_joint_training_slices_follow_every_structure(tmp_path):
    write_two_structure_case(tmp_path, "A_00")  # structure 1 on slices 1-3, structure 2 on 2-4
    kwargs = dict(frame=256, hard_negatives=0.0, sampling="slices", slices="foreground")
    joint = slice_data.SliceDataset([tmp_path / "A_00"], "grid", 0, structures=[1, 2], **kwargs)
    assert sorted({s for _, s in joint.entries}) == [1, 2, 3, 4]
    spleen = slice_data.SliceDataset([tmp_path / "A_00"], "grid", 0, structures=[2], **kwargs)
    assert sorted({s for _, s in spleen.entries}) == [2, 3, 4]


def test_one_structure_draws_as_before_and_the_label_value_selects_it(tmp_path):
    label = write_two_structure_case(tmp_path, "A_00")
    kwargs = dict(frame=256, hard_negatives=0.5, sampling="balanced")
    liver = slice_data.SliceDataset([tmp_path / "A_00"], "grid", 0, structures=[1], **kwargs)
    joint = slice_data.SliceDataset([tmp_path / "A_00"], "grid", 0, structures=[1, 2], **kwargs)
    assert len(liver) == 6
    for index in range(3):  # the clicks on structure 1: the same slices, prompts and targets in both
        a, b = liver[(0, index)], joint[(0, index)]
        assert np.array_equal(a["coords"], b["coords"]) and np.array_equal(a["label"], b["label"])
        assert np.array_equal(a["label"], (label[liver._draw(0, index)[0][2]] == 1).astype(np.uint8))


def test_a_checkpoint_stores_one_calibration_or_one_per_structure():
    one = {"threshold": 0.4}
    assert stored_calibration({None: one}) is one and stored_calibration({3: one}) is one
    stored = stored_calibration({1: one, 2: None})
    assert stored == {"structures": {"1": one, "2": None}}
    assert structure_calibration(stored, 1) is one and structure_calibration(stored, 2) is None
    assert structure_calibration(one, None) is one and structure_calibration(None, 1) is None
