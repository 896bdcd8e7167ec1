# Two commands set everything up: `make run` and `make test` (see README.md).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install install-dev run test lint bench

$(VENV)/.installed: requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# The admin's browser tests drive Debian's chromium (playwright cannot download its own here).
$(VENV)/.installed-dev: $(VENV)/.installed requirements-dev.txt
	$(PY) -m pip install -q -r requirements-dev.txt
	test -x /usr/bin/chromium || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } || \
		{ echo "Install Debian's chromium (apt-get install chromium, as root) for tests/test_admin_browser.py" >&2; exit 1; }
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

run: install
	$(PY) manage.py migrate --noinput
	@# What ensure_admin said (a first password) goes to the box serve.sh shows once the gateway is up.
	@admin="$$($(PY) manage.py ensure_admin)" && echo "$$admin" && \
		ADMIN_NOTE="$$admin" HOST=$(HOST) PORT=$(PORT) bash scripts/serve.sh

lint: install-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	DJANGO_SECRET_KEY=$${DJANGO_SECRET_KEY:-lint-only-secret} $(VENV)/bin/mypy accounts billing routing_rules gateway management_api dwctl_site common

# A fixed key for test databases only (they are thrown away): never encrypt a real credential with it.
TEST_ENCRYPTION_KEY := TGkIq7DIOkmcbWZFFEbMGaXyr9dQXowBubB_hyt2Edk=

test: lint
	DJANGO_SECRET_KEY=$${DJANGO_SECRET_KEY:-test-only-secret} \
	GATEWAY_ENCRYPTION_KEYS=$${GATEWAY_ENCRYPTION_KEYS:-$(TEST_ENCRYPTION_KEY)} $(VENV)/bin/pytest

bench: install-dev
	bash bench/run.sh
