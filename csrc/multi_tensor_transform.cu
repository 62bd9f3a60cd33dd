// Host loop of the multi-tensor transform: validate packed jobs, split, fill tables, launch.
#include "pyloader/multi_tensor_transform.cuh"

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <memory>
#include <vector>

namespace pyloader {
namespace {

bool is_float_value(int32_t d) { return d == kE4M3 || d == kE5M2 || d == kBF16 || d == kF16 || d == kF32; }
bool is_float_out(int32_t d) { return d == kBF16 || d == kF16 || d == kF32; }
bool is_scale(int32_t d) { return d == kF32 || d == kBF16 || d == kF16 || d == kE8M0 || d == kE4M3; }

std::string job_error(int64_t index, const std::string& what) {
  return "multi_tensor_transform: job " + std::to_string(index) + ": " + what;
}

int sm_count() {
  static std::vector<int> cache;
  int device = 0;
  PYLOADER_CUDA_CHECK(cudaGetDevice(&device));
  if (device >= static_cast<int>(cache.size())) cache.resize(device + 1, 0);
  if (cache[device] == 0) {
    PYLOADER_CUDA_CHECK(cudaDeviceGetAttribute(&cache[device], cudaDevAttrMultiProcessorCount, device));
  }
  return cache[device];
}

class TableLauncher {
 public:
  explicit TableLauncher(cudaStream_t stream) : stream_(stream), table_(new TransformTable()) { reset(); }

  cudaError_t add(const TransformJob& job) {
    const uint32_t upr = job.units_per_row.d;
    const uint64_t units = uint64_t(job.rows) * upr;
    // Chunk counts are settled at flush time (they depend on the kernel); bound both geometries here.
    const uint64_t most = std::max<uint64_t>((units + kChunkUnits - 1) / kChunkUnits, common_chunks<kCommonUnits>(job.rows, upr));
    if (table_->num_jobs == kMaxJobsPerLaunch || bound_ + most > uint64_t(INT32_MAX)) {
      cudaError_t err = flush();
      if (err != cudaSuccess) return err;
    }
    table_->jobs[table_->num_jobs++] = job;
    bound_ += most;
    const bool to_bf16 = job.dst_dtype == kBF16;
    const bool plain = job.amax == nullptr && job.global == nullptr &&
                       (job.src_dtype == kByte || (job.src_dtype == kE4M3 && to_bf16));
    const bool wide = job.src_dtype == kByte ||
                      (to_bf16 && (job.src_dtype == kE4M3 || job.src_dtype == kE2M1 || job.src_dtype == kI4));
    common_ = common_ && (plain || wide);
    wide_ = wide_ || !plain;
    return cudaSuccess;
  }

  cudaError_t flush() {
    const int32_t n = table_->num_jobs;
    for (int32_t j = 0; j < n; ++j) {
      TransformJob& job = table_->jobs[j];
      const uint32_t upr = job.units_per_row.d;
      job.flags &= ~kTiled;
      uint64_t chunks = (uint64_t(job.rows) * upr + kChunkUnits - 1) / kChunkUnits;  // general kernel
      if (common_) {
        if (common_tiled<kCommonUnits>(job.rows, upr)) job.flags |= kTiled;
        chunks = common_chunks<kCommonUnits>(job.rows, upr);
      }
      table_->chunk_start[j + 1] = table_->chunk_start[j] + static_cast<uint32_t>(chunks);
    }
    const uint32_t total = table_->chunk_start[n];
    if (total > 0) {
      if (common_ && wide_) {
        common_transform_kernel<kCommonUnits, true><<<total, kThreads, 0, stream_>>>(*table_);  // a block a chunk
      } else if (common_) {
        common_transform_kernel<kCommonUnits, false><<<total, kThreads, 0, stream_>>>(*table_);
      } else {
        const uint32_t grid = std::min<uint32_t>(total, static_cast<uint32_t>(sm_count()) * kAllBlocksPerSm);
        multi_tensor_transform_kernel<<<grid, kThreads, 0, stream_>>>(*table_);
      }
      cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
    reset();
    return cudaSuccess;
  }

 private:
  void reset() {
    table_->num_jobs = 0;
    table_->chunk_start[0] = 0;
    common_ = true;
    wide_ = false;
    bound_ = 0;
  }
  cudaStream_t stream_;
  bool common_ = true;  // every job fits the common kernel (else the general one runs the table)
  bool wide_ = false;   // some job needs its wide variant (packed source or gate)
  uint64_t bound_ = 0;
  std::unique_ptr<TransformTable> table_;
};

}  // namespace

cudaError_t launch_multi_tensor_transform(const int64_t* packed_jobs, int64_t num_jobs, cudaStream_t stream) {
  TableLauncher launcher(stream);
  for (int64_t j = 0; j < num_jobs; ++j) {
    const int64_t* f = packed_jobs + j * kJobFields;
    const int64_t rows = f[kFieldRows], cols = f[kFieldCols];
    const int32_t src_dtype = static_cast<int32_t>(f[kFieldSrcDtype]);
    const int32_t dst_dtype = static_cast<int32_t>(f[kFieldDstDtype]);
    const int32_t scale_dtype = static_cast<int32_t>(f[kFieldScaleDtype]);
    if (rows < 0 || cols < 0) throw std::invalid_argument(job_error(j, "negative rows or cols"));
    const int64_t global_mode = f[kFieldGlobalMode];
    if (src_dtype == kByte || dst_dtype == kByte) {
      if (src_dtype != dst_dtype || scale_dtype != kNone || f[kFieldAmax] != 0)
        throw std::invalid_argument(job_error(j, "byte copies take byte source and destination, no scale and no gate"));
    } else if (!(is_float_value(src_dtype) || is_packed(src_dtype)) || !is_float_out(dst_dtype)) {
      throw std::invalid_argument(job_error(j, std::string("unsupported dtype pair ") + dtype_name(src_dtype) +
                                                   " -> " + dtype_name(dst_dtype)));
    }
    if (scale_dtype != kNone) {
      if (!is_scale(scale_dtype)) throw std::invalid_argument(job_error(j, "unsupported scale dtype"));
      if (f[kFieldScale] == 0) throw std::invalid_argument(job_error(j, "scale dtype given without a scale pointer"));
      if (f[kFieldBlockRows] <= 0 || f[kFieldBlockCols] <= 0 || f[kFieldBlockRows] > INT32_MAX ||
          f[kFieldBlockCols] > INT32_MAX)
        throw std::invalid_argument(job_error(j, "block shape must be positive int32"));
      if (f[kFieldR0] < 0 || f[kFieldC0] < 0) throw std::invalid_argument(job_error(j, "negative block offset"));
      if (f[kFieldR0] + rows > INT32_MAX || f[kFieldC0] + cols > INT32_MAX)
        throw std::invalid_argument(job_error(j, "block offset + extent exceeds int32"));
    }
    if (global_mode != kGlobalNone) {
      if (global_mode != kGlobalMul && global_mode != kGlobalDiv)
        throw std::invalid_argument(job_error(j, "unknown second-level scale mode"));
      if (f[kFieldGlobal] == 0 || scale_dtype == kNone)
        throw std::invalid_argument(job_error(j, "a second-level scale needs its address and a block scale"));
    } else if (f[kFieldGlobal] != 0) {
      throw std::invalid_argument(job_error(j, "second-level scale address given without a mode"));
    }
    if (f[kFieldAmax] % 4 != 0) throw std::invalid_argument(job_error(j, "gate slot must be 4-byte aligned"));
    if (cols > INT32_MAX) throw std::invalid_argument(job_error(j, "more than 2^31 columns"));
    if (rows == 0 || cols == 0) continue;  // empty jobs launch nothing
    if (f[kFieldSrc] == 0 || f[kFieldDst] == 0) throw std::invalid_argument(job_error(j, "null pointer"));

    const bool packed = is_packed(src_dtype);
    const int vec = vec_width_of(src_dtype, dst_dtype);
    const int64_t src_row_bytes = packed ? f[kFieldSrcRowStride] : f[kFieldSrcRowStride] * dtype_bytes(src_dtype);
    const int64_t dst_row_bytes = f[kFieldDstRowStride] * dtype_bytes(dst_dtype);
    // Vector accesses need every row start aligned to the access width of each side (fp32 out of
    // a packed source: two 16-byte stores).
    const int64_t src_access = packed ? vec / 2 : int64_t(vec) * dtype_bytes(src_dtype);
    const int64_t dst_access = std::min<int64_t>(16, int64_t(vec) * dtype_bytes(dst_dtype));
    bool vec_ok = f[kFieldSrc] % src_access == 0 && f[kFieldDst] % dst_access == 0 &&
                  (rows == 1 || (src_row_bytes % src_access == 0 && dst_row_bytes % dst_access == 0));
    if (scale_dtype != kNone) {
      const int64_t bn = f[kFieldBlockCols], c0 = f[kFieldC0];
      const bool one_scale_column = (c0 % bn) + cols <= bn;
      vec_ok = vec_ok && (one_scale_column || (bn % vec == 0 && c0 % vec == 0));
    }

    TransformJob job{};
    job.src = reinterpret_cast<const void*>(f[kFieldSrc]);
    job.dst = reinterpret_cast<void*>(f[kFieldDst]);
    job.scale = scale_dtype == kNone ? nullptr : reinterpret_cast<const void*>(f[kFieldScale]);
    job.src_row_stride = f[kFieldSrcRowStride];
    job.dst_row_stride = f[kFieldDstRowStride];
    job.scale_row_stride = f[kFieldScaleRowStride];
    job.scale_col_stride = f[kFieldScaleColStride];
    job.global = global_mode == kGlobalNone ? nullptr : reinterpret_cast<const float*>(f[kFieldGlobal]);
    job.amax = reinterpret_cast<uint32_t*>(f[kFieldAmax]);
    job.cols = static_cast<int32_t>(cols);
    job.block_rows = scale_dtype == kNone ? 1 : static_cast<int32_t>(f[kFieldBlockRows]);
    job.block_cols = scale_dtype == kNone ? 1 : static_cast<int32_t>(f[kFieldBlockCols]);
    job.c0 = static_cast<int32_t>(f[kFieldC0]);
    job.units_per_row = FastDiv::make(static_cast<uint32_t>((cols + vec - 1) / vec));
    job.block_rows_div = FastDiv::make(static_cast<uint32_t>(job.block_rows));
    job.block_cols_div = FastDiv::make(static_cast<uint32_t>(job.block_cols));
    job.src_dtype = static_cast<uint8_t>(src_dtype);
    job.dst_dtype = static_cast<uint8_t>(dst_dtype);
    job.scale_dtype = static_cast<uint8_t>(scale_dtype);
    job.flags = (vec_ok ? kVecOk : 0) | (global_mode == kGlobalDiv ? kDivideGlobal : 0);

    // Split by rows so that unit indices of one job fit 32 bits; each piece keeps its global
    // block-grid row offset, so scales stay indexed at the right block.
    const int64_t max_rows = std::max<int64_t>(1, static_cast<int64_t>(INT32_MAX) / job.units_per_row.d);
    for (int64_t r = 0; r < rows; r += max_rows) {
      const int64_t piece = std::min(max_rows, rows - r);
      TransformJob part = job;
      part.src = static_cast<const char*>(job.src) + r * src_row_bytes;
      part.dst = static_cast<char*>(job.dst) + r * dst_row_bytes;
      part.rows = static_cast<int32_t>(piece);
      part.r0 = static_cast<int32_t>(f[kFieldR0] + r);
      cudaError_t err = launcher.add(part);
      if (err != cudaSuccess) return err;
    }
  }
  return launcher.flush();
}

}  // namespace pyloader
