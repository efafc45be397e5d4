// CPU kernels for running reward moments: Chan-merged (count, mean, M2) in fp64, then
// x -> clip((x - mean?) / (std + eps)), std taken as 1 below two samples or when std <= eps.
// Batch moments are taken per fixed chunk (two passes, fp64) and merged in index order, so
// results do not depend on the thread count.
#include <ppo_fast/cpu_common.h>
#include <ppo_fast/moments.h>

#include <torch/library.h>

#include <vector>

namespace ppo_fast {
namespace moments {
namespace {

template <typename mask_t>
bool counted(const mask_t* mask, int64_t i) {
  return mask == nullptr || mask[i] != mask_t(0);
}

// The batch's (count, mean, M2, non-finite) over counted entries; non-finite values are counted
// apart and left out of the moments.
template <typename scalar_t, typename mask_t>
void batch_moments(const Job& job) {
  const scalar_t* x = as<scalar_t>(job.x);
  const mask_t* mask = as<mask_t>(job.mask);
  std::vector<cpu::MaskedMoments> parts(num_chunks(job.N));
  cpu::parallel_chunks(job.N, [&](int64_t c, int64_t lo, int64_t hi) {
    parts[c] = cpu::masked_moments<true>(
        lo, hi, [&](int64_t i) { return counted(mask, i); }, [&](int64_t i) { return static_cast<double>(x[i]); });
  });
  Moments<double> m{0, 0, 0};
  double bad = 0;
  for (const cpu::MaskedMoments& p : parts) {
    m = moments_merge(m, p.m);
    bad += p.nonfinite;
  }
  double* out = job.batch;
  out[kCount] = m.n;
  out[kMean] = m.mean;
  out[kM2] = m.m2;
  out[kNonFinite] = bad;
}

// Entries [i0, i1) normalised with x -> (x - shift) * mul, then clipped; masked-out entries pass
// through unchanged. A plain function, so that the job's pointers are locals kept in registers.
template <typename scalar_t, typename mask_t>
void normalize_range(const Job& job, int64_t i0, int64_t i1, at::opmath_type<scalar_t> shift,
                     at::opmath_type<scalar_t> mul) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* x = as<scalar_t>(job.x);
  const mask_t* mask = as<mask_t>(job.mask);
  scalar_t* out = as<scalar_t>(job.out);
  const Normalize p = job.p;
  for (int64_t i = i0; i < i1; ++i) {
    out[i] = counted(mask, i) ? static_cast<scalar_t>(normalize<acc_t>(static_cast<acc_t>(x[i]), shift, mul, p)) : x[i];
  }
}

template <typename scalar_t, typename mask_t>
void normalize_into(const Job& job) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t shift, mul;
  affine_of(job.state, job.p, shift, mul);
  at::parallel_for(0, job.N, 32768, [&](int64_t i0, int64_t i1) {
    normalize_range<scalar_t, mask_t>(job, i0, i1, shift, mul);
  });
}

void moments_pass(const Job& job) {
  cpu::dispatch(job.dtype, job.mask_bool, [&](auto s, auto mk) { batch_moments<decltype(s), decltype(mk)>(job); });
}

void merge_pass(const Job& job) {
  merge_batches(job.state, job.batches, job.n_batches);
}

void normalize_pass(const Job& job) {
  cpu::dispatch(job.dtype, job.mask_bool, [&](auto s, auto mk) { normalize_into<decltype(s), decltype(mk)>(job); });
}

void update_normalize_pass(const Job& job) {
  cpu::dispatch(job.dtype, job.mask_bool, [&](auto s, auto mk) {
    batch_moments<decltype(s), decltype(mk)>(job);
    merge_batches(job.state, job.batch, 1);
    normalize_into<decltype(s), decltype(mk)>(job);
  });
}

constexpr Kernels kCpu{&moments_pass, &merge_pass, &normalize_pass, &update_normalize_pass};

}  // namespace

TORCH_LIBRARY_IMPL(ppo_fast, CPU, m) {
  m.impl("moments", bound<&moments, kCpu>);
  m.impl("moments_merge_", bound<&moments_merge_, kCpu>);
  m.impl("moments_normalize", bound<&moments_normalize, kCpu>);
  m.impl("moments_update_normalize_", bound<&moments_update_normalize_, kCpu>);
}

}  // namespace moments
}  // namespace ppo_fast
