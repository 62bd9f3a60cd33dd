// One launch over a table of jobs: blockwise FP8 quantization of many tensors (the DeepSeek
// recipe), each straight into its place, one thread block per scale block:
//   s = amax(|x| over the block) / fmax   (fmax 448 for e4m3fn, 57344 for e5m2; an all-zero block
//                                          gets s = 1 so the scale stays finite)
//   or, with power-of-two (UE8M0) scales, s = 2^e, e the least integer with 2^e >= amax / 448
//   q = saturate_finite(round_to_nearest_even(x / s))       (exact IEEE division)
// The inverse of the dequant transform. The fast body holds a block of up to 128x128 values in
// registers, so the source is read once; other blocks (unaligned, wider) read it twice.
#pragma once

#include "pyloader/common.cuh"

namespace pyloader {

constexpr int kQuantThreads = 256;
constexpr int kQuantVecs = 8;  // 8-value vectors a thread holds: 256 x 8 x 8 = one 128x128 block
constexpr int kQuantBlockValues = kQuantThreads * kQuantVecs * 8;

struct QuantJob {
  const void* src;
  uint8_t* dst;             // FP8 bytes
  float* scale;             // [grid_rows, grid_cols] with row stride scale_row_stride
  int64_t src_row_stride;   // elements
  int64_t dst_row_stride;   // bytes
  int64_t scale_row_stride; // elements
  int32_t rows;
  int32_t cols;
  int32_t block_rows;
  int32_t block_cols;
  FastDiv grid_cols;        // scale blocks a row of blocks
  uint8_t src_dtype;
  uint8_t dst_dtype;
  uint8_t pow2;             // UE8M0 scales
  uint8_t vec;              // aligned for 8-value vectors and the block fits the registers
};

constexpr uint8_t kQuantPow2 = 1;

struct QuantTable {
  QuantJob jobs[kMaxQuantJobs];
  uint32_t block_start[kMaxQuantJobs + 1];  // prefix of scale blocks per job
  int32_t num_jobs;
};
static_assert(sizeof(QuantTable) <= 32000, "kernel parameter limit is 32764 bytes");

template <typename Src>
__device__ __forceinline__ void load8(const Src* p, float (&v)[8]);
template <>
__device__ __forceinline__ void load8<__nv_bfloat16>(const __nv_bfloat16* p, float (&v)[8]) {
  const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    v[2 * i] = f.x;
    v[2 * i + 1] = f.y;
  }
}
template <>
__device__ __forceinline__ void load8<__half>(const __half* p, float (&v)[8]) {
  const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
  const __half2* h = reinterpret_cast<const __half2*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(h[i]);
    v[2 * i] = f.x;
    v[2 * i + 1] = f.y;
  }
}
template <>
__device__ __forceinline__ void load8<float>(const float* p, float (&v)[8]) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(p));
  const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
  v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
  v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}

// The block's amax: every thread gets it.
__device__ __forceinline__ float block_amax(float amax) {
  __shared__ float warp_max[kQuantThreads / 32];
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xFFFFFFFF, amax, offset));
  if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x / 32] = amax;
  __syncthreads();
  amax = warp_max[0];
#pragma unroll
  for (int i = 1; i < kQuantThreads / 32; ++i) amax = fmaxf(amax, warp_max[i]);
  return amax;
}

// s for a block of amax: amax / fmax, or the least power of two >= amax / 448 (exponent clamped
// to [-127, 127], as UE8M0 holds it); 1 for an all-zero block.
__device__ __forceinline__ float block_scale(float amax, float fmax, bool pow2) {
  if (!(amax > 0.0f)) return 1.0f;
  const float y = amax / fmax;
  if (!pow2) return y;
  int ex;
  const float m = frexpf(y, &ex);  // y = m * 2^ex, m in [0.5, 1)
  const int e = max(-127, min(127, m == 0.5f ? ex - 1 : ex));
  return e >= -126 ? __int_as_float((e + 127) << 23) : __int_as_float(0x00400000);
}

template <__nv_fp8_interpretation_t kInterp>
__device__ __forceinline__ uint8_t to_fp8(float v) {
  return __nv_cvt_float_to_fp8(v, __NV_SATFINITE, kInterp);
}

// The fast body: 8-value vectors, every value of the block in registers.
template <typename Src, __nv_fp8_interpretation_t kInterp>
__device__ __forceinline__ void quantize_block_vec(const QuantJob& j, int64_t r0, int64_t c0, int h, int w, float* scale,
                                                   float fmax) {
  const int vpr = w >> 3;  // vectors a row of the block
  const int nvec = h * vpr;
  const Src* x = static_cast<const Src*>(j.src) + r0 * j.src_row_stride + c0;
  float v[kQuantVecs][8];
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < kQuantVecs; ++i) {
    const int idx = threadIdx.x + i * kQuantThreads;
    if (idx < nvec) {
      const int r = idx / vpr, c = (idx - r * vpr) << 3;
      load8<Src>(x + r * j.src_row_stride + c, v[i]);
#pragma unroll
      for (int k = 0; k < 8; ++k) amax = fmaxf(amax, fabsf(v[i][k]));
    }
  }
  const float s = block_scale(block_amax(amax), fmax, j.pow2);
  if (threadIdx.x == 0) *scale = s;
  uint8_t* q = j.dst + r0 * j.dst_row_stride + c0;
#pragma unroll
  for (int i = 0; i < kQuantVecs; ++i) {
    const int idx = threadIdx.x + i * kQuantThreads;
    if (idx < nvec) {
      const int r = idx / vpr, c = (idx - r * vpr) << 3;
      uint32_t lo = 0, hi = 0;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        lo |= uint32_t(to_fp8<kInterp>(v[i][k] / s)) << (8 * k);
        hi |= uint32_t(to_fp8<kInterp>(v[i][k + 4] / s)) << (8 * k);
      }
      *reinterpret_cast<uint2*>(q + r * j.dst_row_stride + c) = make_uint2(lo, hi);
    }
  }
}

// Any block: element at a time, the source read twice.
template <typename Src, __nv_fp8_interpretation_t kInterp>
__device__ __forceinline__ void quantize_block_any(const QuantJob& j, int64_t r0, int64_t c0, int h, int w,
                                                   float* scale, float fmax) {
  const Src* x = static_cast<const Src*>(j.src) + r0 * j.src_row_stride + c0;
  const int64_t n = int64_t(h) * w;
  float amax = 0.0f;
  for (int64_t i = threadIdx.x; i < n; i += kQuantThreads) {
    amax = fmaxf(amax, fabsf(to_float(x[(i / w) * j.src_row_stride + i % w])));
  }
  const float s = block_scale(block_amax(amax), fmax, j.pow2);
  if (threadIdx.x == 0) *scale = s;
  uint8_t* q = j.dst + r0 * j.dst_row_stride + c0;
  for (int64_t i = threadIdx.x; i < n; i += kQuantThreads) {
    const int64_t r = i / w, c = i % w;
    q[r * j.dst_row_stride + c] = to_fp8<kInterp>(to_float(x[r * j.src_row_stride + c]) / s);
  }
}

template <typename Src>
__device__ __forceinline__ void quantize_block(const QuantJob& j, int64_t r0, int64_t c0, int h, int w, float* scale) {
  if (j.dst_dtype == kE4M3) {
    if (j.vec) quantize_block_vec<Src, __NV_E4M3>(j, r0, c0, h, w, scale, 448.0f);
    else quantize_block_any<Src, __NV_E4M3>(j, r0, c0, h, w, scale, 448.0f);
  } else {
    if (j.vec) quantize_block_vec<Src, __NV_E5M2>(j, r0, c0, h, w, scale, 57344.0f);
    else quantize_block_any<Src, __NV_E5M2>(j, r0, c0, h, w, scale, 57344.0f);
  }
}

__global__ void __launch_bounds__(kQuantThreads) multi_tensor_quantize_kernel(const __grid_constant__ QuantTable table) {
  const uint32_t block = blockIdx.x;
  const int jn = job_of(table.block_start, table.num_jobs, block);
  const QuantJob& j = table.jobs[jn];
  const uint32_t local = block - table.block_start[jn];
  const uint32_t gr = j.grid_cols.div(local);
  const uint32_t gc = local - gr * j.grid_cols.d;
  const int64_t r0 = int64_t(gr) * j.block_rows, c0 = int64_t(gc) * j.block_cols;
  const int h = static_cast<int>(min(int64_t(j.block_rows), int64_t(j.rows) - r0));
  const int w = static_cast<int>(min(int64_t(j.block_cols), int64_t(j.cols) - c0));
  float* scale = j.scale + int64_t(gr) * j.scale_row_stride + gc;
  switch (j.src_dtype) {
    case kBF16: quantize_block<__nv_bfloat16>(j, r0, c0, h, w, scale); break;
    case kF16: quantize_block<__half>(j, r0, c0, h, w, scale); break;
    default: quantize_block<float>(j, r0, c0, h, w, scale); break;
  }
}

}  // namespace pyloader
