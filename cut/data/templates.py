"""Prompt templates: the plain context x and the judged context (x, j) for one record.

- alpaca: the Alpaca pair used in the paper (plain, and "match the judgment"), as the released
  code applies it: a record's input is folded into the instruction (instruction + "\n" + input)
  and the no-input prompts are used.
- alpaca_input: the same pair with an `### Input:` section for records that have an input (the
  classic Alpaca layout; its judged variant is this project's).
- chat:   the tokenizer's own chat template; the judgment goes into the user turn.
- a path to a .json file with keys prompt_input, prompt_no_input, prompt_input_judge and
  prompt_no_input_judge (format fields {instruction}, {input}, {judgment}).
Generation (cut.generate) uses the same plain prompt as training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cut.data.records import Record
from cut.errors import ConfigError

ALPACA = {
    "prompt_input": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
    ),
    "prompt_no_input": (
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:\n"
    ),
    "prompt_input_judge": (
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response to the instruction and the response should match the corresponding judgment.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Judgment:\n{judgment}\n\n### Response:\n"
    ),
    "prompt_no_input_judge": (
        "Below is an instruction that describes a task. "
        "Write a response to the instruction and the response should match the corresponding judgment.\n\n"
        "### Instruction:\n{instruction}\n\n### Judgment:\n{judgment}\n\n### Response:\n"
    ),
}
TEMPLATE_KEYS = tuple(ALPACA)
CHAT_JUDGED_SUFFIX = "\n\nWrite a response that matches this judgment of it:\n{judgment}"


@dataclass(frozen=True)
class Template:
    name: str
    formats: dict[str, str] | None  # None for chat
    tokenizer: object = None  # chat only
    fold_input: bool = False  # instruction + "\n" + input, then the no-input prompts

    @property
    def adds_special_tokens(self) -> bool:
        """Whether the tokenizer should add its own BOS (a chat template writes its own)."""
        return self.formats is not None

    def plain(self, instruction: str, input: str = "") -> str:
        instruction, input = self._fold(instruction, input)
        if self.formats is None:
            return self._chat(_user_turn(instruction, input))
        key = "prompt_input" if input else "prompt_no_input"
        return self.formats[key].format(instruction=instruction, input=input)

    def judged(self, instruction: str, input: str, judgment: str) -> str:
        instruction, input = self._fold(instruction, input)
        if self.formats is None:
            return self._chat(_user_turn(instruction, input) + CHAT_JUDGED_SUFFIX.format(judgment=judgment))
        key = "prompt_input_judge" if input else "prompt_no_input_judge"
        return self.formats[key].format(instruction=instruction, input=input, judgment=judgment)

    def prompts(self, record: Record, judgment: str | None) -> tuple[str, str | None]:
        plain = self.plain(record.instruction, record.input)
        judged = None if judgment is None else self.judged(record.instruction, record.input, judgment)
        return plain, judged

    def _fold(self, instruction: str, input: str) -> tuple[str, str]:
        return (f"{instruction}\n{input}", "") if self.fold_input and input else (instruction, input)

    def _chat(self, user: str) -> str:
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )


def _user_turn(instruction: str, input: str) -> str:
    return f"{instruction}\n\n{input}" if input else instruction


def trained_template(model_dir: str) -> str | None:
    """The template a cut-trained model (adapter or merged folder) was trained with, if recorded."""
    import yaml

    path = Path(model_dir) / "cut_config.yaml"
    if not path.exists():
        return None
    return (yaml.safe_load(path.read_text()) or {}).get("prompt_template_name")


def resolve_template_name(name: str, model_dir: str, tokenizer=None) -> str:
    """'auto': the template the model was CUT-trained with, else chat when it has one, else alpaca."""
    if name != "auto":
        return name
    trained = trained_template(model_dir)
    if trained:
        return trained
    return "chat" if tokenizer is not None and getattr(tokenizer, "chat_template", None) else "alpaca"


def load_template(name: str, tokenizer=None) -> Template:
    if name == "alpaca":
        return Template("alpaca", ALPACA, fold_input=True)
    if name == "alpaca_input":
        return Template("alpaca_input", ALPACA)
    if name == "chat":
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ConfigError("prompt_template_name=chat needs a tokenizer that has a chat template")
        return Template("chat", None, tokenizer)
    path = Path(name)
    if not path.suffix == ".json":
        raise ConfigError(
            f"unknown template {name!r}: use alpaca, alpaca_input, chat, or a path to a .json file"
        )
    try:
        formats = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: cannot read template: {err}") from None
    if not isinstance(formats, dict):
        raise ConfigError(f"{path}: a template must be a JSON object with keys {', '.join(TEMPLATE_KEYS)}")
    missing = [k for k in TEMPLATE_KEYS if not isinstance(formats.get(k), str)]
    if missing:
        raise ConfigError(f"{path}: template lacks string field(s): {', '.join(missing)}")
    for key in TEMPLATE_KEYS:
        try:
            formats[key].format(instruction="", input="", judgment="")
        except (KeyError, IndexError, ValueError, AttributeError, TypeError) as err:
            raise ConfigError(f"{path}: field '{key}': bad format string: {err!r}") from None
    return Template(str(path), {k: formats[k] for k in TEMPLATE_KEYS})
