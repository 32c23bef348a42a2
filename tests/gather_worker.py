"""One process of tests/test_multiprocess.py's gathering test: evaluates a sharded linear map on
its block of each global batch (`batches.evaluate_batches`) and gathers the batches
(`batches.all_processes`); writes what it got to OUT/process_<i>.npz. Started with the JAX
variables (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) and 4 CPU devices."""

import sys

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from viscoin_jax.training import batches, mesh as mesh_lib
from viscoin_jax.training.distributed import maybe_initialize_distributed


def main(out: str) -> None:
    assert maybe_initialize_distributed() and jax.process_count() == 2
    rng = np.random.default_rng(0)  # the same numbers in every process
    x = rng.standard_normal((3, 8, 5)).astype(np.float32)  # 3 global batches of 8 rows
    y = rng.integers(0, 10, (3, 8)).astype(np.int32)
    w = rng.standard_normal((5, 16)).astype(np.float32)
    mesh = mesh_lib.make_mesh({"data": 1, "fsdp": -1})
    state = jax.make_array_from_callback(w.shape, NamedSharding(mesh, P(None, "fsdp")), lambda i: w[i])
    assert not state.is_fully_addressable  # columns on the other process's devices too
    rows = slice(4 * jax.process_index(), 4 * jax.process_index() + 4)  # this process's block
    local = [{"x": x[k, rows], "y": y[k, rows]} for k in range(3)]
    outs = list(batches.evaluate_batches(lambda s, b: (b["x"] @ s, b["y"]), state, local))
    gathered = [batches.all_processes(b) for b in local]
    np.savez(f"{out}/process_{jax.process_index()}.npz",
             products=np.stack([o[0] for o in outs]), labels=np.stack([o[1] for o in outs]),
             gathered_x=np.stack([g["x"] for g in gathered]), x=x, y=y, w=w)


if __name__ == "__main__":
    main(sys.argv[1])
