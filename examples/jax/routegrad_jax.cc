// routegrad's routing estimators as XLA FFI custom calls for JAX (CPU): the forward (choices,
// coins, gates) and the backward (logit gradients) on XLA's own buffers, with routegrad's
// validation errors returned as XLA errors. routegrad_jax.py builds this file into a shared
// library, registers the two handlers and wraps them in a jax.custom_vjp.
//
// Buffers are XLA's default (row-major, contiguous) layout. The counter offset travels as a
// uint32[2] array (low, high word) so that a jitted training step can change it without
// recompiling; the seed, estimator, k (the gates' shape) and ε are compile-time attributes.
#include <cstdint>

#include <xla/ffi/api/ffi.h>
#include <routegrad/routegrad.hpp>

namespace ffi = xla::ffi;

namespace {

// Aliases without commas, which the handler macro's arguments cannot hold.
using F32Matrix = ffi::Buffer<ffi::F32, 2>;
using S32Matrix = ffi::Buffer<ffi::S32, 2>;
using U8Matrix = ffi::Buffer<ffi::U8, 2>;
using Offset = ffi::Buffer<ffi::U32, 1>;
using F32Result = ffi::ResultBuffer<ffi::F32, 2>;
using S32Result = ffi::ResultBuffer<ffi::S32, 2>;
using U8Result = ffi::ResultBuffer<ffi::U8, 2>;

/// Calls f(Est{}) for the estimator code the Python side passes (its ESTIMATORS order).
template <class F>
ffi::Error with_estimator(std::int64_t code, F&& f) {
  switch (code) {
    case 0:
      return f(routegrad::switch_router{});
    case 1:
      return f(routegrad::topk_softmax{});
    case 2:
      return f(routegrad::sparsemixer_euler{});
    case 3:
      return f(routegrad::sparsemixer_midpoint{});
    case 4:
      return f(routegrad::sparsemixer_heun3{});
    default:
      return ffi::Error::InvalidArgument("routegrad: estimator: unknown code");
  }
}

ffi::Error to_ffi(const routegrad::status& s) {
  if (s) return ffi::Error::Success();
  return ffi::Error::InvalidArgument(routegrad::error(s).what());
}

/// A [rows, cols] view of a rank-2 XLA buffer (row-major).
template <class T, class Buffer>
routegrad::host_view<T, 2> matrix(Buffer& b) {
  const auto dims = b.dimensions();
  return routegrad::host_matrix(reinterpret_cast<T*>(b.untyped_data()), dims[0], dims[1]);
}

routegrad::routing_options options(std::int64_t k, float jitter_eps, bool train) {
  routegrad::routing_options opt;
  opt.k = static_cast<int>(k);
  opt.jitter_eps = jitter_eps;
  opt.mode = train ? routegrad::routing_mode::train : routegrad::routing_mode::eval;
  return opt;
}

routegrad::rng_stream rng(std::int64_t seed, const Offset& offset) {
  const std::uint32_t* w = offset.typed_data();
  return {static_cast<std::uint64_t>(seed), w[0] | (static_cast<std::uint64_t>(w[1]) << 32), 0};
}

ffi::Error forward(F32Matrix logits, Offset offset, F32Result gates, S32Result experts,
                   U8Result coins, std::int64_t estimator, std::int64_t seed, float jitter_eps,
                   bool train) {
  if (offset.element_count() != 2)
    return ffi::Error::InvalidArgument("routegrad: offset: must be uint32[2] (low, high)");
  const auto opt = options(gates->dimensions()[1], jitter_eps, train);
  const routegrad::host_routing_state state{matrix<std::int32_t>(*experts),
                                            matrix<std::uint8_t>(*coins), rng(seed, offset)};
  return with_estimator(estimator, [&](auto est) {
    using Est = decltype(est);
    return to_ffi(routegrad::route_forward<Est>(opt, matrix<const float>(logits), state,
                                                matrix<float>(*gates)));
  });
}

ffi::Error backward(F32Matrix logits, S32Matrix experts, U8Matrix coins, F32Matrix grad_gates,
                    Offset offset, F32Result grad_logits, std::int64_t estimator, std::int64_t seed,
                    float jitter_eps, bool train) {
  if (offset.element_count() != 2)
    return ffi::Error::InvalidArgument("routegrad: offset: must be uint32[2] (low, high)");
  const auto opt = options(experts.dimensions()[1], jitter_eps, train);
  const routegrad::host_routing_state state{matrix<std::int32_t>(experts),
                                            matrix<std::uint8_t>(coins), rng(seed, offset)};
  return with_estimator(estimator, [&](auto est) {
    using Est = decltype(est);
    return to_ffi(routegrad::route_backward<Est>(opt, matrix<const float>(logits), state,
                                                 matrix<const float>(grad_gates),
                                                 matrix<float>(*grad_logits)));
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RoutegradForward, forward,
                              ffi::Ffi::Bind()
                                  .Arg<F32Matrix>()  // logits [T, E]
                                  .Arg<Offset>()     // offset (low, high)
                                  .Ret<F32Matrix>()  // gates [T, k]
                                  .Ret<S32Matrix>()  // experts [T, k]
                                  .Ret<U8Matrix>()   // coins [T, k]
                                  .Attr<std::int64_t>("estimator")
                                  .Attr<std::int64_t>("seed")
                                  .Attr<float>("jitter_eps")
                                  .Attr<bool>("train"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(RoutegradBackward, backward,
                              ffi::Ffi::Bind()
                                  .Arg<F32Matrix>()  // logits [T, E]
                                  .Arg<S32Matrix>()  // experts [T, k]
                                  .Arg<U8Matrix>()   // coins [T, k]
                                  .Arg<F32Matrix>()  // grad_gates [T, k]
                                  .Arg<Offset>()     // offset (low, high)
                                  .Ret<F32Matrix>()  // grad_logits [T, E]
                                  .Attr<std::int64_t>("estimator")
                                  .Attr<std::int64_t>("seed")
                                  .Attr<float>("jitter_eps")
                                  .Attr<bool>("train"));
