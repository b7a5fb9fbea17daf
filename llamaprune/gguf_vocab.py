"""The tokenizer of a GGUF export: copied from the GGUF file the checkpoint came from, or built from its
``tokenizer.json`` as llama.cpp's converter builds a BPE vocabulary, so that llama.cpp needs nothing else.

    >>> writer = gguf.GGUFWriter("out.gguf", "llama")                                # doctest: +SKIP
    >>> add_vocab(writer, Path("artifacts/run1/model"), embedded_gguf(), 49152)      # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import gguf

from llamaprune.errors import UsageError

log = logging.getLogger(__name__)

TOKENIZER_KEYS = "tokenizer."
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
    """A ``gpt2`` (byte-level BPE) vocabulary from tokenizer.json: tokens by id (ids the tokenizer lacks become
    unused ``[PADn]``), added special tokens as control tokens, merges, special ids and the chat template."""
    from transformers import AutoTokenizer

    if not (checkpoint / "tokenizer.json").is_file():
        raise UsageError(f"{checkpoint} has no tokenizer.json; copy the tokenizer files of its source model into it")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = tokenizer.backend_tokenizer.to_str()
    if '"type":"BPE"' not in model.replace(" ", ""):
        raise UsageError(f"{checkpoint}/tokenizer.json is not a BPE tokenizer; export supports byte-level BPE only")
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[index])
        if index in added:
            types.append(gguf.TokenType.CONTROL if added[index].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(checkpoint, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)


def pre_tokenizer(tokenizer) -> str:
    digest = hashlib.sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    name = PRE_TOKENIZERS.get(digest, "default")
    if name == "default":
        log.info("the tokenizer's pre-tokenizer is not one llamaprune knows; llama.cpp will use its default")
    return name
