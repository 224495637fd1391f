"""Task generators checked against independent implementations written here."""

import json
import re

import numpy as np
import pytest

from sleepscale.data.depo import DepoTask
from sleepscale.data.math_problems import MathTask
from sleepscale.data.rule110 import Rule110Task, step
from sleepscale.data.sample import IGNORE_INDEX, DataError
from sleepscale.data.text import TextCorpus
from sleepscale.data.tokenizer import ByteTokenizer, HuggingFaceTokenizer

# Rule 110 written out as its table: neighbourhood (left, centre, right) -> new cell.
RULE_110 = {
    (1, 1, 1): 0,
    (1, 1, 0): 1,
    (1, 0, 1): 1,
    (1, 0, 0): 0,
    (0, 1, 1): 1,
    (0, 1, 0): 1,
    (0, 0, 1): 1,
    (0, 0, 0): 0,
}


def rule110_by_table(cells):
    n = len(cells)
    return [RULE_110[(cells[(i - 1) % n], cells[i], cells[(i + 1) % n])] for i in range(n)]


def test_rule110_step_matches_the_table_including_wraparound():
    rng = np.random.default_rng(0)
    for _ in range(200):
        cells = rng.integers(0, 2, size=int(rng.integers(3, 30)))
        assert step(cells).tolist() == rule110_by_table(cells.tolist())
    # Cases where the wrap-around decides (with zero boundaries they would give [1, 1, 1, 1] and [1, 0, 0, 0]):
    assert step(np.array([1, 1, 0, 1])).tolist() == [0, 1, 1, 1]  # cell 0 sees the last cell
    assert step(np.array([1, 0, 0, 0])).tolist() == [1, 0, 0, 1]  # the last cell sees cell 0


@pytest.mark.parametrize("t", [0, 1, 5, 32])
def test_rule110_labels_and_layout(t):
    task = Rule110Task([t])
    vocab = task.vocabulary
    for seed in range(20):
        sample = task.sample(np.random.default_rng(seed))
        assert sample.input_ids.shape == sample.targets.shape == (100,)
        assert (sample.targets[:96] == IGNORE_INDEX).all()
        strings = (sample.input_ids[:96] == vocab["1"]).astype(int).reshape(4, 24)
        assert [vocab.symbols[i] for i in sample.input_ids[96:]] == ["?1", "?2", "?3", "?4"]
        expected = []
        for cells in strings.tolist():
            for _ in range(t):
                cells = rule110_by_table(cells)
            expected.append(cells[0])
        assert [vocab.symbols[i] for i in sample.targets[96:]] == [str(bit) for bit in expected]
        assert sample.meta == {"task": "rule110", "difficulty": {"t": t}, "answer": expected}


def test_rule110_mixes_t_values():
    task = Rule110Task([4, 8, 12])
    seen = {task.sample(np.random.default_rng(seed)).meta["difficulty"]["t"] for seed in range(60)}
    assert seen == {4, 8, 12}


def test_rule110_queries_name_t_when_asked():
    """`t_in_query`: a mixture's query names the t its label is computed with; without it the
    vocabulary and parameters are the ones datasets were written with before the option."""
    task = Rule110Task([2, 4, 8], bits=16, strings=2, t_in_query=True)
    assert task.vocabulary.symbols[3:] == ["?1t2", "?1t4", "?1t8", "?2t2", "?2t4", "?2t8"]
    assert task.params()["t_in_query"] is True and "t_in_query" not in Rule110Task([2]).params()
    assert Rule110Task([2], strings=2).vocabulary.symbols == ["<pad>", "0", "1", "?1", "?2"]
    for seed in range(30):
        sample = task.sample(np.random.default_rng(seed))
        t = sample.meta["difficulty"]["t"]
        assert [task.vocabulary.symbols[i] for i in sample.input_ids[32:]] == [f"?1t{t}", f"?2t{t}"]
        strings = (sample.input_ids[:32] == task.vocabulary["1"]).astype(int).reshape(2, 16).tolist()
        for cells, label in zip(strings, sample.targets[32:]):
            for _ in range(t):
                cells = rule110_by_table(cells)
            assert task.vocabulary.symbols[label] == str(cells[0])


@pytest.mark.parametrize("split", ["train", "validation"])
def test_depo_answers_follow_the_cycle(split):
    task = DepoTask() if split == "train" else DepoTask().for_validation()
    symbols = task.vocabulary.symbols
    for seed in range(30):
        sample = task.sample(np.random.default_rng(seed))
        tokens = [symbols[i] for i in sample.input_ids]
        assert len(tokens) == 360 and (sample.targets[:300] == IGNORE_INDEX).all()
        edge_tokens = [t for t in tokens[:300] if t != "<pad>"]
        assert len(edge_tokens) <= 300 and len(edge_tokens) % 4 == 0
        successor = {}
        for x, arrow, y, end in zip(*[iter(edge_tokens)] * 4):
            assert (arrow, end) == ("->", ";") and x not in successor
            successor[x] = y
        # One cycle through every node: walking n steps from any node visits all n and returns.
        start = next(iter(successor))
        walk = [start]
        while len(walk) <= len(successor):
            walk.append(successor[walk[-1]])
        assert walk[-1] == start and set(walk[:-1]) == set(successor) and len(successor) == sample.meta["nodes"]

        queries = list(zip(*[iter(tokens[300:])] * 6))
        assert len(queries) == 10
        supervised = np.flatnonzero(sample.targets != IGNORE_INDEX)
        assert supervised.tolist() == [300 + 6 * i + 3 for i in range(10)]
        for i, (mark, hop, x, colon, y, end) in enumerate(queries):
            assert (mark, colon, end) == ("?", ":", ".")
            k = int(hop.removeprefix("k="))
            node = x
            for _ in range(k):
                node = successor[node]
            assert y == node == symbols[sample.targets[supervised[i]]] == sample.meta["answer"][i]
            assert k == sample.meta["difficulty"]["k"][i]
            assert k in (task.eval_k_values if split == "validation" else task.k_values)


# An independent reading of the math text: sentences -> computation graph.
SENTENCES = [
    (re.compile(r"^(\w+) has (\d+) (\w+)\.$"), lambda m: (m[1], m[3], "base", [], int(m[2]))),
    (re.compile(r"^(\w+) has (\d+) more (\w+) than (\w+)\.$"), lambda m: (m[1], m[3], "+", [m[4]], int(m[2]))),
    (re.compile(r"^(\w+) has (\d+) fewer (\w+) than (\w+)\.$"), lambda m: (m[1], m[3], "-", [m[4]], int(m[2]))),
    (re.compile(r"^(\w+) has (\d+) times as many (\w+) as (\w+)\.$"), lambda m: (m[1], m[3], "*", [m[4]], int(m[2]))),
    (
        re.compile(r"^(\w+) has as many (\w+) as (\w+) and (\w+) together\.$"),
        lambda m: (m[1], m[2], "sum", [m[3], m[4]], None),
    ),
]


def parse_problem(text):
    match = re.fullmatch(r"Question: how many (\w+) does (\w+) have\?\n(.*)\nAnswer: (\d+)", text, re.S)
    item, person, context, answer = match.groups()
    graph = {}
    for sentence in re.findall(r"[^.]+\.", context):
        sentence = sentence.strip()
        for pattern, build in SENTENCES:
            m = pattern.match(sentence)
            if m:
                who, what, op, sources, constant = build(m)
                assert (who, what) not in graph, f"{who}'s {what} defined twice"
                graph[(who, what)] = (op, [(s, what) for s in sources], constant)
                break
        else:
            raise AssertionError(f"unparsed sentence {sentence!r}")
    return graph, (person, item), int(answer)


def evaluate(graph, node, memo=None):
    memo = {} if memo is None else memo
    if node not in memo:
        op, sources, constant = graph[node]
        values = [evaluate(graph, s, memo) for s in sources]
        memo[node] = {
            "base": lambda: constant,
            "+": lambda: values[0] + constant,
            "-": lambda: values[0] - constant,
            "*": lambda: values[0] * constant,
            "sum": lambda: sum(values),
        }[op]()
    return memo[node]


def ancestors(graph, node):
    found, todo = set(), [node]
    while todo:
        current = todo.pop()
        if current not in found:
            found.add(current)
            todo += graph[current][1]
    return found


@pytest.mark.parametrize("ops", [1, 2, 5, 8])
def test_math_answers_equal_the_graph_and_distractors_do_not_matter(ops):
    tokenizer = ByteTokenizer()
    task = MathTask([ops], length=700)
    for seed in range(15):
        sample = task.sample(np.random.default_rng(seed))
        used = sample.input_ids[sample.input_ids != tokenizer.pad_id]
        assert used[-1] == tokenizer.eos_id and len(sample.input_ids) == 700
        graph, question, stated = parse_problem(tokenizer.decode(used[:-1]))
        assert stated == sample.meta["answer"] == evaluate(graph, question)
        answer_tokens = sample.targets[sample.targets != IGNORE_INDEX]
        assert tokenizer.decode(answer_tokens[:-1]) == str(stated) and answer_tokens[-1] == tokenizer.eos_id
        needed = ancestors(graph, question)
        assert sum(graph[n][0] != "base" for n in needed) == ops == sample.meta["difficulty"]["ops"]
        distractors = set(graph) - needed
        assert len(distractors) == sample.meta["distractors"] > 0
        perturbed = {
            n: (op, src, (c or 0) + 7 if n in distractors and op == "base" else c) for n, (op, src, c) in graph.items()
        }
        assert evaluate(perturbed, question) == stated
        assert all(0 <= value <= 999 for value in (evaluate(graph, n) for n in graph))


def test_math_refuses_a_length_too_short():
    with pytest.raises(ValueError, match="does not fit in length 60"):
        MathTask([8], length=60).sample(np.random.default_rng(0))


@pytest.fixture
def word_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = (
        "Question : how many apples pears marbles stamps coins books pencils shells cards plums does have ? Answer"
    ).split()
    vocab = {"[UNK]": 0, "<pad>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(dict.fromkeys(words))}}
    vocab |= {str(d): len(vocab) + d for d in range(10)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def test_math_with_a_local_tokenizer_json(word_tokenizer):
    tokenizer = HuggingFaceTokenizer(word_tokenizer)
    sample = MathTask([3], length=300, tokenizer=tokenizer).sample(np.random.default_rng(0))
    answer = sample.targets[sample.targets != IGNORE_INDEX]
    assert (
        tokenizer.decode(answer[:-1]).replace(" ", "") == str(sample.meta["answer"]) and answer[-1] == tokenizer.eos_id
    )
    assert sample.input_ids[-1] == tokenizer.pad_id


def test_text_packing_reconstructs_the_stream(tmp_path, word_tokenizer):
    (tmp_path / "a.txt").write_text("how many apples")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": "Question : pears"}) + "\n\n" + json.dumps({"text": "coins 42"}) + "\n"
    )
    for tokenizer in (ByteTokenizer(), HuggingFaceTokenizer(word_tokenizer)):
        corpus = TextCorpus([tmp_path / "a.txt", tmp_path / "b.jsonl"], length=4, tokenizer=tokenizer)
        samples = list(corpus.samples())
        stream = []
        for doc in ["how many apples", "Question : pears", "coins 42"]:
            stream += tokenizer.encode(doc) + [tokenizer.eos_id]
        assert len(samples) == (len(stream) - 1) // 4 and corpus.dropped_tail_tokens == (len(stream) - 1) % 4
        for i, sample in enumerate(samples):
            assert sample.input_ids.tolist() == stream[4 * i : 4 * i + 4]
            assert sample.targets.tolist() == stream[4 * i + 1 : 4 * i + 5]


@pytest.mark.parametrize(
    "name,content,message",
    [
        ("bad.jsonl", '{"text": "ok"}\n{"text": \n', r"bad.jsonl:2: not valid JSON"),
        ("bad.jsonl", '{"body": "x"}\n', r"bad.jsonl:1: no text field 'text' \(choose one with --field\)"),
        ("bad.csv", "a,b\n", r"bad.csv: unsupported file type '.csv'"),
    ],
)
def test_bad_text_inputs_name_file_and_line(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=message):
        list(TextCorpus([tmp_path / name], 4, ByteTokenizer()).samples())
