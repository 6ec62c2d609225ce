"""Gunicorn settings: the buffering gthread worker by default; a config file and GUNICORN_CMD_ARGS override ours."""
from __future__ import annotations

from host.http_worker import BufferingThreadWorker
from host.server import HostServer, post_worker_init, worker_exit

from conftest import make_settings


def test_defaults_are_the_buffering_gthread_worker_with_our_hooks(tmp_path, monkeypatch):
    monkeypatch.delenv("GUNICORN_CMD_ARGS", raising=False)
    cfg = HostServer(lambda: None, make_settings(tmp_path, PORT=8123)).cfg
    assert cfg.worker_class is BufferingThreadWorker and cfg.workers == 1 and cfg.threads == 4
    assert cfg.bind == ["127.0.0.1:8123"]
    assert cfg.post_worker_init is post_worker_init and cfg.worker_exit is worker_exit


def test_a_config_file_and_the_environment_override(tmp_path, monkeypatch):
    conf = tmp_path / "gunicorn.conf.py"
    conf.write_text("threads = 4\ntimeout = 90\n")
    monkeypatch.setenv("GUNICORN_CMD_ARGS", "--threads 6 --graceful-timeout 5")
    cfg = HostServer(lambda: None, make_settings(tmp_path), config_file=str(conf)).cfg
    assert cfg.timeout == 90            # from the file
    assert cfg.threads == 6             # the environment wins over the file
    assert cfg.graceful_timeout == 5
    assert cfg.post_worker_init is post_worker_init  # our hooks stay
