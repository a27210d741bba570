"""Several processes, one run: joining them with `jax.distributed`, and which process writes what.

    python train.py --coordinator_address HOST:PORT --num_processes N --process_id I ...
    srun python train.py ...     # SLURM, Open MPI, Cloud TPU pods, Kubernetes: jax finds the three itself

With no flags and no such cluster nothing is initialised: one process, exactly as before. Every process
runs the same steps on one global mesh (model/train_step.py); orbax saves checkpoints from all of them;
process 0 alone writes the config, split, log, plots, metadata updates and results, and prints.
"""
import contextlib
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from .errors import UserError

# A process silent for this long stops the others (jax prints "tasks are unhealthy (stopped sending
# heartbeats): <process id>" and aborts them). jax's default, 100 s, leaves a broken run idle for minutes;
# the heartbeat comes from a thread of its own, so even a host busy with a long step beats well within 30 s.
HEARTBEAT_TIMEOUT_S = 30


def _in_cluster() -> bool:
    """True inside a multi-process job that `jax.distributed.initialize()` configures by itself.

    jax has no public query for this: `ClusterEnv` is the registry its initialize() walks, skipping the
    opt-in methods (mpi4py) as it does. A one-task SLURM job counts as a single machine."""
    from jax._src.clusters import ClusterEnv  # noqa: PLC0415
    env = next((e for e in ClusterEnv._cluster_types if not e.opt_in_only_method and e.is_env_present()), None)
    return env is not None and env.get_process_count() > 1


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Join the other processes of the run, before anything else touches JAX; a no-op on one machine."""
    if (coordinator_address, num_processes, process_id) == (None, None, None) and not _in_cluster():
        return
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_S)
    except (ValueError, TypeError) as e:
        raise UserError(f"cannot join the run: {e} Give all three of "
                        "--coordinator_address HOST:PORT, --num_processes and --process_id, or none of them "
                        "inside a SLURM, Open MPI, Cloud TPU or Kubernetes job.") from None
    except jax.errors.JaxRuntimeError as e:
        raise UserError(f"process {process_id}: no contact with the other processes through "
                        f"{coordinator_address} ({str(e).splitlines()[0][:200]}). Start all {num_processes} "
                        "with the same --coordinator_address (process 0's host and a free port).") from None
    print(f"process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} of "
          f"{jax.device_count()} devices; a process silent for {HEARTBEAT_TIMEOUT_S} s stops the others",
          flush=True)
    # Opens the process-to-process communicator while the processes are in step (see open_collectives):
    # the barriers of `main_first` may then wait minutes for process 0.
    multihost_utils.sync_global_devices("joined")


def open_collectives(mesh) -> None:
    """Open the communicator over every device of `mesh` with the processes in step, before the first
    train step. On CPU, gloo gives each process 30 s (not configurable) to join a new communicator, and
    processes can reach the first step further apart than that (one compiles it, another finds it in a
    cache; a busy host). The step's all-reduces reuse this one, and wait for a late process as long as it
    takes."""
    if jax.process_count() == 1:
        return
    multihost_utils.sync_global_devices("open_collectives")
    ones = jax.make_array_from_process_local_data(NamedSharding(mesh, P(mesh.axis_names)),
                                                  np.ones(jax.local_device_count(), np.float32))
    jax.block_until_ready(jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(ones))


def leave(code: int, error: BaseException | None = None) -> int:
    """The exit status of a process that stops early. With other processes running it exits here, at
    once: a normal exit would wait for them at jax's shutdown barrier (5 min) while they wait for it in a
    collective; gone, it stops them within HEARTBEAT_TIMEOUT_S.

    A failed collective usually means another process stopped: its sockets close at once, but jax names
    it only when its heartbeats are overdue, so this process waits that long for jax's report first."""
    if not (jax.distributed.is_initialized() and jax.process_count() > 1):
        return code
    if isinstance(error, jax.errors.JaxRuntimeError):
        print(f"process {jax.process_index()}: JAX failed (above). If another process stopped, jax names it "
              f"within {HEARTBEAT_TIMEOUT_S} s (\"tasks are unhealthy\"); waiting for that before exiting.",
              file=sys.stderr, flush=True)
        time.sleep(HEARTBEAT_TIMEOUT_S + 10)   # jax's report ends this process before that
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def is_main() -> bool:
    """Process 0 writes what there is one of (config, split, log, plots, JSON) and prints the progress."""
    return jax.process_index() == 0


def say(*args) -> None:
    """print, from process 0 only: N processes would print every line N times."""
    if is_main():
        print(*args, flush=True)


def gather(x) -> np.ndarray:
    """The whole of an array on every process, as numpy (a collective: every process must call it)."""
    if x.is_fully_addressable:   # one process: already here, no collective to launch
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


@contextlib.contextmanager
def main_first(name: str):
    """Process 0 runs the block, then the others: they find the split file and image cache it wrote
    (on a shared filesystem) instead of racing it."""
    if jax.process_count() == 1:
        yield
        return
    if not is_main():
        multihost_utils.sync_global_devices(name)
    yield
    if is_main():
        multihost_utils.sync_global_devices(name)
