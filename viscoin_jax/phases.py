"""Long phases a person waits for (compiling, FID, a projection, a final evaluation), announced in
the log before they start and timed after; and the durations those lines print. The lowest layer,
so explanations, metrics and the training framework all announce alike.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def announce(logger: logging.Logger, what: str) -> Iterator[None]:
    """Logs `<what> ...` before a long phase (compiling, FID, projection, a final evaluation) and
    `<what> took <time>` after it, at INFO."""
    logger.info("%s ...", what)
    start = time.perf_counter()
    yield
    logger.info("%s took %s", what, format_seconds(time.perf_counter() - start))


def format_seconds(seconds: float) -> str:
    """`4.2s` under a minute, else `format_duration`'s `1m05s`."""
    return f"{seconds:.1f}s" if seconds < 60 else format_duration(seconds)


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


__all__ = ["announce", "format_seconds", "format_duration"]
