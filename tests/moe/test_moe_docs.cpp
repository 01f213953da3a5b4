// The MoE layer snippet of docs/api.md ("MoE layer"), compiled and run: the code between the
// BEGIN/END markers is the snippet (keep the two in sync).
#include <doctest/doctest.h>

#include <cstdint>
#include <random>
#include <vector>

#include <routegrad/routegrad.hpp>

namespace {

std::vector<float> random_vector(std::size_t n, std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<float> normal(0.0f, 0.3f);
  std::vector<float> v(n);
  for (float& x : v) x = normal(gen);
  return v;
}

TEST_SUITE("moe") {
  TEST_CASE("docs/api.md: the MoE layer snippet") {
    using routegrad::index_t;
    const index_t T = 10, d = 6, h = 5;
    const int E = 4;
    const std::uint64_t seed = 42, step = 0;
    std::vector<float> Wr_ = random_vector(E * d, 1), br_ = random_vector(E, 2),
                       W1_ = random_vector(E * 2 * h * d, 3), b1_ = random_vector(E * 2 * h, 4),
                       W2_ = random_vector(E * d * h, 5), b2_ = random_vector(E * d, 6),
                       omega_ = random_vector(d, 7), x_ = random_vector(T * d, 8),
                       dy_ = random_vector(T * d, 9), y_(T * d), dx_(T * d);
    std::vector<float> gWr_(Wr_.size()), gbr_(br_.size()), gW1_(W1_.size()), gb1_(b1_.size()),
        gW2_(W2_.size()), gb2_(b2_.size()), gomega_(omega_.size());
    float *Wr = Wr_.data(), *br = br_.data(), *W1 = W1_.data(), *b1 = b1_.data(), *W2 = W2_.data(),
          *b2 = b2_.data(), *omega = omega_.data(), *x = x_.data(), *y = y_.data(),
          *dy = dy_.data(), *dx = dx_.data();
    float *gWr = gWr_.data(), *gbr = gbr_.data(), *gW1 = gW1_.data(), *gb1 = gb1_.data(),
          *gW2 = gW2_.data(), *gb2 = gb2_.data(), *gomega = gomega_.data();

    // BEGIN snippet
    using namespace routegrad;
    moe_options opt;
    opt.d_model = d;
    opt.d_hidden = h;
    opt.experts = E;
    opt.act = activation::swiglu;          // W1 holds 2h rows per expert
    opt.use_omega = true;                  // learned output scale ω [d]
    opt.capacity_factor = 1.25;            // 0: dropless
    opt.routing.k = 2;                     // routing_options as for route_forward
    opt.routing.load_balance_coef = 0.01;  // α
    opt.routing.z_loss_coef = 0.001;       // β

    // Parameters [E, out, in] like torch.nn.Linear per expert; any strides.
    const host_moe_params<float> params{host_matrix<const float>(Wr, E, d),
                                        host_vector<const float>(br, E),
                                        host_view<const float, 3>(W1, {E, 2 * h, d}),
                                        host_matrix<const float>(b1, E, 2 * h),
                                        host_view<const float, 3>(W2, {E, d, h}),
                                        host_matrix<const float>(b2, E, d),
                                        host_vector<const float>(omega, d)};
    const host_moe_grads<float> grads{host_matrix(gWr, E, d),
                                      host_vector(gbr, E),
                                      host_view<float, 3>(gW1, {E, 2 * h, d}),
                                      host_matrix(gb1, E, 2 * h),
                                      host_view<float, 3>(gW2, {E, d, h}),
                                      host_matrix(gb2, E, d),
                                      host_vector(gomega, d)};

    // What the backward needs, in caller memory: cpu::moe_context_bytes<float>(opt, T) bytes
    // aligned to 256, or this owning buffer.
    cpu::moe_context<float> ctx(opt, T);
    std::vector<std::int64_t> kept(E);
    std::int64_t dropped = 0;
    double lb_loss = 0, z_loss = 0;
    host_moe_stats stats;
    stats.kept_counts = kept.data();
    stats.dropped_pairs = &dropped;
    stats.load_balance_loss = &lb_loss;
    stats.z_loss = &z_loss;

    check(moe_forward<sparsemixer_heun3>(opt, params, host_matrix(x, T, d), host_matrix(y, T, d),
                                         rng_stream{seed, step, 0}, ctx.view(), stats));
    // ... the loss adds lb_loss + z_loss; the framework computes dy = ∂loss/∂y ...
    check(moe_backward<sparsemixer_heun3>(opt, params, host_matrix(x, T, d), host_matrix(dy, T, d),
                                          ctx.cview(), grads, host_matrix(dx, T, d)));
    // END snippet

    std::int64_t total = dropped;
    for (std::int64_t n : kept) total += n;
    CHECK(total == T * 2);
    CHECK(lb_loss > 0.0);
    CHECK(z_loss > 0.0);
    double s = 0.0;
    for (float g : gW1_) s += static_cast<double>(g) * g;
    CHECK(s > 0.0);
  }
}

}  // namespace
