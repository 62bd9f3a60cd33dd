"""Moving buckets between the trainer and the rollout engine.

- Same host: :func:`share` turns the buckets into handles another process opens once with
  :func:`open_shared` (CUDA IPC for GPU buckets, a shared-memory segment for CPU ones). The opened
  tensors alias the sender's memory: every later step only refills them, no handle is opened again.
- Other GPUs or hosts: :func:`broadcast` sends every bucket from one rank of a
  ``torch.distributed`` group (NCCL on GPUs, gloo on CPUs) into the receivers' own buckets.

The sender must not refill a shared bucket while the receiver still reads it: pair each step with
a barrier (a queue message, ``dist.barrier``) of your own.
"""

from typing import List, Sequence, Tuple

import torch

from ..errors import PyloaderInputError


def share(buckets: Sequence[torch.Tensor]) -> List[Tuple]:
    """Picklable handles of ``buckets`` for another process (send them once, e.g. by a
    ``multiprocessing`` queue or pipe). CPU buckets must be in shared memory
    (``BucketLayout.allocate(..., shared=True)``)."""
    from torch.multiprocessing.reductions import reduce_tensor

    out = []
    for k, b in enumerate(buckets):
        if b.device.type == "cpu" and not b.is_shared():
            raise PyloaderInputError(f"refit share: CPU bucket {k} is not in shared memory (allocate(shared=True))")
        out.append(reduce_tensor(b))
    return out


def open_shared(handles: Sequence[Tuple]) -> List[torch.Tensor]:
    """The sender's buckets, opened once from :func:`share`'s handles."""
    out = []
    for k, h in enumerate(handles):
        try:
            rebuild, args = h
            out.append(rebuild(*args))
        except (TypeError, ValueError) as e:
            raise PyloaderInputError(f"refit open_shared: handle {k} is not a bucket handle ({e})") from None
    return out


def broadcast(buckets: Sequence[torch.Tensor], src: int, group=None) -> None:
    """Every bucket from rank ``src`` to every rank of ``group`` (each rank passes its own buckets
    of the same layout; the receivers' are overwritten)."""
    import torch.distributed as dist

    for b in buckets:
        dist.broadcast(b, src, group=group)
