// Standard LNSR noise (docs/design.md §1) in one kernel: per token, a Gaussian draw rescaled to ratio·‖x_t‖,
// 0 at padding — one read of x, one write of ε; the draws stay in registers between the two.
#include <cfloat>

#include "device_utils.cuh"
#include "lnsr_kernels.h"

namespace lnsr {
namespace {

constexpr int kThreads = 256;
// Groups of 4 elements per thread: kMaxWidth = kThreads · kChunks · 4.
constexpr int kChunks = kMaxWidth / (4 * kThreads);

// One block per token; thread `tid` holds elements (c · blockDim.x + tid) · 4 + [0, 4) for c < kChunks.
// The draws are normal i of the token's Philox stream (seed, subsequence t) for element i.
__global__ void __launch_bounds__(kThreads) gaussian_noise_kernel(const GaussianArgs a, bool vec) {
  __shared__ float red[kThreads / 32 * 2];
  const int64_t t = blockIdx.x, row = t * a.d;
  float z[kChunks][4] = {};
  if (a.real != nullptr && !a.real[t]) {  // padding: ε = 0 whatever x holds there
#pragma unroll
    for (int c = 0; c < kChunks; ++c)
      store4(a.eps, row, (int64_t(c) * blockDim.x + threadIdx.x) * 4, a.d, a.x_dtype, vec, z[c]);
    return;
  }
  float sq[2] = {0.0f, 0.0f};  // ‖x_t‖², ‖z_t‖²
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
    const int64_t i = (int64_t(c) * blockDim.x + threadIdx.x) * 4;
    if (i >= a.d) continue;
    float x[4];
    load4(a.x, row, i, a.d, a.x_dtype, vec, x);
    if (a.z != nullptr) {
      load4(a.z, row, i, a.d, DType::f32, vec, z[c]);
    } else {
      normal4(a.seed, uint64_t(t), uint64_t(i / 4), z[c]);
#pragma unroll
      for (int e = 0; e < 4; ++e) z[c][e] = i + e < a.d ? z[c][e] : 0.0f;
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) sq[0] += x[e] * x[e], sq[1] += z[c][e] * z[c][e];
  }
  block_sum(sq, 0, 2, red);
  const float scale = a.ratio * sqrtf(sq[0]) / fmaxf(sqrtf(sq[1]), FLT_MIN);
#pragma unroll
  for (int c = 0; c < kChunks; ++c) {
#pragma unroll
    for (int e = 0; e < 4; ++e) z[c][e] *= scale;
    store4(a.eps, row, (int64_t(c) * blockDim.x + threadIdx.x) * 4, a.d, a.x_dtype, vec, z[c]);
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

cudaError_t launch_gaussian_noise(const GaussianArgs& a, cudaStream_t stream) {
  if (a.n == 0) return cudaSuccess;
  // A thread per group of 4 elements (whole warps), at most kThreads, which then take up to kChunks each.
  const int groups = (a.d + 3) / 4;
  const int threads = groups >= kThreads ? kThreads : (groups + 31) / 32 * 32;
  const bool vec = a.d % 4 == 0 && aligned16(a.x) && aligned16(a.eps) && (a.z == nullptr || aligned16(a.z));
  gaussian_noise_kernel<<<static_cast<unsigned>(a.n), threads, 0, stream>>>(a, vec);
  return cudaGetLastError();
}

}  // namespace lnsr
