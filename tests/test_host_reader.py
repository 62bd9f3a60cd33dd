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
