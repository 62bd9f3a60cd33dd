"""``pyloader`` command line: ``inspect`` (how every checkpoint name routes), ``bench`` (load throughput),
``convert`` (quantized checkpoint → BF16 checkpoint).

Exit codes: 0 ok, 2 bad input (the message names the file and tensor; no traceback), 1 internal error.
"""

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import List, Optional

from .errors import PyloaderInputError


def _human_bytes(n: Optional[int]) -> str:
    if n is None:
        return "unknown (index only)"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


def cmd_inspect(args) -> int:
    from .format.checkpoint import open_checkpoint
    from .format.quant import recognize_checkpoint
    from .parallel import Parallel
    from .routing.plan import build_plan, plan_report
    from .routing.presets import build_preset, load_config

    path = Path(args.checkpoint)
    ck = open_checkpoint(path, require_files=False)
    config_path = Path(args.config) if args.config else (path.parent if path.is_file() else path) / "config.json"
    if not config_path.is_file():
        raise PyloaderInputError(f"{config_path}: no config.json (pass --config FILE)")
    config = load_config(config_path)
    parallel = Parallel(tp_rank=args.tp_rank, tp_size=args.tp_size, pp_rank=args.pp_rank, pp_size=args.pp_size,
                        ep_rank=args.ep_rank, ep_size=args.ep_size)
    quant = recognize_checkpoint(ck, config)
    preset = build_preset(config, args.preset, parallel)
    preset.add_passthrough(ck.tensors)
    plan = build_plan(ck, preset.targets, preset.rules, unexpected="ignore", block_size=preset.block_size, quant=quant)
    plan.owned_layers = preset.owned_layers
    report = plan_report(plan, preset.name)
    report["formats"] = quant.counts() if quant is not None else None
    if args.json:
        json.dump(report, sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    print(f"checkpoint   {path}  ({len(ck.tensors)} tensors in {len(ck.files)} files"
          f"{'' if ck.headers_read else '; index only, shapes from config'})")
    print(f"preset       {preset.name}  (model_type {config.get('model_type')!r})")
    print(f"rank         tp {args.tp_rank}/{args.tp_size}  pp {args.pp_rank}/{args.pp_size}  ep {args.ep_rank}/{args.ep_size}"
          f"  layers {preset.owned_layers[0]}..{preset.owned_layers[1] - 1} of {preset.num_layers}")
    print(f"routed       {report['routed']} tensors into {len(report['targets'])} targets; reads {_human_bytes(report['read_bytes'])}")
    transforms = {}
    for p in {p.source.name: p for p in plan.pieces}.values():  # a segmented source counts once
        transforms[p.transform] = transforms.get(p.transform, 0) + 1
    print(f"transforms   {', '.join(f'{k} {v}' for k, v in sorted(transforms.items()))}")
    if quant is None:
        print("formats      not recognized: an index alone has no dtypes (needs the safetensors headers)")
    else:
        formats = quant.counts()
        print(f"formats      {', '.join(f'{k} {v}' for k, v in sorted(formats.items())) or 'no quantized weights'}")
    for reason, n in report["skipped"].items():
        print(f"skipped      {n:7d}  {reason}")
    for name in report["unexpected"][:20]:
        print(f"UNEXPECTED   {name}")
    if len(report["unexpected"]) > 20:
        print(f"UNEXPECTED   … {len(report['unexpected']) - 20} more")
    for name in report["missing"][:20]:
        print(f"MISSING      {name}")
    ok = not report["unexpected"] and not report["missing"]
    print("result       " + ("every checkpoint tensor has a place and every target is covered" if ok else
                             "problems above (unexpected names would be an error when loading)"))
    return 0


def cmd_convert(args) -> int:
    import os

    from .convert import convert, parse_size

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    device = args.device
    if world > 1:
        import torch
        import torch.distributed as dist

        dist.init_process_group("gloo")
        if device in ("auto", "cuda") and torch.cuda.is_available():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    try:
        report = convert(args.src, args.dst, device=device, out_dtype=args.out_dtype, resume=args.resume,
                         max_shard_size=parse_size(args.max_shard_size) if args.max_shard_size else None,
                         workers=args.workers, progress=not args.no_progress, rank=rank, world_size=world,
                         gate=args.gate, gate_limit=args.gate_limit, to=args.to, scale_fmt=args.scale_fmt)
    except OSError as e:  # no permission, disk full, a file vanished: the user's to fix, not a crash
        raise PyloaderInputError(f"{e.filename or args.dst}: {e.strerror or e}") from None
    gb = report.bytes_in / 1e9
    print(f"converted {len(report.files_written)} file(s) ({report.dequantized} tensors dequantized, {report.copied} "
          f"copied) on {report.device} [{report.backend}]: {gb:.2f} GB in {report.seconds:.1f} s "
          f"({gb / report.seconds if report.seconds else 0:.2f} GB/s in); resumed {len(report.files_resumed)}"
          + (f"; peak resident {report.peak_rss / 2**30:.2f} GiB" if report.peak_rss else ""))
    for name, (nan, inf) in sorted(report.nonfinite.items()):
        print(f"  non-finite values in {name}: {nan} NaN, {inf} Inf")
    for warning in report.gate_warnings:
        print(f"  gate: {warning}")
    if report.nonexact_blocks:
        print(f"  fp8-block transcode: {report.nonexact_blocks} 128x128 blocks rounded (sub-scales spanning more "
              "than 2^14)")
    return 0


def cmd_bench(args) -> int:
    from .bench import run_bench
    from .bench.plot import plot_rows, require_matplotlib

    if args.plot:
        require_matplotlib()  # refused before the benchmark runs, not after

    if args.nproc is not None:
        from .bench.group import run_group_bench

        rows = run_group_bench(args.nproc, size_gb=args.size_gb, checkpoint=args.checkpoint, cold=args.cold,
                               repeats=args.repeats, results_path=args.results, keep=args.tmpdir)
        if args.plot:
            plot_rows(rows, args.plot)
        return 0
    rows = run_bench(checkpoint=args.checkpoint, size_gb=args.size_gb, preset=args.preset, device=args.device,
                     cold=args.cold, peers=args.peers, repeats=args.repeats, results_path=args.results, keep=args.tmpdir)
    if args.plot:
        plot_rows(rows, args.plot)
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="pyloader", description="Fast, correct loading of large-model weights.")
    ap.add_argument("-v", "--verbose", action="store_true", help="log what pyloader decides (backends, plans)")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="show how every checkpoint tensor routes (no weights needed: an index and config.json suffice)")
    p.add_argument("checkpoint", help="checkpoint directory or model.safetensors.index.json")
    p.add_argument("--config", help="config.json (default: beside the checkpoint)")
    p.add_argument("--preset", help="override the preset chosen from config.json")
    for what, name in (("tp", "tensor"), ("pp", "pipeline"), ("ep", "expert")):
        p.add_argument(f"--{what}-rank", type=int, default=0, help=f"this rank's {name}-parallel rank (default 0)")
        p.add_argument(f"--{what}-size", type=int, default=1, help=f"{name}-parallel size (default 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_inspect)
    c = sub.add_parser("convert", help="quantized checkpoint directory (FP8, MXFP8, FP4, NVFP4, MXFP4, INT4) → BF16 "
                                       "(or FP16/FP32) checkpoint directory")
    c.add_argument("src", help="the quantized checkpoint directory (safetensors files, an index, config.json, "
                               "hf_quant_config.json if ModelOpt wrote one)")
    c.add_argument("dst", help="the output directory (new or empty; with --resume, a partial one)")
    c.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (auto: the GPU if there is one)")
    c.add_argument("--out-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="dtype of the dequantized weights (default bfloat16)")
    c.add_argument("--resume", action="store_true", help="keep finished output files (validated) and continue")
    c.add_argument("--max-shard-size", help="repack output files up to this size (e.g. 5GB); default: SRC's layout")
    c.add_argument("--workers", type=int, default=None,
                   help="chunks converted concurrently (bounds memory: about workers x 200 MB; default 8 on a GPU, "
                        "on a CPU one per 8 cores, at most 4: torch's own threads already share the cores)")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.add_argument("--gate", default="error", choices=["error", "warn", "off"],
                   help="a dequantized tensor beyond --gate-limit, with NaN values, or all zero while its codes are "
                        "not: stop with its name (error, default), report it (warn), or do not check (off)")
    c.add_argument("--gate-limit", type=float, default=1e4, help="largest plausible |weight| (default 1e4)")
    c.add_argument("--to", default="float", choices=["float", "fp8-block"],
                   help="float: dequantize to --out-dtype (default); fp8-block: 128x128 block FP8 with F32 scales "
                        "(DeepSeek recipe; FP4 with E8M0 scales transcoded without rounding where it can be)")
    c.add_argument("--scale-fmt", default="float32", choices=["float32", "ue8m0"],
                   help="with --to fp8-block: float32 scales, or powers of two (ue8m0) stored as float32")
    c.set_defaults(func=cmd_convert)
    b = sub.add_parser("bench", help="load throughput against the machine's ceilings and peer loaders")
    b.add_argument("--checkpoint", help="a real checkpoint directory (default: a synthetic DeepSeek-V3-shaped FP8 slice)")
    b.add_argument("--size-gb", type=float, help="size of the synthetic checkpoint (default 6 on a GPU, 0.3 on CPU)")
    b.add_argument("--preset", help="override the preset chosen from config.json")
    b.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    b.add_argument("--cold", action="store_true", help="drop the files from the page cache before each load")
    b.add_argument("--peers", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure the installed peer loaders on the same files (default; --no-peers: pyloader only)")
    b.add_argument("--repeats", type=int, default=3, help="loads a provider (default 3); the median and range are reported")
    b.add_argument("--results", help="append the result rows to this JSON-lines results log")
    b.add_argument("--plot", help="write a PNG bar chart of the rows (needs matplotlib: pip install 'pyloader-kernels[plot]')")
    b.add_argument("--nproc", type=int, help="N local processes at tensor parallel N: each byte read once over the "
                                             "group against every rank reading for itself (aggregate GB/s)")
    b.add_argument("--tmpdir", help="where to write the synthetic checkpoint (default: the system temp dir)")
    b.set_defaults(func=cmd_bench)
    return ap


def _import_extensions() -> None:
    """Import torch and the compiled kernels (every command uses them) with SIGINT held: a Ctrl-C
    inside a pybind11 module's init ends in std::terminate (SIGABRT); held, it arrives after the
    imports, as a KeyboardInterrupt."""
    held = hasattr(signal, "pthread_sigmask")
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}) if held else None
    try:
        import torch  # noqa: F401

        import pyloader._C  # noqa: F401
    finally:
        if held:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


def main(argv: Optional[List[str]] = None) -> int:
    """The command line. Every phase answers Ctrl-C the same way, the imports of torch and of the
    kernels (inside the commands) included: "interrupted", exit 130, nothing left that looks complete."""
    command = "pyloader"
    try:
        _import_extensions()
        args = build_parser().parse_args(argv)
        command = f"pyloader {args.command}"
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
        return args.func(args)
    except PyloaderInputError as e:
        print(f"{command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130


def run() -> None:
    """The ``pyloader`` command: :func:`main`, then the exit. An interrupted run leaves at once:
    a Ctrl-C that arrived while an extension ran Python code during the imports marks the
    interpreter to kill itself by SIGINT at exit, whatever main returned. The exit skips the
    interpreter's teardown (streams and logging flushed first): a Ctrl-C landing in an extension
    module's teardown would end in std::terminate instead of the code main returned."""
    code = main()
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the work is done or undone: a late Ctrl-C changes neither
    except KeyboardInterrupt:  # one that arrived between main's return and here
        pass
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
