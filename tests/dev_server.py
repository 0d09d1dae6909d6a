"""Serve an app with Werkzeug's development server, as the seed suggests:
``python tests/dev_server.py PORT threaded`` (a thread per request) or ``... PORT processes=4`` (a fork
per request).  Tally's app by default (built by ``create_app``, settings from FLASK_* variables, as for
gunicorn); a third argument ``module:attribute`` serves another app (the naive ones in tests/)."""

import importlib
import sys

if __name__ == "__main__":
    port, model = int(sys.argv[1]), sys.argv[2]
    target = sys.argv[3] if len(sys.argv) > 3 else "app:app"
    if model == "threaded":
        options = {"threaded": True}
    else:
        options = {"threaded": False, "processes": int(model.split("=")[1])}
    if target == "app:app":
        from app import create_app

        application = create_app()
    else:
        module, _, attribute = target.partition(":")
        application = getattr(importlib.import_module(module), attribute)
    application.run(host="127.0.0.1", port=port, **options)
