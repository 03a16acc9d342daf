# mailflow: `make run` runs the whole local stack, `make test` runs the test suite.
# Both install what is missing first: Debian packages, a virtual environment with
# the Python packages, and the Kafka broker's jars (through Maven, cached).

VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
DEBIAN_PKGS := clamav clamav-daemon rspamd dnsmasq-base postfix prometheus chromium openjdk-17-jre-headless maven
# Executables that tell whether the Debian packages above are installed.
DEBIAN_BINS := clamd sigtool rspamd dnsmasq smtp-sink promtool chromium java mvn

export MAILFLOW_SMTP_ROUTES ?= *=127.0.0.1:2525

.PHONY: setup deps-debian venv jars run test test-all lint bench clean

setup: deps-debian venv jars

deps-debian:
	@missing=""; for b in $(DEBIAN_BINS); do \
	  command -v $$b >/dev/null 2>&1 || [ -x /usr/sbin/$$b ] || [ -x /usr/lib/postfix/sbin/$$b ] || missing="$$missing $$b"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages (missing:$$missing)"; \
	  [ "$$(id -u)" = 0 ] && SUDO= || SUDO=sudo; \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends $(DEBIAN_PKGS); \
	fi
	@# The Debian packages start system instances; ours run on our own configs and ports.
	@for s in clamav-daemon clamav-freshclam rspamd postfix prometheus prometheus-node-exporter; do \
	  (command -v systemctl >/dev/null && systemctl stop $$s >/dev/null 2>&1) || true; done

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

jars: venv
	$(PY) -c 'from devtools.broker import ensure_jars; ensure_jars()'

run: setup
	$(VENV)/bin/mailflow up

test: setup
	$(VENV)/bin/pytest -q

test-all: setup
	$(VENV)/bin/pytest -q -m ''

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench: setup
	$(VENV)/bin/mailflow bench

clean:
	rm -rf var .pytest_cache
