#!/usr/bin/env bash
# Creates the TRL side's venv for benchmarks/compare_trl (reused when it already has the right versions):
#   bash benchmarks/compare_trl/setup_trl_venv.sh [VENV]      (default: benchmarks/compare_trl/.venv-trl)
# torch is pinned FIRST, to the version of the ppo_fast environment's torch (PPO_FAST_PYTHON, default the
# repository's .venv/bin/python, else python3), so both sides run the same kernels; then TRL's last release with
# the classic PPOTrainer and the transformers/accelerate it was released against. TORCH_INDEX_URL, when set, is
# the index torch comes from (e.g. https://download.pytorch.org/whl/cpu); otherwise pip's configuration decides.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${1:-${PPO_FAST_TRL_VENV:-$here/.venv-trl}}"
py="${PPO_FAST_PYTHON:-}"
if [[ -z "$py" ]]; then
  if [[ -x "$repo/.venv/bin/python" ]]; then py="$repo/.venv/bin/python"; else py="python3"; fi
fi
if ! torch_version="$("$py" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null)"; then
  echo "setup_trl_venv.sh: $py cannot import torch; set PPO_FAST_PYTHON to the ppo_fast environment's python" >&2
  exit 2
fi
want="trl==0.11.4 transformers==4.46.3 accelerate==1.0.1"

if [[ -x "$venv/bin/python" ]] && "$venv/bin/python" - "$torch_version" <<'PY'
import sys
import accelerate, torch, transformers, trl
import trl.trainer.ppo_trainer  # noqa: F401  (fails without rich)
ok = (torch.__version__.split("+")[0], trl.__version__, transformers.__version__, accelerate.__version__) == (
    sys.argv[1], "0.11.4", "4.46.3", "1.0.1")
sys.exit(0 if ok else 1)
PY
then
  echo "TRL venv at $venv is ready (torch $torch_version, $want)"
  exit 0
fi

t0=$(date +%s)
echo "creating the TRL venv at $venv: torch==$torch_version, then $want"
python3 -m venv "$venv"
export PIP_DISABLE_PIP_VERSION_CHECK=1
index=()
if [[ -n "${TORCH_INDEX_URL:-}" ]]; then index=(--index-url "$TORCH_INDEX_URL"); fi
"$venv/bin/pip" install -q "${index[@]}" "torch==$torch_version"
# torch is already there, so pip keeps it; numpy etc. come with these.
# rich: trl 0.11.4 imports it (trl.trainer.ppo_config) but does not declare it
"$venv/bin/pip" install -q $want rich
"$venv/bin/python" -c "import torch, trl, transformers, accelerate; print('torch', torch.__version__, 'trl', trl.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"
echo "TRL venv created in $(( $(date +%s) - t0 )) s"
