"""Client actors' CPU priority and torch threads (fedpeft/threads.py).

The test starts Flower's Ray backend with fedpeft's ``backend_config``, as the simulation
runtime does, and sends one message through fedpeft's ClientApp in a real
``ClientAppActor``; a client mod reads the actor's niceness and torch threads.
"""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict

from clients.app import make_client_app
from fedpeft import threads
from fedpeft.cli import backend_config, quiet_flower_env
from fedpeft.config import config_from_dict


def report(msg: Message, context: Context, call_next: Any) -> Message:
    """Client mod: the actor's niceness, torch threads and OMP_NUM_THREADS, in the reply."""
    import torch

    reply: Message = call_next(msg, context)
    reply.content["probe"] = ConfigRecord(
        {
            "nice": os.nice(0),
            "threads": torch.get_num_threads(),
            "omp": os.environ.get("OMP_NUM_THREADS", ""),
        }
    )
    return reply


def test_client_actors_run_at_the_drivers_niceness_with_client_cpus_threads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import ray
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    driver_nice = os.nice(0)
    if driver_nice >= 19:
        pytest.skip("at niceness 19 Ray's increment of 15 cannot show")
    # what Ray adds is fedpeft's business here, not the caller's environment's
    monkeypatch.delenv(threads.NICENESS_ENV, raising=False)
    # a user's OMP_NUM_THREADS, which Ray keeps and torch follows (up to every core): more
    # than the 1 CPU the actor holds
    monkeypatch.setenv("OMP_NUM_THREADS", str(max(2, os.cpu_count() or 1)))
    quiet_flower_env()  # as simulate() does before Flower starts Ray
    if ray.is_initialized():  # a Ray started earlier would not see the environment
        ray.shutdown()
    cfg = config_from_dict({"simulation": {"client_cpus": 1}})
    began = time.perf_counter()
    backend = RayBackend(backend_config(cfg))
    try:
        backend.build(lambda: make_client_app([report]))
        meta = Metadata(
            run_id=1, message_id="m1", src_node_id=0, dst_node_id=1, reply_to_message_id="",
            group_id="", created_at=time.time(), ttl=600.0, message_type="query",
        )  # fmt: skip
        # as the SuperLink delivers it (with its metadata; the typed overloads are the apps')
        msg = Message(RecordDict(), metadata=meta)  # type: ignore[call-overload]
        ctx = Context(
            run_id=1, node_id=1, node_config={"partition-id": 0}, state=RecordDict(),
            run_config={},
        )  # fmt: skip
        reply, _ = backend.process_message(msg, ctx)
    finally:
        backend.terminate()
    print(f"Ray backend up, one message, down: {time.perf_counter() - began:.1f} s")
    assert not reply.has_error(), reply.error
    probe = reply.content["probe"]
    # torch would have followed OMP_NUM_THREADS onto every core with the actor's 1 CPU ...
    assert probe["omp"] == os.environ["OMP_NUM_THREADS"]
    assert probe["threads"] == 1  # ... but runs as many threads as the CPUs Ray reserved
    assert probe["nice"] == driver_nice  # Ray's default would have been driver_nice + 15


def test_outside_a_ray_worker_torch_threads_are_left_alone() -> None:
    import torch

    before = torch.get_num_threads()
    assert threads.use_client_threads() is None  # the test process is no Ray worker
    assert torch.get_num_threads() == before
