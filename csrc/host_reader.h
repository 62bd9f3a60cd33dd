// Host side of the executor's reads: file byte ranges → a small ring of pinned buffers → device.
// Plain C++ and the CUDA runtime only (no torch), like the kernels' launchers.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

namespace pyloader {

// One reader thread's ring of pinned buffers. read_to_device() reads a byte range of a file a
// buffer at a time (pread, or aligned O_DIRECT reads) and enqueues each buffer's host→device copy
// as soon as it is read, then reuses the buffer once its copy's event has completed (a sleeping
// wait). Buffers a few MiB large keep what the copy engine reads back in the last-level cache,
// and the loop runs without Python: a chunk costs one call, not one call a buffer.
// The buffers are the caller's (pinned, any alignment, alive until synchronize() returns); the
// reader only knows which of its copies still read them. Not thread safe: one reader a thread.
class HostReader {
 public:
  HostReader(int device, std::vector<uintptr_t> buffers, int64_t buffer_bytes);
  ~HostReader();
  HostReader(const HostReader&) = delete;
  HostReader& operator=(const HostReader&) = delete;

  // Copies file[offset, offset + nbytes) of descriptor fd to the device pointer dst on stream.
  // wait_before_copy (a cudaEvent_t, or null) is waited for on the host before the first copy
  // (the destination's previous reader is done with it). direct: fd was opened with O_DIRECT;
  // reads are widened to 4 KiB bounds and land on the buffer's first 4 KiB-aligned byte (a
  // buffer then holds 12 KiB less). Returns once every copy is enqueued.
  // Throws std::range_error for a read that fails or ends early (errno text or "file ended at
  // byte N"), std::runtime_error for a CUDA error.
  void read_to_device(int fd, int64_t offset, int64_t nbytes, void* dst, cudaStream_t stream,
                      cudaEvent_t wait_before_copy, bool direct);

  // Copies many small byte ranges (file fds[i] at offsets[i], sizes[i] bytes) to dst + dst_offsets[i]
  // (ascending, not overlapping) on stream: consecutive ranges are read side by side into one
  // buffer at their relative destination offsets and copied together, so a thousand scale
  // tensors cost a few copies and no Python a range. The bytes between ranges (their padding)
  // are copied too: the destination's gaps must be free to overwrite. Buffered reads only.
  // Errors as read_to_device (the message names the range's index).
  void read_ranges_to_device(const std::vector<int>& fds, const std::vector<int64_t>& offsets,
                             const std::vector<int64_t>& sizes, const std::vector<int64_t>& dst_offsets, void* dst,
                             cudaStream_t stream);

  // Waits until no copy reads any of the buffers.
  void synchronize();

  int64_t buffers() const { return static_cast<int64_t>(host_.size()); }
  int64_t buffer_bytes() const { return buffer_bytes_; }

 private:
  int device_;
  int64_t buffer_bytes_;
  std::vector<uint8_t*> host_;
  std::vector<cudaEvent_t> copied_;
  std::vector<bool> in_use_;
  size_t next_ = 0;

  // The next buffer of the ring, once no copy reads it.
  size_t take_buffer();
  void copy_buffer(size_t k, int64_t lead, int64_t nbytes, void* dst, cudaStream_t stream);
};

}  // namespace pyloader
