"""``pyloader.load(..., group=…)``: the ranks of a ``torch.distributed`` group load one checkpoint
reading each tensor's bytes once.

Every rank derives every rank's plan (the same headers, rules and presets; the ranks' ``tp``/``pp``/
``ep`` and nodes are gathered), so all know which checkpoint tensors each rank needs. Only the ranks
of a node share a page cache, so each node reads what its ranks need once: in file order, cut into
one contiguous run a rank of the node, balanced by bytes (a rank's reads stay in few files). Readers read their tensors; each tensor then goes, still
quantized, only where it is needed inside its node: nowhere when its reader is its only user, point
to point to a single other user, broadcast (over the node's group) when several need it. Each rank then runs the one-process load into its
own parameters (its TP slices, its experts, its layers) from what it holds.

Staging: a rank's tensors are written at their own offsets into sparse copies of the checkpoint's
files in a private directory (``/dev/shm`` where it exists), so the one-process load reads them
as it reads a checkpoint, every format and layout included. This is the path of the gloo backend
(CPU processes); device staging with NCCL is not built yet.
"""

import bisect
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch

from ..errors import PyloaderInputError
from ..format.checkpoint import Checkpoint, open_checkpoint
from ..format.quant import recognize_checkpoint
from ..format.safetensors import TensorInfo
from ..parallel import Parallel
from ..routing.plan import build_plan
from ..routing.presets import build_preset, load_config

# beside the shards: what the one-process load reads from the directory itself
_SIDE_FILES = ("config.json", "hf_quant_config.json", "model.safetensors.index.json")


def tensor_owner(ck: Checkpoint) -> Callable[[Optional[TensorInfo]], Optional[str]]:
    """The checkpoint tensor that holds a byte range (a piece's source, or a slice of one)."""
    spans: Dict[Path, Tuple[List[int], List[TensorInfo]]] = {}
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


def needed_tensors(ck: Checkpoint, config: dict, preset: Optional[str], par: Parallel, quant=None,
                   owner=None) -> Set[str]:
    """The checkpoint tensors a rank at ``par`` reads: its pieces' values and scales (a tensor read
    in slices, like gpt-oss's stacked experts, counts whole). ``owner``: :func:`tensor_owner` of
    ``ck``, when it serves several ranks."""
    p = build_preset(config, preset, par)
    p.add_passthrough(ck.tensors)
    plan = build_plan(ck, p.targets, p.rules, unexpected="ignore", block_size=p.block_size, quant=quant)
    owner = owner or tensor_owner(ck)
    out = set()
    for piece in plan.pieces:
        out.add(owner(piece.source))
        out.add(owner(piece.scale))
        if piece.quant is not None:
            out.update(owner(t) for t in (piece.quant.values, piece.quant.scale, piece.quant.global_scale))
    out.discard(None)
    return out


def assign_readers(order: Sequence[TensorInfo], world: int) -> Dict[str, int]:
    """Tensors in file order cut into ``world`` contiguous runs of about equal bytes."""
    total = sum(t.nbytes for t in order)
    out, acc = {}, 0
    for t in order:
        out[t.name] = min(world - 1, acc * world // max(1, total))
        acc += t.nbytes
    return out


def load_group(target, source, group, load, *, config=None, preset: Optional[str] = None, tp=None, pp=None, ep=None,
               staging: Optional[str] = None, node: Optional[str] = None, **kw):
    """``load`` (the one-process :func:`pyloader.load`) for this rank of ``group``; see the module.
    ``node``: this rank's machine (default: its host name); the ranks of a node share its page cache,
    so each node reads what its ranks need once, and tensors travel only inside a node."""
    import socket

    import torch.distributed as dist

    from .loader import rank_pair

    if kw.get("rules") is not None:
        raise PyloaderInputError("load(group=…) routes with a preset: rules= is not supported with a group yet")
    if not isinstance(source, (str, Path)) or not Path(source).is_dir():
        raise PyloaderInputError("load(group=…) reads a checkpoint directory (each tensor once, over the group)")
    ck = open_checkpoint(source)
    cfg = load_config(config if config is not None else ck.config_path)
    if not cfg:
        raise PyloaderInputError(f"{source}: load(group=…) needs the config (config.json, or config=)")
    world, me = dist.get_world_size(group), dist.get_rank(group)
    info = [None] * world
    dist.all_gather_object(info, (rank_pair(tp, "tp"), rank_pair(pp, "pp"), rank_pair(ep, "ep"),
                                  node if node is not None else socket.gethostname()), group=group)
    quant = recognize_checkpoint(ck, cfg)
    owner = tensor_owner(ck)
    needs = [needed_tensors(ck, cfg, preset, Parallel(t[0], t[1], p[0], p[1], e[0], e[1]), quant, owner)
             for t, p, e, _ in info]
    nodes = list(dict.fromkeys(n for *_, n in info))
    members = {n: [r for r in range(world) if info[r][3] == n] for n in nodes}
    if len(nodes) > 1 and world != dist.get_world_size():
        raise PyloaderInputError("load(group=…) across nodes needs the whole job as its group (torch.distributed "
                                 "creates the nodes' groups with every process)")
    # every rank creates every node's group, in one order, as torch.distributed requires
    subgroups = {n: (group if len(nodes) == 1 else dist.new_group([_global(dist, group, r) for r in members[n]]))
                 for n in nodes}
    mine = members[info[me][3]]
    sub = subgroups[info[me][3]]
    order = sorted((ck.tensors[n] for n in set().union(*(needs[r] for r in mine))), key=lambda t: (str(t.file), t.start))
    readers = {name: mine[i] for name, i in assign_readers(order, len(mine)).items()}
    held: Dict[str, torch.Tensor] = {}
    read = received = 0
    fds: Dict[Path, int] = {}
    failure = None
    try:
        for t in order:
            if readers[t.name] == me:
                fd = fds.get(t.file)
                if fd is None:
                    fd = fds[t.file] = os.open(t.file, os.O_RDONLY)
                data = os.pread(fd, t.nbytes, t.start)
                if len(data) != t.nbytes:
                    raise PyloaderInputError(f"{t.file}, tensor {t.name!r}: the file ends inside it")
                held[t.name] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
                read += t.nbytes
    except (OSError, PyloaderInputError) as e:  # told to every rank below, or the others would wait forever
        failure = f"rank {me} reading {getattr(e, 'filename', None) or t.file}, tensor {t.name!r}: {e}"
    finally:
        for fd in fds.values():
            os.close(fd)
    failures = [None] * world
    dist.all_gather_object(failures, failure, group=group)
    if any(failures):
        raise PyloaderInputError("load(group=…): " + "; ".join(f for f in failures if f))
    for t in order:  # every rank of the node walks the same list, so the collectives pair up
        src = readers[t.name]
        users = {r for r in mine if t.name in needs[r]} - {src}
        if not users:
            continue
        buf = held.get(t.name)
        if buf is None:
            buf = torch.empty(t.nbytes, dtype=torch.uint8)
        if len(users) == 1:
            (dst,) = users
            if me == src:
                dist.send(buf, _global(dist, group, dst), group=group)
            elif me == dst:
                dist.recv(buf, _global(dist, group, src), group=group)
                held[t.name], received = buf, received + t.nbytes
        else:
            dist.broadcast(buf, _global(dist, group, src), group=sub)
            if me in users:
                held[t.name], received = buf, received + t.nbytes
    root = Path(tempfile.mkdtemp(prefix=f"pyloader-rank{me}-", dir=staging or _staging_dir()))
    try:
        _stage(ck, Path(source), root, {n: b for n, b in held.items() if n in needs[me]})
        report = load(target, root, config=cfg, preset=preset, tp=tp, pp=pp, ep=ep, **kw)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report.bytes_read, report.bytes_received, report.io = read, received, f"group of {world}"
    return report


def _global(dist, group, rank: int) -> int:
    return dist.get_global_rank(group, rank) if group is not None and group is not dist.group.WORLD else rank


def _staging_dir() -> Optional[str]:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None


def _stage(ck: Checkpoint, source: Path, root: Path, held: Dict[str, torch.Tensor]) -> None:
    """Sparse copies of the checkpoint's files holding only ``held``'s tensors, at their offsets."""
    for name in _SIDE_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, root / name)
    by_file: Dict[Path, List[str]] = {}
    for n in held:
        by_file.setdefault(ck.tensors[n].file, []).append(n)
    for f in ck.files:
        with open(f, "rb") as h:
            head = h.read(8)
            head += h.read(int.from_bytes(head, "little"))  # the header: the one-process load parses it again
        out = root / f.relative_to(source)
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "wb") as h:
            h.write(head)
            h.truncate(os.path.getsize(f))
            for n in by_file.get(f, ()):
                h.seek(ck.tensors[n].start)
                h.write(held[n].numpy().tobytes())
