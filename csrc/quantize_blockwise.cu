#include "pyloader/quantize_blockwise.cuh"

namespace pyloader {
namespace {

template <typename Src>
cudaError_t launch_for_src(const QuantizeArgs& a, int32_t q_dtype, cudaStream_t stream) {
  const int64_t blocks = a.experts * a.grid_rows * a.grid_cols;
  if (blocks == 0) return cudaSuccess;
  if (blocks > INT32_MAX) throw std::invalid_argument("quantize_blockwise: more than 2^31 scale blocks");
  if (q_dtype == kE4M3) {
    quantize_blockwise_kernel<Src, __NV_E4M3><<<static_cast<unsigned>(blocks), kQuantThreads, 0, stream>>>(a, 448.0f);
  } else if (q_dtype == kE5M2) {
    quantize_blockwise_kernel<Src, __NV_E5M2><<<static_cast<unsigned>(blocks), kQuantThreads, 0, stream>>>(a, 57344.0f);
  } else {
    throw std::invalid_argument(std::string("quantize_blockwise: unsupported output dtype ") + dtype_name(q_dtype));
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_quantize_blockwise(const QuantizeArgs& a, int32_t x_dtype, int32_t q_dtype, cudaStream_t stream) {
  if (a.block_rows <= 0 || a.block_cols <= 0) throw std::invalid_argument("quantize_blockwise: block shape must be positive");
  switch (x_dtype) {
    case kBF16: return launch_for_src<__nv_bfloat16>(a, q_dtype, stream);
    case kF16: return launch_for_src<__half>(a, q_dtype, stream);
    case kF32: return launch_for_src<float>(a, q_dtype, stream);
    default: throw std::invalid_argument(std::string("quantize_blockwise: unsupported input dtype ") + dtype_name(x_dtype));
  }
}

}  // namespace pyloader
