"""structlog set-up shared by every process: JSON lines, or readable output on a terminal."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

LOG_FORMATS = ("json", "console", "auto")


def configure_logging(fmt: str = "auto", level: str = "INFO", **context: Any) -> None:
    """Route structlog (and stdlib logging) to stderr; bind ``context`` to every line."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {fmt!r}")
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.clear_contextvars()
    if context:
        structlog.contextvars.bind_contextvars(**context)
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
