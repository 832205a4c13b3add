"""Caption tokenisation exactly as DataComp's filters count words.

* ``text.split()`` (basic filter: more than 2 words; text-based filter: the tokens looked up in
  WordNet): Python's whitespace split. In SQL this is the engine's ``words_gt``/``py_words`` macros.
* ``fasttext.tokenize(text)`` (image-based caption filter: more than 1 token). fastText's
  ``Dictionary::readWord`` splits the UTF-8 bytes on the six ASCII characters space, ``\\n``, ``\\r``,
  ``\\t``, ``\\v``, ``\\f`` and NUL, and every ``\\n`` that starts a token becomes the end-of-sentence
  token ``</s>``; nothing else is whitespace (U+00A0, U+3000 ... are part of words). So the count is
  (runs of non-delimiters) + (number of ``\\n``). ``fasttext_tokenize`` reproduces the token list;
  the SQL macro ``ft_tokens`` counts with one regex (tests check both against each other, and
  against fastText itself where the ``fasttext`` package with ``tokenize`` is installed).
"""

from __future__ import annotations

import re

EOS = "</s>"
FASTTEXT_DELIMITERS = " \n\r\t\x0b\x0c\x00"
_FT_TOKEN_RE = re.compile(r"[^ \n\r\t\x0b\x0c\x00]+|\n")

# RE2 pattern for DuckDB: a token is a run of non-delimiters, or a newline (</s>).
FT_TOKEN_SQL_PATTERN = r"[^ \n\r\t\x0b\x0c\x00]+|\n"


def fasttext_tokenize(text: str) -> list[str]:
    """``fasttext.tokenize(text)``: whitespace-split tokens, each ``\\n`` an ``</s>`` token."""
    return [EOS if t == "\n" else t for t in _FT_TOKEN_RE.findall(text)]


def fasttext_token_count(text: str) -> int:
    """``len(fasttext.tokenize(text))`` without building the list."""
    return sum(1 for _ in _FT_TOKEN_RE.finditer(text))


def python_words(text: str) -> list[str]:
    """``text.split()``: DataComp's word split (basic filter, WordNet lookup)."""
    return text.split()
