// Device helpers shared by the LNSR kernels: fp32 access to fp32/bf16/fp16 rows (vectorised where the
// row allows it), Gaussian draws from Philox, and block-wide sums that every thread of the block receives
// bit-identically.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <c10/util/Exception.h>
#include <ATen/core/PhiloxRNGEngine.h>  // after c10/util/Exception.h, which it uses without including

#include "lnsr_kernels.h"

namespace lnsr {

__device__ __forceinline__ float half_bits_to_float(uint16_t bits, DType dt) {
  return dt == DType::bf16 ? __uint_as_float(uint32_t(bits) << 16) : __half2float(__ushort_as_half(bits));
}

// Round to nearest even, as torch's .to(dtype) does.
__device__ __forceinline__ uint16_t float_to_half_bits(float v, DType dt) {
  return dt == DType::bf16 ? __bfloat16_as_ushort(__float2bfloat16_rn(v)) : __half_as_ushort(__float2half_rn(v));
}

__device__ __forceinline__ float load_scalar(const void* base, int64_t i, DType dt) {
  return dt == DType::f32 ? static_cast<const float*>(base)[i]
                          : half_bits_to_float(static_cast<const uint16_t*>(base)[i], dt);
}

__device__ __forceinline__ void store_scalar(void* base, int64_t i, DType dt, float v) {
  if (dt == DType::f32) static_cast<float*>(base)[i] = v;
  else static_cast<uint16_t*>(base)[i] = float_to_half_bits(v, dt);
}

// N = 4 or 8 consecutive elements from element i, which must be N-element aligned: N / 4 16-byte
// accesses for fp32; one access of 2N bytes for bf16 / fp16.
template <int N>
__device__ __forceinline__ void load_vec(const void* base, int64_t i, DType dt, float (&out)[N]) {
  static_assert(N == 4 || N == 8, "load_vec reads 4 or 8 elements");
  if (dt == DType::f32) {
    const float4* p = reinterpret_cast<const float4*>(static_cast<const float*>(base) + i);
#pragma unroll
    for (int q = 0; q < N / 4; ++q) {
      const float4 f = p[q];
      out[4 * q] = f.x, out[4 * q + 1] = f.y, out[4 * q + 2] = f.z, out[4 * q + 3] = f.w;
    }
  } else {
    using Raw = typename std::conditional<N == 8, uint4, uint2>::type;
    const Raw raw = *reinterpret_cast<const Raw*>(static_cast<const uint16_t*>(base) + i);
    uint32_t words[N / 2];
    memcpy(words, &raw, sizeof(raw));
#pragma unroll
    for (int w = 0; w < N / 2; ++w) {
      out[2 * w] = half_bits_to_float(uint16_t(words[w] & 0xffffu), dt);
      out[2 * w + 1] = half_bits_to_float(uint16_t(words[w] >> 16), dt);
    }
  }
}

template <int N>
__device__ __forceinline__ void store_vec(void* base, int64_t i, DType dt, const float (&v)[N]) {
  static_assert(N == 4 || N == 8, "store_vec writes 4 or 8 elements");
  if (dt == DType::f32) {
    float4* p = reinterpret_cast<float4*>(static_cast<float*>(base) + i);
#pragma unroll
    for (int q = 0; q < N / 4; ++q) p[q] = make_float4(v[4 * q], v[4 * q + 1], v[4 * q + 2], v[4 * q + 3]);
  } else {
    uint32_t words[N / 2];
#pragma unroll
    for (int w = 0; w < N / 2; ++w)
      words[w] = uint32_t(float_to_half_bits(v[2 * w], dt)) | (uint32_t(float_to_half_bits(v[2 * w + 1], dt)) << 16);
    using Raw = typename std::conditional<N == 8, uint4, uint2>::type;
    Raw raw;
    memcpy(&raw, words, sizeof(raw));
    *reinterpret_cast<Raw*>(static_cast<uint16_t*>(base) + i) = raw;
  }
}

// Elements [i, i + 4) of the row starting at element `row` of base, 0 past d: one access when `vec` (d a
// multiple of 4 and base aligned for it), else element by element.
__device__ __forceinline__ void load4(const void* base, int64_t row, int64_t i, int64_t d, DType dt, bool vec,
                                      float (&out)[4]) {
  if (vec && i < d) {
    load_vec<4>(base, row + i, dt, out);
  } else {
#pragma unroll
    for (int e = 0; e < 4; ++e) out[e] = i + e < d ? load_scalar(base, row + i + e, dt) : 0.0f;
  }
}

__device__ __forceinline__ void store4(void* base, int64_t row, int64_t i, int64_t d, DType dt, bool vec,
                                       const float (&v)[4]) {
  if (vec && i < d) {
    store_vec<4>(base, row + i, dt, v);
  } else {
#pragma unroll
    for (int e = 0; e < 4; ++e)
      if (i + e < d) store_scalar(base, row + i + e, dt, v[e]);
  }
}

// The 4 normals of 128-bit block `block` of the Philox4x32-10 stream (seed, subsequence `stream`):
// Box–Muller on two pairs of uniforms. A draw depends only on (seed, stream, block), not on the launch.
__device__ __forceinline__ void normal4(uint64_t seed, uint64_t stream, uint64_t block, float (&out)[4]) {
  at::Philox4_32 gen(seed, stream, block);
#pragma unroll
  for (int p = 0; p < 2; ++p) {
    const uint32_t a = gen(), b = gen();
    const float u1 = fmaf(float(a), 0x1p-32f, 0x1p-33f);  // in (0, 1]: the log stays finite
    const float u2 = float(b) * 0x1p-32f;
    const float r = sqrtf(-2.0f * logf(u1));
    float s, c;
    sincospif(2.0f * u2, &s, &c);
    out[2 * p] = r * c;
    out[2 * p + 1] = r * s;
  }
}

// Sums vals[lo, hi) over the block (blockDim.x a multiple of 32) and returns the totals in every
// thread. Each thread adds the per-warp partials in the same order, so the whole block gets the same
// bits and takes the same branches on them. `buf`: shared memory for (blockDim.x / 32) * N values
// that the block's previous block_sum did not use (callers alternate two buffers), which spares a
// second barrier.
template <typename V, int N>
__device__ __forceinline__ void block_sum(V (&vals)[N], int lo, int hi, V* buf) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, n_warps = blockDim.x / 32;
  // Offset outer, value inner: the shuffle chains of the N values are independent and interleave.
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
#pragma unroll
    for (int l = 0; l < N; ++l)
      if (l >= lo && l < hi) vals[l] += __shfl_xor_sync(0xffffffffu, vals[l], offset);
  }
  if (lane == 0) {
#pragma unroll
    for (int l = 0; l < N; ++l)
      if (l >= lo && l < hi) buf[warp * N + l] = vals[l];
  }
  __syncthreads();
#pragma unroll
  for (int l = 0; l < N; ++l) {
    if (l >= lo && l < hi) {
      V total = 0;
      for (int w = 0; w < n_warps; ++w) total += buf[w * N + l];
      vals[l] = total;
    }
  }
}

}  // namespace lnsr
