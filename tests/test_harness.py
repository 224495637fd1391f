"""lm-evaluation-harness on sleeping models (`sleepscale.harness`): the adapter scores and generates
what the harness's own Hugging Face model does on converted models, sleeps when the context is longer
than a window, and `sleepscale eval --lm-eval` runs local tasks end to end."""

import json
import os
import subprocess
import sys

import lm_eval
import pytest
import torch
from hf_models import hf_model
from lm_eval.api.instance import Instance

from sleepscale.convert import convert_from_hf
from sleepscale.harness.model import SleepingLM

EOS = "<|endoftext|>"
TEXTS = [
    "the cat sat on the mat and the dog sat on the log.",
    "a sleeping model reads long input window by window, then answers.",
    "rule one hundred and ten is a cellular automaton; it is universal.",
    "two plus two is four, and four plus four is eight.",
]


def _tokenizer(directory):
    """A byte-level BPE tokenizer trained here on a few sentences, saved as Hugging Face files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(TEXTS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS)
    fast.save_pretrained(directory)
    return fast


def _converted(root, family):
    """(Hugging Face directory with its tokenizer, our model directory converted from it)."""
    tokenizer = _tokenizer(root / "hf")
    eos = tokenizer.convert_tokens_to_ids(EOS)
    hf = hf_model(family, vocab_size=len(tokenizer), eos_token_id=eos, bos_token_id=None, pad_token_id=eos)
    hf.save_pretrained(root / "hf")
    return root / "hf", convert_from_hf(root / "hf", root / "ours")


@pytest.fixture(scope="module", params=["llama", "qwen3_5"])
def converted(request, tmp_path_factory):
    return _converted(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    """Qwen3.5 (GDN and attention blocks): the GDN state is what sleep passes change."""
    return _converted(tmp_path_factory.mktemp("hybrid"), "qwen3_5")[1]


def _requests(kind, arguments):
    return [Instance(request_type=kind, doc={}, arguments=args, idx=0) for args in arguments]


LOGLIKELIHOOD = [
    ("the cat sat on the", " mat"),
    ("a sleeping model reads long input", " window by window"),
    ("two plus two is", " four, and four plus four is eight."),
    ("", "rule one hundred"),
    ("the dog", " sat on the log."),
]
GENERATE = [
    ("the cat sat", {"until": ["."], "max_gen_toks": 6}),
    ("two plus two is four, and", {"until": ["\n", "."], "max_gen_toks": 6}),
    ("rule", {"until": ["."], "max_gen_toks": 6}),
]


@pytest.fixture(scope="module")
def harness_hf(converted):
    from lm_eval.models.huggingface import HFLM

    hf_dir, _ = converted
    return HFLM(pretrained=str(hf_dir), device="cpu", batch_size=1, max_length=128)


def test_loglikelihood_equals_the_harness_hf_model(converted, harness_hf):
    _, ours_dir = converted
    ours = SleepingLM(pretrained=str(ours_dir), window=128, batch_size=3)
    expected = harness_hf.loglikelihood(_requests("loglikelihood", LOGLIKELIHOOD))
    got = ours.loglikelihood(_requests("loglikelihood", LOGLIKELIHOOD))
    for (score, greedy), (hf_score, hf_greedy) in zip(got, expected):
        assert score == pytest.approx(hf_score, rel=1e-4, abs=1e-4)
        assert greedy == hf_greedy
    rolling = [(text,) for text in TEXTS[:2]]
    assert ours.loglikelihood_rolling(_requests("loglikelihood_rolling", rolling)) == pytest.approx(
        harness_hf.loglikelihood_rolling(_requests("loglikelihood_rolling", rolling)), rel=1e-4
    )


def test_greedy_generation_equals_the_harness_hf_model(converted, harness_hf):
    _, ours_dir = converted
    ours = SleepingLM(pretrained=str(ours_dir), window=128, batch_size=2)
    expected = harness_hf.generate_until(_requests("generate_until", GENERATE))
    assert ours.generate_until(_requests("generate_until", GENERATE)) == expected
    assert any(expected)  # something was generated


def test_a_context_longer_than_the_window_is_slept_on(hybrid):
    """With windows of 4 tokens, N=3: each request's score is what `sleep_forward` gives its
    continuation's tokens over the whole sequence (every window but the last slept on and evicted),
    with requests of different lengths batched in one session; at N=1 the scores of continuations
    read after an eviction differ, the others not."""
    from sleepscale.data.sample import IGNORE_INDEX
    from sleepscale.sleep import sleep_forward

    ours = SleepingLM(pretrained=str(hybrid), window=4, passes=3, batch_size=4)
    requests = [(context, continuation) for context, continuation in LOGLIKELIHOOD if context] + [("the", " cat")]
    got = ours.loglikelihood(_requests("loglikelihood", requests))
    for (context, continuation), (score, _) in zip(requests, got):
        context_ids, continuation_ids = ours.tok_encode(context), ours.tok_encode(context + continuation)
        tokens = torch.tensor([continuation_ids])
        assert continuation_ids[: len(context_ids)] == context_ids
        targets = torch.full_like(tokens, IGNORE_INDEX)
        targets[0, len(context_ids) - 1 : -1] = tokens[0, len(context_ids) :]
        with torch.no_grad():
            logits = sleep_forward(ours.model, tokens[:, :-1], ours.sleep, targets=targets[:, :-1]).logits
        logprobs = torch.log_softmax(logits.float(), -1)[0]
        supervised = (targets[0, :-1] != IGNORE_INDEX).nonzero().flatten()
        expected = logprobs[supervised, targets[0, supervised]].sum().item()
        assert score == pytest.approx(expected, rel=1e-5, abs=1e-5)
    one_pass = SleepingLM(pretrained=str(hybrid), window=4, passes=1).loglikelihood(
        _requests("loglikelihood", requests)
    )
    after_an_eviction = [len(ours.tok_encode(context + continuation)) - 1 > 4 for context, continuation in requests]
    assert 2 <= sum(after_an_eviction) < len(requests)
    for evicted, (score, _), (score_one_pass, _) in zip(after_an_eviction, got, one_pass):
        assert (abs(score - score_one_pass) > 1e-3) == evicted


def test_the_shipped_local_data_are_what_the_generators_write(tmp_path):
    from sleepscale.harness.tasks import LOCAL_TASKS, write_local_data

    for written in write_local_data(tmp_path):
        assert written.read_text() == (LOCAL_TASKS / written.name).read_text(), (
            f"{written.name} changed: run `python -m sleepscale.harness.tasks`"
        )


def test_a_task_yaml_reads_its_data_beside_it(tmp_path, monkeypatch):
    """Relative dataset paths are read from the YAML's directory, not the working directory."""
    from sleepscale.harness.tasks import local_task

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "docs.jsonl").write_text('{"text": "a", "label": 0}\n')
    (tmp_path / "single.yaml").write_text("task: single\ndataset_path: data/docs.jsonl\ntest_split: test\n")
    (tmp_path / "files.yaml").write_text(
        "task: files\ndataset_path: json\ndataset_kwargs:\n  data_files: {test: data/docs.jsonl}\ntest_split: test\n"
    )
    monkeypatch.chdir("/")
    docs = str(tmp_path / "data" / "docs.jsonl")
    single = local_task(tmp_path / "single.yaml")
    assert (single["dataset_path"], single["dataset_kwargs"]["data_files"]) == ("json", {"test": docs})
    assert local_task(tmp_path / "files.yaml")["dataset_kwargs"]["data_files"] == {"test": docs}


def test_math_generation_runs_in_the_harness():
    """The shipped generation task through `lm_eval.simple_evaluate` on an untrained byte-level model:
    every document gets a generated answer (scored 0 or 1 by exact match)."""
    from sleepscale.config import validate
    from sleepscale.data.tokenizer import ByteTokenizer
    from sleepscale.harness.model import Evaluated
    from sleepscale.harness.tasks import resolve_tasks
    from sleepscale.model import build_model

    config = validate(
        {
            "model": {"vocab_size": 258, "hidden_size": 16, "pattern": "AG", "intermediate_size": 32},
            "sleep": {"window": 64, "passes": 2},
            "train": {"steps": 1},
        }
    )
    evaluated = Evaluated(build_model(config.model), config.sleep, ByteTokenizer(), None, None)
    specs, manager = resolve_tasks(["math_generation"])
    model = SleepingLM(evaluated=evaluated, batch_size=2)
    found = lm_eval.simple_evaluate(model=model, tasks=specs, task_manager=manager, limit=3, log_samples=True)
    assert found["results"]["math_generation"]["exact_match,none"] in (0.0, 1 / 3, 2 / 3, 1.0)
    (sample, *_) = found["samples"]["math_generation"]
    assert sample["target"].isdigit() and sample["arguments"][0][0].endswith("Answer: ")
    assert sample["resps"][0][0] and "\n" not in sample["resps"][0][0]
    assert len(found["samples"]["math_generation"]) == 3


@pytest.fixture(scope="module")
def rule110_run(tmp_path_factory):
    """A Rule 110 run (the task's own symbols as tokens), trained 4 steps with MLflow tracking."""
    from train_helpers import train, write_config

    tmp = tmp_path_factory.mktemp("rule110")
    train(write_config(tmp, tmp / "data", tmp / "run", train={"steps": 4}, checkpoint={"every": 4, "keep": 1}))
    return tmp / "run"


def _eval(*args):
    return subprocess.run(
        [sys.executable, "-m", "sleepscale.cli", "eval", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


@pytest.mark.slow
def test_eval_lm_eval_on_a_trained_run_prints_and_logs_the_table(rule110_run):
    result = _eval(rule110_run, "--lm-eval", "rule110_choice", "--passes", "1,2", "--limit", "12")
    assert result.returncode == 0, result.stderr[-3000:]
    for n in (1, 2):
        assert f"N={n} (sleep passes before each eviction)" in result.stdout
    assert result.stdout.count("|rule110_choice|") == 2 and "logged to MLflow run" in result.stdout
    saved = json.loads((rule110_run / "checkpoints" / "step-000004" / "lm-eval.json").read_text())
    assert saved["passes"]["2"]["n-samples"]["rule110_choice"]["effective"] == 12

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{rule110_run.resolve()}/mlflow.db")
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("sleepscale").experiment_id])
    for n in (1, 2):
        (accuracy,) = client.get_metric_history(mlflow_run.info.run_id, f"lm_eval_rule110_choice_acc_N{n}")
        assert accuracy.value == saved["passes"][str(n)]["results"]["rule110_choice"]["acc,none"]
        assert accuracy.step == 4
    assert "lm-eval.json" in {artifact.path for artifact in client.list_artifacts(mlflow_run.info.run_id)}


@pytest.mark.parametrize(
    "args, message",
    [
        (["--lm-eval", "no_such_task_anywhere"], "not a task of lm-evaluation-harness, a local task"),
        (["--lm-eval", "{yaml}"], "its dataset file"),
        (["--lm-eval", "rule110_choice", "--passes", "0"], "--passes '0': every N must be >= 1"),
        (["--lm-eval", "rule110_choice", "--limit", "0"], "--limit 0: give a number of documents"),
    ],
)
def test_bad_lm_eval_arguments_are_one_line(args, message, tmp_path, capsys):
    from sleepscale.cli import main

    (tmp_path / "task.yaml").write_text("task: missing\ndataset_path: missing.jsonl\ntest_split: test\n")
    args = [arg.format(yaml=tmp_path / "task.yaml") for arg in args]
    code = main(["eval", str(tmp_path / "no-run"), *args])
    stderr = capsys.readouterr().err
    assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1, stderr


def test_conversion_carries_the_tokenizer_there_and_back(converted, tmp_path):
    from sleepscale.convert import export_to_hf

    hf_dir, ours_dir = converted
    back = export_to_hf(ours_dir, tmp_path / "back")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (ours_dir / name).read_text() == (hf_dir / name).read_text() == (back / name).read_text()


def test_max_length_cuts_as_the_harness_hf_model_does(converted):
    """With max_length=6 the last 6 tokens of each request are read, and documents are scored in the
    harness's rolling windows of 6: the same numbers as the `hf` model given that max_length."""
    from lm_eval.models.huggingface import HFLM

    hf_dir, ours_dir = converted
    harness_hf = HFLM(pretrained=str(hf_dir), device="cpu", batch_size=1, max_length=6)
    ours = SleepingLM(pretrained=str(ours_dir), window=128, batch_size=3, max_length=6)
    requests = [(c, x) for c, x in LOGLIKELIHOOD if c and len(ours.tok_encode(c + x)) > 7 > len(ours.tok_encode(x))]
    assert len(requests) >= 2
    got = [score for score, _ in ours.loglikelihood(_requests("loglikelihood", requests))]
    assert got == pytest.approx(
        [s for s, _ in harness_hf.loglikelihood(_requests("loglikelihood", requests))], rel=1e-4
    )
    rolling = _requests("loglikelihood_rolling", [(TEXTS[1],)])
    assert ours.loglikelihood_rolling(rolling) == pytest.approx(harness_hf.loglikelihood_rolling(rolling), rel=1e-4)
