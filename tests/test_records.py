"""Tests for cut.records: loading, validation messages, classification and downsampling."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from cut.data.records import Example, Record, build_examples, classify, load_records, validate
from cut.errors import DataError

from helpers import raises_naming_file

ROWS = [
    {"instruction": "Add 3 and 4.", "input": "", "output": "7", "judgment": None},
    {"instruction": "Add the numbers.", "input": "3 and 4", "output": "8", "judgment": "8 is wrong."},
    {"instruction": "Name a colour.", "input": "", "output": "Red.", "judgment": "The response is perfect."},
]

ITER1 = Path(__file__).resolve().parents[2] / "shared" / "data" / "cut-online-iter" / "iter1.json"


def rec(judgment=None, score=None, judge_error=None, index=0) -> Record:
    return Record("Say hi.", "", "Hi.", judgment, score=score, index=index, judge_error=judge_error)


def write_json(tmp_path: Path, data, name: str = "data.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


# --------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------


def test_json_list_loads_to_records(tmp_path):
    records = load_records(write_json(tmp_path, ROWS))
    assert [r.instruction for r in records] == [row["instruction"] for row in ROWS]
    assert [r.judgment for r in records] == [None, "8 is wrong.", "The response is perfect."]
    assert [r.index for r in records] == [0, 1, 2]
    assert records[1].input == "3 and 4"


def test_jsonl_loads_to_the_same_records(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS) + "\n\n")  # a trailing blank line is fine
    assert load_records(str(path)) == load_records(write_json(tmp_path, ROWS))


def test_datasets_folder_loads_to_the_same_records(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "ds"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(folder))
    assert load_records(str(folder)) == load_records(write_json(tmp_path, ROWS))


def test_datasets_dict_uses_the_train_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "dsdict"
    other = [{"instruction": "Other.", "input": "", "output": "x", "judgment": None}]
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(other)}
    ).save_to_disk(str(folder))
    assert load_records(str(folder)) == load_records(write_json(tmp_path, ROWS))


def test_missing_input_reads_as_empty_string(tmp_path):
    records = load_records(write_json(tmp_path, [{"instruction": "Hi.", "output": "Hello."}]))
    assert records[0].input == ""
    assert records[0].judgment is None


# --------------------------------------------------------------------------------------------
# bad input: the message names the file, the record and the field
# --------------------------------------------------------------------------------------------


def test_broken_json_names_the_path(tmp_path):
    raises_naming_file(tmp_path, '[{"instruction": "x",', load_records, DataError, "not valid JSON")


def test_broken_jsonl_line_names_the_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    lines = [json.dumps(ROWS[0]), "", json.dumps(ROWS[1]), "{not json"]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        load_records(str(path))
    msg = str(err.value)
    assert str(path) in msg
    assert "line 4" in msg
    assert "record 2" in msg  # the blank line is not a record


GOOD = {"instruction": "Say hi.", "input": "", "output": "Hi.", "judgment": None}


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"input": "", "output": "Hi."}, "instruction"),
        ({"instruction": "Say hi."}, "output"),
        ({"instruction": 3, "output": "Hi."}, "instruction"),
        ({"instruction": "Say hi.", "output": "  "}, "output"),
        ({"instruction": "Say hi.", "output": "Hi.", "judgment": ["bad"]}, "judgment"),
        ({"instruction": "Say hi.", "output": "Hi.", "score": "9"}, "score"),
        ({"instruction": "Say hi.", "output": "Hi.", "score": True}, "score"),
        ({"instruction": "Say hi.", "output": "Hi.", "input": 5}, "input"),
    ],
    ids=[
        "missing-instruction",
        "missing-output",
        "int-instruction",
        "blank-output",
        "list-judgment",
        "string-score",
        "bool-score",
        "int-input",
    ],
)
def test_bad_field_names_file_record_and_field(tmp_path, bad, field):
    path = write_json(tmp_path, [GOOD, GOOD, bad])
    with pytest.raises(DataError) as err:
        load_records(path)
    msg = str(err.value)
    assert path in msg
    assert "record 2" in msg
    assert f"'{field}'" in msg


def test_non_object_record_names_file_and_record(tmp_path):
    path = write_json(tmp_path, [GOOD, "just a string"])
    with pytest.raises(DataError, match="expected an object") as err:
        load_records(path)
    assert path in str(err.value)
    assert "record 1" in str(err.value)


@pytest.mark.parametrize("top", ["a string", 42, {"a": 1}, {"a": [], "b": []}], ids=repr)
def test_top_level_that_is_not_a_list(tmp_path, top):
    path = write_json(tmp_path, top)
    with pytest.raises(DataError, match="expected a JSON list") as err:
        load_records(path)
    assert path in str(err.value)


def test_single_list_under_a_key_is_accepted(tmp_path):
    assert load_records(write_json(tmp_path, {"train": ROWS})) == load_records(write_json(tmp_path, ROWS))


def test_empty_list(tmp_path):
    path = write_json(tmp_path, [])
    with pytest.raises(DataError, match="no records") as err:
        load_records(path)
    assert path in str(err.value)


@pytest.mark.parametrize("name", ["missing.json", "missing.jsonl"])
def test_missing_file(tmp_path, name):
    path = str(tmp_path / name)
    with pytest.raises(DataError, match="cannot read") as err:
        load_records(path)
    assert path in str(err.value)


def test_validate_uses_the_source_name():
    with pytest.raises(DataError, match=r"^src\.json: record 0, field 'output': missing$"):
        validate([{"instruction": "x"}], "src.json")


# --------------------------------------------------------------------------------------------
# classification
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "judgment",
    [None, "Perfect.", "The response is perfect", "this answer is perfect!", "  The output is PERFECT.  "],
)
def test_positive_judgments(judgment):
    assert classify(rec(judgment)) == "positive"


@pytest.mark.parametrize(
    "judgment",
    ["Perfect, except the date is wrong", "Not perfect.", "The response is not perfect.", "8 is wrong."],
)
def test_negative_judgments(judgment):
    assert classify(rec(judgment)) == "negative"


def test_missing_judgment_field_is_positive(tmp_path):
    records = load_records(write_json(tmp_path, [{"instruction": "x", "output": "y"}]))
    assert classify(records[0]) == "positive"


def test_score_at_or_above_threshold_is_positive_despite_critique():
    assert classify(rec("Fine, though terse.", score=7)) == "positive"
    assert classify(rec("Fine, though terse.", score=9.5)) == "positive"
    assert classify(rec("Fine, though terse.", score=6)) == "negative"
    assert classify(rec("Fine, though terse.", score=6.9)) == "negative"
    assert classify(rec("Fine, though terse.", score=6), score_threshold=6) == "positive"


@pytest.mark.parametrize("judgment", ["$ERROR$", "", "   ", " $ERROR$\n"])
def test_failed_judgments(judgment):
    assert classify(rec(judgment)) == "failed"


def test_failed_judgment_wins_over_a_high_score():
    assert classify(rec("$ERROR$", score=10)) == "failed"


def test_truthy_judge_error_is_failed_even_with_a_judgment(tmp_path):
    rows = [
        {"instruction": "x", "output": "y", "judgment": None, "judge_error": "timeout"},
        {"instruction": "x", "output": "y", "judgment": "Wrong.", "judge_error": "timeout"},
        {"instruction": "x", "output": "y", "judgment": "Wrong.", "judge_error": ""},
    ]
    records = load_records(write_json(tmp_path, rows))
    assert [classify(r) for r in records] == ["failed", "failed", "negative"]


# --------------------------------------------------------------------------------------------
# build_examples
# --------------------------------------------------------------------------------------------

MIXED = [
    rec(None, index=0),
    rec("Wrong.", index=1),
    rec("$ERROR$", index=2),
    rec("The response is perfect.", index=3),
    rec("", index=4),
    rec("Too long.", score=3, index=5),
    rec("Wrong.", judge_error="rate limit", index=6),
    rec("Terse.", score=8, index=7),
]


def test_failed_judgments_are_dropped_and_counted():
    examples, counts = build_examples(MIXED)
    assert [e.record.index for e in examples] == [0, 1, 3, 5, 7]
    assert [e.judgment for e in examples] == [None, "Wrong.", None, "Too long.", None]
    assert counts == {
        "records": 8,
        "positive": 3,
        "negative": 2,
        "failed_judgment": 3,
        "downsampled_away": 0,
    }
    assert counts["positive"] + counts["negative"] + counts["failed_judgment"] == counts["records"]


def test_failed_judgments_as_positives_carry_no_judgment():
    examples, counts = build_examples(MIXED, on_failed_judgment="positive")
    assert len(examples) == 8
    by_index = {e.record.index: e for e in examples}
    for i in (2, 4, 6):
        assert by_index[i].judgment is None
        assert not by_index[i].is_negative
    assert counts["failed_judgment"] == 3
    assert counts["positive"] == 6
    assert counts["negative"] == 2
    assert counts["positive"] + counts["negative"] == counts["records"] == len(examples)


@pytest.mark.parametrize("mode", ["drop", "positive"])
def test_no_example_trains_on_a_failed_judgment(mode):
    examples, _ = build_examples(MIXED, on_failed_judgment=mode)
    assert all(e.judgment not in ("$ERROR$", "") for e in examples)
    assert all(e.judgment is None or e.judgment.strip() for e in examples)
    negatives = [e.record.index for e in examples if e.is_negative]
    assert negatives == [1, 5]


def many(n_pos: int, n_neg: int) -> list[Record]:
    pos = [rec(None, index=i) for i in range(n_pos)]
    neg = [rec(f"Wrong {i}.", index=n_pos + i) for i in range(n_neg)]
    return pos + neg


def test_downsample_keeps_r_times_negatives_positives_and_all_negatives():
    records = many(20, 4)
    examples, counts = build_examples(records, downsample=1.5)
    positives = [e for e in examples if not e.is_negative]
    negatives = [e for e in examples if e.is_negative]
    assert len(positives) == int(1.5 * 4) == 6
    assert [e.record.index for e in negatives] == [20, 21, 22, 23]
    assert counts["positive"] == 6
    assert counts["negative"] == 4
    assert counts["downsampled_away"] == 14
    assert counts["positive"] + counts["negative"] + counts["downsampled_away"] == counts["records"]
    assert len(examples) == counts["positive"] + counts["negative"]
    # order of the kept examples follows the file
    assert [e.record.index for e in examples] == sorted(e.record.index for e in examples)


def test_downsample_is_seeded():
    records = many(30, 3)

    def kept(seed):
        examples, _ = build_examples(records, downsample=1, seed=seed)
        return [e.record.index for e in examples if not e.is_negative]

    assert kept(7) == kept(7)
    assert len(kept(7)) == 3
    assert len({tuple(kept(s)) for s in range(5)}) > 1


def test_downsample_zero_keeps_no_positives():
    examples, counts = build_examples(many(5, 2), downsample=0)
    assert all(e.is_negative for e in examples)
    assert counts["downsampled_away"] == 5


def test_downsample_larger_than_the_ratio_keeps_everything():
    records = many(5, 4)
    examples, counts = build_examples(records, downsample=3)
    assert len(examples) == 9
    assert counts["downsampled_away"] == 0
    assert build_examples(records, downsample=-1)[0] == examples


def test_downsample_counts_add_up_with_dropped_failures():
    records = many(10, 2) + [rec("$ERROR$", index=99)]
    examples, counts = build_examples(records, downsample=2)
    assert counts["failed_judgment"] == 1
    assert counts["positive"] == 4
    assert counts["negative"] == 2
    assert counts["downsampled_away"] == 6
    total = counts["positive"] + counts["negative"] + counts["failed_judgment"] + counts["downsampled_away"]
    assert total == counts["records"] == 13
    assert len(examples) == 6
    assert all(isinstance(e, Example) for e in examples)


# --------------------------------------------------------------------------------------------
# the released round-1 data, where present
# --------------------------------------------------------------------------------------------


def test_released_iter1_matches_its_readme():
    if not ITER1.exists():
        pytest.skip(f"released judgment data not present at {ITER1}")
    raw = json.loads(ITER1.read_text())
    records = load_records(str(ITER1))
    assert len(records) == 1000
    # README figures count the raw 'judgment' field: null / critique / "$ERROR$"
    kinds = Counter(
        "null" if r.judgment is None else "error" if r.judgment == "$ERROR$" else "critique" for r in records
    )
    assert kinds == {"null": 713, "critique": 240, "error": 47}
    assert sum(bool(row["input"]) for row in raw) == 406
    # The classifier agrees, except that one critique only says the response is perfect
    # (record 242: "The response is perfect."), which the rule counts as a positive.
    perfect_critiques = [
        r.index for r in records if r.judgment not in (None, "$ERROR$") and classify(r) == "positive"
    ]
    assert perfect_critiques == [242]
    assert records[242].judgment == "The response is perfect."
    _, counts = build_examples(records)
    assert counts["failed_judgment"] == 47
    assert counts["positive"] == 713 + len(perfect_critiques)
    assert counts["negative"] == 240 - len(perfect_critiques)
    assert counts["positive"] + counts["negative"] + counts["failed_judgment"] == 1000


# --------------------------------------------------------------------------------------------
# TRL's formats: chat messages, prompt / completion / label; dataset config and split
# --------------------------------------------------------------------------------------------


def test_chat_messages_map_onto_a_judged_record(tmp_path):
    rows = [
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Add 3 and 4."},
                {"role": "assistant", "content": "8"},
            ],
            "judgment": "8 is wrong: 3 + 4 = 7.",
            "spans": ["8"],
        },
        {
            "messages": [
                {"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "Red."},
            ]
        },
    ]
    neg, pos = load_records(write_json(tmp_path, rows, "chat.json"))
    assert (neg.instruction, neg.input, neg.output) == ("Add 3 and 4.", "system: Be brief.", "8")
    assert (neg.judgment, neg.spans) == ("8 is wrong: 3 + 4 = 7.", ((0, 1),))
    assert (pos.instruction, pos.input, pos.output, pos.judgment) == ("Name a colour.", "", "Red.", None)
    assert [classify(r) for r in (neg, pos)] == ["negative", "positive"]


def test_earlier_chat_turns_become_the_input(tmp_path):
    turns = [
        {"role": "user", "content": "Hi."},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "And 2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    (r,) = load_records(write_json(tmp_path, [{"messages": turns}]))
    assert (r.instruction, r.input, r.output) == ("And 2+2?", "user: Hi.\nassistant: Hello!", "4")


def test_trl_prompt_completion_label_files(tmp_path):
    rows = [
        {"prompt": "Add 3 and 4.", "completion": "7", "label": True},
        {"prompt": "Add 3 and 4.", "completion": "8", "label": False, "judgment": "8 is wrong."},
        {
            "prompt": [{"role": "user", "content": "Name a colour."}],
            "completion": [{"role": "assistant", "content": "Red."}],
        },
    ]
    path = tmp_path / "kto.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    records = load_records(str(path))
    assert [(r.instruction, r.output, r.judgment) for r in records] == [
        ("Add 3 and 4.", "7", None),
        ("Add 3 and 4.", "8", "8 is wrong."),
        ("Name a colour.", "Red.", None),
    ]
    _, counts = build_examples(records)
    assert (counts["positive"], counts["negative"]) == (2, 1)


@pytest.mark.parametrize(
    "row, match",
    [
        (
            {"prompt": "Q", "completion": "A", "label": False},
            r"field 'judgment': label false needs",
        ),
        ({"prompt": "Q", "completion": "A", "label": False, "judgment": " "}, r"field 'judgment'"),
        (
            {"prompt": "Q", "completion": "A", "label": True, "judgment": "bad"},
            r"field 'judgment': label true",
        ),
        (
            {"prompt": "Q", "completion": "A", "label": "no"},
            r"field 'label': expected true or false",
        ),
        ({"prompt": "Q", "label": True}, r"field 'completion': missing"),
        ({"prompt": "Q", "completion": "A", "instruction": "Q"}, r"field 'instruction': not with 'prompt'"),
        ({"messages": [{"role": "user", "content": "Q"}]}, r"field 'messages': the last turn must be"),
        ({"messages": [{"role": "bot", "content": "Q"}]}, r"field 'messages', turn 0: role must be"),
        ({"messages": [{"role": "user", "content": 3}]}, r"field 'messages', turn 0: expected"),
        ({"messages": "hi"}, r"field 'messages': expected a non-empty list"),
        (
            {"prompt": "Q", "completion": [{"role": "user", "content": "A"}]},
            r"field 'completion': expected one assistant",
        ),
        (
            {"messages": [{"role": "assistant", "content": "A"}, {"role": "assistant", "content": "B"}]},
            r"field 'messages': the prompt must end with a user turn",
        ),
    ],
)
def test_bad_trl_records_name_file_record_and_field(tmp_path, row, match):
    path = write_json(tmp_path, [row])
    with pytest.raises(DataError, match=f"{path}: record 0, " + match):
        load_records(path)


def test_dataset_config_and_split_of_a_local_datasets_folder(tmp_path):
    folder = tmp_path / "hub_like"
    for sub, split, output in (("main", "train", "7"), ("main", "test", "T"), ("alt", "train", "A")):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        (folder / sub / f"{split}.jsonl").write_text(json.dumps({"prompt": "Q", "completion": output}) + "\n")
    (folder / "README.md").write_text(
        "---\nconfigs:\n"
        "- config_name: main\n  default: true\n  data_files:\n"
        "  - {split: train, path: main/train.jsonl}\n  - {split: test, path: main/test.jsonl}\n"
        "- config_name: alt\n  data_files:\n  - {split: train, path: alt/train.jsonl}\n---\n"
    )
    out = lambda **kw: [r.output for r in load_records(str(folder), **kw)]  # noqa: E731
    assert out() == ["7"]
    assert out(split="test") == ["T"]
    assert out(config="alt") == ["A"]
    with pytest.raises(DataError, match=r"no 'dev' split \(splits: train, test\)"):
        out(split="dev")
    with pytest.raises(DataError, match=r"config 'nope'"):
        out(config="nope")
    with pytest.raises(DataError, match="not a .json/.jsonl file"):
        load_records(write_json(tmp_path, ROWS), split="test")
