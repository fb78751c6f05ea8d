"""What every job shows on the terminal, in one place: its stages, progress bars and results;
Ray's own output goes to a log file instead.

A quiet job (the default) points the process's stdout and stderr (file descriptors 1 and 2) at
`<work folder>/logs/<job>-<time>.log` and keeps private copies of the terminal for its own
story. Pointing the descriptors, not Python's logging alone, is what catches everything Ray
prints in this process: its loggers (Ray Data's progress blocks, Ray Train's and Serve's lines),
its C++ core's messages, the workers' output it forwards (`log_to_driver`, Serve's access logs
among it), and the processes it starts (they inherit the descriptors). Warnings and errors,
from profilerec, Python's `warnings` and Ray's loggers, still reach the terminal (but for
LOG_ONLY_WARNINGS). `--verbose true` leaves the descriptors alone: everything shows as Ray
prints it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, TextIO

from profilerec.errors import ProfilerecError
from profilerec.runtime.environment import environment

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
# OS errors about a path the user gave: reported like a ProfilerecError, naming the file
PATH_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)

# where Ray keeps the exception a task, actor or Ray Train run failed with: RayTaskError.cause,
# Ray Train's ControllerError.controller_failure and its workers' UserExceptionWithTraceback
# (WorkerGroupError.worker_failures holds those)
RAY_WRAPPED = ("cause", "controller_failure", "_base_exc")


@dataclass
class Console:
    """The terminal of one job run: its streams (None: whatever sys.stdout and sys.stderr are
    when written to), the log file, each stage's wall time, and the progress bars of the stage
    under way."""

    out_stream: Optional[TextIO] = None
    err_stream: Optional[TextIO] = None
    log_path: Optional[str] = None
    timings: dict[str, float] = field(default_factory=dict)
    bars: dict[str, Any] = field(default_factory=dict)
    summarized: bool = False

    @property
    def out(self) -> TextIO:
        """Where the story goes."""
        return self.out_stream or sys.stdout

    @property
    def err(self) -> TextIO:
        """Where progress bars, warnings and errors go."""
        return self.err_stream or sys.stderr


# library callers (a notebook, the tests) that never set up a job get plain stdout and stderr
_console = Console()


def current() -> Console:
    """The console of the job under way."""
    return _console


def say(text: str = "") -> None:
    """Print a line of the job's story on the terminal. The stage's bars end first: a result
    is told when the work they count is done."""
    _close_bars()
    print(text, file=_console.out, flush=True)


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """One line when the stage starts; its wall time goes to the summary; its bars close with it."""
    say(f"> {name}")
    _attach_warnings_to_ray_loggers()
    started = time.perf_counter()
    try:
        yield
    finally:
        _close_bars()
        _attach_warnings_to_ray_loggers()
        _console.timings[name] = round(time.perf_counter() - started, 1)


def progress(what: str, done: int, total: int) -> None:
    """A ProgressFn drawing one bar per `what` on the terminal: made at the first call, moved
    to `done` of `total` at each call (a smaller total, e.g. an early stop, ends it sooner), closed
    when done reaches total, or with the stage. Without a terminal each bar prints only its final
    state, as one line."""
    bar = _console.bars.get(what)
    if bar is None:
        bar = _console.bars[what] = _new_bar(what, total)
    if bar.total != total:
        bar.total = total
    bar.update(done - bar.n)
    if done >= total:
        _close_bar(_console.bars.pop(what))


# no rate: the bars count different things (texts, epochs, cases) and `what` names them
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]"


def _new_bar(what: str, total: int) -> Any:
    """A tqdm bar on the terminal, or, without one, a bar that prints its final state when closed."""
    from tqdm import tqdm

    if _console.err.isatty():
        # the width asked once: a terminal that reports no size (a bare pty) gets 80 columns
        width = min(shutil.get_terminal_size().columns, 100)
        bar = tqdm(total=total, desc=f"  {what}", bar_format=BAR_FORMAT, file=_console.err, ncols=width)
        bar.print_when_closed = False
    else:
        # drawn into nothing and printed once when closed: a log or a pipe gets one line per bar
        bar = tqdm(total=total, desc=f"  {what}", bar_format=BAR_FORMAT, file=io.StringIO(), ascii=True, ncols=80,
                   mininterval=math.inf, maxinterval=math.inf)
        bar.print_when_closed = True
    return bar


def _close_bars() -> None:
    """Close every bar of the stage under way."""
    while _console.bars:
        _close_bar(_console.bars.popitem()[1])


def _close_bar(bar: Any) -> None:
    """Close one bar; without a terminal, print its final state as one line."""
    bar.close()
    if bar.print_when_closed:
        print(str(bar), file=_console.err, flush=True)


def summary() -> None:
    """The end of every job's story: wall time per stage and where the full log is (once: a job
    that keeps serving tells it before it waits)."""
    if _console.summarized:
        return
    _console.summarized = True
    if _console.timings:
        say("\nWall time per stage (s): " + ", ".join(f"{k} {v}" for k, v in _console.timings.items()))
    if _console.log_path:
        say(f"Full log: {_console.log_path}")


# --------------------------------------------------------------------------------------------
# Setting the console up


def log_file_path(folder: str, job: str) -> str:
    """`<folder>/<job>-<local time>.log`, the folder created."""
    os.makedirs(folder, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = os.path.join(folder, f"{job}-{stamp}.log")
    n = 1
    while os.path.exists(path):  # two runs in one second
        n += 1
        path = os.path.join(folder, f"{job}-{stamp}-{n}.log")
    return os.path.abspath(path)


@contextlib.contextmanager
def job_console(job: str, log_folder: str, verbose: bool) -> Iterator[Console]:
    """The console of one job run. Quiet: stdout/stderr point at a new log file in `log_folder`
    for the run (restored at the end), the terminal gets the story and warnings. Verbose: the
    terminal gets everything, as Ray prints it, and there is no log file."""
    global _console
    saved = _console
    with contextlib.ExitStack() as stack:
        if verbose:
            _console = Console()
            handlers = [_handler(logging.StreamHandler(sys.stderr), logging.INFO)]
        else:
            path = log_file_path(log_folder, job)
            out, err = stack.enter_context(_descriptors_to(path))
            # workers' lines come to the log without terminal colour codes
            stack.enter_context(environment(RAY_COLOR_PREFIX="0"))
            _console = Console(out, err, path)
            handlers = [_handler(logging.FileHandler(path), logging.INFO),
                        _handler(TerminalHandler(err), logging.WARNING)]
        stack.enter_context(_logging_to(handlers))
        try:
            yield _console
        finally:
            _console = saved


@contextlib.contextmanager
def _descriptors_to(path: str) -> Iterator[tuple[TextIO, TextIO]]:
    """Point file descriptors 1 and 2 at `path`; yields text streams on the former targets
    (the terminal). Restored on exit."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = [os.dup(1), os.dup(2)]
    out = os.fdopen(os.dup(saved[0]), "w", buffering=1, encoding="utf-8", errors="replace")
    err = os.fdopen(os.dup(saved[1]), "w", buffering=1, encoding="utf-8", errors="replace")
    log_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    try:
        yield out, err
    finally:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        out.close()
        err.close()


# Ray warnings that are notices about a default, not problems with this run: the log file has
# them, the terminal does not (Ray prints this one each time it starts a local instance)
LOG_ONLY_WARNINGS = ("Token authentication is enabled for this Ray cluster",)


class TerminalHandler(logging.StreamHandler):
    """Warnings and errors on the terminal as a person reads them, `warning: message` on one
    line. The format is fixed here, not in a Formatter: ray.init sets the formatter of every
    handler of the "ray" logger, this one included once it is attached there."""

    def format(self, record: logging.LogRecord) -> str:
        """`<level>: <message>`, the message on one line."""
        return f"{record.levelname.lower()}: {' '.join(record.getMessage().split())}"

    def filter(self, record: logging.LogRecord) -> bool:
        """Everything at the handler's level but LOG_ONLY_WARNINGS."""
        return super().filter(record) and not record.getMessage().startswith(LOG_ONLY_WARNINGS)


def _handler(handler: logging.Handler, level: int) -> logging.Handler:
    """`handler` at `level`, in the log format (the terminal's is its own), marked as the job's."""
    handler.setLevel(level)
    if not isinstance(handler, TerminalHandler):
        handler.setFormatter(logging.Formatter(LOG_FORMAT, datefmt="%H:%M:%S"))
    handler._profilerec = True  # type: ignore[attr-defined]  # marks ours, for _logging_to's clean-up
    return handler


@contextlib.contextmanager
def _logging_to(handlers: list[logging.Handler]) -> Iterator[None]:
    """The root logger (and Python's warnings through it) sends INFO and up to `handlers` while
    the job runs."""
    root = logging.getLogger()
    saved_level = root.level
    root.setLevel(logging.INFO)
    for handler in handlers:
        root.addHandler(handler)
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()
        for name in _ray_logger_names():
            logger = logging.getLogger(name)
            for handler in [h for h in logger.handlers if getattr(h, "_profilerec", False)]:
                logger.removeHandler(handler)
        root.setLevel(saved_level)


def _ray_logger_names() -> list[str]:
    """The names of Ray's Python loggers created so far."""
    return [name for name in logging.root.manager.loggerDict if name == "ray" or name.startswith("ray.")]


def _attach_warnings_to_ray_loggers() -> None:
    """Ray's loggers (ray, ray.data, ray.serve) do not pass records up to the root logger, and
    Ray configures them as its modules are first imported, which happens during the stages:
    give each the job's terminal handler (warnings and errors) once it exists."""
    terminal = [h for h in logging.getLogger().handlers if isinstance(h, TerminalHandler)]
    if not terminal:
        return
    for name in _ray_logger_names():
        logger = logging.getLogger(name)
        if isinstance(logger, logging.Logger) and logger.handlers and not logger.propagate \
                and not any(getattr(h, "_profilerec", False) for h in logger.handlers):
            for handler in terminal:
                logger.addHandler(handler)


# --------------------------------------------------------------------------------------------
# Errors


def user_error(error: BaseException) -> Optional[str]:
    """The one-line message of an error the user can act on, also when it was raised in a Ray
    task, actor or Ray Train worker and arrives wrapped; None for anything else (a bug)."""
    seen: set[int] = set()
    todo = [error]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, PATH_ERRORS) and getattr(e, "filename", None):
            return f"{e.strerror.lower() if e.strerror else 'cannot open'}: {e.filename}"
        wrapped = [getattr(e, name, None) for name in RAY_WRAPPED]
        # a RayTaskError is an instance of its cause's class too, with the remote traceback in str()
        if isinstance(e, ProfilerecError) and not any(isinstance(w, BaseException) for w in wrapped):
            return " ".join(str(e).split())
        todo += [*wrapped, e.__cause__, *getattr(e, "worker_failures", {}).values()]
    return None


def run_guarded(main_fn: Callable[[], Any]) -> Any:
    """Run a job: a user error (bad setting, missing data: ProfilerecError, or a path that is not
    there) is one line on stderr, `error: ...`, and exit code 2; a bug prints its stack trace (and
    says where the full log is)."""
    try:
        return main_fn()
    except KeyboardInterrupt:
        print("interrupted", file=_console.err, flush=True)
        raise SystemExit(EXIT_INTERRUPTED) from None
    except Exception as e:  # noqa: BLE001  # sorted into user errors and bugs right here
        message = user_error(e)
        if message is None:
            traceback.print_exc(file=_console.err)
            if _console.log_path:
                print(f"full log: {_console.log_path}", file=_console.err, flush=True)
            raise SystemExit(1) from None
        print(f"error: {message}", file=_console.err, flush=True)
        raise SystemExit(EXIT_USER_ERROR) from None
