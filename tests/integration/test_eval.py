"""`elmctl eval` (#13): our model behind lm-evaluation-harness, on one tiny run shared by the module.

The run: 4 pre-training steps of the tiny recipe on demo data, exported to an HF folder. Local
tasks (YAML + JSONL in a tmp folder): a multiple-choice task, a perplexity task and a generation
task. Nothing is downloaded (the harness runs offline).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from elmctl.cli.main import main  # noqa: E402

MC_ROWS = [{"question": f"What is {a} + {b}?", "choices": [str(a + b), str(a + b + 1), str(a * b + 3)], "answer": 0}
           for a in range(5) for b in range(4)]


def _run(*args: str) -> None:
    assert main([str(a) for a in args]) == 0, f"elmctl {' '.join(map(str, args))} failed"


def write_tasks(folder: Path) -> Path:
    """tiny_mc (multiple choice), tiny_ppl (rolling loglikelihood), tiny_gen (generate_until) + their JSONL."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MC_ROWS))
    (folder / "ppl.jsonl").write_text("".join(json.dumps({"text": f"Document {i}: the sum of {i} and {i} is {2 * i}."}) + "\n"
                                              for i in range(6)))
    (folder / "gen.jsonl").write_text("".join(json.dumps({"q": f"{a} plus {a} is", "a": str(2 * a)}) + "\n" for a in range(4)))
    _task_yaml(folder, "tiny_mc", "mc.jsonl", "multiple_choice",
               'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"',
               ("acc", "acc_norm"))
    _task_yaml(folder, "tiny_ppl", "ppl.jsonl", "loglikelihood_rolling",
               'doc_to_text: ""\ndoc_to_target: "{{text}}"', ("word_perplexity", "bits_per_byte"))
    _task_yaml(folder, "tiny_gen", "gen.jsonl", "generate_until",
               'doc_to_text: "{{q}}"\ndoc_to_target: "{{a}}"\ngeneration_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 8',
               ("exact_match",))
    return folder


def _task_yaml(folder: Path, task: str, data: str, output_type: str, body: str, metrics: tuple[str, ...]) -> None:
    """A local harness task: ``folder/<data>`` (JSONL) read through ``dataset_path: json``."""
    (folder / f"{task}.yaml").write_text(
        f"task: {task}\ndataset_path: json\ntest_split: test\ndataset_kwargs:\n  data_files:\n    test: {folder / data}\n"
        f"output_type: {output_type}\n{body}\nmetric_list:\n" + "".join(f"  - metric: {m}\n" for m in metrics))


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A store with run 'pre' (4 steps, checkpoint at 4), its export, and the local tasks."""
    root = tmp_path_factory.mktemp("eval")
    mp = pytest.MonkeyPatch()
    mp.setenv("ELMCTL_HOME", str(root))
    mp.delenv("ELMCTL_STORE", raising=False)
    mp.setenv("ELMCTL_LOCK_DIR", str(root / "locks"))
    mp.setenv("TQDM_DISABLE", "1")
    url = f"sqlite:///{root / 'elmctl.db'}"
    _run("data", "demo", "--out", root / "data", "--docs", "100", "--pairs", "8", "--test-pairs", "4")
    _run("pretrain", "--recipe", "tiny", "--device", "cpu", "--data", root / "data", "--name", "pre",
         "--set", "pretrain.max_iterations=4", "--set", "pretrain.warmup_iterations=1",
         "--set", "pretrain.sequences_per_gpu=2", "--checkpoint-every", "4", "--store", url)
    _run("export", "pre", "--to", root / "hf", "--store", url)
    yield {"root": root, "url": url, "tasks": write_tasks(root / "tasks"), "hf": root / "hf"}
    mp.undo()


@pytest.fixture(scope="module")
def lm(env):
    """The run's model and tokenizer behind the harness interface (fp32, CPU)."""
    from elmctl.eval.lm import ElmctlLM
    from elmctl.train.weights import load_model, load_source_tokenizer, resolve_source

    src = resolve_source("pre", env["url"])
    model = load_model(src, "cpu")
    return ElmctlLM(model, load_source_tokenizer(src, None, model.config.vocab_size), batch_size=4)


def _req(kind: str, args: tuple, i: int = 0) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=i)


def _logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        out = model(torch.tensor([ids]))[0, :, :model.config.vocab_size]
    return torch.log_softmax(out.double(), dim=-1)


# ----------------------------------------------------------------------------- the CLI end to end


def test_eval_cli_json_accuracy_recorded_and_reported(env, cli):
    r = cli("eval", "pre", "--tasks", "tiny_mc,tiny_ppl", "--include-path", env["tasks"], "--device", "cpu",
            "--format", "json", "--store", env["url"], "--name", "first")
    assert r.code == 0, r.err
    data = json.loads(r.out)
    assert set(data) >= {"model", "results", "suites", "n", "lm_eval_version"}
    acc = data["results"]["tiny_mc"]["acc"]
    assert 0.0 <= acc <= 1.0 and data["n"] == {"tiny_mc": 20, "tiny_ppl": 6}
    assert data["results"]["tiny_ppl"]["word_perplexity"] > 1.0
    assert data["step"] == 4 and data["run_id"] and data["eval_id"]

    from elmctl.store import Store

    with Store(env["url"]) as st:
        rows = {(e.task, e.metric): e for e in st.evaluations("pre")}
    assert rows[("tiny_mc", "acc")].value == pytest.approx(acc) and rows[("tiny_mc", "acc")].samples == 20
    assert rows[("tiny_mc", "acc")].step == 4 and rows[("tiny_mc", "acc")].name == "first"

    shown = json.loads(cli("runs", "show", "pre", "--format", "json", "--store", env["url"]).out)
    assert shown["evaluations"]["tiny_mc/acc_norm"] == pytest.approx(data["results"]["tiny_mc"]["acc_norm"])
    assert "tiny_mc/acc_norm" in cli("runs", "show", "pre", "--store", env["url"]).out
    rep = json.loads(cli("report", "--run", "pre", "--format", "json", "--store", env["url"]).out)
    assert rep["eval"]["tiny_mc/acc_norm"] == pytest.approx(data["results"]["tiny_mc"]["acc_norm"])
    assert {"task": "tiny_mc", "metric": "acc"}.items() <= next(
        e for e in rep["evaluations"] if e["task"] == "tiny_mc" and e["metric"] == "acc").items()
    for fmt, needle in (("csv", "eval:tiny_mc/acc"), ("md", "tiny_mc"), ("html", "tiny_mc"), ("table", "tiny_mc")):
        out = cli("report", "--run", "pre", "--format", fmt, "--store", env["url"])
        assert out.code == 0 and needle in out.out, (fmt, out.err)


def test_eval_track_sends_each_evaluation_once_to_the_runs_tracker(env, cli, tmp_path, monkeypatch):
    """eval --track mlflow: the run's MLflow run gets eval/TASK/METRIC (and its steps, never tracked before);
    a second evaluation adds its point; runs sync afterwards sends nothing again."""
    pytest.importorskip("mlflow")
    from elmctl.store import Store
    from tests.integration.track_util import mlflow_history

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    values = []
    for _ in range(2):
        r = cli("eval", "pre", "--tasks", "tiny_mc", "--include-path", env["tasks"], "--device", "cpu", "--limit", "6",
                "--format", "json", "--store", env["url"], "--track", "mlflow")
        assert r.code == 0, r.err
        data = json.loads(r.out)
        assert data["tracked"]["sent"] == {"mlflow": 4 if not values else 0} and not data["tracked"]["failed"]
        values.append(data["results"]["tiny_mc"]["acc"])
    again = cli("runs", "sync", "pre", "--to", "mlflow", "--store", env["url"])
    assert again.code == 0 and "+0 steps" in again.out, again.out + again.err
    from mlflow.tracking import MlflowClient

    (run,) = MlflowClient(tracking_uri=uri).search_runs(
        [MlflowClient(tracking_uri=uri).get_experiment_by_name("elmctl").experiment_id])
    with Store(env["url"]) as st:
        last = max(m.step for m in st.metrics(st.get_run("pre").id, "loss"))
    assert mlflow_history(uri, run.info.run_id, "eval/tiny_mc/acc") == [(last, pytest.approx(v)) for v in values]
    assert len(mlflow_history(uri, run.info.run_id, "loss")) == 4


def test_eval_of_the_export_matches_the_run(env, cli):
    """The HF folder (elmctl export) scores exactly what the run's checkpoint scores."""
    a = json.loads(cli("eval", "pre", "--tasks", "tiny_mc", "--include-path", env["tasks"], "--device", "cpu",
                       "--format", "json", "--store", env["url"], "--no-record").out)
    b = json.loads(cli("eval", env["hf"], "--tasks", "tiny_mc", "--include-path", env["tasks"], "--device", "cpu",
                       "--format", "json", "--store", env["url"], "--no-record", "--limit", "20").out)
    assert a["results"] == b["results"] and a["eval_id"] is None


# ----------------------------------------------------------------------------- the LM interface


def test_loglikelihoods_are_hand_computed_sums(lm):
    model, tok = lm.replicas[0], lm.tok
    pairs = [("Question: 2 + 2?\nAnswer:", " 4"), ("Question: 2 + 2?\nAnswer:", " five"), ("abc ", "def"),
             ("x" * 300, " tail"), ("", "starts from BOS")]
    got = lm.loglikelihood([_req("loglikelihood", p, i) for i, p in enumerate(pairs)])
    for (ctx, cont), (logp, greedy) in zip(pairs, got):
        if ctx:  # the harness moves trailing spaces of the context onto the continuation
            n = len(ctx) - len(ctx.rstrip())
            ctx, cont = ctx[:len(ctx) - n], ctx[len(ctx) - n:] + cont
        ids = [tok.bos_id] + tok.encode(ctx) + tok.encode(cont)
        ids = ids[-(model.config.context_length + 1):]  # the window keeps the right end
        lp = _logits(model, ids[:-1])
        n = len(tok.encode(cont))
        targets = torch.tensor(ids[-n:])
        want = float(lp[-n:].gather(1, targets[:, None]).sum())
        assert logp == pytest.approx(want, abs=1e-4)
        assert greedy == bool((lp[-n:].argmax(-1) == targets).all())
    lm.batch_size = 1  # batching and sorting change nothing
    try:
        again = lm.loglikelihood([_req("loglikelihood", p, i) for i, p in enumerate(pairs)])
    finally:
        lm.batch_size = 4
    assert [g[0] for g in again] == pytest.approx([g[0] for g in got], rel=1e-6, abs=1e-5)  # fp32 summation order
    lm.share_contexts = False  # the GPU path (no shared contexts, length-sorted batches only): the same numbers
    try:
        batched = lm.loglikelihood([_req("loglikelihood", p, i) for i, p in enumerate(pairs)])
    finally:
        lm.share_contexts = None
    assert [g[0] for g in batched] == pytest.approx([g[0] for g in got], rel=1e-6, abs=1e-5)
    assert [g[1] for g in batched] == [g[1] for g in got]
    from elmctl.eval.lm import ElmctlLM

    two = ElmctlLM(model, tok, batch_size=1, devices=["cpu", "cpu"])  # data parallel: one replica per device
    assert len(two.replicas) == 2 and two.replicas[1] is not model
    spread = two.loglikelihood([_req("loglikelihood", p, i) for i, p in enumerate(pairs)])
    assert [g[0] for g in spread] == pytest.approx([g[0] for g in again], abs=1e-6)


def test_greedy_flag_is_true_for_the_models_own_continuation(lm):
    model, tok = lm.replicas[0], lm.tok
    ids = [tok.bos_id] + tok.encode("The answer is")
    greedy = []
    for _ in range(3):
        greedy.append(int(_logits(model, ids + greedy)[-1].argmax()))
    assume_text = tok.decode(greedy)
    if tok.encode(assume_text) != greedy:  # not a round-trippable byte string: nothing to check
        pytest.skip("greedy bytes do not round-trip")
    ((_, is_greedy),) = lm.loglikelihood([_req("loglikelihood", ("The answer is", assume_text))])
    assert is_greedy


def test_rolling_loglikelihood_is_our_token_nll_sum(lm):
    model, tok = lm.replicas[0], lm.tok
    text = "Perplexity counts every token of the text, given BOS and the tokens before it."
    (got,) = lm.loglikelihood_rolling([_req("loglikelihood_rolling", (text,))])
    ids = [tok.bos_id] + tok.encode(text)
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]]))[0, :, :model.config.vocab_size].double()
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum")
    assert got == pytest.approx(-float(nll), abs=1e-3)
    long_text = text * 8  # > context length: disjoint windows, each token scored exactly once
    (long,) = lm.loglikelihood_rolling([_req("loglikelihood_rolling", (long_text,))])
    assert long < got * 7


def test_generate_until_stops_on_stop_sequences(lm):
    prompt = "7 plus 7 is"
    (free,) = lm.generate_until([_req("generate_until", (prompt, {"until": [], "max_gen_toks": 24}))])
    assert len(free) > 6, free
    stop = free[4:6]
    calls = []
    handle = lm.replicas[0].norm.register_forward_hook(lambda *a: calls.append(1))  # once per decoding step
    try:
        (cut,) = lm.generate_until([_req("generate_until", (prompt, {"until": [stop], "max_gen_toks": 24}))])
    finally:
        handle.remove()
    assert cut == free.split(stop)[0] and stop not in cut
    assert 1 <= len(calls) <= len(free[:6].encode())  # decoding stopped at the stop string, not at 24 tokens
    both = lm.generate_until([_req("generate_until", (prompt, {"until": [stop], "max_gen_toks": 24}), 0),
                              _req("generate_until", ("7 plus 8 is", {"until": [stop], "max_gen_toks": 24}), 1)])
    assert both[0] == cut  # batched with another prompt of the same length: the same answer


def test_generation_task_runs_end_to_end(env, cli):
    r = cli("eval", "pre", "--tasks", "tiny_gen", "--include-path", env["tasks"], "--device", "cpu",
            "--format", "json", "--store", env["url"], "--no-record")
    assert r.code == 0, r.err
    assert json.loads(r.out)["results"]["tiny_gen"]["exact_match"] == pytest.approx(0.0)


# ----------------------------------------------------------------------------- errors


def test_missing_dataset_is_one_error_before_the_model_loads(env, cli, monkeypatch):
    (env["tasks"] / "hub.yaml").write_text("task: tiny_hub\ndataset_path: allenai/ai2_arc\ndataset_name: ARC-Easy\n"
                                           "output_type: multiple_choice\ntest_split: test\ndoc_to_text: '{{question}}'\n"
                                           "doc_to_choice: '{{choices.text}}'\ndoc_to_target: 0\n")
    import elmctl.train.weights as W

    def boom(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(W, "load_model", boom)
    try:
        r = cli("eval", "pre", "--tasks", "tiny_mc,tiny_hub", "--include-path", env["tasks"], "--device", "cpu",
                "--store", env["url"])
    finally:
        (env["tasks"] / "hub.yaml").unlink()
    assert r.code == 2 and "Traceback" not in r.err
    assert r.err.count("error:") == 1 and "tiny_hub" in r.err and "not available locally" in r.err
    assert "--include-path" in r.err and "datasets cache" in r.err


@pytest.mark.parametrize("args, needle", [
    (("--tasks", "tiny_mcq"), "unknown task 'tiny_mcq'"),
    (("--tasks", ","), "--tasks is empty"),
    (("--tasks", "tiny_mc", "--limit", "0"), "--limit 0"),
    (("--tasks", "tiny_mc", "--batch-size", "0"), "--batch-size 0"),
    (("--tasks", "tiny_mc", "--batch-size", "99999999"), "--batch-size 99999999"),
    (("--tasks", "tiny_mc", "--name", "[bold]x"), "--name"),
    (("--tasks", "openelm-zero-shot", "--num-fewshot", "5"), "fix their own shot counts"),
    (("--tasks", "tiny_mc", "--gpus", "64"), "--gpus 64"),
    (("--tasks", "tiny_mc", "--device", "tpu"), "--device 'tpu'"),
])
def test_bad_inputs_are_one_clear_error(env, cli, args, needle):
    r = cli("eval", "pre", "--include-path", env["tasks"], "--store", env["url"], *args)
    assert r.code == 2 and "Traceback" not in r.err and needle in r.err, r.err


def test_unknown_run_and_bad_task_yaml(env, cli, tmp_path):
    r = cli("eval", "no-such-run", "--tasks", "tiny_mc", "--include-path", env["tasks"], "--store", env["url"])
    assert r.code == 2 and "no run 'no-such-run'" in r.err
    (tmp_path / "t.yaml").write_text("task: typo\ndataset_path: json\noutput_type: multiple_choise\n")
    r = cli("eval", "pre", "--tasks", "typo", "--include-path", tmp_path, "--store", env["url"])
    assert r.code == 2 and "task typo: cannot be built" in r.err and "Traceback" not in r.err


# ----------------------------------------------------------------------------- cross-check


_HF_SCRIPT = """
import json, sys
from lm_eval.evaluator import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
lm = HFLM(pretrained=sys.argv[1], trust_remote_code=True, add_bos_token=True, device="cpu", dtype="float32", batch_size=8)
res = simple_evaluate(model=lm, tasks=["tiny_mc"], task_manager=TaskManager(include_path=sys.argv[2], include_defaults=False),
                      log_samples=True, bootstrap_iters=0)
print(json.dumps({"acc": res["results"]["tiny_mc"]["acc,none"],
                  "lls": {d["doc_id"]: [r[0][0] for r in d["resps"]] for d in res["samples"]["tiny_mc"]}}))
"""


def test_cross_check_against_the_harness_hf_backend(env, lm, tmp_path):
    """transformers + our exported modelling code (trust_remote_code, local path) through the harness's
    own `hf` model type: the same per-request log-likelihoods (1e-4, fp32) and the same accuracy."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # the harness's hf backend needs it (lm-eval[hf])
    from lm_eval.evaluator import simple_evaluate

    from elmctl.eval.suites import TaskRequest
    from elmctl.eval.tasks import prepare_tasks

    e = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
         "TQDM_DISABLE": "1"}
    p = subprocess.run([sys.executable, "-c", _HF_SCRIPT, str(env["hf"]), str(env["tasks"])], capture_output=True,
                       text=True, env=e, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    hf = json.loads(p.stdout.strip().splitlines()[-1])
    req = TaskRequest("tiny_mc", None)
    prepared = prepare_tasks([req], [env["tasks"]])
    ours = simple_evaluate(model=lm, tasks=prepared.built[req], task_manager=prepared.manager, log_samples=True,
                           bootstrap_iters=0)
    lls = {str(d["doc_id"]): [r[0][0] for r in d["resps"]] for d in ours["samples"]["tiny_mc"]}
    assert set(lls) == set(hf["lls"]) and len(lls) == 20
    for doc, values in hf["lls"].items():
        assert lls[doc] == pytest.approx(values, abs=1e-4)
    assert ours["results"]["tiny_mc"]["acc,none"] == hf["acc"]


def test_sweep_api_in_memory_model_prepared_once_recorded_per_epoch(env, lm):
    """What a sweep trial does after each epoch: tasks built once, the in-memory model evaluated, recorded."""
    from elmctl.eval import evaluate_model, metric_value, prepare_tasks, record_evaluation
    from elmctl.eval.suites import expand_tasks
    from elmctl.store import Store

    reqs, _ = expand_tasks("tiny_mc")
    prepared = prepare_tasks(reqs, [env["tasks"]])
    model, tok = lm.replicas[0], lm.tok
    model.train()
    first = evaluate_model(model, tok, "tiny_mc", prepared=prepared, label="trial 0", devices=["cpu"])
    again = evaluate_model(model, tok, "tiny_mc", prepared=prepared, label="trial 0", devices=["cpu"])
    assert model.training  # left in the mode it had
    assert first.results == again.results and metric_value(first, "tiny_mc/acc") == first.results["tiny_mc"]["acc"]
    with Store(env["url"]) as st:
        run_id = st.get_run("pre").id
        rec = record_evaluation(st, first, run_id=run_id, step=2, name="epoch-1")
        rows = st.evaluations(eval_id=rec.eval_id)
    assert rec.run_id == run_id and {(r.task, r.metric, r.step) for r in rows} == {("tiny_mc", "acc", 2), ("tiny_mc", "acc_norm", 2)}
