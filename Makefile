# Weir: build, run and test on a Debian 12 machine (run as root for `deps`).
#
#   make run    install missing packages, build release, start the demo
#               upstream (127.0.0.1:9001) and the gateway on examples/gateway.yaml
#   make test   install missing packages, build everything, run the whole suite
#   make test-release   the same suite built optimised (what ships runs optimised;
#               release-only failures are lifetimes the optimiser shortens)
#   make bench  side-by-side benchmark (bench/run.sh)

SHELL := /bin/bash
export PATH := /opt/swift/usr/bin:$(PATH)

SWIFT     ?= swift
# Two cores on the reference machine: two compile jobs, and tests in one process
# (integration tests bind real loopback ports and start their own servers).
JOBS      ?= 2
CONFIG    ?= examples/gateway.yaml
DEMO_LISTEN ?= 127.0.0.1:9001

# What building and running need, and what the test suite additionally uses
# (peers and tools that tests start: nginx, HAProxy, Redis, h2 clients).
RUN_PACKAGES  := liblua5.4-dev libnghttp2-dev pkg-config curl
TEST_PACKAGES := $(RUN_PACKAGES) nginx libnginx-mod-http-lua haproxy wrk redis-server python3-h2 nghttp2-client openssl

RELEASE_BIN = $(shell $(SWIFT) build -c release --show-bin-path)/weir
# Release builds turn off Swift's dynamic exclusivity checks in every module,
# SwiftNIO included (Package.swift can only do it for Weir's own targets):
# they were ~11 % of the instructions of a proxied request (callgrind,
# BENCHMARKS.md 2026-11-30 "core"). Debug builds and tests keep them.
# They are also link-time optimised (full LTO): SwiftNIO's per-event calls
# (channel lifecycle getters, pipeline hops, the receive-buffer allocator)
# are inlined into Weir's handlers, ~9 % fewer instructions per proxied
# request (BENCHMARKS.md 2026-11-30 "session 11"), for a longer build.
# bench/lib.sh builds with the same flags.
RELEASE_FLAGS ?= --experimental-lto-mode=full -Xswiftc -enforce-exclusivity=unchecked

.PHONY: deps deps-run build build-debug run test test-release bench clean

# Installs only what is missing; `apt-get update` only when something is.
define install_missing
	@missing=""; \
	for p in $(1); do \
	  dpkg-query -W -f='$${Status}' "$$p" 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  if [ "$$(id -u)" -ne 0 ]; then echo "make deps: run as root to install$$missing" >&2; exit 1; fi; \
	  DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	else echo "packages: all present"; fi
	@command -v $(SWIFT) >/dev/null || { echo "swift not found (expected in /opt/swift/usr/bin)" >&2; exit 1; }
endef

deps:
	$(call install_missing,$(TEST_PACKAGES))

deps-run:
	$(call install_missing,$(RUN_PACKAGES))

build: deps-run
	$(SWIFT) build -c release -j $(JOBS) $(RELEASE_FLAGS)

run: build
	@bin="$(RELEASE_BIN)"; \
	"$$bin" demo-upstream --listen $(DEMO_LISTEN) & demo=$$!; \
	trap 'kill $$demo 2>/dev/null; wait $$demo 2>/dev/null' EXIT INT TERM; \
	"$$bin" run --config $(CONFIG)

# The suite is XCTest only (no Swift Testing suites), so Swift Testing's empty
# run is switched off; the last line is a plain "N passed, N failed" summary
# taken from XCTest's own totals for 'All tests' (not a test class's: when the
# test process crashes, the last "Executed" line is the class that ran before).
# TEST_FLAGS: extra `swift build` / `swift test` options (test-release sets them).
TEST_FLAGS ?=
test: deps
	$(SWIFT) build --build-tests -j $(JOBS) $(TEST_FLAGS)
	@set -o pipefail; mkdir -p .build; \
	$(SWIFT) test --skip-build --disable-swift-testing $(TEST_FLAGS) 2>&1 | tee .build/test-output.log; status=$$?; \
	summary=$$(grep -A1 -E "^Test Suite 'All tests' (passed|failed)" .build/test-output.log \
	  | grep -E "^[[:space:]]*Executed [0-9]+ tests?, with .*[0-9]+ failures?" | tail -1); \
	total=$$(echo "$$summary" | sed -E 's/.*Executed ([0-9]+) tests?.*/\1/'); \
	failed=$$(echo "$$summary" | sed -E 's/.* ([0-9]+) failures?.*/\1/'); \
	skipped=$$(echo "$$summary" | sed -nE 's/.*with ([0-9]+) tests? skipped.*/\1/p'); skipped=$${skipped:-0}; \
	if [ -n "$$summary" ]; then echo "tests: $$((total - failed - skipped)) passed, $$failed failed"; \
	  if [ "$$failed" -gt 0 ]; then status=1; fi; \
	else echo "tests: no XCTest summary for the whole run (the test process crashed or hung?)" >&2; status=1; fi; \
	if [ "$$skipped" -gt 0 ]; then \
	  echo "tests: $$skipped skipped (reasons above); make test expects every test to run, deps installs their prerequisites" >&2; status=1; fi; \
	exit $$status

# The suite on a release build (own scratch folder; -enable-testing for
# @testable imports). Without LTO: it doubles the link, and the release-only
# failures seen so far were the same with and without it.
RELEASE_TEST_FLAGS = -c release --scratch-path .build-reltest -Xswiftc -enforce-exclusivity=unchecked -Xswiftc -enable-testing
test-release:
	$(MAKE) test TEST_FLAGS="$(RELEASE_TEST_FLAGS)"

# bench/run.sh builds its own release binary (in .build-bench); pass options
# with BENCH_ARGS, e.g. make bench BENCH_ARGS="--runs 1 --duration 5".
BENCH_ARGS ?=
bench: deps
	bench/run.sh $(BENCH_ARGS)

clean:
	rm -rf .build
