#!/usr/bin/env bash
# One prepared run on a lent GPU machine: `elmctl bench` on the speed targets, then the GPU tests.
# Results (JSON + logs) go under $OUT. Usage on a CUDA machine with elmctl's deps importable:
#   OUT=/tmp/out bash tests/gpu/device_check.sh
# Wheels for packages the machine lacks may sit in .whl/ (installed to /tmp/site, no network).
set -uo pipefail
OUT=${OUT:-/tmp/elmctl-device}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:$PWD"
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; python3 -c "import torch; print('torch', torch.__version__)"; } | tee "$OUT/machine.txt"
bench() {  # name, timeout, args...
  local name=$1 t=$2; shift 2
  local t0=$SECONDS
  timeout "$t" python3 -m elmctl bench --format json "$@" >"$OUT/bench_$name.json" 2>"$OUT/bench_$name.err"
  echo "bench $name: exit $? in $((SECONDS - t0)) s"
}
bench 270m 170 --recipe 270m --micro-batch 16 --steps 15 --warmup 3 --profile "$OUT/profile_270m"
bench 270m_cudnn 150 --recipe 270m --micro-batch 16 --steps 15 --warmup 3 --set pretrain.attention_backend=cudnn --profile "$OUT/profile_270m_cudnn"
bench 1_1b 200 --recipe 1_1b --micro-batch 16 --checkpointing off --steps 10 --warmup 3
t0=$SECONDS
timeout "${GPU_TEST_TIMEOUT:-240}" python3 -m pytest -m gpu tests/gpu -q -x -p no:cacheprovider -o addopts="" >"$OUT/gpu_tests.txt" 2>&1
echo "gpu tests: exit $? in $((SECONDS - t0)) s"; tail -5 "$OUT/gpu_tests.txt"
python3 - "$OUT" <<'PY'
import json, pathlib, sys
for f in sorted(pathlib.Path(sys.argv[1]).glob("bench_*.json")):
    try:
        r = json.loads(f.read_text())
    except Exception:
        print(f.name, "no result:", (f.with_suffix(".err").read_text().strip().splitlines() or ["?"])[-1]); continue
    print(f"{r['recipe']:>5} attn={r.get('attention_backend', 'auto')} mb={r['micro_batch']} ckpt={r['activation_checkpointing']} "
          f"{r['tokens_per_s']:,.0f} tok/s  MFU {r['mfu']:.1%}  peak {r['peak_memory_gib']:.1f} GiB  "
          f"compile {r['compile_time_s']:.0f} s  loss {r['loss_first']:.2f}->{r['loss_last']:.2f}")
    if r.get("profile"):
        p = r["profile"]
        print("   ", f"{p['device_ms_per_step']:.1f} ms/step:", ", ".join(f"{c} {s:.0%}" for c, s in p["categories"].items()))
        for k in p["top"][:8]:
            print(f"    {k['ms_per_step']:7.2f} ms  {k['category']:<12} {k['name'][:100]}")
PY
