"""Gunicorn settings for `gunicorn -c python:host.gunicorn_conf wsgi:app` (what `strategy-host run` uses)."""
from host.server import WORKER_CLASS, post_worker_init, worker_exit  # noqa: F401  (gunicorn reads these names)

worker_class = WORKER_CLASS
workers = 1
threads = 4  # more let a burst of webhooks starve the engine and sender of the GIL (README, "Serving")
graceful_timeout = 30
