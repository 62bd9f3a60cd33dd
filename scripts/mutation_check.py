"""Remove each safeguard in turn and run the tests that should notice: a safeguard no test catches
is a defect (docs/decisions.md#safeguards keeps the last table).

    python scripts/mutation_check.py [--only NAME] [--timeout 300]

Each mutation replaces one exact snippet of a copy of the package (the working tree is never
touched) and runs its tests against that copy; "caught" means at least one test failed (or the run
timed out: a hang is caught too).
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name, file, snippet, replacement, tests (pytest arguments)
MUTATIONS = [
    ("refit: a bucket's version must be the step's", "pyloader/refit/refitter.py",
     "            if v != version:", "            if False:", ["tests/refit"]),
    ("refit: a bucket's checksum must match the sender's", "pyloader/refit/refitter.py",
     "            elif sent != seen:", "            elif False:", ["tests/refit"]),
    ("refit: a version finished with buckets not applied", "pyloader/refit/refitter.py",
     "        if stale_buckets:", "        if False:", ["tests/refit"]),
    ("refit: requant only on whole scale blocks", "pyloader/refit/refitter.py",
     "    if row0 % bm or (rows % bm and row0 + rows != M):", "    if False:", ["tests/refit"]),
    ("refit: an FP8 parameter needs its scale parameter", "pyloader/refit/refitter.py",
     "                if s is None:", "                if False:", ["tests/refit"]),
    ("refit: buckets match the layout", "pyloader/refit/refitter.py",
     "        if len(buckets) != layout.num_buckets or", "        if False and len(buckets) != layout.num_buckets or",
     ["tests/refit"]),
    ("refit: buckets on the parameters' device", "pyloader/refit/refitter.py",
     "        if any(b.device != self.device for b in buckets):", "        if False:", ["tests/refit"]),
    ("refit: pack takes exactly the layout's tensors", "pyloader/refit/buckets.py",
     "        if absent or extra:", "        if False:", ["tests/refit"]),
    ("refit: pack checks dtype and shape", "pyloader/refit/buckets.py",
     "                if src.dtype != dst.dtype or tuple(src.shape) != tuple(dst.shape):", "                if False:",
     ["tests/refit"]),
    ("refit: layout entries fit their buckets", "pyloader/refit/buckets.py",
     "            if e.nbytes != want or e.offset < HEADER_BYTES", "            if False and e.nbytes != want or e.offset < HEADER_BYTES",
     ["tests/refit"]),
    ("refit: CPU buckets shared before their handles go out", "pyloader/refit/transport.py",
     "        if b.device.type == \"cpu\" and not b.is_shared():", "        if False:", ["tests/refit"]),
    ("header: tensors tile the data (no gap, no overlap)", "pyloader/format/safetensors.py",
     "        if begin != pos:", "        if False:", ["tests/format"]),
    ("header: byte length = shape x dtype", "pyloader/format/safetensors.py",
     "        if offsets[1] - offsets[0] != want:", "        if False:", ["tests/format"]),
    ("header: dimensions and their product bounded", "pyloader/format/safetensors.py",
     "            if d > MAX_DIM or numel * d >= _PRODUCT_LIMIT:", "            if False:", ["tests/format"]),
    ("header: names are UTF-8 strings", "pyloader/format/safetensors.py",
     "    if \"\\\\u\" in text:", "    if False:", ["tests/format"]),
    ("header: repeated keys refused", "pyloader/format/safetensors.py",
     "        if not _keys_counted_once(obj, text):", "        if False:", ["tests/format"]),
    ("header: nesting refused cleanly", "pyloader/format/safetensors.py",
     "    except RecursionError:\n        raise CheckpointError(path, \"header nests",
     "    except ZeroDivisionError:\n        raise CheckpointError(path, \"header nests", ["tests/format", "tests/test_convert.py"]),
    ("pickle files refused", "pyloader/format/safetensors.py",
     "    if path.suffix in PICKLE_SUFFIXES:", "    if False:", ["tests/format"]),
    ("index: file names stay in the directory", "pyloader/format/checkpoint.py",
     "    if p.is_absolute() or \"..\" in p.parts:", "    if False:", ["tests/format"]),
    ("files resolve inside the directory (symlinks)", "pyloader/format/checkpoint.py",
     "        path.resolve().relative_to(directory.resolve())", "        pass", ["tests/format"]),
    ("JSON files: a bad one is an input error", "pyloader/format/checkpoint.py",
     "    except RecursionError:\n        raise CheckpointError(path, f\"cannot read the {what}: JSON nested",
     "    except ZeroDivisionError:\n        raise CheckpointError(path, f\"cannot read the {what}: JSON nested",
     ["tests/format", "tests/test_convert.py"]),
    ("plan: an FP8 weight needs its scale", "pyloader/routing/plan.py",
     "            if scale_route is None:", "            if False:", ["tests/routing", "tests/loading/test_load.py"]),
    ("plan: scale grid fits the declared blocks", "pyloader/routing/plan.py",
     "        except PyloaderInputError as e:\n            problems.append(str(e))",
     "        except PyloaderInputError as e:\n            pass", ["tests/routing"]),
    ("plan: shapes checked", "pyloader/routing/plan.py",
     "    if check_shapes and checkpoint.headers_read:", "    if False:", ["tests/routing", "tests/loading/test_load.py"]),
    ("plan: coverage of every target", "pyloader/routing/plan.py",
     "    missing = [] if partial else coverage(pieces, targets, problems)", "    missing = []",
     ["tests/routing", "tests/loading/test_load.py"]),
    ("router: layers of other pipeline stages skipped", "pyloader/routing/router.py",
     "            if self._owned is not None and layer not in self._owned:", "            if False:",
     ["tests/routing", "tests/loading/test_load.py"]),
    ("load: targets left unwritten fail the load", "pyloader/loading/loader.py",
     "    if not missing or policy == \"ignore\":", "    if True:", ["tests/loading/test_load.py"]),
    ("load: tied targets filled", "pyloader/loading/loader.py",
     "    _fill_tied(plan, tensors)", "    pass", ["tests/loading/test_load.py"]),
    ("stream: each tensor copied before the source advances", "pyloader/loading/sources.py",
     "        copy = t.to(dev, copy=True)", "        copy = t.to(dev)", ["tests/loading/test_load.py"]),
    ("formats: an FP8 weight needs its scale", "pyloader/format/quant.py",
     "    if scale is None:\n        raise CheckpointError(values.file, f\"{values.dtype} weight has no scale",
     "    if False:\n        raise CheckpointError(values.file, f\"{values.dtype} weight has no scale",
     ["tests/format/test_quant.py", "tests/test_convert.py"]),
    ("formats: a scale with no weight refused", "pyloader/format/quant.py",
     "        if leaf in _SCALE_LEAVES:", "        if False:", ["tests/format/test_quant.py", "tests/test_convert.py"]),
    ("formats: U8 scales only on the MX grid", "pyloader/format/quant.py",
     "        if scale.dtype == \"U8\":  # raw exponents only", "        if False:  # raw exponents only",
     ["tests/format/test_quant.py"]),
    ("formats: a group scale's shape checked", "pyloader/format/quant.py",
     "    if tuple(info.shape or ()) != need:", "    if False:", ["tests/format/test_quant.py"]),
    ("formats: NVFP4 needs exactly one second level", "pyloader/format/quant.py",
     "        if (g_mul is None) == (g_div is None):", "        if False:", ["tests/format/test_quant.py"]),
    ("formats: weight_shape checked against the words", "pyloader/format/quant.py",
     "            if len(dims) != 2 or dims[0] != shape[0] or not 8 * (shape[1] - 1) < dims[1] <= 8 * shape[1]:",
     "            if False:", ["tests/format/test_quant.py"]),
    ("formats: a quantized layout in an excluded module refused", "pyloader/format/quant.py",
     "        if d.is_excluded(module):", "        if False:", ["tests/format/test_quant.py"]),
    ("formats: unknown quantization methods refused", "pyloader/format/quant.py",
     "        if method is not None and method not in KNOWN_METHODS:", "        if False:",
     ["tests/format/test_quant.py", "tests/test_convert.py"]),
    ("gate: values beyond the band", "pyloader/gate.py",
     "        if out_max > self.limit:  # inf included", "        if False:  # inf included",
     ["tests/test_convert_formats.py", "tests/loading/test_load.py", "-k", "gate"]),
    ("gate: NaN values", "pyloader/gate.py",
     "        if math.isnan(out_max):", "        if False:", ["tests/test_convert_formats.py", "tests/test_convert.py", "-k",
                                                             "gate or census"]),
    ("gate: all zero from non-zero codes", "pyloader/gate.py",
     "        if out_max == 0 and code_max > 0:", "        if False:", ["tests/test_convert_formats.py", "-k", "gate"]),
    ("gate: convert checks a file's tensors before its rename", "pyloader/convert/pipeline.py",
     "                    warning = self.gate.check(t.name, t.source, self.report.maxima[t.name])",
     "                    warning = None", ["tests/test_convert_formats.py", "-k", "gate"]),
    ("plan: packed column slices start on a byte", "pyloader/routing/plan.py",
     "    if p.quant is not None and pl.src_cols is not None and pl.src_cols[0] % 2:", "    if False:",
     ["tests/routing/test_plan.py"]),
    ("scales: a grid that contradicts the declared blocks refused", "pyloader/format/scales.py",
     "    want = list(block_grid(tuple(shape), declared))\n    raise",
     "    return tuple(declared)\n    want = list(block_grid(tuple(shape), declared))\n    raise",
     ["tests/format", "tests/routing", "tests/test_convert.py"]),
    ("convert: written as NAME.tmp, renamed when complete", "pyloader/convert/pipeline.py",
     "        tmp = path.with_name(path.name + \".tmp\")", "        tmp = path", ["tests/test_convert.py"]),
    ("convert: each written file re-validated before the rename", "pyloader/convert/pipeline.py",
     "        if not file_complete(h.tmp, h.f):", "        if False:", ["tests/test_convert.py"]),
    ("convert: --resume keeps only files that validate", "pyloader/convert/outputs.py",
     "    if not path.is_file() or path.stat().st_size != f.size:\n        return False",
     "    return path.is_file()", ["tests/test_convert.py"]),
    ("convert: an empty tensor's rows are never walked", "pyloader/convert/pipeline.py",
     "                if t.nbytes == 0:  # nothing to write", "                if False:  # nothing to write",
     ["tests/test_convert.py"]),
    ("cli: Ctrl-C is exit 130", "pyloader/cli.py",
     "    except KeyboardInterrupt:\n        print(f\"{command}: interrupted\", file=sys.stderr)\n        return 130",
     "    except ZeroDivisionError:\n        return 130", ["tests/test_convert.py", "-k", "ctrl_c"]),
]


def run_one(name, rel, old, new, tests, timeout):
    with tempfile.TemporaryDirectory(prefix="pyloader-mutant-") as tmp:
        for part in ("pyloader", "tests", "pyproject.toml"):
            src = ROOT / part
            (shutil.copytree if src.is_dir() else shutil.copy)(src, Path(tmp) / part)
        path = Path(tmp) / rel
        text = path.read_text()
        if text.count(old) != 1:
            return "SNIPPET NOT FOUND", 0.0
        path.write_text(text.replace(old, new))
        env = dict(os.environ, PYTHONPATH=tmp)
        t = time.perf_counter()
        try:
            done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                                  cwd=tmp, env=env, capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return "caught (hang)", time.perf_counter() - t
        return ("caught" if done.returncode != 0 else "MISSED"), time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="run the mutations whose name contains this")
    ap.add_argument("--timeout", type=int, default=300)
    args = ap.parse_args()
    missed = 0
    print("| safeguard removed | tests run | result |\n|---|---|---|")
    for name, rel, old, new, tests in MUTATIONS:
        if args.only and args.only not in name:
            continue
        result, seconds = run_one(name, rel, old, new, tests, args.timeout)
        missed += result != "caught" and not result.startswith("caught")
        print(f"| {name} (`{rel}`) | {' '.join(tests)} | {result} ({seconds:.0f} s) |", flush=True)
    sys.exit(1 if missed else 0)


if __name__ == "__main__":
    main()
