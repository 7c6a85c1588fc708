"""What a Flower app's log says about fedclip's refusals."""

from __future__ import annotations

import logging

from fedclip.errors import FedclipError


class OneLineRefusals(logging.Filter):
    """Flower logs an app's exception with its traceback; a refusal of fedclip's own (bad
    settings, a run folder in use, data that does not fit) is one line, like on the command
    line. Any other exception keeps its traceback: it is a bug."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, FedclipError):
            record.msg, record.args = "fedclip refused the run: %s", (str(exc),)
            record.exc_info, record.exc_text = None, None
        return True


def one_line_refusals() -> None:
    """Install :class:`OneLineRefusals` on Flower's logger (once per process)."""
    logger = logging.getLogger("flwr")
    if not any(isinstance(f, OneLineRefusals) for f in logger.filters):
        logger.addFilter(OneLineRefusals())
