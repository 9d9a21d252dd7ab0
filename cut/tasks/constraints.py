"""Verifiable instruction constraints: sample one, describe it in English, check a response against it.

A constraint is `{"type": name, "params": {...}}`; `TYPES[name]` knows how to sample its params,
word it (`describe`, from a train or a disjoint held-out list of our own sentences) and find its
`violations` in a response. `check` is IFEval's strict or loose verdict; `violations` feeds a judge
with critiques that quote the response and give character offsets.

The checkers follow IFEval (Zhou et al. 2023, google-research/instruction_following_eval, copied in
lm-eval as `lm_eval/tasks/ifeval/instructions.py`): same regexes, relations ("less than", "at least")
and loose rule. We reimplement them to avoid NLTK's punkt data and langdetect; where we differ:

- sentences (sentence_count) are split by a regex on `.`, `!`, `?` followed by space or the end,
  skipping common title abbreviations and single-letter initials, instead of IFEval's hand-written
  splitter; a trailing fragment without a final stop counts as a sentence, as in IFEval.
- all-capital words (capital_words) are `\\w+` runs (joined by `-` or `'`) instead of
  `nltk.word_tokenize` tokens, so "U.S." is two words here and one there.
- all_lowercase / all_uppercase do not also require the response to be English (IFEval asks
  langdetect); they are `str.islower()` / `str.isupper()` as in IFEval.
- start_phrase (the stripped response starts with a phrase, case-insensitive, like IFEval's
  end_checker) and first_word (the whole response's first word, IFEval's first-word rule without
  the paragraph count) are ours.
- keywords are escaped before use as regexes (ours are plain words, so this changes nothing).

Kept from IFEval on purpose, though surprising: include_keywords and keyword_frequency match
substrings case-insensitively ("plan" is found in "planet"); forbidden_words matches whole words;
end_phrase ignores case and surrounding double quotes; postscript and sections look anywhere in the
response (not only at its end / at line starts); sections and highlighted_sections are "at least".

Critiques: each `Violation.message` is one clause starting with "it ...". Text quoted from the
response is in single quotes and occurs verbatim in it ("..." inside the quotes marks where a long
quote was cut); the constraint's own words (phrases, keywords) are in double quotes. `spans` are
[start, end) offsets of the offending text; missing things (no title, too few bullets) have none.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cut.errors import DataError

RELATIONS = ("less than", "at least")
YES_NO = ("My answer is yes.", "My answer is no.", "My answer is maybe.")
SEPARATOR = "******"  # two_responses
MARKERS = ("P.S.", "P.P.S")  # postscript, with IFEval's patterns


@dataclass(frozen=True)
class Violation:
    type: str
    message: str
    spans: tuple[tuple[int, int], ...] = ()


# --- text helpers -------------------------------------------------------------------------------

_WORD = re.compile(r"\w+")
_CAPS_WORD = re.compile(r"\w+(?:[-'\u2019]\w+)*")
_STOP = re.compile(r"[.!?]+[\"')\]\u201d]*(?=\s|$)")
_ABBREV = re.compile(r"(?:^|[^\w])(?:Mr|Mrs|Ms|Dr|St|Prof|Jr|Sr|vs|[A-Za-z])$")


def _clip(text: str, n: int = 40) -> str:
    """A verbatim prefix of `text` for quoting: its first line, cut at a word near n chars."""
    line = text.split("\n", 1)[0]
    if line == text and len(line) <= n:
        return text
    cut = line[:n]
    if len(line) > n and " " in cut.strip():
        cut = cut[: cut.rstrip().rfind(" ")]
    return cut.rstrip() + "..."


def _clip_tail(text: str, n: int = 30) -> str:
    """A verbatim suffix of `text` for quoting: its last line, cut at a word near n chars."""
    line = text.rsplit("\n", 1)[-1]
    if line == text and len(line) <= n:
        return text
    cut = line[-n:]
    i = cut.find(" ")
    if len(line) > n and 0 <= i < len(cut.rstrip()) - 1:
        cut = cut[i + 1 :]
    return "..." + cut.lstrip()


def _quotes(texts: Sequence[str], k: int = 3) -> str:
    """'a', 'b', 'c' and 4 more"""
    out = ", ".join(f"'{_clip(t)}'" for t in texts[:k])
    return out + (f" and {len(texts) - k} more" if len(texts) > k else "")


def _trim(text: str, s: int, e: int) -> tuple[int, int]:
    """Shrink [s, e) so it neither starts nor ends with whitespace (may become empty)."""
    while s < e and text[s].isspace():
        s += 1
    while e > s and text[e - 1].isspace():
        e -= 1
    return s, e


def _plural(k: int, word: str) -> str:
    return f"{k} {word}" if k == 1 else f"{k} {word}s"


def count_words(text: str) -> int:
    """IFEval's word count: `\\w+` tokens (nltk's RegexpTokenizer(r"\\w+"))."""
    return len(_WORD.findall(text))


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """[start, end) of each sentence: split after ., ! or ? (plus closing quotes) before a space."""
    spans, start = [], 0
    for m in _STOP.finditer(text):
        if m.group() == "." and _ABBREV.search(text[max(0, m.start() - 6) : m.start()]):
            continue  # "Dr. Smith", "J. Doe"
        s, e = _trim(text, start, m.end())
        if s < e:
            spans.append((s, e))
        start = m.end()
    s, e = _trim(text, start, len(text))
    if s < e:
        spans.append((s, e))
    return spans


def _cmp(relation: str, n: int, unit: str) -> str:
    """'fewer than 3 words' / 'at least 3 words' for descriptions and messages."""
    return f"{'fewer than' if relation == 'less than' else 'at least'} {n} {unit}"


def _holds(relation: str, k: int, n: int) -> bool:
    return k < n if relation == "less than" else k >= n


def _listing(words: Sequence[str], joiner: str) -> str:
    quoted = [f'"{w}"' for w in words]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + f" {joiner} {quoted[-1]}"


# --- the types ----------------------------------------------------------------------------------


class ConstraintType:
    """One kind of constraint. Subclasses set the class fields and override `violations`
    (and `sample` / `_fields` when they have params)."""

    name: str = ""
    conflicts: frozenset[str] = frozenset()
    params: dict[str, str] = {}  # param -> kind checked by `validate`: count, relation, text, words, ...
    train: tuple[str, ...] = ()  # description templates, str.format'ed with `_fields(params)`
    heldout: tuple[str, ...] = ()

    def sample(self, rng: random.Random) -> dict:
        return {}

    def _fields(self, params: dict) -> dict:
        return dict(params)

    def describe(self, params: dict, rng: random.Random, split: str) -> str:
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        pool = self.train if split == "train" else self.heldout
        return rng.choice(pool).format(**self._fields(params))

    def violations(self, response: str, params: dict) -> list[Violation]:
        raise NotImplementedError

    def _v(self, message: str, spans: Sequence[tuple[int, int]] = ()) -> list[Violation]:
        return [Violation(self.name, message, tuple(spans))]


class _Counted(ConstraintType):
    """A threshold with IFEval's relation: `{"relation": "less than" | "at least", "n": int}`."""

    params = {"relation": "relation", "n": "count"}
    unit = ""
    less_range = (2, 5)
    least_range = (2, 5)

    def sample(self, rng: random.Random) -> dict:
        relation = rng.choice(RELATIONS)
        lo, hi = self.less_range if relation == "less than" else self.least_range
        return {"relation": relation, "n": rng.randint(lo, hi)}

    def _fields(self, params: dict) -> dict:
        return {**params, "cmp": _cmp(params["relation"], params["n"], self.unit)}


class NoComma(ConstraintType):
    name = "no_comma"
    train = (
        "Do not use a single comma anywhere in your reply.",
        "Write your answer without any commas.",
        "Your response must contain no commas at all.",
    )
    heldout = (
        "Avoid the comma character completely in what you write.",
        "Commas are not allowed anywhere in your answer.",
    )

    def violations(self, response: str, params: dict) -> list[Violation]:
        # span = the comma plus the word right before it; the quote adds the word after it
        found = list(re.finditer(r"[^\s,]*,", response))
        if not found:
            return []
        contexts = [
            response[m.start() : re.compile(r"\s*[^\s,]*").match(response, m.end()).end()] for m in found
        ]
        msg = f"it uses {_plural(len(found), 'comma')}: {_quotes(contexts)}"
        return self._v(msg, [(m.start(), m.end()) for m in found])


class AllLowercase(ConstraintType):
    name = "all_lowercase"
    train = (
        "Write your whole reply in lowercase letters only.",
        "Use no capital letters anywhere in your answer; everything must be lowercase.",
        "Your entire answer must be written in small letters, with no uppercase at all.",
    )
    heldout = (
        "Keep every letter of your response lowercase.",
        "Do not capitalise anything: the full reply should be in lowercase.",
    )

    def violations(self, response: str, params: dict) -> list[Violation]:
        if response.islower():
            return []
        bad = [m for m in re.finditer(r"\S+", response) if any(c.isupper() for c in m.group())]
        if not bad:
            return self._v("it has no lowercase letters at all")
        msg = f"it uses capital letters: {_quotes([m.group() for m in bad])}"
        return self._v(msg, [m.span() for m in bad])


class AllUppercase(ConstraintType):
    name = "all_uppercase"
    train = (
        "Write your whole reply in capital letters only.",
        "Every letter of your answer must be uppercase.",
        "Respond entirely in capitals, with no lowercase letters anywhere.",
    )
    heldout = (
        "Type the full response in uppercase.",
        "Use only uppercase letters throughout your answer.",
    )

    def violations(self, response: str, params: dict) -> list[Violation]:
        if response.isupper():
            return []
        bad = [m for m in re.finditer(r"\S+", response) if any(c.islower() for c in m.group())]
        if not bad:
            return self._v("it has no capital letters at all")
        msg = f"it uses lowercase letters: {_quotes([m.group() for m in bad])}"
        return self._v(msg, [m.span() for m in bad])


class CapitalWords(_Counted):
    name = "capital_words"
    unit = "all-capital words"
    less_range = (2, 5)
    least_range = (2, 4)
    train = (
        "Use {cmp} in your answer, meaning words written entirely in capital letters.",
        "Your answer should contain {cmp} (words whose letters are all uppercase).",
        "Include {cmp}, such as words in full capitals, in your reply.",
    )
    heldout = (
        "The reply must have {cmp}: count the words typed wholly in uppercase.",
        "Write your response with {cmp} (fully uppercase words).",
    )

    def violations(self, response: str, params: dict) -> list[Violation]:
        caps = [m for m in _CAPS_WORD.finditer(response) if m.group().isupper()]
        relation, n = params["relation"], params["n"]
        if _holds(relation, len(caps), n):
            return []
        if relation == "at least":
            return self._v(f"it has {_plural(len(caps), 'all-capital word')} but needs at least {n}")
        msg = f"it has {len(caps)} all-capital words but must have fewer than {n}: {_quotes([m.group() for m in caps])}"
        return self._v(msg, [m.span() for m in caps])


class EndPhrase(ConstraintType):
    name = "end_phrase"
    params = {"phrase": "text"}
    phrases = (
        "Any other questions?",
        "Hope this helps.",
        "That is all for now.",
        "Thanks for reading.",
        "Let me know what you think.",
        "Have a great day!",
        "That is my answer.",
    )
    train = (
        'End your reply with the exact phrase "{phrase}" and write nothing after it.',
        'Your answer must finish with these words: "{phrase}"',
        'Close your response with "{phrase}", with nothing following it.',
    )
    heldout = (
        'The very last words of your answer must be "{phrase}"',
        'Make "{phrase}" the final phrase of your response.',
    )

    def sample(self, rng: random.Random) -> dict:
        return {"phrase": rng.choice(self.phrases)}

    def violations(self, response: str, params: dict) -> list[Violation]:
        phrase = params["phrase"].strip()
        if response.strip().strip('"').lower().endswith(phrase.lower()):  # IFEval: case and quotes ignored
            return []
        end = len(response.rstrip())
        at = response.lower().rfind(phrase.lower())
        if at >= 0:
            s, e = _trim(response, at + len(phrase), end)
            if s < e:
                msg = f"it must end with \"{phrase}\" but goes on after it with '{_clip(response[s:e])}'"
                return self._v(msg, [(s, e)])
        sents = sentence_spans(response)
        if not sents:
            return self._v(f'it must end with "{phrase}" but is empty')
        s, e = sents[-1]
        return self._v(f"it must end with \"{phrase}\" but ends with '{_clip_tail(response[s:e])}'", [(s, e)])


class StartPhrase(ConstraintType):
    name = "start_phrase"
    params = {"phrase": "text"}
    phrases = (
        "Here is my answer:",
        "Great question!",
        "Let me explain.",
        "To put it simply:",
        "Short answer:",
        "Here is what I think.",
    )
    train = (
        'Begin your reply with the exact words "{phrase}"',
        'Your answer must open with "{phrase}"',
        'Start your response with the phrase "{phrase}"',
    )
    heldout = (
        'The first words of your answer must be "{phrase}"',
        'Put "{phrase}" at the very beginning of your reply.',
    )

    def sample(self, rng: random.Random) -> dict:
        return {"phrase": rng.choice(self.phrases)}

    def violations(self, response: str, params: dict) -> list[Violation]:
        phrase = params["phrase"].strip()
        if response.strip().lower().startswith(phrase.lower()):
            return []
        k = max(1, len(phrase.split()))
        m = re.match(rf"\s*((?:\S+\s+){{0,{k - 1}}}\S+)", response)
        if not m:
            return self._v(f'it must start with "{phrase}" but is empty')
        return self._v(f"it must start with \"{phrase}\" but starts with '{_clip(m.group(1))}'", [m.span(1)])


class WrapInQuotes(ConstraintType):
    name = "wrap_in_quotes"
    train = (
        "Put your entire reply inside double quotation marks.",
        'Enclose the whole answer in double quotes, so it starts and ends with the " character.',
        "Your full response must begin and end with a double quote character.",
    )
    heldout = (
        "Surround everything you write with a pair of double quotes.",
        "Place your complete answer between double quotation marks.",
    )

    def violations(self, response: str, params: dict) -> list[Violation]:
        v = response.strip()
        if len(v) > 1 and v[0] == '"' and v[-1] == '"':
            return []
        if not v:
            return self._v("it must be wrapped in double quotes but is empty")
        s0 = len(response) - len(response.lstrip())
        e0 = s0 + len(v)
        if v == '"':
            return self._v("it is a lone double quote", [(s0, e0)])
        parts, spans = [], []
        if v[0] != '"':
            m = re.compile(r"\S+").match(response, s0)
            parts.append(f"starts with '{m.group()}'")
            spans.append(m.span())
        if v[-1] != '"':
            m = re.search(r"\S+$", response[:e0])
            parts.append(f"ends with '{m.group()}'")
            if m.span() not in spans:
                spans.append(m.span())
        return self._v("it must be wrapped in double quotes but " + " and ".join(parts), spans)


class IncludeKeywords(ConstraintType):
    name = "include_keywords"
    params = {"keywords": "words"}
    pool = (
        "sunlight",
        "river",
        "garden",
        "window",
        "morning",
        "bridge",
        "music",
        "ocean",
        "forest",
        "history",
        "friend",
        "energy",
        "simple",
        "future",
        "travel",
        "market",
    )
    train = (
        "Be sure to use {kw} somewhere in your answer.",
        "Your response must contain {kw}.",
        "Work {kw} into your reply.",
    )
    heldout = (
        "Mention {kw} at some point in your response.",
        "Your answer needs to mention {kw}.",
    )

    def sample(self, rng: random.Random) -> dict:
        return {"keywords": sorted(rng.sample(self.pool, rng.randint(1, 2)))}

    def _fields(self, params: dict) -> dict:
        return {"kw": _listing(params["keywords"], "and")}

    def violations(self, response: str, params: dict) -> list[Violation]:
        missing = [
            k for k in params["keywords"] if not re.search(re.escape(k), response, flags=re.IGNORECASE)
        ]
        if not missing:
            return []
        noun = "keyword" if len(missing) == 1 else "keywords"
        return self._v(f"it never uses the {noun} {_listing(missing, 'and')}")


class ForbiddenWords(ConstraintType):
    name = "forbidden_words"
    params = {"words": "words"}
    pool = (
        "very",
        "really",
        "good",
        "thing",
        "also",
        "many",
        "just",
        "important",
        "people",
        "because",
        "actually",
        "basically",
    )
    train = (
        "Do not use the words {kw} anywhere in your reply.",
        "Never write {kw} in your answer.",
        "Your response must not contain {kw}.",
    )
    heldout = (
        "Avoid {kw} entirely.",
        "Keep {kw} out of your answer.",
    )

    def sample(self, rng: random.Random) -> dict:
        return {"words": sorted(rng.sample(self.pool, rng.randint(1, 2)))}

    def _fields(self, params: dict) -> dict:
        return {"kw": _listing(params["words"], "or")}

    def violations(self, response: str, params: dict) -> list[Violation]:
        spans, found = [], []
        for w in params["words"]:
            hits = list(re.finditer(r"\b" + re.escape(w) + r"\b", response, flags=re.IGNORECASE))
            if hits:
                found.append(f"'{hits[0].group()}'" + (f" ({len(hits)} times)" if len(hits) > 1 else ""))
                spans += [m.span() for m in hits]
        if not found:
            return []
        return self._v(
            f"it uses the forbidden {'word' if len(found) == 1 else 'words'} {', '.join(found)}",
            sorted(spans),
        )


class KeywordFrequency(_Counted):
    name = "keyword_frequency"
    params = {"word": "word", "relation": "relation", "n": "count"}
    unit = "times"
    pool = ("water", "idea", "color", "place", "plan", "world", "team", "home")
    less_range = (2, 3)
    least_range = (2, 3)
    train = (
        'Use the word "{word}" {cmp}.',
        'The word "{word}" should appear {cmp} in your answer.',
        'Write "{word}" {cmp} in your response.',
    )
    heldout = (
        'Your reply must contain the word "{word}" {cmp}.',
        'Mention "{word}" {cmp}.',
    )

    def sample(self, rng: random.Random) -> dict:
        return {"word": rng.choice(self.pool), **super().sample(rng)}

    def violations(self, response: str, params: dict) -> list[Violation]:
        word, relation, n = params["word"], params["relation"], params["n"]
        hits = list(re.finditer(re.escape(word), response, flags=re.IGNORECASE))  # IFEval: substring
        if _holds(relation, len(hits), n):
            return []
        times = _plural(len(hits), "time")
        if relation == "at least":
            return self._v(f'it uses "{word}" {times} but needs at least {n}')
        return self._v(
            f'it uses "{word}" {times} but must use it fewer than {n} times', [m.span() for m in hits]
        )


class LetterFrequency(_Counted):
    name = "letter_frequency"
    params = {"letter": "letter", "relation": "relation", "n": "count"}
    unit = "times"
    train = (
        'The letter "{letter}" must appear {cmp} in your answer.',
        'Use the letter "{letter}" {cmp}.',
        'Write your reply so that the letter "{letter}" occurs {cmp}.',
    )
    heldout = (
        'Your response should contain the letter "{letter}" {cmp}.',
        'Count your letters: "{letter}" has to show up {cmp}.',
    )

    def sample(self, rng: random.Random) -> dict:
        # common letters for "at least", rare ones for "less than", so a short answer can comply
        if rng.random() < 0.5:
            return {"letter": rng.choice("etaoinsr"), "relation": "at least", "n": rng.randint(4, 10)}
        return {"letter": rng.choice("zqxj"), "relation": "less than", "n": rng.randint(2, 4)}

    def violations(self, response: str, params: dict) -> list[Violation]:
        letter, relation, n = params["letter"], params["relation"], params["n"]
        low = response.lower()
        k = low.count(letter)  # IFEval: Counter(value.lower())[letter]
        if _holds(relation, k, n):
            return []
        if relation == "at least":
            return self._v(f'it uses the letter "{letter}" {_plural(k, "time")} but needs at least {n}')
        words = [m.group() for m in re.finditer(r"\S+", response) if letter in m.group().lower()]
        spans = [(i, i + 1) for i, c in enumerate(low) if c == letter]
        msg = (
            f'it uses the letter "{letter}" {k} times but must use it fewer than {n} times: {_quotes(words)}'
        )
        return self._v(msg, spans)


class WordCount(_Counted):
    name = "word_count"
    unit = "words"
    less_range = (4, 15)  # x10
    least_range = (2, 7)  # x10
    train = (
        "Your response should be {cmp} long.",
        "Write {cmp}.",
        "Reply using {cmp}.",
    )
    heldout = (
        "The length of your reply must be {cmp}.",
        "Your answer needs to contain {cmp}.",
    )

    def sample(self, rng: random.Random) -> dict:
        p = super().sample(rng)
        return {**p, "n": p["n"] * 10}

    def violations(self, response: str, params: dict) -> list[Violation]:
        relation, n = params["relation"], params["n"]
        words = list(_WORD.finditer(response))
        if _holds(relation, len(words), n):
            return []
        if relation == "at least":
            return self._v(f"it has only {_plural(len(words), 'word')} but needs at least {n}")
        # span: from the n-th word (the first one over the limit) to the end
        s, e = words[n - 1].start(), len(response.rstrip())
        msg = f"it has {len(words)} words but must have fewer than {n}; the excess starts at '{_clip(response[s:e])}'"
        return self._v(msg, [(s, e)])


class SentenceCount(_Counted):
    name = "sentence_count"
    unit = "sentences"
    less_range = (3, 8)
    least_range = (2, 6)
    train = (
        "Write {cmp}.",
        "Your answer should consist of {cmp}.",
        "Use {cmp} in your reply.",
    )
    heldout = (
        "The reply must be made of {cmp}.",
        "Compose your response in {cmp}.",
    )

    def violations(self, response: str, params: dict) -> list[Violation]:
        relation, n = params["relation"], params["n"]
        sents = sentence_spans(response)
        if _holds(relation, len(sents), n):
            return []
        if relation == "at least":
            return self._v(f"it has only {_plural(len(sents), 'sentence')} but needs at least {n}")
        s, e = sents[n - 1][0], sents[-1][1]
        msg = f"it has {len(sents)} sentences but must have fewer than {n}; the extra ones start at '{_clip(response[s:e])}'"
        return self._v(msg, [(s, e)])


class ParagraphCount(ConstraintType):
    name = "paragraph_count"
    params = {"n": "count"}
    train = (
        "Write exactly {n} paragraphs and put the markdown divider *** between each pair of them.",
        "Split your reply into {n} paragraphs separated by lines containing ***.",
        "Your answer must have {n} paragraphs, with *** between consecutive paragraphs.",
    )
    heldout = (
        "Use {n} paragraphs in total, dividing them with ***.",
        "Organise the answer as {n} paragraphs; separate them using the *** divider.",
    )

    def sample(self, rng: random.Random) -> dict:
        return {"n": rng.randint(2, 4)}

    def violations(self, response: str, params: dict) -> list[Violation]:
        n = params["n"]
        seps = list(re.finditer(r"\s?\*\*\*\s?", response))  # IFEval's split
        bounds = [0] + [x for m in seps for x in m.span()] + [len(response)]
        pieces = [(bounds[2 * i], bounds[2 * i + 1]) for i in range(len(seps) + 1)]
        kept = []
        for i, (s, e) in enumerate(pieces):
            if response[s:e].strip():
                kept.append(_trim(response, s, e))
            elif 0 < i < len(pieces) - 1:
                span = (seps[i - 1].start(), seps[i].end())
                return self._v(
                    f"it has an empty paragraph between dividers: '{response[slice(*span)].strip()}'", [span]
                )
        if len(kept) == n:
            return []
        msg = f"it has {_plural(len(kept), 'paragraph')} separated by *** but needs exactly {n}"
        if len(kept) < n:
            return self._v(msg)
        s = kept[n][0]
        return self._v(msg + f"; the extra ones start at '{_clip(response[s:])}'", kept[n:])


class BulletCount(ConstraintType):
    name = "bullet_count"
    params = {"n": "count"}
    train = (
        'Format your answer as exactly {n} markdown bullet points, each line starting with "* ".',
        'Give exactly {n} bullet points using markdown, like "* item".',
        'Your reply must be a list of exactly {n} bullets, each beginning with "* ".',
    )
    heldout = (
        'Present exactly {n} points as a markdown list with "* " at the start of each.',
        'Use precisely {n} markdown bullets ("* ") in your answer.',
    )

    def sample(self, rng: random.Random) -> dict:
        return {"n": rng.randint(2, 5)}

    @staticmethod
    def bullets(response: str) -> list[tuple[int, int]]:
        """IFEval's two regexes: lines starting with `*` (not `**`) and lines starting with `-`."""
        found = list(re.finditer(r"^\s*\*[^\*].*$", response, flags=re.MULTILINE))
        found += re.finditer(r"^\s*-.*$", response, flags=re.MULTILINE)
        return sorted(_trim(response, *m.span()) for m in found)

    def violations(self, response: str, params: dict) -> list[Violation]:
        n = params["n"]
        found = self.bullets(response)
        if len(found) == n:
            return []
        msg = f"it has {_plural(len(found), 'bullet point')} but needs exactly {n}"
        if len(found) < n:
            return self._v(msg)
        return self._v(msg + f"; the extra ones start at '{_clip(response[found[n][0] :])}'", found[n:])


class Title(ConstraintType):
    name = "title"
    train = (
        "Give your answer a title wrapped in double angle brackets, like <<A Short Title>>.",
        "Start with a title enclosed in << and >>.",
        "Include a title written as <<title>>.",
    )
    heldout = (
        "Put a title between double angular brackets, for example <<My Title>>.",
        "Your reply needs a title surrounded by << >>.",
    )

    def violations(self, response: str, params: dict) -> list[Violation]:
        for t in re.findall(r"<<[^\n]+>>", response):
            if t.lstrip("<").rstrip(">").strip():
                return []
        return self._v("it has no title in double angular brackets like <<title>>")


class JsonFormat(ConstraintType):
    name = "json_format"
    train = (
        "Format your entire output as valid JSON.",
        "Reply only with a JSON object; you may put it in a ``` code block.",
        "Your whole answer must be parseable JSON.",
    )
    heldout = (
        "Return the answer as JSON and nothing else.",
        "Write the complete response in JSON format.",
    )

    @staticmethod
    def body(response: str) -> tuple[int, int]:
        """[start, end) of what IFEval parses: stripped, without ```json / ``` fences, stripped again."""
        s, e = _trim(response, 0, len(response))
        for fence in ("```json", "```Json", "```JSON", "```"):
            if response.startswith(fence, s, e):
                s += len(fence)
        if e - s >= 3 and response.endswith("```", s, e):
            e -= 3
        return _trim(response, s, e)

    def violations(self, response: str, params: dict) -> list[Violation]:
        s, e = self.body(response)
        try:
            json.loads(response[s:e])
            return []
        except ValueError as err:
            if s == e:
                return self._v("it must be valid JSON but is empty")
            pos = min(s + getattr(err, "pos", 0), e - 1)
            end = min(e, pos + 20)
            why = getattr(err, "msg", "invalid").replace("'", '"')
            return self._v(f"it is not valid JSON ({why}) at '{_clip(response[pos:end])}'", [(pos, end)])


class HighlightedSections(ConstraintType):
    name = "highlighted_sections"
    params = {"n": "count"}
    train = (
        "Mark at least {parts} of your answer with asterisks for emphasis, like *this*.",
        "Emphasise at least {parts} of the reply using markdown, for example *key idea*.",
        "Use markdown italics such as *important point* for at least {parts}.",
    )
    heldout = (
        "Put at least {parts} between single asterisks, like *this one*.",
        "In your answer, at least {parts} must be *emphasised* with asterisks.",
    )

    def sample(self, rng: random.Random) -> dict:
        return {"n": rng.randint(1, 3)}

    def _fields(self, params: dict) -> dict:
        return {**params, "parts": _plural(params["n"], "part")}

    @staticmethod
    def count(response: str) -> int:
        single = [h for h in re.findall(r"\*[^\n\*]*\*", response) if h.strip("*").strip()]
        double = [h for h in re.findall(r"\*\*[^\n\*]*\*\*", response) if h[2:-2].strip()]
        return len(single) + len(double)

    def violations(self, response: str, params: dict) -> list[Violation]:
        k, n = self.count(response), params["n"]
        if k >= n:
            return []
        return self._v(f"it has {_plural(k, 'highlighted section')} like *this* but needs at least {n}")


class Sections(ConstraintType):
    name = "sections"
    params = {"splitter": "word", "n": "count"}
    splitters = ("Section", "SECTION", "Part", "PART")
    train = (
        'Divide your answer into {n} sections, each beginning with "{splitter} X" where X is its number.',
        "Organise the reply as {n} parts headed {splitter} 1, {splitter} 2 and so on.",
        'Your response must have {n} sections, and each must start with the label "{splitter}" and its number.',
    )
    heldout = (
        'Structure what you write as {n} numbered sections labelled "{splitter} 1", "{splitter} 2" and onward.',
        "Split the reply into {n} sections; open each one with {splitter} followed by its number.",
    )

    def sample(self, rng: random.Random) -> dict:
        return {"splitter": rng.choice(self.splitters), "n": rng.randint(2, 4)}

    def violations(self, response: str, params: dict) -> list[Violation]:
        splitter, n = params["splitter"], params["n"]
        k = len(re.split(r"\s?" + re.escape(splitter) + r"\s?\d+\s?", response)) - 1
        if k >= n:
            return []
        return self._v(f'it has {_plural(k, "section")} marked "{splitter} X" but needs {n}')


class Postscript(ConstraintType):
    name = "postscript"
    params = {"marker": "marker"}
    train = (
        'Finish with a postscript that begins with "{marker}"',
        'After the main answer, add a note starting with "{marker}"',
        'End your reply with a short postscript introduced by "{marker}"',
    )
    heldout = (
        'Add a final postscript marked "{marker}" at the end.',
        'Close with an afterthought that starts with "{marker}"',
    )

    def sample(self, rng: random.Random) -> dict:
        return {"marker": rng.choice(MARKERS)}

    def violations(self, response: str, params: dict) -> list[Violation]:
        marker = params["marker"]
        pattern = {"P.P.S": r"\s*p\.\s?p\.\s?s.*$", "P.S.": r"\s*p\.\s?s\..*$"}[marker]
        if re.findall(pattern, response.lower(), flags=re.MULTILINE):
            return []
        return self._v(f'it has no postscript starting with "{marker}"')


class Placeholders(ConstraintType):
    name = "placeholders"
    params = {"n": "count"}
    train = (
        "Leave at least {blanks} for the reader to fill in, written in square brackets like [name].",
        "Your answer must contain {n} or more bracketed placeholders, for example [city].",
        "Write the reply as a template with at least {blanks} in square brackets, such as [date].",
    )
    heldout = (
        "Use {n} or more fill-in fields in square brackets, like [amount].",
        "Put {n} or more placeholders such as [place] in your reply.",
    )

    def sample(self, rng: random.Random) -> dict:
        return {"n": rng.randint(1, 3)}

    def _fields(self, params: dict) -> dict:
        return {**params, "blanks": _plural(params["n"], "blank")}

    def violations(self, response: str, params: dict) -> list[Violation]:
        k, n = len(re.findall(r"\[.*?\]", response)), params["n"]
        if k >= n:
            return []
        return self._v(f"it has {_plural(k, 'placeholder')} in square brackets but needs at least {n}")


class RepeatRequest(ConstraintType):
    name = "repeat_request"
    params = {"request": "text"}
    requests = (
        "Describe a rainy afternoon in a small town.",
        "Explain why the sky looks blue.",
        "Give some advice to a new student.",
        "Write a short note about your favourite season.",
        "Tell me how bread is made.",
        "Describe the view from a mountain top.",
    )
    # the request itself is the prompt's question; the description does not repeat it
    train = (
        "Before you answer, copy the request exactly as it was given (leaving out this instruction), then respond.",
        "Start by restating the request without changing a single word, with nothing before it, and then answer.",
        "Repeat the request verbatim first (without this sentence), then give your answer.",
    )
    heldout = (
        "Echo the request back unchanged at the very start of your reply, then answer it.",
        "Your reply must open with an exact copy of the request (not including this sentence), followed by your answer.",
    )

    def sample(self, rng: random.Random) -> dict:
        return {"request": rng.choice(self.requests)}

    def violations(self, response: str, params: dict) -> list[Violation]:
        v, r = response.strip().lower(), params["request"].strip().lower()
        if v.startswith(r):
            return []
        if not v:
            return self._v("it must first repeat the request but is empty")
        i = next((j for j, (a, b) in enumerate(zip(v, r, strict=False)) if a != b), min(len(v), len(r)))
        off = len(response) - len(response.lstrip())
        if i >= len(v):
            s, e = off, len(response.rstrip())
            return self._v(
                f"it stops partway through repeating the request: '{_clip_tail(response[s:e])}'", [(s, e)]
            )
        p = min(off + i, len(response) - 1)
        s = p
        while s > off and not response[s - 1].isspace():
            s -= 1
        m = re.compile(r"\S*").match(response, p)
        e = max(m.end(), p + 1)
        return self._v(
            f"it must first repeat the request word for word but departs from it at '{response[s:e]}'",
            [(s, e)],
        )


class TwoResponses(ConstraintType):
    name = "two_responses"
    train = (
        "Give two different answers, separated by a line of six asterisks: ******",
        "Write two distinct responses and put ****** between them.",
        "Provide two alternative replies divided by ******",
    )
    heldout = (
        "Offer two different versions of your answer with ****** separating them.",
        "Answer twice in two different ways; use six asterisks (******) as the only separator.",
    )

    def violations(self, response: str, params: dict) -> list[Violation]:
        parts, pos = [], 0
        for p in response.split(SEPARATOR):
            parts.append((pos, pos + len(p)))
            pos += len(p) + len(SEPARATOR)
        if len(parts) == 1:
            return self._v("it gives one response with no ****** separator")
        valid = []
        for i, (s, e) in enumerate(parts):
            if response[s:e].strip():
                valid.append(_trim(response, s, e))
            elif 0 < i < len(parts) - 1:
                span = (s - len(SEPARATOR), e + len(SEPARATOR))
                return self._v("it has an empty response between two ****** separators", [span])
        if len(valid) > 2:
            s = valid[2][0]
            return self._v(
                f"it gives {len(valid)} responses but needs exactly two; the extra start at '{_clip(response[s:])}'",
                valid[2:],
            )
        if len(valid) < 2:
            return self._v("it gives only one non-empty response around the ****** separator")
        (s1, e1), (s2, e2) = valid
        if response[s1:e1] == response[s2:e2]:
            return self._v(f"it gives the same response twice: '{_clip(response[s2:e2])}'", [(s2, e2)])
        return []


class YesNoAnswer(ConstraintType):
    name = "yes_no_answer"
    train = (
        'Include exactly one of these sentences in your reply: "My answer is yes.", "My answer is no." or "My answer is maybe."',
        'Give your verdict with one of the exact sentences "My answer is yes.", "My answer is no." or "My answer is maybe."',
        'State your answer using one of "My answer is yes.", "My answer is no." and "My answer is maybe." word for word.',
    )
    heldout = (
        'Respond with one of the fixed sentences "My answer is yes.", "My answer is no." or "My answer is maybe."',
        'Your response must contain one of "My answer is yes.", "My answer is no." and "My answer is maybe." exactly as written.',
    )

    def violations(self, response: str, params: dict) -> list[Violation]:
        if any(o in response.strip() for o in YES_NO):  # IFEval: any option contained
            return []
        return self._v(f"it contains none of {_listing(YES_NO, 'or')}")


class FirstWord(ConstraintType):
    name = "first_word"
    params = {"word": "word"}
    pool = ("Today", "Imagine", "Honestly", "Yes", "Well", "First", "Sometimes", "Certainly")
    train = (
        'The first word of your reply must be "{word}".',
        'Begin your answer with the word "{word}".',
        'Make "{word}" the opening word of your response.',
    )
    heldout = (
        'Your response has to start with the single word "{word}".',
        'Use "{word}" as the very first word you write.',
    )

    def sample(self, rng: random.Random) -> dict:
        return {"word": rng.choice(self.pool)}

    def violations(self, response: str, params: dict) -> list[Violation]:
        word = params["word"]
        m = re.compile(r"\S+").search(response)
        if not m:
            return self._v(f'it must start with the word "{word}" but is empty')
        first = re.split(r"[.,?!'\"]", m.group().lstrip("'").lstrip('"'), maxsplit=1)[0]  # IFEval's rule
        if first.lower() == word.lower():
            return []
        return self._v(f"it must start with the word \"{word}\" but starts with '{m.group()}'", [m.span()])


# symmetric pairs that must never share a prompt
_CONFLICTS = [
    ("all_lowercase", "all_uppercase"),
    ("all_lowercase", "capital_words"),
    ("all_uppercase", "capital_words"),
    ("all_lowercase", "yes_no_answer"),
    ("all_uppercase", "yes_no_answer"),
    ("all_lowercase", "sections"),
    ("all_uppercase", "sections"),
    ("capital_words", "sections"),
    *(
        ("json_format", t)
        for t in (
            "title",
            "bullet_count",
            "paragraph_count",
            "sections",
            "postscript",
            "wrap_in_quotes",
            "end_phrase",
            "start_phrase",
            "two_responses",
            "repeat_request",
            "highlighted_sections",
            "first_word",
            "yes_no_answer",
            "no_comma",
            "placeholders",
        )
    ),
    ("wrap_in_quotes", "start_phrase"),
    ("wrap_in_quotes", "end_phrase"),
    ("wrap_in_quotes", "first_word"),
    ("wrap_in_quotes", "repeat_request"),
    ("wrap_in_quotes", "two_responses"),
    ("wrap_in_quotes", "bullet_count"),
    ("start_phrase", "first_word"),
    ("start_phrase", "repeat_request"),
    ("first_word", "repeat_request"),
    ("repeat_request", "two_responses"),
    ("repeat_request", "no_comma"),  # the request's own text may break these
    ("repeat_request", "forbidden_words"),
    ("repeat_request", "letter_frequency"),
    ("repeat_request", "keyword_frequency"),
    ("end_phrase", "postscript"),
    ("paragraph_count", "two_responses"),  # ****** splits into empty *** paragraphs
]

TYPES: dict[str, ConstraintType] = {
    t.name: t
    for t in (
        NoComma(),
        AllLowercase(),
        AllUppercase(),
        CapitalWords(),
        EndPhrase(),
        StartPhrase(),
        WrapInQuotes(),
        IncludeKeywords(),
        ForbiddenWords(),
        KeywordFrequency(),
        LetterFrequency(),
        WordCount(),
        SentenceCount(),
        ParagraphCount(),
        BulletCount(),
        Title(),
        JsonFormat(),
        HighlightedSections(),
        Sections(),
        Postscript(),
        Placeholders(),
        RepeatRequest(),
        TwoResponses(),
        YesNoAnswer(),
        FirstWord(),
    )
}
for _name, _t in TYPES.items():
    _t.conflicts = frozenset(
        {b for a, b in _CONFLICTS if a == _name} | {a for a, b in _CONFLICTS if b == _name}
    )


# --- checking and validation --------------------------------------------------------------------


def loose_variants(response: str) -> list[str]:
    """IFEval's 8 loose variants: as is / without first line / last line / both, each also without '*'."""
    lines = response.split("\n")
    no_first = "\n".join(lines[1:]).strip()
    no_last = "\n".join(lines[:-1]).strip()
    no_both = "\n".join(lines[1:-1]).strip()
    return [
        response,
        response.replace("*", ""),
        no_first,
        no_last,
        no_both,
        no_first.replace("*", ""),
        no_last.replace("*", ""),
        no_both.replace("*", ""),
    ]


def check(response: str, constraint: dict, loose: bool = False) -> bool:
    c = validate(constraint, "constraint")
    t, params = TYPES[c["type"]], c["params"]
    if not loose:
        return not t.violations(response, params)
    return any(v.strip() and not t.violations(v, params) for v in loose_variants(response))


def violations(response: str, constraints: list[dict]) -> list[Violation]:
    out: list[Violation] = []
    for i, c in enumerate(constraints):
        c = validate(c, f"constraint {i}")
        out += TYPES[c["type"]].violations(response, c["params"])
    return out


def compatible(names: Sequence[str]) -> bool:
    if len(set(names)) != len(names):
        return False
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            if (a in TYPES and b in TYPES[a].conflicts) or (b in TYPES and a in TYPES[b].conflicts):
                return False
    return True


def _bad_value(kind: str, v: Any) -> str | None:
    """Why `v` is not a valid param of this kind, or None."""
    if kind == "count":
        return (
            None
            if isinstance(v, int) and not isinstance(v, bool) and v >= 1
            else "must be a positive integer"
        )
    if kind == "relation":
        return None if v in RELATIONS else f"must be one of {', '.join(repr(r) for r in RELATIONS)}"
    if kind == "text":
        return None if isinstance(v, str) and v.strip() else "must be a non-empty string"
    if kind == "word":
        return None if isinstance(v, str) and re.fullmatch(r"\w+", v) else "must be a single word"
    if kind == "letter":
        return None if isinstance(v, str) and re.fullmatch(r"[a-zA-Z]", v) else "must be one letter a-z"
    if kind == "marker":
        return None if v in MARKERS else f"must be one of {', '.join(repr(m) for m in MARKERS)}"
    if kind == "words":
        ok = isinstance(v, (list, tuple)) and 1 <= len(v) <= 3
        ok = ok and all(isinstance(w, str) and re.fullmatch(r"\w+(?: \w+)*", w) for w in v)
        return None if ok else "must be a list of 1 to 3 words"
    raise AssertionError(kind)


def validate(constraint: Any, where: str) -> dict:
    if not isinstance(constraint, dict):
        raise DataError(
            f"{where}: a constraint must be a mapping with 'type' and 'params', got {type(constraint).__name__}"
        )
    extra = set(constraint) - {"type", "params"}
    if extra:
        raise DataError(
            f"{where}: unknown constraint field(s) {sorted(extra)}; only 'type' and 'params' are allowed"
        )
    name = constraint.get("type")
    if name not in TYPES:
        raise DataError(
            f"{where}: unknown constraint type {name!r} in field 'type' (known: {', '.join(sorted(TYPES))})"
        )
    params = constraint.get("params", {})
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise DataError(f"{where}: field 'params' of {name} must be a mapping, got {type(params).__name__}")
    spec = TYPES[name].params
    missing, unknown = sorted(set(spec) - set(params)), sorted(set(params) - set(spec))
    if missing:
        raise DataError(f"{where}: params of {name} miss {missing} (expects {sorted(spec) or 'none'})")
    if unknown:
        raise DataError(
            f"{where}: params of {name} have unknown {unknown} (expects {sorted(spec) or 'none'})"
        )
    out = {}
    for key, kind in spec.items():
        why = _bad_value(kind, params[key])
        if why:
            raise DataError(f"{where}: params.{key} of {name} {why}, got {params[key]!r}")
        v = params[key]
        out[key] = v.lower() if kind == "letter" else list(v) if kind == "words" else v
    return {"type": name, "params": out}
