"""V4 chat template and DSML tool calls: documented layouts, round trips, and the official reference."""

import importlib.util
import json
from pathlib import Path

import pytest

from model import chat
from model.tokenizer import load_tokenizer, write_synthetic_tokenizer

B, E, U, A = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"
D = "｜DSML｜"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather",
                                             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
CALLS = [{"id": "a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 3}'}},
         {"id": "b", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome", "ok": True}}}]
TOOL_CONVERSATION = [
    {"role": "system", "content": "S", "tools": TOOLS},
    {"role": "user", "content": "Weather?"},
    {"role": "assistant", "content": "", "reasoning_content": "use the tool", "tool_calls": CALLS},
    {"role": "tool", "tool_call_id": "b", "content": "rome 20C"},
    {"role": "tool", "tool_call_id": "a", "content": "paris 21C"},
    {"role": "assistant", "content": "Warm.", "reasoning_content": "done"},
    {"role": "user", "content": "thanks"},
]


def test_documented_chat_and_thinking_prompts():
    msgs = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "What is 2+2?"}]
    assert chat.encode_messages(msgs, "thinking") == f"{B}You are a helpful assistant.{U}What is 2+2?{A}<think>"
    assert chat.encode_messages(msgs, "chat") == f"{B}You are a helpful assistant.{U}What is 2+2?{A}</think>"


def test_earlier_reasoning_dropped_without_tools():
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello", "reasoning_content": "greet"},
            {"role": "user", "content": "bye"}]
    assert chat.encode_messages(msgs, "thinking") == f"{B}{U}hi{A}</think>hello{E}{U}bye{A}<think>"
    kept = chat.encode_messages(msgs, "thinking", drop_thinking=False)
    assert kept == f"{B}{U}hi{A}<think>greet</think>hello{E}{U}bye{A}<think>"


def test_tools_keep_reasoning_and_results_follow_call_order():
    prompt = chat.encode_messages(TOOL_CONVERSATION, "thinking")
    assert "## Tools" in prompt and json.dumps(TOOLS[0]["function"]) in prompt
    assert f"{U}Weather?{A}<think>use the tool</think>\n\n<{D}tool_calls>" in prompt
    # results merged into one user turn, in the order of the calls (a, b), not of arrival (b, a)
    assert f"{E}{U}<tool_result>paris 21C</tool_result>\n\n<tool_result>rome 20C</tool_result>{A}<think>done</think>Warm.{E}" in prompt
    assert (f'<{D}invoke name="get_weather">\n<{D}parameter name="city" string="true">Paris</{D}parameter>\n'
            f'<{D}parameter name="days" string="false">3</{D}parameter>\n</{D}invoke>') in prompt
    assert prompt.endswith(f"{U}thanks{A}<think>")


def test_dsml_round_trip_through_tokenizer(tmp_path):
    """Assistant turn with tool calls -> text -> ids -> text -> parsed calls, equal as JSON."""
    tok = load_tokenizer(write_synthetic_tokenizer(tmp_path, 512))
    calls = CALLS + [{"id": "c", "type": "function", "function": {"name": "now", "arguments": "{}"}}]   # no parameters
    rendered = chat.encode_messages([{"role": "user", "content": "q"},
                                     {"role": "assistant", "content": "Checking.", "reasoning_content": "plan",
                                      "tool_calls": calls}], "thinking", drop_thinking=False)
    completion = rendered.split(f"{A}<think>", 1)[1]
    parsed = chat.parse_completion(tok.decode(tok.encode(completion)), "thinking")
    assert parsed["content"] == "Checking." and parsed["reasoning_content"] == "plan"
    args = [json.loads(c["function"]["arguments"]) for c in parsed["tool_calls"]]
    assert args == [{"city": "Paris", "days": 3}, {"city": "Rome", "ok": True}, {}]
    # ...and the parsed message re-encodes to the same text: results can be fed back verbatim
    again = chat.encode_messages([{"role": "user", "content": "q"}, parsed], "thinking", drop_thinking=False)
    assert again == rendered


@pytest.mark.parametrize("bad, match", [
    ("no end", "end-of-sentence"),
    (f"x\n\n<{D}tool_calls>\n<{D}invoke name=\"f\">\n<{D}parameter name=\"a\" string=\"maybe\">1</{D}parameter>\n"
     f"</{D}invoke>\n</{D}tool_calls>{E}", "malformed parameter"),
    (f"x\n\n<{D}tool_calls>\n<{D}invoke name=\"f\">\n<{D}parameter name=\"k\" string=\"false\">abc</{D}parameter>\n"
     f"</{D}invoke>\n</{D}tool_calls>{E}", "'k' is marked string=\"false\" but is not JSON"),
    (f"x\n\n<{D}tool_calls>\n</{D}tool_calls>trailing{E}", "after the tool calls"),
    (f"a</think>b{E}", "special token"),
])
def test_malformed_completions_are_rejected(bad, match):
    with pytest.raises(chat.ChatFormatError, match=match):
        chat.parse_completion(bad, "chat")


def test_bad_conversations_are_user_errors():
    with pytest.raises(chat.ChatFormatError, match="mode"):
        chat.encode_messages([{"role": "user", "content": "x"}], "fast")
    with pytest.raises(chat.ChatFormatError, match="unknown role"):
        chat.encode_messages([{"role": "robot", "content": "x"}])


REFERENCE = Path("/work/ref/encoding_dsv4.py")


@pytest.mark.skipif(not REFERENCE.is_file(), reason="official encoding_dsv4.py not present on this machine")
def test_agrees_with_official_reference():
    spec = importlib.util.spec_from_file_location("encoding_dsv4", REFERENCE)
    ref = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref)
    string_calls = [{**c, "function": {**c["function"], "arguments": json.dumps(c["function"]["arguments"])}}
                    if not isinstance(c["function"]["arguments"], str) else c for c in CALLS]
    conversations = [
        [{**m, "tool_calls": string_calls} if m.get("tool_calls") else m for m in TOOL_CONVERSATION],
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b", "task": "query"}],
        [{"role": "user", "content": "a", "task": "action"}],
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "task": "title"},
         {"role": "assistant", "content": "T"}],
        [{"role": "developer", "content": "d", "tools": TOOLS}, {"role": "latest_reminder", "content": "r"},
         {"role": "user", "content": "q"}],
        [{"role": "system", "content": "S", "response_format": {"type": "json_object"}},
         {"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "wo_eos": True}],
    ]
    for msgs in conversations:
        for mode in chat.MODES:
            for drop in (True, False):
                for effort in (None, "high", "max"):
                    assert chat.encode_messages(msgs, mode, drop, reasoning_effort=effort) == ref.encode_messages(
                        msgs, thinking_mode=mode, drop_thinking=drop, reasoning_effort=effort)
    completion = ref.encode_messages([{"role": "user", "content": "q"},
                                      {"role": "assistant", "content": "c", "tool_calls": string_calls}],
                                     thinking_mode="chat").split(f"{A}</think>", 1)[1]
    assert chat.parse_completion(completion, "chat") == ref.parse_message_from_completion_text(completion, "chat")
