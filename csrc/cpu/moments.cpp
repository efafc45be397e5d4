// CPU kernels for running reward moments: Chan-merged (count, mean, M2) in fp64, then
// x -> clip((x - mean?) / (std + eps)), std taken as 1 below two samples or when std <= eps. Batch moments are taken per fixed chunk (two passes, fp64)
// and merged in index order, so results do not depend on the thread count.
#include <ppo_fast/moments.h>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

namespace ppo_fast {
namespace moments {
namespace {

constexpr int64_t kChunk = 8192;

template <typename F>
void dispatch(const at::Tensor& x, const at::Tensor& mask, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "ppo_fast_moments", [&] {
    if (!mask.defined() || mask.scalar_type() == at::kBool) {
      f(scalar_t{}, bool{});
    } else {
      f(scalar_t{}, scalar_t{});
    }
  });
}

template <typename scalar_t, typename mask_t>
bool counted(const mask_t* mask, int64_t i) {
  return mask == nullptr || mask[i] != mask_t(0);
}

// The batch's (count, mean, M2, non-finite) over counted entries; non-finite values are counted
// apart and left out of the moments.
template <typename scalar_t, typename mask_t>
void batch_moments(const scalar_t* x, const mask_t* mask, int64_t N, double* out) {
  const int64_t chunks = (N + kChunk - 1) / kChunk;
  std::vector<double> parts(chunks * kSlots, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t lo = c * kChunk, hi = std::min(N, lo + kChunk);
      double n = 0, sum = 0, bad = 0;
      for (int64_t i = lo; i < hi; ++i) {
        if (!counted<scalar_t>(mask, i)) continue;
        const double v = static_cast<double>(x[i]);
        if (!is_finite(v)) {
          bad += 1;
          continue;
        }
        n += 1;
        sum += v;
      }
      const double mean = n > 0 ? sum / n : 0.0;
      double m2 = 0;
      for (int64_t i = lo; i < hi; ++i) {
        if (!counted<scalar_t>(mask, i)) continue;
        const double v = static_cast<double>(x[i]);
        if (is_finite(v)) m2 += (v - mean) * (v - mean);
      }
      double* p = &parts[c * kSlots];
      p[kCount] = n;
      p[kMean] = mean;
      p[kM2] = m2;
      p[kNonFinite] = bad;
    }
  });
  Moments<double> m{0, 0, 0};
  double bad = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    const double* p = &parts[c * kSlots];
    m = moments_merge(m, Moments<double>{p[kCount], p[kMean], p[kM2]});
    bad += p[kNonFinite];
  }
  out[kCount] = m.n;
  out[kMean] = m.mean;
  out[kM2] = m.m2;
  out[kNonFinite] = bad;
}

template <typename scalar_t, typename mask_t>
void normalize_into(const scalar_t* x, const mask_t* mask, scalar_t* out, int64_t N, const double* state,
                    const Normalize& p) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t shift, mul;
  affine_of(state, p, shift, mul);
  at::parallel_for(0, N, 32768, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      // Masked-out entries pass through unchanged.
      out[i] = counted<scalar_t>(mask, i) ? static_cast<scalar_t>(normalize<acc_t>(static_cast<acc_t>(x[i]), shift, mul, p))
                                          : x[i];
    }
  });
}

template <typename mask_t>
const mask_t* mask_ptr(const at::Tensor& mask) {
  return mask.defined() ? mask.data_ptr<mask_t>() : nullptr;
}

at::Tensor moments_cpu(const at::Tensor& x_in, const std::optional<at::Tensor>& mask_in) {
  const char* op = "moments";
  const at::Tensor mask = check_x(op, x_in, mask_in);
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty({kSlots}, x.options().dtype(at::kDouble));
  dispatch(x, mask, [&](auto s, auto mk) {
    using scalar_t = decltype(s);
    using mask_t = decltype(mk);
    batch_moments(x.data_ptr<scalar_t>(), mask_ptr<mask_t>(mask), x.numel(), out.data_ptr<double>());
  });
  return out;
}

void moments_merge_cpu(at::Tensor& state, const at::Tensor& batches) {
  const char* op = "moments_merge_";
  check_batches(op, state, batches);
  const at::Tensor b = batches.contiguous();
  merge_batches(state.data_ptr<double>(), b.data_ptr<double>(), b.size(0));
}

at::Tensor moments_normalize_cpu(const at::Tensor& x_in, const std::optional<at::Tensor>& mask_in,
                                 const at::Tensor& state, bool scale, bool center, std::optional<double> clip,
                                 double eps) {
  const char* op = "moments_normalize";
  const at::Tensor mask = check_x(op, x_in, mask_in);
  check_state(op, state, x_in);
  const Normalize p = check_normalize(op, scale, center, clip, eps);
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty_like(x);
  dispatch(x, mask, [&](auto s, auto mk) {
    using scalar_t = decltype(s);
    using mask_t = decltype(mk);
    normalize_into(x.data_ptr<scalar_t>(), mask_ptr<mask_t>(mask), out.data_ptr<scalar_t>(), x.numel(),
                   state.data_ptr<double>(), p);
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> moments_update_normalize_cpu(at::Tensor& state, const at::Tensor& x_in,
                                                                const std::optional<at::Tensor>& mask_in, bool scale,
                                                                bool center, std::optional<double> clip, double eps) {
  const char* op = "moments_update_normalize_";
  const at::Tensor mask = check_x(op, x_in, mask_in);
  check_state(op, state, x_in);
  const Normalize p = check_normalize(op, scale, center, clip, eps);
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = at::empty_like(x), batch = at::empty({kSlots}, x.options().dtype(at::kDouble));
  dispatch(x, mask, [&](auto s, auto mk) {
    using scalar_t = decltype(s);
    using mask_t = decltype(mk);
    const mask_t* m = mask_ptr<mask_t>(mask);
    batch_moments(x.data_ptr<scalar_t>(), m, x.numel(), batch.data_ptr<double>());
    merge_batches(state.data_ptr<double>(), batch.data_ptr<double>(), 1);
    normalize_into(x.data_ptr<scalar_t>(), m, out.data_ptr<scalar_t>(), x.numel(), state.data_ptr<double>(), p);
  });
  return {out, batch};
}

}  // namespace

TORCH_LIBRARY_IMPL(ppo_fast, CPU, m) {
  m.impl("moments", &moments_cpu);
  m.impl("moments_merge_", &moments_merge_cpu);
  m.impl("moments_normalize", &moments_normalize_cpu);
  m.impl("moments_update_normalize_", &moments_update_normalize_cpu);
}

}  // namespace moments
}  // namespace ppo_fast
