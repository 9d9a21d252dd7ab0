"""Prompt templates: the plain context x and the judged context (x, j) for one record.

- alpaca: the Alpaca pair used in the paper (plain, and "match the judgment"), as the released
  code applies it: a record's input is folded into the instruction (instruction + "\n" + input)
  and the no-input prompts are used.
- alpaca_input: the same pair with an `### Input:` section for records that have an input (the
  classic Alpaca layout; its judged variant is this project's).
- chat:   the tokenizer's own chat template; the judgment goes into the user turn. A record with
  turns before its last user turn (`Record.history`, from a chat file) is rendered as that
  conversation, [*history, user turn]; the judgment goes into the last user turn, and the user
  turn holds the instruction alone (the record's `input` is those turns flattened). The other
  templates have no turns: they get the flattened `input` as any record's input.
- a path to a .json file with keys prompt_input, prompt_no_input, prompt_input_judge and
  prompt_no_input_judge (format fields {instruction}, {input}, {judgment}).
Generation (cut.generate) uses the same plain prompt as training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cut.data.records import Record, Turns
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

    def plain(self, instruction: str, input: str = "", history: Turns = ()) -> str:
        instruction, input = self._fold(instruction, input)
        if self.formats is None:
            return self._chat(history, _user_turn(instruction, input, history))
        key = "prompt_input" if input else "prompt_no_input"
        return self.formats[key].format(instruction=instruction, input=input)

    def judged(self, instruction: str, input: str, judgment: str, history: Turns = ()) -> str:
        instruction, input = self._fold(instruction, input)
        if self.formats is None:
            user = _user_turn(instruction, input, history) + CHAT_JUDGED_SUFFIX.format(judgment=judgment)
            return self._chat(history, user)
        key = "prompt_input_judge" if input else "prompt_no_input_judge"
        return self.formats[key].format(instruction=instruction, input=input, judgment=judgment)

    def prompts(self, record: Record, judgment: str | None) -> tuple[str, str | None]:
        """The plain and (with a judgment) judged contexts of a record, its turns included."""
        r = record
        plain = self.plain(r.instruction, r.input, r.history)
        judged = None if judgment is None else self.judged(r.instruction, r.input, judgment, r.history)
        return plain, judged

    def _fold(self, instruction: str, input: str) -> tuple[str, str]:
        return (f"{instruction}\n{input}", "") if self.fold_input and input else (instruction, input)

    def _chat(self, history: Turns, user: str) -> str:
        turns = [{"role": role, "content": text} for role, text in history]
        return self.tokenizer.apply_chat_template(
            [*turns, {"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
        )


def _user_turn(instruction: str, input: str, history: Turns = ()) -> str:
    """The last user turn's text: with turns before it, `input` is those turns flattened and the
    conversation already holds them."""
    return f"{instruction}\n\n{input}" if input and not history else instruction


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
