"""Serve Tally's app with Werkzeug's development server, as the seed suggests:
``python tests/dev_server.py PORT threaded`` (a thread per request) or ``... PORT processes=4`` (a fork
per request).  Settings come from FLASK_* variables, as for gunicorn."""

import sys

from app import create_app

if __name__ == "__main__":
    port, model = int(sys.argv[1]), sys.argv[2]
    if model == "threaded":
        options = {"threaded": True}
    else:
        options = {"threaded": False, "processes": int(model.split("=")[1])}
    create_app().run(host="127.0.0.1", port=port, **options)
