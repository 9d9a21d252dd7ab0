"""cut convert (cut.recipes.convert): the Summarization and Shepherd releases -> cut records, as
wwxu21/CUT scripts/convert2alpaca.py computes them. The fixtures are our own short texts in the
released layouts (same fields, same nesting); the expected records are worked out by hand."""

from __future__ import annotations

import copy
import gzip
import json
from pathlib import Path

import pytest

from cut.cli import main as cut_main
from cut.data.records import classify, load_records
from cut.errors import DataError
from cut.recipes.convert import convert, convert_shepherd, convert_summarization

CAT, RAIN = "The cat sat on the mat all day.", "Rain fell on the town at noon."


def _answer(text, rating, critiques, **extra):
    return {"answer": text, "feedback": {"rating": rating, "critiques": critiques, **extra}}


def _critique(text, refinement):
    return {"text": text, "refinement": refinement, "kind": "critique"}


def summarization_lines() -> list[dict]:
    """Two passages, six questions: a negative with two critiques (the best answer is the first of
    two equally ranked), a positive ([] critiques), an empty answer, a skipped one, an empty
    refinement, a positive (null critiques) and a negative whose critique has outer spaces."""
    cat = {
        "passage": {"text": CAT, "title": "cat"},
        "questions": [
            {
                "question": "Summarize the passage.",
                "rankings": [1, 3, 3],
                "answers": [
                    _answer("Cats.", 2, [_critique("Says nothing.", "A cat sat.")]),
                    _answer(
                        "A cat sat.",
                        5,
                        [
                            _critique("Omits the mat.", "A cat sat on a mat."),
                            _critique("Omits how long.", "A cat sat on a mat all day."),
                        ],
                    ),
                    _answer("A cat sat on the mat all day.", 7, []),
                ],
            },
            {
                "question": "What did the cat do?",
                "rankings": [2, 1],
                "answers": [_answer("It sat all day.", 7, []), _answer("It ran.", 1, [])],
            },
        ],
    }
    rain = {
        "passage": {"text": RAIN},
        "questions": [
            {
                "question": "When?",
                "rankings": [1],
                "answers": [_answer("", 1, [_critique("Empty.", "At noon.")])],
            },
            {
                "question": "Where?",
                "rankings": [0, 4],
                "answers": [_answer("Town.", 7, []), _answer("Nowhere.", 1, None, skip=True)],
            },
            {
                "question": "What fell?",
                "rankings": [5],
                "answers": [_answer("Snow.", 2, [_critique("Wrong.", "")])],
            },
            {"question": "Summarize.", "rankings": [5], "answers": [_answer("Rain at noon.", 7, None)]},
            {
                "question": "Is it dry?",
                "rankings": [1],
                "answers": [_answer("Yes.", 1, [_critique(" It rained. ", "No, it rained.")])],
            },
        ],
    }
    return [{"data": cat, "id": "a"}, {"data": rain, "id": "b"}]


EXPECTED_SUMMARIZATION = [
    {
        "instruction": f"{CAT}\nSummarize the passage.",
        "input": "",
        "output": "A cat sat.",
        "judgment": "Omits the mat. Omits how long.",
        "score": 1,
        "i_ans": "A cat sat on a mat all day.",  # the last critique's refinement
    },
    {
        "instruction": f"{CAT}\nWhat did the cat do?",
        "input": "",
        "output": "It sat all day.",
        "judgment": None,
        "score": None,
        "i_ans": None,
    },
    {
        "instruction": f"{RAIN}\nSummarize.",
        "input": "",
        "output": "Rain at noon.",
        "judgment": None,
        "score": None,
        "i_ans": None,
    },
    {
        "instruction": f"{RAIN}\nIs it dry?",
        "input": "",
        "output": "Yes.",
        "judgment": "It rained.",
        "score": 1,
        "i_ans": "No, it rained.",
    },
]


def write_jsonl(path: Path, rows, blank_after: int | None = None) -> Path:
    lines = [json.dumps(r) for r in rows]
    if blank_after is not None:
        lines.insert(blank_after + 1, "")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_summarization_records_are_what_the_release_computes(tmp_path):
    src = write_jsonl(tmp_path / "critiques.train.jsonl", summarization_lines(), blank_after=0)
    rows, counts = convert_summarization(src)
    assert rows == EXPECTED_SUMMARIZATION
    assert counts["questions"] == 7
    assert counts["skipped (skip or empty answer)"] == 2 and counts["skipped (empty refinement)"] == 1
    assert (counts["positives"], counts["negatives"]) == (2, 2)


def test_written_file_trains_as_cut_records(tmp_path):
    src = tmp_path / "critiques.train.jsonl.gz"  # the release ships the files gzipped
    with gzip.open(src, "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r) for r in summarization_lines()))
    out = tmp_path / "open_summary" / "train-alpaca.json"
    assert (
        cut_main(["convert", "--format", "summarization", "--input", str(src), "--output_file", str(out)])
        == 0
    )
    assert json.loads(out.read_text()) == EXPECTED_SUMMARIZATION
    kinds = [classify(r) for r in load_records(str(out))]
    assert kinds == ["negative", "positive", "positive", "negative"]


def shepherd_files(tmp_path: Path, n: int = 3) -> tuple[Path, Path]:
    raw, fb = [], []
    for i in range(n):
        q, a = f"What is {i} plus {i}?", f"It is {2 * i + 1}."
        raw.append(
            {
                "id": i,
                "metadata": {"context": q, "output_candidate": a, "output_correct": f"It is {2 * i}."},
                "domain": "math",
            }
        )
        fb.append({"question": q, "answer": a, "feedback": f"The sum is {2 * i}, not {2 * i + 1}."})
    return write_jsonl(tmp_path / "human_data_raw.jsonl", raw), write_jsonl(
        tmp_path / "human_data_for_model.jsonl", fb
    )


def test_shepherd_records_pair_the_two_files_line_by_line(tmp_path):
    raw, fb = shepherd_files(tmp_path)
    rows, counts = convert_shepherd(raw, fb)
    assert rows[1] == {
        "instruction": "What is 1 plus 1?",
        "input": "",
        "output": "It is 3.",
        "judgment": "The sum is 2, not 3.",
        "score": 1,
        "i_ans": "It is 2.",
    }
    assert len(rows) == 3 and counts["negatives"] == 3
    out = tmp_path / "Shepherd" / "train-alpaca.json"
    argv = [
        "convert",
        "--format",
        "shepherd",
        "--input",
        str(raw),
        "--feedback",
        str(fb),
        "--output_file",
        str(out),
    ]
    assert cut_main(argv) == 0
    assert [classify(r) for r in load_records(str(out))] == ["negative"] * 3


def _mutate(rows, fn):
    rows = copy.deepcopy(rows)
    fn(rows)
    return rows


SUMMARIZATION_ERRORS = [
    (
        lambda r: r[0]["data"]["questions"][1]["answers"][0]["feedback"].update(rating=3),
        "record 0, field 'data.questions[1].answers[0].feedback.rating': no critiques, so the answer "
        "counts as perfect, but its rating is 3, not 7",
    ),
    (lambda r: r[1]["data"]["passage"].pop("text"), "record 1, field 'data.passage.text': missing"),
    (
        lambda r: r[1]["data"]["questions"][0].update(rankings=[0, 9]),
        "record 1, field 'data.questions[0].answers': has 1 answers; rankings point at answer 1",
    ),
    (
        lambda r: r[0]["data"]["questions"][0]["answers"][1]["feedback"]["critiques"][0].update(text=None),
        "record 0, field 'data.questions[0].answers[1].feedback.critiques[0].text': expected a string, got null",
    ),
    (
        lambda r: r[0]["data"]["questions"][0]["answers"][1]["feedback"].pop("critiques"),
        "record 0, field 'data.questions[0].answers[1].feedback.critiques': missing",
    ),
    (
        lambda r: r[1]["data"]["questions"][4].update(rankings=["high"]),
        "record 1, field 'data.questions[4].rankings[0]': expected a number, got str",
    ),
]


@pytest.mark.parametrize("mutate, message", SUMMARIZATION_ERRORS)
def test_summarization_errors_name_file_record_and_field(tmp_path, capsys, mutate, message):
    src = write_jsonl(tmp_path / "critiques.jsonl", _mutate(summarization_lines(), mutate))
    out = tmp_path / "out.json"
    out.write_text("[]\n")  # an earlier output survives a failed run untouched
    with pytest.raises(DataError) as err:
        convert("summarization", str(src), str(out))
    assert str(err.value) == f"{src}: {message}" or str(err.value).startswith(f"{src}: {message}")
    assert (
        cut_main(["convert", "--format", "summarization", "--input", str(src), "--output_file", str(out)])
        == 2
    )
    assert message in capsys.readouterr().err
    assert out.read_text() == "[]\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_summarization_bad_json_line_names_record_and_line(tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_text(json.dumps(summarization_lines()[0]) + "\n\n{not json\n")
    with pytest.raises(DataError, match=r"c.jsonl: record 1 \(line 3\): not valid JSON"):
        convert_summarization(src)


def test_shepherd_errors_name_file_record_and_field(tmp_path):
    raw, fb = shepherd_files(tmp_path)
    rows = [json.loads(x) for x in fb.read_text().splitlines()]
    rows[2]["answer"] = "It is 6."
    write_jsonl(fb, rows)
    with pytest.raises(DataError) as err:
        convert_shepherd(raw, fb)
    assert str(err.value).startswith(f"{raw}: record 2, field 'metadata.output_candidate': differs from")
    rows[2]["answer"] = "It is 5."
    del rows[1]["feedback"]
    write_jsonl(fb, rows)
    with pytest.raises(DataError, match=r"human_data_for_model.jsonl: record 1, field 'feedback': missing"):
        convert_shepherd(raw, fb)
    write_jsonl(fb, rows[:2])
    with pytest.raises(DataError, match="has 3 records but .* has 2"):
        convert_shepherd(raw, fb)


def test_shepherd_needs_its_feedback_file(tmp_path, capsys):
    raw, _ = shepherd_files(tmp_path)
    out = tmp_path / "o.json"
    assert cut_main(["convert", "--format", "shepherd", "--input", str(raw), "--output_file", str(out)]) == 2
    assert "--feedback" in capsys.readouterr().err and not out.exists()
    assert cut_main(["convert", "--format", "summarization", "--input", str(tmp_path / "nope.jsonl"),
                     "--output_file", str(out)]) == 2  # fmt: skip
    assert "nope.jsonl: no such file" in capsys.readouterr().err
