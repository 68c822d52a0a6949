"""Caption -> detection queries: CLOC's noun-phrase recipe.

Lowercase; tag parts of speech; chunk `NP: {<DT>?<JJ.*>*<NN.*>+}` (nltk.RegexpParser); drop the
determiner, phrases whose head noun is generic ("image", "background") and all-stopword phrases;
keep at most 20 distinct queries. Tagging uses NLTK's perceptron tagger when its data is installed
(`python -m nltk.downloader averaged_perceptron_tagger_eng`), else a small built-in lexicon tagger that
is good enough for short descriptive captions.
"""

import re
from collections.abc import Callable

import nltk

GRAMMAR = "NP: {<DT>?<JJ.*>*<NN.*>+}"


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


MAX_QUERIES = 20
GENERIC = _words(
    "image images photo photos picture pictures view background foreground thing things something front side top "
    "bottom left right middle center centre closeup shot scene stock illustration vector style color colour day time "
    "way lot kind type part piece area"
)
DETERMINERS = _words("a an the this that these those some any each every another")
# Words the built-in tagger must not call nouns: function words and common verbs of captions.
FUNCTION_WORDS = _words(
    "and or but of in on at to from with without by for over under above below near next beside between behind "
    "into onto off out up down is are was were be being been has have had do does did it its it's they them their "
    "there here he she his her we our you your i my me as while who which what where when than then very not no "
    "holding sitting standing lying walking running looking wearing playing showing shows show made using"
)
ADJECTIVES = _words(
    "red green blue yellow purple orange white black cyan pink brown grey gray gold silver dark bright large "
    "small big little tall short long old new young wooden metal plastic empty full"
)
Tagger = Callable[[list[str]], list[tuple[str, str]]]


def builtin_tagger(words: list[str]) -> list[tuple[str, str]]:
    """A lexicon tagger: determiners, function words, adjectives and -ly adverbs by list; numbers CD;
    everything else a noun."""

    def tag(word: str) -> str:
        if word in DETERMINERS:
            return "DT"
        if word in FUNCTION_WORDS or not word.isalnum():
            return "IN"
        if word in ADJECTIVES:
            return "JJ"
        if word.isdigit():
            return "CD"
        if word.endswith("ly"):
            return "RB"
        return "NN"

    return [(w, tag(w)) for w in words]


def default_tagger() -> Tagger:
    """NLTK's perceptron tagger when its data is installed, else `builtin_tagger`."""
    try:
        nltk.pos_tag(["a", "test"])
        return nltk.pos_tag
    except LookupError:
        return builtin_tagger


def extract_phrases(caption: str, tagger: Tagger | None = None, max_queries: int = MAX_QUERIES) -> list[str]:
    """'A large red circle left of a small blue square.' -> ['large red circle', 'small blue square']."""
    words = re.findall(r"[a-z0-9]+(?:['-][a-z0-9]+)*|[^\sa-z0-9]", caption.lower())
    if not words:
        return []
    tree = nltk.RegexpParser(GRAMMAR).parse((tagger or default_tagger())(words))
    phrases: list[str] = []
    for subtree in tree.subtrees(lambda t: t.label() == "NP"):
        tokens = [w for w, tag in subtree.leaves() if tag != "DT"]
        if not tokens or tokens[-1] in GENERIC or all(w in FUNCTION_WORDS | DETERMINERS for w in tokens):
            continue
        phrase = " ".join(tokens)
        if phrase not in phrases:
            phrases.append(phrase)
    return phrases[:max_queries]
