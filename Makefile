# `make demo` and `make test` set everything up on first use (tools/setup_env.sh is idempotent).
SHELL := /bin/bash
RUN := tools/with_env.sh
PYTEST_ARGS ?=
# pytest-xdist workers; the DDS tests (marked ros) stay together on one of them (test/conftest.py)
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist loadgroup

.PHONY: setup test test-fast demo bench clean

setup:
	@tools/setup_env.sh

test: setup
	$(RUN) python -m pytest test $(XDIST) $(PYTEST_ARGS)

# Skips the slow full-size export and rosbag-replay tests.
test-fast: setup
	$(RUN) python -m pytest test -m "not slow" $(XDIST) $(PYTEST_ARGS)

demo: setup
	$(RUN) megaloc-ros demo --output demo_out

bench: setup
	$(RUN) megaloc-ros bench encoder
	$(RUN) megaloc-ros bench map

clean:
	rm -rf .ros demo_out .pytest_cache
