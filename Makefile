# The two commands that must always work on a fresh machine:
#   make demo   set up, then run the whole pipeline at small scale on the built-in French corpus
#   make test   set up, then run the whole test suite
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# Debian packages: French documentation (the demo corpus) and Chromium (the browser test).
APT_PACKAGES := debian-handbook debian-reference-fr manpages-fr chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install install-system test demo clean

install-system:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq $$missing >/dev/null; \
	fi

install: install-system
	@# A CPU build of torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install "torch==2.13.0"
	$(PIP) install -q -e ".[dev]"

test: install
	$(PYTHON) -m pytest -q

demo: install
	$(PYTHON) -m apps.quickstart $(DEMO_ARGS)

clean:
	rm -rf runs .pytest_cache tests/artifacts
