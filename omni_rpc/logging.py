"""structlog set-up shared by every process: JSON lines, or readable output on a terminal."""

from __future__ import annotations

import atexit
import collections
import contextlib
import logging
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


# How long the writer lets a burst of deferred lines gather before writing it.
_BATCH_WAIT_S = 0.01
# The event key that marks a line as deferred (see ``get_logger``); never rendered.
_DEFERRED = "_deferred"

_Line = tuple[Any, TextIO, dict[str, Any]]


class _Writer:
    """Renders and writes log lines, in order.

    Deferred lines (the per-request ones on the data path) are queued and rendered and written
    by a thread of its own, in bursts: not on the caller's event loop, which has streams to
    serve. Every other line is written at once by its caller, after whatever is queued, so
    order is kept and a line about a failure is out before the process goes on (or exits).
    What is still queued is written when the process exits normally.
    """

    def __init__(self) -> None:
        self._lines: collections.deque[_Line] = collections.deque()
        self._ready = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()
        atexit.register(self.flush)

    def defer(self, line: _Line) -> None:
        with self._ready:
            self._lines.append(line)
            self._ready.notify()

    def write_now(self, line: _Line) -> None:
        with self._ready:
            self._lines.append(line)
            self._write_queued()

    def flush(self) -> None:
        with self._ready:
            self._write_queued()

    def _run(self) -> None:
        while True:
            with self._ready:
                self._ready.wait_for(lambda: bool(self._lines))
            # Lines that come in a burst are written together: one wake-up of this thread, and
            # one hand-over of the interpreter lock, per burst rather than per line.
            time.sleep(_BATCH_WAIT_S)
            self.flush()

    def _write_queued(self) -> None:
        """Write every queued line (the caller holds ``_ready``)."""
        files = set()
        while self._lines:
            renderer, file, event = self._lines.popleft()
            files.add(file)
            with contextlib.suppress(Exception):  # a closed stream at exit: no one to tell
                file.write(renderer(None, "", event) + "\n")
        for file in files:
            with contextlib.suppress(Exception):
                file.flush()


_writer: _Writer | None = None


class _WriterLogger:
    """The structlog logger: hands each event to the writer, which renders it."""

    def __init__(self, writer: _Writer, renderer: Any, file: TextIO) -> None:
        self._writer = writer
        self._renderer = renderer
        self._file = file

    def msg(self, event: dict[str, Any]) -> None:
        if event.pop(_DEFERRED, False):
            self._writer.defer((self._renderer, self._file, event))
        else:
            self._writer.write_now((self._renderer, self._file, event))

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
        logger_factory=lambda *_: _WriterLogger(writer, renderer, file),
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


def get_logger(name: str, deferred: bool = False) -> Any:
    """A structlog logger. ``deferred``: its lines are rendered and written on the writer's
    thread, in bursts, a few milliseconds later (for the per-request lines of the data path);
    otherwise each line is out when the call returns."""
    # Initial values, not bind(): binding now would build the logger before configure_logging.
    return (
        structlog.get_logger(name, **{_DEFERRED: True}) if deferred else structlog.get_logger(name)
    )
