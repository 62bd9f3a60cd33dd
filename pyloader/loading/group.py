"""``pyloader.load(..., group=…)``: the ranks of a ``torch.distributed`` group load one checkpoint
reading each tensor's bytes once.

Each rank plans its own load as one process would (its ``tp``/``pp``/``ep``, its targets, every
format and layout); the ranks then gather which checkpoint tensors each plan reads, layer by layer,
and the nodes they run on. Only the ranks of a node share a page cache, so each node reads what its
ranks need once. The work goes in windows of whole layers (the embeddings and other non-layer
tensors first), each holding at most about ``window_bytes`` of any rank's tensors: in a window, the
tensors the node needs for the first time are cut in file order into one contiguous run a rank,
balanced by bytes; each reader reads its run, and each tensor goes, still quantized, only where it is
needed inside its node — nowhere when its reader is its only user, point to point to a single
other user, broadcast over the node's group when several need it. Each rank then runs the window's
layers of its plan from the bytes it holds (one launch a layer, as from a dict of tensors) and drops
what no later window of its plan reads.

Buffers live where the group's backend moves them: on the rank's GPU with NCCL (each byte crosses
PCIe once, on its reader; the rest moves over NVLink), in host memory with gloo (each rank copies its
pieces to its device). A rank holds one window's tensors at a time (plus tensors a later window
reads again, such as a tied head's embedding), not the checkpoint.
"""

import bisect
import os
import socket
import time
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch

from ..errors import PyloaderInputError
from ..format.checkpoint import Checkpoint
from ..format.safetensors import TensorInfo
from ..ops.jobs import run_jobs
from ..routing.plan import Plan
from .batching import piece_jobs, read_rows, view_source

# A window's bytes a rank holds at most (unless one layer alone needs more): large enough that the
# exchange of a window keeps the readers busy, small beside a GPU's memory.
WINDOW_BYTES = 2 << 30


def tensor_owner(ck: Checkpoint) -> Callable[[Optional[TensorInfo]], Optional[str]]:
    """The checkpoint tensor that holds a byte range (a piece's source, or a slice of one)."""
    spans: Dict[object, Tuple[List[int], List[TensorInfo]]] = {}
    for info in sorted(ck.tensors.values(), key=lambda t: (str(t.file), t.start)):
        starts, infos = spans.setdefault(info.file, ([], []))
        starts.append(info.start)
        infos.append(info)

    def owner(info: Optional[TensorInfo]) -> Optional[str]:
        if info is None or info.start < 0:
            return None
        starts, infos = spans[info.file]
        return infos[bisect.bisect_right(starts, info.start) - 1].name

    return owner


def needs_by_layer(plan: Plan, owner) -> Dict[Optional[int], Set[str]]:
    """The checkpoint tensors each layer of ``plan`` reads (``None``: the non-layer pieces): its
    pieces' values and scales (a tensor read in slices, like gpt-oss's stacked experts, counts whole)."""
    out: Dict[Optional[int], Set[str]] = {}
    for piece in plan.pieces:
        names = out.setdefault(piece.layer, set())
        infos = [piece.source, piece.scale]
        if piece.quant is not None:
            infos += [piece.quant.values, piece.quant.scale, piece.quant.global_scale]
        names.update(n for n in map(owner, infos) if n is not None)
    return out


def assign_readers(order: Sequence[TensorInfo], world: int) -> Dict[str, int]:
    """Tensors in file order cut into ``world`` contiguous runs of about equal bytes."""
    total = sum(t.nbytes for t in order)
    out, acc = {}, 0
    for t in order:
        out[t.name] = min(world - 1, acc * world // max(1, total))
        acc += t.nbytes
    return out


def layer_windows(keys: Sequence[Optional[int]], rank_bytes: Callable[[Optional[int]], int],
                  budget: int) -> List[List[Optional[int]]]:
    """Consecutive layers (``None`` alone first) in windows whose largest rank's bytes stay within
    ``budget`` (a layer larger than it is a window of its own)."""
    windows: List[List[Optional[int]]] = []
    used = budget
    for k in keys:
        b = rank_bytes(k)
        if k is None or not windows or windows[-1] == [None] or used + b > budget:
            windows.append([k])
            used = b
        else:
            windows[-1].append(k)
            used += b
    return windows


def exchange_schedule(needs: Sequence[Dict[Optional[int], Set[str]]], here: Sequence[int], me: int,
                      window_of: Dict[Optional[int], int]):
    """For the ranks ``here`` (a node) and their ``needs`` by layer: the window each tensor travels in
    (the first any of them needs it in), the last window rank ``me`` reads each of its tensors in
    (it holds them until then), and the ranks that need each tensor."""
    first: Dict[str, int] = {}
    last: Dict[str, int] = {}
    users: Dict[str, Set[int]] = {}
    for r in here:
        for k, v in needs[r].items():
            w = window_of[k]
            for n in v:
                first[n] = min(first.get(n, w), w)
                users.setdefault(n, set()).add(r)
                if r == me:
                    last[n] = max(last.get(n, w), w)
    return first, last, users


def run_group(plan: Plan, ck: Checkpoint, group, tensors: Dict[str, torch.Tensor], dev: torch.device, backend: str,
              hooks, slots, node: Optional[str]) -> Tuple[int, int, int, float]:
    """Run ``plan`` (this rank's) with the group's ranks sharing the reads (see the module). Returns
    (bytes this rank read, bytes it received, the most bytes it held at once, wall seconds)."""
    import torch.distributed as dist

    t0 = time.perf_counter()
    world, me = dist.get_world_size(group), dist.get_rank(group)
    owner = tensor_owner(ck)
    names = sorted(ck.tensors)
    index = {n: i for i, n in enumerate(names)}
    mine = needs_by_layer(plan, owner)
    gathered = [None] * world  # names as indices: a rank's needs, layer by layer, and its node
    dist.all_gather_object(gathered, ({k: sorted(index[n] for n in v) for k, v in mine.items()},
                                      node if node is not None else socket.gethostname()), group=group)
    needs = [{k: {names[i] for i in v} for k, v in g[0].items()} for g in gathered]
    nodes = list(dict.fromkeys(g[1] for g in gathered))
    members = {n: [r for r in range(world) if gathered[r][1] == n] for n in nodes}
    if len(nodes) > 1 and world != dist.get_world_size():
        raise PyloaderInputError("load(group=…) across nodes needs the whole job as its group (torch.distributed "
                                 "creates the nodes' groups with every process)")
    # every rank creates every node's group, in one order, as torch.distributed requires
    subgroups = {n: (group if len(nodes) == 1 else dist.new_group([_global(dist, group, r) for r in members[n]]))
                 for n in nodes}
    here = members[gathered[me][1]]
    sub = subgroups[gathered[me][1]]
    nccl = dist.get_backend(group) == "nccl"
    buf_device = dev if nccl else torch.device("cpu")

    keys = sorted({k for r in range(world) for k in needs[r]}, key=lambda k: (k is not None, k if k is not None else 0))
    nbytes = {n: t.nbytes for n, t in ck.tensors.items()}
    windows = layer_windows(keys, lambda k: max(sum(nbytes[n] for n in needs[r].get(k, ())) for r in range(world)),
                            WINDOW_BYTES)
    first, last, users = exchange_schedule(needs, here, me, {k: w for w, ks in enumerate(windows) for k in ks})
    by_layer: Dict[Optional[int], list] = {}
    for p in plan.pieces:
        by_layer.setdefault(p.layer, []).append(p)
    if slots is not None:
        slots.reserve(p.source.name for p in plan.pieces if p.transform == "dequant")

    held: Dict[str, torch.Tensor] = {}
    read = received = peak = 0
    fds: Dict[object, int] = {}
    try:
        for w, layers in enumerate(windows):
            order = sorted((ck.tensors[n] for n, fw in first.items() if fw == w), key=lambda t: (str(t.file), t.start))
            readers = {n: here[i] for n, i in assign_readers(order, len(here)).items()}
            failure = None
            for t in order:
                if readers[t.name] != me:
                    continue
                try:
                    held[t.name] = _read(fds, t, buf_device)
                except (OSError, PyloaderInputError) as e:  # told to every rank below, or the others would wait
                    failure = f"rank {me} reading {getattr(e, 'filename', None) or t.file}, tensor {t.name!r}: {e}"
                    break
                read += t.nbytes
            failures = [None] * world
            dist.all_gather_object(failures, failure, group=group)
            if any(failures):
                raise PyloaderInputError("load(group=…): " + "; ".join(f for f in failures if f))
            for t in order:  # every rank of the node walks the same list, so the collectives pair up
                src = readers[t.name]
                to = users[t.name] - {src}
                if not to:
                    continue
                if len(to) == 1:  # point to point: the other ranks take no part
                    (dst,) = to
                    if me == src:
                        dist.send(held[t.name], _global(dist, group, dst), group=group)
                    elif me == dst:
                        buf = torch.empty(t.nbytes, dtype=torch.uint8, device=buf_device)
                        dist.recv(buf, _global(dist, group, src), group=group)
                        held[t.name], received = buf, received + t.nbytes
                else:  # every rank of the node joins the broadcast
                    buf = held[t.name] if me == src else torch.empty(t.nbytes, dtype=torch.uint8, device=buf_device)
                    dist.broadcast(buf, _global(dist, group, src), group=sub)
                    if me in to:
                        held[t.name], received = buf, received + t.nbytes
            peak = max(peak, sum(b.numel() for b in held.values()))
            for name in [n for n in held if n not in last]:  # read for others only
                del held[name]
            for layer in layers:
                pieces = by_layer.get(layer)
                if pieces:
                    _run_layer(pieces, plan, ck, owner, held, tensors, dev, backend, slots)
                    if hooks is not None:
                        hooks(layer)
            for name in [n for n, lw in last.items() if lw == w and n in held]:
                del held[name]
    finally:
        for fd in fds.values():
            os.close(fd)
    return read, received, peak, time.perf_counter() - t0


def _read(fds: Dict[object, int], t: TensorInfo, device: torch.device) -> torch.Tensor:
    fd = fds.get(t.file)
    if fd is None:
        fd = fds[t.file] = os.open(t.file, os.O_RDONLY)
    data = os.pread(fd, t.nbytes, t.start)
    if len(data) != t.nbytes:
        raise PyloaderInputError(f"{t.file}, tensor {t.name!r}: the file ends inside it")
    host = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    return host.to(device) if device.type != "cpu" else host


def _bytes_of(info: TensorInfo, ck: Checkpoint, owner, held: Dict[str, torch.Tensor], start: int, end: int):
    whole = ck.tensors[owner(info)]
    return held[whole.name][start - whole.start:end - whole.start]


def _run_layer(pieces, plan: Plan, ck: Checkpoint, owner, held, tensors, dev, backend, slots) -> None:
    """One layer of the plan from held bytes: its scales typed, each piece's rows viewed as its
    source, one launch."""
    scales = {}
    for p in pieces:
        for info in (p.scale, p.quant.global_scale if p.quant is not None else None):
            if info is not None and info.name not in scales:
                raw = _bytes_of(info, ck, owner, held, info.start, info.end)
                scales[info.name] = raw.view(info.torch_dtype).view(info.shape).to(dev)
    jobs = []
    for p in pieces:
        a, b = read_rows(p)
        raw = _bytes_of(p.source, ck, owner, held, *p.read_range)
        src = view_source(raw, p.source, (b - a) if p.source.shape else 1, p.quant is not None).to(dev)
        jobs += piece_jobs(p, src, 0, tensors[p.target], scales, plan.targets[p.target].experts, slots)
    run_jobs([j for j in jobs if j.src.numel()], backend)


def _global(dist, group, rank: int) -> int:
    return dist.get_global_rank(group, rank) if group is not None and group is not dist.group.WORLD else rank
