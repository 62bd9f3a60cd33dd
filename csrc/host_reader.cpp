#include "host_reader.h"

#include "pyloader/job_table.h"

#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>
#include <string>

namespace pyloader {
namespace {

constexpr int64_t kDirectAlign = 4096;  // O_DIRECT: offset, length and address on the logical block (4 KiB covers all)

// Reads at least `need` bytes of [offset, offset + len) into buf; `len` may pass the end of the
// file (aligned O_DIRECT reads), `need` may not.
void pread_at_least(int fd, uint8_t* buf, int64_t offset, int64_t len, int64_t need, bool direct) {
  int64_t got = 0;
  while (got < need) {
    ssize_t r = ::pread(fd, buf + got, static_cast<size_t>(len - got), offset + got);
    if (r < 0) {
      if (errno == EINTR) continue;
      throw std::range_error(std::string(direct ? "O_DIRECT read" : "read") + " at byte " + std::to_string(offset + got) +
                             " failed: " + std::strerror(errno));
    }
    if (r == 0 || (direct && got + r < need && (got + r) % kDirectAlign)) {  // a direct read stops short only at the end
      throw std::range_error("file ended at byte " + std::to_string(offset + got + r) + " while reading (truncated or changed?)");
    }
    got += r;
  }
}

}  // namespace

HostReader::HostReader(int device, std::vector<uintptr_t> buffers, int64_t buffer_bytes)
    : device_(device), buffer_bytes_(buffer_bytes) {
  if (buffers.empty() || buffer_bytes < 4 * kDirectAlign) {
    throw std::invalid_argument("HostReader: needs at least one buffer of at least 16 KiB");
  }
  for (uintptr_t p : buffers) {
    if (p == 0) throw std::invalid_argument("HostReader: null buffer");
  }
  PYLOADER_CUDA_CHECK(cudaSetDevice(device));
  for (uintptr_t p : buffers) {
    cudaEvent_t e = nullptr;
    cudaError_t err = cudaEventCreateWithFlags(&e, cudaEventDisableTiming | cudaEventBlockingSync);
    if (err != cudaSuccess) {
      for (auto made : copied_) cudaEventDestroy(made);
      PYLOADER_CUDA_CHECK(err);
    }
    host_.push_back(reinterpret_cast<uint8_t*>(p));
    copied_.push_back(e);
    in_use_.push_back(false);
  }
}

HostReader::~HostReader() {
  for (size_t k = 0; k < host_.size(); ++k) {
    if (in_use_[k]) cudaEventSynchronize(copied_[k]);  // the caller may free the buffer next
    cudaEventDestroy(copied_[k]);
  }
}

size_t HostReader::take_buffer() {
  const size_t k = next_;
  next_ = (next_ + 1) % host_.size();
  if (in_use_[k]) PYLOADER_CUDA_CHECK(cudaEventSynchronize(copied_[k]));
  in_use_[k] = false;
  return k;
}

void HostReader::copy_buffer(size_t k, int64_t lead, int64_t nbytes, void* dst, cudaStream_t stream) {
  PYLOADER_CUDA_CHECK(cudaMemcpyAsync(dst, host_[k] + lead, static_cast<size_t>(nbytes), cudaMemcpyHostToDevice, stream));
  PYLOADER_CUDA_CHECK(cudaEventRecord(copied_[k], stream));
  in_use_[k] = true;
}

void HostReader::read_ranges_to_device(const std::vector<int>& fds, const std::vector<int64_t>& offsets,
                                       const std::vector<int64_t>& sizes, const std::vector<int64_t>& dst_offsets,
                                       void* dst, cudaStream_t stream) {
  const size_t n = fds.size();
  if (offsets.size() != n || sizes.size() != n || dst_offsets.size() != n) {
    throw std::invalid_argument("HostReader: fds, offsets, sizes and dst_offsets differ in length");
  }
  PYLOADER_CUDA_CHECK(cudaSetDevice(device_));
  constexpr int64_t kMaxGap = 4096;  // wider gaps between destinations start a new copy
  auto* out = static_cast<uint8_t*>(dst);
  size_t k = 0;
  bool open = false;
  int64_t start = 0, fill = 0;  // the open buffer holds dst[start, start + fill)
  auto flush = [&]() {
    if (open && fill > 0) copy_buffer(k, 0, fill, out + start, stream);
    open = false;
  };
  int64_t prev_end = 0;
  for (size_t i = 0; i < n; ++i) {
    if (offsets[i] < 0 || sizes[i] < 0 || dst_offsets[i] < prev_end) {
      throw std::invalid_argument("HostReader: range " + std::to_string(i) +
                                  ": negative offset or size, or destinations not ascending");
    }
    prev_end = dst_offsets[i] + sizes[i];
    for (int64_t pos = 0; pos < sizes[i];) {
      const int64_t at = dst_offsets[i] + pos;
      if (open && (at - (start + fill) > kMaxGap || at >= start + buffer_bytes_)) flush();
      if (!open) {
        k = take_buffer();
        open = true;
        start = at;
        fill = 0;
      }
      const int64_t room = start + buffer_bytes_ - at;
      const int64_t len = sizes[i] - pos < room ? sizes[i] - pos : room;
      try {
        pread_at_least(fds[i], host_[k] + (at - start), offsets[i] + pos, len, len, false);
      } catch (const std::range_error& e) {
        throw std::range_error("range " + std::to_string(i) + ": " + e.what());
      }
      fill = at + len - start;
      pos += len;
    }
  }
  flush();
}

void HostReader::read_to_device(int fd, int64_t offset, int64_t nbytes, void* dst, cudaStream_t stream,
                                cudaEvent_t wait_before_copy, bool direct) {
  if (offset < 0 || nbytes < 0) throw std::invalid_argument("HostReader: negative offset or length");
  PYLOADER_CUDA_CHECK(cudaSetDevice(device_));
  // O_DIRECT: a piece's read is widened by up to a block on each side and starts at the buffer's
  // first aligned byte (up to a block in)
  const int64_t step = direct ? buffer_bytes_ - 3 * kDirectAlign : buffer_bytes_;
  bool waited = wait_before_copy == nullptr;
  for (int64_t pos = 0; pos < nbytes; pos += step) {
    const int64_t len = nbytes - pos < step ? nbytes - pos : step;
    const size_t k = take_buffer();
    int64_t lead = 0;
    if (direct) {
      const int64_t a = (offset + pos) / kDirectAlign * kDirectAlign;
      const int64_t b = (offset + pos + len + kDirectAlign - 1) / kDirectAlign * kDirectAlign;
      const int64_t aligned = static_cast<int64_t>((kDirectAlign - reinterpret_cast<uintptr_t>(host_[k]) % kDirectAlign) % kDirectAlign);
      pread_at_least(fd, host_[k] + aligned, a, b - a, offset + pos - a + len, true);
      lead = aligned + offset + pos - a;
    } else {
      pread_at_least(fd, host_[k], offset + pos, len, len, false);
    }
    if (!waited) {
      PYLOADER_CUDA_CHECK(cudaEventSynchronize(wait_before_copy));
      waited = true;
    }
    copy_buffer(k, lead, len, static_cast<uint8_t*>(dst) + pos, stream);
  }
}

void HostReader::synchronize() {
  for (size_t k = 0; k < host_.size(); ++k) {
    if (in_use_[k]) PYLOADER_CUDA_CHECK(cudaEventSynchronize(copied_[k]));
    in_use_[k] = false;
  }
}

}  // namespace pyloader
