"""Which process this is in a data-parallel run (``torchrun``, ``accelerate launch``), and a barrier.

The launchers set ``RANK`` and ``WORLD_SIZE``; a plain ``python`` run has neither and is rank 0
of 1. The pipeline writes only from rank 0 (``is_main_process``) and makes the other ranks wait
(``wait_for_everyone``) before they read what it wrote. Nothing here imports torch until a
barrier is needed, so the step cache can use it at no cost.
"""
from __future__ import annotations

import os


def world_size() -> int:
    """Processes in this run (``WORLD_SIZE``, 1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank (``RANK``, 0 without a launcher)."""
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """True on rank 0: the one process that writes files and logs to them."""
    return rank() == 0


def per_process_batch(batch_size: int, processes: int | None = None) -> int:
    """``batch_size`` (the examples of one optimiser step) split over the run's ``processes``.

    Raises:
        ValueError: it does not divide evenly.
    """
    processes = world_size() if processes is None else processes
    if batch_size % processes:
        raise ValueError(f"batch_size (--batch-size) {batch_size} is the batch of one optimiser step and must divide "
                         f"evenly over the {processes} processes of this run; use a multiple of {processes}")
    return batch_size // processes


def check_devices() -> None:
    """A data-parallel run on GPUs needs a GPU per process of the node (NCCL refuses two ranks on
    one device, deep inside the first collective); on CPUs (gloo) any number runs.

    Raises:
        ValueError: more processes on this node (``LOCAL_WORLD_SIZE``) than CUDA devices.
    """
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if local <= 1:
        return
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if 0 < gpus < local:
        raise ValueError(f"this node runs {local} processes but sees {gpus} CUDA device(s): start at most {gpus} "
                         f"(--nproc_per_node {gpus}), or hide the GPUs (CUDA_VISIBLE_DEVICES=) to run on CPUs")


def wait_for_everyone() -> None:
    """A barrier across the run's processes (no-op in a single process).

    The process group is started on first use through accelerate's ``PartialState`` (NCCL on
    GPUs, gloo on CPUs), the same state ``transformers.Trainer`` uses.
    """
    if world_size() <= 1:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        from accelerate import PartialState

        PartialState(cpu=use_cpu())
    dist.barrier()


def use_cpu() -> bool:
    """Train on the CPU: no CUDA device here. (accelerate runs several CPU processes as one
    data-parallel run, gloo, only when asked for the CPU explicitly.)"""
    import torch

    return not torch.cuda.is_available()
