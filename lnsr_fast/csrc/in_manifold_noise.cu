// In-manifold LNSR noise (docs/design.md §1–§2) in one kernel, one thread block per token: a pass over the k
// neighbour rows accumulates the Gram matrix G = D Dᵀ of the differences d_j = e_j − x_t in fp64 on the
// tensor cores (products of fp32 values are exact there, so the rank test resolves residuals far below
// fp32's √eps); one warp factors G = RᵀR (Cholesky, row by row, with the reference's rank test: R_jj is the
// norm of d_j's Gram–Schmidt residual) and solves R c = z over the kept directions; a second pass over the
// same rows (mostly from L1/L2) writes ε_t = scale · Σ_j c_j d_j = scale · Σ_j z_j q_j. No work on the
// rows of a block of 8 past k but the tensor-core products of zeros; no spills up to d = 8192, k = 32.
#include <cfloat>

#include "device_utils.cuh"
#include "lnsr_kernels.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "the in-manifold kernel uses the fp64 tensor cores (mma.m8n8k4.f64): build for compute capability 8.0 or newer"
#endif

namespace lnsr {
namespace {

constexpr int kWarps = 4;  // warps per token; each takes every kWarps-th step of 16 columns
constexpr int kThreads = 32 * kWarps;
constexpr int kStep = 16;  // columns per warp step: lane (g, q) holds columns 4q .. 4q + 3 of neighbour 8b + g
constexpr unsigned kFull = 0xffffffffu;

// C[8×8] += A[8×4]·B[4×8] in fp64. Lane l holds A[l/4][l%4], B[l%4][l/4] and C[l/4][2(l%4) + {0, 1}].
__device__ __forceinline__ void mma_f64(double (&c)[2], double a, double b) {
  asm volatile("mma.sync.aligned.m8n8k4.row.col.f64.f64.f64.f64 {%0, %1}, {%2}, {%3}, {%0, %1};\n"
               : "+d"(c[0]), "+d"(c[1])
               : "d"(a), "d"(b));
}

// d_j = embed_scale·e_j − x_t in fp32, rounded the same way in both passes (and as the reference: the
// scaled row first, then the difference).
__device__ __forceinline__ float difference(float e, float x, float embed_scale) {
  return __fsub_rn(__fmul_rn(embed_scale, e), x);
}

// The differences of this lane's neighbours j = 8b + g (0 for j >= k) at its 4 columns from `col`, and
// x_t there: the operands of both passes.
template <int RB>
__device__ __forceinline__ void load_step(const InManifoldArgs& a, int64_t t, const int32_t (&nbr)[RB], int g,
                                          int64_t col, bool vec, float (&x)[4], float (&diff)[RB][4]) {
  load4(a.x, t * a.d, col, a.d, a.x_dtype, vec, x);
#pragma unroll
  for (int b = 0; b < RB; ++b) {
    float e[4] = {};
    const bool live = 8 * b + g < a.k;
    if (live) load4(a.weight, int64_t(nbr[b]) * a.d, col, a.d, a.w_dtype, vec, e);
#pragma unroll
    for (int m = 0; m < 4; ++m) diff[b][m] = live && col + m < a.d ? difference(e[m], x[m], a.embed_scale) : 0.0f;
  }
}

template <int RB>  // blocks of 8 neighbour rows: k <= 8·RB
__global__ void __launch_bounds__(kThreads, 1) in_manifold_noise_kernel(const InManifoldArgs a, bool vec) {
  constexpr int KP = 8 * RB;
  constexpr int TILES = RB * (RB + 1) / 2;  // the upper triangle of G in 8×8 tiles
  __shared__ double partial[kWarps][TILES][64];  // each warp's Gram tiles, C-fragment order
  __shared__ double gram[KP][KP + 1];            // G, then R in its upper triangle
  __shared__ double coef[KP];                    // c = R⁻¹z
  __shared__ double x_sq[kWarps];
  __shared__ double scale_shared;
  __shared__ bool fell_shared;

  const int64_t t = blockIdx.x;
  const int64_t d = a.d;
  const int k = a.k, lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, q = lane % 4;
  if (a.real != nullptr && !a.real[t]) {  // padding: ε = 0 whatever x holds there, nothing read
    const float zero[4] = {};
    for (int64_t i = int64_t(threadIdx.x) * 4; i < d; i += kThreads * 4) store4(a.eps, t * d, i, d, a.x_dtype, vec, zero);
    if (threadIdx.x == 0) a.fell_back[t] = false;
    return;
  }
  const int64_t id = a.ids[t];
  int32_t nbr[RB];
#pragma unroll
  for (int b = 0; b < RB; ++b) nbr[b] = 8 * b + g < k ? a.table[id * k + 8 * b + g] : 0;

  // Pass 1: this warp's share of G (tile (bi, bj) ← rows 8bi.., 8bj..) and of ‖x_t‖² (lanes g = 0 hold
  // each column once), all in fp64.
  double acc[TILES][2] = {};
  double xx = 0.0;
#pragma unroll 1
  for (int64_t start = int64_t(warp) * kStep; start < d; start += kWarps * kStep) {
    float x[4], diff[RB][4];
    load_step<RB>(a, t, nbr, g, start + 4 * q, vec, x, diff);
    double dd[RB][4];
#pragma unroll
    for (int b = 0; b < RB; ++b)
#pragma unroll
      for (int m = 0; m < 4; ++m) dd[b][m] = double(diff[b][m]);
    if (g == 0)
#pragma unroll
      for (int m = 0; m < 4; ++m) xx += double(x[m]) * double(x[m]);
    int tile = 0;
#pragma unroll
    for (int bi = 0; bi < RB; ++bi)
#pragma unroll
      for (int bj = bi; bj < RB; ++bj, ++tile)
#pragma unroll
        for (int m = 0; m < 4; ++m) mma_f64(acc[tile], dd[bi][m], dd[bj][m]);  // column 4q + m of the step
  }
#pragma unroll
  for (int tile = 0; tile < TILES; ++tile)
#pragma unroll
    for (int i = 0; i < 2; ++i) partial[warp][tile][8 * g + 2 * q + i] = acc[tile][i];
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) xx += __shfl_xor_sync(kFull, xx, offset);
  if (lane == 0) x_sq[warp] = xx;
  __syncthreads();
  // The warps' partials added in warp order (the same bits on every run); only G's upper triangle is read.
  for (int e = threadIdx.x; e < TILES * 64; e += kThreads) {
    const int tile = e / 64, r = e % 64 / 8, c = e % 8;
    int bi = 0, first = 0;  // tile → (bi, bj) of the row-major upper triangle
    while (tile >= first + RB - bi) first += RB - bi, ++bi;
    const int bj = bi + tile - first;
    double sum = 0.0;
    for (int w = 0; w < kWarps; ++w) sum += partial[w][tile][e % 64];
    gram[8 * bi + r][8 * bj + c] = sum;
  }
  __syncthreads();

  if (warp == 0) {
    // Cholesky, right-looking: lane i owns column i. At step j the trailing matrix's row j is gram[j][j..];
    // R_jj = √G'_jj, kept when above rank_tol·‖d_j‖ (a NaN is dropped), R_ji = G'_ji / R_jj; row j of R is
    // stored over it, and R_j·ᵀR_j· leaves the rows below.
    const int i = lane;
    const double threshold = i < k ? double(a.rank_tol) * sqrt(gram[i][i]) : 0.0;
    unsigned kept = 0;
    for (int j = 0; j < k; ++j) {
      const double residual = sqrt(fmax(gram[j][j], 0.0));  // rounding may leave it below 0
      const bool keep = residual > __shfl_sync(kFull, threshold, j);
      const double r_ji = keep && i >= j && i < k ? gram[j][i] / residual : 0.0;
      __syncwarp();
      if (i >= j && i < k) gram[j][i] = r_ji;
      for (int p = j + 1; p < k; ++p) {
        const double r_jp = __shfl_sync(kFull, r_ji, p);
        if (i >= p && i < k) gram[p][i] -= r_jp * r_ji;
      }
      __syncwarp();
      kept |= unsigned(keep) << j;
    }
    // z_i (given, or normal i of the token's Philox stream), then c: back substitution over columns.
    double z = 0.0;
    if (i < k) {
      if (a.z != nullptr) {
        z = a.z[t * k + i];
      } else {
        float draws[4];
        normal4(a.seed, uint64_t(t), uint64_t(i / 4), draws);
        const int m = i % 4;  // selected, not indexed: a runtime index would put the array in local memory
        z = m == 0 ? draws[0] : m == 1 ? draws[1] : m == 2 ? draws[2] : draws[3];
      }
    }
    double z_sq = (kept >> i & 1u) ? z * z : 0.0;  // ‖ε_t‖² before scaling: the q_j are orthonormal
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) z_sq += __shfl_xor_sync(kFull, z_sq, offset);
    double c = z;
    for (int j = k - 1; j >= 0; --j) {
      double c_j = __shfl_sync(kFull, c, j);
      c_j = (kept >> j & 1u) ? c_j / gram[j][j] : 0.0;
      if (i == j) c = c_j;
      if (i < j) c -= gram[i][j] * c_j;
    }
    if (i < KP) coef[i] = i < k ? c : 0.0;
    if (lane == 0) {
      double total = 0.0;
      for (int w = 0; w < kWarps; ++w) total += x_sq[w];
      fell_shared = kept == 0;
      scale_shared = double(a.ratio) * sqrt(total) / fmax(sqrt(z_sq), double(FLT_MIN));
    }
  }
  __syncthreads();
  const bool fell = fell_shared;
  double scale = scale_shared;
  if (fell) {  // the differences span nothing: full-width Gaussian noise (element i: normal 32 + i), norm first
    __shared__ float red[kWarps];
    float sq[1] = {0.0f};
    for (int64_t i = int64_t(threadIdx.x) * 4; i < d; i += kThreads * 4) {
      float f[4];
      if (a.fallback_z != nullptr) load4(a.fallback_z, t * d, i, d, DType::f32, vec, f);
      else normal4(a.seed, uint64_t(t), uint64_t(kMaxNeighbors / 4 + i / 4), f);
#pragma unroll
      for (int e = 0; e < 4; ++e) sq[0] += i + e < d ? f[e] * f[e] : 0.0f;
    }
    block_sum(sq, 0, 1, red);
    float x_norm_sq = 0.0f;
    for (int w = 0; w < kWarps; ++w) x_norm_sq += float(x_sq[w]);
    scale = double(a.ratio * sqrtf(x_norm_sq) / fmaxf(sqrtf(sq[0]), FLT_MIN));
  }

  // Pass 2 over the same columns as pass 1: Σ_j c_j d_j per column in fp64, summed over the lanes of a
  // column (xor 4, 8, 16: a fixed order), written by the lanes g = 0.
#pragma unroll 1
  for (int64_t start = int64_t(warp) * kStep; start < d; start += kWarps * kStep) {
    const int64_t col = start + 4 * q;
    double e[4] = {};
    if (!fell) {
      float x[4], diff[RB][4];
      load_step<RB>(a, t, nbr, g, col, vec, x, diff);
#pragma unroll
      for (int b = 0; b < RB; ++b)
#pragma unroll
        for (int m = 0; m < 4; ++m) e[m] += coef[8 * b + g] * double(diff[b][m]);
#pragma unroll
      for (int offset = 4; offset < 32; offset *= 2)
#pragma unroll
        for (int m = 0; m < 4; ++m) e[m] += __shfl_xor_sync(kFull, e[m], offset);
    } else if (g == 0) {
      float f[4];
      if (a.fallback_z != nullptr) load4(a.fallback_z, t * d, col, d, DType::f32, vec, f);
      else normal4(a.seed, uint64_t(t), uint64_t(kMaxNeighbors / 4 + col / 4), f);
#pragma unroll
      for (int m = 0; m < 4; ++m) e[m] = f[m];
    }
    if (g == 0) {
      float out[4];
#pragma unroll
      for (int m = 0; m < 4; ++m) out[m] = float(e[m] * scale);
      store4(a.eps, t * d, col, d, a.x_dtype, vec, out);
    }
  }
  if (threadIdx.x == 0) a.fell_back[t] = fell;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <int RB>
cudaError_t launch(const InManifoldArgs& a, cudaStream_t stream) {
  const bool vec = a.d % 4 == 0 && aligned16(a.x) && aligned16(a.weight) && aligned16(a.eps) &&
                   (a.fallback_z == nullptr || aligned16(a.fallback_z));
  in_manifold_noise_kernel<RB><<<static_cast<unsigned>(a.n), kThreads, 0, stream>>>(a, vec);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_in_manifold_noise(const InManifoldArgs& args, cudaStream_t stream) {
  if (args.n == 0) return cudaSuccess;
  switch ((args.k + 7) / 8) {
    case 1: return launch<1>(args, stream);
    case 2: return launch<2>(args, stream);
    case 3: return launch<3>(args, stream);
    default: return launch<4>(args, stream);
  }
}

}  // namespace lnsr
