"""Multi-process start-up: call `jax.distributed.initialize()` only when several processes run.

A single-process run (a laptop, one GPU box, a single TPU VM) must not initialise the distributed
runtime: it would wait for a coordinator that never comes. The decision is read from the launch
environment, and `VISCOIN_DISTRIBUTED=1/0` overrides it either way. Call this before anything
touches JAX devices.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import jax

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LaunchDecision:
    initialize: bool
    reason: str
    kwargs: dict = field(default_factory=dict)  # explicit arguments for jax.distributed.initialize


def _int(env: Mapping[str, str], name: str) -> int | None:
    value = env.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def launch_decision(env: Mapping[str, str] | None = None) -> LaunchDecision:
    """Whether (and how) to initialise JAX's distributed runtime in this launch environment."""
    env = os.environ if env is None else env
    forced = env.get("VISCOIN_DISTRIBUTED", "").strip().lower()
    if forced in ("0", "false", "no", "off"):
        return LaunchDecision(False, "VISCOIN_DISTRIBUTED=0")
    decision = _detect(env)
    if forced in ("1", "true", "yes", "on") and not decision.initialize:
        return LaunchDecision(True, "VISCOIN_DISTRIBUTED=1", decision.kwargs)
    if forced not in ("", "1", "true", "yes", "on"):
        raise ValueError(f"VISCOIN_DISTRIBUTED must be 0 or 1, got {env['VISCOIN_DISTRIBUTED']!r}")
    return decision


def _detect(env: Mapping[str, str]) -> LaunchDecision:

    # Explicit JAX variables (any launcher): JAX reads the coordinator address itself but not the
    # process count and id, so those are passed on.
    num_processes = _int(env, "JAX_NUM_PROCESSES")
    if num_processes is not None or env.get("JAX_COORDINATOR_ADDRESS"):
        kwargs = {}
        if env.get("JAX_COORDINATOR_ADDRESS"):
            kwargs["coordinator_address"] = env["JAX_COORDINATOR_ADDRESS"]
        if num_processes is not None:
            kwargs["num_processes"] = num_processes
        process_id = _int(env, "JAX_PROCESS_ID")
        if process_id is not None:
            kwargs["process_id"] = process_id
        if num_processes is not None and num_processes <= 1:
            return LaunchDecision(False, f"JAX_NUM_PROCESSES={num_processes}", kwargs)
        return LaunchDecision(True, "JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES", kwargs)

    # SLURM: one task per accelerator (or per host); JAX's SLURM support finds the rest.
    slurm_tasks = _int(env, "SLURM_STEP_NUM_TASKS") or _int(env, "SLURM_NTASKS")
    if slurm_tasks is not None and env.get("SLURM_JOB_ID"):
        if slurm_tasks > 1:
            return LaunchDecision(True, f"SLURM job with {slurm_tasks} tasks")
        return LaunchDecision(False, "SLURM job with one task")

    # Open MPI (mpirun).
    ompi_size = _int(env, "OMPI_COMM_WORLD_SIZE")
    if ompi_size is not None:
        return LaunchDecision(ompi_size > 1, f"Open MPI with {ompi_size} processes")

    # Cloud TPU: multi-host slices list their workers (GKE sets these; launch/tpu_pod.sh sets
    # VISCOIN_DISTRIBUTED=1 on TPU VMs, where JAX reads the rest from the metadata server).
    hosts = env.get("TPU_PROCESS_ADDRESSES") or env.get("TPU_WORKER_HOSTNAMES")
    if hosts:
        count = len([h for h in hosts.split(",") if h.strip()])
        return LaunchDecision(count > 1, f"TPU slice with {count} hosts")
    return LaunchDecision(False, "single process")


def maybe_initialize_distributed(env: Mapping[str, str] | None = None) -> bool:
    """Initialises JAX's distributed runtime when the launch has several processes.

    Returns True when this call (or an earlier one) initialised it.
    """
    if jax.distributed.is_initialized():
        return True
    decision = launch_decision(env)
    if not decision.initialize:
        log.debug("not initialising jax.distributed: %s", decision.reason)
        return False
    log.info("initialising jax.distributed (%s)", decision.reason)
    jax.distributed.initialize(**decision.kwargs)
    log.info("process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def process_zero() -> bool:
    """Whether this is process 0 (the only process, or the one that writes a run's files)."""
    return jax.process_index() == 0


class ProcessZeroFailed(RuntimeError):
    """What the other processes raise when the work process 0 did alone (`on_process_zero`)
    failed there; `user_error` says whether it was a problem of the inputs (ValueError,
    FileNotFoundError, ...: a command line then exits 2 on every process)."""

    def __init__(self, message: str, user_error: bool):
        super().__init__(message)
        self.user_error = user_error


T = TypeVar("T")
_WAIT_HOURS = 48  # how long the other processes wait for process 0 (explanations take minutes)
_calls = itertools.count()  # every process calls on_process_zero in the same order: the same keys


def _coordination_client():
    """JAX's distributed-runtime client (its key-value store and barriers, as Orbax uses them)."""
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        raise RuntimeError("jax.distributed is not initialised")
    return client


def on_process_zero(fn: Callable[[], T], what: str, user_errors: tuple[type[BaseException], ...] = (ValueError,)
                    ) -> T | None:
    """Runs `fn()` on process 0 alone and returns its result there; every other process waits
    until it is done and returns None, or raises `ProcessZeroFailed` when it failed (process 0
    re-raises the error itself). One process: just `fn()`.

    For small host-side work whose files only process 0 may write (the explanations): `fn` must
    touch only this process's devices and read checkpoints process-locally (`restore_run` onto
    one local device does). The others wait on the distributed runtime's key-value store, not in
    a device collective, so a long wait costs nothing and never times out a collective; if
    process 0 dies, the runtime ends their wait with an error."""
    if jax.process_count() == 1:
        return fn()
    key = f"viscoin_jax/on_process_zero/{next(_calls)}/{what}"
    client = _coordination_client()
    if jax.process_index() == 0:
        try:
            result = fn()
        except BaseException as e:
            line = (str(e).strip().splitlines() or [type(e).__name__])[0]
            client.key_value_set(key, json.dumps({"error": f"{type(e).__name__}: {line}",
                                                  "user_error": isinstance(e, user_errors)}))
            raise
        client.key_value_set(key, json.dumps({"error": None}))
        return result
    log.info("process %d waits while process 0 runs %s", jax.process_index(), what)
    outcome = json.loads(client.blocking_key_value_get(key, _WAIT_HOURS * 3600 * 1000))
    if outcome["error"] is not None:
        raise ProcessZeroFailed(f"process 0 failed while running {what}: {outcome['error']}",
                                bool(outcome["user_error"]))
    return None


__all__ = ["LaunchDecision", "launch_decision", "maybe_initialize_distributed", "on_process_zero",
           "process_zero", "ProcessZeroFailed"]
