# The whole set-up on a new machine: `make run` serves the app, `make test` runs the suite.
# Both install the versions locked in requirements/ (run.txt, dev.txt), never whatever was released
# that morning; `make lock` refreshes the lock on purpose, `make test-latest` and `make test-oldest`
# run the suite against the newest releases and the lowest versions pyproject.toml allows.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
UV := $(VENV)/bin/uv
ALL_EXTRAS := demo,memcached,redis,sql,limits,gevent,charts,docs,test
# The test tools stay at the lock in test-oldest: the lowest versions are a promise of the library's.
TOOLS := pytest|pytest-xdist|pytest-lazy-fixtures|ruff|mypy|selenium|hypothesis|sphinx|myst-parser|gevent|uv|pip|setuptools
LOCK_OPTIONS := --universal --python-version 3.11 -q
# The project installs editable, built by the locked setuptools in the venv itself; uv's build lock
# file goes in the venv, not in /tmp.
INSTALL_SELF = mkdir -p $(VENV)/tmp && TMPDIR=$(CURDIR)/$(VENV)/tmp \
	$(UV) pip install -q --python $(1) --no-deps --no-build-isolation -e .

.PHONY: run test test-latest test-oldest lock stress bench race-report lint servers clean

# uv, at the version the lock names, installed with the pip the new venv brings.
$(UV): requirements/dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check "$$(grep -m1 '^uv==' requirements/dev.txt)"
	touch $@

# pylibmc (Flask-Caching's MemcachedCache) ships wheels up to CPython 3.11; on a newer Python it
# compiles against libmemcached and zlib: as root with apt, their headers are installed and the sync
# tried once more.  `make run` then still serves the filesystem store without pylibmc, with a warning.
define sync
$(UV) pip sync -q --python $(PY) $(1) || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null \
	&& echo "pylibmc needs libmemcached and zlib headers here: installing libmemcached-dev zlib1g-dev" \
	&& apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libmemcached-dev zlib1g-dev >/dev/null \
	&& $(UV) pip sync -q --python $(PY) $(1); }
endef

# The venv holds exactly the lock (sync removes what it does not name), then the project, editable.
$(VENV)/.base: $(UV) requirements/run.txt pyproject.toml
	$(call sync,requirements/run.txt) || { grep -v '^pylibmc==' requirements/run.txt > $(VENV)/run-without-pylibmc.txt \
		&& $(UV) pip sync -q --python $(PY) $(VENV)/run-without-pylibmc.txt \
		&& echo "warning: pylibmc not installed; every store but Flask-Caching's MemcachedCache works (docs/developing.md, Install)"; }
	$(call INSTALL_SELF,$(PY))
	touch $@

$(VENV)/.test: $(VENV)/.base requirements/dev.txt
	$(call sync,requirements/dev.txt)
	$(call INSTALL_SELF,$(PY))
	touch $@

# Refresh the lock from pyproject.toml's ranges (the newest releases they admit), then run make test.
lock: $(UV)
	$(UV) pip compile $(LOCK_OPTIONS) --upgrade pyproject.toml requirements/tools.in --all-extras -o requirements/dev.txt
	$(UV) pip compile $(LOCK_OPTIONS) --upgrade pyproject.toml requirements/tools.in -c requirements/dev.txt \
		--extra demo --extra memcached --extra redis --extra sql -o requirements/run.txt

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

# Three pytest-xdist workers by default: the load tests (gunicorn, development servers, the limits
# hammer) one at a time on one of them (tests/conftest.py puts them in one xdist group; tests marked
# light, a server but no timing, stay out of it), everything else on the others, many of whose tests
# wait (lifetimes, windows) more than they compute.  pytest stays below
# 9.2 until pytest-xdist honours groups there (#1386); a run that loses them stops at collection.
# TALLY_LOCK: tests/test_lock.py checks that the venv holds exactly that lock.
TEST_WORKERS ?= 3
PYTEST_ARGS = $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadgroup)
test: $(VENV)/.test servers
	TALLY_LOCK=requirements/dev.txt $(PY) -m pytest $(PYTEST_ARGS)

# The suite in a venv of its own on the newest releases pyproject.toml's ranges admit today.
test-latest: $(UV) servers
	$(UV) venv -q --allow-existing --python $(PYTHON) .venv-latest
	mkdir -p $(VENV)/tmp && TMPDIR=$(CURDIR)/$(VENV)/tmp $(UV) pip install -q --python .venv-latest/bin/python \
		--upgrade -r requirements/tools.in -e '.[$(ALL_EXTRAS)]'
	.venv-latest/bin/python -m pytest $(PYTEST_ARGS)

# The suite on the lowest versions pyproject.toml's ranges allow for every direct dependency of the
# library and the demo (uv's lowest-direct resolution), the test tools kept at the lock.
test-oldest: $(UV) servers
	$(UV) venv -q --allow-existing --python $(PYTHON) .venv-oldest
	grep -E '^($(TOOLS))==' requirements/dev.txt > .venv-oldest/tools.txt
	$(UV) pip compile $(LOCK_OPTIONS) --resolution lowest-direct --override .venv-oldest/tools.txt \
		pyproject.toml requirements/tools.in --all-extras -o .venv-oldest/requirements.txt
	mkdir -p $(VENV)/tmp && TMPDIR=$(CURDIR)/$(VENV)/tmp \
		$(UV) pip sync -q --python .venv-oldest/bin/python .venv-oldest/requirements.txt
	$(call INSTALL_SELF,.venv-oldest/bin/python)
	@# The annotations are checked on the lock and the newest releases (older redis-py ships others).
	.venv-oldest/bin/python -m pytest $(PYTEST_ARGS) --deselect tests/test_types.py

# The long runs of the race tests: every keep-alive shared-set round 30 times, on fresh gunicorn;
# the Redis failover and partition under load 10 times per topology, each on a fresh topology; the
# PostgreSQL failover and partition scenarios 10 times, each on a fresh primary and standby; every
# shared store under every server model (32 cells; make test runs 8 of them), and every store under
# each load test that make test runs on a few (tests.conftest.matrix); limits' own suite and
# the rate-limit hammer (every strategy, 4 processes x 8 threads) 20 rounds on every store.
stress: $(VENV)/.test servers
	TALLY_STRESS_ROUNDS=$${TALLY_STRESS_ROUNDS:-30} $(PY) -m pytest -p no:randomly -x tests/test_concurrency.py -k keep_alive_clients
	TALLY_STRESS_ROUNDS=$${TALLY_FAILOVER_ROUNDS:-10} $(PY) -m pytest -p no:randomly -x tests/test_redis_topologies.py -k "failover or partition"
	TALLY_STRESS_ROUNDS=$${TALLY_FAILOVER_ROUNDS:-10} $(PY) -m pytest -p no:randomly -x tests/test_postgres_failover.py
	TALLY_FULL_MATRIX=1 $(PY) -m pytest -p no:randomly -x tests/test_server_models.py tests/test_concurrency.py \
		tests/test_outages.py tests/test_gevent.py tests/test_ratelimits.py -k "not under_contention"
	TALLY_STRESS_ROUNDS=$${TALLY_LIMIT_ROUNDS:-20} $(PY) -m pytest -p no:randomly -x tests/test_limits_suite.py \
		tests/test_ratelimits.py -k "own_storage_tests or under_contention"

bench: $(VENV)/.test servers
	@# wrk drives the HTTP part; without it the bench falls back to (noisier) Python clients.
	@command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; } || echo "note: wrk not installed; HTTP figures use Python clients"
	$(PY) bench/bench.py

race-report: $(VENV)/.test servers
	$(PY) bench/race_report.py

# The documentation (docs/: Sphinx, Markdown pages through MyST), every warning an error; open
# docs/_build/html/index.html.  Phony on its own line: the docs/ directory would otherwise be "up to date".
.PHONY: docs
docs: $(VENV)/.test
	$(PY) -m sphinx -W --keep-going -b html docs docs/_build/html

lint: $(VENV)/.test
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .
	$(PY) -m mypy --strict tally

clean:
	rm -rf $(VENV) .venv-latest .venv-oldest instance .pytest_cache
