"""Throughput of `elmctl eval` against lm-evaluation-harness's own `hf` backend, same model, CPU.

The model: the tiny recipe (4 layers, d=128, byte vocabulary), seed 0, saved as an HF folder with
elmctl's modelling code and tokenizer files (what `elmctl export` writes). The task: a local
multiple-choice task of 250 questions x 4 answers = 1,000 loglikelihood requests (contexts of
~50-190 bytes, answers of 5-40: every request fits the 256-token window). Both backends run through ``simple_evaluate`` on the same task, fp32, the same batch
size; each is timed from the call to its result (model loading and task building excluded), best of
``--repeat``, the two backends taking turns (a busy machine slows both alike). The `hf` backend runs in its own process (transformers, trust_remote_code, HF_HOME in a
temp folder). Nothing is downloaded.

    .venv/bin/python tests/benchmarks/bench_eval.py                 # table
    .venv/bin/python tests/benchmarks/bench_eval.py --json --batch-size 32 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

_HF = """
import json, sys, time
import torch
torch.set_num_threads(int(sys.argv[4]))
import lm_eval.evaluator as ev
from lm_eval.evaluator import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
ev.add_env_info, ev.get_git_commit_hash = (lambda r: None), (lambda: None)  # the same untimed extras as ours
lm = HFLM(pretrained=sys.argv[1], trust_remote_code=True, add_bos_token=True, device="cpu", dtype="float32",
          batch_size=int(sys.argv[3]))
print("ready", flush=True)
for _ in sys.stdin:  # one timed evaluation per line: the parent alternates with its own runs
    tm = TaskManager(include_path=sys.argv[2], include_defaults=False)
    task = tm.load(["bench_mc"])["tasks"]["bench_mc"]
    t0 = time.perf_counter()
    res = simple_evaluate(model=lm, tasks=[task], task_manager=tm, bootstrap_iters=0)
    print(json.dumps({"seconds": time.perf_counter() - t0, "acc": res["results"]["bench_mc"]["acc,none"]}), flush=True)
"""


def make_assets(root: Path, num_questions: int = 250, seed: int = 0) -> tuple[Path, Path]:
    """(HF folder of the tiny model, task folder with bench_mc: num_questions x 4 choices)."""
    import torch

    import elmctl
    from elmctl.model.hf_export import write_hf_code, write_tokenizer_files

    torch.manual_seed(seed)
    hf = root / "hf"
    elmctl.save_pretrained(elmctl.build_model("tiny"), hf)
    write_hf_code(hf)
    write_tokenizer_files("byte", hf)
    rng = random.Random(seed)
    words = "alpha beta gamma delta river stone cloud maple orbit lantern copper violet harbor meadow".split()
    rows = []
    for i in range(num_questions):
        q = " ".join(rng.choice(words) for _ in range(rng.randint(6, 24)))  # contexts fit the 256-token window
        choices = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 6))) for _ in range(4)]
        rows.append({"question": f"{i}: {q}?", "choices": choices, "answer": rng.randrange(4)})
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "bench.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "bench.yaml").write_text(textwrap.dedent(f"""\
        task: bench_mc
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {tasks / 'bench.jsonl'}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: "{{{{answer}}}}"
        metric_list:
          - metric: acc
        """))
    return hf, tasks


class Elmctl:
    """Our backend on the bench task; :meth:`once` times one evaluation."""

    def __init__(self, hf: Path, tasks: Path, batch_size: int) -> None:
        from elmctl.eval.lm import ElmctlLM
        from elmctl.train.weights import load_model, load_source_tokenizer, resolve_source

        src = resolve_source(str(hf))
        model = load_model(src, "cpu")
        self.lm = ElmctlLM(model, load_source_tokenizer(src, None, model.config.vocab_size), batch_size=batch_size)
        self.tasks = tasks

    def once(self) -> tuple[float, float, int]:
        import lm_eval.evaluator as ev
        from lm_eval.evaluator import simple_evaluate

        from elmctl.eval.suites import TaskRequest
        from elmctl.eval.tasks import prepare_tasks

        req = TaskRequest("bench_mc", None)
        prepared = prepare_tasks([req], [self.tasks])
        n = sum(len(t.eval_docs) * 4 for t in prepared.built[req])
        # simple_evaluate's environment report (collect_env, git): ~5 s of subprocesses, off for both backends
        ev.add_env_info, ev.get_git_commit_hash = (lambda r: None), (lambda: None)
        t0 = time.perf_counter()
        res = simple_evaluate(model=self.lm, tasks=prepared.built[req], task_manager=prepared.manager, bootstrap_iters=0)
        return time.perf_counter() - t0, res["results"]["bench_mc"]["acc,none"], n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=max(1, min(4, os.cpu_count() or 1)))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    os.environ.update({"TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    import logging

    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="elmctl-bench-eval-") as tmp:
        hf, tasks = make_assets(Path(tmp))
        env = {**os.environ, "HF_HOME": str(Path(tmp) / "hf-home")}
        proc = subprocess.Popen([sys.executable, "-c", _HF, str(hf), str(tasks), str(args.batch_size), str(args.threads)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        ours_backend = Elmctl(hf, tasks, args.batch_size)
        for line in proc.stdout:  # skip anything the harness prints before it is ready
            if line.strip() == "ready":
                break
        else:
            return 1
        ours_times, hf_times = [], []
        for _ in range(args.repeat):  # alternate, so a busy machine slows both alike
            t, acc, n = ours_backend.once()
            ours_times.append(t)
            proc.stdin.write("go\n")
            proc.stdin.flush()
            hf_res = json.loads(next(x for x in proc.stdout if x.startswith("{")))
            hf_times.append(hf_res["seconds"])
        proc.stdin.close()
        proc.wait(timeout=60)
    ours, hf_res["seconds"] = min(ours_times), min(hf_times)
    out = {"requests": n, "batch_size": args.batch_size, "threads": args.threads, "elmctl_s": round(ours, 3),
           "hf_s": round(hf_res["seconds"], 3), "speedup": round(hf_res["seconds"] / ours, 2),
           "elmctl_acc": acc, "hf_acc": hf_res["acc"], "same_accuracy": acc == hf_res["acc"]}
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{n} loglikelihood requests, tiny model, CPU ({args.threads} threads), batch {args.batch_size}:")
        print(f"  elmctl eval backend : {out['elmctl_s']:.3f} s  ({n / ours:,.0f} requests/s), acc {acc:.4f}")
        print(f"  lm-eval hf backend  : {out['hf_s']:.3f} s  ({n / hf_res['seconds']:,.0f} requests/s), acc {hf_res['acc']:.4f}")
        print(f"  ratio hf / elmctl   : {out['speedup']:.2f}x" + ("" if out["same_accuracy"] else "  (ACCURACY DIFFERS)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
