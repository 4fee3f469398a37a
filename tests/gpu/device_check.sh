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
# DPO (issue #12): a short 1.1B tune (random base, 32 demo pairs, 4 pairs/step: 8 steps, one
# checkpoint) unsharded on one GPU, and on >= 2 GPUs with instruct.sharding zero3 (FSDP2) next to
# DDP on the same GPUs. One GPU cannot show FSDP2: NCCL allows one rank per GPU.
DPO=${DPO_DIR:-/tmp/elmctl-dpo}; rm -rf "$DPO"; mkdir -p "$DPO"
t0=$SECONDS
timeout 300 python3 - "$DPO" >"$OUT/dpo_setup.txt" 2>&1 <<'PY'
import sys
from pathlib import Path

import torch

import elmctl
from elmctl.data.demo import _write_jsonl, make_pairs
from elmctl.data.preference import prepare_preference

root = Path(sys.argv[1])
torch.manual_seed(0)
elmctl.save_pretrained(elmctl.build_model("1_1b"), root / "base")
_write_jsonl(root / "prefs.jsonl", make_pairs(32, 8))
prepare_preference([root / "prefs.jsonl"], root / "prefs", "byte", recipe="1_1b")
PY
echo "dpo setup: exit $? in $((SECONDS - t0)) s"
dpo() {  # name, instruct.sharding, GPU count
  local t0=$SECONDS
  ELMCTL_HOME="$DPO/home" timeout 300 python3 -m elmctl tune --recipe 1_1b --base "$DPO/base" --data "$DPO/prefs" \
    --gpus "$3" --epochs 1 --set instruct.sharding="$2" --set instruct.per_device_batch=4 \
    --set instruct.grad_accumulation=1 --set instruct.num_gpus=1 --name "$1" --format json >"$OUT/dpo_$1.json" 2>"$OUT/dpo_$1.err"
  echo "dpo $1 (sharding $2, $3 GPU): exit $? in $((SECONDS - t0)) s"
  rm -rf "$DPO"/home/runs/*/checkpoints  # 13 GB each (fp32 weights + AdamW); the store keeps the numbers
}
dpo 1_1b_one none 1
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  dpo 1_1b_ddp none 2; dpo 1_1b_zero3 zero3 2
else
  echo "dpo 1_1b_zero3: skipped (FSDP2 needs >= 2 GPUs)"
fi
ELMCTL_HOME="$DPO/home" python3 - "$DPO" <<'PY'
import sys
from pathlib import Path

from elmctl.store import Store

s = Store()
losses = {}
for run in sorted(s.list_runs(kind="tune"), key=lambda r: r.name):
    m = {k: [x.value for x in s.metrics(run.id, k)] for k in ("train_loss", "memory_gib", "eval_loss")}
    losses[run.name] = m["train_loss"]
    fsdp = [x for x in (Path(run.run_dir) / "train.log").read_text().splitlines() if "FSDP2" in x]
    print(f"dpo {run.name}: {run.status} at step {run.step}, devices {run.devices}, loss "
          f"{m['train_loss'][0] if m['train_loss'] else float('nan'):.4f}->{m['train_loss'][-1] if m['train_loss'] else float('nan'):.4f}, "
          f"peak {max(m['memory_gib'], default=float('nan')):.1f} GiB, eval_loss {m['eval_loss'][-1] if m['eval_loss'] else float('nan'):.4f}"
          + (f"; {fsdp[0][9:]}" if fsdp else ""))
a, b = losses.get("1_1b_ddp"), losses.get("1_1b_zero3")
if a and b and len(a) == len(b):  # bf16: close, not equal
    print("dpo zero3 vs ddp: max |loss difference| per step", max(abs(x - y) for x, y in zip(a, b)))
PY
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
