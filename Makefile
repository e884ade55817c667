# The two commands of the README: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ember-installed

.PHONY: demo test bench clean sysdeps

# Debian packages the cross-target tests need (tests skip, saying why, where they are missing):
#   rocm-device-libs, lld-16  ROCm code objects (device bitcode; lld >= 15 links code object v5); lld-16 also
#                             brings ld64.lld, the Mach-O linker of Metal artifacts
#   g++-aarch64-linux-gnu     arm64 artifacts and the aarch64 test runner;  qemu-user: runs them here
# Cost on a fresh Debian 12 machine: ~95 MB download, ~30-40 s (README "Targets"). Installs only what is missing,
# only as root with apt-get; never fails the build.
SYSDEPS := rocm-device-libs lld-16 g++-aarch64-linux-gnu qemu-user

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ember demo

sysdeps:
	@missing=""; for p in $(SYSDEPS); do dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" \
	  || missing="$$missing $$p"; done; \
	if [ -z "$$missing" ]; then echo "sysdeps: installed ($(SYSDEPS))"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then echo "sysdeps: installing$$missing"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	  $$missing) > .sysdeps.log 2>&1 || echo "sysdeps: apt-get failed (see .sysdeps.log): those tests will skip"; \
	else echo "sysdeps: missing$$missing (needs root and apt-get): the ROCm/ARM/Metal tests will skip"; fi

test: $(STAMP) sysdeps
	$(PY) -m pytest -q -m "not gpu" tests

bench: $(STAMP)
	$(PY) benchmarks/minilm_cpu.py

clean:
	rm -rf $(VENV) artifacts .pytest_cache
