"""Number tasks: arithmetic (add / sub / mul, n by m digits, forward or reversed, three
tokenizations), the NUPA problems, and the number tokenizer.

Every answer is checked independently of the generators: the token ids are decoded back to
text, the question is parsed, and the answer is computed with Python's int, Fraction and
Decimal."""
import itertools
import re
from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest
import torch

from linattn.tasks import TASKS, make_task, task_from_dict
from linattn.tasks import arithmetic as ar
from linattn.tasks.batch import BOS
from linattn.tasks.number_tokens import NumberVocab, split_run
from linattn.tasks.nupa import PROBLEMS

TOKENIZATIONS = ("digit", "l2r3", "r2l3")


def content_of(batch):
    """[B, T] the full token stream: input_ids shifted back plus the last target."""
    return torch.cat([batch.input_ids[:, 1:], batch.targets[:, -1:]], dim=1)


# ------------------------------------------------------------------------- tokenizer

def test_grouping_directions():
    assert split_run("12345", "digit") == list("12345")
    assert split_run("12345", "l2r3") == ["123", "45"]
    assert split_run("12345", "r2l3") == ["12", "345"]
    assert split_run("123456", "l2r3") == split_run("123456", "r2l3") == ["123", "456"]
    assert split_run("7", "r2l3") == ["7"] and split_run("1234567", "r2l3") == ["1", "234", "567"]
    v = NumberVocab(("+", "="), "r2l3")
    assert v.pieces("1234+56789=") == ["1", "234", "+", "56", "789", "="]
    assert NumberVocab(("+", "="), "l2r3").pieces("1234+56789=") == ["123", "4", "+", "567", "89", "="]


@pytest.mark.parametrize("tokenization", TOKENIZATIONS)
def test_tokenizer_round_trips_and_ids_are_distinct(tokenization):
    v = NumberVocab(("+", "-", ".", "="), tokenization)
    rng = np.random.default_rng(0)
    for _ in range(300):
        parts = ["".join(map(str, rng.integers(0, 10, size=rng.integers(1, 12)))) for _ in range(3)]
        text = parts[0] + "+" + parts[1] + "." + parts[2] + "=-"
        ids = v.encode(text)
        assert v.decode(ids) == text and all(0 < t < v.size for t in ids)
        assert v.decode([BOS] + ids) == text
    pieces = ["5", "05", "005", "0", "00", "000", "999"] if tokenization != "digit" else list("0123456789")
    assert len({v.piece_id(p) for p in pieces}) == len(pieces)
    assert v.size == (11 if tokenization == "digit" else 1111) + 4
    assert len({v.symbol(s) for s in "+-.="}) == 4 and min(v.symbol(s) for s in "+-.=") == v.first_symbol


def test_tokenizer_rejects_bad_settings():
    with pytest.raises(ValueError, match="tokenization"):
        NumberVocab(("+",), "l2r4")
    with pytest.raises(ValueError, match="symbols"):
        NumberVocab(("7",))


# ------------------------------------------------------------------------ arithmetic

def parse_arithmetic(task, ids, mask):
    """(a, symbol, b, answer text) of one example, from its ids and answer mask."""
    text = task.vocab.decode(ids)
    m = re.fullmatch(r"(\d+)([+*-])(\d+)=([+-]?\d+)", text)
    assert m, text
    answer = task.vocab.decode([t for t, k in zip(ids, mask) if k])
    assert answer == m.group(4)  # the scored tokens are exactly the answer
    return m.group(1), m.group(2), m.group(3), answer


ARITH = [dict(digits=n, digits_b=mb, op=op, order=order, tokenization=tk)
         for (n, mb), op, order, tk in itertools.product(
             [(1, 0), (3, 0), (5, 2), (2, 7), (10, 0)], ("add", "sub", "mul", "mixed"),
             ("forward", "reversed"), TOKENIZATIONS)]


@pytest.mark.parametrize("knobs", ARITH, ids=lambda k: "-".join(str(v) for v in k.values()))
def test_arithmetic_answers_are_right(knobs):
    task = make_task("arithmetic", **knobs)
    b = task.batch("train", 0, 3, 48)
    content = content_of(b)
    assert content.shape[1] == task.seq_len and int(content.max()) < task.vocab_size
    n, m = task.digits, task.digits_b or task.digits
    symbols = set()
    for ids, mask in zip(content.tolist(), b.answer_mask.tolist()):
        a_s, sym, b_s, answer = parse_arithmetic(task, ids, mask)
        assert len(a_s) == n and len(b_s) == m  # operands zero-padded to a fixed width
        a, b_ = int(a_s), int(b_s)
        symbols.add(sym)
        if task.op == "sub":
            assert sym == "-" and answer[0] == ("-" if a < b_ else "+")
            digits, value = answer[1:], abs(a - b_)
        else:
            assert sym in ({"+"} if task.op == "add" else {"*"} if task.op == "mul" else {"+", "*"})
            digits, value = answer, a * b_ if sym == "*" else a + b_
        assert len(digits) == task.answer_width
        assert int(digits[::-1] if task.order == "reversed" else digits) == value
        assert sum(mask) == task.answer_tokens
    if task.op == "mixed":
        assert symbols == {"+", "*"}


def test_subtraction_signs_both_occur_and_tokens_in_digit_mode():
    task = make_task("arithmetic", digits=3, op="sub", order="reversed")
    b = task.batch("test", 1, 0, 200)
    signs = b.targets[:, -task.answer_tokens]
    assert set(signs.tolist()) == {ar.PLUS, ar.MINUS} and task.vocab_size == 15
    assert make_task("arithmetic", op="mul").vocab_size == 14  # add / mul keep the old vocabulary


@pytest.mark.parametrize("knobs", [dict(digits=5, op="mul", order="reversed"), dict(digits=7, digits_b=3, op="sub", order="forward"),
                                   dict(digits=9, op="mixed", order="reversed"), dict(digits=4, digits_b=1, op="add", order="forward")])
def test_tensor_path_equals_text_path(knobs):
    """Tokenization "digit" computes ids on int64 tensors; they must be what the text path encodes."""
    task = make_task("arithmetic", **knobs)
    gen = np.random.default_rng(5)
    a = torch.from_numpy(gen.integers(0, 10, size=(64, task.digits)))
    b = torch.from_numpy(gen.integers(0, 10, size=(64, task.digits_b or task.digits)))
    is_mul = torch.from_numpy(gen.integers(0, 2, size=64)).bool() if task.op == "mixed" else torch.full((64,), task.op == "mul")
    a[0], b[0] = 9, 9  # the largest operands
    a[1], b[1] = 0, 9  # the most negative difference
    assert torch.equal(task._content_digits(a, b, is_mul), task._content_text(a, b, is_mul.tolist()))


def test_uniform_lengths_make_short_operands_common():
    fixed = make_task("arithmetic", digits=6, op="mul")
    uniform = make_task("arithmetic", digits=6, op="mul", lengths="uniform")
    for task, lo, hi in ((fixed, 0.85, 1.0), (uniform, 0.1, 0.25)):
        b = task.batch("train", 0, 0, 400)
        counts = {}
        for ids, mask in zip(content_of(b).tolist(), b.answer_mask.tolist()):
            a_s, _, b_s, answer = parse_arithmetic(task, ids, mask)
            assert int(answer[::-1]) == int(a_s) * int(b_s) and len(a_s) == len(b_s) == 6
            counts[len(a_s.lstrip("0"))] = counts.get(len(a_s.lstrip("0")), 0) + 1
        assert lo <= counts.get(6, 0) / 400 <= hi, counts  # full-length a: ~90% vs ~1/6
    with pytest.raises(ValueError, match="lengths"):
        make_task("arithmetic", lengths="short")


@pytest.mark.parametrize("fraction", [0.0, 0.4, 1.0])
def test_simple_samples_are_one_shifted_digit_of_b(fraction):
    """lengths "simple" (Qiu et al.): a fraction of the samples has b zero but for one digit,
    at every position; a keeps its full width; every answer stays right."""
    task = make_task("arithmetic", digits=5, op="mul", order="reversed", lengths="simple",
                     simple_fraction=fraction)
    b = task.batch("train", 0, 0, 600)
    simple, positions, full_a = 0, set(), 0
    for ids, mask in zip(content_of(b).tolist(), b.answer_mask.tolist()):
        a_s, _, b_s, answer = parse_arithmetic(task, ids, mask)
        assert int(answer[::-1]) == int(a_s) * int(b_s) and len(a_s) == len(b_s) == 5
        full_a += a_s[0] != "0"
        nonzero = [i for i, d in enumerate(b_s) if d != "0"]
        if len(nonzero) <= 1:
            simple += 1
            positions.update(nonzero)
    lo, hi = {0.0: (0, 0.01), 0.4: (0.33, 0.47), 1.0: (1, 1)}[fraction]
    assert lo <= simple / 600 <= hi  # a fixed b has at most one nonzero digit with p ~ 5e-4
    assert full_a / 600 > 0.85  # a is drawn as under "fixed"
    if fraction:
        assert positions == set(range(5))
    with pytest.raises(ValueError, match="simple_fraction"):
        make_task("arithmetic", lengths="simple", simple_fraction=1.5)


def test_arithmetic_grouped_answer_is_the_reversed_text_grouped():
    task = make_task("arithmetic", digits=5, op="mul", order="reversed", tokenization="r2l3")
    b = task.batch("train", 0, 0, 4)
    for ids, mask in zip(content_of(b).tolist(), b.answer_mask.tolist()):
        answer_ids = [t for t, k in zip(ids, mask) if k]
        text = task.vocab.decode(answer_ids)
        assert [task.vocab.decode([t]) for t in answer_ids] == split_run(text, "r2l3")
    assert task.seq_len == 2 + 2 + 2 + 4  # 5 digits: 2 pieces each; a 10-digit answer: 4


# ------------------------------------------------------------------------------ NUPA

def nupa_expected(problem: str, q: str) -> str:
    """The answer to question q (without '='), computed from the question text alone."""
    if problem.startswith("int_"):
        if problem == "int_length":
            return str(len(q[:-1]))
        if problem == "int_to_sci":
            a = int(q[:-1])
            e = len(str(a)) - 1
            mant = Decimal(a) / Decimal(10) ** e
            s = format(mant.normalize(), "f")
            return f"{s}e{e}"
        a, op, b = re.fullmatch(r"(\d+)([-+*÷%MG])(\d+)", q).groups()
        x, y = int(a), int(b)
        return {"+": lambda: str(x + y), "-": lambda: str(x - y), "*": lambda: str(x * y),
                "÷": lambda: str(x // y), "%": lambda: str(x % y), "M": lambda: str(max(x, y)),
                "G": lambda: a[y]}[op]()
    if problem.startswith("float_"):
        x, op, y = re.fullmatch(r"(\d+\.\d+)([+M])(\d+\.\d+)", q).groups()
        if op == "M":
            return x if Decimal(x) >= Decimal(y) else y
        places = max(len(x.split(".")[1]), len(y.split(".")[1]))
        return str((Decimal(x) + Decimal(y)).quantize(Decimal(1).scaleb(-places)))
    x, op, y = re.fullmatch(r"(\d+/\d+)([+M])(\d+/\d+)", q).groups()
    if op == "M":
        return x if Fraction(x) >= Fraction(y) else y
    s = Fraction(x) + Fraction(y)
    return f"{s.numerator}/{s.denominator}"


@pytest.mark.parametrize("problem,tokenization", [(p, t) for p in PROBLEMS for t in ("digit", "r2l3")]
                         + [("float_add", "l2r3"), ("int_mul", "l2r3")])
def test_nupa_answers_are_right(problem, tokenization):
    task = make_task("nupa", problem=problem, digits=4, tokenization=tokenization)
    b = task.batch("train", 2, 1, 150)
    content = content_of(b)
    lengths, traps = set(), 0
    for ids, mask in zip(content.tolist(), b.answer_mask.tolist()):
        start = next(i for i, t in enumerate(ids) if t != BOS)
        assert all(t != BOS for t in ids[start:])  # left padding only
        text = task.vocab.decode(ids)
        q, a = text.split("=")
        assert a.endswith("$") and task.vocab.decode([t for t, k in zip(ids, mask) if k]) == a
        assert mask[start:] == [False] * (len(ids) - start - sum(mask)) + [True] * sum(mask)
        assert a[:-1] == nupa_expected(problem, q), text
        numbers = re.findall(r"\d+", q)
        assert all(len(s) <= 4 for s in numbers[:2]) and all(s == "0" or s[0] != "0" for s in numbers[:1])
        lengths.add(len(numbers[0]))
        if problem == "float_max":
            (xi, xf), (yi, yf) = (s.split(".") for s in q.split("M"))
            traps += xi == yi and len(xf) != len(yf)
    assert lengths == {1, 2, 3, 4}  # short and long operands both appear
    if problem == "float_max":
        assert traps >= 10  # the 9.11 vs 9.9 case


def test_nupa_seq_len_is_reached_by_the_longest_question():
    """seq_len is the token count of the longest example, not more: for int_mul at 3 digits,
    999*999=998001$ has 3 + 1 + 3 + 1 + 6 + 1 tokens."""
    assert make_task("nupa", problem="int_mul", digits=3).seq_len == 15
    assert make_task("nupa", problem="int_mul", digits=3, tokenization="l2r3").seq_len == 7
    assert make_task("nupa", problem="int_to_sci", digits=1).seq_len == len("9S=9e0$")


def test_to_sci_examples():
    from linattn.tasks.nupa import to_sci
    assert [to_sci(a) for a in (5, 10, 1200, 1203, 987654)] == ["5e0", "1e1", "1.2e3", "1.203e3", "9.87654e5"]


# ------------------------------------------------------------- shared task behaviour

CASES = [("arithmetic", dict(digits=5, op="mul", order="reversed", tokenization="r2l3")),
         ("arithmetic", dict(digits=4, digits_b=2, op="sub", order="forward")),
         ("nupa", dict(problem="frac_add", digits=3)),
         ("nupa", dict(problem="float_max", digits=5, tokenization="l2r3"))]


@pytest.mark.parametrize("name,knobs", CASES)
def test_pure_function_of_split_seed_index_and_round_trip(name, knobs):
    task = make_task(name, **knobs)
    a, b = task.batch("train", 3, 17, 8), task.batch("train", 3, 17, 8)
    assert all(torch.equal(x, y) for x, y in zip((a.input_ids, a.targets, a.answer_mask),
                                                 (b.input_ids, b.targets, b.answer_mask)))
    for other in (task.batch("train", 3, 18, 8), task.batch("train", 4, 17, 8), task.batch("test", 3, 17, 8)):
        assert not torch.equal(other.input_ids, a.input_ids)
    assert (a.input_ids[:, 0] == BOS).all() and torch.equal(a.input_ids[:, 1:], a.targets[:, :-1])
    assert a.input_ids.shape == (8, task.seq_len) and int(a.targets.max()) < task.vocab_size
    assert task_from_dict(task.to_dict()) == task


def test_test_split_rarely_repeats_training_examples():
    """Train and test batches come from disjoint seeds (linattn.tasks.batch); at 5 digits the
    example space is large enough that they also share almost no sequences."""
    task = make_task("arithmetic", digits=5, op="mul")
    train = {tuple(r) for i in range(10) for r in task.batch("train", 0, i, 64).input_ids.tolist()}
    test = [tuple(r) for r in task.batch("test", 0, 0, 256).input_ids.tolist()]
    assert sum(r in train for r in test) <= 1


@pytest.mark.parametrize("name,knobs,match", [
    ("arithmetic", dict(op="div"), "op"),
    ("arithmetic", dict(digits_b=-1), "digits_b"),
    ("arithmetic", dict(tokenization="bpe"), "tokenization"),
    ("nupa", dict(problem="int_pow"), "problem"),
    ("nupa", dict(digits=0), "digits"),
    ("nupa", dict(tokenization="x"), "tokenization"),
])
def test_bad_number_knobs_are_a_value_error(name, knobs, match):
    with pytest.raises(ValueError, match=match):
        make_task(name, **knobs)


def test_nupa_is_registered_with_at_least_eight_problems():
    assert "nupa" in TASKS and len(PROBLEMS) >= 8
    kinds = {p.split("_")[0] for p in PROBLEMS}
    assert kinds == {"int", "float", "frac"}
