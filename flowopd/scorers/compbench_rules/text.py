"""Prompt parsing: tokens, noun phrases and the objects of a relation, with spaCy or the documented fallback.

The official parser is spaCy ``en_core_web_sm``; :class:`Token` carries what the rules read from it (text,
trailing whitespace, coarse POS). Without the model, :func:`fallback_tokens` and :func:`fallback_noun_phrases`
approximate it (docs/scorers/compbench.md lists the agreement on the val prompt files); :class:`PromptParser`
picks one.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from flowopd.scorers.compbench_rules.attribute import BLIP_SKIPPED_CHUNKS
from flowopd.scorers.compbench_rules.detection import OBJECTS_PLURAL, OBJECTS_SINGULAR


@dataclass(frozen=True)
class Token:
    """One token from a spaCy Doc: text, trailing whitespace, coarse POS (None = unknown)."""

    text: str
    whitespace: str = ""
    pos: str | None = None


def span_text(tokens: Sequence[Token]) -> str:
    """spaCy's ``Span.text``: the tokens with their whitespace, without the last token's trailing space."""
    if not tokens:
        return ""
    return "".join(t.text + t.whitespace for t in tokens[:-1]) + tokens[-1].text


_TOKEN_RE = re.compile(r"\d+(?::\d+)+|\w+(?=n't)|n't|'\w+|\w+(?:-\w+)*|[^\w\s]")

# Word lists of the fallback tagger (the parts of speech spaCy gives these words in the val prompts)
_DETERMINERS = set(
    "a an the this that these those its their his her my our your some each every another".split()
)
_ADPOSITIONS = set(
    "on in of at by with near under above below behind beside between into onto over from to for through "
    "across against along among around inside outside upon within without toward towards past like".split()
)
_AUXILIARIES = set(
    "is are was were be been being am has have had do does did can could will would should may".split()
)
_OTHER = set(  # conjunctions, pronouns, adverbs: never part of a noun phrase
    "and or but as while than then it they he she we you i there here which who whom whose them "
    "next together very down up away off out just also carefully slowly gently quietly".split()
)
_COLOURS = set(
    "black white red green blue yellow brown gray grey pink purple orange gold silver beige tan".split()
)
_ADJECTIVES = _COLOURS | set(
    # shapes and sizes
    "golden round circular square rectangular triangular oval oblong spherical cubic conical cylindrical "
    "pyramidal pentagonal teardrop big small large tiny tall short long narrow wide thick thin huge giant "
    "little "
    # textures and materials used as adjectives
    "fluffy wooden metallic soft hard rough smooth shiny glossy furry fuzzy silky sleek sticky crisp crunchy "
    "jagged prickly bumpy polished rusty "
    # frequent adjectives of the complex and non-spatial prompts
    "old new modern ancient vintage bright dark dim colorful vibrant warm cool cold hot fresh sweet sour "
    "juicy delicious beautiful elegant cozy calm quiet busy empty full heavy light wet dry clean sharp dull "
    "deep gentle delicate fragrant lush majestic serene sturdy thorny twisted ripe rich graceful intricate "
    "ornate plush playful peaceful wild tasty savory sparkling shimmering".split()
)
_IRREGULAR_VERBS = set(
    "sat lay hung fell shone sped wrote stood ran flew grew sang swam drove held kept led lit spun struck "
    "stuck took told woke blew drew ate went came gave found sits lies hangs shines reads holds".split()
)
_NOUNS_LIKE_VERBS = (  # -ing / -ed nouns
    set(
        "painting building ceiling string wedding thing morning evening clothing stocking pudding icing "
        "frosting railing earring dumpling duckling sibling bed shed sled seed".split()
    )
    | set(OBJECTS_SINGULAR)
    | set(OBJECTS_PLURAL)
)


def fallback_tokens(text: str) -> list[Token]:
    """Tokens without spaCy: words (hyphenated kept), clitics ("'s", "n't"), times ("11:44"), punctuation.

    Equal to spaCy's English tokenizer on every numeracy, spatial and 3-D val prompt. The coarse POS comes
    from word lists (DET, ADP, AUX, ADJ, irregular verbs), ``-ing`` / ``-ed`` endings (VERB) and NOUN
    otherwise: enough for the rules, not a tagger (docs/scorers/compbench.md gives the agreement).
    """
    matches = list(_TOKEN_RE.finditer(text))
    pos = [_fallback_pos(m.group()) for m in matches]
    for i, m in enumerate(matches):
        # an -ing / -ed word right after a determiner or adjective is a modifier or a noun ("a short sapling")
        if (
            pos[i] == "VERB"
            and m.group().lower() not in _IRREGULAR_VERBS
            and i
            and pos[i - 1] in ("DET", "ADJ")
        ):
            pos[i] = "ADJ" if i + 1 < len(pos) and pos[i + 1] in ("NOUN", "ADJ") else "NOUN"
    return [
        Token(m.group(), " " if m.end() < len(text) and text[m.end()].isspace() else "", p)
        for m, p in zip(matches, pos)
    ]


def _fallback_pos(word: str) -> str:
    w = word.lower()
    if not any(c.isalnum() for c in w):
        return "PUNCT"
    if w[0].isdigit():
        return "NUM"
    for pos, words in (("DET", _DETERMINERS), ("ADP", _ADPOSITIONS), ("AUX", _AUXILIARIES), ("X", _OTHER)):
        if w in words:
            return pos
    if w.startswith("'") or w == "n't":
        return "PART"
    if w in _ADJECTIVES:
        return "ADJ"
    if w in _IRREGULAR_VERBS or (w not in _NOUNS_LIKE_VERBS and len(w) > 4 and w.endswith(("ing", "ed"))):
        return "VERB"
    return "NOUN"


def fallback_noun_phrases(prompt: str) -> list[str]:
    """Noun phrases without a parser: maximal DET / ADJ / NOUN runs of the fallback tokens, cut at the head.

    A new determiner starts a new phrase; "and" or "," joins two adjectives ("a black and white cat") and
    otherwise splits; an ``-ing`` / ``-ed`` word between a phrase and a noun is a modifier ("a circular dining
    table"); the head is the last NOUN, or a final adjective after another word ("a red orange", "a traffic
    light"). On "<phrase> and <phrase>" prompts this gives spaCy's ``noun_chunks`` unless spaCy mis-parses.
    """
    tokens = fallback_tokens(prompt)
    phrases: list[list[Token]] = []
    current: list[Token] = []
    for i, tok in enumerate(tokens):
        prev = tokens[i - 1].pos if i else None
        nxt = tokens[i + 1].pos if i + 1 < len(tokens) else None
        joins_adjectives = tok.text in ("and", ",") and prev == "ADJ" and nxt == "ADJ"
        modifier = tok.pos == "VERB" and tok.text.lower() not in _IRREGULAR_VERBS and nxt in ("NOUN", "ADJ")
        if tok.pos in ("ADJ", "NOUN", "NUM") or ((joins_adjectives or modifier) and current):
            current.append(tok)
        elif tok.pos == "DET":
            phrases.append(current)
            current = [tok]
        else:
            phrases.append(current)
            current = []
    phrases.append(current)
    out = []
    for phrase in phrases:
        content = [i for i, t in enumerate(phrase) if t.pos in ("NOUN", "ADJ", "NUM")]
        heads = [i for i in content if phrase[i].pos == "NOUN"]
        if heads:
            end = heads[-1]
            if content[-1] > end and phrase[content[-1]].pos == "ADJ":  # "a traffic light": light is the head
                end = content[-1]
        elif len(content) >= 2 and phrase[content[-1]].pos == "ADJ":  # "a red orange"
            end = content[-1]
        else:
            continue
        out.append(span_text(phrase[: end + 1]))
    return [p for p in out if p not in BLIP_SKIPPED_CHUNKS]


def fallback_spatial_objects(prompt: str, vocabulary: Sequence[str]) -> tuple[str | None, str | None]:
    """(object 1, object 2) of a "<a X> <relation> <a Y>" prompt without a tagger.

    The last word before the relation and the last word of the prompt: spaCy's first / last NOUN on every
    spatial and 3-D val prompt.
    """
    locality = first_locality(prompt, vocabulary)
    if locality is None:
        return (None, None)
    left, _, right = prompt.partition(locality)
    words1, words2 = re.findall(r"[A-Za-z]+", left), re.findall(r"[A-Za-z]+", right)
    return (words1[-1] if words1 else None, words2[-1] if words2 else None)


def simple_spatial_objects(tokens: Sequence[Token]) -> tuple[str | None, str | None]:
    """(first NOUN, last NOUN) of a spatial / 3-D prompt, as the official scripts pick them, or Nones."""
    nouns = [t.text for t in tokens if t.pos == "NOUN"]
    return (nouns[0], nouns[-1]) if nouns else (None, None)


def first_locality(prompt: str, vocabulary: Sequence[str]) -> str | None:
    """The first relation word of ``vocabulary`` found in the prompt (plain substring test)."""
    return next((w for w in vocabulary if w in prompt), None)


class PromptParser:
    """What the rules need from spaCy ``en_core_web_sm``, with the documented fallback when it is missing.

    ``nlp``: "auto" (spaCy if ``spacy_model`` loads, else the fallback), "spacy" (required), "fallback",
    or a spaCy ``Language`` (any callable returning a Doc). ``name`` records which one is in use.
    """

    def __init__(self, nlp: object = "auto", spacy_model: str = "en_core_web_sm") -> None:
        self._nlp = None
        if nlp in ("auto", "spacy"):
            try:
                import spacy

                self._nlp = spacy.load(spacy_model)
            except (ImportError, OSError) as e:
                if nlp == "spacy":
                    raise OSError(
                        f"T2I-CompBench parses prompts with spaCy {spacy_model!r}, which could not be loaded "
                        f"({type(e).__name__}: {e}). Install it (`pip install flowopd[compbench]` and "
                        f"`python -m spacy download {spacy_model}`), or pass nlp='fallback' to use the "
                        f"documented approximation"
                    ) from e
        elif callable(nlp):
            self._nlp = nlp
        elif nlp != "fallback":
            raise ValueError(f"nlp must be 'auto', 'spacy', 'fallback' or a spaCy Language, got {nlp!r}")
        meta = getattr(self._nlp, "meta", None) or {}
        model = (
            f"{meta.get('lang', '')}_{meta['name']}-{meta.get('version', '')}"
            if "name" in meta
            else spacy_model
        )
        self.name = "fallback" if self._nlp is None else f"spacy:{model}"
        self._docs: dict[str, object] = {}

    @property
    def uses_spacy(self) -> bool:
        return self._nlp is not None

    def _doc(self, prompt: str) -> object:
        if prompt not in self._docs:  # ten images share a prompt: parse it once
            if len(self._docs) >= 4096:  # bounded: a training run sees many prompts
                self._docs.clear()
            self._docs[prompt] = self._nlp(prompt)
        return self._docs[prompt]

    def tokens(self, prompt: str) -> list[Token]:
        """The prompt's tokens with spaCy's text, whitespace and coarse POS (or the fallback's)."""
        if self._nlp is None:
            return fallback_tokens(prompt)
        return [Token(t.text, t.whitespace_, t.pos_) for t in self._doc(prompt)]

    def noun_phrases(self, prompt: str) -> list[str]:
        """spaCy ``noun_chunks`` texts (or :func:`fallback_noun_phrases`)."""
        if self._nlp is None:
            return fallback_noun_phrases(prompt)
        return [chunk.text for chunk in self._doc(prompt).noun_chunks]

    def spatial_objects(self, prompt: str, vocabulary: Sequence[str]) -> tuple[str | None, str | None]:
        """(first NOUN, last NOUN) with spaCy, else :func:`fallback_spatial_objects`."""
        if self._nlp is None:
            return fallback_spatial_objects(prompt, vocabulary)
        return simple_spatial_objects(self.tokens(prompt))
