"""WordNet lookups for DataComp's text-based filter, without downloads.

DataComp keeps a caption when some token of ``text.split()`` has a first WordNet synset whose offset
is an ImageNet-21k WNID (``wordnet.synsets(word)[0].offset()``, NLTK 3.8.1 as DataComp pins it, with
the WordNet 3.0 database ``nltk.download("wordnet")`` fetches). That lookup needs only WordNet's
index and exception files, so this module reads them directly and reimplements NLTK 3.8.1's
``synsets()`` order and ``_morphy`` lemmatisation line for line:

* the token is lower-cased (``str.lower``);
* parts of speech are tried in NLTK's order noun, verb, adjective, adverb; for each, morphy gives
  the candidate base forms (the exception list if the word is in it, else the word itself and the
  one-step suffix rewrites that are in the index; NLTK 3.8.1 then keeps applying the rules until
  some form is found -- later NLTK versions dropped that step: ``iterate=False`` gives their
  behaviour);
* the first synset is the first offset listed in ``index.<pos>`` for the first form of the first
  part of speech that has any.

Where the database comes from (nothing is downloaded at run time): ``$DCDB_WORDNET`` (a WordNet
``dict`` folder), NLTK's own data folders (``corpora/wordnet`` unpacked or ``wordnet.zip``, as
``nltk.download("wordnet")`` leaves them), then ``/usr/share/wordnet`` (Debian/Ubuntu's
``wordnet-base`` package: Princeton's WordNet 3.0 database files, the same offsets: dog is
02084071). ``write_dict`` writes a small valid stand-in database (tests, demo worlds).
"""

from __future__ import annotations

import hashlib
import os
import threading
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from dcdb.errors import AssetError

WORDNET_ENV = "DCDB_WORDNET"
DEBIAN_DICT = Path("/usr/share/wordnet")
POS_LIST = ("n", "v", "a", "r")  # NLTK's POS_LIST: noun, verb, adjective, adverb
_FILEMAP = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
_SUBSTITUTIONS: dict[str, tuple[tuple[str, str], ...]] = {  # NLTK's MORPHOLOGICAL_SUBSTITUTIONS
    "n": (("s", ""), ("ses", "s"), ("ves", "f"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"),
          ("men", "man"), ("ies", "y")),
    "v": (("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""), ("ing", "e"), ("ing", "")),
    "a": (("er", ""), ("est", ""), ("er", "e"), ("est", "e")),
    "r": (),
}
_NEEDED = [f"index.{s}" for s in _FILEMAP.values()] + [f"{s}.exc" for s in _FILEMAP.values()]


# ------------------------------------------------------------------------------- locating


class Source:
    """A WordNet database: a dict folder or NLTK's wordnet.zip."""

    def __init__(self, where: Path, zip_prefix: str | None = None):
        self.where = where
        self.zip_prefix = zip_prefix

    def __str__(self) -> str:
        return f"{self.where}:{self.zip_prefix}" if self.zip_prefix is not None else str(self.where)

    def read(self, name: str) -> str:
        if self.zip_prefix is None:
            return (self.where / name).read_text(encoding="utf-8")
        with zipfile.ZipFile(self.where) as z:
            return z.read(self.zip_prefix + name).decode("utf-8")

    def complete(self) -> bool:
        try:
            if self.zip_prefix is None:
                return all((self.where / n).is_file() for n in _NEEDED)
            with zipfile.ZipFile(self.where) as z:
                names = set(z.namelist())
            return all(self.zip_prefix + n in names for n in _NEEDED)
        except (OSError, zipfile.BadZipFile):
            return False


def _nltk_candidates() -> list[Source]:
    """NLTK's data folders (without importing nltk): $NLTK_DATA and its default locations."""
    roots = [Path(p) for p in os.environ.get("NLTK_DATA", "").split(os.pathsep) if p]
    roots += [Path.home() / "nltk_data", Path("/usr/share/nltk_data"), Path("/usr/local/share/nltk_data"),
              Path("/usr/lib/nltk_data"), Path("/usr/local/lib/nltk_data")]
    out = []
    for r in roots:
        out.append(Source(r / "corpora" / "wordnet"))
        out.append(Source(r / "corpora" / "wordnet.zip", "wordnet/"))
    return out


def locate(explicit: str | os.PathLike | None = None) -> Source:
    """Find a WordNet 3.0 database (see the module docstring for the order), or say how to get one."""
    if explicit:
        src = Source(Path(explicit).expanduser())
        if not src.complete():
            raise AssetError(
                f"WordNet folder {str(src.where)!r} lacks some of {', '.join(_NEEDED)}",
                hint="give a WordNet 3.0 'dict' folder (Debian: /usr/share/wordnet from wordnet-base)",
            )
        return src
    env = os.environ.get(WORDNET_ENV)
    if env:
        return locate(env)
    for src in [*_nltk_candidates(), Source(DEBIAN_DICT)]:
        if src.where.exists() and src.complete():
            return src
    raise AssetError(
        "no WordNet 3.0 database found (the text-based filter needs one; nothing is downloaded)",
        hint=f"apt-get install wordnet-base (installs /usr/share/wordnet), or set {WORDNET_ENV}=DICT_FOLDER, "
        "or unpack NLTK's wordnet.zip under ~/nltk_data/corpora",
    )


# ------------------------------------------------------------------------------- the reader


class WordNet:
    """The part of NLTK's WordNet reader that ``synsets(word)[0].offset()`` uses."""

    def __init__(self, source: Source, *, iterate: bool = True):
        self.source = source
        self.iterate = iterate  # NLTK 3.8.1 morphy step 3 (DataComp's pinned version)
        self.index: dict[str, dict[str, list[int]]] = {}
        self.exceptions: dict[str, dict[str, list[str]]] = {}
        digest = hashlib.sha256()
        for pos, suffix in _FILEMAP.items():
            text = source.read(f"index.{suffix}")
            digest.update(text.encode())
            self._load_index(text, suffix)
            exc_text = source.read(f"{suffix}.exc")
            digest.update(exc_text.encode())
            self.exceptions[pos] = {t[0]: t[1:] for t in (ln.split() for ln in exc_text.splitlines()) if t}
        self.sha256 = digest.hexdigest()
        self._cache: dict[str, int] = {}

    def _load_index(self, text: str, suffix: str) -> None:
        """Parse ``index.<pos>`` as NLTK's ``_load_lemma_pos_offset_map`` does."""
        for i, line in enumerate(text.splitlines(), 1):
            if not line or line.startswith(" "):
                continue
            tok = line.split()
            try:
                lemma, pos, n_synsets, n_pointers = tok[0], tok[1], int(tok[2]), int(tok[3])
                at = 4 + n_pointers
                n_senses = int(tok[at])
                if n_synsets <= 0 or n_synsets != n_senses:
                    raise ValueError("synset count mismatch")
                offsets = [int(t) for t in tok[at + 2 : at + 2 + n_synsets]]
                if len(offsets) != n_synsets:
                    raise ValueError("line too short")
            except (IndexError, ValueError) as exc:
                raise AssetError(
                    f"WordNet file index.{suffix} line {i} is malformed ({exc}) in {self.source}",
                    hint="reinstall the WordNet 3.0 database",
                ) from None
            self.index.setdefault(lemma, {})[pos] = offsets

    def _filter(self, forms: Iterable[str], pos: str) -> list[str]:
        out, seen = [], set()
        for f in forms:
            if pos in self.index.get(f, ()) and f not in seen:
                out.append(f)
                seen.add(f)
        return out

    def _rules(self, forms: list[str], pos: str) -> list[str]:
        subs = _SUBSTITUTIONS[pos]
        out = [f[: -len(old)] + new for f in forms for old, new in subs if f.endswith(old)]
        # Keeping only first occurrences changes no result (a repeated form yields the same
        # children again) and keeps the iteration polynomial on long pathological tokens.
        return list(dict.fromkeys(out))

    def morphy(self, form: str, pos: str) -> list[str]:
        """NLTK 3.8.1's ``_morphy(form, pos)`` (with ``iterate=False``: NLTK >= 3.8.2's)."""
        exc = self.exceptions[pos]
        if self.iterate:
            if form in exc:
                return self._filter([form, *exc[form]], pos)
            forms = self._rules([form], pos)
            found = self._filter([form, *forms], pos)
            while not found and forms:
                forms = self._rules(forms, pos)
                found = self._filter(forms, pos)
            return found
        forms = exc[form] if form in exc else self._rules([form], pos)
        return self._filter([form, *forms], pos)

    def first_offset(self, word: str) -> int:
        """``wordnet.synsets(word)[0].offset()``, or -1 when the word has no synset."""
        hit = self._cache.get(word)
        if hit is not None:
            return hit
        lemma = word.lower()
        result = -1
        for pos in POS_LIST:
            forms = self.morphy(lemma, pos)
            if forms:
                result = self.index[forms[0]][pos][0]
                break
        if len(self._cache) < 2_000_000:
            self._cache[word] = result
        return result

    def caption_offsets(self, text: str | None) -> list[int]:
        """First-synset offsets of the caption's ``text.split()`` tokens, distinct, in order."""
        if not text:
            return []
        seen: dict[int, None] = {}
        for tok in text.split():
            off = self.first_offset(tok)
            if off >= 0:
                seen[off] = None
        return list(seen)

    def info(self) -> dict[str, Any]:
        return {"source": str(self.source), "sha256": self.sha256, "morphy": "nltk-3.8.1" if self.iterate else "nltk>=3.8.2"}


_readers: dict[tuple[str, bool], WordNet] = {}
_lock = threading.Lock()


def open_wordnet(explicit: str | os.PathLike | None = None, *, iterate: bool = True) -> WordNet:
    """The WordNet reader for the located database (loaded once per process, ~1 s)."""
    src = locate(explicit)
    key = (str(src), iterate)
    with _lock:
        if key not in _readers:
            _readers[key] = WordNet(src, iterate=iterate)
        return _readers[key]


# ----------------------------------------------------------------------------- a stand-in


def write_dict(folder: str | os.PathLike, entries: dict[str, list[tuple[str, int]]],
               exceptions: dict[str, dict[str, list[str]]] | None = None) -> Path:
    """Write a small WordNet database that this module and NLTK's reader can read.

    ``entries``: lemma -> [(pos, offset), ...] in sense order (pos one of n v a r). Each synset
    gets a line in ``data.<pos>`` at its byte offset (the gaps are blank lines, which WordNet
    readers skip), so offsets must be above the 40-byte header. ``exceptions``: pos ->
    {inflected form: [base forms]}. ``lexnames`` and empty ``index.sense``/``cntlist.rev`` are
    written too, as NLTK opens them.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    by_pos: dict[str, dict[str, list[int]]] = {p: {} for p in _FILEMAP}
    synsets: dict[str, dict[int, list[str]]] = {p: {} for p in _FILEMAP}
    for lemma, senses in entries.items():
        for pos, offset in senses:
            by_pos[pos].setdefault(lemma.lower(), []).append(int(offset))
            synsets[pos].setdefault(int(offset), []).append(lemma.lower())
    for pos, suffix in _FILEMAP.items():
        lines = ["  1 dcdb stand-in WordNet index (not the real database)"]
        for lemma in sorted(by_pos[pos]):
            offs = by_pos[pos][lemma]
            lines.append(f"{lemma} {pos} {len(offs)} 0 {len(offs)} 0 " + " ".join(f"{o:08d}" for o in offs) + "  ")
        (out / f"index.{suffix}").write_text("\n".join(lines) + "\n", encoding="utf-8")
        exc = (exceptions or {}).get(pos, {})
        (out / f"{suffix}.exc").write_text("".join(f"{k} {' '.join(v)}\n" for k, v in sorted(exc.items())))
        (out / f"data.{suffix}").write_bytes(_data_file(pos, synsets[pos]))
    (out / "lexnames").write_text("".join(f"{i:02d}\tlex.{i}\t1\n" for i in range(45)))
    for name in ("index.sense", "cntlist.rev"):
        (out / name).write_text("")
    return out


def _data_file(pos: str, synsets: dict[int, list[str]]) -> bytes:
    """``data.<pos>`` with each synset's line starting at its byte offset."""
    buf = bytearray(b"  1 dcdb stand-in WordNet data\n")
    for offset in sorted(synsets):
        if offset < len(buf):
            raise ValueError(f"stand-in WordNet offset {offset} ({pos}) overlaps the previous line")
        buf += b"\n" * (offset - len(buf))
        words = " ".join(f"{w} 0" for w in synsets[offset])
        buf += f"{offset:08d} 03 {pos} {len(synsets[offset]):02x} {words} 000 | stand-in synset  \n".encode()
    return bytes(buf)
