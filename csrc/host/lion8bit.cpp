// Host entry point of the fused Lion step (lion8bit.h), shared by the CPU and CUDA backends:
// argument checks, contiguous grads, and the job (one entry per non-empty tensor) the kernel runs on.
#include <ppo_fast/lion8bit.h>

#include <string>
#include <vector>

namespace ppo_fast {
namespace lion8bit {
namespace {

HostTables build_tables() {
  HostTables t{};
  for (int k = 0; k < kMags; ++k) t.code[kZero + 1 + k] = kMag[k];
  for (int k = 0; k < kMags - 1; ++k) t.code[kZero - 1 - k] = -kMag[k];
  t.code[kZero] = 0.f;
  float thr[kMags - 1];
  for (int k = 0; k < kMags - 1; ++k) thr[k] = (kMag[k] + kMag[k + 1]) / 2.0f;
  TORCH_INTERNAL_ASSERT((float_bits(thr[0]) >> 16) == kKeyLo, "lion8bit: kKeyLo does not match the code table");
  int below = 0;  // thresholds below the current bucket's lower edge
  for (int b = 0; b < kBuckets; ++b) {
    const uint32_t key = kKeyLo + static_cast<uint32_t>(b);
    while (below < kMags - 1 && float_bits(thr[below]) < (key << 16)) ++below;
    uint32_t low = 0xFFFFu;
    if (below < kMags - 1 && (float_bits(thr[below]) >> 16) == key) {
      low = float_bits(thr[below]) & 0xFFFFu;
      TORCH_INTERNAL_ASSERT((below + 1 >= kMags - 1 || (float_bits(thr[below + 1]) >> 16) != key),
                            "lion8bit: two thresholds in one bucket");
    }
    t.bucket[b] = (static_cast<uint32_t>(below) << 16) | low;
  }
  return t;
}


// One tensor of the list, checked: grads made contiguous (kept alive here), momentum uint8 codes
// with an absmax per block (quantized) or fp32 with an empty absmax.
struct Item {
  at::Tensor p, g, m, absmax;
  bool quantized;
};

std::string at_(const char* name, size_t i) {
  return std::string(name) + "[" + std::to_string(i) + "]";
}

std::vector<Item> check_inputs(const char* op, at::TensorList params, at::TensorList grads, at::TensorList momentum,
                               at::TensorList absmax, double lr, double beta1, double beta2, double weight_decay) {
  TORCH_CHECK(std::isfinite(lr) && lr >= 0, op, ": lr must be finite and >= 0, got ", lr);
  TORCH_CHECK(beta1 >= 0 && beta1 <= 1, op, ": beta1 must be in [0, 1], got ", beta1);
  TORCH_CHECK(beta2 >= 0 && beta2 <= 1, op, ": beta2 must be in [0, 1], got ", beta2);
  TORCH_CHECK(std::isfinite(weight_decay) && weight_decay >= 0, op, ": weight_decay must be finite and >= 0, got ",
              weight_decay);
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && momentum.size() == n && absmax.size() == n, op,
              ": params, grads, momentum and absmax must have one entry per tensor, got ", n, ", ", grads.size(), ", ",
              momentum.size(), ", ", absmax.size());
  std::vector<Item> items;
  items.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor &p = params[i], &g = grads[i], &m = momentum[i], &a = absmax[i];
    const std::string pn = at_("params", i), gn = at_("grads", i), mn = at_("momentum", i), an = at_("absmax", i);
    const auto dt = p.scalar_type();
    TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op, ": ", pn,
                " must be float32, bfloat16 or float16, got ", dt);
    TORCH_CHECK(p.layout() == at::kStrided && p.is_contiguous(), op, ": ", pn, " must be a contiguous dense tensor");
    check::same_device(op, pn.c_str(), p, "params[0]", params[0]);
    check::same_device(op, gn.c_str(), g, "params[0]", params[0]);
    TORCH_CHECK(g.layout() == at::kStrided, op, ": ", gn, " must be a dense tensor, got layout ", g.layout());
    check::same_shape(op, gn.c_str(), g, pn.c_str(), p);
    check::same_dtype(op, gn.c_str(), g, pn.c_str(), p);
    check::same_device(op, mn.c_str(), m, "params[0]", params[0]);
    check::same_device(op, an.c_str(), a, "params[0]", params[0]);
    const bool quantized = m.scalar_type() == at::kByte;
    TORCH_CHECK(quantized || m.scalar_type() == at::kFloat, op, ": ", mn,
                " must be uint8 (8-bit state) or float32 (fp32 state), got ", m.scalar_type());
    TORCH_CHECK(m.numel() == p.numel(), op, ": ", mn, " must have ", p.numel(), " elements (one per element of ", pn,
                "), got ", m.numel());
    TORCH_CHECK(m.layout() == at::kStrided && m.is_contiguous(), op, ": ", mn, " must be a contiguous dense tensor");
    if (quantized) {
      TORCH_CHECK(a.scalar_type() == at::kFloat && a.numel() == num_blocks(p.numel()), op, ": ", an,
                  " must be float32 with ", num_blocks(p.numel()), " elements (one per 256 elements of ", pn, "), got ",
                  a.scalar_type(), " with ", a.numel());
      TORCH_CHECK(a.layout() == at::kStrided && a.is_contiguous(), op, ": ", an, " must be a contiguous dense tensor");
    } else {
      TORCH_CHECK(a.numel() == 0, op, ": ", an, " must be empty when ", mn, " is float32, got ", a.numel(),
                  " elements");
    }
    items.push_back(Item{p, g.contiguous(), m, a, quantized});
  }
  return items;
}

}  // namespace

const HostTables& host_tables() {
  static const HostTables tables = build_tables();
  return tables;
}

void lion8bit_step_(const Kernels& k, at::TensorList params, at::TensorList grads, at::TensorList momentum,
                    at::TensorList absmax, double lr, double beta1, double beta2, double weight_decay,
                    bool stochastic_rounding, int64_t seed) {
  const char* op = "lion8bit_step_";
  const std::vector<Item> items = check_inputs(op, params, grads, momentum, absmax, lr, beta1, beta2, weight_decay);
  std::vector<TensorJob> tensors;
  std::vector<int64_t> first{0};
  for (size_t i = 0; i < items.size(); ++i) {
    const Item& it = items[i];
    const int64_t n = it.p.numel();
    if (n == 0) continue;
    tensors.push_back(TensorJob{it.p.data_ptr(), it.g.data_ptr(), it.m.data_ptr(),
                                it.quantized ? it.absmax.data_ptr<float>() : nullptr, n, it.p.scalar_type(),
                                it.quantized, static_cast<uint32_t>(i)});
    first.push_back(first.back() + num_blocks(n));
  }
  if (tensors.empty()) return;
  Job job{};
  job.op = op;
  job.device = params[0].device().index();
  job.tensors = tensors.data();
  job.n_tensors = static_cast<int>(tensors.size());
  job.first = first.data();
  job.c = make_consts(lr, beta1, beta2, weight_decay);
  job.stochastic_rounding = stochastic_rounding;
  job.seed = static_cast<uint32_t>(seed);
  k.step(job);
}

}  // namespace lion8bit
}  // namespace ppo_fast
