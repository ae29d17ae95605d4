"""Local process launch for ``sagesla.parallel``: one function on N ranks of a ``torch.distributed`` group."""

from collections.abc import Callable
from typing import Any

import torch


def spawn_ranks(fn: Callable[..., Any], world: int, *args: Any, backend: str = "gloo") -> Any:
    """Run ``fn(*args)`` on ``world`` local processes of one ``torch.distributed`` group; rank 0's result.

    ``fn`` must be importable (module level). With ``backend="nccl"`` rank r runs on GPU r. Rank 0's result travels
    back through a queue, so it must be picklable (plain numbers, strings, lists, dicts).
    """
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:  # a free port for the rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_rank_main, args=(world, port, backend, fn, args, results), nprocs=world)
    return results.get()


def _rank_main(rank: int, world: int, port: int, backend: str, fn, args, results) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if backend == "nccl":
        torch.cuda.set_device(rank)
    elif torch.accelerator.device_count() == 0:
        # diffusers 0.42.1 picks each rank's device as rank % accelerator count: zero on a CPU-only machine.
        torch.accelerator.device_count = lambda: 1
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        result = fn(*args)
        if rank == 0:
            results.put(result)
    finally:
        dist.destroy_process_group()
