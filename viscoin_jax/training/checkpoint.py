"""Orbax checkpoints of a training run: what is saved, when old ones go, and restoring them safely.

A checkpoint is one step directory `<workdir>/checkpoints/<step>/` with four items:
- `state`: the train state pytree (parameters, optimiser state, step, rng key), saved sharded by
  every process and restorable onto any mesh by passing target shardings;
- `data`: the data iterator position, one JSON file per process (`get_state()` of a grain
  iterator, or of any iterator with `get_state`/`set_state`), so a resumed run sees the same
  batches as an uninterrupted one; a run resumed by another number of processes takes the saved
  position when every saving process holds the same one (the pipeline's positions count global
  batches);
- `config`: the run's config as JSON;
- `metadata`: what is needed to rebuild the models without the training code (e.g. for
  `viscoin-jax explain`), supplied by the task.

Orbax writes each step into a temporary directory and renames it when complete, so a crash during a
save leaves the previous checkpoints intact. Once a save is complete, process 0 adds
`<step>/checksums.json`: the SHA-256 of every file of the step. Restoring verifies them (a flipped
byte in an array file otherwise restores silently as a wrong value), checks the directory, and
turns every failure into `FileNotFoundError` or `CheckpointError` naming the path;
`restore_latest_valid` falls back to the previous checkpoint when the latest is damaged, keeping
the damaged one (moved aside under `checkpoints.damaged/` by a writer, left in place by a reader).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as ocm

from ..data.pipeline import STATE_LAYOUT

log = logging.getLogger(__name__)

CHECKPOINT_SUBDIR = "checkpoints"
COMMIT_MARKER = "commit_success.txt"  # written by Orbax into a step directory before it is renamed
ITEMS = ("state", "data", "config", "metadata")
CHECKSUMS = "checksums.json"  # written into a step directory after its save completed
DAMAGED_SUBDIR = "checkpoints.damaged"  # beside checkpoints/: damaged steps a writer set aside


class CheckpointError(ValueError):
    """A checkpoint exists but is incomplete or unreadable."""


# ----------------------------------------------------------------------------------------------
# The data-iterator item: one JSON file per process.


def _encode_data_state(state: Any) -> dict:
    if isinstance(state, (bytes, bytearray)):
        return {"format": "bytes", "state": base64.b64encode(bytes(state)).decode("ascii")}
    return {"format": "json", "state": state}


def _decode_data_state(payload: dict, path: Path) -> Any:
    if not isinstance(payload, dict) or payload.get("format") not in ("bytes", "json"):
        raise CheckpointError(f"corrupt data-iterator state in {path}")
    if payload["format"] == "bytes":
        return base64.b64decode(payload["state"])
    return payload["state"]


def _process_file(directory: Path) -> Path:
    return Path(directory) / f"process_{jax.process_index()}-of-{jax.process_count()}.json"


def _read_data_state(path: Path) -> Any:
    try:
        payload = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"corrupt data-iterator state {path}: {e}") from None
    return _decode_data_state(payload, path)


def _saved_device_count(path: Path) -> int | None:
    try:
        return json.loads(path.read_text()).get("device_count")
    except (ValueError, AttributeError):
        return None


def _redistributed_data_state(directory: Path, wanted: Path) -> Any:
    """The data position of a run saved by another number of processes. Positions count global
    batches (`data.pipeline`), so every saving process holds the same one and it is valid for any
    process count with the same global batch; saved positions that differ cannot be moved."""
    files = sorted(directory.glob("process_*-of-*.json"))
    counts = {p.name.rsplit("-of-", 1)[1].removesuffix(".json") for p in files}
    if len(counts) != 1 or len(files) != int(next(iter(counts))):
        raise CheckpointError(f"no data-iterator state for this process at {wanted} and no complete "
                              f"set from another process count (found {[p.name for p in files]})")
    states = [_read_data_state(p) for p in files]
    saved_devices = _saved_device_count(files[0])
    if not (isinstance(states[0], dict) and states[0].get("layout") == STATE_LAYOUT):
        raise CheckpointError(
            f"the data positions in {directory} do not count global batches (another iterator, or "
            f"saved before they did): they fit only the {len(files)} processes that saved them; "
            f"resume with {len(files)}")
    if any(state != states[0] for state in states[1:]):
        raise CheckpointError(
            f"the data positions in {directory} differ between the {len(files)} processes that "
            f"saved them: they cannot be redistributed over {jax.process_count()} processes; "
            f"resume with {len(files)}")
    if jax.process_index() == 0:
        log.warning("checkpoint saved by %d processes (%s devices), resumed by %d (%d devices): the "
                    "state is resharded and the data position (the same global batch on every "
                    "saving process) continues on each of the %d", len(files),
                    saved_devices if saved_devices is not None else "?", jax.process_count(),
                    jax.device_count(), jax.process_count())
    return states[0]


class DataStateHandler(ocp.CheckpointHandler):
    """Saves each process's iterator state (JSON-able dict or bytes) to its own JSON file."""

    def save(self, directory: epath.Path, args: "DataStateSave"):
        path = _process_file(Path(directory))
        # the device count saved beside the position: a resume on another one is named in the log
        path.write_text(json.dumps(dict(_encode_data_state(args.state), device_count=jax.device_count())))

    def restore(self, directory: epath.Path, args: "DataStateRestore | None" = None) -> Any:
        path = _process_file(Path(directory))
        if not path.is_file():
            return _redistributed_data_state(Path(directory), path)
        state = _read_data_state(path)
        saved = _saved_device_count(path)
        if saved is not None and saved != jax.device_count() and jax.process_index() == 0:
            log.warning("checkpoint saved on %d devices, resumed on %d (the state is resharded; "
                        "StyleGAN2's minibatch-std groups follow the device count)", saved,
                        jax.device_count())
        return state

    def metadata(self, directory: epath.Path) -> None:
        return None

    def finalize(self, directory: epath.Path) -> None:
        pass

    def close(self) -> None:
        pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    pass


# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Restored:
    """What `Checkpointer.restore` returns; items absent from the checkpoint are None."""

    step: int
    state: Any
    data_state: Any = None
    config: dict | None = None
    metadata: dict | None = None


def _to_json(value: Any) -> Any:
    """Config dicts and metadata as plain JSON (ConfigDicts, tuples and numpy scalars included)."""
    return json.loads(json.dumps(value, default=_json_default))


def _json_default(value: Any):
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def step_checksums(step_dir: Path) -> dict[str, str]:
    """{relative path: sha256} of every file of a step directory (the checksum file excepted)."""
    return {p.relative_to(step_dir).as_posix(): _file_digest(p)
            for p in sorted(step_dir.rglob("*")) if p.is_file() and p.name != CHECKSUMS}


def write_checksums(step_dir: Path) -> Path:
    path = step_dir / CHECKSUMS
    tmp = path.with_name(CHECKSUMS + ".tmp")
    tmp.write_text(json.dumps({"algorithm": "sha256", "files": step_checksums(step_dir)}, indent=0))
    os.replace(tmp, path)
    return path


def verify_checksums(step_dir: Path) -> bool:
    """Raises `CheckpointError` naming the files of `step_dir` that differ from its checksums;
    returns False (nothing to verify) when the step has no checksum file."""
    path = step_dir / CHECKSUMS
    if not path.is_file():
        return False
    try:
        expected = json.loads(path.read_text())["files"]
        assert isinstance(expected, dict)
    except (ValueError, KeyError, TypeError, AssertionError):
        raise CheckpointError(f"checkpoint {step_dir}: unreadable {CHECKSUMS}") from None
    bad = []
    for name, digest in expected.items():
        file = step_dir / name
        if not file.is_file():
            bad.append(f"{name} (missing)")
        elif _file_digest(file) != digest:
            bad.append(name)
    if bad:
        raise CheckpointError(f"checkpoint {step_dir} is damaged: {len(bad)} file(s) differ from "
                              f"{CHECKSUMS}: {', '.join(bad[:5])}")
    return True


class Checkpointer:
    """Saves and restores a run's checkpoints in `directory` (see the module docstring).

    Keeps the latest `max_to_keep` checkpoints plus, when `best_metric` is set, the best one by
    the metric passed to `save(..., metrics=...)` (`best_mode` "max" or "min"). `async_save`
    returns from `save` once the arrays are copied off the accelerator; the files are written in
    the background (call `wait()` before reading them). `this_process_only` (with `read_only`):
    this process reads alone, without Orbax's barriers between processes, for restores onto its
    own devices while the other processes do something else (`training.runs`).
    """

    def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3, best_metric: str = "",
                 best_mode: str = "max", async_save: bool = True, read_only: bool = False,
                 this_process_only: bool = False):
        if best_mode not in ("max", "min"):
            raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
        self.directory = Path(directory).absolute()
        self.best_metric = best_metric
        if read_only and not self.directory.is_dir():
            raise FileNotFoundError(f"checkpoint directory {self.directory} does not exist")
        policies: list[Any] = [ocm.LatestN(n=max_to_keep)]
        best_fn = None
        if best_metric:
            best_fn = lambda metrics: float(metrics[best_metric])  # noqa: E731
            policies.append(ocm.BestN(get_metric_fn=best_fn, reverse=best_mode == "min", n=1,
                                      keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocm.AnyPreservationPolicy(policies),
            # best_fn makes Orbax write each step's metrics to disk (read back after a restart);
            # which steps are kept is decided by the preservation policy above.
            best_fn=best_fn,
            best_mode=best_mode,
            enable_async_checkpointing=async_save,
            create=not read_only,
            read_only=read_only,
            # Unfinished saves of a crashed run are only removed by the writer of the run.
            cleanup_tmp_directories=not read_only,
        )
        if this_process_only:
            if not read_only:
                raise ValueError("this_process_only needs read_only=True: every process writes a checkpoint")
            me = jax.process_index()
            options.multiprocessing_options = ocp.options.MultiprocessingOptions(
                primary_host=me, active_processes={me}, barrier_sync_key_prefix=f"process{me}")
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
        self.read_only = read_only
        self._unsealed: list[int] = []  # saved steps whose checksums are not written yet

    @classmethod
    def from_config(cls, config: Any, workdir: str | os.PathLike, **kwargs) -> "Checkpointer":
        c = config.checkpoint
        return cls(Path(workdir) / CHECKPOINT_SUBDIR, max_to_keep=c.max_to_keep,
                   best_metric=c.best_metric, best_mode=c.best_mode, async_save=c.async_save,
                   **kwargs)

    # -- queries --------------------------------------------------------------------------------

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints (and of saves this object has in flight)."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    def reached_preemption(self, step: int) -> bool:
        """True on every process once a multi-process run was told to stop (JAX's preemption sync
        point); always False on a single process, where the loop's own SIGTERM flag is used."""
        if jax.process_count() == 1:
            return False
        return self._manager.reached_preemption(step)

    # -- save -----------------------------------------------------------------------------------

    def save(self, step: int, state: Any, *, data_state: Any = None, metrics: dict | None = None,
             config: Any = None, metadata: dict | None = None) -> None:
        """Saves one checkpoint (in the background unless disabled); `metrics` rank it for
        keep-best."""
        items: dict[str, Any] = {"state": ocp.args.StandardSave(state)}
        if data_state is not None:
            items["data"] = DataStateSave(data_state)
        if config is not None:
            items["config"] = ocp.args.JsonSave(_to_json(config))
        if metadata is not None:
            items["metadata"] = ocp.args.JsonSave(_to_json(metadata))
        ckpt_metrics = None
        if metrics is not None and self.best_metric and self.best_metric in metrics:
            ckpt_metrics = {self.best_metric: float(metrics[self.best_metric])}
        self._seal()  # the previous save is complete by now (Orbax saves one at a time)
        self._manager.save(int(step), args=ocp.args.Composite(**items), metrics=ckpt_metrics,
                           force=True)
        self._unsealed.append(int(step))

    def _seal(self) -> None:
        """Waits for saves in flight, then writes the checksums of the completed ones."""
        self._manager.wait_until_finished()
        pending, self._unsealed = self._unsealed, []
        if jax.process_index() != 0:
            return
        for step in pending:
            step_dir = self.step_dir(step)
            if (step_dir / COMMIT_MARKER).is_file():  # gone when retention removed it already
                write_checksums(step_dir)

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk (with their checksums)."""
        self._seal()

    def close(self) -> None:
        self._seal()
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- restore --------------------------------------------------------------------------------

    def _check_step(self, step: int | None) -> int:
        self._manager.wait_until_finished()  # a save of ours still in flight is not readable yet
        if not self.directory.is_dir():
            raise FileNotFoundError(f"checkpoint directory {self.directory} does not exist")
        steps = self.all_steps()
        if step is None:
            if not steps:
                unfinished = sorted(p.name for p in self.directory.glob("*.orbax-checkpoint-tmp*"))
                extra = f" (unfinished saves: {unfinished})" if unfinished else ""
                raise FileNotFoundError(f"no checkpoint in {self.directory}{extra}")
            step = steps[-1]
        elif step not in steps:
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; "
                                    f"available steps: {steps}")
        step_dir = self.step_dir(step)
        if not (step_dir / COMMIT_MARKER).is_file():
            raise CheckpointError(f"checkpoint {step_dir} is incomplete (no {COMMIT_MARKER}: the "
                                  "save did not finish); delete it to resume from an earlier step")
        if not (step_dir / "state").is_dir():
            raise CheckpointError(f"checkpoint {step_dir} has no 'state' item")
        return step

    def restore(self, abstract_state: Any = None, step: int | None = None, *,
                restore_data: bool = True) -> Restored:
        """Restores `step` (default: the latest) onto the shardings of `abstract_state`.

        `abstract_state` is a pytree of `jax.ShapeDtypeStruct`s with `.sharding` (e.g. from
        `mesh.abstract_with_sharding`); the mesh may differ from the one that saved. With None the
        arrays come back as saved, which needs the saving mesh's devices. The step's files are
        verified against its checksums first (steps saved without them are restored unverified,
        with a warning).
        """
        step = self._check_step(step)
        step_dir = self.step_dir(step)
        if not verify_checksums(step_dir):
            log.warning("checkpoint %s has no %s: restored without verification", step_dir,
                        CHECKSUMS)
        items: dict[str, Any] = {"state": ocp.args.StandardRestore(abstract_state)}
        present = {p.name for p in step_dir.iterdir() if p.is_dir()}
        if restore_data and "data" in present:
            items["data"] = DataStateRestore()
        for name in ("config", "metadata"):
            if name in present:
                items[name] = ocp.args.JsonRestore()
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(**items))
        except CheckpointError:
            raise
        except Exception as e:  # Orbax / TensorStore raise many kinds; name the path in all of them
            detail = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            raise CheckpointError(
                f"cannot restore checkpoint {step_dir}: {type(e).__name__}: {detail} (the files "
                "are damaged or do not match the target state; delete {step_dir} to resume from "
                "an earlier step)".replace("{step_dir}", str(step_dir))) from e
        get = lambda name: out[name] if name in items else None  # noqa: E731
        return Restored(step=step, state=get("state"), data_state=get("data"),
                        config=get("config"), metadata=get("metadata"))

    def restore_latest_valid(self, abstract_state: Any = None, *, restore_data: bool = True
                             ) -> Restored | None:
        """Restores the newest checkpoint that verifies and restores; None when there is none.

        Each damaged newer step is reported with a warning naming it and kept: a writer moves it
        to `checkpoints.damaged/<step>` (so that the resumed run can save that step again), a
        read-only reader leaves it where it is. Raises the newest step's error when none restores.
        """
        failed: list[tuple[int, CheckpointError]] = []
        for step in reversed(self.all_steps()):
            try:
                restored = self.restore(abstract_state, step, restore_data=restore_data)
            except CheckpointError as e:
                failed.append((step, e))
                continue
            # Only once an earlier step restored: when none does (e.g. a run resumed with another
            # model config), nothing is moved and the newest step's error is raised.
            kept = self._set_aside([s for s, _ in failed]) if failed and not self.read_only else {}
            for bad, error in failed:
                log.warning("checkpoint step %d cannot be used (%s); falling back to step %d; "
                            "step %d is kept at %s", bad, error, step, bad,
                            kept.get(bad, self.step_dir(bad)))
            return restored
        if failed:
            raise failed[0][1]
        return None

    def latest_verified_step(self) -> int:
        """The newest step whose files match its checksums, for readers that pick a step before
        restoring it; damaged newer steps are named in a warning and left in place."""
        self._manager.wait_until_finished()
        steps = self.all_steps()
        for step in reversed(steps):
            try:
                verify_checksums(self.step_dir(step))
            except CheckpointError as e:
                log.warning("checkpoint step %d cannot be used (%s); falling back to the previous "
                            "checkpoint", step, e)
                continue
            return step
        return self._check_step(None)  # none: raises the usual errors (or the newest is used)

    def _set_aside(self, steps: list[int]) -> dict[int, Path]:
        """Moves damaged steps out of Orbax's directory (never deleting them), so that the
        resumed run can save those steps again."""
        kept = {}
        for step in steps:
            target = self.directory.parent / DAMAGED_SUBDIR / str(step)
            if target.exists():
                target = target.with_name(f"{step}.{os.getpid()}")
            if jax.process_index() == 0:
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(self.step_dir(step), target)
            kept[step] = target
        if jax.process_count() > 1:  # every process sees the moves before it lists steps again
            multihost_utils.sync_global_devices("viscoin_jax checkpoint set aside")
        self._manager.reload()
        return kept

    def read_json(self, step: int | None = None) -> tuple[dict | None, dict | None]:
        """(config, metadata) of a checkpoint without reading its arrays."""
        step = self._check_step(step)
        out = []
        for name in ("config", "metadata"):
            path = self.step_dir(step) / name / "metadata"
            if not path.is_file():
                out.append(None)
                continue
            try:
                out.append(json.loads(path.read_text()))
            except json.JSONDecodeError as e:
                raise CheckpointError(f"corrupt {name} JSON {path}: {e}") from None
        return out[0], out[1]


def checkpoint_dir(path: str | Path) -> Path:
    """Accepts a run's workdir or its `checkpoints/` directory; returns the latter."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint directory {path} does not exist")
    if (path / CHECKPOINT_SUBDIR).is_dir():
        return path / CHECKPOINT_SUBDIR
    return path


__all__ = ["checkpoint_dir", "Checkpointer", "CheckpointError", "Restored", "CHECKPOINT_SUBDIR", "DataStateHandler",
           "CHECKSUMS", "DAMAGED_SUBDIR", "step_checksums", "write_checksums", "verify_checksums",
           "DataStateSave", "DataStateRestore"]
