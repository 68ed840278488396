"""The Shapes-world prompt grammar: words, categories and a strict parser.

A prompt is one or two object phrases, joined by ``and`` or by a relation::

    prompt  := phrase [("and" | relation) phrase]
    phrase  := ("a" | number) [colour] shape      # plural shape after a number
    number  := two | three | four
    relation:= "left of" | "right of" | "above" | "below"

Every prompt of the six GenEval-style categories is a sentence of this grammar, and so is any prompt
file a user writes with these words. Anything else raises :class:`PromptError` naming the word and
what the grammar allows there.
"""

from __future__ import annotations

from dataclasses import dataclass

COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "white")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
NUMBERS: dict[str, int] = {"two": 2, "three": 3, "four": 4}
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
CATEGORIES: tuple[str, ...] = ("single_object", "two_object", "counting", "colors", "position", "color_attr")

PLURALS: dict[str, str] = {shape + "s": shape for shape in SHAPES}
NUMBER_WORDS: dict[int, str] = {n: word for word, n in NUMBERS.items()}
# Every word a prompt may contain, in a fixed order (the tiny DiT's tokenizer uses it as its vocabulary).
VOCABULARY: tuple[str, ...] = (
    ("a", "and", "of", "left", "right", "above", "below") + tuple(NUMBERS) + COLORS + SHAPES + tuple(PLURALS)
)


class PromptError(ValueError):
    """A prompt that is not a sentence of the Shapes grammar."""


@dataclass(frozen=True)
class ObjectSpec:
    """One object phrase: ``count`` objects of ``shape``, all of ``color`` when it is given.

    ``exact`` is True when a number word was used ("three squares"): the judge then wants exactly that many
    (GenEval counting); "a square" asks for at least one.
    """

    shape: str
    color: str | None = None
    count: int = 1
    exact: bool = False

    @property
    def text(self) -> str:
        head = NUMBER_WORDS[self.count] if self.count > 1 else "a"
        noun = self.shape + ("s" if self.count > 1 else "")
        return " ".join(w for w in (head, self.color, noun) if w)


@dataclass(frozen=True)
class PromptSpec:
    """A parsed prompt: its object phrases and, for position prompts, the relation of the first to the second."""

    objects: tuple[ObjectSpec, ...]
    relation: str | None = None

    @property
    def text(self) -> str:
        """The canonical prompt string (parse(text) gives this spec back)."""
        if len(self.objects) == 1:
            return self.objects[0].text
        joiner = self.relation if self.relation else "and"
        return f"{self.objects[0].text} {joiner} {self.objects[1].text}"

    @property
    def category(self) -> str:
        """The GenEval-style category this prompt belongs to."""
        if self.relation is not None:
            return "position"
        if any(o.count > 1 for o in self.objects):
            return "counting"
        if len(self.objects) == 1:
            return "colors" if self.objects[0].color else "single_object"
        return "color_attr" if any(o.color for o in self.objects) else "two_object"

    @property
    def expected_objects(self) -> int:
        """How many objects a clean image of this prompt holds."""
        return sum(o.count for o in self.objects)


def normalize(text: str) -> str:
    """Lower-case a prompt and collapse its whitespace."""
    return " ".join(text.lower().replace(",", " ").split())


def _expected(words: list[str], i: int, allowed: str, text: str) -> PromptError:
    found = repr(words[i]) if i < len(words) else "the end of the prompt"
    return PromptError(f"prompt {text!r}: word {i + 1} is {found}, but the Shapes grammar allows {allowed} there")


def _parse_phrase(words: list[str], i: int, text: str) -> tuple[ObjectSpec, int]:
    if i >= len(words) or (words[i] != "a" and words[i] not in NUMBERS):
        raise _expected(words, i, "'a' or a number (" + ", ".join(NUMBERS) + ")", text)
    count = 1 if words[i] == "a" else NUMBERS[words[i]]
    i += 1
    color = None
    if i < len(words) and words[i] in COLORS:
        color = words[i]
        i += 1
    nouns = SHAPES if count == 1 else tuple(PLURALS)
    if i >= len(words) or words[i] not in nouns:
        kind = "a shape" if count == 1 else "a plural shape after a number"
        raise _expected(
            words,
            i,
            f"{kind} ({', '.join(nouns)})" + ("" if color else " or a colour (" + ", ".join(COLORS) + ")"),
            text,
        )
    shape = words[i] if count == 1 else PLURALS[words[i]]
    return ObjectSpec(shape=shape, color=color, count=count, exact=count > 1), i + 1


def parse_prompt(text: str) -> PromptSpec:
    """Parse a prompt of the Shapes grammar.

    Raises:
        PromptError: if any word is outside the grammar, naming the word, its position and what is allowed.
    """
    if not isinstance(text, str) or not text.strip():
        raise PromptError(f"prompt {text!r} is empty; a Shapes prompt looks like 'a red circle left of a square'")
    words = normalize(text).split()
    first, i = _parse_phrase(words, 0, text)
    if i == len(words):
        return PromptSpec(objects=(first,))
    relation = None
    if words[i] == "and":
        i += 1
    elif words[i] in ("above", "below"):
        relation = words[i]
        i += 1
    elif words[i] in ("left", "right") and i + 1 < len(words) and words[i + 1] == "of":
        relation = f"{words[i]} of"
        i += 2
    else:
        raise _expected(words, i, "the end, 'and' or a relation (" + ", ".join(RELATIONS) + ")", text)
    second, i = _parse_phrase(words, i, text)
    if i != len(words):
        raise _expected(words, i, "the end of the prompt (at most two object phrases)", text)
    return PromptSpec(objects=(first, second), relation=relation)
