"""Peer loaders measured beside pyloader on the same files: safetensors (raw, and the engine-style
per-tensor dequant and copy), fastsafetensors, run:ai's streamer and InstantTensor, each when
installed. Raw modes load the bytes only; the note of each row says which mode it is."""

import time
from typing import Dict

import torch

from ..loading.batching import piece_jobs
from ..ops import reference
from .results import sync


def fastsafetensors_load_raw(files, dev) -> None:
    """fastsafetensors 0.5 without GDS (16 threads): every file to the device, every tensor made."""
    from fastsafetensors import SafeTensorsFileLoader

    loader = SafeTensorsFileLoader(None, f"cuda:{dev.index or 0}", nogds=True, max_threads=16)
    loader.add_filenames({0: files})
    fb = loader.copy_files_to_device()
    for k in loader.get_keys():
        fb.get_tensor(k)
    sync(dev)
    fb.close()
    loader.close()


def run_peers(files, plan, targets, dev, prepare, record, repeats: int = 1):
    """Each peer as often as pyloader (best of ``repeats``, the page cache prepared before each)."""
    from safetensors import safe_open

    def best(label, fn):
        times, how = [], ""
        for _ in range(max(1, repeats)):
            how = prepare()
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        record(label, min(times), how, repeats=[round(x, 3) for x in times])

    def safetensors_raw():
        out = []
        for f in files:
            with safe_open(f, "pt", device=str(dev)) as h:
                for k in h.keys():
                    out.append(h.get_tensor(k))
        sync(dev)
        return out

    best("safetensors safe_open(device=cuda) raw", safetensors_raw)

    def safetensors_engine_style():
        # What engines do today: raw tensors, then a torch dequant (expanded fp32 scales) and a copy_ per tensor.
        handles = {f: safe_open(f, "pt", device=str(dev)) for f in files}
        for p in plan.pieces:
            w = handles[str(p.source.file)].get_tensor(p.source.name)
            s = handles[str(p.scale.file)].get_tensor(p.scale.name) if p.scale is not None else None
            jobs = piece_jobs(p, w, 0, targets[p.target], {p.scale.name: s} if s is not None else {},
                              plan.targets[p.target].experts)
            for j in jobs:
                if j.scale is not None:
                    j.dst.copy_(reference.dequant_expanded_scales_torch(j.src, j.scale, j.block_size))
                else:
                    j.dst.copy_(j.src)
        sync(dev)

    best("safetensors + per-tensor torch dequant + copy_", safetensors_engine_style)
    dst: Dict[str, torch.Tensor] = {}

    def into_preallocated(name, t):
        d = dst.get(name)
        if d is None:
            d = dst[name] = torch.empty(t.shape, dtype=t.dtype, device=dev)
        d.copy_(t)  # the peer may reuse its buffer: copy before advancing

    def fastsafetensors_raw():
        fastsafetensors_load_raw(files, dev)

    def runai_raw():
        from runai_model_streamer import SafetensorsStreamer

        with SafetensorsStreamer() as s:
            s.stream_files(files)
            for name, t in s.get_tensors():
                into_preallocated(name, t)
        sync(dev)

    def instanttensor_raw(buffered):
        from instanttensor import BackendPolicy, safe_open as it_open

        kw = {"backend": BackendPolicy.BUFFERED} if buffered else {}
        with it_open(files, framework="pt", device=dev.index or 0, copy=False, **kw) as f:
            for name, t in f.tensors():
                into_preallocated(name, t)
        sync(dev)

    for label, module, fn in (("fastsafetensors 0.5 (nogds) raw", "fastsafetensors", fastsafetensors_raw),
                              ("run:ai streamer raw (copy to preallocated)", "runai_model_streamer", runai_raw),
                              ("InstantTensor buffered raw", "instanttensor", lambda: instanttensor_raw(True)),
                              ("InstantTensor default raw", "instanttensor", lambda: instanttensor_raw(False))):
        try:
            __import__(module)
        except ImportError:
            print(f"  {label:44s} not installed: not measured")
            continue
        try:
            best(label, fn)  # the peer's destination tensors are allocated in its first run, reused after
        except Exception as e:  # noqa: BLE001 - a peer that fails is reported, the others still run
            print(f"  {label:44s} failed: {type(e).__name__}: {str(e)[:200]}")
        dst.clear()
        torch.cuda.empty_cache()
