"""The embedded model's prompts: digit words, colours, the template, paraphrases, and the
small CLIP tokenizer whose vocabulary encodes every word of them as one token."""

from __future__ import annotations

import functools

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
COLOURS = ["red", "green", "blue", "white"]
COLOUR_RGB = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0), "white": (1.0, 1.0, 1.0)}

PROMPT_TEMPLATE = "a {colour} handwritten digit {word}"
# Paraphrases naming both the digit and the colour ({numeral} is "7" for seven).
FULL_PARAPHRASES = (
    "the number {numeral} in {colour}",
    "a {colour} {word}",
    "a handwritten {word} in {colour}",
    "{colour} digit {numeral}",
)
# Paraphrases naming only one of the two: the model learns to fill in the other.
DIGIT_PARAPHRASES = ("a handwritten {word}", "digit {numeral}", "a {word}", "the number {word}")
COLOUR_PARAPHRASES = ("a {colour} digit", "a {colour} handwritten digit")
_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
_BASE_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"


def prompt_for(digit: int, colour: str) -> str:
    """The canonical prompt, e.g. ``prompt_for(7, "red") == "a red handwritten digit seven"``."""
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; choose from {COLOURS}")
    return PROMPT_TEMPLATE.format(colour=colour, word=DIGIT_WORDS[digit])


def _fill(template: str, digit: int, colour: str) -> str:
    return template.format(colour=colour, word=DIGIT_WORDS[digit], numeral=str(digit))


def paraphrases_for(digit: int, colour: str, kind: str = "full") -> list[str]:
    """Trained paraphrases of `prompt_for(digit, colour)`: kind "full", "digit", "colour" or "all"."""
    templates = {
        "full": FULL_PARAPHRASES,
        "digit": DIGIT_PARAPHRASES,
        "colour": COLOUR_PARAPHRASES,
        "all": FULL_PARAPHRASES + DIGIT_PARAPHRASES + COLOUR_PARAPHRASES,
    }[kind]
    return [_fill(t, digit, colour) for t in templates]


def training_prompts() -> list[str]:
    """Every distinct prompt the UNet sees in training, the empty prompt first."""
    prompts = [""]
    for digit in range(10):
        for colour in COLOURS:
            prompts += [prompt_for(digit, colour)] + paraphrases_for(digit, colour, "all")
    return list(dict.fromkeys(prompts))


# ----------------------------------------------------------------------------- tokenizer


def vocabulary_words() -> list[str]:
    """The whole words of the vocabulary; each one encodes to exactly one token."""
    words = [w for prompt in training_prompts() for w in prompt.split()]
    return list(dict.fromkeys(words + COLOURS + DIGIT_WORDS))


def build_tokenizer():
    """A CLIPTokenizer over the project's own small byte-pair vocabulary.

    Base symbols (letters, numerals, a little punctuation, with and without the CLIP
    end-of-word marker ``</w>``) keep any lowercase text free of unknown tokens; merges are
    added until every vocabulary word is a single token.
    """
    from transformers import CLIPTokenizer

    vocab, merges = _vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=77)


@functools.lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    from transformers import CLIPTokenizer

    vocab = {token: i for i, token in enumerate(_SPECIAL_TOKENS)}
    for char in _BASE_CHARS:
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    # Why iterate: merging the first two pieces of every word still split, appended at the
    # lowest priority, can never change a word that is already one token, so this converges.
    for _ in range(64):
        tokenizer = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=77)
        split = [tokenizer.tokenize(w) for w in vocabulary_words()]
        split = [pieces for pieces in split if len(pieces) > 1]
        if not split:
            return tuple(vocab.items()), tuple(merges)
        for pieces in split:
            pair = (pieces[0], pieces[1])
            if pair not in merges:
                merges.append(pair)
                vocab.setdefault(pair[0] + pair[1], len(vocab))
    raise RuntimeError("tokenizer merges did not converge")


def unknown_tokens(tokenizer, prompt: str) -> list[str]:
    """Pieces of `prompt` that the tokenizer maps to its unknown token."""
    vocab = tokenizer.get_vocab()
    return [piece for piece in tokenizer.tokenize(prompt) if piece not in vocab or piece == tokenizer.unk_token]


def build_t5_tokenizer(model_max_length: int = 77):
    """A T5 tokenizer (what SD3's third and Flux's second text encoder read) over the same words,
    built offline: a SentencePiece-style Unigram model whose pieces are every vocabulary word
    (one token each, as the CLIP tokenizer's) plus single characters, so that any lowercase text
    encodes without unknown pieces. Ids as T5's: <pad> 0, </s> 1, <unk> 2; </s> ends every prompt."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + w, -1.0) for w in vocabulary_words()]
    pieces += [("\u2581", -5.0)] + [(c, -10.0) for c in _BASE_CHARS]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           model_max_length=model_max_length, extra_ids=0)
