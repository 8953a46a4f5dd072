// In-manifold LNSR noise (DESIGN.md §1–§2) in one kernel: per token, gather its k neighbour rows,
// orthonormalise their differences to the token by modified Gram–Schmidt in fp32, draw inside the span.
#include <cfloat>

#include <c10/util/Exception.h>
#include <ATen/core/PhiloxRNGEngine.h>  // after c10/util/Exception.h, which it uses without including

#include "device_utils.cuh"
#include "lnsr_kernels.h"

namespace lnsr {
namespace {

// Elements per thread access: 16 bytes of fp32, 8 of bf16 / fp16.
constexpr int kVec = 4;

// One thread block per token. Thread `tid` holds elements (c * blockDim.x + tid) * kVec + [0, kVec)
// of x_t and of every difference vector, for c < CHUNKS, in registers; K bounds k at compile time
// (register arrays need constant indices). A config serves d <= MAX_THREADS * CHUNKS * kVec.
struct Config {
  int k_max, chunks, max_threads;
};
constexpr Config kConfigs[] = {{8, 2, 512}, {16, 1, 512}, {32, 1, 256}};
static_assert(kConfigs[2].k_max == kMaxNeighbors, "the last config takes the most neighbours");

// The Philox stream of token t is (seed, subsequence t), read in 128-bit blocks of 4 normals: blocks
// [0, 8) give z_t0..z_t31, block 8 + i/4 gives the fallback draws of elements i..i+3. Every draw
// depends only on (seed, token, index), not on the launch shape.
constexpr uint64_t kFallbackBlock = kMaxNeighbors / 4;

__device__ __forceinline__ void normal4(uint64_t seed, uint64_t token, uint64_t block, float (&out)[4]) {
  at::Philox4_32 gen(seed, token, block);
#pragma unroll
  for (int p = 0; p < 2; ++p) {  // Box–Muller on two pairs of uniforms
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

template <int CHUNKS>
__device__ __forceinline__ void load_row(const void* base, int64_t row, int d, DType dt, bool vec,
                                         float (&out)[CHUNKS * kVec]) {
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int i = (c * blockDim.x + threadIdx.x) * kVec;
    float part[kVec];
    if (vec && i < d) {  // vec implies d % kVec == 0, so the whole access is inside the row
      load_vec<kVec>(base, row + i, dt, part);
    } else {  // elements past d read as 0 and add nothing to any dot product
#pragma unroll
      for (int e = 0; e < kVec; ++e) part[e] = i + e < d ? load_scalar(base, row + i + e, dt) : 0.0f;
    }
#pragma unroll
    for (int e = 0; e < kVec; ++e) out[c * kVec + e] = part[e];
  }
}

template <int CHUNKS>
__device__ __forceinline__ void store_row(void* base, int64_t row, int d, DType dt, bool vec,
                                          const float (&v)[CHUNKS * kVec], float scale) {
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int i = (c * blockDim.x + threadIdx.x) * kVec;
    float part[kVec];
#pragma unroll
    for (int e = 0; e < kVec; ++e) part[e] = v[c * kVec + e] * scale;
    if (vec && i < d) {
      store_vec<kVec>(base, row + i, dt, part);
    } else {
#pragma unroll
      for (int e = 0; e < kVec; ++e)
        if (i + e < d) store_scalar(base, row + i + e, dt, part[e]);
    }
  }
}

template <int CHUNKS>
__device__ __forceinline__ float sum_sq(const float (&v)[CHUNKS * kVec]) {
  float s = 0.0f;
#pragma unroll
  for (int e = 0; e < CHUNKS * kVec; ++e) s += v[e] * v[e];
  return s;
}

template <int K, int CHUNKS, int MAX_THREADS>
__global__ void __launch_bounds__(MAX_THREADS) in_manifold_noise_kernel(const InManifoldArgs a, bool vec) {
  constexpr int E = CHUNKS * kVec;
  __shared__ float red[2][MAX_THREADS / 32 * (K + 1)];  // block_sum's two alternating buffers
  const int64_t t = blockIdx.x;
  const int d = a.d, k = a.k;
  const bool real = a.real == nullptr || a.real[t];
  const int64_t id = a.ids[t];

  if (!real) {  // padding: ε = 0 whatever x holds there
    const float zero[E] = {};
    store_row<CHUNKS>(a.eps, t * d, d, a.x_dtype, vec, zero, 0.0f);
    if (threadIdx.x == 0) a.fell_back[t] = false;
    return;
  }

  // All loads are issued before any result is used, so their latencies overlap: neighbour ids, then
  // x_t and the k neighbour rows.
  int32_t nbr[K];
#pragma unroll
  for (int j = 0; j < K; ++j)
    if (j < k) nbr[j] = a.table[id * k + j];
  float acc[E];  // x_t while the differences are formed, then ε_t
  load_row<CHUNKS>(a.x, t * d, d, a.x_dtype, vec, acc);
  float v[K][E];  // d_j = embed_scale·weight[nbr_j] − x_t, turned in place into q_j (or dropped)
#pragma unroll
  for (int j = 0; j < K; ++j)
    if (j < k) load_row<CHUNKS>(a.weight, int64_t(nbr[j]) * d, d, a.w_dtype, vec, v[j]);
#pragma unroll
  for (int j = 0; j < K; ++j)
    if (j < k) {
#pragma unroll
      for (int e = 0; e < E; ++e) v[j][e] = a.embed_scale * v[j][e] - acc[e];
    }

  float sq[K + 1];  // ‖x_t‖², ‖d_0‖², ..., ‖d_{k-1}‖²
  sq[0] = sum_sq<CHUNKS>(acc);
#pragma unroll
  for (int j = 0; j < K; ++j)
    if (j < k) sq[j + 1] = sum_sq<CHUNKS>(v[j]);
  int buf = 0;
  block_sum(sq, 0, k + 1, red[buf]);
  buf ^= 1;
  const float x_norm = sqrtf(sq[0]);
  float threshold[K];  // rank_tol·‖d_j‖: a residual at or below it is dependent on the kept q_i
#pragma unroll
  for (int j = 0; j < K; ++j)
    if (j < k) threshold[j] = a.rank_tol * sqrtf(sq[j + 1]);

  // Modified Gram–Schmidt, right-looking: once q_j is final it is projected out of every later
  // residual, so each residual sees the same subtractions in the same order as in the reference's
  // loop, and the dot products of a step share one block reduction. The vector of step j is always
  // v[0]: the arrays shift down one slot per step, which keeps register indices constant without
  // unrolling the loop over j (that would cost O(K²) code and minutes of compilation).
#pragma unroll
  for (int e = 0; e < E; ++e) acc[e] = 0.0f;
  bool any_kept = false;
  float draws[4];  // generated z: the rest of the current Philox block, next draw first
#pragma unroll 1
  for (int j = 0; j < k; ++j) {
    const int left = k - j;  // v[0, left) are the residuals still to orthonormalise
    float z_j;
    if (a.z != nullptr) {
      z_j = a.z[t * k + j];
    } else {
      if (j % 4 == 0) normal4(a.seed, t, j / 4, draws);
      z_j = draws[0];
      draws[0] = draws[1], draws[1] = draws[2], draws[2] = draws[3];
    }
    float residual = sqrtf(sq[1]);  // nothing is projected out of d_0
    if (j > 0) {
      float r[1] = {sum_sq<CHUNKS>(v[0])};
      block_sum(r, 0, 1, red[buf]);
      buf ^= 1;
      residual = sqrtf(r[0]);
    }
    if (residual > threshold[0]) {  // kept (a NaN residual is dropped, as in the reference)
      any_kept = true;
      const float norm = fmaxf(residual, FLT_MIN);
#pragma unroll
      for (int e = 0; e < E; ++e) {
        v[0][e] /= norm;
        acc[e] += z_j * v[0][e];
      }
      if (left > 1) {
        float dots[K];
#pragma unroll
        for (int l = 1; l < K; ++l) {
          dots[l] = 0.0f;
#pragma unroll
          for (int e = 0; e < E; ++e) dots[l] += v[0][e] * v[l][e];
        }
        block_sum(dots, 1, left, red[buf]);
        buf ^= 1;
#pragma unroll
        for (int l = 1; l < K; ++l)
          if (l < left) {
#pragma unroll
            for (int e = 0; e < E; ++e) v[l][e] -= dots[l] * v[0][e];
          }
      }
    }
#pragma unroll
    for (int l = 0; l + 1 < K; ++l) {
      threshold[l] = threshold[l + 1];
#pragma unroll
      for (int e = 0; e < E; ++e) v[l][e] = v[l + 1][e];
    }
  }

  if (!any_kept) {  // the differences span nothing: Gaussian noise instead
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
      const int i = (c * blockDim.x + threadIdx.x) * kVec;
      float part[kVec] = {};
      if (a.fallback_z != nullptr) {
        if (vec && i < d) load_vec<kVec>(a.fallback_z, t * d + i, DType::f32, part);
        else
#pragma unroll
          for (int e = 0; e < kVec; ++e) part[e] = i + e < d ? a.fallback_z[t * d + i + e] : 0.0f;
      } else if (i < d) {
        normal4(a.seed, t, kFallbackBlock + i / kVec, part);
#pragma unroll
        for (int e = 0; e < kVec; ++e) part[e] = i + e < d ? part[e] : 0.0f;
      }
#pragma unroll
      for (int e = 0; e < kVec; ++e) acc[c * kVec + e] = part[e];
    }
  }

  float eps_sq[1] = {sum_sq<CHUNKS>(acc)};
  block_sum(eps_sq, 0, 1, red[buf]);
  const float scale = a.ratio * x_norm / fmaxf(sqrtf(eps_sq[0]), FLT_MIN);
  store_row<CHUNKS>(a.eps, t * d, d, a.x_dtype, vec, acc, scale);
  if (threadIdx.x == 0) a.fell_back[t] = !any_kept;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <int C>
cudaError_t launch(const InManifoldArgs& a, cudaStream_t stream) {
  constexpr Config cfg = kConfigs[C];
  constexpr int per_thread = cfg.chunks * kVec;
  const int threads = ((a.d + per_thread - 1) / per_thread + 31) / 32 * 32;
  const bool vec = a.d % kVec == 0 && aligned16(a.x) && aligned16(a.weight) && aligned16(a.eps) &&
                   (a.fallback_z == nullptr || aligned16(a.fallback_z));
  in_manifold_noise_kernel<cfg.k_max, cfg.chunks, cfg.max_threads>
      <<<static_cast<unsigned>(a.n), threads > 0 ? threads : 32, 0, stream>>>(a, vec);
  return cudaGetLastError();
}

}  // namespace

int64_t in_manifold_max_dim(int64_t k) {
  if (k < 1) return 0;
  for (const Config& c : kConfigs)
    if (k <= c.k_max) return int64_t(c.max_threads) * c.chunks * kVec;
  return 0;
}

cudaError_t launch_in_manifold_noise(const InManifoldArgs& args, cudaStream_t stream) {
  if (args.n == 0) return cudaSuccess;
  if (args.k <= kConfigs[0].k_max) return launch<0>(args, stream);
  if (args.k <= kConfigs[1].k_max) return launch<1>(args, stream);
  return launch<2>(args, stream);
}

}  // namespace lnsr
