"""Hammer one limit with limits' own strategies from several processes, each with threads.

``python -m tests.limits_hammer SPEC`` (SPEC: JSON with ``settings``, ``storage``, ``processes``,
``threads``, ``hits``, ``limit``, ``key``) forks ``processes`` processes before any app exists; each
builds its own bare Flask app on ``settings`` (as a worker or another host would), and its ``threads``
threads each try ``hits`` hits of every strategy on one key.  Prints a JSON object: for each strategy,
how many hits were let through in all.  ``storage`` is ``"tally://"`` (the app's counters' store) or a
limits URI of its own such as ``"memory://"`` (the naive variant: a limit per process).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import tempfile
import threading

STRATEGIES = ("fixed-window", "moving-window", "sliding-window-counter")


def _worker(spec: dict, barrier, results) -> None:
    try:
        results.put(_hammer(spec, barrier))
    except BaseException as error:  # reported, not lost: the parent would wait for it otherwise
        barrier.abort()
        results.put({"error": f"{type(error).__name__}: {error}"})


def _hammer(spec: dict, barrier) -> dict[str, int]:
    import flask

    with tempfile.TemporaryDirectory(prefix="tally-hammer-") as instance:
        return _hammer_in(spec, barrier, flask.Flask("hammer", instance_path=instance))


def _hammer_in(spec: dict, barrier, app) -> dict[str, int]:
    from flask_caching import Cache
    from limits import parse
    from limits.storage import storage_from_string
    from limits.strategies import STRATEGIES as LIMITERS

    import tally

    app.config.update(spec["settings"])
    cache = Cache()
    cache.init_app(app)
    counters = tally.Counters(cache)
    counters.init_app(app)
    storage = (
        storage_from_string("tally://", counters=counters)
        if spec["storage"] == "tally://"
        else storage_from_string(spec["storage"])
    )
    item = parse(f"{spec['limit']} per hour")
    passed = {name: 0 for name in STRATEGIES}
    failures: list[str] = []
    lock = threading.Lock()

    def hammer() -> None:
        try:
            with app.app_context():
                for name in STRATEGIES:
                    limiter = LIMITERS[name](storage)
                    for _ in range(spec["hits"]):
                        if limiter.hit(item, spec["key"], name):
                            with lock:
                                passed[name] += 1
        except Exception as error:
            failures.append(f"{type(error).__name__}: {error}")

    threads = [threading.Thread(target=hammer) for _ in range(spec["threads"])]
    barrier.wait(timeout=60)  # every process ready: the hits overlap
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    app.extensions["tally"].close()
    if failures:
        raise RuntimeError(f"{len(failures)} threads failed, the first with {failures[0]}")
    return passed


def main(spec: dict) -> dict[str, int]:
    context = multiprocessing.get_context("fork")
    barrier = context.Barrier(spec["processes"])
    results = context.Queue()
    processes = [
        context.Process(target=_worker, args=(spec, barrier, results)) for _ in range(spec["processes"])
    ]
    for process in processes:
        process.start()
    totals = {name: 0 for name in STRATEGIES}
    errors = []
    for _ in processes:
        result = results.get(timeout=180)
        if "error" in result:
            errors.append(result["error"])
            continue
        for name, count in result.items():
            totals[name] += count
    for process in processes:
        process.join(timeout=30)
        if process.is_alive():
            os.kill(process.pid, 9)
    if errors:
        raise SystemExit(f"{len(errors)} of {len(processes)} processes failed: {errors}")
    return totals


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
