// Shared by every kernel: element conversions, FastDiv, E8M0 (dtype codes and the error check come from job_table.h).
// No torch headers: the launchers take raw pointers, strides and a cudaStream_t.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "pyloader/job_table.h"

namespace pyloader {

// Storage types, one per dtype code. FP8 values travel as raw bytes.
struct e4m3_t { uint8_t bits; };
struct e5m2_t { uint8_t bits; };

// Every e4m3/e5m2/bf16/f16 value is exact in fp32, so these conversions never round.
__device__ __forceinline__ float to_float(e4m3_t x) {
  return __half2float(__half(__nv_cvt_fp8_to_halfraw(x.bits, __NV_E4M3)));
}
__device__ __forceinline__ float to_float(e5m2_t x) {
  return __half2float(__half(__nv_cvt_fp8_to_halfraw(x.bits, __NV_E5M2)));
}
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(float x) { return x; }

// The one rounding of the transform: fp32 -> output dtype, round to nearest even.
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }

// E8M0 exponent byte -> fp32. e = 0 is 2^-127, an fp32 subnormal (0x00400000), not zero.
__device__ __forceinline__ float e8m0_to_float(uint8_t e) {
  if (e == 0xFF) return __int_as_float(0x7FFFFFFF);
  if (e == 0) return __int_as_float(0x00400000);
  return __int_as_float(static_cast<int32_t>(e) << 23);
}

// n / d for 32-bit n by multiply and shift (Granlund-Montgomery, round-up variant):
// s = ceil(log2 d), M = ceil(2^(32+s) / d) = 2^32 + m, and n / d = (n + umulhi(n, m)) >> s.
struct FastDiv {
  uint32_t d, m, s;
  static FastDiv make(uint32_t d) {
    uint32_t s = 0;
    while ((uint64_t(1) << s) < d) ++s;
    const uint64_t big = ((uint64_t(1) << (32 + s)) + d - 1) / d;
    return FastDiv{d, static_cast<uint32_t>(big - (uint64_t(1) << 32)), s};
  }
  __device__ __forceinline__ uint32_t div(uint32_t n) const {
    return static_cast<uint32_t>((static_cast<uint64_t>(__umulhi(n, m)) + n) >> s);
  }
};

// Packed nibbles. E2M1: the 3-bit magnitude placed at fp16 bits 9..11 reads as the value times
// 2^-14 (code 1, 0.5, is the subnormal 2^-15), so one fp16 -> fp32 conversion and an exact
// multiply decode it; the sign bit goes to bit 15. INT4: q - 8.
__device__ __forceinline__ float e2m1_to_float(uint32_t n) {
  const unsigned short h = static_cast<unsigned short>(((n & 8u) << 12) | ((n & 7u) << 9));
  return __half2float(__ushort_as_half(h)) * 16384.0f;
}
__device__ __forceinline__ float int4_to_float(uint32_t n) { return static_cast<float>(static_cast<int32_t>(n & 15u) - 8); }

// Four bytes of packed nibbles (eight values, low nibble of the lowest byte first) -> fp32.
template <bool kInt4>
__device__ __forceinline__ void nibbles_to_float8(uint32_t w, float (&out)[8]) {
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const uint32_t n = (w >> (4 * i)) & 15u;
    out[i] = kInt4 ? int4_to_float(n) : e2m1_to_float(n);
  }
}
template <bool kInt4>
__device__ __forceinline__ float nibble_at(const uint8_t* row, uint32_t c) {
  const uint32_t n = (row[c >> 1] >> ((c & 1u) * 4)) & 15u;
  return kInt4 ? int4_to_float(n) : e2m1_to_float(n);
}

// |x| as ordered bits: a NaN (any payload) sorts above +inf, so a max over bits keeps it.
__device__ __forceinline__ uint32_t abs_bits(float v) { return __float_as_uint(v) & 0x7FFFFFFFu; }

__device__ __forceinline__ float load_scale(const void* base, int32_t dtype, int64_t index) {
  switch (dtype) {
    case kF32: return __ldg(static_cast<const float*>(base) + index);
    case kBF16: return __bfloat162float(__ldg(static_cast<const __nv_bfloat16*>(base) + index));
    case kF16: return __half2float(__ldg(static_cast<const __half*>(base) + index));
    case kE8M0: return e8m0_to_float(__ldg(static_cast<const uint8_t*>(base) + index));
    case kE4M3: return to_float(e4m3_t{__ldg(static_cast<const uint8_t*>(base) + index)});
    default: return 1.0f;
  }
}

// The job a block's piece belongs to in a job table: the last job whose first piece (a prefix
// over n jobs, start[n] the total) is <= piece. The first probe is the job a table of equal jobs
// (the experts of a layer) would give; only when it misses does a binary search follow, over the
// side it points to. Each probe is a dependent load from the parameter space, on every block's
// critical path before its first data load.
__device__ __forceinline__ int job_of(const uint32_t* start, int n, uint32_t piece) {
  const uint32_t total = start[n];
  int lo = 0, hi = n - 1;
  const int guess = static_cast<int>((static_cast<uint64_t>(piece) * n) / total);
  if (start[guess] <= piece) {
    if (guess == n - 1 || start[guess + 1] > piece) return guess;
    lo = guess + 1;
  } else {
    hi = guess - 1;
  }
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (start[mid] <= piece) lo = mid; else hi = mid - 1;
  }
  return lo;
}

}  // namespace pyloader
