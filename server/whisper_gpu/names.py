"""Names of the home spelled as the home spells them, in a transcript.

Whisper's prompt carries only as many names as its token budget allows, and a small model often writes a name it
does not know as ordinary words that sound alike ("Mother's Fan" for "Wouter's Fan"). After decoding, runs of one
to four words that are written almost like a name of the home (letters compared without case, accents or spaces)
are replaced by that name. Only names with a word the model does not know are candidates: a name made of common
words (Kitchen Light) is heard right, and matching it loosely would turn ordinary words into names.

A redo's prompt leads with the names most like what the first decode heard: alike in letters, or in sound, where the
model wrote a name it has never seen as English words ("trot free" for "Tradfri").
"""

from __future__ import annotations

import re
import unicodedata
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator

import jellyfish
from rapidfuzz import fuzz, process

# Similarity (0-100, rapidfuzz's normalised Indel similarity of the letters) from which a run of words is taken
# for a name. Measured on the test set of bench/run --names with base: 70 corrected most names without changing
# an ordinary command; 65 began to. A run of one word more than the name ("kool shrank" for "Kühlschrank") must be
# closer, or a short word beside a misheard one ("the trot") passes for a name.
SIMILARITY = 70
SIMILARITY_EXTRA_WORD = 80
_MIN_LETTERS = 4  # shorter runs ("the", "on") look like too many things
# Neither may be much longer than the other: a part of a name ("shrank", "is light") is not the name.
_LENGTH_RATIO = 0.75
# A run of one to three words sounds like a name when its Metaphone key (English spelling rules) is this similar to
# that of the name's longest word: "trot free" and "Tradfri" are both TRTFR. Keys of fewer sounds (Kaia: K, Shelly:
# XL) match too many words.
SOUND_SIMILARITY = 90
_MIN_SOUNDS = 4
_SOUND_RUN_WORDS = 3
_WORD = re.compile(r"\S+")
_TRAILING_PUNCTUATION = re.compile(r"[.,!?;:]+$")
_POSSESSIVE = re.compile("['\u2019]s\\W*$")  # Kaia's, also with a typographic apostrophe
_UNDECOMPOSED = str.maketrans({"ß": "ss", "ł": "l", "ø": "o", "đ": "d", "æ": "ae", "œ": "oe"})


def letters(text: str) -> str:
    """The letters and digits of a text, lower case, without accents: what two spellings are compared by."""
    decomposed = unicodedata.normalize("NFKD", text.casefold().translate(_UNDECOMPOSED))
    return "".join(char for char in decomposed if char.isalnum())


def sounds(words: Iterable[str]) -> str:
    """The words' sounds as English spelling suggests them: their Metaphone keys, joined."""
    return "".join(jellyfish.metaphone(_word_key(word)) for word in words)


class NameSpeller:
    """Replaces words that are written almost like one of the names by that name."""

    def __init__(self, names: Iterable[str]) -> None:
        unique = list(dict.fromkeys(names))
        self._by_length: dict[int, tuple[list[str], list[str]]] = defaultdict(lambda: ([], []))
        for name in unique:
            key = letters(name)
            if len(key) >= _MIN_LETTERS:
                spellings, keys = self._by_length[len(name.split())]
                spellings.append(name)
                keys.append(key)
        self._longest = max(self._by_length, default=0) + 1
        self._sounds = {name: key for name in unique if len(key := sounds([max(name.split(), key=len)])) >= _MIN_SOUNDS}

    def __bool__(self) -> bool:
        return bool(self._by_length)

    def closest(self, text: str, count: int) -> list[str]:
        """The names that sound like words of the text, then those whose letters appear most nearly in the text's."""
        letters_of_text = letters(text)
        if not letters_of_text:
            return []
        ranked = [
            (score, spellings[index])
            for spellings, keys in self._by_length.values()
            for _, score, index in process.extract(letters_of_text, keys, scorer=fuzz.partial_ratio, limit=count)
        ]
        by_letters = [name for _, name in sorted(ranked, key=lambda match: -match[0])]
        return list(dict.fromkeys([*self._sounding_like(text), *by_letters]))[:count]

    def _sounding_like(self, text: str) -> list[str]:
        """The names whose longest word sounds like a run of the text's words."""
        words = text.split()
        runs = {
            sounds(words[first : first + size])
            for size in range(1, _SOUND_RUN_WORDS + 1)
            for first in range(len(words) - size + 1)
        }
        return [
            name
            for name, key in self._sounds.items()
            if process.extractOne(key, runs, scorer=fuzz.ratio, score_cutoff=SOUND_SIMILARITY)
        ]

    def spell(self, text: str) -> str:
        """The text with the runs of words most like a name replaced by it (the best match first, no overlaps)."""
        words = list(_WORD.finditer(text))
        taken: set[int] = set()
        replacements: list[tuple[int, int, str]] = []
        for _, _, first, size, name in sorted(self._matches([letters(word.group()) for word in words]), reverse=True):
            covered = set(range(first, first + size))
            if not covered & taken:
                taken |= covered
                replacements.append((first, size, name))
        for first, size, name in sorted(replacements, reverse=True):
            last = words[first + size - 1]
            punctuation = _TRAILING_PUNCTUATION.search(last.group())
            spelled = name + (punctuation.group() if punctuation else "")
            text = text[: words[first].start()] + spelled + text[last.end() :]
        return text

    def _matches(self, keys: list[str]) -> Iterator[tuple[float, int, int, int, str]]:
        """(similarity, words the run has beyond the name's, first word, words in the run, name) of each match.

        A run with a number is a name only if the name has digits too: "Oosterhout 50%" is not "Oosterhout Light".
        """
        for size in range(1, min(self._longest, len(keys)) + 1):
            for first in range(len(keys) - size + 1):
                run = "".join(keys[first : first + size])
                if len(run) < _MIN_LETTERS:
                    continue
                numeric = _has_digit(run)
                for length, cutoff in ((size, SIMILARITY), (size - 1, SIMILARITY_EXTRA_WORD)):
                    spellings, name_keys = self._by_length.get(length, ([], []))
                    for _, score, index in process.extract(run, name_keys, scorer=fuzz.ratio, score_cutoff=cutoff):
                        name_key = name_keys[index]
                        if numeric and not _has_digit(name_key):
                            continue
                        if _LENGTH_RATIO <= len(run) / len(name_key) <= 1 / _LENGTH_RATIO:
                            yield score, length - size, first, size, spellings[index]
                            break


class PromptEcho:
    """Tells a decode that repeats the names of its prompt from one that uses them.

    Given names, Whisper sometimes writes unclear speech as names of its prompt: nothing but their words ("Järvinen
    Heater" for "turn on the fan"), or in the prompt's form, a name right after a comma ("Shit, Thermostat, Kotatsu,
    21 degrees." for "set the thermostat to twenty one degrees"; "Dimper bedroom light, Oosterhout 50%" for "dim the
    bedroom lights to fifty percent"). A spoken command rarely puts a name right after a comma.
    """

    def __init__(self, names: Iterable[str], distinctive: Callable[[str], bool]) -> None:
        """`distinctive` tells a word that marks its name on its own (Oosterhout, not Living) from one that does not."""
        spellings = [name.split() for name in names]
        self._names = frozenset(tuple(map(_word_key, words)) for words in spellings if words)
        self._words = frozenset(word for name in self._names for word in name)
        self._longest = max(map(len, self._names), default=0)
        self._first_words = frozenset(_word_key(words[0]) for words in spellings if words and distinctive(words[0]))

    def __call__(self, text: str) -> bool:
        """Whether the text is made of nothing but words of the names, or has a name right after a comma."""
        clauses = [[key for key in map(_word_key, clause.split()) if key] for clause in text.split(",")]
        if any(keys and all(key in self._words for key in keys) for keys in clauses):
            return True
        return any(keys and self._starts_with_name(keys) for keys in clauses[1:])

    def _starts_with_name(self, keys: list[str]) -> bool:
        """Whether the words start with a whole name, or with the first word of a name that marks it on its own."""
        if keys[0] in self._first_words:
            return True
        return any(tuple(keys[:size]) in self._names for size in range(1, min(self._longest, len(keys)) + 1))


def _has_digit(text: str) -> bool:
    return any(char.isdigit() for char in text)


def _word_key(word: str) -> str:
    """A word compared without case, accents or a possessive ending ("Kaia's" is a word of "Kaia's Room")."""
    return letters(_POSSESSIVE.sub("", word))
