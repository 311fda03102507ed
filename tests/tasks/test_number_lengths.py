"""Length generalisation rows: `linattn eval RUN --digits 2-4` on a tiny trained run."""
import json

import pytest

from linattn.cli import main
from linattn.tasks.lengths import parse_digits

TINY = ["--d-model", "32", "--layers", "1", "--heads", "2", "--steps", "4", "--batch", "8",
        "--eval-batches", "2", "--no-progress", "--device", "cpu"]


def test_parse_digits():
    assert parse_digits("6-9") == [6, 7, 8, 9]
    assert parse_digits("5,7") == [5, 7] and parse_digits("8") == [8]
    assert parse_digits("2-3,6") == [2, 3, 6]
    for bad in ("9-6", "a", "6-", ""):
        with pytest.raises(ValueError):
            parse_digits(bad)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("arith")
    assert main(["train", "--task", "arithmetic", "--digits", "2", "--op", "add", "--mixer", "attention",
                 "--out", str(out), *TINY]) == 0
    return out


def test_eval_digits_gives_one_row_per_length(run, capsys):
    capsys.readouterr()
    assert main(["eval", str(run), "--digits", "2-4", "--json", "--batches", "2", "--seed", "7"]) == 0
    res = json.loads(capsys.readouterr().out)
    rows = res["rows"]
    assert [r["digits"] for r in rows] == [2, 3, 4] and res["trained_digits"] == 2
    assert [r["seq_len"] for r in rows] == [3 * d + 3 for d in (2, 3, 4)]  # a + b = c, c has d + 1 digits
    assert all(r["sequences"] == 16 and 0 <= r["exact_match"] <= r["accuracy"] + 1e-9 <= 1 + 1e-9 for r in rows)
    # the row at the trained length is the plain evaluation on the same test set
    assert main(["eval", str(run), "--json", "--batches", "2", "--seed", "7"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert rows[0]["accuracy"] == pytest.approx(plain["accuracy"]) and rows[0]["loss"] == pytest.approx(plain["loss"])
    assert main(["eval", str(run), "--digits", "3,5", "--batches", "1"]) == 0
    table = capsys.readouterr().out
    assert "trained at 2 digits" in table and len([ln for ln in table.splitlines() if "longer" in ln]) == 2


def test_eval_digits_needs_a_digits_knob(tmp_path, capsys):
    assert main(["train", "--task", "copy", "--copy-len", "2", "--seq-len", "8", "--vocab", "8",
                 "--out", str(tmp_path), *TINY]) == 0
    assert main(["eval", str(tmp_path), "--digits", "3"]) == 2
    assert "digits knob" in capsys.readouterr().err


def test_nupa_trains_from_the_cli_and_evaluates_at_other_lengths(tmp_path, capsys):
    assert main(["train", "--task", "nupa", "--problem", "frac_add", "--digits", "2", "--tokenization", "r2l3",
                 "--mixer", "gla", "--out", str(tmp_path), *TINY]) == 0
    capsys.readouterr()
    assert main(["eval", str(tmp_path), "--digits", "2-3", "--json", "--batches", "1"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["task"]["problem"] == "frac_add" and res["task"]["tokenization"] == "r2l3"
    assert [r["digits"] for r in res["rows"]] == [2, 3] and res["rows"][0]["seq_len"] < res["rows"][1]["seq_len"]
