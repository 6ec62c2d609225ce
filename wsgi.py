"""WSGI entry point for gunicorn: `gunicorn -c python:host.gunicorn_conf wsgi:app`. Importing starts nothing."""
from host.web import create_app

app = create_app()
