"""The generic training loop shared by every trainer, and the small `Task` interface it drives.

A trainer (classifier, StyleGAN2, VisCoIN, the toy regression) is a `Task`: it builds its state,
defines one training step as a pure function, and supplies batches. The loop does the rest, the
same way for all of them: mesh, sharded initialisation, resuming, the jitted step, metrics,
evaluation, image samples, checkpoints, preemption and the NaN guard.

The loop's train state is a dict `{"step": int32[], "rng": uint32[2], "task": <task state>}`.
The rng passed to `Task.train_step` is `fold_in(rng, step)`, so a resumed run draws exactly the
random numbers an uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Hashable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from . import mesh as mesh_lib
from .checkpoint import Checkpointer, Restored, checkpoint_dir
from .config import config_from_dict, config_to_dict, record_config
from ..phases import announce
from .monitor import (DivergenceWatch, Progress, check_finite, create_default_writer,
                      mean_metrics, to_host, write_image_grid)
from .registry import trainer_module
from .workdir_lock import WorkdirLock

log = logging.getLogger("viscoin_jax.train")

PyTree = Any

# The exit status of a run stopped by SIGTERM / a preemption notice after saving its checkpoint:
# sysexits' EX_TEMPFAIL ("try again later"). Running the same command again resumes the run.
EXIT_PREEMPTED = 75


class Preempted(RuntimeError):
    """Training stopped early on a preemption notice; its checkpoint is saved but the run is not
    finished, so nothing that needs the trained model (final evaluation, DONE markers) may run."""

    exit_code = EXIT_PREEMPTED

    def __init__(self, step: int, num_steps: int, workdir: str | Path | None = None):
        where = f" in {workdir}" if workdir is not None else ""
        super().__init__(f"preempted at step {step} of {num_steps}; checkpoint saved{where}; run "
                         f"the same command again to resume (exit status {EXIT_PREEMPTED})")
        self.step, self.num_steps = step, num_steps


class Task:
    """What a trainer provides. Subclass it and implement the three required methods.

    Required:
      init(rng) -> state
          Builds the task state (parameters, optimiser states, EMA copies, ...) as a pytree of
          arrays. Runs under `jax.jit` with the sharding rule as `out_shardings`, so it must be a
          pure function of `rng` (keep nnx graphdefs on `self`, e.g. made in `__init__` with
          `nnx.eval_shape` + `nnx.split`).
      train_step(state, batch, rng) -> (state, metrics)
          One optimisation step; pure and jittable. `batch` is the global batch (sharded over the
          mesh), `metrics` a dict of scalars (batch means). Every metric is checked for NaN/Inf.
      make_train_iterator(data_state) -> iterator
          Yields this process's part of each global batch (`mesh.local_batch_size`) as a dict of
          numpy arrays. `data_state` is None for a fresh run, else what the iterator's
          `get_state()` returned when the checkpoint was saved: restore the position from it.
          Iterators without `get_state` restart from the beginning on resume (with a warning).

    Optional (the defaults disable the feature):
      eval_step(state, batch) -> metrics      jittable; metrics are batch means
      make_eval_iterator() -> iterable        a finite pass over the evaluation data (each process
                                              its part; the same number of batches everywhere,
                                              all of one size divisible by the device count)
      host_evaluate(state) -> {name: float}   from the task state, outside jit, at each evaluation:
                                              metrics that need a host loop (FID of a generator)
      sample_images(state) -> {name: images}  from the task state, called outside jit: NHWC images
                                              in [-1, 1], written as PNG grids
      model_metadata() -> dict                saved with each checkpoint: what is needed to rebuild
                                              the models without the training code
      state_shardings(abstract_state, mesh)   replaces the default FSDP rule
      abstract_batch() -> pytree              `jax.ShapeDtypeStruct`s of a global batch (for
                                              ahead-of-time compilation without reading data)
    """

    def __init__(self, config: Any):
        self.config = config

    # -- required -------------------------------------------------------------------------------
    def init(self, rng: jax.Array) -> PyTree:
        raise NotImplementedError

    def train_step(self, state: PyTree, batch: PyTree, rng: jax.Array
                   ) -> tuple[PyTree, dict[str, jax.Array]]:
        raise NotImplementedError

    def make_train_iterator(self, data_state: Any | None) -> Iterator[PyTree]:
        raise NotImplementedError

    # -- optional -------------------------------------------------------------------------------
    eval_step = None  # (state, batch) -> metrics

    def make_eval_iterator(self) -> Iterable[PyTree] | None:
        return None

    def host_evaluate(self, state: PyTree) -> dict[str, float]:
        return {}

    def sample_images(self, state: PyTree) -> dict[str, Any] | None:
        return None

    def model_metadata(self) -> dict:
        return {}

    def state_shardings(self, abstract_state: PyTree, mesh: Mesh) -> PyTree:
        return mesh_lib.fsdp_sharding(abstract_state, mesh, self.config.mesh.fsdp_min_size)

    def abstract_batch(self) -> PyTree | None:
        return None

    def step_variant(self, step: int) -> Hashable | None:
        """The static variant of the step about to run (`step` = steps done), or None for one
        program. A task that returns values gets them as `train_step(..., variant=value)`, one
        compiled program per value: lazy regularisers chosen on the host instead of `lax.cond`,
        whose branches XLA:CPU runs ~100x slower than the same ops outside a conditional."""
        return None


@dataclasses.dataclass
class TrainResult:
    state: PyTree  # the loop's train state {"step", "rng", "task"}
    step: int
    train_metrics: dict[str, float]  # means over the last logging window
    eval_metrics: dict[str, float]  # the last evaluation ({} if none ran)
    preempted: bool  # stopped early by SIGTERM / a preemption notice (after saving)
    num_steps: int = 0  # config.train.num_steps
    workdir: str | None = None

    def raise_if_preempted(self) -> "TrainResult":
        """Raises `Preempted` for a run that stopped early; trainers call this before their final
        evaluation, which must not run on a half-trained model."""
        if self.preempted:
            raise Preempted(self.step, self.num_steps, self.workdir)
        return self


# ----------------------------------------------------------------------------------------------
# The compiled functions


class MeshJit:
    """A jitted function that is traced, lowered and run with its mesh set (`jax.set_mesh`).

    The Pallas kernels read the mesh while tracing to run per device on the batch slice
    (`kernels._dispatch.shard_over_batch`); the mesh's axes are Auto, so nothing else changes.
    """

    def __init__(self, fn, mesh: Mesh):
        self.fn, self.mesh = fn, mesh

    def __call__(self, *args, **kwargs):
        with jax.set_mesh(self.mesh):
            return self.fn(*args, **kwargs)

    def trace(self, *args, **kwargs):
        with jax.set_mesh(self.mesh):
            return self.fn.trace(*args, **kwargs)

    def lower(self, *args, **kwargs):
        with jax.set_mesh(self.mesh):
            return self.fn.lower(*args, **kwargs)


@dataclasses.dataclass
class Compiled:
    """The jitted functions of a task on a mesh, plus the abstract state they work on."""

    mesh: Mesh
    abstract_state: PyTree  # ShapeDtypeStructs carrying their shardings
    state_shardings: PyTree
    init: Any  # jitted (rng key data) -> state
    train_step: Any  # jitted (state, batch[, variant]) -> (state, metrics); donates state
    eval_step: Any  # jitted (state, batch) -> metrics, or None


def _loop_state_init(task: Task):
    def init(rng_data):
        init_key, train_key = jax.random.split(jax.random.wrap_key_data(rng_data))
        return {"step": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(train_key),
                "task": task.init(init_key)}
    return init


def compile_task(task: Task, mesh: Mesh) -> Compiled:
    """Traces `task.init` for shapes, derives shardings and jits init / train step / eval step."""
    init = _loop_state_init(task)
    rng_data = jax.random.key_data(jax.random.key(0))
    shapes = jax.eval_shape(init, rng_data)
    repl = mesh_lib.replicated(mesh)
    shardings = {"step": repl, "rng": repl, "task": task.state_shardings(shapes["task"], mesh)}
    batch = mesh_lib.batch_sharding(mesh)

    def train_step(state, batch, variant=None):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        if variant is None:
            task_state, metrics = task.train_step(state["task"], batch, rng)
        else:
            task_state, metrics = task.train_step(state["task"], batch, rng, variant=variant)
        return {"step": state["step"] + 1, "rng": state["rng"], "task": task_state}, metrics

    eval_step = None
    if task.eval_step is not None:
        eval_step = MeshJit(jax.jit(lambda state, batch: task.eval_step(state["task"], batch),
                                    in_shardings=(shardings, batch), out_shardings=repl), mesh)
    return Compiled(
        mesh=mesh,
        abstract_state=mesh_lib.abstract_with_sharding(shapes, shardings),
        state_shardings=shardings,
        init=MeshJit(jax.jit(init, out_shardings=shardings), mesh),
        train_step=MeshJit(jax.jit(train_step, in_shardings=(shardings, batch), static_argnums=2,
                                   out_shardings=(shardings, repl), donate_argnums=0), mesh),
        eval_step=eval_step,
    )


def abstract_global_batch(task: Task, config: Any, mesh: Mesh) -> PyTree:
    """Shapes of one global batch, sharded like the loop's batches (for AOT lowering)."""
    shapes = task.abstract_batch()
    if shapes is None:  # read one local batch and scale its leading dim to the global batch
        local = next(iter(task.make_train_iterator(None)))
        shapes = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct((x.shape[0] * jax.process_count(), *x.shape[1:]),
                                           x.dtype), local)
    sharding = mesh_lib.batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)


# ----------------------------------------------------------------------------------------------
# Preemption


@contextmanager
def preemption_flag():
    """A `threading.Event` set by SIGTERM while the block runs (single-process runs).

    Multi-process runs leave SIGTERM to JAX's preemption service, which all processes consult at
    the same step through `Checkpointer.reached_preemption`.
    """
    flag = threading.Event()
    install = jax.process_count() == 1 and threading.current_thread() is threading.main_thread()
    previous = None
    if install:
        def handler(signum, frame):
            log.warning("SIGTERM received: saving a checkpoint and stopping after this step")
            flag.set()
        previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield flag
    finally:
        if install:
            signal.signal(signal.SIGTERM, previous)


def _every(step: int, n: int) -> bool:
    return n > 0 and step % n == 0


def _check_batch_size(batch: PyTree, batch_size: int) -> None:
    """Every global batch must have config.train.batch_size rows (else the step recompiles)."""
    for path, x in jax.tree_util.tree_leaves_with_path(batch):
        if x.shape[0] != batch_size:
            raise ValueError(f"batch entry {jax.tree_util.keystr(path)} has {x.shape[0]} rows "
                             f"in the global batch, config.train.batch_size is {batch_size} "
                             "(drop or pad the last partial batch)")


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


# ----------------------------------------------------------------------------------------------
# The loop


def evaluate(task: Task, compiled: Compiled, state: PyTree) -> dict[str, float]:
    """The mean of `eval_step` over `make_eval_iterator()`, plus the task's `host_evaluate`."""
    host = {f"eval/{k}": float(v) for k, v in task.host_evaluate(state["task"]).items()}
    batches = task.make_eval_iterator()
    if compiled.eval_step is None or batches is None:
        return host
    history = []
    for i, local in enumerate(batches):
        batch = mesh_lib.make_global_batch(local, compiled.mesh)
        history.append((i, compiled.eval_step(state, batch)))
    if not history:
        raise ValueError("make_eval_iterator() yielded no batches")
    return {**{f"eval/{k}": v for k, v in mean_metrics(to_host(history)).items()}, **host}


def check_run(task: Task, config: Any, mesh: Mesh) -> None:
    """Fails with a ValueError naming the problem, before anything is compiled or written, on
    what would otherwise fail late: no steps to run, a training or evaluation batch that does not
    split over the mesh (the evaluation one would only fail after training), and evaluation data
    that is missing or empty (the first batch is read here)."""
    num_steps = config.train.num_steps
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"config.train.num_steps must be an int >= 1, got {num_steps!r}")
    mesh_lib.local_batch_size(config.train.batch_size, mesh)
    eval_cfg = config.get("eval", None)
    if eval_cfg is not None and eval_cfg.get("batch_size", None) is not None:
        try:
            mesh_lib.local_batch_size(int(eval_cfg.batch_size), mesh)
        except ValueError as e:
            raise ValueError(f"config.eval.batch_size: {e}") from None
    batches = task.make_eval_iterator()
    if batches is not None:
        if next(iter(batches), None) is None:
            raise ValueError("the evaluation data yields no batches (fewer examples than "
                             "config.eval.batch_size?)")


def run_training(task: Task, config: Any, workdir: str | Path, *, mesh: Mesh | None = None
                 ) -> TrainResult:
    """Trains `task` to `config.train.num_steps`, resuming from the latest checkpoint in `workdir`.

    Writes into `workdir`: `config.json` (kept as it was when a run resumes), TensorBoard events,
    `checkpoints/<step>/`, and image grids under `images/`, holding `workdir/LOCK` meanwhile
    (`WorkdirLockedError` when another live process trains there). Raises
    `monitor.NonFiniteLossError` when a metric becomes NaN/Inf.
    """
    workdir = Path(workdir)
    mesh = mesh if mesh is not None else mesh_lib.make_mesh(config.mesh)
    check_run(task, config, mesh)  # user errors fail here, before anything is compiled or written
    is_main = jax.process_index() == 0
    # One writer per workdir (process 0 speaks for a multi-process run); taken before any write.
    lock = WorkdirLock(workdir).acquire() if is_main else None
    try:
        return _run_locked(task, config, workdir, mesh, is_main)
    finally:
        if lock is not None:
            lock.release()


def _run_locked(task, config, workdir: Path, mesh: Mesh, is_main: bool) -> TrainResult:
    log.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.size,
             jax.process_count())
    compiled = compile_task(task, mesh)
    checkpointer = Checkpointer.from_config(config, workdir)
    writer = None
    try:
        if is_main:  # a resumed run keeps its config.json and logs what changed
            record_config(config, workdir, resuming=checkpointer.latest_step() is not None)
        writer = create_default_writer(workdir)
        # the newest checkpoint that verifies; damaged newer ones are set aside with a warning
        restored = checkpointer.restore_latest_valid(compiled.abstract_state)
        latest = restored.step if restored is not None else None
        if restored is None:
            state = compiled.init(jax.random.key_data(jax.random.key(config.seed)))
            data_state = None
            writer.write_hparams(_flatten(config_to_dict(config)))
        else:
            state, data_state = restored.state, restored.data_state
            log.info("resumed from %s", checkpointer.step_dir(latest))
        iterator = task.make_train_iterator(data_state)
        if latest is not None and data_state is None:
            log.warning("the checkpoint has no data-iterator state: the data restarts")
        return _train(task, config, workdir, compiled, state, iterator, checkpointer, writer,
                      last_checkpoint=latest, is_main=is_main)
    finally:
        checkpointer.close()  # waits for asynchronous saves: the last good checkpoint is on disk
        if writer is not None:
            writer.close()


def _train(task, config, workdir, compiled, state, iterator, checkpointer, writer, *,
           last_checkpoint, is_main) -> TrainResult:
    train_cfg = config.train
    num_steps = train_cfg.num_steps
    step = int(to_host(state["step"]))
    metadata = task.model_metadata()
    config_json = config_to_dict(config)
    progress = Progress(num_steps, writer=writer, every_steps=train_cfg.progress_every)
    get_data_state = getattr(iterator, "get_state", None)
    unchecked: list = []  # (step, device metrics) not yet checked for NaN
    window: list = []  # (step, host metrics) since the last log
    train_metrics: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}
    preempted = False
    divergence = DivergenceWatch()  # warns when a loss leaves its running range
    compiled_variants: set = set()  # the step variants compiled so far (announced once each)
    metrics = None

    def sync():  # waits for the newest step's outputs (reads `metrics` when called)
        return jax.block_until_ready(metrics)

    with preemption_flag() as sigterm:
        while step < num_steps:
            try:
                local_batch = next(iterator)
            except StopIteration:
                raise ValueError(f"the training iterator ran out before step {step + 1} of "
                                 f"{num_steps}; make_train_iterator must repeat the data") from None
            batch = mesh_lib.make_global_batch(local_batch, compiled.mesh)
            _check_batch_size(batch, train_cfg.batch_size)
            variant = task.step_variant(step)
            if variant not in compiled_variants:  # compiles (or loads from the cache): announced,
                compiled_variants.add(variant)  # timed and kept out of steps/s
                what = "the train step" + (f" (variant {variant})" if variant is not None else "")
                with progress.paused(sync), \
                        announce(log, f"compiling {what} and running step {step + 1}"):
                    state, metrics = compiled.train_step(state, batch, variant)
                    jax.block_until_ready(metrics)
            else:
                state, metrics = compiled.train_step(state, batch, variant)
            step += 1
            unchecked.append((step, metrics))

            last = step == num_steps
            preempted = sigterm.is_set() or checkpointer.reached_preemption(step)
            save = _every(step, config.checkpoint.every) or last or preempted
            if save or last or _every(step, train_cfg.log_every):
                host = to_host(unchecked)
                unchecked = []
                check_finite(host, last_checkpoint)  # before anything is saved
                for message in divergence(host):  # logged; also kept with the metrics
                    writer.write_texts(step, {"warnings/divergence": message})
                window.extend(host)
            if window and (_every(step, train_cfg.log_every) or last or preempted):
                train_metrics = mean_metrics(window)
                writer.write_scalars(step, {f"train/{k}": v for k, v in train_metrics.items()})
                window = []

            step_eval = {}
            if _every(step, train_cfg.eval_every) or (last and train_cfg.eval_every > 0):
                with progress.paused(sync):  # steps/s counts training steps only
                    step_eval = eval_metrics = evaluate(task, compiled, state)
                if eval_metrics:
                    writer.write_scalars(step, eval_metrics)
            if _every(step, train_cfg.sample_every) or (last and train_cfg.sample_every > 0):
                with progress.paused(sync):
                    for name, images in (task.sample_images(state["task"]) or {}).items():
                        write_image_grid(writer if is_main else None, step, name, images,
                                         workdir / "images" if is_main else None)
            if save:
                with progress.paused(sync):
                    checkpointer.save(step, state,
                                      data_state=get_data_state() if get_data_state else None,
                                      metrics=step_eval or None, config=config_json,
                                      metadata=metadata)
                last_checkpoint = step
            progress(step, sync=sync)
            if preempted:
                log.warning("stopping at step %d after a preemption notice (checkpoint saved)",
                            step)
                break
    writer.flush()
    return TrainResult(state=state, step=step, train_metrics=train_metrics,
                       eval_metrics=eval_metrics, preempted=preempted and step < num_steps,
                       num_steps=num_steps, workdir=str(workdir))


def restore_run(path: str | Path, step: int | None = None, *, mesh: Mesh | None = None,
                expected_trainer: str | None = None) -> tuple[Any, Task, Restored, dict]:
    """Rebuilds a run (finished or running) from its workdir or checkpoints/ folder, for explanation
    and evaluation: the config saved in checkpoint `step` (default: the newest undamaged one) builds
    the trainer's task (`make_task(config)` of the module registered for `config.trainer`; no
    training code runs), and the arrays are restored onto `mesh` (default: `config.mesh` over the
    devices present, which may differ from the run's). Returns (config, task, restored, metadata);
    `restored.state["task"]` is the task state. Read-only: a save in flight is left alone. Onto a
    mesh of this process's devices the restore is this process's alone (the other processes of a
    multi-process run need not take part)."""
    local = (jax.process_count() > 1 and mesh is not None
             and all(d.process_index == jax.process_index() for d in mesh.devices.flat))
    checkpointer = Checkpointer(checkpoint_dir(path), async_save=False, read_only=True, this_process_only=local)
    try:
        if step is None:  # the newest undamaged step (a damaged newer one is named in a warning)
            step = checkpointer.latest_verified_step()
        config_json, metadata = checkpointer.read_json(step)
        if config_json is None:
            raise FileNotFoundError(f"checkpoint in {path} has no saved config")
        config = config_from_dict(config_json)
        if expected_trainer is not None and config.trainer != expected_trainer:
            raise ValueError(f"{path} holds a {config.trainer!r} run, expected {expected_trainer!r}")
        task = trainer_module(config.trainer).make_task(config)
        mesh = mesh if mesh is not None else mesh_lib.make_mesh(config.mesh)
        restored = checkpointer.restore(compile_task(task, mesh).abstract_state, step, restore_data=False)
    finally:
        checkpointer.close()
    return config, task, restored, metadata or {}


def load_trained(workdir: str | Path, step: int | None = None, mesh: Mesh | None = None
                 ) -> tuple[Any, Task, Restored]:
    """(config, task, restored) of a run: `restore_run` without the metadata."""
    config, task, restored, _ = restore_run(workdir, step, mesh=mesh)
    return config, task, restored


__all__ = ["Task", "TrainResult", "Preempted", "EXIT_PREEMPTED", "Compiled", "compile_task", "abstract_global_batch",
           "preemption_flag", "evaluate", "check_run", "run_training", "restore_run", "load_trained"]
