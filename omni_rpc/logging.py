"""structlog set-up shared by every process: JSON lines, or readable output on a terminal."""

from __future__ import annotations

import atexit
import contextlib
import logging
import queue
import sys
import threading
import time
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

LOG_FORMATS = ("json", "console", "auto")


def resolve_format(fmt: str) -> str:
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, not {fmt!r}")
    if fmt == "auto":
        return "console" if sys.stderr.isatty() else "json"
    return fmt


# How long the writer lets a burst of lines gather before writing it.
_BATCH_WAIT_S = 0.01


class _Writer:
    """Renders and writes log lines on a thread of its own.

    Every line is rendered (JSON or console) and written here, not on the caller's event loop:
    a coordinator logs one line per request, and the loop has streams to serve. Lines keep
    their order; whatever is queued is written before the process exits normally.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[tuple[Any, TextIO, dict[str, Any]] | None] = (
            queue.SimpleQueue()
        )
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()
        atexit.register(self.flush)

    def put(self, renderer: Any, file: TextIO, event: dict[str, Any]) -> None:
        self._queue.put((renderer, file, event))

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            # Lines that come in a burst are written together: one wake-up of this thread, and
            # one hand-over of the interpreter lock, per burst rather than per line.
            time.sleep(_BATCH_WAIT_S)
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            for item in batch:
                if item is None:
                    return
                renderer, file, event = item
                try:
                    file.write(renderer(None, "", event) + "\n")
                except Exception:  # a closed stream at exit: nothing left to tell anyone
                    pass
            with contextlib.suppress(Exception):
                file.flush()

    def flush(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=5)


_writer: _Writer | None = None


class _QueuedLogger:
    """The structlog logger: hands each event to the writer thread, rendered there."""

    def __init__(self, writer: _Writer, renderer: Any, file: TextIO) -> None:
        self._writer = writer
        self._renderer = renderer
        self._file = file

    def msg(self, event: dict[str, Any]) -> None:
        self._writer.put(self._renderer, self._file, event)

    log = debug = info = warn = warning = error = critical = exception = fatal = msg


def _hand_over(_: Any, __: str, event: MutableMapping[str, Any]) -> tuple[Any, ...]:
    # The last processor: the event itself goes to the logger, which renders it off the loop.
    return (event,), {}


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
    global _writer
    if _writer is None:
        _writer = _Writer()
    writer, file = _writer, sys.stderr
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, _hand_over],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=lambda *_: _QueuedLogger(writer, renderer, file),
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
