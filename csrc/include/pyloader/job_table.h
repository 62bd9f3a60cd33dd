// Host API of the kernels: dtype codes, the packed job layout and the launchers.
// Plain C++ (no device code), so bindings.cpp compiles with the host compiler alone.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace pyloader {

// The one CUDA error check, after every runtime call and every launch: an error throws
// std::runtime_error with the file, line, expression and CUDA's own message (a RuntimeError in Python).
#define PYLOADER_CUDA_CHECK(expr)                                                     \
  do {                                                                               \
    cudaError_t err_ = (expr);                                                       \
    if (err_ != cudaSuccess) {                                                       \
      throw std::runtime_error(std::string("CUDA error at ") + __FILE__ + ":" +       \
                               std::to_string(__LINE__) + " (" #expr "): " +         \
                               cudaGetErrorString(err_));                            \
    }                                                                                \
  } while (0)

// Dtype codes shared with Python (pyloader/dtypes.py keeps the same numbers).
enum DType : int32_t {
  kNone = 0,   // "no scale"
  kByte = 1,   // raw bytes: same-dtype copies of anything
  kE4M3 = 2,   // float8_e4m3fn
  kE5M2 = 3,   // float8_e5m2
  kBF16 = 4,
  kF16 = 5,
  kF32 = 6,
  kE8M0 = 7,   // scale only: 2^(e-127), e = 255 is NaN (float8_e8m0fnu or raw uint8)
  kE2M1 = 8,   // source only: FP4 codes, two a byte, low nibble first
  kI4 = 9,     // source only: signed INT4 stored offset by 8, two a byte, low nibble first (I32 words, LSB first)
};

inline bool is_packed(int32_t code) { return code == kE2M1 || code == kI4; }

// One job as Python packs it: kJobFields int64 values per job, in this order. Strides are in
// elements, except a packed source's row stride, which is in bytes. kFieldGlobal: address of a
// float32 second-level scale (0: none), applied to every block scale as kFieldGlobalMode says
// (kGlobalMul: s * g, kGlobalDiv: s / g). kFieldAmax: address of two uint32 (0: none) that receive
// the bits of max |output before rounding| and max |decoded source| (atomicMax: |x| orders as its bits).
enum JobField : int {
  kFieldSrc = 0, kFieldDst, kFieldScale, kFieldRows, kFieldCols, kFieldSrcRowStride, kFieldDstRowStride,
  kFieldScaleRowStride, kFieldScaleColStride, kFieldBlockRows, kFieldBlockCols, kFieldR0, kFieldC0,
  kFieldSrcDtype, kFieldDstDtype, kFieldScaleDtype, kFieldGlobal, kFieldGlobalMode, kFieldAmax, kJobFields
};

enum GlobalMode : int32_t { kGlobalNone = 0, kGlobalMul = 1, kGlobalDiv = 2 };

constexpr int kMaxJobsPerLaunch = 224;  // the table is a kernel parameter: 32 KB at most

// Validates the packed jobs, splits jobs too large for 32-bit unit indexing, and launches as
// many times as the table fills. Throws std::invalid_argument on a bad job.
cudaError_t launch_multi_tensor_transform(const int64_t* packed_jobs, int64_t num_jobs, cudaStream_t stream);

// One quantize job as Python packs it: kQuantFields int64 values per job, in this order. Strides
// in elements (the FP8 destination's are bytes); the scale is float32, unit column stride.
// kQFieldScaleFmt: kScaleFloat (amax / fmax) or kScalePow2 (UE8M0 powers of two, e4m3fn only).
enum QuantField : int {
  kQFieldSrc = 0, kQFieldSrcRowStride, kQFieldSrcDtype, kQFieldDst, kQFieldDstRowStride, kQFieldDstDtype,
  kQFieldScale, kQFieldScaleRowStride, kQFieldRows, kQFieldCols, kQFieldBlockRows, kQFieldBlockCols,
  kQFieldScaleFmt, kQuantFields
};

enum ScaleFmt : int32_t { kScaleFloat = 0, kScalePow2 = 1 };

constexpr int kMaxQuantJobs = 320;  // the table is a kernel parameter: 32 KB at most

// Validates the packed jobs and launches one block per scale block, as many times as the table
// fills. Throws std::invalid_argument on a bad job.
cudaError_t launch_multi_tensor_quantize(const int64_t* packed_jobs, int64_t num_jobs, cudaStream_t stream);

inline const char* dtype_name(int32_t code) {
  switch (code) {
    case kNone: return "none";
    case kByte: return "byte";
    case kE4M3: return "float8_e4m3fn";
    case kE5M2: return "float8_e5m2";
    case kBF16: return "bfloat16";
    case kF16: return "float16";
    case kF32: return "float32";
    case kE8M0: return "e8m0";
    case kE2M1: return "e2m1 (packed fp4)";
    case kI4: return "int4 (packed)";
    default: return "unknown";
  }
}

}  // namespace pyloader
