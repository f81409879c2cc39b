"""Tokenizer for DeepSeek-V4: the checkpoint's own tokenizer.json through the `tokenizers` library.

The chat template (model/chat.py) writes special tokens as text, e.g. `<｜User｜>`; the tokenizer
must turn each into its single id, and decoding must keep them so tool calls can be parsed.
`build_synthetic_tokenizer` makes a small but real byte-level BPE tokenizer carrying the same
special tokens, so synthetic checkpoints run the full text path (template -> ids -> text -> parse).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from ascend.errors import AscendDeployError, read_json_object

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"
LATEST_REMINDER = "<｜latest_reminder｜>"
TASK_TOKENS = ("<｜action｜>", "<｜query｜>", "<｜authority｜>", "<｜domain｜>", "<｜title｜>",
               "<｜read_url｜>", "<｜extracted_url｜>")

# Order fixes the synthetic ids: BOS = 0 and EOS = 1 as in every V4 config.json.
SPECIAL_TOKENS = (BOS, EOS, PAD, USER, ASSISTANT, THINK_START, THINK_END, DSML, LATEST_REMINDER,
                  *TASK_TOKENS)


class TokenizerError(AscendDeployError):
    """A tokenizer file is missing, unreadable or lacks a token the model needs."""


@dataclass
class Tokenizer:
    """A `tokenizers.Tokenizer` plus the BOS/EOS ids generation needs."""

    backend: tokenizers.Tokenizer
    bos_id: int
    eos_id: int

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Ids of `text`; adds no BOS (the chat template writes it)."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Tokenizer from a checkpoint directory (tokenizer.json [+ tokenizer_config.json]) or a tokenizer.json."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file() or file.stat().st_size == 0:
        raise TokenizerError(f"{file}: expected a tokenizer.json (tokenizers format), found none or an empty file")
    try:
        backend = tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:  # the library raises a bare Exception on malformed JSON
        raise TokenizerError(f"{file}: not a readable tokenizers file ({e})") from None
    bos, eos = _bos_eos_from_config(file.parent / "tokenizer_config.json")
    ids = {tok: backend.token_to_id(tok) for tok in (bos, eos)}
    missing = [tok for tok, i in ids.items() if i is None]
    if missing:
        raise TokenizerError(f"{file}: expected special tokens {missing} in the vocabulary")
    return Tokenizer(backend, ids[bos], ids[eos])


def _bos_eos_from_config(config_file: Path) -> tuple[str, str]:
    """BOS/EOS strings from tokenizer_config.json (string or AddedToken dict), else V4's defaults."""
    if not config_file.is_file():
        return BOS, EOS
    cfg = read_json_object(config_file, TokenizerError, "not a readable JSON file")

    def content(entry, default: str) -> str:
        if isinstance(entry, dict):
            return entry.get("content", default)
        return entry if isinstance(entry, str) else default

    return content(cfg.get("bos_token"), BOS), content(cfg.get("eos_token"), EOS)


# A fixed, built-in training text: the words the chat template and tool calls use plus some prose,
# so the synthetic BPE learns merges that make prompts a realistic few tokens per word.
_SYNTHETIC_CORPUS = """\
You are a helpful assistant. What is the weather like in Paris today? It is sunny and warm.
Tell me a short story about a robot who learns to paint. Once upon a time there was a robot.
The quick brown fox jumps over the lazy dog. Please summarise the following text in one sentence.
## Tools
You have access to a set of tools to help answer the user's question. You can invoke tools by writing
a tool_calls block. invoke name parameter string="true" string="false" </invoke> </parameter>
<tool_result>{"temperature": 21, "unit": "celsius", "city": "Paris"}</tool_result>
### Available Tool Schemas
{"name": "get_weather", "description": "Get the current weather", "parameters": {"type": "object",
"properties": {"city": {"type": "string"}}, "required": ["city"]}}
Reasoning Effort: think step by step before you answer. The answer is 4 because 2 + 2 = 4.
def main():\n    print("hello world")\n    return 0\n
0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 3.14 -1 true false null [] {} () <> ## ### ** -- ==
"""


def build_synthetic_tokenizer(vocab_size: int) -> tokenizers.Tokenizer:
    """A deterministic byte-level BPE tokenizer with V4's special tokens, at most `vocab_size` entries.

    Ids 0 and 1 are BOS and EOS; every byte has a token, so any text encodes; merges are learned
    from a fixed built-in text, so the same `vocab_size` always gives the same file.
    """
    minimum = len(SPECIAL_TOKENS) + 256
    if vocab_size < minimum:
        raise TokenizerError(f"vocab_size={vocab_size}: a byte-level tokenizer with V4's special tokens "
                             f"needs at least {minimum}")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        special_tokens=list(SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_SYNTHETIC_CORPUS.splitlines(), trainer=trainer)
    return tok


def write_synthetic_tokenizer(path: str | Path, vocab_size: int) -> Path:
    """Write tokenizer.json + tokenizer_config.json (official fields) into directory `path`; returns the json path.

    `path` may also be a file name ending in `.json`; the config then goes next to it.
    """
    path = Path(path)
    file = path if path.suffix == ".json" else path / "tokenizer.json"
    file.parent.mkdir(parents=True, exist_ok=True)
    build_synthetic_tokenizer(vocab_size).save(str(file))
    config = {"add_bos_token": False, "add_eos_token": False, "bos_token": BOS, "eos_token": EOS,
              "pad_token": EOS, "clean_up_tokenization_spaces": False, "model_max_length": 1048576,
              "tokenizer_class": "PreTrainedTokenizerFast"}
    (file.parent / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return file
