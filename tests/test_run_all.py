"""`make bench`'s goal lines: each measured ratio against the issue's target, met or not."""
from benchmarks.run_all import goal_lines


def test_goal_lines_say_which_ratios_meet_their_targets():
    rows = [{"benchmark": "predict", "figure": "reference_vs_top1_all_points_wall", "value": 1.05},
            {"benchmark": "predict", "figure": "box_vs_bare_wall", "value": 1.25},
            {"benchmark": "predict", "figure": "encoder_speedup_vs_torch_wall", "value": 2.1},
            {"benchmark": "train", "figure": "vit_h_data_wait_fraction", "value": True},
            {"benchmark": "embed", "figure": "box_vs_bare_wall", "value": 0.5}]
    lines = goal_lines(rows)
    assert len(lines) == 3  # a boolean or another benchmark's figure of the same name is no goal's ratio
    assert lines[0].startswith("reference grid rule") and lines[0].endswith(" met")
    assert "1.250 (goal <= 1.1) NOT met" in lines[1]
    assert "2.100 (goal >= 1.5) met" in lines[2]
    assert goal_lines([]) == []
