"""The streaming executor: reader choice, cold-file marking, and failed reads that name their file and tensor and strand nothing."""


import pytest
import torch

import pyloader
from pyloader.routing.presets import build_preset
from pyloader.synthetic import allocate_targets, write_checkpoint

from tiny_models import TINY
from helpers import direct_io_supported

def test_reader_choice_is_explicit(tmp_path, monkeypatch, caplog):
    """readers="native" without the extension is an error, "auto" says (logged) that it reads
    through Python; an unknown name is refused before any read."""
    import logging

    from pyloader import _C
    from pyloader.loading.executor import ExecutorConfig, choose_readers

    monkeypatch.setattr(_C, "cuda_built", False, raising=False)
    with pytest.raises(pyloader.PyloaderInputError, match="not built"):
        choose_readers("native")
    with caplog.at_level(logging.INFO, logger="pyloader"):
        assert choose_readers("auto") == "python"
    assert "not built" in caplog.text
    assert choose_readers("python") == "python"
    c = dict(TINY["llama"])
    targets = allocate_targets(build_preset(c).targets, "cpu")
    with pytest.raises(pyloader.PyloaderInputError, match="readers"):
        pyloader.load(targets, write_checkpoint(tmp_path / "m", c, fp8=False), backend="torch", progress=False,
                      executor=ExecutorConfig(readers="fast"))


def test_a_failed_read_returns_its_pinned_buffer(tmp_path):
    """GPU reader path: a chunk whose read fails (file truncated underneath) gives its buffer back
    to the shared pool, so the other readers, waiting on the pool, cannot hang the load."""
    from pyloader.loading.readers import FileCache, read_and_copy

    f = tmp_path / "short.bin"
    f.write_bytes(b"x" * 100)

    class Pool:
        def __init__(self):
            self.free = [(torch.empty(64, dtype=torch.uint8), None)]

        def take(self):
            buf, _ = self.free.pop()
            return buf, memoryview(buf.numpy()).cast("B")

        def give(self, buf, view, busy):
            self.free.append((buf, busy))

    pool, files = Pool(), FileCache()
    try:
        with pytest.raises(pyloader.PyloaderInputError, match="file ended"):
            read_and_copy(files, (f, 80, 0, 64), None, None, pool)
    finally:
        files.close()
    assert len(pool.free) == 1


def test_a_failed_scale_read_names_the_file_and_tensor(tmp_path):
    """Native readers read a group of scales in one call; its error says which range failed, and
    the load error names that range's file and tensor."""
    from types import SimpleNamespace

    from pyloader.format.safetensors import TensorInfo
    from pyloader.loading.readers import FileCache, read_ranges_native

    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x" * 100)
    infos = [TensorInfo(f"layers.{k}.weight_scale_inv", "F32", (2,), f, 8 * k, 8 * k + 8) for k in range(4)]

    class Reader:
        def read_ranges_to_device(self, fds, offsets, sizes, dst_offsets, dst, stream):
            assert offsets == [8, 16, 24] and dst_offsets == [16, 32, 48]
            raise ValueError("range 1: file ended at byte 20 while reading (truncated or changed?)")

    files = FileCache()
    try:
        with pytest.raises(pyloader.PyloaderInputError, match=r"model.safetensors: tensor layers.2.weight_scale_inv: "
                                                              r"file ended at byte 20"):
            read_ranges_native(files, Reader(), SimpleNamespace(cuda_stream=0),
                               [(infos[i], infos[i].start, infos[i].nbytes, 16 * i) for i in range(1, 4)],
                               torch.empty(64, dtype=torch.uint8).data_ptr(), "scale tensors")
    finally:
        files.close()


def test_unknown_cold_reads_mode_is_refused(tmp_path):
    c = dict(TINY["llama"])
    d = write_checkpoint(tmp_path / "m", c, fp8=False)
    targets = allocate_targets(build_preset(c).targets, "cpu")
    with pytest.raises(pyloader.PyloaderInputError, match="cold_reads"):
        pyloader.load(targets, d, backend="torch", progress=False, executor=pyloader.ExecutorConfig(cold_reads="fast"))


@pytest.mark.parametrize("mode", ["auto", "direct", "buffered"])
def test_cold_files_without_o_direct_are_read_buffered_and_logged_or_refused(tmp_path, monkeypatch, caplog, mode):
    """A filesystem that refuses O_DIRECT: auto logs it and reads the file buffered; an explicit
    "direct" is an error naming the file, never a silent change of method; warm files are never
    opened with O_DIRECT."""
    import logging

    from pyloader.loading import executor
    from pyloader.loading.executor import mark_cold_files
    from pyloader.loading.readers import FileCache

    cold, warm = tmp_path / "cold.safetensors", tmp_path / "warm.safetensors"
    cold.write_bytes(b"c" * 10)
    warm.write_bytes(b"w" * 10)
    monkeypatch.setattr(executor, "file_resident", lambda path: 0.0 if str(path) == str(cold) else 1.0)
    real_fd = FileCache.fd

    def no_direct(self, path, direct=False):
        if direct:
            raise pyloader.PyloaderInputError(f"{path}: cannot open with O_DIRECT: Invalid argument")
        return real_fd(self, path, direct)

    monkeypatch.setattr(FileCache, "fd", no_direct)
    names = [str(cold), str(warm)]
    files = FileCache()
    caplog.set_level(logging.INFO, logger="pyloader")
    try:
        if mode == "direct":
            with pytest.raises(pyloader.PyloaderInputError, match="cold.safetensors: cannot open with O_DIRECT"):
                mark_cold_files(files, names, mode)
        else:
            cold_files = mark_cold_files(files, names, mode)
            assert files.direct == set()
            assert cold_files == (1 if mode == "auto" else 0)
            if mode == "auto":
                assert "reading it buffered" in caplog.text and "cold.safetensors" in caplog.text
    finally:
        files.close()


def test_only_cold_files_are_marked_for_o_direct(tmp_path, monkeypatch):

    from pyloader.loading import executor
    from pyloader.loading.executor import mark_cold_files
    from pyloader.loading.readers import FileCache

    cold, warm = tmp_path / "cold.safetensors", tmp_path / "warm.safetensors"
    cold.write_bytes(b"c" * 10)
    warm.write_bytes(b"w" * 10)
    if not direct_io_supported(cold):
        pytest.skip("this filesystem refuses O_DIRECT")
    monkeypatch.setattr(executor, "file_resident", lambda path: 0.0 if str(path) == str(cold) else 1.0)
    names = [str(cold), str(warm)]
    files = FileCache()
    try:
        assert mark_cold_files(files, names, "auto") == 1
        assert files.direct == {str(cold)}
    finally:
        files.close()
