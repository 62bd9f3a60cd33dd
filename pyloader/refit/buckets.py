"""Buckets: a trainer's named tensors packed into a few flat byte buffers, and the table that says
where each one lies (name, dtype, shape, bucket, offset).

A bucket starts with a 256-byte header: the weight version (int64) and the payload checksum (int64)
the sender wrote, so both travel with the bytes whatever the transport. Tensors start on 256-byte
boundaries (every vector load of the transform stays aligned); the padding is zero. The layout is
made once and reused every step: only the bytes change.
"""

import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..dtypes import DTYPES, TORCH_TO_SAFETENSORS
from ..errors import PyloaderInputError
from ..format.safetensors import TensorInfo

HEADER_BYTES = 256
ALIGN = 256
CHECK_WORDS = 32  # int64 words a checksum row (256 bytes): each row's sum is weighted by its position
_LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: str              # safetensors code (BF16, F32, F8_E4M3, ...)
    shape: Tuple[int, ...]
    bucket: int
    offset: int             # from the bucket's first byte (the header included)
    nbytes: int


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass
class BucketLayout:
    entries: List[Entry]
    sizes: List[int]        # bytes of each bucket, header included (a multiple of ALIGN)

    @classmethod
    def of(cls, tensors: Union[Mapping[str, torch.Tensor], Iterable[Tuple[str, torch.dtype, Sequence[int]]]],
           bucket_bytes: int = 256 << 20, per_layer: bool = False) -> "BucketLayout":
        """Pack tensors (a dict, or ``(name, dtype, shape)`` triples) in their order: a new bucket
        when the next tensor would overflow ``bucket_bytes`` (a larger tensor gets a bucket of its
        own) or, with ``per_layer``, when the decoder layer changes."""
        items = [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()] if isinstance(tensors, Mapping) \
            else [(n, d, tuple(s)) for n, d, s in tensors]
        if not items:
            raise PyloaderInputError("refit buckets: no tensors to pack")
        entries, sizes = [], []
        used, layer = None, None
        seen = set()
        for name, dtype, shape in items:
            if name in seen:
                raise PyloaderInputError(f"refit buckets: tensor {name!r} is given twice")
            seen.add(name)
            code = TORCH_TO_SAFETENSORS.get(dtype)
            if code is None:
                raise PyloaderInputError(f"refit buckets: tensor {name!r} has dtype {dtype}, which no bucket carries")
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            m = _LAYER.search(name)
            this_layer = int(m.group(1)) if m else None
            new_layer = per_layer and used is not None and this_layer != layer
            if used is None or new_layer or (used > HEADER_BYTES and used + nbytes > bucket_bytes):
                if used is not None:
                    sizes.append(_align(used))
                used = HEADER_BYTES
            entries.append(Entry(name, code, shape, len(sizes), used, nbytes))
            used = _align(used + nbytes)
            layer = this_layer
        sizes.append(_align(used))
        return cls(entries, sizes)

    @property
    def num_buckets(self) -> int:
        return len(self.sizes)

    @property
    def payload_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    def in_bucket(self, k: int) -> List[Entry]:
        return [e for e in self.entries if e.bucket == k]

    def to_json(self) -> str:
        return json.dumps({"sizes": self.sizes, "entries": [dict(asdict(e), shape=list(e.shape)) for e in self.entries]})

    @classmethod
    def from_json(cls, text: str) -> "BucketLayout":
        try:
            d = json.loads(text)
            entries = [Entry(e["name"], e["dtype"], tuple(int(x) for x in e["shape"]), int(e["bucket"]),
                             int(e["offset"]), int(e["nbytes"])) for e in d["entries"]]
            sizes = [int(x) for x in d["sizes"]]
        except (ValueError, KeyError, TypeError) as e:
            raise PyloaderInputError(f"refit bucket layout: not a layout ({type(e).__name__}: {e})") from None
        layout = cls(entries, sizes)
        layout.check()
        return layout

    def check(self) -> None:
        """Every entry inside its bucket, after the header, on the alignment, with its dtype's size."""
        for e in self.entries:
            dt = DTYPES.get(e.dtype, (0, None))[1]
            if dt is None or not 0 <= e.bucket < len(self.sizes):
                raise PyloaderInputError(f"refit bucket layout: entry {e.name!r} has dtype {e.dtype} / bucket {e.bucket}")
            want = math.prod(e.shape) * torch.empty((), dtype=dt).element_size()
            if e.nbytes != want or e.offset < HEADER_BYTES or e.offset % ALIGN or e.offset + e.nbytes > self.sizes[e.bucket]:
                raise PyloaderInputError(f"refit bucket layout: entry {e.name!r} ({e.nbytes} bytes at {e.offset}) "
                                         f"does not fit bucket {e.bucket} of {self.sizes[e.bucket]} bytes")

    def allocate(self, device, shared: bool = False) -> List[torch.Tensor]:
        """Zeroed buckets (the padding must be zero for the checksums); ``shared``: CPU buckets in
        shared memory, for another process."""
        out = [torch.zeros(n, dtype=torch.uint8, device=device) for n in self.sizes]
        if shared:
            for b in out:
                b.share_memory_()
        return out

    def views(self, buckets: Sequence[torch.Tensor], k: int) -> Dict[str, torch.Tensor]:
        """Each tensor of bucket ``k`` as a typed view of the bucket's bytes."""
        b = buckets[k]
        return {e.name: b[e.offset:e.offset + e.nbytes].view(DTYPES[e.dtype][1]).view(e.shape)
                for e in self.in_bucket(k)}

    def infos(self) -> Dict[str, TensorInfo]:
        """The entries as tensor infos, so that the router and planner see them as a checkpoint."""
        return {e.name: TensorInfo(e.name, e.dtype, e.shape, Path(f"<bucket {e.bucket}>"), e.offset, e.nbytes)
                for e in self.entries}


def header(bucket: torch.Tensor) -> torch.Tensor:
    """The bucket's header as int64 [version, checksum]."""
    return bucket[:16].view(torch.int64)


class Checksum:
    """A position-weighted sum of a bucket's payload, on its device: the sums of 256-byte rows of
    int64 words, each times its row number plus one (int64 arithmetic, wrapping). Moved or
    swapped rows, and any changed word, change it; it is computed where the bytes are, without a
    sync (int64 words: a widening int32 sum ran 10x slower on CPUs)."""

    def __init__(self, bucket: torch.Tensor):
        n = (bucket.numel() - HEADER_BYTES) // 8
        self.rows = -(-n // CHECK_WORDS)
        self.words = self.rows * CHECK_WORDS
        if self.words * 8 + HEADER_BYTES > bucket.numel():
            raise PyloaderInputError("refit bucket: its size is not a multiple of the alignment")
        self.weights = torch.arange(1, self.rows + 1, dtype=torch.int64, device=bucket.device)

    def __call__(self, bucket: torch.Tensor) -> torch.Tensor:
        words = bucket[HEADER_BYTES:HEADER_BYTES + self.words * 8].view(torch.int64).view(self.rows, CHECK_WORDS)
        return (words.sum(dim=1) * self.weights).sum()


class Sender:
    """The trainer's side: buckets allocated once from a layout, refilled every step.

    ``pack(tensors, version)`` copies each named tensor into its place (one multi-tensor launch a
    bucket on a GPU) and writes the version and the payload checksum into each bucket's header.
    The buckets then travel by :func:`~pyloader.refit.transport.share` (CUDA IPC or shared
    memory, once) or :func:`~pyloader.refit.transport.broadcast` (every step)."""

    def __init__(self, layout: BucketLayout, device, shared: bool = False, backend: Optional[str] = None):
        from ..backend import resolve_backend

        layout.check()
        self.layout = layout
        self.device = torch.device(device)
        self.buckets = layout.allocate(self.device, shared)
        self.backend = resolve_backend(backend, self.device, "load")
        self._checks = [Checksum(b) for b in self.buckets]
        self._views = [layout.views(self.buckets, k) for k in range(layout.num_buckets)]

    def pack(self, tensors: Mapping[str, torch.Tensor], version: int) -> None:
        from ..loading.batching import as_matrix
        from ..ops.jobs import TransformJob, run_jobs

        names = {e.name for e in self.layout.entries}
        absent = sorted(names - set(tensors))
        extra = sorted(set(tensors) - names)
        if absent or extra:
            raise PyloaderInputError(f"refit pack: the tensors differ from the layout: missing {absent[:5]}, "
                                     f"not in the layout {extra[:5]}")
        for k, views in enumerate(self._views):
            jobs = []
            for name, dst in views.items():
                src = tensors[name]
                if src.dtype != dst.dtype or tuple(src.shape) != tuple(dst.shape):
                    raise PyloaderInputError(f"refit pack: {name} is {src.dtype} {list(src.shape)}, the layout says "
                                             f"{dst.dtype} {list(dst.shape)}")
                if src.numel():
                    jobs.append(TransformJob(as_matrix(src.to(self.device)), as_matrix(dst)))
            run_jobs(jobs, self.backend)
            h = header(self.buckets[k])
            h[0].fill_(int(version))
            h[1].copy_(self._checks[k](self.buckets[k]))
