// Kernel-shape experiment for the blockwise E4M3 -> BF16 dequant (issue 2): one large row-major
// tensor, fp32 128x128 block scales, each variant timed with CUDA events against the device copy
// ceiling measured in the same run, and checked bitwise against a scalar reference kernel.
// Standalone (no torch), so several shapes of kernel are compared in one short device run:
//
//   nvcc -O3 -std=c++17 -arch=sm_90 -o /tmp/dv bench/kernels/dequant_variants.cu && /tmp/dv [rows cols]
//
// Prints one JSON object a line (variant, gbps counting bytes read + written, fraction of copy).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#define CHECK(x)                                                                              \
  do {                                                                                        \
    cudaError_t e_ = (x);                                                                     \
    if (e_ != cudaSuccess) {                                                                  \
      fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_));      \
      exit(1);                                                                                \
    }                                                                                         \
  } while (0)

constexpr int kBlock = 128;  // scale block, rows and columns

struct Div {  // n / d by multiply-shift (as csrc/common.cuh FastDiv)
  uint32_t d, m, s;
  static Div make(uint32_t d) {
    uint32_t s = 0;
    while ((uint64_t(1) << s) < d) ++s;
    const uint64_t big = ((uint64_t(1) << (32 + s)) + d - 1) / d;
    return Div{d, uint32_t(big - (uint64_t(1) << 32)), s};
  }
  __device__ __forceinline__ uint32_t div(uint32_t n) const {
    return uint32_t((uint64_t(__umulhi(n, m)) + n) >> s);
  }
};

__device__ __forceinline__ uint4 convert8(uint2 in, float s) {  // 8 e4m3 -> 8 bf16, scaled, RN
  uint32_t w[2] = {in.x, in.y};
  uint32_t out[4];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
#pragma unroll
    for (int p = 0; p < 2; ++p) {
      const __nv_fp8x2_storage_t pair = static_cast<__nv_fp8x2_storage_t>((w[h] >> (16 * p)) & 0xFFFF);
      const float2 f = __half22float2(__half2(__nv_cvt_fp8x2_to_halfraw2(pair, __NV_E4M3)));
      const __nv_bfloat162 b = __floats2bfloat162_rn(f.x * s, f.y * s);
      out[h * 2 + p] = *reinterpret_cast<const uint32_t*>(&b);
    }
  }
  return make_uint4(out[0], out[1], out[2], out[3]);
}

// Reference: one element a thread.
__global__ void reference_kernel(const uint8_t* src, const float* scale, __nv_bfloat16* dst, int rows, int cols,
                                 int scols) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= int64_t(rows) * cols) return;
  const int r = int(i / cols), c = int(i % cols);
  const float v = __half2float(__half(__nv_cvt_fp8_to_halfraw(src[i], __NV_E4M3)));
  dst[i] = __float2bfloat16_rn(v * scale[(r / kBlock) * scols + c / kBlock]);
}

// Flat: units of 8 elements walked grid-stride, K units a thread loaded before any store
// (the shape of the shipped kernel, without the job table).
template <int K, bool kStreaming>
__global__ void __launch_bounds__(256) flat_kernel(const uint8_t* src, const float* scale, __nv_bfloat16* dst,
                                                   uint32_t total_units, Div units_per_row, int scols) {
  const uint32_t stride = gridDim.x * blockDim.x * K;
  for (uint32_t base = blockIdx.x * blockDim.x * K + threadIdx.x; base < total_units; base += stride) {
    uint2 in[K];
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const uint32_t u = base + k * blockDim.x;
      if (u < total_units) in[k] = kStreaming ? __ldcs(reinterpret_cast<const uint2*>(src) + u)
                                              : __ldg(reinterpret_cast<const uint2*>(src) + u);
    }
#pragma unroll
    for (int k = 0; k < K; ++k) {
      const uint32_t u = base + k * blockDim.x;
      if (u >= total_units) break;
      const uint32_t r = units_per_row.div(u);
      const uint32_t c = (u - r * units_per_row.d) * 8;
      const float s = __ldg(scale + (r / kBlock) * scols + c / kBlock);
      const uint4 o = convert8(in[k], s);
      if (kStreaming) __stcs(reinterpret_cast<uint4*>(dst) + u, o);
      else reinterpret_cast<uint4*>(dst)[u] = o;
    }
  }
}

// Tile: a block owns kRows rows x 128 columns of one scale block; 16 threads a row, 8 bytes each,
// every load of the tile issued before any store; the scale read once (uniform).
template <int kRows, bool kStreaming>
__global__ void __launch_bounds__(256) tile_kernel(const uint8_t* src, const float* scale, __nv_bfloat16* dst,
                                                   int rows, int cols, int scols, int tiles_per_row_block) {
  constexpr int kPasses = kRows / 16;
  const int tile = blockIdx.x;
  const int col_block = tile % scols;
  const int row_tile = tile / scols;
  const int r0 = row_tile * kRows;
  const int c = col_block * kBlock + (threadIdx.x & 15) * 8;
  const int rr = threadIdx.x >> 4;
  const float s = __ldg(scale + (r0 / kBlock) * scols + col_block);
  uint2 in[kPasses];
#pragma unroll
  for (int p = 0; p < kPasses; ++p) {
    const int r = r0 + rr + p * 16;
    if (r < rows && c < cols) {
      const uint2* a = reinterpret_cast<const uint2*>(src + int64_t(r) * cols + c);
      in[p] = kStreaming ? __ldcs(a) : __ldg(a);
    }
  }
#pragma unroll
  for (int p = 0; p < kPasses; ++p) {
    const int r = r0 + rr + p * 16;
    if (r < rows && c < cols) {
      uint4* o = reinterpret_cast<uint4*>(dst + int64_t(r) * cols + c);
      const uint4 v = convert8(in[p], s);
      if (kStreaming) __stcs(o, v);
      else *o = v;
    }
  }
}

// Tile, persistent: the grid walks the tiles; the next tile's loads are issued before the
// current tile's stores (double buffer in registers).
template <int kRows>
__global__ void __launch_bounds__(256) tile_persistent_kernel(const uint8_t* src, const float* scale,
                                                              __nv_bfloat16* dst, int rows, int cols, int scols,
                                                              int num_tiles) {
  constexpr int kPasses = kRows / 16;
  const int cc = (threadIdx.x & 15) * 8;
  const int rr = threadIdx.x >> 4;
  uint2 in[kPasses];
  int tile = blockIdx.x;
  auto load = [&](int t) {
    const int r0 = (t / scols) * kRows, c = (t % scols) * kBlock + cc;
#pragma unroll
    for (int p = 0; p < kPasses; ++p) {
      const int r = r0 + rr + p * 16;
      if (r < rows && c < cols) in[p] = __ldg(reinterpret_cast<const uint2*>(src + int64_t(r) * cols + c));
    }
  };
  if (tile < num_tiles) load(tile);
  for (; tile < num_tiles; tile += gridDim.x) {
    const int r0 = (tile / scols) * kRows, cb = tile % scols, c = cb * kBlock + cc;
    const float s = __ldg(scale + (r0 / kBlock) * scols + cb);
    uint4 out[kPasses];
#pragma unroll
    for (int p = 0; p < kPasses; ++p) out[p] = convert8(in[p], s);
    if (tile + int(gridDim.x) < num_tiles) load(tile + gridDim.x);
#pragma unroll
    for (int p = 0; p < kPasses; ++p) {
      const int r = r0 + rr + p * 16;
      if (r < rows && c < cols) *reinterpret_cast<uint4*>(dst + int64_t(r) * cols + c) = out[p];
    }
  }
}

__global__ void write_only_kernel(uint4* dst, size_t n16) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n16; i += size_t(gridDim.x) * blockDim.x)
    dst[i] = make_uint4(i, 0, 0, 0);
}

__global__ void copy_kernel(const uint4* src, uint4* dst, size_t n16) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n16; i += size_t(gridDim.x) * blockDim.x)
    dst[i] = __ldg(src + i);
}

// Copy with K 16-byte loads a thread in flight (the copy path of the shipped kernel, no table).
template <int K>
__global__ void __launch_bounds__(256) copy_k_kernel(const uint4* src, uint4* dst, size_t n16) {
  const size_t stride = size_t(gridDim.x) * blockDim.x * K;
  for (size_t base = blockIdx.x * size_t(blockDim.x) * K + threadIdx.x; base < n16; base += stride) {
    uint4 v[K];
#pragma unroll
    for (int k = 0; k < K; ++k)
      if (base + k * blockDim.x < n16) v[k] = __ldg(src + base + k * blockDim.x);
#pragma unroll
    for (int k = 0; k < K; ++k)
      if (base + k * blockDim.x < n16) dst[base + k * blockDim.x] = v[k];
  }
}

template <typename F>
float time_ms(F&& launch, int iters = 20) {
  cudaEvent_t a, b;
  CHECK(cudaEventCreate(&a));
  CHECK(cudaEventCreate(&b));
  for (int i = 0; i < 3; ++i) launch();
  CHECK(cudaGetLastError());
  std::vector<float> t;
  for (int i = 0; i < iters; ++i) {
    CHECK(cudaEventRecord(a));
    launch();
    CHECK(cudaEventRecord(b));
    CHECK(cudaEventSynchronize(b));
    float ms;
    CHECK(cudaEventElapsedTime(&ms, a, b));
    t.push_back(ms);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

int main(int argc, char** argv) {
  const int rows = argc > 2 ? atoi(argv[1]) : 16384, cols = argc > 2 ? atoi(argv[2]) : 16384;
  if (cols % 128) {
    fprintf(stderr, "cols must be a multiple of 128 here\n");
    return 2;
  }
  const int srows = (rows + kBlock - 1) / kBlock, scols = cols / kBlock;
  const size_t n = size_t(rows) * cols;
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  uint8_t* src;
  float* scale;
  __nv_bfloat16 *ref, *out;
  CHECK(cudaMalloc(&src, n));
  CHECK(cudaMalloc(&scale, size_t(srows) * scols * 4));
  CHECK(cudaMalloc(&ref, n * 2));
  CHECK(cudaMalloc(&out, n * 2));
  {
    std::vector<uint8_t> h(n);
    uint32_t x = 12345;
    for (size_t i = 0; i < n; ++i) {
      x = x * 1664525u + 1013904223u;
      h[i] = uint8_t(x >> 24);
    }
    CHECK(cudaMemcpy(src, h.data(), n, cudaMemcpyHostToDevice));
    std::vector<float> hs(size_t(srows) * scols);
    for (size_t i = 0; i < hs.size(); ++i) hs[i] = 0.5f + float(i % 97) / 61.0f;
    CHECK(cudaMemcpy(scale, hs.data(), hs.size() * 4, cudaMemcpyHostToDevice));
  }
  reference_kernel<<<(n + 255) / 256, 256>>>(src, scale, ref, rows, cols, scols);
  CHECK(cudaDeviceSynchronize());
  std::vector<uint16_t> href(n), hout(n);
  CHECK(cudaMemcpy(href.data(), ref, n * 2, cudaMemcpyDeviceToHost));

  const double moved = double(n) * 3;  // 1 byte read + 2 written an element
  const float copy_ms = time_ms([&] { CHECK(cudaMemcpyAsync(out, ref, n * 2, cudaMemcpyDeviceToDevice)); });
  const double copy_gbps = 2.0 * n * 2 / (copy_ms * 1e6);
  printf("{\"device\": \"%s\", \"rows\": %d, \"cols\": %d, \"variant\": \"cudaMemcpy D2D (ceiling)\", \"gbps\": %.1f}\n",
         prop.name, rows, cols, copy_gbps);
  auto report = [&](const char* name, float ms, bool check) {
    bool ok = true;
    if (check) {
      CHECK(cudaMemcpy(hout.data(), out, n * 2, cudaMemcpyDeviceToHost));
      ok = memcmp(hout.data(), href.data(), n * 2) == 0;
    }
    const double gbps = moved / (ms * 1e6);
    printf("{\"device\": \"%s\", \"rows\": %d, \"cols\": %d, \"variant\": \"%s\", \"gbps\": %.1f, \"fraction\": %.3f, "
           "\"bitwise\": %s}\n", prop.name, rows, cols, name, gbps, gbps / copy_gbps, check ? (ok ? "true" : "false") : "null");
    fflush(stdout);
  };
  const size_t n16 = n * 2 / 16;
  report("copy kernel (16 B a thread, bf16 bytes)",
         time_ms([&] { copy_kernel<<<sms * 8, 256>>>(reinterpret_cast<uint4*>(ref), reinterpret_cast<uint4*>(out), n16); }) *
             float(moved / (4.0 * n)), false);
  report("copy kernel K=4, 4 blocks/SM",
         time_ms([&] { copy_k_kernel<4><<<sms * 4, 256>>>(reinterpret_cast<uint4*>(ref), reinterpret_cast<uint4*>(out), n16); }) *
             float(moved / (4.0 * n)), false);
  report("copy kernel K=4, 8 blocks/SM",
         time_ms([&] { copy_k_kernel<4><<<sms * 8, 256>>>(reinterpret_cast<uint4*>(ref), reinterpret_cast<uint4*>(out), n16); }) *
             float(moved / (4.0 * n)), false);
  report("copy kernel K=2, 8 blocks/SM",
         time_ms([&] { copy_k_kernel<2><<<sms * 8, 256>>>(reinterpret_cast<uint4*>(ref), reinterpret_cast<uint4*>(out), n16); }) *
             float(moved / (4.0 * n)), false);
  report("write-only kernel (scaled to 3 B an element)",
         time_ms([&] { write_only_kernel<<<sms * 8, 256>>>(reinterpret_cast<uint4*>(out), n16); }) * 1.5f, false);

  const uint32_t units = uint32_t(n / 8);
  const Div upr = Div::make(cols / 8);
  auto flat = [&](auto kern, const char* name, int blocks_per_sm) {
    CHECK(cudaMemset(out, 0xFF, n * 2));
    report(name, time_ms([&] { kern<<<sms * blocks_per_sm, 256>>>(src, scale, out, units, upr, scols); }), true);
  };
  flat(flat_kernel<1, false>, "flat K=1 (8 blocks/SM)", 8);
  flat(flat_kernel<2, false>, "flat K=2", 8);
  flat(flat_kernel<4, false>, "flat K=4 (shipped shape)", 4);
  flat(flat_kernel<4, false>, "flat K=4, 8 blocks/SM", 8);
  flat(flat_kernel<8, false>, "flat K=8", 4);
  flat(flat_kernel<4, true>, "flat K=4 streaming ld.cs/st.cs", 4);

  auto tiles = [&](auto kern, int k_rows, const char* name) {
    CHECK(cudaMemset(out, 0xFF, n * 2));
    const int ntiles = ((rows + k_rows - 1) / k_rows) * scols;
    report(name, time_ms([&] { kern<<<ntiles, 256>>>(src, scale, out, rows, cols, scols, 0); }), true);
  };
  tiles(tile_kernel<32, false>, 32, "tile 32x128 (2 loads a thread)");
  tiles(tile_kernel<64, false>, 64, "tile 64x128 (4 loads)");
  tiles(tile_kernel<128, false>, 128, "tile 128x128 (8 loads)");
  tiles(tile_kernel<128, true>, 128, "tile 128x128 streaming");

  auto persistent = [&](auto kern, int k_rows, int per_sm, const char* name) {
    CHECK(cudaMemset(out, 0xFF, n * 2));
    const int ntiles = ((rows + k_rows - 1) / k_rows) * scols;
    report(name, time_ms([&] { kern<<<sms * per_sm, 256>>>(src, scale, out, rows, cols, scols, ntiles); }), true);
  };
  persistent(tile_persistent_kernel<64>, 64, 4, "persistent tile 64x128, 4 blocks/SM, prefetch");
  persistent(tile_persistent_kernel<64>, 64, 8, "persistent tile 64x128, 8 blocks/SM, prefetch");
  persistent(tile_persistent_kernel<32>, 32, 8, "persistent tile 32x128, 8 blocks/SM, prefetch");
  return 0;
}
