"""Watching a run: metric writers (console + TensorBoard), progress/ETA, image grids, NaN guard,
divergence warning.

The writer follows clu's `MetricWriter` interface (`write_scalars`, `write_images`, ...), but clu's
own writers import TensorFlow at import time and this project does not install TensorFlow, so the
TensorBoard event files are written by a small encoder here (scalars, images, text).
"""

from __future__ import annotations

import io
import json
import logging
import math
import socket
import struct
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from PIL import Image

from ..phases import format_duration, format_seconds

log = logging.getLogger("viscoin_jax.train")


class NonFiniteLossError(FloatingPointError):
    """A training metric became NaN or Inf; the bad state is never checkpointed."""


# ----------------------------------------------------------------------------------------------
# Host values


def to_host(tree: Any) -> Any:
    """Fetches a pytree of (possibly multi-process sharded) arrays as numpy arrays."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)
    return jax.tree.map(one, tree)


def _format(value: float) -> str:
    return f"{value:.6g}"


# ----------------------------------------------------------------------------------------------
# TensorBoard event files
#
# An event file is a sequence of TFRecords, each holding one serialised `tensorflow.Event` proto.
# The few messages needed are encoded here by hand (protobuf wire format), so that writing
# TensorBoard logs needs neither TensorFlow nor tensorboardX (which imports torch when present).


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), the checksum of TFRecord framing."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> bytes:
    crc = crc32c(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire_type) + payload


def _bytes_field(number: int, data: bytes) -> bytes:
    return _field(number, 2, _varint(len(data)) + data)


def _event(step: int, *, summary_values: Sequence[bytes] = (), file_version: str = "") -> bytes:
    """Event{wall_time=1 (double), step=2 (int64), file_version=3, summary=5{value=1 (rep.)}}."""
    msg = _field(1, 1, struct.pack("<d", time.time())) + _field(2, 0, _varint(int(step)))
    if file_version:
        msg += _bytes_field(3, file_version.encode())
    if summary_values:
        msg += _bytes_field(5, b"".join(_bytes_field(1, v) for v in summary_values))
    return msg


def _scalar_value(tag: str, value: float) -> bytes:
    """Summary.Value{tag=1, simple_value=2 (float)}."""
    return _bytes_field(1, tag.encode()) + _field(2, 5, struct.pack("<f", value))


def _image_value(tag: str, image: np.ndarray) -> bytes:
    """Summary.Value{tag=1, image=4{height=1, width=2, colorspace=3, encoded_image_string=4}}."""
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, format="PNG")
    h, w, c = image.shape
    msg = (_field(1, 0, _varint(h)) + _field(2, 0, _varint(w)) + _field(3, 0, _varint(c))
           + _bytes_field(4, buffer.getvalue()))
    return _bytes_field(1, tag.encode()) + _bytes_field(4, msg)


def _text_value(tag: str, text: str) -> bytes:
    """Summary.Value{tag=1, tensor=8{dtype=1: DT_STRING, tensor_shape=2: {}, string_val=8},
    metadata=9{plugin_data=1{plugin_name=1: "text"}}} - what TensorBoard's text plugin reads."""
    tensor = _field(1, 0, _varint(7)) + _bytes_field(2, b"") + _bytes_field(8, text.encode())
    metadata = _bytes_field(1, _bytes_field(1, b"text"))
    return _bytes_field(1, tag.encode()) + _bytes_field(8, tensor) + _bytes_field(9, metadata)


class EventFileWriter:
    """Appends TensorBoard events to `<logdir>/events.out.tfevents.<time>.<host>`."""

    def __init__(self, logdir: str | Path):
        Path(logdir).mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
        self.path = Path(logdir) / name
        self._file = open(self.path, "ab")
        self._write(_event(0, file_version="brain.Event:2"))

    def _write(self, record: bytes) -> None:
        length = struct.pack("<Q", len(record))
        self._file.write(length + _masked_crc(length) + record + _masked_crc(record))

    def add(self, step: int, values: Sequence[bytes]) -> None:
        self._write(_event(step, summary_values=values))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


# ----------------------------------------------------------------------------------------------
# Writers


class MetricWriter:
    """Console log plus, unless `just_logging` or `logdir` is None, TensorBoard event files and
    `logdir/metrics.jsonl` (one {"step": s, name: value, ...} line per write_scalars; for scripts).

    Same method names as clu's `MetricWriter`. In multi-process runs only process 0 should write
    event files: `create_default_writer` passes `just_logging=True` on the others.
    """

    def __init__(self, logdir: str | Path | None, *, just_logging: bool = False):
        self._events = None
        self._jsonl = None
        if logdir is not None and not just_logging:
            self._events = EventFileWriter(logdir)
            self._jsonl = Path(logdir) / "metrics.jsonl"

    @property
    def event_file(self) -> Path | None:
        return self._events.path if self._events is not None else None

    def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
        scalars = {k: float(np.asarray(v)) for k, v in scalars.items()}
        log.info("[%d] %s", step, ", ".join(f"{k}={_format(v)}" for k, v in scalars.items()))
        if self._events is not None:
            self._events.add(step, [_scalar_value(k, v) for k, v in scalars.items()])
            self._events.flush()
            with open(self._jsonl, "a") as f:
                f.write(json.dumps({"step": int(step), **scalars}) + "\n")

    def write_images(self, step: int, images: Mapping[str, Any]) -> None:
        """Images as uint8 [H, W, C] or [N, H, W, C] (each of the N is written)."""
        for key, value in images.items():
            value = np.asarray(value)
            if value.dtype != np.uint8 or value.ndim not in (3, 4):
                raise ValueError(f"image {key!r}: expected uint8 [N,] H, W, C (use image_grid), "
                                 f"got {value.dtype} {value.shape}")
            log.info("[%d] image %s %s", step, key, value.shape)
            if self._events is not None:
                batch = value if value.ndim == 4 else value[None]
                tags = [key] if len(batch) == 1 else [f"{key}/{i}" for i in range(len(batch))]
                self._events.add(step, [_image_value(t, img) for t, img in zip(tags, batch)])
                self._events.flush()

    def write_texts(self, step: int, texts: Mapping[str, str], *, level: int = logging.INFO) -> None:
        for key, value in texts.items():
            log.log(level, "[%d] %s: %s", step, key, value)
        if self._events is not None:
            self._events.add(step, [_text_value(k, str(v)) for k, v in texts.items()])
            self._events.flush()

    def write_hparams(self, hparams: Mapping[str, Any]) -> None:
        """The TensorBoard text `hparams`; logged at DEBUG (a person reads the run's config.txt)."""
        text = "\n".join(f"{k}: {v}" for k, v in sorted(hparams.items()))
        self.write_texts(0, {"hparams": text}, level=logging.DEBUG)

    def flush(self) -> None:
        if self._events is not None:
            self._events.flush()

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
            self._events = None


def read_scalars(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """{name: [(step, value), ...]} from `logdir/metrics.jsonl` (a run's scalar history, e.g. its FID trend)."""
    path = Path(logdir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (was the run written by MetricWriter?)")
    out: dict[str, list[tuple[int, float]]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            step = int(record.pop("step"))
            for name, value in record.items():
                out.setdefault(name, []).append((step, float(value)))
    return out


def create_default_writer(logdir: str | Path | None, *, just_logging: bool | None = None
                          ) -> MetricWriter:
    """clu-style default writer; `just_logging` defaults to True on every process but the first."""
    if just_logging is None:
        just_logging = jax.process_index() != 0
    return MetricWriter(logdir, just_logging=just_logging)


# ----------------------------------------------------------------------------------------------
# Progress


class Progress:
    """Logs steps/s and the time left every `every_steps` steps or `every_secs` seconds, and at the
    last step.

    The rate counts training steps only: the first step (compiling) starts the clock, and the time
    spent inside `paused()` (evaluation, samples, checkpoints, compiling another step variant) is
    taken out of the interval. Inside `viscoin-jax run` (a `RunProgress` is active) each report
    also names the stage (`stage k/N`) and the time left for the whole run.
    """

    def __init__(self, num_steps: int, *, writer: MetricWriter | None = None,
                 every_steps: int | None = 100, every_secs: float | None = 60.0,
                 clock: Callable[[], float] = time.monotonic):
        self.num_steps = num_steps
        self.writer = writer
        self.every_steps = every_steps
        self.every_secs = every_secs
        self.clock = clock
        self._last_step: int | None = None
        self._last_time = 0.0
        self._paused = 0.0  # seconds inside paused() since the last report

    @contextmanager
    def paused(self, sync: Callable[[], Any] | None = None) -> Iterator[None]:
        """Keeps the block's time out of steps/s. `sync` (blocking on the last step's outputs)
        runs first, so that steps still running on the device count as training time."""
        if self._last_step is None:  # the clock has not started: nothing to take out
            yield
            return
        if sync is not None:
            sync()
        start = self.clock()
        try:
            yield
        finally:
            self._paused += self.clock() - start

    def __call__(self, step: int, sync: Callable[[], Any] | None = None) -> dict[str, float] | None:
        """Call after every step; returns the reported numbers when it reports.

        `sync` (e.g. blocking on the step's outputs) runs before a report is timed: JAX dispatches
        steps asynchronously, so without it the rate would count dispatched, not finished, steps.
        """
        now = self.clock()
        run = current_run()
        if run is not None:
            run.note_step(step)
        if self._last_step is None:  # the first call only starts the clock (it includes compiling)
            self._last_step, self._last_time, self._paused = step, now, 0.0
            return None
        due = (self.every_steps and step % self.every_steps == 0) or step == self.num_steps or (
            self.every_secs is not None and now - self._last_time >= self.every_secs)
        if not due or step == self._last_step or now <= self._last_time:
            return None
        if sync is not None:
            sync()
            now = self.clock()
        busy = now - self._last_time - self._paused
        if busy <= 0:
            return None
        rate = (step - self._last_step) / busy
        eta = (self.num_steps - step) / rate if rate > 0 else math.inf
        self._last_step, self._last_time, self._paused = step, now, 0.0
        if run is None:
            log.info("step %d/%d: %.3g steps/s, %s left", step, self.num_steps, rate,
                     format_duration(eta))
        else:
            log.info("%s: step %d/%d: %.3g steps/s, %s left in this stage; %s", run.label(), step,
                     self.num_steps, rate, format_duration(eta), run.eta_text(eta))
        if self.writer is not None:
            self.writer.write_scalars(step, {"steps_per_sec": rate})
        return {"steps_per_sec": rate, "eta_seconds": eta}


class RunProgress:
    """Where `viscoin-jax run` stands: `stage k/N` and an estimate of the time the run has left.

    `stages` are the training stages in order as (name, steps); `later` names the phases after them
    that have no step count (the explanations), counted in N but not in the estimate. The estimate
    prices each step not yet trained at the seconds per step measured over the stages trained so
    far in this process (their wall time, compiling and evaluation included, over the steps they
    trained), and the running stage at its own rate; until a stage has finished it says so.
    """

    def __init__(self, stages: Sequence[tuple[str, int]], later: Sequence[str] = (),
                 clock: Callable[[], float] = time.monotonic):
        self.stages = [(str(name), int(steps)) for name, steps in stages]
        self.later = list(later)
        self.total = len(self.stages) + len(self.later)
        self.clock = clock
        self.measured: list[tuple[int, float]] = []  # (steps trained, seconds) of finished stages
        self.index: int | None = None  # the running stage (index into stages + later)
        self._start = 0.0
        self._first_step: int | None = None  # the step the running stage started from
        self._last_step: int | None = None

    def label(self, index: int | None = None) -> str:
        index = self.index if index is None else index
        names = [name for name, _ in self.stages] + self.later
        return f"stage {index + 1}/{self.total} {names[index]}"

    def begin(self, index: int) -> None:
        self.index, self._start = index, self.clock()
        self._first_step = self._last_step = None

    def note_step(self, step: int) -> None:
        """The running stage has done `step` steps (called by `Progress` after each step)."""
        if self._first_step is None:
            self._first_step = step - 1
        self._last_step = step

    def end(self) -> float:
        """Ends the running stage; a training stage's steps and seconds join the measurement.
        Returns the stage's seconds."""
        seconds = self.clock() - self._start
        if self.index is not None and self.index < len(self.stages):
            if self._first_step is not None:
                trained = self._last_step - self._first_step
            else:  # no step reported (a trainer without Progress): assume all of them
                trained = self.stages[self.index][1]
            if trained > 0:
                self.measured.append((trained, seconds))
        self.index = None
        return seconds

    def seconds_per_step(self) -> float | None:
        steps = sum(n for n, _ in self.measured)
        return sum(s for _, s in self.measured) / steps if steps else None

    def steps_after(self, index: int) -> int:
        """Steps of the training stages after stage `index` (0-based)."""
        return sum(steps for _, steps in self.stages[index + 1:])

    def estimate(self, pending_steps: int, current_left: float = 0.0) -> float | None:
        """Seconds left: `current_left` (the running stage's own estimate) plus `pending_steps` at
        the measured seconds per step; None while nothing has been measured and steps wait."""
        if pending_steps <= 0:
            return current_left
        per_step = self.seconds_per_step()
        return None if per_step is None else current_left + pending_steps * per_step

    def eta_text(self, current_left: float | None = None, *, before: int | None = None) -> str:
        """`run: about 3m10s left` (+ the phases without steps): from inside the running training
        stage, whose own estimate is `current_left`, or (`before=k`) before stage k starts."""
        if before is not None and before >= len(self.stages):
            return "run: every stage trained" + (f", {', '.join(self.later)} next" if self.later else "")
        if before is not None:
            left = self.estimate(sum(steps for _, steps in self.stages[before:]))
        elif self.index is None or current_left is None or not math.isfinite(current_left):
            left = None
        else:
            left = self.estimate(self.steps_after(self.index), current_left)
        more = f" + {', '.join(self.later)}" if self.later else ""
        if left is None:
            return f"run: ETA after the first stage{more}"
        return f"run: about {format_duration(left)} left{more}"


_RUN: list[RunProgress] = []  # the active RunProgress (a stack: innermost last)


@contextmanager
def run_progress(progress: RunProgress) -> Iterator[RunProgress]:
    """Makes `progress` the run that `Progress` reports to while the block runs."""
    _RUN.append(progress)
    try:
        yield progress
    finally:
        _RUN.remove(progress)


def current_run() -> RunProgress | None:
    return _RUN[-1] if _RUN else None


# ----------------------------------------------------------------------------------------------
# Images


def image_grid(images: Any, ncols: int | None = None, padding: int = 2,
               pad_value: float = 1.0) -> np.ndarray:
    """Tiles NHWC images in [-1, 1] into one uint8 [H', W', C] image, row by row.

    `ncols` defaults to ceil(sqrt(N)); cells are separated by `padding` pixels of `pad_value`
    (in [-1, 1]; 1 is white). Values outside [-1, 1] are clipped.
    """
    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected images of shape [N, H, W, C] with C in (1, 3, 4), got "
                         f"{images.shape}")
    n, h, w, c = images.shape
    if n == 0:
        raise ValueError("no images to tile")
    ncols = ncols or math.ceil(math.sqrt(n))
    if ncols < 1:
        raise ValueError(f"ncols must be positive, got {ncols}")
    nrows = math.ceil(n / ncols)
    grid = np.full((nrows * (h + padding) + padding, ncols * (w + padding) + padding, c),
                   pad_value, np.float32)
    for i in range(n):
        r, col = divmod(i, ncols)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[y:y + h, x:x + w] = images[i]
    return np.round((np.clip(grid, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8)


def save_png(image: np.ndarray, path: str | Path) -> Path:
    """Writes a uint8 [H, W, C] image as PNG (C=1 as grayscale)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.asarray(image)
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)
    return path


def write_image_grid(writer: MetricWriter | None, step: int, name: str, images: Any,
                     directory: str | Path | None, ncols: int | None = None) -> Path | None:
    """Tiles `images` (NHWC in [-1, 1]), writes `<directory>/<name>_<step>.png` and the writer's
    image summary. Returns the PNG path (None when `directory` is None)."""
    grid = image_grid(to_host(images), ncols=ncols)
    path = None
    if directory is not None:
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
        path = save_png(grid, Path(directory) / f"{safe}_{step:08d}.png")
    if writer is not None:
        writer.write_images(step, {name: grid[None]})
    return path


# ----------------------------------------------------------------------------------------------
# Metrics over a logging window and the NaN guard


def check_finite(history: Sequence[tuple[int, Mapping[str, Any]]],
                 last_good_checkpoint: int | None) -> None:
    """Raises `NonFiniteLossError` at the first step whose metrics hold a NaN or Inf.

    `history` is [(step, metrics)] with host values; the message names the step, the metrics and
    the last checkpoint that is known to be good, so the run can be resumed from it.
    """
    for step, metrics in history:
        bad = sorted(k for k, v in metrics.items() if not np.all(np.isfinite(np.asarray(v))))
        if bad:
            where = (f"the last good checkpoint is step {last_good_checkpoint}"
                     if last_good_checkpoint is not None else "no checkpoint was saved yet")
            values = ", ".join(f"{k}={np.asarray(metrics[k]).tolist()}" for k in bad)
            raise NonFiniteLossError(f"non-finite metrics at step {step}: {values}; training "
                                     f"stopped without saving this state ({where})")


def is_loss_metric(name: str) -> bool:
    """The metrics a divergence watch follows: `loss`, `*_loss`, `*/loss`."""
    return name == "loss" or name.endswith("_loss") or name.endswith("/loss")


class DivergenceWatch:
    """Warns when a loss leaves the range it has kept so far by orders of magnitude.

    The range of each loss metric is the largest magnitude it has had since the run (or the
    resumed run) started; a value above `10**orders` times that is reported once, with the step,
    and the watch re-arms when the loss comes back into range. Losses that fall and rise again
    within their range (a GAN's oscillations) say nothing; a learning rate of 1e6 does.
    """

    def __init__(self, orders: float = 2.0):
        self.factor = 10.0 ** float(orders)
        self.largest: dict[str, tuple[float, int]] = {}  # name -> (largest |value|, its step)
        self.warned: set[str] = set()

    def __call__(self, history: Sequence[tuple[int, Mapping[str, Any]]]) -> list[str]:
        """Checks [(step, host metrics)]; returns (and logs) the warnings it gave."""
        out = []
        for step, metrics in history:
            for name, value in metrics.items():
                if not is_loss_metric(name):
                    continue
                magnitude = float(np.max(np.abs(np.asarray(value, np.float64))))
                if not math.isfinite(magnitude):
                    continue  # check_finite reports these
                largest = self.largest.get(name)
                if largest is None or largest[0] == 0.0:
                    self.largest[name] = (magnitude, step)
                    continue
                if magnitude > self.factor * largest[0]:
                    if name not in self.warned:
                        self.warned.add(name)
                        message = (f"{name} is {magnitude:.3g} at step {step}, "
                                   f"{magnitude / largest[0]:.3g} x its largest value so far "
                                   f"({largest[0]:.3g} at step {largest[1]}): the run is diverging "
                                   "(learning rate too high?)")
                        log.warning("%s", message)
                        out.append(message)
                    continue  # the range keeps its scale while the loss is out of it
                self.warned.discard(name)
                if magnitude > largest[0]:
                    self.largest[name] = (magnitude, step)
        return out


def mean_metrics(history: Sequence[tuple[int, Mapping[str, Any]]]) -> dict[str, float]:
    """Averages each metric over the steps of a logging window."""
    keys = {k for _, m in history for k in m}
    return {k: float(np.mean([np.mean(np.asarray(m[k])) for _, m in history if k in m]))
            for k in sorted(keys)}


__all__ = [
    "NonFiniteLossError", "EventFileWriter", "MetricWriter", "crc32c", "create_default_writer",
    "Progress", "RunProgress", "run_progress", "current_run", "format_duration",
    "format_seconds",
    "image_grid", "save_png", "write_image_grid", "check_finite", "mean_metrics", "to_host",
    "DivergenceWatch", "is_loss_metric",
]
