# Set-up, demo and tests. Everything runs offline on a CPU.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1

# torch is installed first, in every environment the same way: TORCH_SPEC from TORCH_INDEX, the CPU
# build by default (on Linux PyPI's torch is the CUDA build, gigabytes). An environment that already
# has torch keeps it. A CUDA build: make setup TORCH_INDEX=https://download.pytorch.org/whl/cu128
# (any index of pytorch.org/get-started/locally). Where TORCH_INDEX cannot be reached, torch comes
# from PyPI, said in a log line (TORCH_INDEX set to PyPI's simple index asks for that).
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
LATEST := .venv-latest
LOWEST := .venv-lowest
CHECK := .venv-check
UV := .venv-lock/bin/uv

# torch at the lower end of its range (requirements/base.txt), for make test-lowest and make test-check.
LOWEST_TORCH := $(shell sed -n 's/^torch>=\([0-9.]*\).*/torch==\1/p' requirements/base.txt)

# $(call install_torch,VENV[,SPEC]): SPEC (TORCH_SPEC by default) from TORCH_INDEX, unless VENV has torch.
install_torch = $(1)/bin/python -c "import torch" 2>/dev/null \
	|| $(1)/bin/pip install --quiet --retries 1 --timeout 20 --index-url $(TORCH_INDEX) "$(or $(2),$(TORCH_SPEC))" \
	|| { echo "torch: $(TORCH_INDEX) cannot be reached: $(or $(2),$(TORCH_SPEC)) from PyPI instead (on Linux, the CUDA build)"; \
	     $(1)/bin/pip install --quiet "$(or $(2),$(TORCH_SPEC))"; }
# $(call torch_held,VENV): a constraint file holding the installed torch, so that no later step swaps it.
torch_held = $(1)/bin/python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(1)/torch-held.txt
# $(call versions,VENV,NAME): one line naming what the environment runs.
versions = $(1)/bin/python -c "import torch, transformers, accelerate, datasets, tokenizers; \
	print('$(2):', *(f'{m.__name__} {m.__version__}' for m in (torch, transformers, accelerate, datasets, tokenizers)))"

.PHONY: setup demo tiny test test-latest test-lowest test-check lock clean

setup: $(VENV)/.installed

# The tested versions: every package exact, from requirements.lock (`make lock` writes it).
$(VENV)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(call install_torch,$(VENV))
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

# Stage 1 reads five handwriting fonts ("synthetic hands"); stage 2 fine-tunes that model on a
# sixth it never saw ("a new writer"). docs/demo.md has the figures and why these sizes.
HANDS := caveat dancing-script indie-flower kalam yellowtail
NEW_HAND := zeyada

data/synthetic/dataset_dict.json: data_scripts/make_synthetic.py | setup
	$(BIN)/python data_scripts/make_synthetic.py --output_dir data/synthetic --num_train 20000 --fonts $(HANDS)

data/newhand/dataset_dict.json: data_scripts/make_synthetic.py | setup
	$(BIN)/python data_scripts/make_synthetic.py --output_dir data/newhand --num_train 2000 --fonts $(NEW_HAND) --seed 1

models/demo/config.json: data/synthetic/dataset_dict.json data_scripts/make_tiny_model.py data_scripts/pretrain_encoder.py
	$(BIN)/python data_scripts/make_tiny_model.py --dataset data/synthetic --output_dir models/demo --preset demo

# Runs of an older demo model would resume with the old weights: start afresh instead.
demo: models/demo/config.json data/newhand/dataset_dict.json
	@if [ -d runs/demo ] && [ models/demo/config.json -nt runs/demo ]; then \
		echo "models/demo is newer than runs/demo: removing the old runs"; rm -rf runs/demo runs/demo-newhand; fi
	$(BIN)/python run_trocr.py recipes/demo.json
	$(BIN)/python run_trocr.py recipes/demo_newhand.json
	$(BIN)/python data_scripts/demo_report.py

data/tiny/dataset_dict.json: data_scripts/make_synthetic.py | setup
	$(BIN)/python data_scripts/make_synthetic.py --output_dir data/tiny --num_train 32 --num_validation 8 --num_test 7

models/tiny/config.json: data/tiny/dataset_dict.json data_scripts/make_tiny_model.py
	$(BIN)/python data_scripts/make_tiny_model.py --dataset data/tiny --output_dir models/tiny --preset tiny

# The data and model recipes/tiny.json reads.
tiny: models/tiny/config.json

test: setup
	$(BIN)/python -m pytest tests

# The newest releases requirements.txt allows, upgraded at every call, in an environment of their own
# (torch as installed first: TORCH_SPEC="torch>=2.6,<2.14" for the newest in range).
test-latest:
	@test -x $(LATEST)/bin/python || $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/pip install --quiet --upgrade pip
	$(call install_torch,$(LATEST))
	$(call torch_held,$(LATEST))
	$(LATEST)/bin/pip install --quiet --upgrade --upgrade-strategy eager -r requirements.txt -c $(LATEST)/torch-held.txt
	$(LATEST)/bin/pip install --quiet --no-deps --no-build-isolation -e .
	$(call versions,$(LATEST),latest)
	$(LATEST)/bin/python -m pytest tests

$(UV):
	$(PYTHON) -m venv .venv-lock && .venv-lock/bin/pip install --quiet uv

# The lowest releases requirements.txt allows (its ranges' lower ends; the packages they need as uv
# resolves them), exact, in an environment of their own; torch first, at its lower end there (LOWEST_TORCH).
test-lowest: $(UV)
	@test -x $(LOWEST)/bin/python || $(PYTHON) -m venv $(LOWEST)
	$(LOWEST)/bin/pip install --quiet --upgrade pip
	$(call install_torch,$(LOWEST),$(LOWEST_TORCH))
	$(call torch_held,$(LOWEST))
	printf 'torch\n' > $(LOWEST)/excludes.txt
	$(UV) pip compile requirements.txt --resolution lowest-direct --excludes $(LOWEST)/excludes.txt \
		--python-version 3.11 --quiet -o $(LOWEST)/requirements.txt
	$(LOWEST)/bin/pip install --quiet -r $(LOWEST)/requirements.txt -c $(LOWEST)/torch-held.txt
	$(LOWEST)/bin/pip install --quiet --no-deps --no-build-isolation -e .
	$(call versions,$(LOWEST),lowest)
	$(LOWEST)/bin/python -m pytest tests

# The checks of your own loop alone, in an environment as a researcher's on the oldest transformers
# they serve: torch, then CHECK_TRANSFORMERS, then `pip install -e .` as the README says (it must upgrade
# nothing already installed and bring no test or font package), then the tests' extra and the tests.
CHECK_TRANSFORMERS ?= transformers==4.46.3
CHECK_TESTS := tests/test_check_alone.py tests/test_loopcheck.py tests/test_compare_runs.py \
	$(addprefix tests/test_examples.py::test_,the_check_tools_come_from_the_installed_project \
	check_names_each_mistake_of_the_broken_loop check_passes_the_fixed_loop check_loop_cli_on_a_saved_batch \
	the_loop_trains_without_the_project)
test-check:
	@test -x $(CHECK)/bin/python || $(PYTHON) -m venv $(CHECK)
	$(CHECK)/bin/pip install --quiet --upgrade pip
	$(call install_torch,$(CHECK),$(LOWEST_TORCH))
	$(CHECK)/bin/pip install --quiet "$(CHECK_TRANSFORMERS)"
	$(CHECK)/bin/pip freeze --exclude-editable | sort > $(CHECK)/before.txt
	$(CHECK)/bin/pip install --quiet -e .
	$(CHECK)/bin/pip freeze --exclude-editable | sort > $(CHECK)/after.txt
	$(CHECK)/bin/python requirements/installed_changes.py $(CHECK)/before.txt $(CHECK)/after.txt
	$(CHECK)/bin/pip install --quiet -e ".[test]" "$(CHECK_TRANSFORMERS)"
	$(call versions,$(CHECK),check)
	$(CHECK)/bin/python -m pytest $(CHECK_TESTS)

# Rewrites requirements.lock: the newest versions in range, less what requirements.lock.in holds back.
# torch is left out (it is installed first, TORCH_SPEC from TORCH_INDEX).
lock:
	@test -x .venv-lock/bin/uv || ($(PYTHON) -m venv .venv-lock && .venv-lock/bin/pip install --quiet uv)
	printf 'torch\n' > .lock-excludes.txt
	.venv-lock/bin/uv pip compile requirements.txt -c requirements.lock.in --excludes .lock-excludes.txt --upgrade \
		--python-version 3.11 --custom-compile-command "make lock" -o requirements.lock
	rm -f .lock-excludes.txt

clean:
	rm -rf runs data/tiny data/synthetic data/newhand models/tiny models/demo
