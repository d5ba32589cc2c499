"""A word-level tokenizer built in code, for random-init LLMs trained on the shapes world (no downloads)."""

from __future__ import annotations

import re
from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>")

# The pieces the Whitespace pre-tokenizer splits text into: a run of word characters, or of punctuation.
WORD, PUNCTUATION = r"\w+", r"[^\w\s]+"


def word_normalizer(vocabulary: Iterable[str]) -> normalizers.Normalizer:
    """What makes case and punctuation leave known words known ("A Red circle." reads "a red circle")
    while every token of ``vocabulary`` keeps its id: a word or punctuation run that is a token as
    written stays as written (the LI-DiT instruction's "Describe", its "," and ":"); any other word is
    lowercased (the shapes world's words are lowercase) and any other punctuation run is dropped. A piece
    these change was <unk> before, so a lowercase prompt without punctuation, every shapes caption among
    them, gets the ids it always got."""
    words = set(vocabulary)
    cased = sorted(w for w in words if re.fullmatch(WORD, w) and w != w.lower())
    marks = sorted((w for w in words if re.fullmatch(PUNCTUATION, w)), key=len, reverse=True)
    # Lowercase() takes the whole text, so a cased token is swapped for a caseless stand-in (private-use
    # characters, which no prompt of the shapes world holds) around it and put back after.
    stand_ins = [f"\ue000{i}\ue001" for i in range(len(cased))]
    steps = [normalizers.Replace(Regex(rf"(?<!\w){re.escape(w)}(?!\w)"), s) for w, s in zip(cased, stand_ins)]
    steps.append(normalizers.Lowercase())
    steps += [normalizers.Replace(s, w) for w, s in zip(cased, stand_ins)]
    # A whole punctuation run (nothing of it just before), unless it is exactly a token.
    known = f"(?!(?:{'|'.join(map(re.escape, marks))})(?![^\\w\\s]))" if marks else ""
    steps.append(normalizers.Replace(Regex(rf"(?<![^\w\s]){known}{PUNCTUATION}"), " "))
    return normalizers.Sequence(steps)


def word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """Ids: <pad>=0, <eos>=1, <bos>=2, <unk>=3 (Gemma's layout), then ``words`` in order. Adds <bos>.
    Case and punctuation do not turn a known word into <unk> (``word_normalizer``)."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = word_normalizer(vocab)
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="right",
    )


def add_word_normalizer(tokenizer) -> None:
    """Give a built-in word tokenizer read from a pipeline folder exported before it had its normalizer
    (tokenizer.json keeps the one it was saved with) the one ``word_tokenizer`` builds now, so that such a
    folder reads prompts as its run and a newer export do."""
    tokenizer.backend_tokenizer.normalizer = word_normalizer(tokenizer.backend_tokenizer.get_vocab())


def unknown_words(tokenizer, texts: list[str]) -> list[str]:
    """The words of ``texts`` (as written) that a word tokenizer reads as its unknown token, each once, in
    order of appearance."""
    unk = tokenizer.unk_token_id
    found: dict[str, None] = {}
    for text, encoding in zip(
        texts, tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    ):
        for token, (start, end) in zip(encoding.ids, encoding.offsets):
            if token == unk:
                found.setdefault(text[start:end])
    return list(found)
