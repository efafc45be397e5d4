#!/usr/bin/env bash
# The one GPU check: on a CUDA machine with torch preinstalled and no internet, build the
# extension for sm_90, run the self-check (`python -m ppo_fast`: every op, fused against the
# reference, on CPU and CUDA), the CUDA tests, the benchmarks, compute-sanitizer over a small
# workload, and print one compact table last. Target: under 8 minutes on one H200.
#
#   bash benchmarks/gpu_check.sh            # from the repository root
#
# Logs and benchmark JSON go to $OUT (or ./gpu_check_out when OUT is unset).
# Each later op adds its benchmark file to BENCHES and its sanitizer workload to sanitize.py.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PPO_FAST_REQUIRE_EXT=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} PPO_FAST_CUDA=1
# The system compiler: a wrapper that links libstdc++ statically into the extension (seen on the
# H200 image's /opt/gcc) gives it a second, uninitialised copy of the C++ locale, and the first
# error message that formats a number crashes. setup.py refuses such a build.
if [ -x /usr/bin/g++ ] && [ -x /usr/bin/gcc ]; then export CC=/usr/bin/gcc CXX=/usr/bin/g++; fi
BENCHES=(benchmarks/bench_gae.py benchmarks/bench_ppo_loss.py benchmarks/bench_moments.py benchmarks/bench_logprobs.py benchmarks/bench_linear_logprobs.py benchmarks/bench_lion.py benchmarks/bench_group_advantages.py benchmarks/bench_gelu_tanh.py)
status=()
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 ))s] $*"; }

stamp "device: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)"
$PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"

stamp "build (sm_${TORCH_CUDA_ARCH_LIST/./})"
if timeout 400 $PY setup.py -q build_ext --inplace >"$OUT/build.log" 2>&1; then
  status+=("build: ok")
else
  status+=("build: FAILED (tail of $OUT/build.log below)"); tail -40 "$OUT/build.log"
  printf '%s\n' "${status[@]}"; exit 1
fi

# First, once built: the self-check (seconds). Its lines go to the log and $OUT/selfcheck.log, its
# verdict and any MISMATCH/ERROR line to the status table at the end.
stamp "self-check (python -m ppo_fast)"
timeout 180 $PY -m ppo_fast 2>&1 | tee "$OUT/selfcheck.log"
rc=${PIPESTATUS[0]}
if [ "$rc" -eq 0 ]; then
  status+=("selfcheck: $(tail -1 "$OUT/selfcheck.log")")
else
  status+=("selfcheck: FAILED (rc $rc): $(tail -1 "$OUT/selfcheck.log")")
  while IFS= read -r line; do status+=("  $line"); done < <(grep -E "^(MISMATCH|ERROR) " "$OUT/selfcheck.log" | head -20)
fi

stamp "copy bandwidth"
$PY - <<'EOF' | tee "$OUT/copy_bw.txt"
import torch
n = 2**30  # 1 GiB per buffer (fp32 elements * 4 B)
x = torch.randn(n // 4, device="cuda"); y = torch.empty_like(x)
for _ in range(3): y.copy_(x)
s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
times = []
for _ in range(20):
    s.record(); y.copy_(x); e.record(); e.synchronize(); times.append(s.elapsed_time(e) / 1e3)
times.sort()
print(f"copy_GBps {2 * n / times[len(times) // 2] / 1e9:.1f}")
EOF

stamp "CUDA tests"
if timeout 240 $PY -m pytest tests -m cuda -q -p no:cacheprovider -x >"$OUT/tests.log" 2>&1; then
  status+=("cuda tests: $(tail -1 "$OUT/tests.log")")
else
  status+=("cuda tests: FAILED: $(tail -1 "$OUT/tests.log")"); grep -E "^(FAILED|ERROR)|Error|error" "$OUT/tests.log" | head -30
fi

for bench in "${BENCHES[@]}"; do
  name=$(basename "$bench" .py)
  stamp "benchmark $name"
  if timeout 300 $PY -m pytest "$bench" -k cuda --benchmark-only -q -p no:cacheprovider \
      --benchmark-json "$OUT/$name.json" >"$OUT/$name.log" 2>&1; then
    status+=("$name: $(tail -1 "$OUT/$name.log")")
  else
    status+=("$name: FAILED: $(tail -1 "$OUT/$name.log")"); grep -E "^(FAILED|ERROR)|Error" "$OUT/$name.log" | head -20
  fi
done

stamp "compute-sanitizer (memcheck, racecheck) on a small workload"
for tool in memcheck racecheck; do
  if timeout 100 compute-sanitizer --tool "$tool" --error-exitcode 9 $PY benchmarks/sanitize.py >"$OUT/sanitize_$tool.log" 2>&1; then
    status+=("sanitizer $tool: clean")
  else
    status+=("sanitizer $tool: FAILED (rc $?)"); grep -E "=========|Error" "$OUT/sanitize_$tool.log" | head -20
  fi
done

stamp "summary"
$PY benchmarks/summarize.py "$OUT" "${BENCHES[@]}"
[ -f "$OUT/bench_lion.json" ] && $PY benchmarks/bench_lion.py "$OUT/bench_lion.json"  # with bitsandbytes
printf '%s\n' "${status[@]}"
stamp "done"
