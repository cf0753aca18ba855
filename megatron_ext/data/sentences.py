"""`--split-sentences`: NLTK's punkt splitter, as Megatron-LM's preprocess_data.py uses it.

Each sentence becomes one sequence of the document in the `.idx` (Megatron's sentence-level
datasets, `PREFIX_{key}_sentence`). The punkt model is read from the NLTK data path (NLTK_DATA)
and never downloaded here: preprocessing runs on machines without network access, and a
download in every worker would race.
"""

from typing import List

# Megatron-LM splits very long documents into slices of this many characters before punkt.
SLICE = 1_000_000

INSTALL_HINT = ("pip install nltk, then install the punkt data once: python -m nltk.downloader "
                "punkt_tab (or put tokenizers/punkt_tab/LANG/ under a directory in NLTK_DATA)")


def _keep_newlines_vars(base):
    """Language variables whose sentence boundary keeps the whitespace after the end
    character with the sentence, so newlines between sentences survive (`--keep-newlines`)."""

    class KeepNewlines(base):
        _period_context_fmt = r"""
            \S*                    # the end of the last word
            %(SentEndChars)s       # a sentence-ending character
            \s*                    # the whitespace after it stays in this sentence
            (?=(?P<after_tok>
                %(NonWord)s        # punctuation follows
                |
                (?P<next_tok>\S+)  # or the next sentence's first token
            ))"""

    return KeepNewlines()


class SentenceSplitter:
    def __init__(self, lang: str = "english", keep_newlines: bool = False):
        try:
            from nltk.tokenize import punkt
        except ImportError:
            raise ValueError(f"--split-sentences needs NLTK: {INSTALL_HINT}") from None
        try:
            loaded = punkt.PunktTokenizer(lang)
        except (LookupError, ValueError, OSError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"--split-sentences --lang {lang}: no punkt model found ({first}); "
                             f"{INSTALL_HINT}") from None
        if keep_newlines:
            self._punkt = punkt.PunktSentenceTokenizer(
                loaded._params, lang_vars=_keep_newlines_vars(punkt.PunktLanguageVars))
        else:
            self._punkt = loaded

    def split(self, text: str) -> List[str]:
        return [sentence for start in range(0, len(text), SLICE)
                for sentence in self._punkt.tokenize(text[start:start + SLICE])]
