/* The eager CPU ghost normalization as one C++ autograd op, fxghost::eager_cpu_ghost_norm,
 * compiled on first use by fxghost/backends/cpu.py.
 *
 * It runs the same C kernels as the ctypes path (cpu_kernels.c, included below), with the same
 * arguments, so its results are bit for bit those of fxghost.backends.cpu.CpuKernelGhostNorm.
 * What it removes is the Python around them: the autograd.Function's forward and backward, the
 * ctypes argument conversion and a dozen small tensor calls. On a tabular (N, C) layer these cost
 * about as much as the kernels themselves; here they are a dispatcher call and a C++ autograd
 * node.
 * Under create_graph=True its backward is, like the Function's, differentiable ATen ops instead
 * of the kernels (fxghost._math.differentiable_backward).
 */
#define restrict __restrict__
extern "C" {
#include "cpu_kernels.c"
}
#undef restrict

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <vector>

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

/* A named namespace: autograd shows the backward node as CppNode<fxghost::GhostNorm>. */
namespace fxghost {

using Dims = std::array<int64_t, 4>;

/* (G, A, C, S): how the grouped tensor's elements lie in memory, as fxghost.backends._dims
   found it (the caller passes only dense inputs); checked against the element count, so that a
   wrong call fails instead of reading out of bounds. */
Dims to_dims(c10::IntArrayRef dims, const Tensor &xg) {
    TORCH_CHECK(dims.size() == 4 && dims[0] * dims[1] * dims[2] * dims[3] == xg.numel() &&
                    dims[0] == xg.size(0) && dims[2] == xg.size(2),
                "fxghost: layout ", dims, " does not describe a grouped tensor of shape ",
                xg.sizes());
    return Dims{dims[0], dims[1], dims[2], dims[3]};
}

int64_t threads(int64_t numel) {
    /* Below this many elements a parallel region costs more than it saves (as in _cpu.py). */
    return numel >= (int64_t{1} << 16) ? at::get_num_threads() : 1;
}

/* A weight or bias as the kernels read it: contiguous, in the input's dtype; or undefined. */
Tensor as_param(const Tensor &p, const Tensor &like) {
    if (!p.defined() || (p.scalar_type() == like.scalar_type() && p.is_contiguous())) return p;
    return p.detach().to(like.scalar_type()).contiguous();
}

template <typename T>
const T *ptr_or_null(const Tensor &t) {
    return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

template <typename T>
T *mutable_ptr_or_null(const Tensor &t) {
    return t.defined() ? t.data_ptr<T>() : nullptr;
}

/* The C source defines each kernel twice, for float (_f32) and double (_f64). */
template <typename T>
struct Kernels;
template <>
struct Kernels<float> {
    static constexpr auto forward = fxg_forward_f32;
    static constexpr auto backward = fxg_backward_f32;
    static constexpr auto running = fxg_running_f32;
};
template <>
struct Kernels<double> {
    static constexpr auto forward = fxg_forward_f64;
    static constexpr auto backward = fxg_backward_f64;
    static constexpr auto running = fxg_running_f64;
};

/* f(T{}) with T the C type of xg's dtype. */
template <typename F>
void by_dtype(const Tensor &xg, F &&f) {
    switch (xg.scalar_type()) {
    case at::kFloat:
        return f(float{});
    case at::kDouble:
        return f(double{});
    default:
        TORCH_CHECK(false, "fxghost: the CPU kernels take float32 and float64, got ",
                    xg.scalar_type());
    }
}

/* (G, C) values shaped (G, 1, C, 1...) for a grouped tensor of `dim` dims. */
Tensor standard(const Tensor &stat, int64_t dim) {
    std::vector<int64_t> shape(dim, 1);
    shape[0] = stat.size(0);
    shape[2] = stat.size(1);
    return stat.view(shape);
}

void check(int failed) {
    /* torch.OutOfMemoryError in Python, where the ctypes path raises MemoryError. */
    TORCH_CHECK_WITH(OutOfMemoryError, !failed,
                     "fxghost: the CPU kernels could not allocate their scratch memory");
}

/* The running-statistics update of fxghost._math.update_running_stats for the ghost batches of
   one call: running = beta * running + sum_g ema_weights[g] * stat[g], the variance scaled by
   unbias, through the same C function the Python path calls, and num_batches_tracked += G. */
struct RunningUpdate {
    Tensor running_mean, running_var, ema_weights;
    std::optional<Tensor> num_batches_tracked;
    double beta, unbias;
};

struct GhostNorm : public torch::autograd::Function<GhostNorm> {
    /* update (not a tensor argument, so not an input autograd sees) is applied before forward
       returns, and so before autograd saves anything: under activation checkpointing PyTorch
       ends the recomputation as soon as the last tensor the backward needs is saved again, and
       an update made after this op would not run again there (fxghost.backends.Backend.norm). */
    static variable_list forward(AutogradContext *ctx, const Tensor &xg,
                                 const std::optional<Tensor> &weight,
                                 const std::optional<Tensor> &bias, double eps,
                                 c10::IntArrayRef dims, const RunningUpdate *update) {
        const Dims d = to_dims(dims, xg);
        /* A dense input's strides: y is laid out as xg, sample-first, and not a view. */
        Tensor y = at::empty_like(xg.flatten(0, 1));
        auto opts = xg.options();
        Tensor mean = at::empty({d[0], d[2]}, opts), var = at::empty({d[0], d[2]}, opts),
               rstd = at::empty({d[0], d[2]}, opts);
        Tensor w = as_param(weight.value_or(Tensor()), xg);
        Tensor b = as_param(bias.value_or(Tensor()), xg);
        by_dtype(xg, [&](auto zero) {
            using T = decltype(zero);
            check(Kernels<T>::forward(xg.const_data_ptr<T>(), y.data_ptr<T>(), ptr_or_null<T>(w),
                                      ptr_or_null<T>(b), mean.data_ptr<T>(), var.data_ptr<T>(),
                                      rstd.data_ptr<T>(), d[0], d[1], d[2], d[3], eps,
                                      threads(xg.numel())));
        });
        if (update) {
            by_dtype(xg, [&](auto zero) {
                using T = decltype(zero);
                check(Kernels<T>::running(mean.const_data_ptr<T>(), var.const_data_ptr<T>(),
                                          update->ema_weights.const_data_ptr<T>(), d[0], d[2],
                                          update->beta, update->unbias,
                                          update->running_mean.data_ptr<T>(),
                                          update->running_var.data_ptr<T>()));
            });
            if (update->num_batches_tracked) update->num_batches_tracked->add_(d[0]);
        }
        ctx->save_for_backward({xg, weight ? *weight : Tensor(), mean, rstd});
        ctx->saved_data["eps"] = eps;
        ctx->saved_data["dims"] = dims;
        /* The bias's dtype (its gradient's), or -1 without a bias: the backward needs no more
           of it. The weight's is the saved weight's. */
        ctx->saved_data["bias_dtype"] =
            bias && bias->defined() ? static_cast<int64_t>(bias->scalar_type()) : int64_t{-1};
        /* mean and var are not differentiable: no zero gradients need to be made up for them. */
        ctx->set_materialize_grads(false);
        Tensor mean_s = standard(mean, xg.dim()), var_s = standard(var, xg.dim());
        ctx->mark_non_differentiable({mean_s, var_s});
        return {y, mean_s, var_s};
    }

    /* One gradient per argument of forward: x, weight, bias, then three non-tensors. */
    static variable_list gradients(const Tensor &dx, const Tensor &dweight, const Tensor &dbias) {
        return {dx, dweight, dbias, Tensor(), Tensor(), Tensor()};
    }

    /* The gradient of the weight (i = 1) or the bias (i = 2) from its (C,) total, in the
       parameter's dtype; undefined where the layer lacks the parameter or it needs none.
       needs_input_grad counts the tensor inputs autograd saw, and a missing parameter is none
       of them. */
    static Tensor param_grad(AutogradContext *ctx, const Tensor &weight, const Tensor &total,
                             size_t i) {
        const int64_t bias_dtype = ctx->saved_data["bias_dtype"].toInt();
        if (i == 1 ? !weight.defined() || !ctx->needs_input_grad(1)
                   : bias_dtype < 0 || !ctx->needs_input_grad(weight.defined() ? 2 : 1))
            return Tensor();
        const auto dtype = i == 1 ? weight.scalar_type() : static_cast<at::ScalarType>(bias_dtype);
        return total.scalar_type() == dtype ? total : total.to(dtype);
    }

    /* grads by reference: the engine's own list, so that the incoming gradient's use count
       says whether anything else holds it (a copy of the list would hold it too). */
    static variable_list backward(AutogradContext *ctx, variable_list &grads) {
        if (!grads[0].defined()) return gradients(Tensor(), Tensor(), Tensor());
        /* create_graph=True: the gradients must be differentiable, which the kernels' are not */
        if (at::GradMode::is_enabled()) return differentiable_backward(ctx, grads[0]);
        variable_list out;
        {
            auto saved = ctx->get_saved_variables();
            const Tensor &xg = saved[0], &weight = saved[1], &mean = saved[2], &rstd = saved[3];
            const Dims d = to_dims(ctx->saved_data["dims"].toIntVector(), xg);
            bool own_dy = spent(grads[0], xg);
            Tensor dy = grads[0].view(xg.sizes()); /* splitting dim 0 into (G, c): a view */
            grads.clear(); /* dy is the only reference to the incoming gradient now */
            if (dy.strides() != xg.strides()) { /* bring it to x's layout, in a copy of our own */
                dy = at::empty_like(xg).copy_(dy);
                own_dy = true;
            }
            /* The input gradient written over dy where no one else can see dy: one activation-
               sized allocation (and its page faults) fewer per layer, and a lower peak. */
            Tensor dx;
            if (ctx->needs_input_grad(0)) dx = own_dy ? dy : at::empty_like(xg);
            Tensor gw = at::empty({d[2]}, xg.options()), gb = at::empty({d[2]}, xg.options());
            Tensor w = as_param(weight, xg);
            by_dtype(xg, [&](auto zero) {
                using T = decltype(zero);
                check(Kernels<T>::backward(dy.const_data_ptr<T>(), xg.const_data_ptr<T>(),
                                           ptr_or_null<T>(w), mean.const_data_ptr<T>(),
                                           rstd.const_data_ptr<T>(), mutable_ptr_or_null<T>(dx),
                                           gw.data_ptr<T>(), gb.data_ptr<T>(), d[0], d[1], d[2],
                                           d[3], threads(xg.numel())));
            });
            /* The totals are in the input's dtype; the gradients go in the parameters'. */
            out = gradients(dx, param_grad(ctx, weight, gw, 1), param_grad(ctx, weight, gb, 2));
        }
        return out;
    }

    /* fxghost._math.differentiable_backward in ATen ops: BatchNorm's backward with the
       statistics recomputed from x (the forward's were computed without autograd), so that the
       gradients depend on x, the weight and dy through ops autograd can differentiate again. */
    static variable_list differentiable_backward(AutogradContext *ctx, const Tensor &grad) {
        auto saved = ctx->get_saved_variables();
        const Tensor &xg = saved[0], &weight = saved[1];
        const double eps = ctx->saved_data["eps"].toDouble();
        std::vector<int64_t> dims{1}, channel_shape(xg.dim(), 1);
        for (int64_t d = 3; d < xg.dim(); d++) dims.push_back(d);
        channel_shape[2] = xg.size(2);
        const Tensor g = grad.view(xg.sizes()); /* sample-first to grouped: a view */
        auto [var, mean] = at::var_mean(xg, dims, /*correction=*/0, /*keepdim=*/true);
        const Tensor rstd = at::rsqrt(var + eps);
        const Tensor xhat = (xg - mean) * rstd;
        const Tensor sum_dy = g.sum(dims, /*keepdim=*/true);
        const Tensor sum_dy_xhat = (g * xhat).sum(dims, /*keepdim=*/true);
        Tensor dx;
        if (ctx->needs_input_grad(0)) {
            const int64_t per_group = xg.size(0) * xg.size(2);
            const double count = static_cast<double>(per_group ? xg.numel() / per_group : 0);
            Tensor k = rstd;
            if (weight.defined()) k = rstd * weight.to(xg.scalar_type()).view(channel_shape);
            dx = k * (g - sum_dy / count - xhat * (sum_dy_xhat / count));
        }
        return gradients(dx, param_grad(ctx, weight, sum_dy_xhat.sum(0).flatten(), 1),
                         param_grad(ctx, weight, sum_dy.sum(0).flatten(), 2));
    }

    /* Whether the incoming gradient can be overwritten: nothing else holds the tensor or its
       memory (the autograd engine hands it over; a caller's own dy, a hooked gradient or a view
       of a kept tensor is held elsewhere), it is not part of a graph (create_graph), it has x's
       dtype and device, and it fills its memory exactly (dx keeps that memory alive: a slice of
       a larger gradient would keep all of it). */
    static bool spent(const Tensor &g, const Tensor &xg) {
        return g.use_count() == 1 && g.storage().use_count() == 1 && !g.requires_grad() &&
               g.scalar_type() == xg.scalar_type() && g.device() == xg.device() &&
               g.layout() == at::kStrided && !g.is_conj() && !g.is_neg() &&
               g.storage_offset() == 0 && !g.is_inference() &&
               g.storage().nbytes() == static_cast<size_t>(g.numel()) * g.element_size();
    }
};

std::tuple<Tensor, Tensor, Tensor> eager_cpu_ghost_norm(const Tensor &xg,
                                                        const std::optional<Tensor> &weight,
                                                        const std::optional<Tensor> &bias,
                                                        double eps, c10::IntArrayRef dims) {
    auto out = GhostNorm::apply(xg, weight, bias, eps, dims, nullptr);
    return {out[0], out[1], out[2]};
}

/* eager_cpu_ghost_norm with the running-statistics update of these ghost batches (RunningUpdate),
   made inside the op. The update is a third of a tabular layer's Python cost when made from
   Python (a cached-weights lookup, ctypes, an add_). */
std::tuple<Tensor, Tensor, Tensor> eager_cpu_ghost_norm_update(
    const Tensor &xg, const std::optional<Tensor> &weight, const std::optional<Tensor> &bias,
    double eps, const Tensor &running_mean, const Tensor &running_var,
    const std::optional<Tensor> &num_batches_tracked, const Tensor &ema_weights, double beta,
    double unbias, c10::IntArrayRef dims) {
    const int64_t groups = xg.size(0), channels = xg.size(2);
    for (const Tensor *t : {&running_mean, &running_var, &ema_weights}) {
        TORCH_CHECK(t->scalar_type() == xg.scalar_type() && t->is_cpu() && t->is_contiguous() &&
                        t->dim() == 1,
                    "fxghost: the running statistics and weights must be contiguous 1-D CPU "
                    "tensors in the input's dtype, got ",
                    t->scalar_type(), " with strides ", t->strides(), " on ", t->device());
    }
    TORCH_CHECK(running_mean.numel() == channels && running_var.numel() == channels,
                "fxghost: running statistics of ", running_mean.numel(), " and ",
                running_var.numel(), " values for ", channels, " channels");
    TORCH_CHECK(ema_weights.numel() >= groups, "fxghost: ", ema_weights.numel(),
                " update weights for ", groups, " ghost batches");
    const RunningUpdate update{running_mean, running_var, ema_weights, num_batches_tracked, beta,
                               unbias};
    auto out = GhostNorm::apply(xg, weight, bias, eps, dims, &update);
    return {out[0], out[1], out[2]};
}

} // namespace fxghost

/* A fragment: the namespace's other ops are defined from Python (torch.library). */
TORCH_LIBRARY_FRAGMENT(fxghost, m) {
    m.def("eager_cpu_ghost_norm(Tensor xg, Tensor? weight, Tensor? bias, float eps, int[] dims)"
          " -> (Tensor, Tensor, Tensor)");
    m.def("eager_cpu_ghost_norm_update(Tensor xg, Tensor? weight, Tensor? bias, float eps,"
          " Tensor(a!) running_mean, Tensor(b!) running_var, Tensor(c!)? num_batches_tracked,"
          " Tensor ema_weights, float beta, float unbias, int[] dims) -> (Tensor, Tensor, Tensor)");
}

/* CompositeImplicitAutograd: the op is its own autograd formula (the Function above), so the
   dispatcher runs it directly, without a separate autograd kernel. */
TORCH_LIBRARY_IMPL(fxghost, CompositeImplicitAutograd, m) {
    m.impl("eager_cpu_ghost_norm", fxghost::eager_cpu_ghost_norm);
    m.impl("eager_cpu_ghost_norm_update", fxghost::eager_cpu_ghost_norm_update);
}
