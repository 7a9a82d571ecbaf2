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

/* The dtype of everything but the input and output: float32 for 16-bit inputs. */
at::ScalarType stat_type(const Tensor &xg) {
    const auto t = xg.scalar_type();
    return t == at::kBFloat16 || t == at::kHalf ? at::kFloat : t;
}

/* A weight or bias as the kernels read it: contiguous, in the statistics' dtype; or undefined. */
Tensor as_param(const Tensor &p, const Tensor &like) {
    const auto dtype = stat_type(like);
    if (!p.defined() || (p.scalar_type() == dtype && p.is_contiguous())) return p;
    return p.detach().to(dtype).contiguous();
}

/* The C source defines each kernel per input type: its elements' C type T, the C type F of
   everything else (parameters, statistics, running statistics), and the kernels. */
struct F32 {
    using T = float;
    using F = float;
    static constexpr auto forward = fxg_forward_f32;
    static constexpr auto backward = fxg_backward_f32;
    static constexpr auto running = fxg_running_f32;
};
struct F64 {
    using T = double;
    using F = double;
    static constexpr auto forward = fxg_forward_f64;
    static constexpr auto backward = fxg_backward_f64;
    static constexpr auto running = fxg_running_f64;
};
struct BF16 {
    using T = uint16_t; /* bfloat16's bits: the kernels convert */
    using F = float;
    static constexpr auto forward = fxg_forward_bf16;
    static constexpr auto backward = fxg_backward_bf16;
    static constexpr auto running = fxg_running_bf16;
};
struct F16 {
    using T = uint16_t; /* float16's bits */
    using F = float;
    static constexpr auto forward = fxg_forward_f16;
    static constexpr auto backward = fxg_backward_f16;
    static constexpr auto running = fxg_running_f16;
};

/* f(K{}) with K the kernels of xg's dtype. */
template <typename Fn>
void by_dtype(const Tensor &xg, Fn &&f) {
    switch (xg.scalar_type()) {
    case at::kFloat:
        return f(F32{});
    case at::kDouble:
        return f(F64{});
    case at::kBFloat16:
        return f(BF16{});
    case at::kHalf:
        return f(F16{});
    default:
        TORCH_CHECK(false, "fxghost: the CPU kernels take float32, float64, bfloat16 and float16, "
                    "got ", xg.scalar_type());
    }
}

/* A tensor's data as the kernels' pointer type (bfloat16 and float16 as their C types). */
template <typename T>
const T *cptr(const Tensor &t) {
    return t.defined() ? static_cast<const T *>(t.const_data_ptr()) : nullptr;
}

template <typename T>
T *mptr(const Tensor &t) {
    return t.defined() ? static_cast<T *>(t.data_ptr()) : nullptr;
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

/* The ReLU epilogue of a call: y = relu(bn(x) + residual) (relu(bn(x)) without a residual, which
   the caller lays out as x and gives x's dtype). */
struct Epilogue {
    bool relu = false;
    Tensor residual;
};

struct GhostNorm : public torch::autograd::Function<GhostNorm> {
    /* update (not a tensor argument, so not an input autograd sees) is applied before forward
       returns, and so before autograd saves anything: under activation checkpointing PyTorch
       ends the recomputation as soon as the last tensor the backward needs is saved again, and
       an update made after this op would not run again there (fxghost.backends.Backend.norm).
       residual is an input (its gradient is the masked incoming gradient), undefined without
       one. */
    static variable_list forward(AutogradContext *ctx, const Tensor &xg,
                                 const std::optional<Tensor> &weight,
                                 const std::optional<Tensor> &bias,
                                 const std::optional<Tensor> &residual_arg, double eps,
                                 c10::IntArrayRef dims, bool relu, const RunningUpdate *update) {
        const Dims d = to_dims(dims, xg);
        const Tensor residual = residual_arg.value_or(Tensor());
        if (residual.defined())
            TORCH_CHECK(relu && residual.sizes() == xg.sizes() &&
                            residual.strides() == xg.strides() &&
                            residual.scalar_type() == xg.scalar_type(),
                        "fxghost: a residual must come with relu and be laid out as the input");
        /* A dense input's strides: y is laid out as xg, sample-first, and not a view. */
        Tensor y = at::empty_like(xg.flatten(0, 1));
        auto opts = xg.options().dtype(stat_type(xg));
        Tensor mean = at::empty({d[0], d[2]}, opts), var = at::empty({d[0], d[2]}, opts),
               rstd = at::empty({d[0], d[2]}, opts);
        Tensor w = as_param(weight.value_or(Tensor()), xg);
        Tensor b = as_param(bias.value_or(Tensor()), xg);
        by_dtype(xg, [&](auto k) {
            using K = decltype(k);
            using T = typename K::T;
            using F = typename K::F;
            check(K::forward(cptr<T>(xg), cptr<T>(residual), mptr<T>(y), cptr<F>(w), cptr<F>(b),
                             mptr<F>(mean), mptr<F>(var), mptr<F>(rstd), d[0], d[1], d[2], d[3],
                             eps, relu ? 1 : 0, threads(xg.numel())));
            if (update) {
                check(K::running(cptr<F>(mean), cptr<F>(var), cptr<F>(update->ema_weights), d[0],
                                 d[2], update->beta, update->unbias,
                                 mptr<F>(update->running_mean), mptr<F>(update->running_var)));
            }
        });
        if (update && update->num_batches_tracked) update->num_batches_tracked->add_(d[0]);
        /* With the epilogue, y masks the backward's gradient, as ReLU's own backward does; an
           unfused ReLU saves the same tensor. */
        ctx->save_for_backward({xg, weight ? *weight : Tensor(), mean, rstd, relu ? y : Tensor()});
        ctx->saved_data["eps"] = eps;
        ctx->saved_data["dims"] = dims;
        /* The bias's dtype (its gradient's), or -1 without a bias: the backward needs no more
           of it. The weight's is the saved weight's. */
        ctx->saved_data["bias_dtype"] =
            bias && bias->defined() ? static_cast<int64_t>(bias->scalar_type()) : int64_t{-1};
        ctx->saved_data["residual"] = residual.defined();
        /* mean and var are not differentiable: no zero gradients need to be made up for them. */
        ctx->set_materialize_grads(false);
        Tensor mean_s = standard(mean, xg.dim()), var_s = standard(var, xg.dim());
        ctx->mark_non_differentiable({mean_s, var_s});
        return {y, mean_s, var_s};
    }

    /* One gradient per argument of forward: x, weight, bias, residual, then four non-tensors. */
    static variable_list gradients(const Tensor &dx, const Tensor &dweight, const Tensor &dbias,
                                   const Tensor &dresidual) {
        return {dx, dweight, dbias, dresidual, Tensor(), Tensor(), Tensor(), Tensor()};
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

    /* Whether the residual (the input after x and the parameters) needs a gradient. */
    static bool residual_needs_grad(AutogradContext *ctx, const Tensor &weight) {
        if (!ctx->saved_data["residual"].toBool()) return false;
        const size_t i =
            1 + weight.defined() + (ctx->saved_data["bias_dtype"].toInt() >= 0 ? 1 : 0);
        return ctx->needs_input_grad(i);
    }

    /* grads by reference: the engine's own list, so that the incoming gradient's use count
       says whether anything else holds it (a copy of the list would hold it too). */
    static variable_list backward(AutogradContext *ctx, variable_list &grads) {
        if (!grads[0].defined()) return gradients(Tensor(), Tensor(), Tensor(), Tensor());
        /* create_graph=True: the gradients must be differentiable, which the kernels' are not */
        if (at::GradMode::is_enabled()) return differentiable_backward(ctx, grads[0]);
        variable_list out;
        {
            auto saved = ctx->get_saved_variables();
            const Tensor &xg = saved[0], &weight = saved[1], &mean = saved[2], &rstd = saved[3];
            const Tensor &y = saved[4];
            Tensor mask = y.defined() ? y.view(xg.sizes()) : Tensor(); /* as dy: a view */
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
            Tensor dx, dres;
            if (ctx->needs_input_grad(0)) dx = own_dy ? dy : at::empty_like(xg);
            if (residual_needs_grad(ctx, weight)) dres = at::empty_like(xg);
            auto sopts = xg.options().dtype(stat_type(xg));
            Tensor gw = at::empty({d[2]}, sopts), gb = at::empty({d[2]}, sopts);
            Tensor w = as_param(weight, xg);
            by_dtype(xg, [&](auto k) {
                using K = decltype(k);
                using T = typename K::T;
                using F = typename K::F;
                check(K::backward(cptr<T>(dy), cptr<T>(mask), cptr<T>(xg), cptr<F>(w),
                                  cptr<F>(mean), cptr<F>(rstd), mptr<T>(dx), mptr<T>(dres),
                                  mptr<F>(gw), mptr<F>(gb), d[0], d[1], d[2], d[3],
                                  threads(xg.numel())));
            });
            /* The totals are in the statistics' dtype; the gradients go in the parameters'. */
            out = gradients(dx, param_grad(ctx, weight, gw, 1), param_grad(ctx, weight, gb, 2),
                            dres);
        }
        return out;
    }

    /* fxghost._math.differentiable_backward in ATen ops: BatchNorm's backward with the
       statistics recomputed from x (the forward's were computed without autograd), so that the
       gradients depend on x, the weight and dy through ops autograd can differentiate again.
       The epilogue's mask is ReLU's own backward, threshold_backward, differentiable in dy. */
    static variable_list differentiable_backward(AutogradContext *ctx, const Tensor &grad) {
        auto saved = ctx->get_saved_variables();
        const Tensor &xg = saved[0], &weight = saved[1], &y = saved[4];
        const double eps = ctx->saved_data["eps"].toDouble();
        std::vector<int64_t> dims{1}, channel_shape(xg.dim(), 1);
        for (int64_t d = 3; d < xg.dim(); d++) dims.push_back(d);
        channel_shape[2] = xg.size(2);
        const Tensor masked = y.defined() ? at::threshold_backward(grad, y.detach(), 0) : grad;
        const Tensor g = masked.view(xg.sizes()); /* sample-first to grouped: a view */
        const auto st = stat_type(xg);
        const Tensor xs = xg.to(st), gs = g.to(st);
        auto [var, mean] = at::var_mean(xs, dims, /*correction=*/0, /*keepdim=*/true);
        const Tensor rstd = at::rsqrt(var + eps);
        const Tensor xhat = (xs - mean) * rstd;
        const Tensor sum_dy = gs.sum(dims, /*keepdim=*/true);
        const Tensor sum_dy_xhat = (gs * xhat).sum(dims, /*keepdim=*/true);
        Tensor dx;
        if (ctx->needs_input_grad(0)) {
            const int64_t per_group = xg.size(0) * xg.size(2);
            const double count = static_cast<double>(per_group ? xg.numel() / per_group : 0);
            Tensor k = rstd;
            if (weight.defined()) k = rstd * weight.to(st).view(channel_shape);
            dx = (k * (gs - sum_dy / count - xhat * (sum_dy_xhat / count))).to(xg.scalar_type());
        }
        const Tensor dres = residual_needs_grad(ctx, weight) ? g : Tensor();
        return gradients(dx, param_grad(ctx, weight, sum_dy_xhat.sum(0).flatten(), 1),
                         param_grad(ctx, weight, sum_dy.sum(0).flatten(), 2), dres);
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

std::tuple<Tensor, Tensor, Tensor> eager_cpu_ghost_norm(
    const Tensor &xg, const std::optional<Tensor> &weight, const std::optional<Tensor> &bias,
    double eps, c10::IntArrayRef dims, const std::optional<Tensor> &residual, bool relu) {
    auto out = GhostNorm::apply(xg, weight, bias, residual, eps, dims, relu, nullptr);
    return {out[0], out[1], out[2]};
}

/* eager_cpu_ghost_norm with the running-statistics update of these ghost batches (RunningUpdate),
   made inside the op. The update is a third of a tabular layer's Python cost when made from
   Python (a cached-weights lookup, ctypes, an add_). */
std::tuple<Tensor, Tensor, Tensor> eager_cpu_ghost_norm_update(
    const Tensor &xg, const std::optional<Tensor> &weight, const std::optional<Tensor> &bias,
    double eps, const Tensor &running_mean, const Tensor &running_var,
    const std::optional<Tensor> &num_batches_tracked, const Tensor &ema_weights, double beta,
    double unbias, c10::IntArrayRef dims, const std::optional<Tensor> &residual, bool relu) {
    const int64_t groups = xg.size(0), channels = xg.size(2);
    const auto st = stat_type(xg);
    for (const Tensor *t : {&running_mean, &running_var, &ema_weights}) {
        TORCH_CHECK(t->scalar_type() == st && t->is_cpu() && t->is_contiguous() && t->dim() == 1,
                    "fxghost: the running statistics and weights must be contiguous 1-D CPU "
                    "tensors in the statistics' dtype (", st, "), got ", t->scalar_type(),
                    " with strides ", t->strides(), " on ", t->device());
    }
    TORCH_CHECK(running_mean.numel() == channels && running_var.numel() == channels,
                "fxghost: running statistics of ", running_mean.numel(), " and ",
                running_var.numel(), " values for ", channels, " channels");
    TORCH_CHECK(ema_weights.numel() >= groups, "fxghost: ", ema_weights.numel(),
                " update weights for ", groups, " ghost batches");
    const RunningUpdate update{running_mean, running_var, ema_weights, num_batches_tracked, beta,
                               unbias};
    auto out = GhostNorm::apply(xg, weight, bias, residual, eps, dims, relu, &update);
    return {out[0], out[1], out[2]};
}

} // namespace fxghost

/* A fragment: the namespace's other ops are defined from Python (torch.library). */
TORCH_LIBRARY_FRAGMENT(fxghost, m) {
    m.def("eager_cpu_ghost_norm(Tensor xg, Tensor? weight, Tensor? bias, float eps, int[] dims,"
          " Tensor? residual=None, bool relu=False) -> (Tensor, Tensor, Tensor)");
    m.def("eager_cpu_ghost_norm_update(Tensor xg, Tensor? weight, Tensor? bias, float eps,"
          " Tensor(a!) running_mean, Tensor(b!) running_var, Tensor(c!)? num_batches_tracked,"
          " Tensor ema_weights, float beta, float unbias, int[] dims, Tensor? residual=None,"
          " bool relu=False) -> (Tensor, Tensor, Tensor)");
}

/* CompositeImplicitAutograd: the op is its own autograd formula (the Function above), so the
   dispatcher runs it directly, without a separate autograd kernel. */
TORCH_LIBRARY_IMPL(fxghost, CompositeImplicitAutograd, m) {
    m.impl("eager_cpu_ghost_norm", fxghost::eager_cpu_ghost_norm);
    m.impl("eager_cpu_ghost_norm_update", fxghost::eager_cpu_ghost_norm_update);
}
