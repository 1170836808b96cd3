"""CPU threads and priority of the virtual clients' Ray actors.

Why: Ray starts every worker process (Flower's ``ClientAppActor`` among them) with
``nice(worker_niceness)``, an *increment* of 15 over the niceness of the raylet (that is,
of the process that started Ray), and torch runs each parallel region on as many threads
as the actor has cores. At nice 15 a thread's CFS weight is 36 against 1024 for an
ordinary process, so one ordinary process on one core leaves the torch thread on that core
about 3 % of it, and every parallel region waits for that thread: in the issue a round of
the mr recipe took 383 s instead of 22 s while one other Python process ran.
``simulations/bench_neighbour.py`` measures this ratio (round time with one busy
neighbour / idle) before and after the fix.

The fix has two parts:

- :func:`keep_driver_niceness` (called by :func:`fedpeft.cli.quiet_flower_env`, before
  Ray starts): ``RAY_worker_niceness=0`` in the environment, which the raylet and its
  workers inherit, so actors run at the driver's niceness rather than 15 above it. The
  value is a default: an explicit ``RAY_worker_niceness`` is kept. On an existing cluster
  (``simulation.ray_address``) the workers inherit the environment of ``ray start``, so
  export the variable there. (Lowering a niceness again from inside the actor needs
  ``CAP_SYS_NICE``, and Linux applies ``nice`` per thread, so it cannot be repaired there.)
- :func:`use_client_threads` (a client mod of :mod:`clients.app` calls it on every
  message): torch gets as many intra-op threads as Ray reserved CPUs for this actor
  (``simulation.client_cpus``, rounded down, at least 1). The count comes from Ray's
  runtime context rather than from the run config, because that is what the actor really
  holds (also on a cluster, whatever the config says) and because outside Ray (a real
  SuperNode) there is no reservation and torch is left alone. Ray sets
  ``OMP_NUM_THREADS`` to the same number when it is unset, but a user's
  ``OMP_NUM_THREADS`` (or torch imported before it) would override that.
"""

from __future__ import annotations

import math
import os
import sys

NICENESS_ENV = "RAY_worker_niceness"


def keep_driver_niceness() -> None:
    """Ray workers started from this process (through the raylet it starts) run at this
    process's niceness: Ray adds ``RAY_worker_niceness`` to it, 15 unless set."""
    os.environ.setdefault(NICENESS_ENV, "0")


def client_threads() -> int | None:
    """The CPUs Ray reserved for the calling actor, rounded down and at least 1; None
    outside a Ray worker (no reservation to follow)."""
    ray = sys.modules.get("ray")  # a Ray worker has imported it; nothing else needs to
    if ray is None or not ray.is_initialized():
        return None
    context = ray.get_runtime_context()
    if context.worker.mode != ray.WORKER_MODE:  # the driver holds no reservation
        return None
    cpus = context.get_assigned_resources().get("CPU")
    return threads_for(cpus) if cpus else None


def threads_for(cpus: float) -> int:
    """torch threads for a client holding ``cpus`` CPUs: rounded down, at least 1."""
    return max(1, math.floor(cpus))


def use_client_threads() -> int | None:
    """Give torch :func:`client_threads` intra-op threads; returns that number (None:
    torch left as it was)."""
    threads = client_threads()
    if threads is not None:
        import torch

        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
    return threads
