"""A plan's pieces packed into staging-slot batches (row-split where larger than a slot), and the
transform jobs that write a piece's staged bytes into its target."""

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch

from ..errors import PyloaderInputError
from ..format.safetensors import TensorInfo
from ..ops.jobs import TransformJob
from ..routing.plan import Piece

ALIGN = 256  # every part starts 256-byte aligned in a slot: the kernels' 16-byte vector path applies


@dataclass(slots=True)
class Part:
    piece: Piece
    row0: int        # first row of the part, relative to the rows this rank reads of the source
    rows: int
    file_offset: int
    nbytes: int
    slot_offset: int = 0


@dataclass(slots=True)
class Batch:
    parts: List[Part] = field(default_factory=list)
    nbytes: int = 0
    layers: set = field(default_factory=set)


def read_rows(piece: Piece) -> Tuple[int, int]:
    """Rows of the source that this rank reads (a column-parallel slice reads only its rows)."""
    shape = piece.source.shape
    n = shape[0] if shape else 1
    pl = piece.placement
    if pl.src_rows is not None and pl.src_cols is None and len(shape) >= 1:
        return pl.src_rows
    return 0, n


def _pack(batches: List[Batch], piece: Piece, rows: int, first_byte: int, total: int, slot_bytes: int) -> None:
    """Append ``rows`` rows (``total`` bytes from file offset ``first_byte``) of ``piece.source`` to
    the batches, split by rows where larger than a slot."""
    source = piece.source
    row_bytes = total // rows if rows else total
    if row_bytes > slot_bytes:
        raise PyloaderInputError(f"{source.file}: tensor {source.name}: one row is {row_bytes} bytes, "
                                 f"larger than a staging slot ({slot_bytes}); raise slot_bytes")
    if source.shape is None or len(source.shape) <= 1 or rows == 0 or row_bytes == 0:
        chunks = [(0, rows, total)]  # one part: an empty tensor's rows, however many, are never split
    else:
        per = max(1, (slot_bytes - ALIGN) // row_bytes)
        chunks = [(r, min(per, rows - r), min(per, rows - r) * row_bytes) for r in range(0, rows, per)]
    placed, count, used, empty = [], len(batches), batches[-1].nbytes, not batches[-1].parts
    for _, _, nbytes in chunks:  # where each chunk goes (batch index, slot offset)
        start = -(-used // ALIGN) * ALIGN
        if start + nbytes > slot_bytes and not empty:
            count, start = count + 1, 0
        placed.append((count - 1, start))
        used, empty = start + nbytes, False
    for (r, n, nbytes), (k, start) in zip(chunks, placed):
        if k == len(batches):
            batches.append(Batch())
        cur = batches[k]
        cur.parts.append(Part(piece, r, n, first_byte + r * row_bytes, nbytes, start))
        cur.nbytes = start + nbytes
        cur.layers.add(piece.layer)


def split_into_batches(pieces: List[Piece], slot_bytes: int) -> List[Batch]:
    """Pack pieces (in plan order) into slot-sized batches; pieces larger than a slot are split by rows."""
    batches: List[Batch] = [Batch()]
    for p in pieces:
        a, b = read_rows(p)
        _pack(batches, p, b - a, p.read_range[0], p.read_range[1] - p.read_range[0], slot_bytes)
    return [b for b in batches if b.parts]


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    if t.dim() == 0:
        return t.reshape(1, 1)
    if t.dim() == 1:
        return t.unsqueeze(0)
    return t.reshape(t.shape[0], math.prod(t.shape[1:]))  # explicit: -1 is ambiguous for an empty slice


def piece_jobs(piece: Piece, src: torch.Tensor, row0: int, target: torch.Tensor,
               scales: Dict[str, torch.Tensor], experts: Optional[Dict[int, int]], slots=None) -> List[TransformJob]:
    """Jobs writing ``src`` (rows ``row0..`` of what this rank reads of ``piece.source``, already
    viewed with the source dtype and shape) into ``target``; a dequantized piece gets its gate
    slot from ``slots`` (:class:`~pyloader.gate.GateSlots`) when one is given."""
    pl = piece.placement
    jobs = []
    if experts is not None and piece.expert_id is None:  # pre-stacked experts: one job per owned expert
        for g, slot in experts.items():
            if row0 <= g < row0 + src.shape[0]:  # this part holds experts row0 .. row0 + len
                jobs.append(TransformJob(as_matrix(src[g - row0]), as_matrix(target[slot])))
        return jobs
    plane = target[piece.slot] if piece.slot is not None else target
    if plane.dim() <= 1:  # 1-D target (norm, bias): elements
        dst = plane.reshape(-1)[pl.offset:pl.offset + src.numel()].unsqueeze(0)
        s = src.reshape(1, -1)
        return [_job(piece, s, dst, scales, 0, 0, slots)]
    src2 = as_matrix(src)
    rows_base = pl.src_rows[0] if (pl.src_rows is not None and pl.src_cols is None) else 0
    c0 = 0
    if pl.src_cols is not None:
        c0 = pl.src_cols[0]
        if piece.quant is not None:  # packed: the bytes of the columns (the plan checked c0 is even)
            src2 = src2[:, c0 // 2:-(-pl.src_cols[1] // 2)]
        else:
            src2 = src2[:, pl.src_cols[0]:pl.src_cols[1]]
    global_row0 = rows_base + row0
    dst_row0 = pl.offset + (global_row0 - (pl.src_rows[0] if pl.src_rows is not None else 0))
    dst = as_matrix(plane)[dst_row0:dst_row0 + src2.shape[0]]
    return [_job(piece, src2, dst, scales, global_row0, c0, slots)]


def _job(piece: Piece, src, dst, scales, global_row0: int, c0: int, slots=None) -> TransformJob:
    if piece.transform != "dequant":
        return TransformJob(src, dst)
    scale = scales[piece.scale.name]
    shape = piece.source.shape
    amax = slots.slot(piece.source.name) if slots is not None else None
    if scale.numel() == 1:  # per-tensor
        return TransformJob(src, dst, scale.reshape(1, 1), (max(1, shape[0]), max(1, math.prod(shape[1:]) or 1)),
                            amax=amax)
    bm, bn = piece.block_size
    grid = scale.reshape(-(-(shape[0] if len(shape) >= 2 else 1) // bm), -1)  # [ceil(rows / bm), ceil(cols / bn)]
    q = piece.quant
    if q is not None:
        g = scales[q.global_scale.name].reshape(1) if q.global_scale is not None else None
        return TransformJob(src, dst, grid[global_row0 // bm:, c0 // bn:], (bm, bn), (global_row0 % bm, c0 % bn),
                            q.packing, g, q.global_mode, amax)
    return TransformJob(src, dst, grid[global_row0 // bm:, c0 // bn:], (bm, bn), (global_row0 % bm, c0 % bn),
                        amax=amax)


def view_source(raw: torch.Tensor, info: TensorInfo, rows: int, packed: bool = False) -> torch.Tensor:
    """The staged bytes of ``rows`` rows as the source tensor (a packed source: its bytes, a row each)."""
    if packed:
        return raw.view(torch.uint8).view(rows, -1)
    dtype = info.torch_dtype
    shape = info.shape
    t = raw.view(dtype)
    if not shape:
        return t.reshape(())
    return t.view((rows,) + tuple(shape[1:]))
