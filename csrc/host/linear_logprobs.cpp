// Host entry points of the fused LM-head log-prob op (linear_logprobs.h), shared by the CPU and CUDA
// backends: argument checks, the chunk loop, the GEMMs (ATen's: cuBLAS on CUDA, the CPU's BLAS on
// the CPU; none written here) and the [1, c, V] jobs handed to the backend's log-prob kernels.
#include <ppo_fast/linear_logprobs.h>

#include <c10/core/DeviceGuard.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <utility>

#ifdef __linux__
#include <sys/mman.h>
#endif

namespace ppo_fast {
namespace linear_logprobs {
namespace {

using logprobs::Job;
using logprobs::Kernels;

struct Shapes {
  int64_t B, T, H, V, N, chunk;
};

// The checks of both entry points, in the order of ppo_fast/_checks.py:check_linear_logprobs.
Shapes check_inputs(const char* op, const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& labels,
                    const std::optional<at::Tensor>& bias, double temperature, std::optional<int64_t> chunk_size) {
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, op, ": temperature must be finite and > 0, got ",
              temperature);
  TORCH_CHECK(!chunk_size || *chunk_size >= 1, op, ": chunk_size must be >= 1 (or None for the default), got ",
              *chunk_size);
  check::rank(op, "hidden", hidden, 3, "[B, T, H]");
  check::floating(op, "hidden", hidden);
  TORCH_CHECK(!(hidden.is_cuda() && hidden.scalar_type() == at::kDouble), op,
              ": CUDA tensors must be float32, bfloat16 or float16 (float64 runs on the CPU), got ",
              hidden.scalar_type());
  check::nonempty(op, "hidden", hidden);
  const int64_t B = hidden.size(0), T = hidden.size(1), H = hidden.size(2);
  check::same_device(op, "weight", weight, "hidden", hidden);
  check::rank(op, "weight", weight, 2, "[V, H]");
  check::same_dtype(op, "weight", weight, "hidden", hidden);
  TORCH_CHECK(weight.size(1) == H, op, ": weight must be [V, H] with H = ", H, " (the last dimension of hidden), got ",
              check::shape_str(weight));
  check::nonempty(op, "weight", weight);
  const int64_t V = weight.size(0);
  if (bias) {
    check::same_device(op, "bias", *bias, "hidden", hidden);
    check::same_dtype(op, "bias", *bias, "weight", weight);
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == V, op, ": bias must be [V] = [", V, "] to match weight ",
                check::shape_str(weight), ", got ", check::shape_str(*bias));
  }
  check::same_device(op, "labels", labels, "hidden", hidden);
  TORCH_CHECK(labels.scalar_type() == at::kLong || labels.scalar_type() == at::kInt, op,
              ": labels must be int64 or int32, got ", labels.scalar_type());
  TORCH_CHECK(labels.dim() == 2 && labels.size(0) == B && labels.size(1) == T, op, ": labels must be [B, T] = [", B,
              ", ", T, "] to match hidden ", check::shape_str(hidden), ", got ", check::shape_str(labels));
  const int64_t N = B * T;
  const int64_t chunk = chunk_size ? std::min(*chunk_size, N) : default_chunk_size(N, V, hidden.element_size());
  return {B, T, H, V, N, chunk};
}

// The [B, T] inputs of the backward: grad_logprob, lse, entropy and (optional) grad_entropy.
void check_backward_inputs(const char* op, const Shapes& s, const at::Tensor& hidden, const at::Tensor& grad_logprob,
                           const std::optional<at::Tensor>& grad_entropy, const at::Tensor& lse,
                           const at::Tensor& entropy) {
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"grad_logprob", &grad_logprob},
                                {"lse", &lse},
                                {"entropy", &entropy},
                                {"grad_entropy", grad_entropy ? &*grad_entropy : nullptr}}) {
    if (t == nullptr) continue;
    check::same_device(op, name, *t, "hidden", hidden);
    TORCH_CHECK(t->dim() == 2 && t->size(0) == s.B && t->size(1) == s.T, op, ": ", name, " must be [B, T] = [", s.B,
                ", ", s.T, "], got ", check::shape_str(*t));
  }
}

// Rows [r0, r0 + c) of hidden flattened to [N, H], as a matrix for the GEMMs: a view when hidden's
// (b, t) dimensions merge with a unit last stride (contiguous, B = 1 or T = 1), else a copy into a
// [chunk, H] staging buffer in at most three pieces (the end of one sequence, whole sequences, the
// start of the next). A sliced hidden (h[:, :-1], as the trainer passes it) so costs one chunk of
// rows, never a copy of the whole of it.
class HiddenRows {
 public:
  HiddenRows(const at::Tensor& hidden, int64_t chunk) : hidden_(hidden), T_(hidden.size(1)), H_(hidden.size(2)) {
    const int64_t B = hidden.size(0);
    if (hidden.stride(2) == 1 && (B == 1 || T_ == 1 || hidden.stride(0) == T_ * hidden.stride(1))) {
      flat_ = hidden.view({B * T_, H_});
    } else {
      stage_ = at::empty({chunk, H_}, hidden.options());
    }
  }

  at::Tensor rows(int64_t r0, int64_t c) const {
    if (flat_.defined()) return flat_.narrow(0, r0, c);
    at::Tensor out = stage_.narrow(0, 0, c);
    for (int64_t r = r0, end = r0 + c; r < end;) {
      const int64_t b = r / T_, t = r % T_;
      if (t == 0 && end - r >= T_) {
        const int64_t nb = (end - r) / T_;
        out.narrow(0, r - r0, nb * T_).view({nb, T_, H_}).copy_(hidden_.narrow(0, b, nb));
        r += nb * T_;
      } else {
        const int64_t len = std::min(T_ - t, end - r);
        out.narrow(0, r - r0, len).copy_(hidden_.select(0, b).narrow(0, t, len));
        r += len;
      }
    }
    return out;
  }

 private:
  at::Tensor hidden_, flat_, stage_;
  int64_t T_, H_;
};

// z = h W^T (+ bias) into the block z [c, V]. W^T is a transposed view: the GEMM reads W as stored.
void logits_into(at::Tensor& z, const at::Tensor& h, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
  if (bias) {
    at::addmm_out(z, *bias, h, weight.t());
  } else {
    at::mm_out(z, h, weight.t());
  }
}

// The [chunk, V] logits block, tens of MiB written afresh by every call. A CPU block that large comes
// from mmap, so every call would first-touch it page by page (~16k faults per 64 MiB, a fifth of the
// op's time at V = 32000, benchmarks/RESULTS.md). On Linux its 2 MiB-aligned span is given
// transparent huge pages (madvise, as torch's own THP_MEM_ALLOC_ENABLE does for every large
// allocation): ~32 faults instead. Advice only: where THP is off, or madvise fails, nothing changes.
at::Tensor logits_block(int64_t rows, int64_t V, const at::TensorOptions& options) {
  at::Tensor block = at::empty({rows, V}, options);
#ifdef __linux__
  if (block.is_cpu()) {
    constexpr std::uintptr_t kHugePage = std::uintptr_t(2) << 20;
    const auto p = reinterpret_cast<std::uintptr_t>(block.data_ptr());
    const std::uintptr_t begin = (p + kHugePage - 1) & ~(kHugePage - 1);
    const std::uintptr_t end = (p + block.nbytes()) & ~(kHugePage - 1);
    if (end > begin) (void)madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
  }
#endif
  return block;
}

// The log-prob job of one block z [c, V], read as [1, c, V]; per-row pointers are set by the caller.
Job block_job(const char* op, const at::Tensor& z, double temperature) {
  Job j{};
  j.op = op;
  j.device = z.device().index();
  j.dtype = z.scalar_type();
  j.B = 1;
  j.T = z.size(0);
  j.V = z.size(1);
  j.inv_t = 1.0 / temperature;
  j.logits = {z.data_ptr(), j.T, j.V, j.T * j.V, j.V};
  return j;
}

// Row r0 of a contiguous [B, T] tensor read as [N]: where a chunk's per-row values start.
void* at_row(const at::Tensor& t, int64_t r0) {
  return static_cast<char*>(t.data_ptr()) + r0 * t.element_size();
}

// The operands as the GEMMs want them: a weight that is neither row- nor column-major, and a strided
// bias, are made contiguous once (not once per chunk inside the GEMM); labels as contiguous int64.
struct Operands {
  at::Tensor weight, labels;
  std::optional<at::Tensor> bias;
};

Operands operands(const at::Tensor& weight, const at::Tensor& labels, const std::optional<at::Tensor>& bias) {
  const bool blas_ok = weight.stride(1) == 1 || weight.stride(0) == 1;
  Operands o{blas_ok ? weight : weight.contiguous(), labels.to(at::kLong).contiguous(), std::nullopt};
  if (bias) o.bias = bias->contiguous();
  return o;
}

}  // namespace

int64_t default_chunk_size(int64_t N, int64_t V, int64_t element_size) {
  const int64_t rows = std::max(kMinChunkRows, kChunkBytes / std::max<int64_t>(1, V * element_size));
  return std::min(N, rows);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprobs(const Kernels& k, const at::Tensor& hidden,
                                                               const at::Tensor& weight_in,
                                                               const at::Tensor& labels_in,
                                                               const std::optional<at::Tensor>& bias_in,
                                                               double temperature, std::optional<int64_t> chunk_size) {
  const char* op = "linear_logprobs";
  const Shapes s = check_inputs(op, hidden, weight_in, labels_in, bias_in, temperature, chunk_size);
  const c10::DeviceGuard guard(hidden.device());
  const Operands in = operands(weight_in, labels_in, bias_in);
  const auto acc = hidden.options().dtype(acc_dtype(hidden.scalar_type()));
  at::Tensor logprob = at::empty({s.B, s.T}, acc), entropy = at::empty({s.B, s.T}, acc);
  at::Tensor lse = at::empty({s.B, s.T}, acc);
  const HiddenRows rows(hidden, s.chunk);
  at::Tensor block = logits_block(s.chunk, s.V, hidden.options());
  for (int64_t r0 = 0; r0 < s.N; r0 += s.chunk) {
    const int64_t c = std::min(s.chunk, s.N - r0);
    at::Tensor z = block.narrow(0, 0, c);
    logits_into(z, rows.rows(r0, c), in.weight, in.bias);
    Job job = block_job(op, z, temperature);
    job.labels = in.labels.data_ptr<int64_t>() + r0;
    job.logprob = at_row(logprob, r0);
    job.entropy = at_row(entropy, r0);
    job.lse = at_row(lse, r0);
    k.forward(job);
  }
  return {logprob, entropy, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_logprobs_backward(
    const Kernels& k, const at::Tensor& grad_logprob, const std::optional<at::Tensor>& grad_entropy,
    const at::Tensor& hidden, const at::Tensor& weight_in, const at::Tensor& labels_in,
    const std::optional<at::Tensor>& bias_in, const at::Tensor& lse, const at::Tensor& entropy, double temperature,
    std::optional<int64_t> chunk_size, std::array<bool, 3> output_mask) {
  const char* op = "linear_logprobs_backward";
  const Shapes s = check_inputs(op, hidden, weight_in, labels_in, bias_in, temperature, chunk_size);
  check_backward_inputs(op, s, hidden, grad_logprob, grad_entropy, lse, entropy);
  const c10::DeviceGuard guard(hidden.device());
  const Operands in = operands(weight_in, labels_in, bias_in);
  const at::ScalarType acc = acc_dtype(hidden.scalar_type());
  const at::Tensor g_lp = grad_logprob.to(acc).contiguous(), ls = lse.to(acc).contiguous();
  const at::Tensor ent = entropy.to(acc).contiguous();
  const at::Tensor g_h = grad_entropy ? grad_entropy->to(acc).contiguous() : at::Tensor();
  const bool need_h = output_mask[0], need_w = output_mask[1], need_b = output_mask[2] && in.bias.has_value();
  const at::TensorOptions w_opts = weight_in.options();

  at::Tensor grad_hidden = need_h ? at::empty({s.B, s.T, s.H}, hidden.options()) : at::empty({0}, hidden.options());
  const at::Tensor grad_hidden_rows = need_h ? grad_hidden.view({s.N, s.H}) : at::Tensor();
  // d W accumulates in the accumulation dtype: in the gradient itself when that is the weight's dtype
  // (fp32, fp64), else in an fp32 accumulator. There a chunk's d W comes out of the GEMM in the
  // weight's dtype, in slabs of vocabulary rows no larger than the logits block, and is added in.
  const bool own_acc = weight_in.scalar_type() == acc;
  at::Tensor grad_w_acc, part;
  int64_t slab = s.V;
  if (need_w) {
    grad_w_acc = own_acc ? at::empty({s.V, s.H}, w_opts) : at::zeros({s.V, s.H}, w_opts.dtype(acc));
    if (!own_acc) {
      slab = std::clamp<int64_t>(s.chunk * s.V / s.H, 1, s.V);
      part = at::empty({slab, s.H}, w_opts);
    }
  }
  at::Tensor grad_b_acc = need_b ? at::zeros({s.V}, w_opts.dtype(acc)) : at::Tensor();

  const HiddenRows rows(hidden, s.chunk);
  at::Tensor block = logits_block(s.chunk, s.V, hidden.options());
  for (int64_t r0 = 0; r0 < s.N; r0 += s.chunk) {
    const int64_t c = std::min(s.chunk, s.N - r0);
    at::Tensor z = block.narrow(0, 0, c);
    const at::Tensor h = rows.rows(r0, c);
    logits_into(z, h, in.weight, in.bias);
    Job job = block_job(op, z, temperature);
    job.grad = job.logits;  // d logits in place of the logits
    job.labels = in.labels.data_ptr<int64_t>() + r0;
    job.grad_logprob = at_row(g_lp, r0);
    job.grad_entropy = g_h.defined() ? at_row(g_h, r0) : nullptr;
    job.lse = at_row(ls, r0);
    job.entropy = at_row(ent, r0);
    k.backward(job);
    // z is now d logits [c, V]: d hidden = dz W, d W += dz^T h (a transposed view again), d bias += sum dz.
    if (need_h) {
      at::Tensor out = grad_hidden_rows.narrow(0, r0, c);
      at::mm_out(out, z, in.weight);
    }
    if (need_w && own_acc) {
      if (r0 == 0) {
        at::mm_out(grad_w_acc, z.t(), h);
      } else {
        grad_w_acc.addmm_(z.t(), h);
      }
    } else if (need_w) {
      for (int64_t v0 = 0; v0 < s.V; v0 += slab) {
        const int64_t vb = std::min(slab, s.V - v0);
        at::Tensor p = part.narrow(0, 0, vb);
        at::mm_out(p, z.narrow(1, v0, vb).t(), h);
        grad_w_acc.narrow(0, v0, vb).add_(p);
      }
    }
    if (need_b) grad_b_acc.add_(at::sum(z, {0}, false, acc));
  }
  at::Tensor grad_w = !need_w ? at::empty({0}, w_opts) : own_acc ? grad_w_acc : grad_w_acc.to(w_opts.dtype());
  at::Tensor grad_b = need_b ? grad_b_acc.to(w_opts.dtype()) : at::empty({0}, w_opts);
  return {grad_hidden, grad_w, grad_b};
}

}  // namespace linear_logprobs
}  // namespace ppo_fast
