"""Inference with sleep: the streaming session against the training engine, generation, the
consolidated-state cache and `sleepscale generate`."""

import subprocess
import sys

import pytest
import torch
from conftest import make_config, make_model

from sleepscale.inference import SleepingSession, StateCache, sample
from sleepscale.sleep import sleep_forward

LENGTH = 37  # four full windows of 8 and a partial one


def _chunks(length: int, seed: int) -> list[int]:
    generator, sizes = torch.Generator().manual_seed(seed), []
    while sum(sizes) < length:
        sizes.append(min(int(torch.randint(1, 12, (1,), generator=generator)), length - sum(sizes)))
    return sizes


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eviction", ["hard", "sliding"])
@pytest.mark.parametrize("passes", [1, 2, 4])
@pytest.mark.parametrize("loop", [None, [1, 3]])
def test_session_logits_over_random_chunks_equal_the_engine(eviction, passes, loop, dtype):
    config = make_config(passes=passes, eviction=eviction, model={"loop": loop})
    model = make_model(config, dtype)
    tokens = torch.randint(0, 40, (2, LENGTH), generator=torch.Generator().manual_seed(1))
    expected = sleep_forward(model, tokens, config.sleep).logits
    session, logits, start = SleepingSession(model, config.sleep, batch_size=2), [], 0
    for size in _chunks(LENGTH, seed=passes):
        logits.append(session.feed(tokens[:, start : start + size]))
        start += size
    atol = 1e-5 if dtype == torch.float32 else 1e-7  # float32: relative errors ~5e-7 of the logits' norm
    torch.testing.assert_close(torch.cat(logits, dim=1), expected, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
def test_greedy_generation_is_the_argmax_continuation_across_a_window_boundary(eviction):
    config = make_config(passes=3, eviction=eviction)
    model = make_model(config)
    prompt = torch.randint(0, 40, (2, 13), generator=torch.Generator().manual_seed(2))
    session = SleepingSession(model, config.sleep, batch_size=2)
    session.feed(prompt)
    generated = torch.stack(list(session.generate(max_new_tokens=10)), dim=1)  # positions 13..22: past 16
    sequence = prompt
    for i in range(10):
        expected = sleep_forward(model, sequence, config.sleep).logits[:, -1].argmax(-1)
        assert torch.equal(generated[:, i], expected), i
        sequence = torch.cat([sequence, generated[:, i : i + 1]], dim=1)


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
@pytest.mark.parametrize("passes", [1, 2, 4])
@pytest.mark.parametrize("loop", [None, [1, 3]])
def test_streams_of_different_lengths_read_together_as_each_alone(eviction, passes, loop):
    """A batch whose streams read different numbers of tokens per call (some none) gives each
    stream the logits of the engine over that stream alone."""
    config = make_config(passes=passes, eviction=eviction, model={"loop": loop})
    model = make_model(config, torch.float64)
    lengths = [5, LENGTH, 17]
    streams = [torch.randint(0, 40, (n,), generator=torch.Generator().manual_seed(10 + n)) for n in lengths]
    session = SleepingSession(model, config.sleep, batch_size=3)
    generator, read, logits = torch.Generator().manual_seed(passes), [0, 0, 0], [[], [], []]
    while read != lengths:
        sizes = [min(int(torch.randint(0, 12, (1,), generator=generator)), n - r) for n, r in zip(lengths, read)]
        if not any(sizes):
            continue
        out = session.feed_each([s[r : r + k] for s, r, k in zip(streams, read, sizes)])
        for i, k in enumerate(sizes):
            assert out[i].shape == (k, 40)
            logits[i].append(out[i])
            read[i] += k
    for stream, pieces in zip(streams, logits):
        expected = sleep_forward(model, stream[None], config.sleep).logits[0]
        torch.testing.assert_close(torch.cat(pieces), expected, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("eviction", ["hard", "sliding"])
def test_streams_of_different_lengths_decode_together_as_each_alone(eviction):
    """Prompts of 5, 13 and 16 tokens (windows of 8), then 12 greedy tokens decoded in one batch:
    every stream crosses a window boundary at its own step, and each continuation is the argmax
    continuation of that stream alone."""
    config = make_config(passes=3, eviction=eviction)
    model = make_model(config, torch.float64)
    prompts = [torch.randint(0, 40, (n,), generator=torch.Generator().manual_seed(n)) for n in (5, 13, 16)]
    session = SleepingSession(model, config.sleep, batch_size=3)
    session.feed_each(prompts)
    generated = torch.stack(list(session.generate(max_new_tokens=12)), dim=1)
    for prompt, continuation in zip(prompts, generated):
        sequence = prompt[None]
        for token in continuation:
            assert token == sleep_forward(model, sequence, config.sleep).logits[0, -1].argmax(), sequence.shape
            sequence = torch.cat([sequence, token.view(1, 1)], dim=1)


def test_uneven_feeding_is_refused_in_one_line():
    config = make_config(passes=2)
    session = SleepingSession(make_model(config), config.sleep, batch_size=2)
    with pytest.raises(ValueError, match="one token list per stream"):
        session.feed_each([[1, 2]])
    with pytest.raises(ValueError, match="at least one token"):
        session.feed_each([[], []])
    session.feed_each([[1, 2], []])
    with pytest.raises(ValueError, match="a stream has read nothing yet"):
        next(session.generate(3))


def test_states_are_float32_whatever_the_compute_dtype():
    config = make_config(passes=2, eviction="sliding")
    model = make_model(config, dtype=torch.bfloat16)
    session = SleepingSession(model, config.sleep)
    session.feed(torch.randint(0, 40, (1, 21)))
    for state in (*session.state.states, *session.state.window_start):
        for name in ("fast_weights", "keys", "values"):
            value = getattr(state, name, None)
            assert value is None or value.dtype == torch.float32, (type(state).__name__, name)
        for tail in getattr(state, "conv_tails", None) or ():
            assert tail.dtype == torch.float32
    assert torch.isfinite(session.feed(torch.randint(0, 40, (1, 3)))).all()


def test_a_cache_hit_continues_exactly_as_a_fresh_read_and_the_cache_keeps_its_limit(tmp_path):
    config = make_config(passes=3)
    model = make_model(config)
    document = torch.randint(0, 40, (1, 29), generator=torch.Generator().manual_seed(3))
    question = torch.tensor([[5, 6, 7]])

    def answer(session):
        session.feed(question)
        return torch.stack(list(session.generate(max_new_tokens=12)), dim=1)

    fresh = SleepingSession(model, config.sleep)
    fresh.feed(document)
    expected = answer(fresh)

    cache = StateCache("tiny", directory=tmp_path / "states")
    first, second = SleepingSession(model, config.sleep), SleepingSession(model, config.sleep)
    assert cache.ingest(first, document) is False and cache.ingest(second, document) is True
    assert torch.equal(answer(first), expected) and torch.equal(answer(second), expected)
    from_disk = SleepingSession(model, config.sleep)
    assert StateCache("tiny", directory=tmp_path / "states").ingest(from_disk, document) is True
    assert torch.equal(answer(from_disk), expected)
    assert (
        StateCache("other weights", directory=tmp_path / "states").ingest(
            SleepingSession(model, config.sleep), document
        )
        is False
    )

    one_entry = cache.bytes
    small = StateCache("tiny", max_bytes=int(one_entry * 2.5))
    for seed in range(4):
        small.ingest(
            SleepingSession(model, config.sleep),
            torch.randint(0, 40, (1, 29), generator=torch.Generator().manual_seed(seed)),
        )
        assert small.bytes <= small.max_bytes
    assert len(small._entries) == 2


def test_sampling_greedy_temperature_top_p_and_stop_tokens():
    logits = torch.tensor([[0.0, 3.0, 2.9, -5.0]])
    assert sample(logits).tolist() == [1]
    generator = torch.Generator().manual_seed(0)
    draws = {sample(logits, temperature=1.0, top_p=0.5, generator=generator).item() for _ in range(50)}
    assert draws == {1}  # token 1 alone reaches half the mass
    draws = {sample(logits, temperature=1.0, top_p=0.99, generator=generator).item() for _ in range(200)}
    assert draws == {0, 1, 2}

    config = make_config(passes=2)
    model = make_model(config)
    session = SleepingSession(model, config.sleep)
    session.feed(torch.tensor([[1, 2, 3]]))
    first = session.snapshot()
    greedy = [t.item() for t in session.generate(max_new_tokens=6)]
    session.restore(first)
    stopped = [t.item() for t in session.generate(max_new_tokens=6, stop_tokens=[greedy[2]])]
    assert stopped == greedy[: greedy.index(greedy[2]) + 1]


def test_feeding_ids_outside_the_vocabulary_is_refused():
    config = make_config()
    session = SleepingSession(make_model(config), config.sleep)
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 40\)"):
        session.feed(torch.tensor([[3, 40]]))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from train_helpers import train, write_config

    tmp = tmp_path_factory.mktemp("generate")
    config = write_config(tmp, tmp / "data", tmp / "run", train={"steps": 2})
    train(config)
    return tmp / "run"


def _generate(*args):
    return subprocess.run(
        [sys.executable, "-m", "sleepscale.cli", "generate", *map(str, args)], capture_output=True, text=True
    )


def test_generate_streams_a_continuation_of_a_trained_run(trained_run):
    result = _generate(trained_run, "--prompt", "0 1 1 0 1 0 0 1 ?1", "--max-new-tokens", "5", "--passes", "3")
    assert result.returncode == 0, result.stderr
    continuation = result.stdout.split()
    assert len(continuation) == 5 and set(continuation) <= {"<pad>", "0", "1", "?1", "?2"}, result.stdout
    assert '"generated_tokens": 5' in result.stderr and '"passes": 3' in result.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["/nonexistent/run", "--prompt", "0 1"], "not a sleepscale checkpoint or run directory"),
        (["RUN", "--prompt", "0 1 x"], "symbol 'x' is not in the vocabulary"),
        (["RUN", "--prompt", "0 1", "--passes", "0"], "--passes 0: give N >= 1"),
    ],
)
def test_bad_generate_arguments_are_one_line(trained_run, args, message):
    result = _generate(*[trained_run if a == "RUN" else a for a in args])
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_evaluation_by_generation_agrees_with_teacher_forced_exact_match(trained_run):
    from sleepscale.data.loader import ShardLoader
    from sleepscale.eval import evaluate
    from sleepscale.train.checkpoint import load_model_from_checkpoint

    model, config = load_model_from_checkpoint(trained_run)
    model = model.double()  # a barely trained model has near-ties, which float32 rounding could break differently
    batches = [batch for batch in ShardLoader(config.data.path, "validation", batch_size=8, shuffle=False)][:2]
    teacher_forced = evaluate(model.eval(), batches, config.sleep, [1, 2])
    generated = evaluate(model.eval(), batches, config.sleep, [1, 2], by_generation=True)
    assert [(r["value"], r["passes"], r["items"], r["accuracy"]) for r in generated] == [
        (r["value"], r["passes"], r["items"], r["accuracy"]) for r in teacher_forced
    ]
    # Token by token: a generated answer equals the teacher-forced argmax (Rule 110's answers are
    # one token each; a multi-token answer would agree up to its first wrong token).
    from sleepscale.eval import generated_answers
    from sleepscale.sleep import IGNORE_INDEX

    sleep = config.sleep.model_copy(update={"passes": 2})
    compared = 0
    for batch in batches:
        answers = generated_answers(model, batch["input_ids"], batch["targets"], sleep)
        argmax = sleep_forward(model, batch["input_ids"], sleep).logits.argmax(-1)
        for row in range(answers.shape[0]):
            for position in (batch["targets"][row] != IGNORE_INDEX).nonzero().flatten().tolist():
                assert answers[row, position] == argmax[row, position], (row, position)
                compared += 1
    assert compared > 16


def test_multi_token_answers_are_generated_and_judged_as_teacher_forcing_judges_them():
    """Answers whose tokens are read back as inputs (a math answer's digits) are generated as one run."""
    from sleepscale.eval import generated_answers
    from sleepscale.sleep import IGNORE_INDEX

    config = make_config(passes=2)
    model = make_model(config)
    prompt = torch.randint(0, 40, (1, 13), generator=torch.Generator().manual_seed(4))
    session = SleepingSession(model, config.sleep)
    session.feed(prompt)
    answer = torch.stack(list(session.generate(4)), dim=1)  # the model's own answer: right by construction
    wrong = answer.clone()
    wrong[0, 2] = (wrong[0, 2] + 1) % 40  # its third token changed
    for given, right in ((answer, True), (wrong, False)):
        input_ids = torch.cat([prompt, given], dim=1)
        targets = torch.full_like(input_ids, IGNORE_INDEX)
        targets[0, 12:16] = given[0]  # position i predicts input i + 1
        generated = generated_answers(model, input_ids, targets, config.sleep)
        teacher_forced = sleep_forward(model, input_ids, config.sleep).logits.argmax(-1)
        assert torch.equal(generated[0, 12:16], answer[0])  # generation follows its own tokens
        assert bool((teacher_forced[0, 12:16] == given[0]).all()) == right == torch.equal(generated[0, 12:16], given[0])


@pytest.fixture(scope="module")
def math_run(tmp_path_factory):
    """A run on math word problems (byte tokens, multi-digit answers then <eos>), trained 2 steps."""
    import yaml
    from train_helpers import train, write_config

    tmp = tmp_path_factory.mktemp("math")
    config = write_config(
        tmp,
        tmp / "data",
        tmp / "run",
        model={"vocab_size": 264},
        sleep={"window": 64, "passes": 2, "checkpoint": "none"},
        train={"steps": 2},
        checkpoint={"every": 2, "keep": 1},
    )
    settings = yaml.safe_load(config.read_text())
    settings["data"]["generate"] = {
        "task": "math",
        "args": {"ops_values": [2, 4], "length": 320},
        "train_samples": 32,
        "validation_samples": 8,
        "samples_per_shard": 16,
    }
    config.write_text(yaml.safe_dump(settings))
    train(config)
    return tmp / "run"


@pytest.mark.slow
def test_math_evaluated_by_generation_end_to_end(math_run, tmp_path):
    """`sleepscale eval --generate` on a math run reports the teacher-forced exact matches; and on
    the same problems with each answer replaced by the model's own greedy answer (right by
    construction), then with one digit of it changed, generation and teacher forcing both judge
    every answer right, then wrong."""
    from sleepscale.data.loader import ShardLoader
    from sleepscale.eval import _answer_runs, evaluate
    from sleepscale.train.checkpoint import load_model_from_checkpoint

    tables = {}
    for flags in ([], ["--generate"]):
        out = tmp_path / f"eval{len(flags)}.csv"
        result = subprocess.run(
            [sys.executable, "-m", "sleepscale.cli", "eval", str(math_run), "--no-mlflow", "--out", str(out), *flags],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr
        rows = [line.split(",") for line in out.read_text().splitlines()]
        tables[len(flags)] = [row[:5] for row in rows]  # difficulty, value, passes, items, accuracy
    assert tables[0] == tables[1] and len(tables[0]) == 5, tables  # header + ops 2, 4 at N = 1, 2

    model, config = load_model_from_checkpoint(math_run)
    model = model.double().eval()
    batch = next(iter(ShardLoader(config.data.path, "validation", batch_size=8, shuffle=False)))
    input_ids, targets, starts = batch["input_ids"].clone(), batch["targets"].clone(), []
    for row in range(input_ids.shape[0]):
        ((start, end),) = _answer_runs(input_ids[row].tolist(), targets[row].tolist())  # digits and <eos>: one run
        assert end - start >= 2
        session = SleepingSession(model, config.sleep)
        session.feed(input_ids[row : row + 1, : start + 1])
        answer = torch.cat(list(session.generate(end - start)))
        targets[row, start:end], input_ids[row, start + 1 : end] = answer, answer[:-1]
        starts.append(start)
    for change in (False, True):
        if change:  # each answer's first token changed: a wrong first digit
            for row, start in enumerate(starts):
                targets[row, start] = (targets[row, start] + 1) % 264
        changed = {**batch, "input_ids": input_ids, "targets": targets}
        by_generation = evaluate(model, [changed], config.sleep, [2], by_generation=True)
        teacher_forced = evaluate(model, [changed], config.sleep, [2])
        assert (
            [r["accuracy"] for r in by_generation]
            == [r["accuracy"] for r in teacher_forced]
            == [0.0 if change else 1.0] * len(teacher_forced)
        ), (by_generation, teacher_forced)


def test_generation_keeps_to_the_tokenizers_vocabulary():
    """A tokenizer smaller than the model's embedding table: `vocabulary` keeps every id below it
    (the CLI passes its tokenizer's size), greedy or sampled."""
    config = make_config()
    session = SleepingSession(make_model(config), config.sleep, batch_size=2)
    session.feed(torch.tensor([[1, 2, 3], [4, 5, 6]]))
    start = session.snapshot()
    for temperature in (0.0, 1.0):
        session.restore(start)
        tokens = torch.stack(
            list(session.generate(12, temperature, generator=torch.Generator().manual_seed(0), vocabulary=3))
        )
        assert int(tokens.max()) < 3
