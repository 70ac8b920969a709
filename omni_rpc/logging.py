"""structlog set-up shared by every process: JSON lines, or readable output on a terminal."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

LOG_FORMATS = ("json", "console", "auto")


def resolve_format(fmt: str) -> str:
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {fmt!r}")
    if fmt == "auto":
        return "console" if sys.stderr.isatty() else "json"
    return fmt


def configure_logging(fmt: str = "auto", level: str = "INFO", **context: Any) -> None:
    """Route structlog and stdlib logging (grpc, asyncio, vLLM, warnings) to stderr, rendered
    the same way; bind ``context`` to every line."""
    fmt = resolve_format(fmt)
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.clear_contextvars()
    if context:
        structlog.contextvars.bind_contextvars(**context)
    # Lines from other libraries' stdlib loggers get the same shape (and our bound context).
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.captureWarnings(True)


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
