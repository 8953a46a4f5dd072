// Python bindings of the CUDA kernels (module lnsr_fast._C, loaded by lnsr_fast/kernels/cuda.py): check
// every argument, allocate the outputs and launch on the current stream. Semantics: kernels/reference.py.
#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/accumulate.h>
// Not torch/extension.h: it pulls in the whole C++ frontend and doubles this file's compile time. This
// header is the part of it that pybind11 needs to pass tensors, optionals and lists.
#include <torch/csrc/utils/pybind.h>

#include "lnsr_kernels.h"

namespace {

using at::Tensor;

std::string dtype_name(at::ScalarType t) { return std::string(c10::getDtypeNames(t).first); }

lnsr::DType float_dtype(const Tensor& t, const std::string& name) {
  const at::ScalarType st = t.scalar_type();
  TORCH_CHECK_TYPE(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, name,
                   " must be float32, bfloat16 or float16, got ", dtype_name(st));
  return st == at::kFloat ? lnsr::DType::f32 : st == at::kBFloat16 ? lnsr::DType::bf16 : lnsr::DType::f16;
}

void check_dtype(const Tensor& t, const std::string& name, at::ScalarType want) {
  TORCH_CHECK_TYPE(t.scalar_type() == want, name, " must be ", dtype_name(want), ", got ", dtype_name(t.scalar_type()));
}

void check_shape(const Tensor& t, const std::string& name, at::IntArrayRef want) {
  TORCH_CHECK_VALUE(t.sizes() == want, name, " must have shape ", want, ", got ", t.sizes());
}

void check_contiguous(const Tensor& t, const std::string& name) {
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous (the kernels read it in place), got strides ", t.strides());
}

// Device checks come after the others, so that every other check is reachable with CPU tensors.
void check_device(const Tensor& t, const std::string& name, const Tensor& first, const std::string& first_name) {
  TORCH_CHECK_VALUE(first.is_cuda(), first_name, " must be a CUDA tensor, got a tensor on ", first.device());
  TORCH_CHECK_VALUE(t.device() == first.device(), name, " must be on ", first_name, "'s device ", first.device(),
                    ", got ", t.device());
}

int sm_count(const at::Device& device) {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device.index()));
  return count;
}

Tensor gaussian_noise(const Tensor& x, double ratio, int64_t seed, const std::optional<Tensor>& real,
                      const std::optional<Tensor>& z) {
  const lnsr::DType x_dtype = float_dtype(x, "x");
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) > 0, "x must be [N, d] with d > 0, got shape ", x.sizes());
  const int64_t n = x.size(0), d = x.size(1);
  TORCH_CHECK_VALUE(n <= INT32_MAX, "x has ", n, " tokens; the kernel takes at most 2**31 - 1");
  TORCH_CHECK_VALUE(d <= lnsr::kMaxWidth, "x has width d=", d, " but the CUDA kernel takes d <= ", lnsr::kMaxWidth,
                    "; use backend 'torch'");
  if (real) {
    check_dtype(*real, "real", at::kBool);
    check_shape(*real, "real", {n});
  }
  if (z) {
    check_dtype(*z, "z", at::kFloat);
    check_shape(*z, "z", {n, d});
  }
  TORCH_CHECK_VALUE(std::isfinite(ratio) && ratio > 0, "ratio must be finite and > 0, got ", ratio);
  TORCH_CHECK_VALUE(seed >= 0, "seed must be in [0, 2**63), got ", seed);
  std::vector<std::pair<const Tensor*, std::string>> tensors = {{&x, "x"}};
  if (real) tensors.emplace_back(&*real, "real");
  if (z) tensors.emplace_back(&*z, "z");
  for (const auto& [t, name] : tensors) check_contiguous(*t, name);
  for (const auto& [t, name] : tensors) check_device(*t, name, x, "x");

  const c10::cuda::CUDAGuard guard(x.device());
  Tensor eps = at::empty(x.sizes(), x.options());
  lnsr::GaussianArgs args{};
  args.x = x.data_ptr();
  args.real = real ? real->data_ptr<bool>() : nullptr;
  args.z = z ? z->data_ptr<float>() : nullptr;
  args.eps = eps.data_ptr();
  args.n = n;
  args.d = int(d);
  args.ratio = float(ratio);
  args.seed = uint64_t(seed);
  args.x_dtype = x_dtype;
  C10_CUDA_CHECK(lnsr::launch_gaussian_noise(args, c10::cuda::getCurrentCUDAStream()));
  return eps;
}

std::tuple<Tensor, Tensor> in_manifold_noise(const Tensor& x, const Tensor& ids, const Tensor& table, const Tensor& weight,
                                             double ratio, double rank_tol, int64_t seed,
                                             const std::optional<Tensor>& real, double embed_scale,
                                             const std::optional<Tensor>& z, const std::optional<Tensor>& fallback_z) {
  const lnsr::DType x_dtype = float_dtype(x, "x");
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) > 0, "x must be [N, d] with d > 0, got shape ", x.sizes());
  const int64_t n = x.size(0), d = x.size(1);
  TORCH_CHECK_VALUE(n <= INT32_MAX, "x has ", n, " tokens; the kernel takes at most 2**31 - 1");
  check_dtype(ids, "ids", at::kLong);
  check_shape(ids, "ids", {n});
  check_dtype(table, "table", at::kInt);
  TORCH_CHECK_VALUE(table.dim() == 2, "table must be [V, k], got shape ", table.sizes());
  const int64_t k = table.size(1);
  TORCH_CHECK_VALUE(k >= 1 && k <= lnsr::kMaxNeighbors, "table must have 1 to ", lnsr::kMaxNeighbors,
                    " neighbours per row, got k=", k);
  TORCH_CHECK_VALUE(d <= lnsr::kMaxWidth, "x has width d=", d, " but the CUDA kernel takes d <= ", lnsr::kMaxWidth,
                    "; use backend 'torch'");
  const lnsr::DType w_dtype = float_dtype(weight, "weight");
  TORCH_CHECK_VALUE(weight.dim() == 2 && weight.size(1) == d, "weight must be [V, ", d, "] (x's width), got shape ",
                    weight.sizes());
  TORCH_CHECK_VALUE(table.size(0) == weight.size(0), "table must have one row per row of weight (", weight.size(0),
                    "), got ", table.size(0));
  if (real) {
    check_dtype(*real, "real", at::kBool);
    check_shape(*real, "real", {n});
  }
  TORCH_CHECK_VALUE(z.has_value() == fallback_z.has_value(), "z and fallback_z must both be given or both be None, got ",
                    z ? "z only" : "fallback_z only");
  if (z) {
    check_dtype(*z, "z", at::kFloat);
    check_shape(*z, "z", {n, k});
    check_dtype(*fallback_z, "fallback_z", at::kFloat);
    check_shape(*fallback_z, "fallback_z", {n, d});
  }
  TORCH_CHECK_VALUE(std::isfinite(ratio) && ratio > 0, "ratio must be finite and > 0, got ", ratio);
  TORCH_CHECK_VALUE(rank_tol >= 0 && rank_tol < 1, "rank_tol must be in [0, 1), got ", rank_tol);
  TORCH_CHECK_VALUE(std::isfinite(embed_scale), "embed_scale must be finite, got ", embed_scale);
  TORCH_CHECK_VALUE(seed >= 0, "seed must be in [0, 2**63), got ", seed);

  std::vector<std::pair<const Tensor*, std::string>> tensors = {{&x, "x"}, {&ids, "ids"}, {&table, "table"}, {&weight, "weight"}};
  if (real) tensors.emplace_back(&*real, "real");
  if (z) tensors.insert(tensors.end(), {{&*z, "z"}, {&*fallback_z, "fallback_z"}});
  for (const auto& [t, name] : tensors) check_contiguous(*t, name);
  for (const auto& [t, name] : tensors) check_device(*t, name, x, "x");

  const c10::cuda::CUDAGuard guard(x.device());
  Tensor eps = at::empty(x.sizes(), x.options());
  Tensor fell_back = at::empty({n}, x.options().dtype(at::kBool));
  lnsr::InManifoldArgs args{};
  args.x = x.data_ptr();
  args.ids = ids.data_ptr<int64_t>();
  args.table = table.data_ptr<int32_t>();
  args.weight = weight.data_ptr();
  args.real = real ? real->data_ptr<bool>() : nullptr;
  args.z = z ? z->data_ptr<float>() : nullptr;
  args.fallback_z = z ? fallback_z->data_ptr<float>() : nullptr;
  args.eps = eps.data_ptr();
  args.fell_back = fell_back.data_ptr<bool>();
  args.n = n;
  args.d = int(d);
  args.k = int(k);
  args.ratio = float(ratio);
  args.rank_tol = float(rank_tol);
  args.embed_scale = float(embed_scale);
  args.seed = uint64_t(seed);
  args.x_dtype = x_dtype;
  args.w_dtype = w_dtype;
  C10_CUDA_CHECK(lnsr::launch_in_manifold_noise(args, c10::cuda::getCurrentCUDAStream()));
  return {eps, fell_back};
}

// Checks the arguments shared by the forward and the backward, and describes the layers.
lnsr::StabilityArgs stability_args(const std::vector<Tensor>& clean, const std::vector<Tensor>& noisy,
                                   const std::optional<Tensor>& real, const std::vector<double>& weights,
                                   const std::string& reduction) {
  const int64_t n_layers = int64_t(clean.size());
  TORCH_CHECK_VALUE(n_layers >= 1, "clean must hold at least one layer");
  TORCH_CHECK_VALUE(n_layers <= lnsr::kMaxLayers, "clean has ", n_layers, " layers; one launch takes at most ",
                    lnsr::kMaxLayers);
  TORCH_CHECK_VALUE(noisy.size() == clean.size(), "noisy must have as many layers as clean (", n_layers, "), got ",
                    noisy.size());
  TORCH_CHECK_VALUE(weights.size() == clean.size(), "weights must have one entry per layer (", n_layers, "), got ",
                    weights.size());
  TORCH_CHECK_VALUE(reduction == "sum" || reduction == "mean", "reduction must be 'sum' or 'mean', got '", reduction, "'");
  TORCH_CHECK_VALUE(clean[0].dim() >= 2, "clean[0] must be [..., d] with at least 2 dims, got shape ", clean[0].sizes());
  const at::IntArrayRef tokens = clean[0].sizes().slice(0, clean[0].dim() - 1);

  lnsr::StabilityArgs args{};
  args.n_layers = int(n_layers);
  args.mean = reduction == "mean";
  args.n_tokens = c10::multiply_integers(tokens);
  args.n_rows = args.n_tokens;
  for (int64_t i = 0; i < n_layers; ++i) {
    const std::string c_name = "clean[" + std::to_string(i) + "]", n_name = "noisy[" + std::to_string(i) + "]";
    const Tensor &h = clean[i], &hn = noisy[i];
    lnsr::StabilityLayer& layer = args.layers[i];
    layer.clean_dtype = float_dtype(h, c_name);
    layer.noisy_dtype = float_dtype(hn, n_name);
    TORCH_CHECK_VALUE(h.dim() >= 2 && h.sizes().slice(0, h.dim() - 1) == tokens, c_name, " must be [..., d] with token shape ",
                      tokens, " (clean[0]'s), got shape ", h.sizes());
    check_shape(hn, n_name, h.sizes());
    TORCH_CHECK_VALUE(std::isfinite(weights[i]), "weights[", i, "] must be finite, got ", weights[i]);
    layer.d = h.size(-1);
    layer.weight = float(weights[i]);
  }
  if (real) {
    check_dtype(*real, "real", at::kBool);
    check_shape(*real, "real", tokens);
  }
  for (int64_t i = 0; i < n_layers; ++i) {
    check_contiguous(clean[i], "clean[" + std::to_string(i) + "]");
    check_contiguous(noisy[i], "noisy[" + std::to_string(i) + "]");
  }
  if (real) check_contiguous(*real, "real");
  return args;
}

// The device checks (after every other, so that those are reachable with CPU tensors) and the addresses.
void place_stability_args(lnsr::StabilityArgs& args, const std::vector<Tensor>& clean, const std::vector<Tensor>& noisy,
                          const std::optional<Tensor>& real) {
  for (int64_t i = 0; i < args.n_layers; ++i) {
    check_device(clean[i], "clean[" + std::to_string(i) + "]", clean[0], "clean[0]");
    check_device(noisy[i], "noisy[" + std::to_string(i) + "]", clean[0], "clean[0]");
    args.layers[i].clean = clean[i].data_ptr();
    args.layers[i].noisy = noisy[i].data_ptr();
  }
  if (real) {
    check_device(*real, "real", clean[0], "clean[0]");
    args.real = real->data_ptr<bool>();
  }
}

Tensor stability_forward(const std::vector<Tensor>& clean, const std::vector<Tensor>& noisy,
                         const std::optional<Tensor>& real, const std::vector<double>& weights, const std::string& reduction) {
  lnsr::StabilityArgs args = stability_args(clean, noisy, real, weights, reduction);
  place_stability_args(args, clean, noisy, real);
  const c10::cuda::CUDAGuard guard(clean[0].device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int grid = lnsr::stability_grid(args.n_layers * args.n_tokens, sm_count(clean[0].device()));
  const auto f32 = clean[0].options().dtype(at::kFloat);
  Tensor out = at::empty({}, f32);
  Tensor partials = at::empty({grid}, f32);
  Tensor done = at::empty({1}, clean[0].options().dtype(at::kInt));
  C10_CUDA_CHECK(cudaMemsetAsync(done.data_ptr(), 0, sizeof(unsigned int), stream));
  args.partials = partials.data_ptr<float>();
  args.done = reinterpret_cast<unsigned int*>(done.data_ptr<int32_t>());
  args.out = out.data_ptr<float>();
  C10_CUDA_CHECK(lnsr::launch_stability_forward(args, grid, stream));
  return out;
}

// Writes into grads_clean / grads_noisy (either may be None: not written). grads_noisy[i] has noisy[i]'s
// shape; grads_clean[i] holds n_rows >= n_tokens rows of clean[i]'s width, the same n_rows for every
// layer (a concat-mode gradient from its first row): the rows past the paired ones are zero-filled.
void stability_backward(const Tensor& grad, const std::vector<Tensor>& clean, const std::vector<Tensor>& noisy,
                        const std::optional<Tensor>& real, const std::vector<double>& weights, const std::string& reduction,
                        const std::optional<std::vector<Tensor>>& grads_clean,
                        const std::optional<std::vector<Tensor>>& grads_noisy, bool clean_zero) {
  check_dtype(grad, "grad", at::kFloat);
  TORCH_CHECK_VALUE(grad.dim() == 0, "grad must be a 0-dim tensor, got shape ", grad.sizes());
  lnsr::StabilityArgs args = stability_args(clean, noisy, real, weights, reduction);
  for (const auto* outputs : {&grads_clean, &grads_noisy}) {
    if (!*outputs) continue;
    const bool is_clean = outputs == &grads_clean;
    const std::string side = is_clean ? "grads_clean" : "grads_noisy";
    TORCH_CHECK_VALUE((*outputs)->size() == clean.size(), side, " must have one tensor per layer (", clean.size(),
                      "), got ", (*outputs)->size());
    for (int64_t i = 0; i < args.n_layers; ++i) {
      const Tensor& g = (**outputs)[i];
      const Tensor& like = is_clean ? clean[i] : noisy[i];
      const std::string name = side + "[" + std::to_string(i) + "]";
      check_dtype(g, name, like.scalar_type());
      if (is_clean) {
        const int64_t d = args.layers[i].d, rows = d > 0 ? g.numel() / d : 0;
        TORCH_CHECK_VALUE(g.numel() == rows * d && rows >= args.n_tokens, name, " must hold whole rows of width ", d,
                          ", at least ", args.n_tokens, " of them, got shape ", g.sizes());
        if (i == 0) args.n_rows = rows;
        TORCH_CHECK_VALUE(rows == args.n_rows, name, " must have as many rows as grads_clean[0] (", args.n_rows,
                          "), got shape ", g.sizes());
      } else {
        check_shape(g, name, like.sizes());
      }
      check_contiguous(g, name);
    }
  }
  place_stability_args(args, clean, noisy, real);
  check_device(grad, "grad", clean[0], "clean[0]");
  for (const auto* outputs : {&grads_clean, &grads_noisy}) {
    if (!*outputs) continue;
    const bool is_clean = outputs == &grads_clean;
    for (int64_t i = 0; i < args.n_layers; ++i) {
      const Tensor& g = (**outputs)[i];
      check_device(g, (is_clean ? "grads_clean[" : "grads_noisy[") + std::to_string(i) + "]", clean[0], "clean[0]");
      (is_clean ? args.layers[i].grad_clean : args.layers[i].grad_noisy) = g.data_ptr();
    }
  }
  args.clean_zero = clean_zero;
  args.grad = grad.data_ptr<float>();
  const c10::cuda::CUDAGuard guard(clean[0].device());
  const int64_t rows = args.n_layers * args.n_rows;
  if (rows > 0 && (grads_clean || grads_noisy))
    C10_CUDA_CHECK(lnsr::launch_stability_backward(args, lnsr::stability_grid(rows, sm_count(clean[0].device())),
                                                   c10::cuda::getCurrentCUDAStream()));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "CUDA kernels of lnsr_fast (csrc/); called through lnsr_fast.kernels.cuda";
  m.def("gaussian_noise", &gaussian_noise, "Standard LNSR noise: eps", py::arg("x"), py::arg("ratio"), py::arg("seed"),
        py::arg("real") = py::none(), py::arg("z") = py::none());
  m.def("in_manifold_noise", &in_manifold_noise, "In-manifold LNSR noise: (eps, fell_back)", py::arg("x"), py::arg("ids"),
        py::arg("table"), py::arg("weight"), py::arg("ratio"), py::arg("rank_tol"), py::arg("seed"),
        py::arg("real") = py::none(), py::arg("embed_scale") = 1.0, py::arg("z") = py::none(),
        py::arg("fallback_z") = py::none());
  m.def("stability_forward", &stability_forward, "Layer-wise stability penalty over all layers (0-dim fp32)",
        py::arg("clean"), py::arg("noisy"), py::arg("real"), py::arg("weights"), py::arg("reduction"));
  m.def("stability_backward", &stability_backward, "Writes the gradients of the penalty into grads_clean, grads_noisy",
        py::arg("grad"), py::arg("clean"), py::arg("noisy"), py::arg("real"), py::arg("weights"), py::arg("reduction"),
        py::arg("grads_clean"), py::arg("grads_noisy"), py::arg("clean_zero") = false);
}
