"""Logging of the command line (`viscoin-jax run / train / explain`): one format, Orbax's file
chatter off, and each warning once.

A pipeline builds the same models several times (a stage trains a classifier, the next loads it,
explain loads both again), so a warning about the same missing weights or the same checkpoint
option would otherwise repeat at every load. Here, and only for the command line: Python warnings
go to the log (`logging.captureWarnings`, logger `py.warnings`); a WARNING line is shown the first
time its text appears (so a `UserWarning` whose text the code that raised it has also logged, as
the perceptual-loss fallback does, shows once); and `UserWarning`s and `RuntimeWarning`s are
issued once per text (`warnings`' "once" action) instead of once per line of code. Libraries are
left as they are: code that imports viscoin_jax sees every warning.
"""

from __future__ import annotations

import logging
import re
import warnings

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

# warnings.formatwarning's "<file>:<line>: <Category>: <message>\n  <source line>\n"
_PY_WARNING = re.compile(r"^.*?:\d+: \w+: (.*)$", re.DOTALL)


def warning_text(record: logging.LogRecord) -> str:
    """What a WARNING record says: its message or, for a captured Python warning, the warning's
    own message (without the file, line and source line that `warnings` adds)."""
    text = record.getMessage()
    if record.name == "py.warnings":
        match = _PY_WARNING.match(text)
        if match:
            text = re.sub(r"\n  [^\n]*\n?$", "", match.group(1)).rstrip("\n")
    return text


class OncePerMessage(logging.Filter):
    """A handler filter that passes each WARNING record the first time its text (`warning_text`)
    is seen and drops the repeats; other levels always pass (an error is never hidden)."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING:
            return True
        text = warning_text(record)
        if text in self.seen:
            return False
        self.seen.add(text)
        return True


def setup_logging(level: str = "INFO") -> None:
    """The command line's logging: `FORMAT` at `level` on stderr, absl (Orbax logs every file
    operation at INFO through it) at WARNING unless `level` is DEBUG, each warning once.

    The once-only filter and the capture of Python warnings are installed only when this call
    creates the log handler: logging that someone else set up (a test harness, a notebook) keeps
    its own behaviour.
    """
    root = logging.getLogger()
    before = list(root.handlers)
    logging.basicConfig(level=getattr(logging, level), format=FORMAT)
    if level != "DEBUG":
        logging.getLogger("absl").setLevel(logging.WARNING)
    created = [h for h in root.handlers if h not in before]
    for handler in created:
        handler.addFilter(OncePerMessage())
    if created:
        logging.captureWarnings(True)
        for category in (UserWarning, RuntimeWarning):  # not DeprecationWarning: that stays ignored
            warnings.filterwarnings("once", category=category)


__all__ = ["FORMAT", "LEVELS", "OncePerMessage", "warning_text", "setup_logging"]
