# The two commands that must always work on a fresh machine:
#   make demo   set up, then run the whole pipeline at small scale on the built-in French corpus
#   make test   set up, then run the whole test suite
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# Debian packages: French documentation (the demo corpus) and Chromium (the browser test).
APT_PACKAGES := debian-handbook debian-reference-fr manpages-fr chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# llama.cpp's own sources (from the llama-cpp-python sdist on PyPI): the tests check our GGUF
# export byte for byte against its convert_hf_to_gguf.py.
LLAMA_CPP_SRC := .cache/llama-cpp-src

.PHONY: install install-system llama-cpp-src test demo clean

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

llama-cpp-src: install
	@v=$$($(PYTHON) -c "import importlib.metadata as m; print(m.version('llama-cpp-python'))"); \
	if [ ! -d $(LLAMA_CPP_SRC)/llama_cpp_python-$$v/vendor/llama.cpp ]; then \
	  mkdir -p $(LLAMA_CPP_SRC) && \
	  $(PIP) download -q --no-deps --no-binary :all: "llama-cpp-python==$$v" -d $(LLAMA_CPP_SRC) && \
	  tar -xzf $(LLAMA_CPP_SRC)/llama_cpp_python-$$v.tar.gz -C $(LLAMA_CPP_SRC); \
	fi

test: install llama-cpp-src
	LLAMA_CPP_DIR=$$(ls -d $(CURDIR)/$(LLAMA_CPP_SRC)/llama_cpp_python-*/vendor/llama.cpp | tail -n 1) $(PYTHON) -m pytest -q

demo: install
	$(PYTHON) -m apps.quickstart $(DEMO_ARGS)

clean:
	rm -rf runs .pytest_cache tests/artifacts .cache
