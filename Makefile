# Every target creates .venv on its own from a fresh clone, with the test and baseline (nnunetv2) extras, at the
# versions of constraints.txt (those the figures were measured with).
PY := .venv/bin/python
# torch/torchvision are pinned as a pair: segment_anything imports torchvision,
# and an unpinned torch would download a different multi-GB build.
TORCH_PAIR := torch==2.14.1 torchvision==0.29.1

.PHONY: install test test-fast demo demo-abdominal bench bench-accuracy clean-demo

# The venv takes about 6.7 GiB (torch's CUDA build and its libraries): a full disk fails in one line, not mid-pip.
VENV_GIB := 7

.venv/.installed: setup.py Makefile constraints.txt
	@test -x $(PY) || python3 -c "import shutil, sys; free = shutil.disk_usage('.').free / 2**30; \
		free < $(VENV_GIB) and sys.exit(f'make install: {free:.1f} GiB free on this disk; .venv needs about $(VENV_GIB) GiB')"
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt $(TORCH_PAIR)
	$(PY) -m pip install -q -c constraints.txt -e .[test,baseline] $(TORCH_PAIR)
	touch $@

install: .venv/.installed

# Two pytest-xdist workers of one thread each (tests/conftest.py): on 2 cores the suite's many small torch
# calls gain more from two processes than from torch's second thread.
test: install
	$(PY) -m pytest -q -n 2 --durations=10 tests

# The inner loop: everything but the tests marked slow or torchrun (pytest.ini), under a minute.
test-fast: install
	$(PY) -m pytest -q --durations=5 -m "not slow and not torchrun" tests

# ARGS passes flags, e.g. ARGS="--checkpoint /path/sam_vit_b_01ec64.pth" for a SAM ViT instead of LiteMedSAM.
demo: install
	$(PY) -m evaluation.demo $(ARGS)

# CT -> MR and MR -> CT on the abdominal phantom, one DeSAM per organ (docs/abdominal.md).
demo-abdominal: install
	$(PY) -m evaluation.demo_abdominal

bench: install
	$(PY) -m benchmarks.run_all

# The single-source accuracy benchmark (budget 90 min on 2 cores; benchmarks/README.md has the measured
# times). It runs nnU-Net v2, the baseline extra that install puts in. ARGS passes flags, e.g. ARGS=--miniature.
bench-accuracy: install
	$(PY) -m benchmarks.accuracy $(ARGS)

clean-demo:
	rm -rf desam_data
