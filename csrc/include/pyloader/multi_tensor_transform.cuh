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
  const float* global;     // nullptr: no second-level scale
  uint32_t* amax;          // nullptr: no gate; else [max |out| bits, max |source| bits]
  FastDiv units_per_row;   // ceil(cols / vector width of the dtype pair)
  FastDiv block_rows_div;
  FastDiv block_cols_div;
  uint8_t src_dtype;
  uint8_t dst_dtype;
  uint8_t scale_dtype;
  uint8_t flags;           // kVecOk | kTiled | kDivideGlobal
};

constexpr uint8_t kVecOk = 1;  // aligned for vector accesses, vectors never straddle a scale block
constexpr uint8_t kTiled = 2;  // common kernel: chunks are tiles of 16-unit rows (else flat runs of units)
constexpr uint8_t kDivideGlobal = 4;  // block scale / global (compressed-tensors NVFP4), else * global

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

// Packed sources move 8 values (4 bytes) a unit: a 16-byte store of bf16/fp16, two of fp32.
constexpr int kPackedVec = 8;

// Host-side mirror of vec_width for dtype codes (byte copies move 16 bytes per unit).
inline int vec_width_of(int32_t src, int32_t dst) {
  if (is_packed(src)) return kPackedVec;
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
// The second-level scale applies to the block scale first (s * g or s / g, one rounding), then
// the product with the value: the order of compressed-tensors' and ModelOpt's own dequant.
// kGlobal = false: the caller's jobs have none (the plain common kernel: no registers spent on it).
template <bool kGlobal = true>
__device__ __forceinline__ float job_scale(const TransformJob& job, uint32_t r, uint32_t c) {
  const uint32_t sr = job.block_rows_div.div(r + static_cast<uint32_t>(job.r0));
  const uint32_t sc = job.block_cols_div.div(c + static_cast<uint32_t>(job.c0));
  float s = load_scale(job.scale, job.scale_dtype,
                       static_cast<int64_t>(sr) * job.scale_row_stride + static_cast<int64_t>(sc) * job.scale_col_stride);
  if (kGlobal && job.global != nullptr) {
    const float g = __ldg(job.global);
    s = (job.flags & kDivideGlobal) ? __fdiv_rn(s, g) : __fmul_rn(s, g);
  }
  return s;
}

// Stores of 8 converted values (one 16-byte access for 2-byte outputs, two for fp32).
template <typename Dst>
__device__ __forceinline__ void store8(Dst* out, const float (&v)[8]) {
  Packed<Dst, 8> p;
  from_float_vec(v, p.elems);
  *reinterpret_cast<uint4*>(out) = p.vec;
}
template <>
__device__ __forceinline__ void store8<float>(float* out, const float (&v)[8]) {
  reinterpret_cast<float4*>(out)[0] = make_float4(v[0], v[1], v[2], v[3]);
  reinterpret_cast<float4*>(out)[1] = make_float4(v[4], v[5], v[6], v[7]);
}

// The gate's per-thread maxima (bits of |x|), published once a block (gate_publish).
struct GateMax {
  uint32_t out = 0, src = 0;
  __device__ __forceinline__ void add(float decoded, float result) {
    src = max(src, abs_bits(decoded));
    out = max(out, abs_bits(result));
  }
};

// Block maximum of every thread's GateMax, one atomicMax pair a block. Every thread of the block
// must call it (it synchronizes), and the block's chunk must belong to one job.
__device__ __forceinline__ void gate_publish(GateMax m, uint32_t* slot) {
  __shared__ uint32_t warp_max[2][kThreads / 32];
#pragma unroll
  for (int d = 16; d > 0; d >>= 1) {
    m.out = max(m.out, __shfl_xor_sync(0xFFFFFFFFu, m.out, d));
    m.src = max(m.src, __shfl_xor_sync(0xFFFFFFFFu, m.src, d));
  }
  const int warp = threadIdx.x / 32;
  if ((threadIdx.x & 31) == 0) {
    warp_max[0][warp] = m.out;
    warp_max[1][warp] = m.src;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    uint32_t o = 0, s = 0;
#pragma unroll
    for (int w = 0; w < kThreads / 32; ++w) {
      o = max(o, warp_max[0][w]);
      s = max(s, warp_max[1][w]);
    }
    atomicMax(slot, o);
    atomicMax(slot + 1, s);
  }
  __syncthreads();  // warp_max is reused by the block's next chunk
}

// How the general kernel reads a source and writes a destination, per dtype pair: kVec values a
// unit, a vector load and store of them, and the scalar forms for ragged tails.
template <typename Src, typename Dst>
struct ValueIO {
  static constexpr int kVec = vec_width<Src, Dst>();
  using Elem = Src;  // row strides count these
  __device__ static __forceinline__ void load(const Src* row, uint32_t c, float (&v)[kVec]) {
    Packed<Src, kVec> in;
    in.vec = *reinterpret_cast<const typename VecOf<kVec * sizeof(Src)>::type*>(row + c);
    to_float_vec(in.elems, v);
  }
  __device__ static __forceinline__ float one(const Src* row, uint32_t c) { return to_float(row[c]); }
  __device__ static __forceinline__ void store(Dst* out, const float (&v)[kVec]) {
    Packed<Dst, kVec> p;
    from_float_vec(v, p.elems);
    *reinterpret_cast<typename VecOf<kVec * sizeof(Dst)>::type*>(out) = p.vec;
  }
};

// Packed nibble sources (E2M1, INT4): 8 values, 4 source bytes, a unit; row strides in bytes.
template <bool kInt4, typename Dst>
struct NibbleIO {
  static constexpr int kVec = kPackedVec;
  using Elem = uint8_t;
  __device__ static __forceinline__ void load(const uint8_t* row, uint32_t c, float (&v)[kVec]) {
    nibbles_to_float8<kInt4>(*reinterpret_cast<const uint32_t*>(row + c / 2), v);
  }
  __device__ static __forceinline__ float one(const uint8_t* row, uint32_t c) { return nibble_at<kInt4>(row, c); }
  __device__ static __forceinline__ void store(Dst* out, const float (&v)[kVec]) { store8(out, v); }
};

// One chunk of one job in the general kernel: each thread handles kUnitsPerThread units, one at a
// time (with every dtype pair inlined, registers allow no more in flight).
template <typename IO, typename Dst>
__device__ __forceinline__ void transform_chunk(const TransformJob& job, uint32_t first_unit, GateMax& gate) {
  constexpr int kVec = IO::kVec;
  using Elem = typename IO::Elem;
  const Elem* __restrict__ src = static_cast<const Elem*>(job.src);
  Dst* __restrict__ dst = static_cast<Dst*>(job.dst);
  const uint32_t total_units = static_cast<uint32_t>(job.rows) * job.units_per_row.d;
  const uint32_t cols = static_cast<uint32_t>(job.cols);
  const bool has_scale = job.scale != nullptr;
  const bool gated = job.amax != nullptr;
#pragma unroll 1
  for (int g = 0; g < kUnitsPerThread; ++g) {
    const uint32_t u = first_unit + g * kThreads + threadIdx.x;
    if (u >= total_units) return;
    const uint32_t r = job.units_per_row.div(u);
    const uint32_t c = (u - r * job.units_per_row.d) * kVec;
    const Elem* in_row = src + r * job.src_row_stride;
    Dst* out_row = dst + r * job.dst_row_stride;
    if ((job.flags & kVecOk) && c + kVec <= cols) {
      float v[kVec];
      IO::load(in_row, c, v);
      const float s = has_scale ? job_scale(job, r, c) : 1.0f;
#pragma unroll
      for (int i = 0; i < kVec; ++i) {
        const float x = v[i];
        if (has_scale) v[i] *= s;
        if (gated) gate.add(x, v[i]);
      }
      IO::store(out_row + c, v);
    } else {
      // Scalar path: ragged row tails and jobs whose pointers, strides or scale blocks do not
      // allow vector accesses.
      for (uint32_t i = c; i < c + kVec && i < cols; ++i) {
        const float x = IO::one(in_row, i);
        const float v = has_scale ? x * job_scale(job, r, i) : x;
        if (gated) gate.add(x, v);
        out_row[i] = from_float<Dst>(v);
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

template <template <typename> class IOFor>
__device__ __forceinline__ void dispatch_dst(const TransformJob& job, uint32_t first_unit, GateMax& gate) {
  switch (job.dst_dtype) {
    case kBF16: transform_chunk<IOFor<__nv_bfloat16>, __nv_bfloat16>(job, first_unit, gate); break;
    case kF16: transform_chunk<IOFor<__half>, __half>(job, first_unit, gate); break;
    case kF32: transform_chunk<IOFor<float>, float>(job, first_unit, gate); break;
    default: break;  // rejected by the launcher
  }
}
template <typename Src> struct ValueFrom { template <typename Dst> using IO = ValueIO<Src, Dst>; };
template <bool kInt4> struct NibblesFrom { template <typename Dst> using IO = NibbleIO<kInt4, Dst>; };

// The common kernel: byte copies and E4M3 -> BF16, the whole of a DeepSeek/Qwen FP8 or BF16
// layer; the host picks it when every job of a table is one of those, and the general kernel
// otherwise. One block a chunk (no persistent loop), two units a thread, and 2-D jobs cut into
// tiles of 32 rows x 16 units: short-lived blocks issue their loads at once, where a persistent
// grid-stride walk keeps fewer requests in flight (docs/decisions.md#common-kernel). Its wide
// variant (kWide) adds packed E2M1/INT4 -> BF16 and the gate: the plain one stays as it was.
constexpr int kTileUnits = 16;  // units across a tile row; kThreads / kTileUnits rows a pass
constexpr int kCommonUnits = 2;  // units a thread: 32-row tiles (docs/decisions.md#common-kernel)

// kUnits units a thread: a tile is kUnits passes of 16 rows (32 or 64 rows).
template <int kUnits>
struct CommonShape {
  static constexpr int kTileRows = kThreads / kTileUnits * kUnits;
  static constexpr uint32_t kFlatChunkUnits = kThreads * kUnits;  // flat chunks (1-row, narrow jobs)
};

// What a common-kernel job does with its bytes; every kind's unit is 8 values (16 bytes for copies).
enum CommonKind : int { kKindCopy, kKindE4M3, kKindE2M1, kKindI4 };

template <int kKind>
struct CommonIO {
  static constexpr bool kCopy = kKind == kKindCopy;
  static constexpr bool kPacked = kKind == kKindE2M1 || kKind == kKindI4;
  static constexpr int kVec = kCopy ? 16 : 8;                           // values a unit
  static constexpr int kSrcBytes = kCopy ? 16 : (kPacked ? 4 : 8);      // source bytes a unit
  using SrcVec = typename VecOf<kSrcBytes>::type;
  __device__ static __forceinline__ uint32_t src_offset(uint32_t c) { return kPacked ? c / 2 : c; }
  __device__ static __forceinline__ void decode(const SrcVec& raw, float (&v)[8]) {
    if constexpr (kPacked) {
      nibbles_to_float8<kKind == kKindI4>(raw, v);
    } else {
      Packed<e4m3_t, 8> in;
      in.vec = raw;
      to_float_vec(in.elems, v);
    }
  }
  __device__ static __forceinline__ float decode_one(const uint8_t* row, uint32_t c) {
    if constexpr (kPacked) return nibble_at<kKind == kKindI4>(row, c);
    else return to_float(e4m3_t{row[c]});
  }
};

template <int kKind, int kUnits, bool kWide>
__device__ __forceinline__ void common_chunk(const TransformJob& job, uint32_t chunk, GateMax& gate) {
  using Shape = CommonShape<kUnits>;
  using IO = CommonIO<kKind>;
  constexpr int kVec = IO::kVec;
  using SrcVec = typename IO::SrcVec;
  // Every common-kernel source has 1-byte storage (packed: two values a byte), so its row
  // stride in elements is its row stride in bytes.
  const uint8_t* __restrict__ src = static_cast<const uint8_t*>(job.src);
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
  SrcVec in[kUnits];
  float scale[kUnits];
#pragma unroll
  for (int k = 0; k < kUnits; ++k) {
    scale[k] = 1.0f;
    if (vec_ok && c[k] + kVec <= cols) {
      in[k] = *reinterpret_cast<const SrcVec*>(src + r[k] * job.src_row_stride + IO::src_offset(c[k]));
      if (!IO::kCopy && job.scale != nullptr) scale[k] = job_scale<kWide>(job, r[k], c[k]);
    }
  }
#pragma unroll
  for (int k = 0; k < kUnits; ++k) {
    if (c[k] >= cols) continue;
    const uint8_t* in_row = src + r[k] * job.src_row_stride;
    if constexpr (IO::kCopy) {
      uint8_t* out_row = static_cast<uint8_t*>(job.dst) + r[k] * job.dst_row_stride;
      if (vec_ok && c[k] + kVec <= cols) {
        *reinterpret_cast<uint4*>(out_row + c[k]) = in[k];
      } else {  // ragged row tail, or a job whose pointers or strides forbid vectors
        for (uint32_t i = c[k]; i < c[k] + kVec && i < cols; ++i) out_row[i] = in_row[i];
      }
    } else {
      __nv_bfloat16* out_row = static_cast<__nv_bfloat16*>(job.dst) + r[k] * job.dst_row_stride;
      if (vec_ok && c[k] + kVec <= cols) {
        float v[kVec];
        IO::decode(in[k], v);
#pragma unroll
        for (int i = 0; i < kVec; ++i) {
          const float x = v[i];
          if (job.scale != nullptr) v[i] *= scale[k];
          if (kWide) gate.add(x, v[i]);
        }
        store8(out_row + c[k], v);
      } else {  // ragged row tail, or a job whose pointers, strides or scale blocks forbid vectors
        for (uint32_t i = c[k]; i < c[k] + kVec && i < cols; ++i) {
          const float x = IO::decode_one(in_row, i);
          const float v = job.scale != nullptr ? x * job_scale<kWide>(job, r[k], i) : x;
          if (kWide) gate.add(x, v);
          out_row[i] = from_float<__nv_bfloat16>(v);
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

__device__ __forceinline__ int find_job(const TransformTable& table, uint32_t chunk) {
  return job_of(table.chunk_start, table.num_jobs, chunk);
}

// Resident blocks an SM: the common kernel at 2 units a thread fits 32 registers (8 blocks), at
// 4 units 48 (5 blocks: at 6 it spilled); its wide variant and the general kernel (every dtype
// path inlined, one load at a time) 40 registers (6 blocks).
template <int kUnits, bool kWide>
constexpr int common_blocks_per_sm() { return kWide ? 6 : (kUnits == 2 ? 8 : 5); }
constexpr int kAllBlocksPerSm = 6;

template <int kUnits, bool kWide>
__global__ void __launch_bounds__(kThreads, common_blocks_per_sm<kUnits, kWide>()) common_transform_kernel(const __grid_constant__ TransformTable table) {
  const uint32_t chunk = blockIdx.x;
  const int j = find_job(table, chunk);
  const TransformJob& job = table.jobs[j];
  const uint32_t local = chunk - table.chunk_start[j];
  GateMax gate;
  if constexpr (kWide) {
    switch (job.src_dtype) {
      case kByte: common_chunk<kKindCopy, kUnits, true>(job, local, gate); break;
      case kE4M3: common_chunk<kKindE4M3, kUnits, true>(job, local, gate); break;
      case kE2M1: common_chunk<kKindE2M1, kUnits, true>(job, local, gate); break;
      case kI4: common_chunk<kKindI4, kUnits, true>(job, local, gate); break;
      default: break;
    }
    if (job.amax != nullptr) gate_publish(gate, job.amax);  // uniform: the block's one job
  } else {
    if (job.src_dtype == kByte) common_chunk<kKindCopy, kUnits, false>(job, local, gate);
    else common_chunk<kKindE4M3, kUnits, false>(job, local, gate);
  }
}

__device__ __forceinline__ void run_chunk_all(const TransformJob& job, uint32_t first_unit, GateMax& gate) {
  switch (job.src_dtype) {
    case kByte: copy_chunk(job, first_unit); break;
    case kE4M3: dispatch_dst<ValueFrom<e4m3_t>::IO>(job, first_unit, gate); break;
    case kE5M2: dispatch_dst<ValueFrom<e5m2_t>::IO>(job, first_unit, gate); break;
    case kBF16: dispatch_dst<ValueFrom<__nv_bfloat16>::IO>(job, first_unit, gate); break;
    case kF16: dispatch_dst<ValueFrom<__half>::IO>(job, first_unit, gate); break;
    case kF32: dispatch_dst<ValueFrom<float>::IO>(job, first_unit, gate); break;
    case kE2M1: dispatch_dst<NibblesFrom<false>::IO>(job, first_unit, gate); break;
    case kI4: dispatch_dst<NibblesFrom<true>::IO>(job, first_unit, gate); break;
    default: break;
  }
}

// The general kernel: a persistent grid walks flat chunks of kChunkUnits.
__global__ void __launch_bounds__(kThreads, kAllBlocksPerSm) multi_tensor_transform_kernel(const __grid_constant__ TransformTable table) {
  const uint32_t total_chunks = table.chunk_start[table.num_jobs];
  for (uint32_t chunk = blockIdx.x; chunk < total_chunks; chunk += gridDim.x) {
    const int j = find_job(table, chunk);
    GateMax gate;
    run_chunk_all(table.jobs[j], (chunk - table.chunk_start[j]) * kChunkUnits, gate);
    if (table.jobs[j].amax != nullptr) gate_publish(gate, table.jobs[j].amax);  // uniform: the chunk's one job
  }
}

}  // namespace pyloader
