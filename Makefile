# Set-up and checks. `make install` is idempotent: a second run only re-checks the venv.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# torch/torchvision pinned to the builds on this machine's disk (see DEVELOPERS.md).
TORCH := torch==2.14.1 torchvision==0.29.1

.PHONY: install install-browser test lint format bench bench-serve fuzz clean

install:
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip 2>/dev/null || true
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[fast,serve,ray,dev]'
	$(BIN)/stackvision --version
	$(MAKE) install-browser

# Headless Chromium for tests/test_web.py (Debian packages). Never fails the install: without apt
# or root the web test skips and says why.
install-browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then \
		echo "chromium and chromedriver present"; \
	elif command -v apt-get >/dev/null 2>&1; then \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo -n ); \
		( $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
		  $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null ) \
		|| echo "warning: could not install chromium/chromium-driver; tests/test_web.py will skip"; \
	else \
		echo "warning: no apt-get; install chromium + chromedriver to run tests/test_web.py"; \
	fi

test:
	$(BIN)/python -m pytest -q

lint:
	$(BIN)/ruff check src tests benchmarks fuzz
	$(BIN)/ruff format --check src tests benchmarks fuzz

format:
	$(BIN)/ruff check --fix src tests benchmarks fuzz
	$(BIN)/ruff format src tests benchmarks fuzz

# Fuzz the parsers of untrusted input (image decoder, labels CSV, manifest, HTTP body, image
# preparation) with Hypothesis: FUZZ_EXAMPLES inputs per target over FUZZ_WORKERS processes. Not
# part of `make test`; findings land in fuzz/findings/, the figures in fuzz/report.json.
FUZZ_EXAMPLES ?= 100000
FUZZ_WORKERS ?= 2
fuzz:
	$(BIN)/python fuzz/run.py --targets decode,csv,manifest,http,prepare \
		--examples $(FUZZ_EXAMPLES) --workers $(FUZZ_WORKERS)

bench:
	$(BIN)/python benchmarks/accuracy.py

bench-serve:
	$(BIN)/python benchmarks/serve_load.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .ruff_cache
