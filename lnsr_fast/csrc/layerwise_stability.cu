// Layer-wise stability penalty Σ_r w_r · mean_t ‖h_r,t − h̃_r,t‖² (eq. 11; docs/design.md §1–§2) and its
// gradient, each in one launch over all layers, reading the clean and noisy halves where they lie.
#include "device_utils.cuh"
#include "lnsr_kernels.h"

namespace lnsr {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Elements per lane access: 16 bytes of bf16 / fp16, two 16-byte accesses of fp32.
constexpr int kVec = 8;

// Work items are rows (layer i, token m), layer-major; each warp takes every (total warps)-th row, so
// a row is read by one warp in full, 16 bytes per lane per access where the row allows it.
struct Row {
  const StabilityLayer& layer;
  int64_t token, start;
};

__device__ __forceinline__ Row row_of(const StabilityArgs& a, int64_t r) {
  const int i = int(r / a.n_rows);
  const int64_t m = r - int64_t(i) * a.n_rows;
  return {a.layers[i], m, m * a.layers[i].d};
}

// Calls f(i, h, h̃) for each chunk of kVec elements (from element i) of the row that this lane owns,
// having loaded up to kUnroll chunks of both tensors before using any: their latencies overlap.
constexpr int kUnroll = 4;

template <typename F>
__device__ __forceinline__ void for_each_chunk(const StabilityLayer& l, int64_t start, int lane, F f) {
  for (int64_t base = lane * kVec; base < l.d; base += kUnroll * 32 * kVec) {
    float h[kUnroll][kVec], hn[kUnroll][kVec];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * 32 * kVec;
      if (i < l.d) {
        load_vec<kVec>(l.clean, start + i, l.clean_dtype, h[u]);
        load_vec<kVec>(l.noisy, start + i, l.noisy_dtype, hn[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * 32 * kVec;
      if (i < l.d) f(i, h[u], hn[u]);
    }
  }
}

// The number of true entries of real[0, n) (n when real is nullptr), in every thread of the block.
__device__ long long count_real(const bool* real, int64_t n, long long* buf) {
  if (real == nullptr) return n;
  long long count = 0;
  int64_t body = 0;
  if (reinterpret_cast<uintptr_t>(real) % 16 == 0) {
    body = n / 16 * 16;
    const uint4* words = reinterpret_cast<const uint4*>(real);
    for (int64_t q = threadIdx.x; q < n / 16; q += blockDim.x) {
      const uint4 w = words[q];  // a bool is one byte holding 0 or 1: count its set bit
      count += __popc(w.x) + __popc(w.y) + __popc(w.z) + __popc(w.w);
    }
  }
  for (int64_t i = body + threadIdx.x; i < n; i += blockDim.x) count += real[i];
  long long total[1] = {count};
  block_sum(total, 0, 1, buf);
  return total[0];
}

__device__ __forceinline__ float layer_factor(const StabilityLayer& layer, bool mean) {
  return mean ? layer.weight / float(layer.d) : layer.weight;
}

__global__ void __launch_bounds__(kThreads) stability_forward_kernel(const __grid_constant__ StabilityArgs a) {
  __shared__ float red[kWarps];
  __shared__ long long red_count[kWarps];
  __shared__ bool last;
  const int lane = threadIdx.x % 32;
  const int64_t rows = int64_t(a.n_layers) * a.n_rows;
  float acc = 0.0f;  // this lane's share of Σ_r factor_r · ‖h − h̃‖² over its rows
  for (int64_t r = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32; r < rows; r += int64_t(gridDim.x) * kWarps) {
    const Row row = row_of(a, r);
    if (a.real != nullptr && !a.real[row.token]) continue;  // padding is never read: it may hold NaN/Inf
    const StabilityLayer& l = row.layer;
    float s = 0.0f;
    if (l.vec) {
      for_each_chunk(l, row.start, lane, [&](int64_t, const float(&h)[kVec], const float(&g)[kVec]) {
#pragma unroll
        for (int e = 0; e < kVec; ++e) s += (h[e] - g[e]) * (h[e] - g[e]);
      });
    } else {
      for (int64_t c = lane; c < l.d; c += 32) {
        const float diff = load_scalar(l.clean, row.start + c, l.clean_dtype) - load_scalar(l.noisy, row.start + c, l.noisy_dtype);
        s += diff * diff;
      }
    }
    acc += layer_factor(l, a.mean) * s;
  }

  float part[1] = {acc};
  block_sum(part, 0, 1, red);
  if (threadIdx.x == 0) {
    a.partials[blockIdx.x] = part[0];
    __threadfence();  // the partial is visible to every block before the count says it is there
    last = atomicAdd(a.done, 1u) == gridDim.x - 1;
  }
  __syncthreads();  // also ends every thread's reads of `red`
  if (!last) return;

  // The last block to finish adds the partials in block order: a launch of the same shape on the same
  // device gives the same bits.
  __threadfence();
  float total[1] = {0.0f};
  for (int b = threadIdx.x; b < gridDim.x; b += kThreads) total[0] += __ldcg(a.partials + b);
  block_sum(total, 0, 1, red);
  const long long n_real = count_real(a.real, a.n_tokens, red_count);
  if (threadIdx.x == 0) *a.out = total[0] / float(n_real > 1 ? n_real : 1);
}

// d/dh of the forward: 2·grad·factor_r/n_real · (h − h̃) into grad_clean (zeros with clean_zero) and its
// negation into grad_noisy (either may be nullptr: not written); 0 at padding. Rows [n_tokens, n_rows) of
// grad_clean (a concat-mode gradient's rows between its clean and its noisy block) are zero-filled.
__device__ __forceinline__ void write_row(const StabilityLayer& l, int64_t start, int lane, bool clean_zero, float c,
                                          bool real) {
  if (l.vec && real) {
    for_each_chunk(l, start, lane, [&](int64_t i, const float(&h)[kVec], const float(&hn)[kVec]) {
      float g[kVec], neg[kVec];
#pragma unroll
      for (int e = 0; e < kVec; ++e) g[e] = c * (h[e] - hn[e]), neg[e] = -g[e];
      if (l.grad_clean != nullptr) {
        if (clean_zero) {
          const float zero[kVec] = {};
          store_vec<kVec>(l.grad_clean, start + i, l.clean_dtype, zero);
        } else {
          store_vec<kVec>(l.grad_clean, start + i, l.clean_dtype, g);
        }
      }
      if (l.grad_noisy != nullptr) store_vec<kVec>(l.grad_noisy, start + i, l.noisy_dtype, neg);
    });
  } else if (l.vec) {
    const float zero[kVec] = {};
    for (int64_t i = lane * kVec; i < l.d; i += 32 * kVec) {
      if (l.grad_clean != nullptr) store_vec<kVec>(l.grad_clean, start + i, l.clean_dtype, zero);
      if (l.grad_noisy != nullptr) store_vec<kVec>(l.grad_noisy, start + i, l.noisy_dtype, zero);
    }
  } else {
    for (int64_t i = lane; i < l.d; i += 32) {
      float g = 0.0f;
      if (real) g = c * (load_scalar(l.clean, start + i, l.clean_dtype) - load_scalar(l.noisy, start + i, l.noisy_dtype));
      if (l.grad_clean != nullptr) store_scalar(l.grad_clean, start + i, l.clean_dtype, clean_zero ? 0.0f : g);
      if (l.grad_noisy != nullptr) store_scalar(l.grad_noisy, start + i, l.noisy_dtype, -g);
    }
  }
}

__global__ void __launch_bounds__(kThreads) stability_backward_kernel(const __grid_constant__ StabilityArgs a) {
  __shared__ long long red_count[kWarps];
  const int lane = threadIdx.x % 32;
  const long long n_real = count_real(a.real, a.n_tokens, red_count);
  const float scale = 2.0f * *a.grad / float(n_real > 1 ? n_real : 1);
  const int64_t rows = int64_t(a.n_layers) * a.n_rows;
  for (int64_t r = int64_t(blockIdx.x) * kWarps + threadIdx.x / 32; r < rows; r += int64_t(gridDim.x) * kWarps) {
    const Row row = row_of(a, r);
    const StabilityLayer& l = row.layer;
    if (row.token >= a.n_tokens) {  // between the clean and the noisy block: zeros
      StabilityLayer fill = l;
      fill.grad_noisy = nullptr;
      write_row(fill, row.start, lane, true, 0.0f, false);
    } else {
      const bool real = a.real == nullptr || a.real[row.token];
      write_row(l, row.start, lane, a.clean_zero, layer_factor(l, a.mean) * scale, real);
    }
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// 16-byte accesses need every row start of all four tensors 16-byte aligned.
void set_vec(StabilityArgs& a) {
  for (int i = 0; i < a.n_layers; ++i) {
    StabilityLayer& l = a.layers[i];
    l.vec = l.d % kVec == 0 && aligned16(l.clean) && aligned16(l.noisy) &&
            (l.grad_clean == nullptr || aligned16(l.grad_clean)) && (l.grad_noisy == nullptr || aligned16(l.grad_noisy));
  }
}

}  // namespace

int stability_grid(int64_t rows, int sm_count) {
  // As many blocks as the GPU holds at once (each loops over rows), fewer for small inputs.
  int per_sm = 1;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, stability_forward_kernel, kThreads, 0) != cudaSuccess) {
    (void)cudaGetLastError();  // not left for the launch check to report; one block per SM still works
    per_sm = 1;
  }
  const int64_t wanted = (rows + kWarps - 1) / kWarps;
  const int64_t resident = int64_t(sm_count) * (per_sm > 1 ? per_sm : 1);
  const int64_t grid = wanted < resident ? wanted : resident;
  return grid > 1 ? int(grid) : 1;
}

cudaError_t launch_stability_forward(StabilityArgs args, int grid, cudaStream_t stream) {
  set_vec(args);
  stability_forward_kernel<<<grid, kThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

cudaError_t launch_stability_backward(StabilityArgs args, int grid, cudaStream_t stream) {
  set_vec(args);
  stability_backward_kernel<<<grid, kThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace lnsr
