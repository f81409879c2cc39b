"""The synthetic tokenizer is a real tokenizers file with V4's special tokens at fixed ids."""

import json

import pytest

from model import tokenizer as tk


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tk.write_synthetic_tokenizer(tmp_path_factory.mktemp("ckpt"), vocab_size=512)
    return tk.load_tokenizer(path.parent)


def test_special_tokens_are_single_ids(tok):
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    assert tok.vocab_size <= 512
    for i, special in enumerate(tk.SPECIAL_TOKENS):
        assert tok.token_id(special) == i
        assert tok.encode(f"hello{special}world").count(i) == 1


def test_round_trip_keeps_markup_and_unicode(tok):
    text = (f"{tk.BOS}You are helpful.{tk.USER}Wetter in Zürich? 世界 🙂{tk.ASSISTANT}{tk.THINK_END}"
            f"\n\n<{tk.DSML}tool_calls>\n<{tk.DSML}invoke name=\"get_weather\">{tk.EOS}")
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == text
    assert tk.BOS not in tok.decode(ids, skip_special_tokens=True)


def test_bpe_merges_are_learned_and_deterministic():
    a, b = tk.build_synthetic_tokenizer(512), tk.build_synthetic_tokenizer(512)
    assert a.to_str() == b.to_str()
    word_ids = a.encode("assistant", add_special_tokens=False).ids
    assert len(word_ids) < len("assistant")  # merges exist, not bytes only


def test_vocab_too_small_is_a_user_error():
    with pytest.raises(tk.TokenizerError, match="vocab_size=100"):
        tk.build_synthetic_tokenizer(100)


def test_load_errors_name_the_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text("")
    with pytest.raises(tk.TokenizerError, match="tokenizer.json"):
        tk.load_tokenizer(tmp_path)


def test_config_added_token_dicts_choose_bos_eos(tmp_path):
    tk.write_synthetic_tokenizer(tmp_path, 512)
    cfg = {"bos_token": {"__type": "AddedToken", "content": tk.USER},
           "eos_token": {"__type": "AddedToken", "content": tk.ASSISTANT}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = tk.load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id) == (tok.token_id(tk.USER), tok.token_id(tk.ASSISTANT))


@pytest.mark.parametrize("text", ["{not json", "[" * 100_000, "[1, 2]"], ids=["broken", "deep", "array"])
def test_unreadable_tokenizer_config_is_one_error(tmp_path, text):
    """A tokenizer_config.json that is not a JSON object is a TokenizerError naming it (a traceback on every rank
    of `ascend run` before)."""
    tk.write_synthetic_tokenizer(tmp_path, 512)
    (tmp_path / "tokenizer_config.json").write_text(text)
    with pytest.raises(tk.TokenizerError, match="tokenizer_config.json: "):
        tk.load_tokenizer(tmp_path)
