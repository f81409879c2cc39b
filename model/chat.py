"""DeepSeek-V4 chat format: OpenAI-style messages -> prompt text, and completion text -> message.

The layout is the one the model was trained on (DeepSeek's encoding_dsv4 reference):

    <｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜></think>{reply}<｜end▁of▁sentence｜>

`</think>` after `<｜Assistant｜>` selects chat mode, `<think>` thinking mode. Tools are listed in the
system (or developer) turn; the model calls them with `｜DSML｜` markup; results come back as
`<tool_result>...</tool_result>` blocks inside a user turn (OpenAI "tool" messages are merged into
one). In thinking mode, reasoning of turns before the last user turn is dropped, unless any message
defines tools (multi-step tool use needs the whole chain).

The fixed prompt texts below (tool instructions, maximum reasoning effort) are reproduced exactly:
they are model input the weights were trained on, not prose of ours.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any

from ascend.errors import AscendDeployError
from model.tokenizer import ASSISTANT, BOS, DSML, EOS, LATEST_REMINDER, THINK_END, THINK_START, USER

Message = dict[str, Any]
MODES = ("chat", "thinking")
TASK_TOKENS = {"action": "<｜action｜>", "query": "<｜query｜>", "authority": "<｜authority｜>",
               "domain": "<｜domain｜>", "title": "<｜title｜>", "read_url": "<｜read_url｜>"}

_TOOLS_PROMPT = """## Tools

You have access to a set of tools to help answer the user's question. You can invoke tools by writing a "<{D}tool_calls>" block like the following:

<{D}tool_calls>
<{D}invoke name="$TOOL_NAME">
<{D}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{D}parameter>
...
</{D}invoke>
<{D}invoke name="$TOOL_NAME2">
...
</{D}invoke>
</{D}tool_calls>

String parameters should be specified as is and set `string="true"`. For all other types (numbers, booleans, arrays, objects), pass the value in JSON format and set `string="false"`.

If thinking_mode is enabled (triggered by {TS}), you MUST output your complete reasoning inside {TS}...{TE} BEFORE any tool calls or final response.

Otherwise, output directly after {TE} with tool calls or final response.

### Available Tool Schemas

{schemas}

You MUST strictly follow the above defined tool name and parameter schemas to invoke tool calls.
"""

_MAX_EFFORT_PREFIX = (
    "Reasoning Effort: Absolute maximum with no shortcuts permitted.\n"
    "You MUST be very thorough in your thinking and comprehensively decompose the problem to resolve the root "
    "cause, rigorously stress-testing your logic against all potential paths, edge cases, and adversarial "
    "scenarios.\n"
    "Explicitly write out your entire deliberation process, documenting every intermediate step, considered "
    "alternative, and rejected hypothesis to ensure absolutely no assumption is left unchecked.\n\n")

_CALLS_OPEN, _CALLS_CLOSE = f"<{DSML}tool_calls>", f"</{DSML}tool_calls>"
_INVOKE_OPEN, _INVOKE_CLOSE = f"<{DSML}invoke", f"</{DSML}invoke>"
_PARAM_OPEN, _PARAM_CLOSE = f"<{DSML}parameter", f"</{DSML}parameter>"


class ChatFormatError(AscendDeployError, ValueError):
    """A conversation cannot be encoded, or a completion is not well-formed V4 output."""


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


# ---------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------

def render_tools(tools: list[dict]) -> str:
    """The tool-instruction block; `tools` in OpenAI format ({"type": "function", "function": {...}})."""
    schemas = "\n".join(_json(t["function"]) for t in tools)
    return _TOOLS_PROMPT.format(D=DSML, TS=THINK_START, TE=THINK_END, schemas=schemas)


def render_tool_calls(tool_calls: list[dict]) -> str:
    """An assistant turn's tool calls as DSML (OpenAI format in; `arguments` a JSON string or a dict)."""
    invokes = []
    for call in tool_calls:
        fn = call["function"]
        args = fn["arguments"]
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                args = {"arguments": args}  # not JSON: passed through as one string parameter
        if not isinstance(args, dict):
            raise ChatFormatError(f"tool call {fn['name']!r}: arguments must be a JSON object, got {args!r}")
        params = "\n".join(
            f'<{DSML}parameter name="{k}" string="{"true" if isinstance(v, str) else "false"}">'
            f'{v if isinstance(v, str) else _json(v)}{_PARAM_CLOSE}' for k, v in args.items())
        invokes.append(f'{_INVOKE_OPEN} name="{fn["name"]}">\n{params}\n{_INVOKE_CLOSE}')
    return f"\n\n{_CALLS_OPEN}\n" + "\n".join(invokes) + f"\n{_CALLS_CLOSE}"


def merge_tool_messages(messages: list[Message]) -> list[Message]:
    """Fold "tool" messages (and user text that follows them) into user turns of content blocks.

    Results then sort into the order of the calls of the preceding assistant turn (by call id).
    """
    merged: list[Message] = []
    for msg in map(copy.deepcopy, messages):
        last = merged[-1] if merged else None
        joinable = last is not None and last["role"] == "user" and "content_blocks" in last
        if msg["role"] == "tool":
            block = {"type": "tool_result", "tool_use_id": msg.get("tool_call_id", ""), "content": msg.get("content", "")}
            if joinable:
                last["content_blocks"].append(block)
            else:
                merged.append({"role": "user", "content_blocks": [block]})
        elif msg["role"] == "user":
            block = {"type": "text", "text": msg.get("content", "")}
            if joinable and last.get("task") is None:
                last["content_blocks"].append(block)
            else:
                extra = {k: msg[k] for k in ("task", "wo_eos", "mask") if k in msg}
                merged.append({"role": "user", "content": msg.get("content", ""), "content_blocks": [block], **extra})
        else:
            merged.append(msg)
    _sort_tool_results(merged)
    return merged


def _sort_tool_results(messages: list[Message]) -> None:
    order: dict[str, int] = {}
    for msg in messages:
        if msg["role"] == "assistant" and msg.get("tool_calls"):
            order = {}
            for i, call in enumerate(msg["tool_calls"]):
                call_id = call.get("id") or call.get("function", {}).get("id", "")
                if call_id:
                    order[call_id] = i
        elif msg["role"] == "user" and msg.get("content_blocks") and order:
            results = [b for b in msg["content_blocks"] if b["type"] == "tool_result"]
            if len(results) > 1:
                ordered = iter(sorted(results, key=lambda b: order.get(b.get("tool_use_id", ""), 0)))
                msg["content_blocks"] = [next(ordered) if b["type"] == "tool_result" else b
                                         for b in msg["content_blocks"]]


def _last_user_index(messages: list[Message]) -> int:
    return max((i for i, m in enumerate(messages) if m["role"] in ("user", "developer")), default=-1)


def _drop_old_reasoning(messages: list[Message]) -> list[Message]:
    """Before the last user turn: assistant turns lose their reasoning, developer turns go."""
    last_user = _last_user_index(messages)
    kept = []
    for i, msg in enumerate(messages):
        if i >= last_user or msg["role"] in ("user", "system", "tool", "latest_reminder", "direct_search_results"):
            kept.append(msg)
        elif msg["role"] == "assistant":
            kept.append({k: v for k, v in msg.items() if k != "reasoning_content"})
    return kept


def _user_text(msg: Message) -> str:
    if not msg.get("content_blocks"):
        return msg.get("content") or ""
    parts = []
    for block in msg["content_blocks"]:
        if block["type"] == "text":
            parts.append(block.get("text", ""))
        elif block["type"] == "tool_result":
            content = block.get("content", "")
            if isinstance(content, list):
                content = "\n\n".join(b.get("text", "") if b.get("type") == "text" else f"[Unsupported {b.get('type')}]"
                                      for b in content)
            parts.append(f"<tool_result>{content}</tool_result>")
        else:
            parts.append(f"[Unsupported {block['type']}]")
    return "\n\n".join(parts)


def _with_tools(text: str, msg: Message) -> str:
    if msg.get("tools"):
        text += "\n\n" + render_tools(msg["tools"])
    if msg.get("response_format"):
        text += ("\n\n## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n"
                 + _json(msg["response_format"]))
    return text


def _render(i: int, messages: list[Message], last_user: int, thinking: bool, drop_thinking: bool,
            effort: str | None) -> str:
    msg, role = messages[i], messages[i]["role"]
    out = _MAX_EFFORT_PREFIX if i == 0 and thinking and effort == "max" else ""

    if role == "system":
        out += _with_tools(msg.get("content") or "", msg)
    elif role == "developer":
        if not msg.get("content"):
            raise ChatFormatError(f"message {i}: a developer message needs content")
        out += USER + _with_tools(msg["content"], msg)
    elif role == "user":
        out += USER + _user_text(msg)
    elif role == "latest_reminder":
        out += LATEST_REMINDER + msg["content"]
    elif role == "assistant":
        reasoning = ""
        after_task = i > 0 and messages[i - 1].get("task") is not None
        if thinking and not after_task and (not drop_thinking or i > last_user):
            reasoning = (msg.get("reasoning_content") or "") + THINK_END
        calls = render_tool_calls(msg["tool_calls"]) if msg.get("tool_calls") else ""
        out += reasoning + (msg.get("content") or "") + calls + ("" if msg.get("wo_eos") else EOS)
    else:
        raise ChatFormatError(f"message {i}: unknown role {role!r} (expected system, user, assistant, tool, "
                              "developer or latest_reminder)")

    # What opens the next turn is written only where the model is to continue from here.
    if i + 1 < len(messages) and messages[i + 1]["role"] not in ("assistant", "latest_reminder"):
        return out
    task = msg.get("task")
    if task is not None:
        if task not in TASK_TOKENS:
            raise ChatFormatError(f"message {i}: unknown task {task!r} (expected one of {sorted(TASK_TOKENS)})")
        if task == "action":
            out += ASSISTANT + (THINK_START if thinking else THINK_END)
        out += TASK_TOKENS[task]
    elif role in ("user", "developer"):
        open_thinking = thinking and (not drop_thinking or i >= last_user)
        out += ASSISTANT + (THINK_START if open_thinking else THINK_END)
    return out


def encode_messages(messages: list[Message], mode: str = "chat", drop_thinking: bool = True,
                    add_bos: bool = True, reasoning_effort: str | None = None) -> str:
    """Prompt text for `messages` (OpenAI format, plus V4's `reasoning_content`, `task`, `wo_eos`)."""
    if mode not in MODES:
        raise ChatFormatError(f"mode={mode!r}: expected 'chat' or 'thinking'")
    if reasoning_effort not in (None, "high", "max"):
        raise ChatFormatError(f"reasoning_effort={reasoning_effort!r}: expected None, 'high' or 'max'")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg:
            raise ChatFormatError(f"message {i}: expected an object with a 'role'")
    messages = merge_tool_messages(messages)
    thinking = mode == "thinking"
    drop_thinking = drop_thinking and not any(m.get("tools") for m in messages)
    if thinking and drop_thinking:
        messages = _drop_old_reasoning(messages)
    last_user = _last_user_index(messages)
    body = "".join(_render(i, messages, last_user, thinking, drop_thinking, reasoning_effort)
                   for i in range(len(messages)))
    return (BOS if add_bos else "") + body


# ---------------------------------------------------------------------------------------------
# Parsing a completion
# ---------------------------------------------------------------------------------------------

def _until(text: str, pos: int, stops: tuple[str, ...]) -> tuple[str, str | None, int]:
    """Text from `pos` to the earliest of `stops`; returns (text, stop found or None, position after it)."""
    found = [(text.find(s, pos), s) for s in stops]
    found = [(at, s) for at, s in found if at >= 0]
    if not found:
        return text[pos:], None, len(text)
    at, stop = min(found)
    return text[pos:at], stop, at + len(stop)


_NAME_RE = re.compile(r'\s*name="(.*?)">\n\n?', re.DOTALL)   # "\n\n": a call without parameters
_PARAM_RE = re.compile(r' name="(.*?)" string="(true|false)">(.*?)<', re.DOTALL)


def _parse_tool_calls(text: str, pos: int) -> tuple[list[dict], str | None, int]:
    """DSML tool calls from just after `\\n\\n<｜DSML｜tool_calls`; returns calls, last stop, position."""
    calls, stop = [], None
    while pos < len(text):
        gap, stop, pos = _until(text, pos, (_INVOKE_OPEN, _CALLS_CLOSE))
        if gap != ">\n":
            raise ChatFormatError(f"tool calls: expected '>\\n' before an invoke, got {gap!r}")
        if stop == _CALLS_CLOSE:
            break
        if stop is None:
            raise ChatFormatError(f"tool calls: missing {_CALLS_CLOSE}")
        head, stop, pos = _until(text, pos, (_PARAM_OPEN, _INVOKE_CLOSE[:-1]))
        name = _NAME_RE.fullmatch(head)
        if not name:
            raise ChatFormatError(f"tool calls: malformed invoke header {head!r}")
        args: dict[str, str] = {}
        while stop == _PARAM_OPEN:
            body, _, pos = _until(text, pos, (_PARAM_CLOSE[1:-1],))
            param = _PARAM_RE.fullmatch(body)
            if not param:
                raise ChatFormatError(f"tool calls: malformed parameter {body!r}")
            key, is_string, value = param.groups()
            if key in args:
                raise ChatFormatError(f"tool calls: parameter {key!r} given twice")
            if is_string == "false":
                try:
                    json.loads(value)
                except json.JSONDecodeError:
                    raise ChatFormatError(f"tool calls: parameter {key!r} is marked string=\"false\" but is not "
                                          f"JSON: {value!r}") from None
            args[key] = _json(value) if is_string == "true" else value
            gap, stop, pos = _until(text, pos, (_PARAM_OPEN, _INVOKE_CLOSE[:-1]))
            if gap != ">\n":
                raise ChatFormatError(f"tool calls: expected '>\\n' after a parameter, got {gap!r}")
        arguments = "{" + ", ".join(f"{_json(k)}: {v}" for k, v in args.items()) + "}"
        calls.append({"type": "function", "function": {"name": name.group(1), "arguments": arguments}})
    return calls, stop, pos


def parse_completion(text: str, mode: str = "chat") -> Message:
    """The assistant message in a completion (text after the prompt, up to and including EOS).

    Returns {"role", "content", "reasoning_content", "tool_calls"} with tool calls in OpenAI format
    (`arguments` a JSON string). Raises ChatFormatError on malformed output.
    """
    calls_start = f"\n\n{_CALLS_OPEN[:-1]}"
    reasoning, pos = "", 0
    if mode == "thinking":
        reasoning, stop, pos = _until(text, pos, (THINK_END, calls_start))
        if stop != THINK_END:
            raise ChatFormatError(f"completion: reasoning not closed by {THINK_END}")
    content, stop, pos = _until(text, pos, (EOS, calls_start))
    calls: list[dict] = []
    if stop == calls_start:
        calls, stop, pos = _parse_tool_calls(text, pos)
        rest, stop, pos = _until(text, pos, (EOS,))
        if rest:
            raise ChatFormatError(f"completion: unexpected text after the tool calls: {rest!r}")
    elif stop != EOS:
        raise ChatFormatError("completion: no end-of-sentence token (generation stopped early?)")
    if pos != len(text):
        raise ChatFormatError(f"completion: unexpected text after the end: {text[pos:]!r}")
    for token in (BOS, EOS, THINK_START, THINK_END, DSML):
        if token in content or token in reasoning:
            raise ChatFormatError(f"completion: special token {token} inside the reply text")
    return {"role": "assistant", "content": content, "reasoning_content": reasoning, "tool_calls": calls}
