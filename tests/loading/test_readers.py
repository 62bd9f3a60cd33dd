"""Readers: O_DIRECT reads widened to aligned bounds keep the bytes, and every chunk fits its buffer."""


import pytest
import torch

import pyloader

from helpers import direct_io_supported

def test_direct_read_widens_to_aligned_bounds_and_keeps_the_bytes(tmp_path):
    """O_DIRECT reads of cold files: any offset and length (unaligned starts, ends past the end
    of the file) land exactly, whatever the buffer's alignment."""
    import os
    from pyloader.loading.readers import DIRECT_ALIGN, pread_direct

    f = tmp_path / "data.bin"
    data = torch.randint(0, 256, (3 * DIRECT_ALIGN + 1234,), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    f.write_bytes(data.numpy().tobytes())
    if not direct_io_supported(f):
        pytest.skip("this filesystem refuses O_DIRECT")
    buf = torch.empty(8 * DIRECT_ALIGN, dtype=torch.uint8)
    fd = os.open(f, os.O_RDONLY | os.O_DIRECT)
    try:
        for shift in (0, 64, 100):  # buffer start not page aligned: the read moves inside the buffer
            view = memoryview(buf[shift:].numpy()).cast("B")
            addr = buf.data_ptr() + shift
            for offset, n in [(0, 1), (1, 4095), (4095, 2), (4096, 4096), (5000, 3 * DIRECT_ALIGN + 1234 - 5000),
                              (len(data) - 1, 1), (0, len(data))]:
                buf.fill_(0xA5)
                at = pread_direct(fd, view, addr, offset, n, f)
                assert (addr + at - offset) % DIRECT_ALIGN == 0
                assert torch.equal(buf[shift + at:shift + at + n], data[offset:offset + n]), (shift, offset, n)
        with pytest.raises(pyloader.PyloaderInputError, match="file ended"):
            pread_direct(fd, view, addr, len(data) - 10, 20, f)
        with pytest.raises(pyloader.PyloaderInputError, match="does not fit"):
            pread_direct(fd, memoryview(buf[:4096].numpy()).cast("B"), buf.data_ptr(), 10, 4096, f)
    finally:
        os.close(fd)


@pytest.mark.parametrize("chunk", [32 << 20, 40_961, 5000])
def test_direct_read_sizes_fit_every_chunk_in_its_buffer(tmp_path, chunk):
    """Chunks of the O_DIRECT step, at any file offset, fit buffers of the O_DIRECT size however the
    buffer is aligned; the default chunk keeps its power-of-two buffer (no doubling by torch's
    pinned allocator)."""
    import os
    from pyloader.loading.readers import DIRECT_ALIGN, direct_read_sizes, pread_direct

    step, buffer_bytes = direct_read_sizes(chunk)
    assert step >= DIRECT_ALIGN and buffer_bytes == max(chunk, step + 3 * DIRECT_ALIGN)
    if chunk == 32 << 20:
        assert buffer_bytes == chunk
        return
    f = tmp_path / "data.bin"
    data = torch.randint(0, 256, (4 * step + 3 * DIRECT_ALIGN + 77,), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(1))
    f.write_bytes(data.numpy().tobytes())
    if not direct_io_supported(f):
        pytest.skip("this filesystem refuses O_DIRECT")
    backing = torch.empty(buffer_bytes + DIRECT_ALIGN, dtype=torch.uint8)
    fd = os.open(f, os.O_RDONLY | os.O_DIRECT)
    try:
        for shift in (0, 1, DIRECT_ALIGN - 1):
            buf = backing[shift:shift + buffer_bytes]
            view = memoryview(buf.numpy()).cast("B")
            for offset in (0, 1, DIRECT_ALIGN - 1, DIRECT_ALIGN + 3, len(data) - step):
                at = pread_direct(fd, view, buf.data_ptr(), offset, step, f)
                assert torch.equal(buf[at:at + step], data[offset:offset + step]), (shift, offset)
    finally:
        os.close(fd)
