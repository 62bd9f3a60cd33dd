"""The native reader (pyloader._C.HostReader): file byte ranges → a ring of pinned buffers →
device, a buffer at a time. Bytes compared exactly; destinations poisoned; reads that fail or end
early are errors, and the reader keeps working after one."""

import os

import pytest
import torch

import pyloader._C as C

from helpers import HAS_GPU, direct_io_supported

needs_extension = pytest.mark.skipif(not C.cuda_built, reason="the CUDA extension is not built")
BUF = 16384  # the smallest buffer: ranges of a few KiB already span several buffers


@needs_extension
def test_buffers_are_checked_before_any_cuda_call():
    """Runs without a GPU: the checks come before any CUDA call."""
    backing = torch.empty(BUF, dtype=torch.uint8)
    with pytest.raises(ValueError, match="at least 16 KiB"):
        C.HostReader(0, [backing.data_ptr()], BUF - 1)
    with pytest.raises(ValueError, match="at least one buffer"):
        C.HostReader(0, [], BUF)
    with pytest.raises(ValueError, match="null"):
        C.HostReader(0, [0], BUF)


def _data(tmp_path, n, seed=0):
    data = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    f = tmp_path / "data.bin"
    f.write_bytes(data.numpy().tobytes())
    return f, data


def _reader(buffers=2, shifts=(0,)):
    """A reader over ``buffers`` pinned buffers, the k-th starting shifts[k % len] bytes past a
    page boundary (O_DIRECT reads must then start further in)."""
    pinned = [torch.empty(BUF + 8192, dtype=torch.uint8, pin_memory=True) for _ in range(buffers)]
    ptrs = []
    for k, b in enumerate(pinned):
        base = b.data_ptr() + (-b.data_ptr()) % 4096
        ptrs.append(base + shifts[k % len(shifts)])
    return C.HostReader(torch.cuda.current_device(), ptrs, BUF), pinned


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")
@needs_extension
@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "o_direct"])
@pytest.mark.parametrize("buffers", [1, 2, 3])
def test_ranges_reach_the_device_exactly(tmp_path, direct, buffers):
    f, data = _data(tmp_path, 5 * BUF + 4097)
    if direct and not direct_io_supported(f):
        pytest.skip("this filesystem refuses O_DIRECT")
    reader, pinned = _reader(buffers, shifts=(0, 1, 4095))
    stream = torch.cuda.Stream()
    fd = os.open(f, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    try:
        # offsets and lengths off the 4 KiB grid, a range longer than the whole ring, one to the last byte
        for offset, n, at in [(0, 1, 0), (1, 4095, 3), (4095, 3 * BUF + 7, 17), (7, 4 * BUF, 0),
                              (len(data) - 12345, 12345, 5), (len(data) - 1, 1, 1), (100, 0, 0)]:
            dst = torch.full((n + at + 9,), 0x5A, dtype=torch.uint8, device="cuda")
            reader.read_to_device(fd, offset, n, dst.data_ptr() + at, stream.cuda_stream, 0, direct)
            stream.synchronize()
            want = torch.full_like(dst, 0x5A).cpu()
            want[at:at + n] = data[offset:offset + n]
            assert torch.equal(dst.cpu(), want), (offset, n, at)
    finally:
        os.close(fd)
    reader.synchronize()


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")
@needs_extension
def test_copies_wait_for_the_given_event(tmp_path):
    """wait_before_copy: the copy lands after the work the event marks (a kernel that writes the
    destination late): what remains is the file's bytes, not the kernel's."""
    f, data = _data(tmp_path, 3 * BUF)
    reader, pinned = _reader()
    other = torch.cuda.Stream()
    dst = torch.zeros(3 * BUF, dtype=torch.uint8, device="cuda")
    with torch.cuda.stream(other):
        torch.cuda._sleep(50_000_000)  # ~tens of ms of GPU time before the fill
        dst.fill_(7)
        ev = torch.cuda.Event(blocking=True)
        ev.record()
    stream = torch.cuda.Stream()
    fd = os.open(f, os.O_RDONLY)
    try:
        reader.read_to_device(fd, 0, 3 * BUF, dst.data_ptr(), stream.cuda_stream, ev.cuda_event, False)
    finally:
        os.close(fd)
    torch.cuda.synchronize()
    assert torch.equal(dst.cpu(), data)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")
@needs_extension
@pytest.mark.parametrize("direct", [False, True], ids=["buffered", "o_direct"])
def test_a_read_past_the_end_is_an_error_and_the_reader_goes_on(tmp_path, direct):
    f, data = _data(tmp_path, 2 * BUF + 100)
    if direct and not direct_io_supported(f):
        pytest.skip("this filesystem refuses O_DIRECT")
    reader, pinned = _reader()
    stream = torch.cuda.Stream()
    dst = torch.zeros(4 * BUF, dtype=torch.uint8, device="cuda")
    fd = os.open(f, os.O_RDONLY | (os.O_DIRECT if direct else 0))
    try:
        with pytest.raises(ValueError, match="file ended at byte"):
            reader.read_to_device(fd, BUF, 2 * BUF, dst.data_ptr(), stream.cuda_stream, 0, direct)
        bad = os.open(f, os.O_RDONLY)
        os.close(bad)
        with pytest.raises(ValueError, match="failed"):  # a closed descriptor: the errno text
            reader.read_to_device(bad, 0, 10, dst.data_ptr(), stream.cuda_stream, 0, False)
        reader.read_to_device(fd, 0, 2 * BUF + 100, dst.data_ptr(), stream.cuda_stream, 0, direct)
        stream.synchronize()
        assert torch.equal(dst[:2 * BUF + 100].cpu(), data)
    finally:
        os.close(fd)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="needs a GPU")
@needs_extension
@pytest.mark.parametrize("buffers", [1, 2])
def test_many_small_ranges_reach_their_destinations(tmp_path, buffers):
    """Scale reads: ranges of two files (every size from 0 bytes to more than a buffer) packed side
    by side, destinations 16-byte aligned with gaps, a gap wider than a copy spans, ranges that
    straddle buffer ends. Each range's bytes land at its offset; the padding may change, nothing
    past the last range does."""
    f1, d1 = _data(tmp_path, 4 * BUF, seed=1)
    f2 = tmp_path / "second.bin"
    d2 = torch.randint(0, 256, (3 * BUF,), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    f2.write_bytes(d2.numpy().tobytes())
    fd1, fd2 = os.open(f1, os.O_RDONLY), os.open(f2, os.O_RDONLY)
    gen = torch.Generator().manual_seed(3)
    ranges, pos = [], 5
    for i in range(300):
        n = [0, 1, 15, 16, 17, 3500, BUF - 3, BUF + 5][i % 8] if i % 37 else 2 * BUF + 11
        fd, data = (fd1, d1) if i % 3 else (fd2, d2)
        off = int(torch.randint(0, data.numel() - n + 1, (1,), generator=gen))
        ranges.append((fd, data, off, n, pos))
        pos += -(-n // 16) * 16 + (9000 if i % 50 == 49 else 0)  # a wide gap now and then
    reader, pinned = _reader(buffers)
    stream = torch.cuda.Stream()
    dst = torch.full((pos + 64,), 0x5A, dtype=torch.uint8, device="cuda")
    try:
        reader.read_ranges_to_device([r[0] for r in ranges], [r[2] for r in ranges], [r[3] for r in ranges],
                                     [r[4] for r in ranges], dst.data_ptr(), stream.cuda_stream)
        stream.synchronize()
        got = dst.cpu()
        for k, (_, data, off, n, at) in enumerate(ranges):
            assert torch.equal(got[at:at + n], data[off:off + n]), k
        assert bool((got[pos:] == 0x5A).all()), "bytes past the last range were written"
        with pytest.raises(ValueError, match="range 1: file ended at byte"):
            reader.read_ranges_to_device([fd1, fd2], [0, 3 * BUF - 10], [10, 20], [0, 16], dst.data_ptr(),
                                         stream.cuda_stream)
        with pytest.raises(ValueError, match="ascending"):
            reader.read_ranges_to_device([fd1, fd1], [0, 0], [10, 10], [32, 0], dst.data_ptr(), stream.cuda_stream)
    finally:
        os.close(fd1)
        os.close(fd2)
    reader.synchronize()
