"""Log notifier: writes every event to the host's log, at a level that matches its severity."""
import logging

from host import hookimpl

LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


@hookimpl
def notifier_meta():
    return {"name": "log", "version": "1.0", "api_version": 1}


@hookimpl
def notifier_send(event):
    logging.getLogger("notifier.log").log(LEVELS.get(event["severity"], logging.INFO), "[%s] %s",
                                          event["kind"], event["message"])
