"""``pyloader convert``: a tiny FP8 checkpoint (several shards, a scale in another shard than its
weight, ragged and per-channel tensors, bf16 and fp32 scales, tokenizer files) → every output
tensor bitwise equal to the reference dequant; index, config and other files right; atomic,
resumable, bad input refused with exit code 2."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pyloader import ops
from pyloader.ops import reference
from pyloader.cli import main
from pyloader.convert import convert
from pyloader.errors import PyloaderInputError

from helpers import assert_bitwise_equal


def _fp8(shape, seed, block=(128, 128), sdtype=torch.float32):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    q, s = ops.quantize_blockwise(x, block, backend="torch")
    return q, s.to(sdtype)


@pytest.fixture
def src(tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    w1, s1 = _fp8((300, 257), 1)                                   # ragged against 128x128
    w2, s2 = _fp8((256, 128), 2, sdtype=torch.bfloat16)            # bf16 scales (Qwen3-FP8)
    w3, s3 = _fp8((64, 96), 3, block=(1, 96))                      # per-channel
    w4, s4 = _fp8((40, 64), 4, block=(40, 64))                     # per-tensor
    tensors_a = {"model.layers.0.mlp.up_proj.weight": w1, "model.layers.0.mlp.down_proj.weight_scale_inv": s2,
                 "model.norm.weight": torch.randn(257).bfloat16(), "model.layers.0.o.weight": w3,
                 "model.layers.0.o.weight_scale_inv": s3.reshape(64)}
    tensors_b = {"model.layers.0.mlp.up_proj.weight_scale_inv": s1, "model.layers.0.mlp.down_proj.weight": w2,
                 "model.embed_tokens.weight": torch.randn(10, 257).bfloat16(), "model.layers.0.p.weight": w4,
                 "model.layers.0.p.weight_scale": s4, "model.bias": torch.randn(3)}
    save_file(tensors_a, str(d / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file(tensors_b, str(d / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    wm = {n: "model-00001-of-00002.safetensors" for n in tensors_a}
    wm.update({n: "model-00002-of-00002.safetensors" for n in tensors_b})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 1, "format": "pt"},
                                                                "weight_map": wm}))
    (d / "config.json").write_text(json.dumps({"model_type": "qwen3", "torch_dtype": "bfloat16", "dtype": "bfloat16",
                                               "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]},
                                               "hidden_size": 257}))
    (d / "tokenizer.json").write_text('{"model": "x"}')
    (d / "generation_config.json").write_text("{}")
    (d / "sub").mkdir()
    (d / "sub" / "chat_template.jinja").write_text("{{ messages }}")
    expected = {
        "model.layers.0.mlp.up_proj.weight": (w1, s1, (128, 128)), "model.layers.0.mlp.down_proj.weight": (w2, s2, (128, 128)),
        "model.layers.0.o.weight": (w3, s3, (1, 96)), "model.layers.0.p.weight": (w4, s4, (40, 64)),
    }
    copied = {k: v for k, v in {**tensors_a, **tensors_b}.items() if v.dtype != torch.float8_e4m3fn and "scale" not in k}
    return d, expected, copied


def check_output(dst, expected, copied, out_dtype=torch.bfloat16, device="cpu"):
    out = {}
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    for f in sorted(set(index["weight_map"].values())):
        out.update(load_file(str(dst / f)))
    assert set(out) == set(expected) | set(copied)
    for name, (w, s, block) in expected.items():
        ref = reference.dequant_blockwise_torch(w.to(device), s.to(device), torch.empty(w.shape, dtype=out_dtype, device=device), block)
        assert_bitwise_equal(out[name], ref.cpu(), what=name)
    for name, t in copied.items():
        assert_bitwise_equal(out[name], t, what=name)
    total = sum(t.numel() * t.element_size() for t in out.values())
    assert index["metadata"] == {"total_size": total, "format": "pt"}
    config = json.loads((dst / "config.json").read_text())
    assert "quantization_config" not in config and config["torch_dtype"] == config["dtype"] == {
        torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}[out_dtype]
    assert config["hidden_size"] == 257
    assert (dst / "tokenizer.json").read_text() == '{"model": "x"}' and (dst / "sub" / "chat_template.jinja").exists()
    assert not list(dst.glob("*.tmp"))


@pytest.mark.parametrize("out_dtype", ["bfloat16", "float32"])
def test_convert_cpu_bitwise(src, tmp_path, out_dtype):
    d, expected, copied = src
    before = {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()}
    dst = tmp_path / "dst"
    report = convert(d, dst, device="cpu", out_dtype=out_dtype, progress=False)
    check_output(dst, expected, copied, getattr(torch, out_dtype))
    assert report.dequantized == 4 and report.copied == 3
    assert report.peak_rss is None or 0 < report.peak_rss < 64 << 30
    assert {p.name: p.read_bytes() for p in d.iterdir() if p.is_file()} == before  # SRC untouched


@pytest.mark.gpu
def test_convert_gpu_bitwise(src, tmp_path):
    d, expected, copied = src
    convert(d, tmp_path / "dst", device="cuda", progress=False)
    check_output(tmp_path / "dst", expected, copied, device="cuda")


def test_convert_repacks_and_resumes(src, tmp_path, monkeypatch):
    d, expected, copied = src
    dst = tmp_path / "dst"
    from pyloader.convert import pipeline

    monkeypatch.setattr(pipeline, "CHUNK_BYTES", 4096)  # many row chunks per tensor
    calls = {"n": 0}
    real = pipeline.Converter.start_file

    def interrupted(self, h):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the run dies starting the third file, the second still being written
        return real(self, h)

    monkeypatch.setattr(pipeline.Converter, "start_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert(d, dst, device="cpu", max_shard_size=60_000, progress=False)
    finished = sorted(p.name for p in dst.glob("*.safetensors"))
    assert len(finished) == 1 and not (dst / "model.safetensors.index.json").exists()  # index is written last
    monkeypatch.setattr(pipeline.Converter, "start_file", real)
    assert not list(dst.glob("*.tmp"))  # the interrupted file was removed
    # a truncated "finished" file must be redone, not trusted
    second = finished[0].replace("00001-of", "00002-of")
    (dst / second).write_bytes(b"\0" * 100)
    with pytest.raises(Exception, match="--resume"):
        convert(d, dst, device="cpu", max_shard_size=60_000, progress=False)
    report = convert(d, dst, device="cpu", max_shard_size=60_000, resume=True, progress=False)
    total = int(finished[0].split("-of-")[1].split(".")[0])
    assert total >= 3 and report.files_resumed == finished and len(report.files_written) == total - 1
    assert second in report.files_written
    check_output(dst, expected, copied)


def test_convert_census_reports_nonfinite(tmp_path):
    d = tmp_path / "src"
    d.mkdir()
    w = torch.tensor([[0x7F, 0x38]], dtype=torch.uint8).view(torch.float8_e4m3fn)  # NaN, 1.0
    save_file({"a.weight": w, "a.weight_scale_inv": torch.tensor([[1.0]])}, str(d / "model.safetensors"))
    with pytest.raises(PyloaderInputError, match="a.weight: NaN values"):  # the gate stops it by default
        convert(d, tmp_path / "dst", device="cpu", progress=False)
    report = convert(d, tmp_path / "dst2", device="cpu", progress=False, gate="warn")
    assert report.nonfinite == {"a.weight": (1, 0)}
    assert len(report.gate_warnings) == 1 and "NaN values" in report.gate_warnings[0]
    assert report.maxima["a.weight"][0] != report.maxima["a.weight"][0]  # NaN: the evidence the gate read


@pytest.mark.parametrize("case,needle", [
    ("no_scale", "has no scale tensor"),
    ("inside", "must not be SRC or inside it"),
    ("same", "must not be SRC or inside it"),
    ("awq", "quant_method 'awq' is not a format pyloader reads"),
    ("bad_scale", "does not fit weight [64, 64] with the declared 128x128 blocks"),
    # a grid that 64x256 blocks would fit, under a config that declares 128x128: never guessed
    ("contradicting_grid", "does not fit weight [384, 1000] with the declared 128x128 blocks (expected [3, 8]"),
    ("scale_without_weight", "b.weight_scale_inv': a scale with no weight"),
    ("bad_config", "config.json: cannot read the config"),
    ("nested_header", "nests JSON too deeply"),
])
def test_convert_bad_input_exit_2_nothing_written(tmp_path, capsys, case, needle):
    d = tmp_path / "src"
    d.mkdir()
    w, s = _fp8((64, 64), 5)
    tensors = {"a.weight": w, "a.weight_scale_inv": s}
    config = {"model_type": "llama", "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}
    if case == "no_scale":
        tensors = {"a.weight": w}
    if case == "awq":  # its I32 qweight would otherwise be copied as if plain
        config["quantization_config"] = {"quant_method": "awq"}
    if case == "bad_scale":
        tensors["a.weight_scale_inv"] = torch.ones(3, 7)
    if case == "contradicting_grid":
        tensors["a.weight"], tensors["a.weight_scale_inv"] = _fp8((384, 1000), 6, block=(64, 256))
    if case == "scale_without_weight":
        tensors["b.weight_scale_inv"] = torch.ones(1, 1)
    save_file(tensors, str(d / "model.safetensors"))
    (d / "config.json").write_text("{" if case == "bad_config" else json.dumps(config))
    if case == "nested_header":
        raw = b'{"__metadata__": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
        (d / "model-2.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw)
    dst = {"inside": d / "out", "same": d}.get(case, tmp_path / "dst")
    assert main(["convert", str(d), str(dst), "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    if case in ("no_scale", "bad_scale", "contradicting_grid"):
        assert "a.weight" in err
    assert not (tmp_path / "dst").exists() or not any((tmp_path / "dst").iterdir())
    assert sorted(p.name for p in d.iterdir()) == sorted(["config.json", "model.safetensors"] +
                                                         (["model-2.safetensors"] if case == "nested_header" else []))


def test_convert_reads_an_empty_tensor_of_huge_rows_without_walking_them(tmp_path):
    """A [2^62, 0] tensor (no bytes; the safetensors library reads it) is written, not walked row by
    row: the conversion ends at once and its output reads back."""
    d = tmp_path / "src"
    d.mkdir()
    w, s = _fp8((64, 64), 7)
    save_file({"a.weight": w, "a.weight_scale_inv": s}, str(d / "model-1.safetensors"))
    raw = json.dumps({"e": {"dtype": "BF16", "shape": [2 ** 62, 0], "data_offsets": [0, 0]}}).encode()
    raw += b" " * (-len(raw) % 8)
    (d / "model-2.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw)
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert main(["convert", str(d), str(tmp_path / "dst"), "--device", "cpu", "--no-progress"]) == 0
    out = load_file(str(tmp_path / "dst" / "model-2.safetensors"))
    assert tuple(out["e"].shape) == (2 ** 62, 0)


def _run_cli(args, **kw):
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-m", "pyloader", "convert", *map(str, args), "--device", "cpu",
                             "--no-progress", "--workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def test_killed_at_random_points_then_resume_is_byte_identical(src, tmp_path):
    import random
    import signal
    import time

    d, _, _ = src
    ref = tmp_path / "ref"
    assert _run_cli([d, ref, "--max-shard-size", "40000"]).wait() == 0
    dst = tmp_path / "dst"
    rng = random.Random(0)
    for _ in range(6):
        p = _run_cli([d, dst, "--max-shard-size", "40000", "--resume"])
        time.sleep(rng.uniform(0.5, 3.0))
        p.send_signal(signal.SIGKILL)
        p.wait()
        # whatever is visible under a final name is complete and valid
        for f in dst.glob("*.safetensors"):
            assert f.read_bytes() == (ref / f.name).read_bytes(), f.name
    assert _run_cli([d, dst, "--max-shard-size", "40000", "--resume"]).wait() == 0
    for f in ref.rglob("*"):
        if f.is_file():
            assert (dst / f.relative_to(ref)).read_bytes() == f.read_bytes(), f.name
    assert not list(dst.glob("*.tmp"))


def test_ctrl_c_in_any_phase_is_exit_130_and_leaves_nothing_complete(src, tmp_path):
    """SIGINT at random points from interpreter start (imports of torch and the kernels) through
    planning and conversion: "interrupted", exit 130, no traceback, and no index (written last)
    unless the run finished."""
    import random
    import signal
    import subprocess
    import sys
    import time

    d, _, _ = src
    rng = random.Random(1)
    delays = [0.2, 0.5] + [rng.uniform(0.05, 3.0) for _ in range(4)]
    interrupted = 0
    for k, delay in enumerate(delays):
        dst = tmp_path / f"dst{k}"
        # the default SIGINT action in the child, whatever this process inherited (a job in the
        # background of a non-interactive shell ignores SIGINT, and a child would inherit that)
        p = subprocess.Popen([sys.executable, "-m", "pyloader", "convert", str(d), str(dst), "--device", "cpu",
                              "--no-progress", "--workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        time.sleep(delay)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
        err = err.decode()
        assert "Traceback" not in err, (delay, err)
        assert p.returncode in (0, 130), (delay, p.returncode, err)
        if p.returncode == 130:
            interrupted += 1
            assert "interrupted" in err
            assert not (dst / "model.safetensors.index.json").exists()
    assert interrupted >= 2  # the early ones land in start-up


def test_no_write_permission_and_truncated_input_exit_2(src, tmp_path, capsys):
    d, _, _ = src
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        assert main(["convert", str(d), str(ro / "out"), "--device", "cpu", "--no-progress"]) == 2
        assert "Permission denied" in capsys.readouterr().err
    f = d / "model-00002-of-00002.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    assert main(["convert", str(d), str(tmp_path / "x"), "--device", "cpu", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "model-00002-of-00002.safetensors" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_mapped_and_pwrite_outputs_are_byte_identical_in_small_chunks(src, tmp_path, monkeypatch):
    """Chunks of a few hundred bytes land at offsets inside pages: every mapped window starts
    off the page grid; both writers must give the same bytes."""
    from pyloader.convert import pipeline

    d, expected, copied = src
    monkeypatch.setattr(pipeline, "CHUNK_BYTES", 700)
    convert(d, tmp_path / "mapped", device="cpu", progress=False, writes="mmap")
    convert(d, tmp_path / "written", device="cpu", progress=False, writes="pwrite")
    check_output(tmp_path / "mapped", expected, copied)
    for f in sorted((tmp_path / "written").glob("*.safetensors")):
        assert (tmp_path / "mapped" / f.name).read_bytes() == f.read_bytes(), f.name


def test_disk_full_before_mapped_writes_is_a_clear_error(src, tmp_path, monkeypatch):
    import errno

    from pyloader.convert import outputs

    def full(fd, offset, size):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs.os, "posix_fallocate", full)
    d, _, _ = src
    with pytest.raises(PyloaderInputError, match="cannot allocate .* No space left"):
        convert(d, tmp_path / "dst", device="cpu", progress=False, writes="mmap")
    assert not list((tmp_path / "dst").glob("*.safetensors*"))


def test_too_little_free_space_for_mapped_writes_is_a_clear_error(src, tmp_path, monkeypatch):
    from pyloader.convert import pipeline

    monkeypatch.setattr(pipeline, "free_bytes", lambda path: 1000)
    d, _, _ = src
    with pytest.raises(PyloaderInputError, match="cannot allocate .* 1000 bytes free"):
        convert(d, tmp_path / "dst", device="cpu", progress=False, writes="mmap")
    assert not list((tmp_path / "dst").glob("*.safetensors*"))


def test_mapped_writes_wait_for_their_bytes_to_be_allocated(src, tmp_path, monkeypatch):
    """Allocation runs ahead in small steps on its own thread; a chunk is written only once its
    bytes are allocated, and a disk that fills up part way is a clear error with no file left."""
    import errno

    from pyloader.convert import outputs, pipeline

    real = outputs.os.posix_fallocate
    allocated = {}

    def slow_then_full(fd, offset, size):
        if offset >= 150_000:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, offset, size)
        allocated[fd] = max(allocated.get(fd, 0), offset + size)

    written = []
    real_write = pipeline.Converter._write

    def checked_write(fd, file_offset, data, mapped):
        assert mapped and file_offset + data.numel() <= allocated[fd]  # never past what is allocated
        written.append(file_offset)
        return real_write(fd, file_offset, data, mapped)

    monkeypatch.setattr(outputs.Reservation, "STEP", 4096)
    monkeypatch.setattr(pipeline, "CHUNK_BYTES", 4096)
    monkeypatch.setattr(pipeline.Converter, "_write", staticmethod(checked_write))
    monkeypatch.setattr(outputs.os, "posix_fallocate", slow_then_full)
    d, _, _ = src
    with pytest.raises(PyloaderInputError, match="cannot allocate .* No space left"):
        convert(d, tmp_path / "dst", device="cpu", progress=False, writes="mmap")
    assert written and not list((tmp_path / "dst").glob("*.safetensors*"))


def test_writer_choice_follows_the_filesystem(tmp_path):
    from pyloader.convert.outputs import filesystem_type, writes_for

    assert filesystem_type(tmp_path / "not-yet") == filesystem_type(tmp_path) != ""
    assert filesystem_type(Path("/proc/self")) == "proc"
    assert writes_for(tmp_path, "pwrite") == "pwrite" and writes_for(tmp_path, "mmap") == "mmap"
    if Path("/dev/shm").is_dir() and filesystem_type(Path("/dev/shm")) == "tmpfs":
        assert writes_for(Path("/dev/shm") / "out", "auto") == "mmap"
    if filesystem_type(tmp_path) not in ("tmpfs", "ramfs"):
        assert writes_for(tmp_path, "auto") == "pwrite"


def test_failure_opening_the_next_file_leaves_no_temporary_files(src, tmp_path, monkeypatch):
    """The next file is opened while one is being written: if that open fails, the file already
    started is removed too (nothing half-written, no descriptor left)."""
    from pyloader.convert import pipeline

    d, _, _ = src
    real = pipeline.Converter.open_file
    calls = {"n": 0}

    def failing(self, path, f):
        calls["n"] += 1
        if calls["n"] == 2:
            raise PyloaderInputError(f"{path}: cannot create")
        return real(self, path, f)

    monkeypatch.setattr(pipeline.Converter, "open_file", failing)
    with pytest.raises(PyloaderInputError, match="cannot create"):
        convert(d, tmp_path / "dst", device="cpu", max_shard_size=60_000, progress=False)
    assert not list((tmp_path / "dst").glob("*.safetensors*"))


def test_a_failure_mid_file_leaves_nothing_under_its_final_name(src, tmp_path, monkeypatch):
    """Files are written as NAME.tmp and renamed when complete: a conversion that fails part way
    through a file leaves no file of that name, and a temporary file is removed."""
    from pyloader.convert import pipeline

    d, _, _ = src
    real, calls = pipeline.Converter.chunk, []

    def failing(self, fd, t, file_offset, r0, rows, mapped=False):
        calls.append(t.name)
        if len(calls) == 3:
            self.inflight.release()
            raise OSError(5, "Input/output error")
        return real(self, fd, t, file_offset, r0, rows, mapped)

    monkeypatch.setattr(pipeline, "CHUNK_BYTES", 4096)
    monkeypatch.setattr(pipeline.Converter, "chunk", failing)
    dst = tmp_path / "dst"
    with pytest.raises(OSError):
        convert(d, dst, device="cpu", progress=False, workers=1)
    names = {p.name for p in dst.iterdir()}
    assert not any(n.endswith(".safetensors") for n in names), names  # nothing that looks complete
    assert not any(n.endswith(".tmp") for n in names), names


def test_killed_in_the_middle_of_a_file_leaves_no_file_under_its_name(src, tmp_path):
    """SIGKILL while a file is half written (its third chunk never finishes): no cleanup runs, and
    still nothing under a final name is incomplete (each file is written as NAME.tmp and renamed)."""
    import signal
    import subprocess
    import sys
    import time

    d, _, _ = src
    ref, dst, marker = tmp_path / "ref", tmp_path / "dst", tmp_path / "stalled"
    assert _run_cli([d, ref, "--max-shard-size", "40000"]).wait() == 0
    code = ("import sys, time; from pyloader.convert import pipeline; real = pipeline.Converter.chunk; n = [0]\n"
            "def stall(self, *a, **k):\n"
            "    n[0] += 1\n"
            "    if n[0] == 3:\n"
            f"        open({str(marker)!r}, 'w').close(); time.sleep(600)\n"
            "    return real(self, *a, **k)\n"
            "pipeline.Converter.chunk = stall\n"
            "pipeline.CHUNK_BYTES = 4096\n"
            "from pyloader.cli import main; sys.exit(main(sys.argv[1:]))")
    p = subprocess.Popen([sys.executable, "-c", code, "convert", str(d), str(dst), "--max-shard-size", "40000",
                          "--device", "cpu", "--no-progress", "--workers", "1"])
    for _ in range(600):
        if marker.exists() or p.poll() is not None:
            break
        time.sleep(0.05)
    assert marker.exists(), "the conversion never reached its third chunk"
    time.sleep(0.2)
    p.send_signal(signal.SIGKILL)
    p.wait()
    for f in dst.glob("*.safetensors"):
        assert f.read_bytes() == (ref / f.name).read_bytes(), f.name
    assert list(dst.glob("*.tmp")), "the stalled file should be left as a temporary"


def test_resume_redoes_a_damaged_output_and_a_file_that_fails_validation_is_never_renamed(src, tmp_path, monkeypatch):
    """--resume keeps only finished files whose header and size check out; a file whose written
    header does not read back is removed, not renamed into place."""
    from pyloader.convert import pipeline

    d, _, _ = src
    ref, dst = tmp_path / "ref", tmp_path / "dst"
    convert(d, ref, device="cpu", progress=False)
    convert(d, dst, device="cpu", progress=False)
    victim = sorted(dst.glob("*.safetensors"))[0]
    victim.write_bytes(victim.read_bytes()[:-7])  # truncated
    report = convert(d, dst, device="cpu", progress=False, resume=True)
    assert victim.name in report.files_written
    for f in ref.glob("*.safetensors"):
        assert (dst / f.name).read_bytes() == f.read_bytes(), f.name
    real_pwrite = pipeline.os.pwrite

    def bad_header(fd, data, offset):
        return real_pwrite(fd, b"\0" * len(data) if offset == 0 else data, offset)

    monkeypatch.setattr(pipeline.os, "pwrite", bad_header)
    with pytest.raises(PyloaderInputError, match="does not validate"):
        convert(d, tmp_path / "bad", device="cpu", progress=False)
    assert not list((tmp_path / "bad").glob("*.safetensors*"))
