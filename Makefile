# The whole set-up on a new machine: `make run` serves the app, `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STORE_EXTRAS := .[demo,memcached,redis,sql]
TEST_EXTRAS := .[demo,memcached,redis,sql,test]

.PHONY: run test stress bench race-report lint servers clean

# pylibmc ships wheels up to CPython 3.11; on a newer Python it compiles against libmemcached and
# zlib: as root with apt, their headers are installed and the install tried once more.
define install_with_headers
$(PIP) install -e '$(1)' || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	&& echo "pylibmc needs libmemcached and zlib headers here: installing libmemcached-dev zlib1g-dev" \
	&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libmemcached-dev zlib1g-dev >/dev/null \
	&& $(PIP) install -e '$(1)'; }
endef

$(VENV)/.base: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	@# A venv made before the distribution was renamed flask-tally holds "tally", which also put the demo's
	@# modules on the path: take it out.
	$(PIP) uninstall -y -q tally 2>/dev/null || true
	$(PIP) install -e '.[demo]'
	@# The memcached and Redis clients are extras: the filesystem default works without them.
	$(call install_with_headers,$(STORE_EXTRAS)) || echo "warning: pylibmc/redis not installed; the filesystem and memory stores still work (see README, Install)"
	touch $@

$(VENV)/.test: $(VENV)/.base
	$(call install_with_headers,$(TEST_EXTRAS)) || { echo "make test needs pylibmc: see README, Install"; exit 1; }
	touch $@

# The page's race section (RACE_DEMO: the naive global-variable route beside Tally's) is on here.
run: $(VENV)/.base
	FLASK_RACE_DEMO=$${FLASK_RACE_DEMO:-true} $(VENV)/bin/gunicorn -c gunicorn.conf.py app:app

# The tests start real memcached, redis-server and PostgreSQL (initdb + postgres, found on PATH or in
# Debian's /usr/lib/postgresql/*/bin) processes and drive headless Chromium.  Redis Sentinel is
# redis-server's own --sentinel mode, and redis-cli (Debian's redis-tools, which redis-server pulls
# in) builds the test cluster: nothing more to install for them.
HAVE_POSTGRES = { command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; }
servers:
	@if command -v memcached >/dev/null && command -v redis-server >/dev/null && command -v redis-cli >/dev/null \
		&& command -v chromium >/dev/null && command -v chromedriver >/dev/null && $(HAVE_POSTGRES); then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			memcached redis-server redis-tools chromium chromium-driver postgresql >/dev/null; \
	else \
		echo "make test needs memcached, redis-server, PostgreSQL, chromium and chromedriver:"; \
		echo "  Debian: sudo apt-get install memcached redis-server postgresql chromium chromium-driver"; exit 1; \
	fi

# Two pytest-xdist workers by default: the load tests (gunicorn, development servers, the limits
# hammer) one at a time on one of them (tests/conftest.py puts them in one xdist group; tests marked
# light, a server but no timing, stay out of it), everything else on the other.  pytest stays below
# 9.2 until pytest-xdist honours groups there (#1386); a run that loses them stops at collection.  Tests built in the test process get a 2 s COUNTER_TIMEOUT (IN_PROCESS_TIMEOUT)
# and load-test servers 5 s, so a slow step beside the load tests is not taken for a fault.
# TEST_WORKERS=0: one process (about 13 minutes here); 7:33 in all from a fresh clone with two.
TEST_WORKERS ?= 2
test: $(VENV)/.test servers
	$(PY) -m pytest $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadgroup)

# The long runs of the race tests: every keep-alive shared-set round 30 times, on fresh gunicorn;
# the Redis failover and partition under load 10 times per topology, each on a fresh topology; the
# PostgreSQL failover and partition scenarios 10 times, each on a fresh primary and standby; every
# shared store under every server model (32 cells; make test runs 8 of them).
stress: $(VENV)/.test servers
	TALLY_STRESS_ROUNDS=$${TALLY_STRESS_ROUNDS:-30} $(PY) -m pytest -p no:randomly -x tests/test_concurrency.py -k keep_alive_clients
	TALLY_STRESS_ROUNDS=$${TALLY_FAILOVER_ROUNDS:-10} $(PY) -m pytest -p no:randomly -x tests/test_redis_topologies.py -k "failover or partition"
	TALLY_STRESS_ROUNDS=$${TALLY_FAILOVER_ROUNDS:-10} $(PY) -m pytest -p no:randomly -x tests/test_postgres_failover.py
	TALLY_FULL_MATRIX=1 $(PY) -m pytest -p no:randomly -x tests/test_server_models.py

bench: $(VENV)/.test servers
	$(PY) -c "import matplotlib" 2>/dev/null || $(PIP) install -e '.[charts]'
	@# wrk drives the HTTP part; without it the bench falls back to (noisier) Python clients.
	@command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; } || echo "note: wrk not installed; HTTP figures use Python clients"
	$(PY) bench/bench.py

race-report: $(VENV)/.test servers
	$(PY) -c "import matplotlib" 2>/dev/null || $(PIP) install -e '.[charts]'
	$(PY) bench/race_report.py

# The documentation (docs/: Sphinx, Markdown pages through MyST), every warning an error; open
# docs/_build/html/index.html.  Phony on its own line: the docs/ directory would otherwise be "up to date".
.PHONY: docs
docs: $(VENV)/.base
	$(PY) -c "import sphinx, myst_parser" 2>/dev/null || $(PIP) install -e '.[docs]'
	$(PY) -m sphinx -W --keep-going -b html docs docs/_build/html

lint: $(VENV)/.test
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
	$(PY) -m mypy --strict tally

clean:
	rm -rf $(VENV) instance .pytest_cache
