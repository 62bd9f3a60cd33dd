// Blockwise quantization, the DeepSeek recipe, one thread block per scale block:
//   s = amax(|x| over the block) / fmax   (fmax = 448 for e4m3fn, 57344 for e5m2; an all-zero
//                                           block gets s = 1 so the scale stays finite)
//   q = saturate_finite(round_to_nearest_even(x / s))
// The inverse of the dequant transform: dequantizing (q, s) multiplies by s.
#pragma once

#include "pyloader/common.cuh"

namespace pyloader {

constexpr int kQuantThreads = 256;

template <typename Src, __nv_fp8_interpretation_t kInterp>
__global__ void __launch_bounds__(kQuantThreads) quantize_blockwise_kernel(QuantizeArgs a, float fmax) {
  __shared__ float warp_max[kQuantThreads / 32];
  const int64_t block = blockIdx.x;
  const int64_t e = block / (a.grid_rows * a.grid_cols);
  const int64_t gr = (block / a.grid_cols) % a.grid_rows;
  const int64_t gc = block % a.grid_cols;
  const int64_t r_begin = gr * a.block_rows, c_begin = gc * a.block_cols;
  const int64_t h = min(a.block_rows, a.rows - r_begin);
  const int64_t w = min(a.block_cols, a.cols - c_begin);
  const Src* x = static_cast<const Src*>(a.x) + e * a.x_expert_stride + r_begin * a.x_row_stride + c_begin;

  float amax = 0.0f;
  for (int64_t i = threadIdx.x; i < h * w; i += kQuantThreads) {
    amax = fmaxf(amax, fabsf(to_float(x[(i / w) * a.x_row_stride + i % w])));
  }
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xFFFFFFFF, amax, offset));
  if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x / 32] = amax;
  __syncthreads();
  amax = warp_max[0];
#pragma unroll
  for (int i = 1; i < kQuantThreads / 32; ++i) amax = fmaxf(amax, warp_max[i]);

  const float s = amax > 0.0f ? amax / fmax : 1.0f;
  if (threadIdx.x == 0) a.scale[block] = s;
  uint8_t* q = a.q + (e * a.rows + r_begin) * a.cols + c_begin;
  for (int64_t i = threadIdx.x; i < h * w; i += kQuantThreads) {
    const int64_t r = i / w, c = i % w;
    const float v = to_float(x[r * a.x_row_stride + c]) / s;
    q[r * a.cols + c] = __nv_cvt_float_to_fp8(v, __NV_SATFINITE, kInterp);
  }
}

}  // namespace pyloader
