"""Gunicorn serving: buffering gthread workers; the engine starts in the worker that takes the engine lock."""
from __future__ import annotations

import logging
from typing import Any, Optional

from gunicorn.app.base import BaseApplication

from .config import Settings

log = logging.getLogger(__name__)
WORKER_CLASS = "host.http_worker.BufferingThreadWorker"  # gthread that reads whole requests before a thread


def _runtime(worker: Any) -> Any:
    return worker.wsgi.extensions["host"]


def post_worker_init(worker: Any) -> None:
    """Start the engine in this worker if it gets the lock; other workers stand by to take over.

    With several workers, the engine's worker takes no connections: the others serve every request, so
    a burst of webhooks never competes with the engine for its process (one Python thread at a time).
    A worker that takes the engine over later (its holder died, or a reload) goes on serving as well. While
    no other worker serves (SIGTTOU left only this one, or one is being replaced), this one does.
    """
    rt = _runtime(worker)
    if hasattr(worker, "configure"):  # host.http_worker.BufferingThreadWorker
        from .http_intake import HttpLimits
        worker.configure(HttpLimits.from_settings(rt.settings))
    from .locks import ServingMark
    from .runtime import EngineBusy
    serving = ServingMark(rt.settings.data_dir / "serving.lock")
    try:
        rt.start_engine()
    except EngineBusy:
        worker.log.info("engine runs in another worker; this worker accepts webhooks and stands by")
        serving.hold()
        worker.serving_mark = serving  # its descriptor holds the shared lock for this process's life
        rt.start_engine_when_free()
        return
    if worker.cfg.workers > 1 and hasattr(worker, "takes_connections"):
        worker.takes_connections = False  # while another worker serves: with none left, this one does
        worker.others_serve = serving.held_elsewhere
        worker.log.info("the engine runs in this worker, which takes no connections: the other %d worker(s) "
                        "serve every request", worker.cfg.workers - 1)


def worker_exit(server: Any, worker: Any) -> None:
    """After in-flight requests finish: let the engine finish its work and stop."""
    try:
        _runtime(worker).stop()
    except Exception:  # a worker must still exit
        worker.log.exception("engine stop failed")


class HostServer(BaseApplication):
    """Gunicorn with our defaults; GUNICORN_CMD_ARGS and a config file (--gunicorn-conf) override them."""

    def __init__(self, app_factory: Any, settings: Settings, workers: int = 1, threads: int = 4,
                 config_file: Optional[str] = None):
        self.app_factory = app_factory
        self.settings = settings
        self.defaults = {
            "bind": f"{settings.HOST}:{settings.PORT}", "worker_class": WORKER_CLASS, "workers": workers,
            "threads": threads, "graceful_timeout": 30, "timeout": 60, "keepalive": 5,
            "post_worker_init": post_worker_init, "worker_exit": worker_exit, "accesslog": None,
            "proc_name": "strategy-host",
        }
        self.config_file = config_file
        super().__init__()

    def load_config(self) -> None:
        for k, v in self.defaults.items():
            self.cfg.set(k, v)
        if "control_socket_disable" in self.cfg.settings:  # gunicorn >= 25.1: one shared socket path would clash
            self.cfg.set("control_socket_disable", True)
        if self.config_file:
            cfg = self.get_config_from_filename(self.config_file)
            for k, v in cfg.items():
                if k in self.cfg.settings and v is not None:
                    self.cfg.set(k.lower(), v)
        env_args = self.cfg.get_cmd_args_from_env()
        if env_args:
            parsed = self.cfg.parser().parse_args(env_args)
            for k, v in vars(parsed).items():
                if v is not None and k in self.cfg.settings and k != "args":
                    self.cfg.set(k.lower(), v)

    def get_config_from_filename(self, filename: str) -> dict:
        namespace: dict = {}
        with open(filename) as f:
            exec(compile(f.read(), filename, "exec"), namespace)
        return {k: v for k, v in namespace.items() if not k.startswith("_")}

    def load(self) -> Any:
        return self.app_factory()
