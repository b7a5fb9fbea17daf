"""The tokenizer of a GGUF export: copied from the GGUF file the checkpoint came from, or built from its
``tokenizer.json`` as llama.cpp's converter builds a vocabulary (byte-level BPE as ``gpt2``, SentencePiece BPE as
``llama``), so that llama.cpp needs nothing else.

    >>> writer = gguf.GGUFWriter("out.gguf", "llama")                                # doctest: +SKIP
    >>> add_vocab(writer, Path("artifacts/run1/model"), embedded_gguf(), 49152)      # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from pathlib import Path

import gguf

from llamaprune.core.errors import UsageError

log = logging.getLogger(__name__)

TOKENIZER_KEYS = "tokenizer."
SPACE = "\u2581"  # SentencePiece's space
BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")  # SentencePiece's byte-fallback pieces
# llama.cpp picks its pre-tokenizer (the regex that splits text before BPE) by the name in tokenizer.ggml.pre;
# its converter finds that name by hashing the token ids of this text. The common BPE families, from
# convert_hf_to_gguf.py's get_vocab_base_pre; any other tokenizer gets "default".
CHECK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
    "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you "
    "sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
}


def add_vocab(writer: gguf.GGUFWriter, checkpoint: Path, source_gguf: Path | None, vocab_size: int) -> str:
    """Write the tokenizer metadata; returns where it came from (for the log)."""
    if source_gguf is not None:
        copy_vocab(writer, source_gguf, vocab_size)
        return str(source_gguf)
    build_vocab(writer, checkpoint, vocab_size)
    return str(checkpoint / "tokenizer.json")


def copy_vocab(writer: gguf.GGUFWriter, source: Path, vocab_size: int) -> None:
    """Every ``tokenizer.*`` key of ``source`` as it is: llama.cpp wrote them for this very vocabulary."""
    reader = gguf.GGUFReader(source)
    fields = [field for name, field in reader.fields.items() if name.startswith(TOKENIZER_KEYS)]
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is None or len(tokens.data) != vocab_size:
        found = 0 if tokens is None else len(tokens.data)
        raise UsageError(
            f"{source} has {found} tokens, the checkpoint {vocab_size}; export a checkpoint with its own "
            f"tokenizer.json instead"
        )
    for field in fields:
        main = field.types[0]
        sub = field.types[-1] if main == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), main, sub)


def build_vocab(writer: gguf.GGUFWriter, checkpoint: Path, vocab_size: int) -> None:
    """The vocabulary of ``tokenizer.json`` as the checkpoint's transformers tokenizer loads it: byte-level BPE
    (LLaMA-3, SmolLM2) as llama.cpp's ``gpt2`` model, SentencePiece BPE with byte fallback (LLaMA-2, Mistral,
    TinyLlama) as its ``llama`` model; any other kind is refused."""
    from transformers import AutoTokenizer

    if not (checkpoint / "tokenizer.json").is_file():
        raise UsageError(f"{checkpoint} has no tokenizer.json; copy the tokenizer files of its source model into it")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    pipeline = json.loads(tokenizer.backend_tokenizer.to_str())
    model = pipeline["model"]
    if model["type"] == "BPE" and "ByteLevel" in {step["type"] for step in _steps(pipeline["pre_tokenizer"])}:
        build_byte_level_vocab(writer, checkpoint, tokenizer, vocab_size)
    elif model["type"] == "BPE" and model.get("byte_fallback"):
        build_sentencepiece_vocab(writer, checkpoint, tokenizer, pipeline, vocab_size)
    else:
        kind = "BPE without byte fallback or byte-level pre-tokenizer" if model["type"] == "BPE" else model["type"]
        raise UsageError(
            f"{checkpoint}/tokenizer.json is a {kind} tokenizer; export supports byte-level BPE (LLaMA-3, SmolLM2) "
            f"and SentencePiece BPE with byte fallback (LLaMA-2, Mistral)"
        )


def build_byte_level_vocab(writer: gguf.GGUFWriter, checkpoint: Path, tokenizer, vocab_size: int) -> None:
    """A ``gpt2`` vocabulary: tokens by id (ids the tokenizer lacks become unused ``[PADn]``), added special tokens
    as control tokens, merges, the pre-tokenizer's name, special ids and the chat template."""
    tokens, types = token_list(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    add_special_vocab(writer, checkpoint, tokenizer, vocab_size, merges=True)


def build_sentencepiece_vocab(writer: gguf.GGUFWriter, checkpoint: Path, tokenizer, pipeline: dict,
                              vocab_size: int) -> None:
    """A ``llama`` vocabulary, what llama.cpp's converter writes from ``tokenizer.model``, here from tokenizer.json:
    that is what transformers runs (added tokens and edits included), the file transformers 5 re-saves into every
    checkpoint ``llamaprune apply`` writes (tokenizer.model is not always there), and it needs no sentencepiece.
    Tokens by id, scores from the merges (``merge_scores``), types (byte ``<0xNN>`` pieces, the unknown token,
    added tokens as control or user-defined), ``add_space_prefix``, special ids, add_bos / add_eos and the chat
    template."""
    add_space_prefix = space_prefix(pipeline, checkpoint)
    tokens, types = token_list(tokenizer, vocab_size, sentencepiece=True)
    bytes_found = {token for token, kind in zip(tokens, types, strict=True) if kind == gguf.TokenType.BYTE}
    if len(bytes_found) != 256:
        raise UsageError(
            f"{checkpoint}/tokenizer.json has {len(bytes_found)} of the 256 byte pieces <0x00>..<0xFF> within the "
            f"model's {vocab_size} ids; llama.cpp's SentencePiece tokenizer needs all of them for its byte fallback"
        )
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in pipeline["model"]["merges"]]
    unmatched = merge_mismatches(tokens, types, merges)
    if unmatched:
        log.warning("llama.cpp may split some words unlike transformers: %d places where the merges do not follow "
                    "token scores (e.g. %s)", len(unmatched), unmatched[0])
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(merge_scores(tokens, merges))
    writer.add_token_types(types)
    writer.add_add_space_prefix(add_space_prefix)
    add_special_vocab(writer, checkpoint, tokenizer, vocab_size, merges=False)


def add_special_vocab(writer: gguf.GGUFWriter, checkpoint: Path, tokenizer, vocab_size: int, merges: bool) -> None:
    """Special ids, the chat template (and the merges) as gguf's SpecialVocab reads them for llama.cpp's converter;
    add_bos / add_eos from what the tokenizer adds around a text, which llama.cpp would otherwise take from its own
    defaults (a ``llama`` model adds BOS) wherever SpecialVocab cannot read the post-processor. Its warning about
    the separator of a pair template (``<s> $A <s> $B``, LLaMA-2's) is dropped: llama.cpp encodes single texts."""

    def not_pair_separator(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Unknown separator token")

    vocab_log = logging.getLogger("gguf.vocab")
    vocab_log.addFilter(not_pair_separator)
    try:
        special = gguf.SpecialVocab(checkpoint, load_merges=merges, n_vocab=vocab_size)
    finally:
        vocab_log.removeFilter(not_pair_separator)
    bos, eos = added_around(tokenizer, checkpoint)
    special.add_special_token.update(bos=bos, eos=eos)
    special.add_to_gguf(writer, quiet=True)


def added_around(tokenizer, checkpoint: Path) -> tuple[bool, bool]:
    """Whether the tokenizer puts BOS before and EOS after a text: the only tokens llama.cpp can add."""
    bare = tokenizer("a b", add_special_tokens=False)["input_ids"]
    full = tokenizer("a b")["input_ids"]
    start = next((i for i in range(len(full) - len(bare) + 1) if full[i:i + len(bare)] == bare), None)
    before, after = ([], []) if start is None else (full[:start], full[start + len(bare):])
    if start is None or before not in ([], [tokenizer.bos_token_id]) or after not in ([], [tokenizer.eos_token_id]):
        raise UsageError(
            f"the tokenizer of {checkpoint} turns 'a b' into {full} ({bare} without special tokens); llama.cpp can "
            f"add only a BOS before and an EOS after a text"
        )
    return bool(before), bool(after)


def token_list(tokenizer, vocab_size: int, sentencepiece: bool = False) -> tuple[list[str], list[gguf.TokenType]]:
    """Tokens by id and their llama.cpp types: unused ``[PADn]`` for ids the tokenizer lacks, control / user-defined
    for added special / other tokens; with ``sentencepiece``, also the unknown token and the ``<0xNN>`` byte pieces."""
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    T = gguf.TokenType
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(T.UNUSED)
            continue
        token = by_id[index]
        tokens.append(token)
        if sentencepiece and index == tokenizer.unk_token_id:
            types.append(T.UNKNOWN)
        elif index in added:
            types.append(T.CONTROL if added[index].special else T.USER_DEFINED)
        elif sentencepiece and BYTE_PIECE.fullmatch(token):
            types.append(T.BYTE)
        else:
            types.append(T.NORMAL)
    return tokens, types


def merge_scores(tokens: list[str], merges: list[tuple[str, str]]) -> list[float]:
    """Token scores under which llama.cpp's SentencePiece tokenizer merges as transformers' BPE does. llama.cpp
    (src/llama-vocab.cpp, llm_tokenizer_spm_session) joins, of all adjacent pieces whose concatenation is a token,
    the pair whose token scores highest, the leftmost on a tie; BPE joins the listed pair of lowest rank, the
    leftmost on a tie. A token scores minus the rank of the first merge that makes it, so both pick the same pair
    wherever each token's merges are consecutive ranks and every two-piece split of a token is a merge
    (``merge_mismatches``), as in every tokenizer.json converted from a SentencePiece model. Tokens no merge makes
    (single characters, bytes, special and unused tokens) score below all others."""
    first: dict[str, int] = {}
    for rank, (left, right) in enumerate(merges):
        first.setdefault(left + right, rank)
    floor = -float(len(merges))
    return [-float(first[token]) if token in first else floor for token in tokens]


def merge_mismatches(tokens: list[str], types: list[gguf.TokenType], merges: list[tuple[str, str]]) -> list[str]:
    """Where ``merge_scores`` cannot reproduce the merges: a normal token that splits into two normal tokens with no
    merge for that pair (llama.cpp would join them, BPE not), or a token whose merges are not consecutive ranks."""
    listed = set(merges)
    normal = {token for token, kind in zip(tokens, types, strict=True) if kind == gguf.TokenType.NORMAL}
    out = [f"{token[:i]!r} + {token[i:]!r} has no merge" for token in normal for i in range(1, len(token))
           if token[:i] in normal and token[i:] in normal and (token[:i], token[i:]) not in listed]
    done: set[str] = set()
    previous = None
    for left, right in merges:
        token = left + right
        if token != previous:
            if token in done:
                out.append(f"the merges making {token!r} are not consecutive")
            if previous is not None:
                done.add(previous)
            previous = token
    return out


def space_prefix(pipeline: dict, checkpoint: Path) -> bool:
    """Whether the tokenizer puts ``▁`` before the text (llama.cpp's ``add_space_prefix``). llama.cpp's
    SentencePiece tokenizer writes spaces as ``▁`` over the whole text and may prefix one ``▁``; the pipelines that
    do just that are a Metaspace pre-tokenizer that does not split (transformers' LlamaTokenizer) or Replace and
    Prepend normalizers (tokenizer.json files of LLaMA-2's converter). Anything else is refused."""
    escaped, prefix = False, False
    for step in _steps(pipeline["normalizer"]) + _steps(pipeline["pre_tokenizer"]):
        if step["type"] == "Metaspace" and step["replacement"] == SPACE and not step.get("split", True):
            escaped, prefix = True, prefix or step.get("prepend_scheme", "always") != "never"
        elif step["type"] == "Replace" and step["pattern"] == {"String": " "} and step["content"] == SPACE:
            escaped = True
        elif step["type"] == "Prepend" and step["prepend"] == SPACE:
            prefix = True
        else:
            escaped = False
            break
    if not escaped:
        raise UsageError(
            f"{checkpoint}/tokenizer.json has a normalizer or pre-tokenizer llama.cpp's SentencePiece tokenizer "
            f"cannot follow ({_describe(pipeline)}); export supports spaces written as {SPACE} over the whole text "
            f"(Metaspace without split, or Replace), with or without a {SPACE} prefix"
        )
    return prefix


def _steps(component: dict | None) -> list[dict]:
    """A normalizer or pre-tokenizer as its list of steps (a Sequence flattened, none for null)."""
    if component is None:
        return []
    if component["type"] == "Sequence":
        inner = component.get("normalizers", component.get("pretokenizers", []))
        return [step for part in inner for step in _steps(part)]
    return [component]


def _describe(pipeline: dict) -> str:
    steps = [step["type"] for step in _steps(pipeline["normalizer"]) + _steps(pipeline["pre_tokenizer"])]
    return ", ".join(steps) or "neither"


def pre_tokenizer(tokenizer) -> str:
    digest = hashlib.sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    name = PRE_TOKENIZERS.get(digest, "default")
    if name == "default":
        log.info("the tokenizer's pre-tokenizer is not one llamaprune knows; llama.cpp will use its default")
    return name
