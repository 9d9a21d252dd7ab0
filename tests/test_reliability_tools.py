"""Issue 23, the tools' part (inspect, tds, urial, generate, merge, the model and task CLIs, demo):
bad values are refused as they are parsed, with one line naming the option (exit 2), before any
model loads or anything is written; deeply nested JSON is a named DataError, not a RecursionError;
`--device cuda` on a torch without CUDA is refused up front; inspect checks its output folder first
and tokenises a 4 MB instruction in seconds, to the same tokens."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from cut import cli
from cut.data.files import MAX_JSON_DEPTH, json_depth, parse_json
from cut.errors import ConfigError, DataError

from conftest import TINY_RECORDS
from helpers import cli_args


class Loaded(Exception):
    """Raised by every model and tokenizer loader in these tests: nothing may load."""


@pytest.fixture()
def no_loads(monkeypatch):
    """Every loader a tool could reach raises Loaded: the module-level names each tool imported,
    cut.models' own, and transformers' from_pretrained under them."""
    import transformers

    import cut.analysis.ratios as ins
    import cut.analysis.tds as tds
    import cut.methods.urial as urial
    import cut.modeling.gemma as gemma
    import cut.modeling.generate as gen
    import cut.modeling.loading as models
    import cut.modeling.merge as merge
    import cut.modeling.smollm as smollm
    import cut.recipes.demo as demo

    def refuse(*args, **kwargs):
        raise Loaded("a model or tokenizer was loaded before the options were checked")

    for module in (ins, tds, gen, urial, models):
        monkeypatch.setattr(module, "load_model", refuse)
        monkeypatch.setattr(module, "load_tokenizer", refuse)
    monkeypatch.setattr(merge, "load_tokenizer", refuse)
    monkeypatch.setattr(smollm, "convert_gguf", refuse)
    monkeypatch.setattr(gemma, "convert_gguf", refuse)
    monkeypatch.setattr(demo, "build_data", refuse)
    monkeypatch.setattr(demo, "_run", refuse)
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        monkeypatch.setattr(auto, "from_pretrained", refuse)


def run_cli(argv: list[str]) -> int:
    """`cut ...` in this process: its exit status, whether it returns or exits (argparse does)."""
    try:
        return cli.main(argv)
    except SystemExit as exit_:
        return exit_.code


def one_line_error(capsys, prog: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    assert "\n" not in err, f"more than one line:\n{err}"
    assert err.startswith(f"{prog}: error: "), err
    return err


# --------------------------------------------------------------------------------------------
# case 9: deeply nested JSON input is a DataError naming the file, in every reader
# --------------------------------------------------------------------------------------------

DEPTH = 100_000
DEEP = {
    "lists": "[" * DEPTH + "]" * DEPTH,
    "objects": '{"a":' * DEPTH + "1" + "}" * DEPTH,
}


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
@pytest.mark.parametrize("kind", list(DEEP))
def test_deeply_nested_json_is_a_named_data_error(tmp_path, kind, suffix):
    from cut.data.records import load_records, read_raw

    path = tmp_path / f"deep{suffix}"
    path.write_text(DEEP[kind] + "\n")
    for read in (read_raw, load_records):
        with pytest.raises(DataError) as err:
            read(str(path))
        message = str(err.value)
        assert message.startswith(str(path)) and f"nested more than {MAX_JSON_DEPTH} levels" in message
        assert "\n" not in message
        assert err.value.__context__ is None or not isinstance(err.value.__context__, RecursionError)


def test_nesting_limit_is_exact_and_flat_records_pass(tmp_path):
    assert json_depth("x") == 0 and json_depth([]) == 1 and json_depth([{"a": [1]}]) == 3
    at_limit = "[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH
    assert json_depth(parse_json(at_limit, "f")) == MAX_JSON_DEPTH
    with pytest.raises(DataError, match=rf"^f: JSON nested more than {MAX_JSON_DEPTH} levels"):
        parse_json("[" + at_limit + "]", "f")
    # a record nested below the limit (a chat transcript) reads as before
    chat = [{"instruction": "q", "output": "a", "messages": [{"role": "user", "content": "q"}]}]
    path = tmp_path / "chat.json"
    path.write_text(json.dumps(chat))
    from cut.data.records import read_raw

    assert read_raw(str(path)) == (chat, str(path))


def test_deep_existing_answer_file_and_adapter_config_are_named(tmp_path):
    from cut.modeling.generate import read_answers
    from cut.modeling.loading import adapter_base

    answers = tmp_path / "answers.json"
    answers.write_text(DEEP["lists"])
    with pytest.raises(DataError, match=rf"^{answers}: existing output file: JSON nested"):
        read_answers(answers, {"generator": "g", "temperature": 0})
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(DEEP["objects"])
    with pytest.raises(DataError, match=rf"^{adapter / 'adapter_config.json'}: JSON nested"):
        adapter_base(str(adapter))
    (adapter / "adapter_config.json").write_text("[1]")
    with pytest.raises(ConfigError, match="not a PEFT adapter config"):
        adapter_base(str(adapter))


def _tool_argv(tool: str, model: Path, data: Path, out: Path) -> list[str]:
    if tool == "inspect":
        return ["inspect", "--data_path", str(data), "--model", str(model), "--output_dir", str(out)]
    if tool == "tds":
        return ["tds", "--base_model", str(model), "--aligned_model", str(model)] + [
            "--data_path", str(data), "--output_dir", str(out),
        ]  # fmt: skip
    return [tool, "--model", str(model), "--data_path", str(data), "--output_file", str(out / "a.json")]


PROGS = {"inspect": "cut.analysis.inspect", "tds": "cut.analysis.tds", "urial": "cut.urial"}
PROGS["generate"] = "cut.generate"


@pytest.mark.parametrize("tool", ["inspect", "tds", "urial", "generate"])
def test_deeply_nested_input_stops_each_cli_in_one_line(tiny_model, tmp_path, capsys, no_loads, tool):
    data = tmp_path / "deep.json"
    data.write_text(DEEP["objects"])
    out = tmp_path / "out"
    assert run_cli([*_tool_argv(tool, tiny_model, data, out), "--device", "cpu"]) == 2
    err = one_line_error(capsys, PROGS[tool])
    assert f"{data}: JSON nested more than {MAX_JSON_DEPTH} levels" in err
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# case 10: --device cuda on a torch without CUDA
# --------------------------------------------------------------------------------------------


@pytest.fixture()
def no_cuda(monkeypatch):
    """This torch sees no GPU, here as on a CPU-only build (the test means the same on a GPU box)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.mark.parametrize("tool", ["inspect", "tds", "urial", "generate"])
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_device_cuda_without_cuda_is_refused_before_loading(
    tiny_model, tiny_data, tmp_path, capsys, no_loads, no_cuda, tool, device
):
    out = tmp_path / "out"
    assert run_cli([*_tool_argv(tool, tiny_model, tiny_data, out), "--device", device]) == 2
    err = one_line_error(capsys, PROGS[tool])
    assert f"argument --device: '{device}': this torch sees no CUDA GPU" in err
    assert not out.exists()


def test_device_checks_in_the_library(monkeypatch, no_cuda, tmp_path):
    from cut.analysis.ratios import InspectOptions
    from cut.methods.urial import UrialConfig
    from cut.modeling.generate import GenerateConfig
    from cut.modeling.loading import check_device, load_model, resolve_device

    for make in (
        lambda: InspectOptions(data_path="d", model="m", output_dir=str(tmp_path / "o"), device="cuda"),
        lambda: GenerateConfig(device="cuda"),
        lambda: UrialConfig(device="cuda"),
        lambda: resolve_device("cuda"),
        lambda: load_model("any/model", device="cuda"),
    ):
        with pytest.raises(ConfigError, match="'cuda': this torch sees no CUDA GPU"):
            make()
    with pytest.raises(ConfigError, match="'gpu' is not a device"):
        check_device("gpu")
    assert check_device("cpu") == "cpu" and check_device("auto") == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_device("cuda:1") == "cuda:1"
    with pytest.raises(ConfigError, match=r"'cuda:2': this machine has 2 CUDA device\(s\), cuda:0 .. cuda:1"):
        check_device("cuda:2")


# --------------------------------------------------------------------------------------------
# cases 11, 12: inspect refuses a non-finite threshold and an unwritable folder before any work
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "0", "-1", "1e20"])
def test_inspect_threshold_must_be_finite_and_positive(
    tiny_model, tiny_data, tmp_path, capsys, no_loads, value
):
    out = tmp_path / "out"
    argv = _tool_argv("inspect", tiny_model, tiny_data, out)
    assert run_cli([*argv, f"--threshold={value}"]) == 2
    assert "argument --threshold: must be" in one_line_error(capsys, "cut.analysis.inspect")
    assert not out.exists()


def test_inspect_options_refuse_an_infinite_threshold_in_python(tmp_path):
    from cut.analysis.ratios import InspectOptions

    ok = {"data_path": "d", "model": "m", "output_dir": str(tmp_path / "o")}
    with pytest.raises(ConfigError, match="threshold must be a finite number, got 'inf'"):
        InspectOptions(**ok, threshold=float("inf"))
    with pytest.raises(ConfigError, match="cutoff_len must be a whole number, got '8.5'"):
        InspectOptions(**ok, cutoff_len=8.5)
    assert InspectOptions(**ok, threshold=2).threshold == 2


@pytest.mark.parametrize("where", ["under-a-file", "procfs"])
def test_inspect_refuses_an_unwritable_output_dir_before_loading(
    tiny_model, tiny_data, tmp_path, capsys, no_loads, where
):
    if where == "procfs":
        out = Path("/proc/cut-inspect-out")
        reason = "cannot be written: /proc"
    else:
        blocker = tmp_path / "a-file"
        blocker.write_text("x")  # no one, root included, makes a folder under a regular file
        out = blocker / "out"
        reason = f"cannot be written: {blocker} is a file, not a folder"
    assert run_cli(_tool_argv("inspect", tiny_model, tiny_data, out)) == 2
    err = one_line_error(capsys, "cut.analysis.inspect")
    assert f"--output_dir {out}: {reason}" in err


# --------------------------------------------------------------------------------------------
# case 15: urial --seed beyond what the generators take
# --------------------------------------------------------------------------------------------


def test_urial_overflowing_seed_is_refused_at_parse_time(tiny_model, tiny_data, tmp_path, capsys, no_loads):
    out = tmp_path / "out"
    argv = _tool_argv("urial", tiny_model, tiny_data, out)
    assert run_cli([*argv, "--seed", "99999999999999999999"]) == 2
    err = one_line_error(capsys, "cut.urial")
    assert "argument --seed: must be in [0, 4294967295], got '99999999999999999999'" in err
    assert not out.exists()


def test_sampling_refuses_a_seed_torch_cannot_take():
    from cut.methods.urial import UrialConfig
    from cut.modeling.generate import Sampling

    for seed in (10**20, -1, 1.5):
        with pytest.raises(ConfigError, match="seed must be a whole number"):
            Sampling(seed=seed)
        with pytest.raises(ConfigError, match="seed must be a whole number"):
            UrialConfig.from_dict({"seed": seed})
    assert Sampling(seed=2**32).seed == 2**32  # the online loop adds the round to a seed


# --------------------------------------------------------------------------------------------
# inspect on a 4 MB instruction: bounded work, the same tokens
# --------------------------------------------------------------------------------------------

WORDS = "the capital of France is Paris not Lyon add the numbers sum answer".split()


def words(n_chars: int, seed: int = 0) -> str:
    import random

    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_chars // 3))[:n_chars]


def test_long_prompt_fields_keep_the_tokens_of_the_whole_text(tiny_model):
    from cut.analysis import inspect as ins
    from cut.data.pairs import tokenize_example
    from cut.data.records import Example, Record
    from cut.data.templates import load_template
    from cut.modeling.loading import load_tokenizer

    tokenizer = load_tokenizer(str(tiny_model))
    template = load_template("alpaca", tokenizer)
    output = "The capital of France is Lyon."
    long = words(60_000)
    cases = [
        Record(long, "", output, "Wrong city: Paris."),
        Record("Which city?", long, output, "Wrong city: Paris."),
        Record(long, words(40_000, 1), output, words(50_000, 2)),
        Record("What is the capital of France?", "", output, "Wrong city: Paris."),  # fits: untouched
    ]
    for cutoff_len in (64, 300):
        for record in cases:
            ex = Example(record, record.judgment)
            short = ins.bounded(ex, tokenizer, cutoff_len)
            long_fields = any(
                len(t) > ins.PROMPT_CHARS_PER_TOKEN * cutoff_len for t in (record.instruction, record.input)
            )
            assert (short is not ex) == long_fields
            if long_fields:
                assert len(short.record.instruction) <= ins.PROMPT_CHARS_PER_TOKEN * cutoff_len
            full = tokenize_example(ex, template, tokenizer, cutoff_len, True)
            assert tokenize_example(short, template, tokenizer, cutoff_len, True) == full


def test_a_field_of_long_tokens_is_tokenised_whole():
    """Where the tail holds too few tokens to be sure (> 16 characters a token), nothing is cut."""
    from cut.analysis import inspect as ins
    from cut.data.records import Example, Record

    def few_tokens(text, add_special_tokens=False):  # one token per 100 characters
        return {"input_ids": [0] * (len(text) // 100)}

    record = Record("x" * 100_000, "", "out", "judged")
    ex = Example(record, record.judgment)
    assert ins.bounded(ex, few_tokens, 64) is ex


def test_a_4mb_instruction_is_inspected_in_seconds(tiny_model, tmp_path, monkeypatch):
    """No tokenizer call sees more than a bounded tail of the 4 MB instruction, and the run takes
    seconds once the imports are warm (tokenising the whole text took ~12 s here, five times over)."""
    from cut.analysis import inspect as ins
    from cut.modeling.loading import load_tokenizer

    cutoff_len = 512
    kw = dict(model=str(tiny_model), prompt_template_name="alpaca", cutoff_len=cutoff_len, progress=False)
    kw |= dict(device="cpu", dtype="fp32")
    small = tmp_path / "small.json"
    small.write_text(json.dumps(TINY_RECORDS))
    ins.inspect_records(data_path=str(small), output_dir=str(tmp_path / "warm"), **kw)  # the imports
    seen: list[int] = []
    tokenizer_class = type(load_tokenizer(str(tiny_model)))
    original = tokenizer_class.__call__

    def spy(self, text, *args, **kwargs):
        seen.append(len(text) if isinstance(text, str) else sum(map(len, text)))
        return original(self, text, *args, **kwargs)

    monkeypatch.setattr(tokenizer_class, "__call__", spy)
    huge = words(4_000_000)
    data = tmp_path / "huge.json"
    data.write_text(json.dumps([{**TINY_RECORDS[0], "instruction": huge}, TINY_RECORDS[2]]))
    start = time.perf_counter()
    result = ins.inspect_records(data_path=str(data), output_dir=str(tmp_path / "out"), **kw)
    seconds = time.perf_counter() - start
    assert seen and max(seen) < 2 * ins.PROMPT_CHARS_PER_TOKEN * cutoff_len
    assert seconds < 20, f"{seconds:.1f} s"
    assert result["counts"]["scored"] == 2 and result["records"][0]["instruction"] == huge
    assert result["records"][0]["tokens"][-1] == "</s>"


# --------------------------------------------------------------------------------------------
# every numeric option of every tool: the same table of bad values
# --------------------------------------------------------------------------------------------

BAD = ["nan", "inf", "-1", "abc", "99999999999999999999"]
# the sampling options urial and generate share
SAMPLING = {
    "batch_size": True,
    "max_new_tokens": True,
    "temperature": False,
    "repetition_penalty": True,
    "seed": False,
    "limit": True,
}


def answering(tool: str):
    """The argv of a tool that answers the records of a data file into an output file."""
    return lambda t: [
        tool,
        *cli_args(model=t / "m", data_path=t / "d.json", output_file=t / "out" / "a.json"),
    ]


# tool -> (argv before the option, {option: whether 0 is a bad value too})
TOOLS = {
    "inspect": (
        lambda t: [
            "inspect",
            "--data_path",
            str(t / "d.json"),
            "--model",
            str(t / "m"),
            "--output_dir",
            str(t / "out"),
        ],
        {"threshold": True, "cutoff_len": True, "micro_batch_size": True, "limit": False},
    ),
    "tds": (
        lambda t: (
            ["tds", "--base_model", str(t / "m"), "--aligned_model", str(t / "m")]
            + ["--data_path", str(t / "d.json"), "--output_dir", str(t / "out")]
        ),
        {"batch_size": True, "max_new_tokens": True, "limit": False, "cutoff_len": True},
    ),
    "urial": (answering("urial"), SAMPLING),
    "generate": (answering("generate"), {**SAMPLING, "top_p": True}),
    "arithmetic": (
        lambda t: ["arithmetic", "--pool", str(t / "out" / "p.json"), "--heldout", str(t / "out" / "h.json")],
        {"n_pool": True, "n_heldout": True, "seed": False},
    ),
    "instructions": (lambda t: ["instructions", "--out", str(t / "out")], {"seed": False}),
    "demo": (
        lambda t: (
            ["demo", "--demo_dir", str(t / "out"), "--data_out", str(t / "out" / "d.json")]
            + ["--build_data", str(t / "judged.json")]
        ),
        {"n_negative": True, "n_positive": False},
    ),
}
PROG = {
    **PROGS,
    "arithmetic": "cut.tasks.arithmetic",
    "instructions": "cut.tasks.instructions",
    "demo": "cut.demo",
}
TABLE = [
    (tool, option, value)
    for tool, (_, options) in TOOLS.items()
    for option, zero_is_bad in options.items()
    for value in BAD + (["0"] if zero_is_bad else [])
]


@pytest.mark.parametrize("tool, option, value", TABLE, ids=[f"{t}--{o}={v}" for t, o, v in TABLE])
def test_bad_value_is_one_line_naming_the_option(tmp_path, capsys, no_loads, tool, option, value):
    argv = TOOLS[tool][0](tmp_path)
    assert run_cli([*argv, f"--{option}={value}"]) == 2
    err = one_line_error(capsys, PROG[tool])
    assert f"argument --{option}: must be" in err and repr(value) in err
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("tool", ["inspect", "tds", "urial", "generate", "merge", "smollm", "gemma"])
def test_unknown_option_is_one_line(tmp_path, capsys, no_loads, tool):
    """merge, smollm and gemma have no numeric option; their parsers answer in one line too."""
    assert run_cli([tool, "--no_such_option", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err and "error:" in err
    assert list(tmp_path.iterdir()) == []


def test_good_values_still_parse():
    from cut.analysis.ratios import build_parser as inspect_parser
    from cut.methods.urial import build_parser as urial_parser
    from cut.modeling.generate import build_parser as generate_parser

    args = inspect_parser().parse_args(
        ["--data_path", "d", "--model", "m", "--output_dir", "o", "--threshold", "1.2", "--limit", "0"]
    )
    assert (args.threshold, args.limit, args.cutoff_len, args.device) == (1.2, 0, 4096, "auto")
    args = generate_parser().parse_args(
        ["--model", "m", "--data_path", "d", "--output_file", "o", "--temperature", "0", "--seed", "0"]
    )
    assert (args.temperature, args.seed, args.top_p, args.limit) == (0.0, 0, 1.0, None)
    args = urial_parser().parse_args(
        ["--model", "m", "--data_path", "d", "--output_file", "o", "--seed", "4294967295"]
    )
    assert args.seed == 2**32 - 1 and args.temperature is None
