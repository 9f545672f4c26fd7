# Set-up, demo and tests. Everything runs offline on a CPU.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1

.PHONY: setup demo tiny test clean

setup: $(VENV)/.installed

# torch first, pinned: on a machine without torch, an unpinned one pulls a multi-GB CUDA build.
$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -r requirements.txt
	touch $@

data/synthetic/dataset_dict.json: data_scripts/make_synthetic.py | setup
	$(BIN)/python data_scripts/make_synthetic.py --output_dir data/synthetic --num_train 6000

models/demo/config.json: data/synthetic/dataset_dict.json data_scripts/make_tiny_model.py
	$(BIN)/python data_scripts/make_tiny_model.py --dataset data/synthetic --output_dir models/demo --preset demo

# A run of an older demo model would resume with the old weights: start afresh instead.
demo: models/demo/config.json
	@if [ -d runs/demo ] && [ models/demo/config.json -nt runs/demo ]; then \
		echo "models/demo is newer than runs/demo: removing the old run"; rm -rf runs/demo; fi
	$(BIN)/python run_trocr.py recipes/demo.json

data/tiny/dataset_dict.json: data_scripts/make_synthetic.py | setup
	$(BIN)/python data_scripts/make_synthetic.py --output_dir data/tiny --num_train 32 --num_validation 8 --num_test 7

models/tiny/config.json: data/tiny/dataset_dict.json data_scripts/make_tiny_model.py
	$(BIN)/python data_scripts/make_tiny_model.py --dataset data/tiny --output_dir models/tiny --preset tiny

# The data and model recipes/tiny.json reads.
tiny: models/tiny/config.json

test: setup
	$(BIN)/python -m pytest tests

clean:
	rm -rf runs data/tiny data/synthetic models/tiny models/demo
