"""Peer loaders measured beside pyloader on the same files: safetensors (raw, and the engine-style
per-tensor dequant and copy), fastsafetensors, run:ai's streamer and InstantTensor, each when
installed. Raw modes load the bytes only; the note of each row says which mode it is."""

import importlib.util
import time
from pathlib import Path
from typing import Dict

import torch

from ..loading.batching import piece_jobs
from ..ops import reference
from .results import sync


def fastsafetensors_load_raw(files, dev) -> list:
    """fastsafetensors 0.5 without GDS (16 threads): every file to the device, every tensor made."""
    from fastsafetensors import SafeTensorsFileLoader

    loader = SafeTensorsFileLoader(None, f"cuda:{dev.index or 0}", nogds=True, max_threads=16)
    loader.add_filenames({0: files})
    fb = loader.copy_files_to_device()
    keys = list(loader.get_keys())
    for k in keys:
        fb.get_tensor(k)
    sync(dev)
    fb.close()
    loader.close()
    return keys


def peer_providers(files, plan, targets, expected, dev):
    """(label, run) for each installed peer; ``run()`` loads once and returns (seconds, extra).
    Raw modes load the checkpoint's bytes only: checked by the names and bytes they return. The
    engine-style path (safetensors, then a torch dequant with expanded scales and a copy a tensor)
    fills the targets: checked byte for byte like pyloader."""
    from safetensors import safe_open

    from . import mismatches

    names = {n for f in files for n in safe_open(f, "pt").keys()}
    total = sum(p.stat().st_size for p in map(Path, files))
    dst: Dict[str, torch.Tensor] = {}

    def timed(label, fn, raw=True):
        def run():
            if not raw:
                for t in targets.values():
                    t.view(torch.uint8).fill_(0x5A)
            t0 = time.perf_counter()
            got = fn()
            sync(dev)
            seconds = time.perf_counter() - t0
            if raw:
                loaded = set(got) if got is not None else set(dst)
                if loaded != names:
                    raise SystemExit(f"{label} loaded {len(loaded)} of the checkpoint's {len(names)} tensors")
                note = f"raw bytes of all {len(names)} tensors, no dequant or fusion"
            else:
                bad = mismatches(targets, expected)
                if bad:
                    raise SystemExit(f"{label}: {len(bad)} targets differ from the reference")
                note = "every byte verified after each load"
            return seconds, dict(note=note, files_bytes=total)
        return label, run

    def safetensors_raw():
        out = {}
        for f in files:
            with safe_open(f, "pt", device=str(dev)) as h:
                for k in h.keys():
                    out[k] = h.get_tensor(k)
        return out

    def safetensors_engine_style():
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
        for name, spec in plan.targets.items():
            if spec.fill_from is not None:
                targets[name].copy_(targets[spec.fill_from])

    def into_preallocated(name, t):
        d = dst.get(name)
        if d is None:
            d = dst[name] = torch.empty(t.shape, dtype=t.dtype, device=dev)
        d.copy_(t)  # the peer may reuse its buffer: copy before advancing

    def fastsafetensors_raw():
        return fastsafetensors_load_raw(files, dev)

    def runai_raw():
        from runai_model_streamer import SafetensorsStreamer

        with SafetensorsStreamer() as s:
            s.stream_files(files)
            for name, t in s.get_tensors():
                into_preallocated(name, t)

    def instanttensor_raw(buffered):
        from instanttensor import BackendPolicy, safe_open as it_open

        kw = {"backend": BackendPolicy.BUFFERED} if buffered else {}
        with it_open(files, framework="pt", device=dev.index or 0, copy=False, **kw) as f:
            for name, t in f.tensors():
                into_preallocated(name, t)

    out = [timed("safetensors safe_open(device=cuda) raw", safetensors_raw),
           timed("safetensors + per-tensor torch dequant + copy_", safetensors_engine_style, raw=False)]
    for label, module, fn in (("fastsafetensors 0.5 (nogds) raw", "fastsafetensors", fastsafetensors_raw),
                              ("run:ai streamer raw (copy to preallocated)", "runai_model_streamer", runai_raw),
                              ("InstantTensor buffered raw", "instanttensor", lambda: instanttensor_raw(True)),
                              ("InstantTensor default raw", "instanttensor", lambda: instanttensor_raw(False))):
        if importlib.util.find_spec(module) is None:
            print(f"  {label:44s} not installed: not measured")
            continue
        out.append(timed(label, fn))
    return out
