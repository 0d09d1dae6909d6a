"""Gunicorn settings for the naive comparison apps: the same workers and threads as Tally's."""

import os

bind = os.environ["TALLY_BIND"]
workers = int(os.environ.get("TALLY_WORKERS", "4"))
threads = int(os.environ.get("TALLY_THREADS", "8"))
worker_class = "gthread" if threads > 1 else "sync"
pythonpath = os.path.dirname(os.path.abspath(__file__))
control_socket_disable = True
