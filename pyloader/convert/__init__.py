"""``pyloader convert SRC DST``: a quantized checkpoint directory (block/per-tensor/per-channel FP8,
MXFP8, FP4 with E8M0 or NVFP4 scales, gpt-oss MXFP4, INT4 pack-quantized; mixed ones too) → a
BF16 (or FP16/FP32) one that any tool loads.

- Every shard is read with pyloader's validated reader; every quantized weight, its scales and
  its format are recognized from the tensors' layouts and checked against the config
  (:mod:`pyloader.format.quant`), before anything is written. Scales and activation scales are
  dropped; packed weights are written under their dequantized names (``weight_packed`` →
  ``weight``, ``X_blocks`` → ``X``).
- The sanity gate stops a tensor whose values no weight has (max |x| above ``gate_limit``, or all
  zero while its codes are not) before its file is renamed into place (``gate="warn"``: reported).
- Output headers are known before any data (every shape and dtype is), so data is written at
  computed offsets, tensor by tensor, in row chunks: resident memory stays at a few chunks
  whatever the model size. Reads, transforms (GPU with the CUDA/Triton backend, or the CPU torch
  reference) and writes overlap on a small thread pool, across file boundaries. On tmpfs each
  output file is allocated ahead of the writes, in steps on its own thread (a full disk is an
  error, never a SIGBUS), and chunks are copied into mapped windows of it, so the workers write
  one file side by side (write(2) to one file is serialized by its inode lock); on disks write(2)
  is used (docs/decisions.md#convert-writes).
- Atomic and resumable: each file is written as ``NAME.tmp``, fsynced, re-validated and renamed;
  ``--resume`` keeps finished files whose headers and sizes check out. The index (new weight map,
  correct ``total_size``, other metadata kept) and ``config.json`` (no ``quantization_config`` or
  ``expert_dtype``, the new ``torch_dtype``) are written last; ``hf_quant_config.json`` is not
  copied; every other file of SRC is copied unchanged.
- A census of NaN/Inf per output tensor is reported (not fatal).
- ``torchrun --nproc-per-node N -m pyloader convert …``: output files are split across ranks;
  rank 0 writes the index and config after a barrier.
"""

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import List, Optional

import torch

from ..errors import PyloaderInputError
from ..format.checkpoint import INDEX_NAME, open_checkpoint, read_json_object
from ..format.quant import HF_QUANT_CONFIG, read_small_ints
from ..gate import DEFAULT_LIMIT, Gate
from ..rss import peak_rss, reset_peak_rss
from .outputs import file_complete, writes_for
from .pipeline import ConvertReport, Converter
from .planning import OutFile, plan_conversion

logger = logging.getLogger("pyloader")

OUT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}



def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise PyloaderInputError(f"--device {device!r}: expected auto, cpu, cuda or cuda:N") from None


def _check_paths(src: Path, dst: Path):
    if not src.is_dir():
        raise PyloaderInputError(f"{src}: SRC must be a checkpoint directory")
    s, d = src.resolve(), dst.resolve()
    if d == s or s in d.parents:
        raise PyloaderInputError(f"{dst}: DST must not be SRC or inside it (SRC is never modified)")
    if d in s.parents:
        raise PyloaderInputError(f"{dst}: SRC inside DST is refused (copying other files would recurse)")


def convert(src, dst, device: str = "auto", out_dtype: str = "bfloat16", resume: bool = False,
            max_shard_size: Optional[int] = None, workers: Optional[int] = None, backend: Optional[str] = None,
            progress: bool = True, rank: int = 0, world_size: int = 1, writes: str = "auto", gate: str = "error",
            gate_limit: float = DEFAULT_LIMIT, to: str = "float", scale_fmt: str = "float32") -> ConvertReport:
    """Convert the quantized checkpoint directory ``src`` into ``dst`` (see the module docstring).
    ``gate``: ``"error"``, ``"warn"`` or ``"off"`` (see :mod:`pyloader.gate`). ``to="fp8-block"``:
    quantized weights and float linear weights (not embeddings, head, norms, routers) become
    128x128 block FP8 with F32 ``weight_scale_inv`` (``scale_fmt="ue8m0"``: powers of two), FP4
    with E8M0 scales by the lossless transcode (``report.nonexact_blocks`` counts blocks it rounded).
    ``writes``: ``"mmap"`` (output preallocated, chunks copied into mapped windows side by side),
    ``"pwrite"`` (write(2), which one file's inode lock serializes) or ``"auto"`` (mmap on tmpfs,
    write(2) elsewhere)."""
    t0 = time.perf_counter()
    measured = reset_peak_rss()
    src, dst = Path(src), Path(dst)
    _check_paths(src, dst)
    if to not in ("float", "fp8-block"):
        raise PyloaderInputError(f"--to {to!r}: expected float (the --out-dtype) or fp8-block")
    if scale_fmt not in ("float32", "ue8m0"):
        raise PyloaderInputError(f"--scale-fmt {scale_fmt!r}: expected float32 or ue8m0")
    if out_dtype not in OUT_DTYPES:
        raise PyloaderInputError(f"--out-dtype {out_dtype!r}: expected one of {', '.join(OUT_DTYPES)}")
    odt = OUT_DTYPES[out_dtype]
    checker = Gate(gate, gate_limit)
    ck = open_checkpoint(src)
    config_path = src / "config.json"
    config = read_json_object(config_path, "config") if config_path.is_file() else {}
    hq_path = src / HF_QUANT_CONFIG
    hf_quant = read_json_object(hq_path, "hf_quant_config") if hq_path.is_file() else None
    fds = {}
    try:
        files = plan_conversion(ck, config, odt, max_shard_size, hf_quant, lambda info: read_small_ints(info, fds), to)
    finally:
        for fd in fds.values():
            os.close(fd)
    if dst.exists() and any(dst.iterdir()) and not resume and rank == 0:
        raise PyloaderInputError(f"{dst}: DST exists and is not empty; pass --resume to continue an interrupted run")
    dst.mkdir(parents=True, exist_ok=True)
    dev = _resolve_device(device)
    mine = [f for i, f in enumerate(files) if i % world_size == rank]
    todo, done = [], []
    for f in mine:
        (done if resume and file_complete(dst / f.name, f) else todo).append(f)
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=sum(t.source.nbytes for f in todo for t in f.tensors if t.scale_of is None), unit="B",
                       unit_scale=True,
                       unit_divisor=1024, desc=f"pyloader convert{f' rank {rank}' if world_size > 1 else ''}")
        except ImportError:
            pass
    if workers is None:  # CPU: torch's threads already use the cores; more workers only add resident chunks
        workers = 8 if dev.type == "cuda" else max(1, min(4, (os.cpu_count() or 1) // 8))
    conv = Converter(dev, backend, odt, workers, bar, writes_for(dst, writes), checker)
    conv.ue8m0 = scale_fmt == "ue8m0"
    logger.info("pyloader convert: %s writes into %s", conv.writes, dst)
    try:
        conv.write_files([(dst / f.name, f) for f in todo], conv.report.files_written.append)
    finally:
        conv.pool.shutdown(wait=True)
        conv.close()
        if bar is not None:
            bar.close()
    report = conv.report
    report.files_resumed = [f.name for f in done]
    report.bytes_in = sum(t.source.nbytes + (t.scale.nbytes if t.scale else 0) for f in todo for t in f.tensors
                          if t.scale_of is None)
    report.bytes_out = sum(f.size for f in todo)
    if world_size > 1:
        import torch.distributed as dist

        dist.barrier()
    if rank == 0:
        fp8 = None
        if to == "fp8-block":
            fp8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
            if scale_fmt == "ue8m0":
                fp8["scale_fmt"] = "ue8m0"
        _write_index_config_and_copy(src, dst, ck, config, files, out_dtype, fp8)
    report.seconds = time.perf_counter() - t0
    report.peak_rss = peak_rss() if measured else None
    return report


def _write_index_config_and_copy(src: Path, dst: Path, ck, config: dict, files: List[OutFile], out_dtype: str,
                                 quantization: Optional[dict] = None):
    weight_map = {t.name: f.name for f in files for t in f.tensors}
    total = sum(t.nbytes for f in files for t in f.tensors)
    meta = dict(ck.index_metadata or {})
    meta["total_size"] = total
    tmp = dst / (INDEX_NAME + ".tmp")
    tmp.write_text(json.dumps({"metadata": meta, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    os.replace(tmp, dst / INDEX_NAME)
    skip = {p.name for p in ck.files} | {INDEX_NAME, "config.json", HF_QUANT_CONFIG}
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if path.is_dir() or (len(rel.parts) == 1 and (rel.name in skip or rel.suffix == ".safetensors")):
            continue
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    if (src / "config.json").is_file():  # rewritten whenever SRC has one, an empty one included
        c = dict(config)
        if isinstance(c.get("text_config"), dict):  # multimodal configs keep the language model's inside
            c["text_config"] = dict(c["text_config"])
        for part in (c, c.get("text_config")):
            if isinstance(part, dict):
                part.pop("quantization_config", None)
                part.pop("expert_dtype", None)  # DeepSeek-V4: experts are no longer FP4
        if "dtype" in c:
            c["dtype"] = out_dtype
        c["torch_dtype"] = out_dtype
        if quantization is not None:  # --to fp8-block: the block FP8 the files now hold
            c["quantization_config"] = quantization
        tmpc = dst / "config.json.tmp"
        tmpc.write_text(json.dumps(c, indent=2) + "\n")
        os.replace(tmpc, dst / "config.json")


def parse_size(text: str) -> int:
    t = text.strip().upper()
    for suffix, mult in (("TB", 10 ** 12), ("GB", 10 ** 9), ("MB", 10 ** 6), ("KB", 10 ** 3), ("B", 1)):
        if t.endswith(suffix):
            try:
                return int(float(t[: -len(suffix)]) * mult)
            except ValueError:
                break
    try:
        return int(t)
    except ValueError:
        raise PyloaderInputError(f"--max-shard-size {text!r}: expected a size like 5GB, 500MB or a byte count") from None
