"""Notices that libraries print as they load, kept out of the commands' output.

megatron-core ("Transformer Engine and Apex are not installed", four times) and fla ("Triton is not
supported on current platform") announce their fallbacks with `warnings.warn`; DeepSpeed says which
accelerator it picked through its own logger ("DeepSpeed", which prints to stdout). While a command
runs (`routed`), a warning raised in an installed library (a file under site-packages) and DeepSpeed's
accelerator lines go instead to the logger `sleepscale.notices` at DEBUG, once each: out of sight,
unless logging is set to show DEBUG or the command runs with `--verbose` (then on stderr).

A warning raised in sleepscale, or attributed to it (a library's warning about how sleepscale calls
it, given the caller's `stacklevel`), is shown as before; so is any other warning, and so are our
own log records and errors.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import site
import sys
import sysconfig
import warnings
from collections.abc import Iterator

log = logging.getLogger("sleepscale.notices")

_OURS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "")


@functools.cache
def _site_directories() -> tuple[str, ...]:
    found = [sysconfig.get_paths()[key] for key in ("purelib", "platlib")]
    found += getattr(site, "getsitepackages", list)() + [site.getusersitepackages()]
    return tuple(sorted({os.path.join(os.path.abspath(path), "") for path in found}, key=len, reverse=True))


def library_module(filename: str) -> str | None:
    """The installed library module a file belongs to (`megatron.core.optimizer`), or None when the
    file is sleepscale's or is not under site-packages."""
    path = os.path.abspath(filename)
    if path.startswith(_OURS):
        return None
    for directory in _site_directories():
        if path.startswith(directory):
            module = os.path.splitext(os.path.relpath(path, directory))[0].replace(os.sep, ".")
            return module.removesuffix(".__init__")
    return None


class _DeepSpeedAccelerator(logging.Filter):
    """Takes DeepSpeed's accelerator lines ("Setting accelerator to CPU. ...") off its logger."""

    def __init__(self, notice):
        super().__init__()
        self.notice = notice

    def filter(self, record: logging.LogRecord) -> bool:
        if record.filename != "real_accelerator.py":
            return True
        self.notice(f"deepspeed.accelerator: {record.getMessage()}")
        return False


@contextlib.contextmanager
def routed(verbose: bool = False) -> Iterator[None]:
    """Library notices go to `log` at DEBUG, once each, while the block runs; with `verbose` they are
    also printed on stderr."""
    seen: set[str] = set()

    def notice(text: str) -> None:
        if text not in seen:
            seen.add(text)
            log.debug("%s", text)

    shown = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        module = library_module(filename)
        if module is None:
            shown(message, category, filename, lineno, file, line)
        else:
            notice(f"{module}: {category.__name__}: {message}")

    deepspeed = logging.getLogger("DeepSpeed")  # made now if DeepSpeed is not imported yet; it keeps the filter
    accelerator = _DeepSpeedAccelerator(notice)
    handler, level, propagate = None, log.level, log.propagate
    if verbose:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("notice: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.DEBUG)
        log.propagate = False
    warnings.showwarning = showwarning
    deepspeed.addFilter(accelerator)
    try:
        yield
    finally:
        warnings.showwarning = shown
        deepspeed.removeFilter(accelerator)
        if handler is not None:
            log.removeHandler(handler)
            log.setLevel(level)
            log.propagate = propagate
