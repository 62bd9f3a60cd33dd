// One launch over a table of jobs: copy, cast or blockwise-dequantize many tensors, each
// straight into its place (a row range of a fused parameter, an expert's plane, ...).
//
//   dst[r, c] = round_to_nearest_even(float32(src[r, c]) * float32(scale[(r + r0) / bm, (c + c0) / bn]))
//
// (no scale: the product is skipped and the cast is exact or rounds once). Design after
// multi_tensor_apply: every job is cut into chunks of "units" (one unit = the elements one
// 16-byte access covers); a block finds its chunk's job from the table's chunk prefix and runs
// the body for that job's dtype pair. Two kernels: the common one (byte copies and E4M3 -> BF16)
// runs one block a chunk, 2-D jobs cut into tiles; the general one (every dtype pair) walks flat
// chunks of kChunkUnits with a persistent grid. The table travels as a __grid_constant__ kernel
// parameter (up to 32 KB since CUDA 12.1).
#pragma once

#include <type_traits>

#include "pyloader/common.cuh"

namespace pyloader {

constexpr int kThreads = 256;
constexpr int kUnitsPerThread = 4;  // units a thread per chunk of the general kernel
constexpr int kChunkUnits = kThreads * kUnitsPerThread;

struct TransformJob {
  const void* src;
  void* dst;
  const void* scale;       // nullptr: no scale
  int64_t src_row_stride;  // elements
  int64_t dst_row_stride;  // elements
  int64_t scale_row_stride;
  int64_t scale_col_stride;
  int32_t rows;
  int32_t cols;
  int32_t block_rows;      // bm
  int32_t block_cols;      // bn
  int32_t r0;              // block-grid offset of row 0 (tensor-parallel slices)
  int32_t c0;
  FastDiv units_per_row;   // ceil(cols / vector width of the dtype pair)
  FastDiv block_rows_div;
  FastDiv block_cols_div;
  uint8_t src_dtype;
  uint8_t dst_dtype;
  uint8_t scale_dtype;
  uint8_t flags;           // kVecOk | kTiled
};

constexpr uint8_t kVecOk = 1;  // aligned for vector accesses, vectors never straddle a scale block
constexpr uint8_t kTiled = 2;  // common kernel: chunks are tiles of 16-unit rows (else flat runs of units)

struct TransformTable {
  TransformJob jobs[kMaxJobsPerLaunch];
  uint32_t chunk_start[kMaxJobsPerLaunch + 1];  // prefix of chunks per job
  int32_t num_jobs;
};
static_assert(sizeof(TransformTable) <= 32000, "kernel parameter limit is 32764 bytes");

// Elements per unit for a dtype pair: 16 bytes of the wider side, so every thread's store (for
// widening transforms) or load (for narrowing ones) is one full 16-byte access and a warp's
// accesses are contiguous.
template <typename Src, typename Dst>
__host__ __device__ constexpr int vec_width() {
  return 16 / (sizeof(Src) > sizeof(Dst) ? sizeof(Src) : sizeof(Dst));
}

inline int dtype_bytes(int32_t d) { return (d == kByte || d == kE4M3 || d == kE5M2 || d == kE8M0) ? 1 : (d == kF32 ? 4 : 2); }

// Host-side mirror of vec_width for dtype codes (byte copies move 16 bytes per unit).
inline int vec_width_of(int32_t src, int32_t dst) {
  const int a = dtype_bytes(src), b = dtype_bytes(dst);
  return 16 / (a > b ? a : b);
}

// Native vector type of an access width, so loads and stores are single LDG/STG.64/.128.
template <int kBytes> struct VecOf;
template <> struct VecOf<4> { using type = uint32_t; };
template <> struct VecOf<8> { using type = uint2; };
template <> struct VecOf<16> { using type = uint4; };

template <typename T, int N>
union Packed {
  typename VecOf<N * sizeof(T)>::type vec;
  T elems[N];
};

template <typename Src, int N>
__device__ __forceinline__ void to_float_vec(const Src (&in)[N], float (&out)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = to_float(in[i]);
}

// FP8 pairs go through the paired converter (one cvt.f16x2.e4m3x2 on sm_89+).
template <int N, __nv_fp8_interpretation_t kInterp, typename Fp8>
__device__ __forceinline__ void fp8_to_float_vec(const Fp8 (&in)[N], float (&out)[N]) {
#pragma unroll
  for (int i = 0; i < N; i += 2) {
    __nv_fp8x2_storage_t pair = static_cast<__nv_fp8x2_storage_t>(in[i].bits | (in[i + 1].bits << 8));
    float2 f = __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(pair, kInterp)));
    out[i] = f.x;
    out[i + 1] = f.y;
  }
}
template <int N>
__device__ __forceinline__ void to_float_vec(const e4m3_t (&in)[N], float (&out)[N]) {
  fp8_to_float_vec<N, __NV_E4M3>(in, out);
}
template <int N>
__device__ __forceinline__ void to_float_vec(const e5m2_t (&in)[N], float (&out)[N]) {
  fp8_to_float_vec<N, __NV_E5M2>(in, out);
}

// Rounding in pairs: one cvt.rn.bf16x2.f32 / cvt.rn.f16x2.f32 per two elements.
template <typename Dst, int N>
__device__ __forceinline__ void from_float_vec(const float (&v)[N], Dst (&out)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) out[i] = from_float<Dst>(v[i]);
}
template <int N>
__device__ __forceinline__ void from_float_vec(const float (&v)[N], __nv_bfloat16 (&out)[N]) {
#pragma unroll
  for (int i = 0; i < N; i += 2) {
    const __nv_bfloat162 p = __floats2bfloat162_rn(v[i], v[i + 1]);
    out[i] = p.x;
    out[i + 1] = p.y;
  }
}
template <int N>
__device__ __forceinline__ void from_float_vec(const float (&v)[N], __half (&out)[N]) {
#pragma unroll
  for (int i = 0; i < N; i += 2) {
    const __half2 p = __floats2half2_rn(v[i], v[i + 1]);
    out[i] = p.x;
    out[i + 1] = p.y;
  }
}

// Block-grid indices stay in 32 bits: the launcher guarantees r0 + rows and c0 + cols < 2^31.
__device__ __forceinline__ float job_scale(const TransformJob& job, uint32_t r, uint32_t c) {
  const uint32_t sr = job.block_rows_div.div(r + static_cast<uint32_t>(job.r0));
  const uint32_t sc = job.block_cols_div.div(c + static_cast<uint32_t>(job.c0));
  return load_scale(job.scale, job.scale_dtype,
                    static_cast<int64_t>(sr) * job.scale_row_stride + static_cast<int64_t>(sc) * job.scale_col_stride);
}

// One chunk of one job in the general kernel: each thread handles kUnitsPerThread units, one at a
// time (with every dtype pair inlined, registers allow no more in flight).
template <typename Src, typename Dst>
__device__ __forceinline__ void transform_chunk(const TransformJob& job, uint32_t first_unit) {
  constexpr int kVec = vec_width<Src, Dst>();
  using SrcVec = typename VecOf<kVec * sizeof(Src)>::type;
  const Src* __restrict__ src = static_cast<const Src*>(job.src);
  Dst* __restrict__ dst = static_cast<Dst*>(job.dst);
  const uint32_t total_units = static_cast<uint32_t>(job.rows) * job.units_per_row.d;
  const uint32_t cols = static_cast<uint32_t>(job.cols);
  const bool has_scale = job.scale != nullptr;
#pragma unroll 1
  for (int g = 0; g < kUnitsPerThread; ++g) {
    const uint32_t u = first_unit + g * kThreads + threadIdx.x;
    if (u >= total_units) return;
    const uint32_t r = job.units_per_row.div(u);
    const uint32_t c = (u - r * job.units_per_row.d) * kVec;
    const Src* in_row = src + r * job.src_row_stride;
    Dst* out_row = dst + r * job.dst_row_stride;
    if ((job.flags & kVecOk) && c + kVec <= cols) {
      Packed<Src, kVec> in;
      in.vec = *reinterpret_cast<const SrcVec*>(in_row + c);
      float v[kVec];
      to_float_vec(in.elems, v);
      if (has_scale) {
        const float s = job_scale(job, r, c);
#pragma unroll
        for (int i = 0; i < kVec; ++i) v[i] *= s;
      }
      Packed<Dst, kVec> out;
      from_float_vec(v, out.elems);
      *reinterpret_cast<typename VecOf<kVec * sizeof(Dst)>::type*>(out_row + c) = out.vec;
    } else {
      // Scalar path: ragged row tails and jobs whose pointers, strides or scale blocks do not
      // allow vector accesses.
      for (int i = 0; i < kVec && c + i < cols; ++i) {
        float v = to_float(in_row[c + i]);
        if (has_scale) v *= job_scale(job, r, c + i);
        out_row[c + i] = from_float<Dst>(v);
      }
    }
  }
}

// Same-dtype copies move bytes; no conversion, no scale.
__device__ __forceinline__ void copy_chunk(const TransformJob& job, uint32_t first_unit) {
  const uint8_t* __restrict__ src = static_cast<const uint8_t*>(job.src);
  uint8_t* __restrict__ dst = static_cast<uint8_t*>(job.dst);
  const uint32_t total_units = static_cast<uint32_t>(job.rows) * job.units_per_row.d;
  const uint32_t cols = static_cast<uint32_t>(job.cols);
#pragma unroll 1
  for (int g = 0; g < kUnitsPerThread; ++g) {
    const uint32_t u = first_unit + g * kThreads + threadIdx.x;
    if (u >= total_units) return;
    const uint32_t r = job.units_per_row.div(u);
    const uint32_t c = (u - r * job.units_per_row.d) * 16;
    const uint8_t* in_row = src + r * job.src_row_stride;
    uint8_t* out_row = dst + r * job.dst_row_stride;
    if ((job.flags & kVecOk) && c + 16 <= cols) {
      *reinterpret_cast<uint4*>(out_row + c) = *reinterpret_cast<const uint4*>(in_row + c);
    } else {
      for (int i = 0; i < 16 && c + i < cols; ++i) out_row[c + i] = in_row[c + i];
    }
  }
}

template <typename Src>
__device__ __forceinline__ void dispatch_dst(const TransformJob& job, uint32_t first_unit) {
  switch (job.dst_dtype) {
    case kBF16: transform_chunk<Src, __nv_bfloat16>(job, first_unit); break;
    case kF16: transform_chunk<Src, __half>(job, first_unit); break;
    case kF32: transform_chunk<Src, float>(job, first_unit); break;
    default: break;  // rejected by the launcher
  }
}

// The common kernel: byte copies and E4M3 -> BF16, the whole of a DeepSeek/Qwen FP8 or BF16
// layer; the host picks it when every job of a table is one of those, and the general kernel
// otherwise. One block a chunk (no persistent loop), two units a thread, and 2-D jobs cut into
// tiles of 32 rows x 16 units: short-lived blocks issue their loads at once, where a persistent
// grid-stride walk keeps fewer requests in flight (docs/decisions.md#common-kernel).
constexpr int kTileUnits = 16;  // units across a tile row; kThreads / kTileUnits rows a pass
constexpr int kCommonUnits = 2;  // units a thread: 32-row tiles (docs/decisions.md#common-kernel)

// kUnits units a thread: a tile is kUnits passes of 16 rows (32 or 64 rows).
template <int kUnits>
struct CommonShape {
  static constexpr int kTileRows = kThreads / kTileUnits * kUnits;
  static constexpr uint32_t kFlatChunkUnits = kThreads * kUnits;  // flat chunks (1-row, narrow jobs)
};

template <bool kCopy, int kUnits>
__device__ __forceinline__ void common_chunk(const TransformJob& job, uint32_t chunk) {
  using Shape = CommonShape<kUnits>;
  using Src = typename std::conditional<kCopy, uint8_t, e4m3_t>::type;
  using Dst = typename std::conditional<kCopy, uint8_t, __nv_bfloat16>::type;
  constexpr int kVec = kCopy ? 16 : vec_width<e4m3_t, __nv_bfloat16>();
  using SrcVec = typename VecOf<kVec * sizeof(Src)>::type;
  using DstVec = typename VecOf<kVec * sizeof(Dst)>::type;
  const Src* __restrict__ src = static_cast<const Src*>(job.src);
  Dst* __restrict__ dst = static_cast<Dst*>(job.dst);
  const uint32_t upr = job.units_per_row.d;
  const uint32_t rows = static_cast<uint32_t>(job.rows);
  const uint32_t cols = static_cast<uint32_t>(job.cols);
  const bool vec_ok = job.flags & kVecOk;
  uint32_t r[kUnits], c[kUnits];
  if (job.flags & kTiled) {
    const uint32_t tiles_per_row = (upr + kTileUnits - 1) / kTileUnits;  // one division a block
    const uint32_t tr = chunk / tiles_per_row;
    const uint32_t uc = (chunk - tr * tiles_per_row) * kTileUnits + (threadIdx.x % kTileUnits);
#pragma unroll
    for (int k = 0; k < kUnits; ++k) {
      r[k] = tr * Shape::kTileRows + threadIdx.x / kTileUnits + k * (kThreads / kTileUnits);
      c[k] = uc < upr && r[k] < rows ? uc * kVec : cols;  // cols: nothing to do
    }
  } else {
#pragma unroll
    for (int k = 0; k < kUnits; ++k) {
      const uint32_t u = chunk * Shape::kFlatChunkUnits + k * kThreads + threadIdx.x;
      r[k] = job.units_per_row.div(u);
      c[k] = r[k] < rows ? (u - r[k] * upr) * kVec : cols;
    }
  }
  // Every load before any store: kUnits independent accesses in flight a thread. The scales are
  // fetched in the same phase, so their latency hides under the data loads' instead of adding
  // to each block's lifetime.
  Packed<Src, kVec> in[kUnits];
  float scale[kUnits];
#pragma unroll
  for (int k = 0; k < kUnits; ++k) {
    scale[k] = 1.0f;
    if (vec_ok && c[k] + kVec <= cols) {
      in[k].vec = *reinterpret_cast<const SrcVec*>(src + r[k] * job.src_row_stride + c[k]);
      if (!kCopy && job.scale != nullptr) scale[k] = job_scale(job, r[k], c[k]);
    }
  }
#pragma unroll
  for (int k = 0; k < kUnits; ++k) {
    if (c[k] >= cols) continue;
    const Src* in_row = src + r[k] * job.src_row_stride;
    Dst* out_row = dst + r[k] * job.dst_row_stride;
    if (vec_ok && c[k] + kVec <= cols) {
      if constexpr (kCopy) {
        *reinterpret_cast<DstVec*>(out_row + c[k]) = in[k].vec;
      } else {
        float v[kVec];
        to_float_vec(in[k].elems, v);
        if (job.scale != nullptr) {
#pragma unroll
          for (int i = 0; i < kVec; ++i) v[i] *= scale[k];
        }
        Packed<Dst, kVec> out;
        from_float_vec(v, out.elems);
        *reinterpret_cast<DstVec*>(out_row + c[k]) = out.vec;
      }
    } else {  // ragged row tail, or a job whose pointers, strides or scale blocks forbid vectors
      for (uint32_t i = c[k]; i < c[k] + kVec && i < cols; ++i) {
        if constexpr (kCopy) {
          out_row[i] = in_row[i];
        } else {
          float v = to_float(in_row[i]);
          if (job.scale != nullptr) v *= job_scale(job, r[k], i);
          out_row[i] = from_float<Dst>(v);
        }
      }
    }
  }
}

// Chunks of a job in the common kernel: tiles for 2-D jobs at least a tile wide and tall.
template <int kUnits>
__host__ __device__ inline bool common_tiled(int64_t rows, uint32_t units_per_row) {
  return rows >= CommonShape<kUnits>::kTileRows && units_per_row >= kTileUnits;
}
template <int kUnits>
__host__ __device__ inline uint64_t common_chunks(int64_t rows, uint32_t units_per_row) {
  using Shape = CommonShape<kUnits>;
  if (common_tiled<kUnits>(rows, units_per_row))
    return uint64_t((rows + Shape::kTileRows - 1) / Shape::kTileRows) * ((units_per_row + kTileUnits - 1) / kTileUnits);
  return (uint64_t(rows) * units_per_row + Shape::kFlatChunkUnits - 1) / Shape::kFlatChunkUnits;
}

// The job a chunk belongs to: the last job whose first chunk is <= chunk. The first probe is the
// job a table of equal jobs (the experts of a layer) would give; only when it misses does a binary
// search follow, over the side it points to. Each probe is a dependent load from the parameter
// space, on every block's critical path before its first data load.
__device__ __forceinline__ int find_job(const TransformTable& table, uint32_t chunk) {
  const int n = table.num_jobs;
  const uint32_t total = table.chunk_start[n];
  int lo = 0, hi = n - 1;
  const int guess = static_cast<int>((static_cast<uint64_t>(chunk) * n) / total);
  if (table.chunk_start[guess] <= chunk) {
    if (guess == n - 1 || table.chunk_start[guess + 1] > chunk) return guess;
    lo = guess + 1;
  } else {
    hi = guess - 1;
  }
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (table.chunk_start[mid] <= chunk) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// Resident blocks an SM: the common kernel at 2 units a thread fits 32 registers (8 blocks), at
// 4 units 48 (5 blocks: at 6 it spilled); the general one, with every dtype path inlined and one
// load at a time, 40 registers (6 blocks).
template <int kUnits>
constexpr int common_blocks_per_sm() { return kUnits == 2 ? 8 : 5; }
constexpr int kAllBlocksPerSm = 6;

template <int kUnits>
__global__ void __launch_bounds__(kThreads, common_blocks_per_sm<kUnits>()) common_transform_kernel(const __grid_constant__ TransformTable table) {
  const uint32_t chunk = blockIdx.x;
  const int j = find_job(table, chunk);
  const TransformJob& job = table.jobs[j];
  if (job.src_dtype == kByte) common_chunk<true, kUnits>(job, chunk - table.chunk_start[j]);
  else common_chunk<false, kUnits>(job, chunk - table.chunk_start[j]);
}

__device__ __forceinline__ void run_chunk_all(const TransformJob& job, uint32_t first_unit) {
  switch (job.src_dtype) {
    case kByte: copy_chunk(job, first_unit); break;
    case kE4M3: dispatch_dst<e4m3_t>(job, first_unit); break;
    case kE5M2: dispatch_dst<e5m2_t>(job, first_unit); break;
    case kBF16: dispatch_dst<__nv_bfloat16>(job, first_unit); break;
    case kF16: dispatch_dst<__half>(job, first_unit); break;
    case kF32: dispatch_dst<float>(job, first_unit); break;
    default: break;
  }
}

// The general kernel: a persistent grid walks flat chunks of kChunkUnits.
__global__ void __launch_bounds__(kThreads, kAllBlocksPerSm) multi_tensor_transform_kernel(const __grid_constant__ TransformTable table) {
  const uint32_t total_chunks = table.chunk_start[table.num_jobs];
  for (uint32_t chunk = blockIdx.x; chunk < total_chunks; chunk += gridDim.x) {
    const int j = find_job(table, chunk);
    run_chunk_all(table.jobs[j], (chunk - table.chunk_start[j]) * kChunkUnits);
  }
}

}  // namespace pyloader
