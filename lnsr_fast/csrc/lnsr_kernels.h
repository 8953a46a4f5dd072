// Host-side interface of the CUDA kernels of one LNSR step (docs/design.md §1): the argument structs that
// bindings.cpp fills from checked tensors and the kernels take by value, and the launchers.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace lnsr {

// Element type of a tensor the kernels read or write. A runtime value, not a template parameter, so
// that a few kernel instantiations serve every mix of fp32 / bf16 / fp16 tensors.
enum class DType : uint8_t { f32, bf16, f16 };

// ---- Gaussian noise (reference.gaussian_noise) ----------------------------------------------------------

constexpr int kMaxWidth = 8192;  // kernels.MAX_WIDTH: the widest row any kernel takes

struct GaussianArgs {
  const void* x;            // [n, d], x_dtype
  const bool* real;         // [n] or nullptr (every token real)
  const float* z;           // [n, d], or nullptr: draw it in the kernel
  void* eps;                // [n, d], x_dtype
  int64_t n;
  int d;
  float ratio;
  uint64_t seed;
  DType x_dtype;
};

cudaError_t launch_gaussian_noise(const GaussianArgs& args, cudaStream_t stream);

// ---- in-manifold noise (reference.in_manifold_noise) -------------------------------------------------

constexpr int kMaxNeighbors = 32;  // kernels.MAX_K

struct InManifoldArgs {
  const void* x;            // [n, d], x_dtype
  const int64_t* ids;       // [n]
  const int32_t* table;     // [vocab, k]
  const void* weight;       // [vocab, d], w_dtype
  const bool* real;         // [n] or nullptr (every token real)
  const float* z;           // [n, k] and [n, d], or both nullptr: draw them in the kernel
  const float* fallback_z;
  void* eps;                // [n, d], x_dtype
  bool* fell_back;          // [n]
  int64_t n;
  int d, k;
  float ratio, rank_tol, embed_scale;
  uint64_t seed;
  DType x_dtype, w_dtype;
};

cudaError_t launch_in_manifold_noise(const InManifoldArgs& args, cudaStream_t stream);

// ---- layer-wise stability (reference.layerwise_stability and its gradient) ---------------------------

constexpr int kMaxLayers = 64;

struct StabilityLayer {
  const void* clean;        // [n_tokens, d]
  const void* noisy;
  void* grad_clean;         // backward only: [n_rows, d] (rows past n_tokens are zero-filled), or nullptr
  void* grad_noisy;         // backward only: [n_tokens, d], or nullptr
  int64_t d;
  float weight;
  DType clean_dtype, noisy_dtype;
  bool vec;                 // set by the launchers: rows allow 16-byte accesses
};

struct StabilityArgs {
  StabilityLayer layers[kMaxLayers];
  int n_layers;
  bool mean;                // reduction "mean": each layer's term is also divided by its d
  int64_t n_tokens;
  int64_t n_rows;           // rows per layer to visit: n_tokens, or in the backward grad_clean's rows
  bool clean_zero;          // backward: write zeros, not the gradient, into grad_clean
  const bool* real;         // [n_tokens] or nullptr
  float* partials;          // forward: one fp32 per block, and a zeroed counter of finished blocks
  unsigned int* done;
  float* out;               // forward: the 0-dim result
  const float* grad;        // backward: the upstream gradient (0-dim)
};

// Blocks of the stability launches (the forward needs that many partials): fixed for a shape and a
// device, which makes the forward's two-stage sum reproducible bit for bit.
int stability_grid(int64_t rows, int sm_count);

cudaError_t launch_stability_forward(StabilityArgs args, int grid, cudaStream_t stream);
cudaError_t launch_stability_backward(StabilityArgs args, int grid, cudaStream_t stream);

}  // namespace lnsr
