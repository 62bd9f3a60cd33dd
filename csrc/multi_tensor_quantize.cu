// Host loop of the multi-tensor quantize: validate packed jobs, fill tables, launch.
#include "pyloader/multi_tensor_quantize.cuh"

#include <memory>

namespace pyloader {
namespace {

std::string quant_error(int64_t index, const std::string& what) {
  return "multi_tensor_quantize: job " + std::to_string(index) + ": " + what;
}

int64_t src_bytes(int32_t d) { return d == kF32 ? 4 : 2; }

QuantJob make_job(const int64_t* f, int64_t index) {
  const int64_t rows = f[kQFieldRows], cols = f[kQFieldCols], bm = f[kQFieldBlockRows], bn = f[kQFieldBlockCols];
  const int32_t src_dtype = static_cast<int32_t>(f[kQFieldSrcDtype]), dst_dtype = static_cast<int32_t>(f[kQFieldDstDtype]);
  const int64_t fmt = f[kQFieldScaleFmt];
  if (src_dtype != kBF16 && src_dtype != kF16 && src_dtype != kF32)
    throw std::invalid_argument(quant_error(index, std::string("unsupported source dtype ") + dtype_name(src_dtype)));
  if (dst_dtype != kE4M3 && dst_dtype != kE5M2)
    throw std::invalid_argument(quant_error(index, std::string("unsupported FP8 dtype ") + dtype_name(dst_dtype)));
  if (fmt != kScaleFloat && fmt != kScalePow2) throw std::invalid_argument(quant_error(index, "unknown scale format"));
  if (fmt == kScalePow2 && dst_dtype != kE4M3)
    throw std::invalid_argument(quant_error(index, "power-of-two scales are for float8_e4m3fn"));
  if (rows < 0 || cols < 0 || rows > INT32_MAX || cols > INT32_MAX)
    throw std::invalid_argument(quant_error(index, "rows and cols must be in [0, 2^31)"));
  if (bm <= 0 || bn <= 0 || bm > INT32_MAX || bn > INT32_MAX)
    throw std::invalid_argument(quant_error(index, "block shape must be positive int32"));
  if (rows > 0 && cols > 0 && (f[kQFieldSrc] == 0 || f[kQFieldDst] == 0 || f[kQFieldScale] == 0))
    throw std::invalid_argument(quant_error(index, "null pointer"));
  QuantJob j{};
  j.src = reinterpret_cast<const void*>(f[kQFieldSrc]);
  j.dst = reinterpret_cast<uint8_t*>(f[kQFieldDst]);
  j.scale = reinterpret_cast<float*>(f[kQFieldScale]);
  j.src_row_stride = f[kQFieldSrcRowStride];
  j.dst_row_stride = f[kQFieldDstRowStride];
  j.scale_row_stride = f[kQFieldScaleRowStride];
  j.rows = static_cast<int32_t>(rows);
  j.cols = static_cast<int32_t>(cols);
  j.block_rows = static_cast<int32_t>(bm);
  j.block_cols = static_cast<int32_t>(bn);
  j.grid_cols = FastDiv::make(static_cast<uint32_t>((cols + bn - 1) / bn));
  j.src_dtype = static_cast<uint8_t>(src_dtype);
  j.dst_dtype = static_cast<uint8_t>(dst_dtype);
  j.pow2 = fmt == kScalePow2;
  // 8-value vectors: 16-byte source loads and 8-byte stores, never across a block's columns.
  const int64_t sb = src_bytes(src_dtype);
  j.vec = cols % 8 == 0 && bn % 8 == 0 && bm * bn <= kQuantBlockValues && f[kQFieldSrc] % 16 == 0 &&
          f[kQFieldDst] % 8 == 0 && (rows <= 1 || ((f[kQFieldSrcRowStride] * sb) % 16 == 0 && f[kQFieldDstRowStride] % 8 == 0));
  return j;
}

}  // namespace

cudaError_t launch_multi_tensor_quantize(const int64_t* packed_jobs, int64_t num_jobs, cudaStream_t stream) {
  std::unique_ptr<QuantTable> table(new QuantTable());
  table->num_jobs = 0;
  table->block_start[0] = 0;
  auto flush = [&]() -> cudaError_t {
    const uint32_t total = table->block_start[table->num_jobs];
    if (total > 0) {
      multi_tensor_quantize_kernel<<<total, kQuantThreads, 0, stream>>>(*table);
      cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
    table->num_jobs = 0;
    return cudaSuccess;
  };
  for (int64_t i = 0; i < num_jobs; ++i) {
    const QuantJob j = make_job(packed_jobs + i * kQuantFields, i);
    if (j.rows == 0 || j.cols == 0) continue;  // empty jobs launch nothing
    const uint64_t blocks = uint64_t((j.rows + j.block_rows - 1) / j.block_rows) * j.grid_cols.d;
    if (blocks > uint64_t(INT32_MAX)) throw std::invalid_argument(quant_error(i, "more than 2^31 scale blocks"));
    if (table->num_jobs == kMaxQuantJobs || table->block_start[table->num_jobs] + blocks > uint64_t(INT32_MAX)) {
      cudaError_t err = flush();
      if (err != cudaSuccess) return err;
    }
    const int32_t n = table->num_jobs++;
    table->jobs[n] = j;
    table->block_start[n + 1] = table->block_start[n] + static_cast<uint32_t>(blocks);
  }
  return flush();
}

}  // namespace pyloader
