"""A prompt as the judge is shown it: a conversation as plain text; pure, no I/O.

Trainers hand rewardq the prompt in one of three shapes: plain text; a list of chat
messages (TRL's conversational format, verl's ``raw_prompt``); or the text a chat template
rendered from those messages (OpenRLHF's ``--apply_chat_template``, slime, any trainer that
decodes the prompt tokens with their special tokens). The judge reads the question, not a
template's markup, so:

- :func:`conversation_text` renders messages: a single message is its content; several are
  ``"role: content"`` blocks separated by blank lines, so the judge sees the system prompt
  and earlier turns too.
- :func:`prompt_view` reads a rendered prompt back into its messages
  (:func:`read_chat_template`) and renders those. It knows the templates of ChatML (Qwen,
  and most models trained on it), Llama 3, Gemma, Phi-3, DeepSeek (V3 and R1), Mistral and
  Llama 2 (``[INST]``), and gpt-oss (harmony); the generation prompt at the end (an empty
  assistant turn, with the ``<think>`` a reasoning template opens) is dropped. A prompt in
  none of them is shown as it is.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["conversation_text", "prompt_view", "read_chat_template"]

Message = dict[str, str]

# One turn of each template: the role, then the content up to the turn's end (or the next
# turn, or the end of the prompt: the generation prompt has no end).
_TURNS = (
    # ChatML: <|im_start|>user\n...<|im_end|> (Phi-4: <|im_start|>user<|im_sep|>...)
    re.compile(r"<\|im_start\|>(?P<role>\w+)(?:<\|im_sep\|>|\n)?(?P<content>.*?)"
               r"(?:<\|im_end\|>|(?=<\|im_start\|>)|\Z)", re.DOTALL),
    # Llama 3: <|start_header_id|>user<|end_header_id|>\n\n...<|eot_id|>
    re.compile(r"<\|start_header_id\|>(?P<role>\w+)<\|end_header_id\|>(?P<content>.*?)"
               r"(?:<\|eot_id\|>|(?=<\|start_header_id\|>)|\Z)", re.DOTALL),
    # gpt-oss (harmony): <|start|>user<|message|>...<|end|>; a tool call's header carries
    # its recipient and constraint (<|start|>assistant<|channel|>commentary to=f
    # <|constrain|>json<|message|>...<|call|>)
    re.compile(r"<\|start\|>(?P<role>\w+)[^<]*(?:<\|channel\|>[^<]*)?"
               r"(?:<\|constrain\|>[^<]*)?(?:<\|message\|>)?(?P<content>.*?)"
               r"(?:<\|end\|>|<\|return\|>|<\|call\|>|(?=<\|start\|>)|\Z)", re.DOTALL),
    # Gemma: <start_of_turn>user\n...<end_of_turn>
    re.compile(r"<start_of_turn>(?P<role>\w+)\n?(?P<content>.*?)"
               r"(?:<end_of_turn>|(?=<start_of_turn>)|\Z)", re.DOTALL),
    # Phi-3: <|user|>\n...<|end|>
    re.compile(r"<\|(?P<role>system|user|assistant)\|>\n?(?P<content>.*?)"
               r"(?:<\|end\|>|(?=<\|(?:system|user|assistant)\|>)|\Z)", re.DOTALL),
    # DeepSeek V3/R1: [system]<｜User｜>...<｜Assistant｜>...<｜end▁of▁sentence｜>
    re.compile(r"<｜(?P<role>User|Assistant)｜>(?P<content>.*?)"
               r"(?:<｜end▁of▁sentence｜>|(?=<｜(?:User|Assistant)｜>)|\Z)", re.DOTALL),
    # Mistral and Llama 2: [INST] user [/INST] assistant</s>
    re.compile(r"\[INST\](?P<content>.*?)\[/INST\]"
               r"(?P<answer>.*?)(?:</s>|(?=\[INST\])|\Z)", re.DOTALL),
)
_BEGIN = re.compile(r"<\|begin_of_text\|>|<｜begin▁of▁sentence｜>|<bos>|<s>")
_LLAMA2_SYSTEM = re.compile(r"<<SYS>>\n?(?P<system>.*?)\n?<</SYS>>", re.DOTALL)
#: Thinking blocks, closed or left open, and a closing tag alone (a non-thinking mode's
#: generation prompt closes the block the model would open).
_THINKING = re.compile(r"<(think|thinking|reasoning)>.*?(?:</\1>|\Z)"
                       r"|</(?:think|thinking|reasoning)>", re.DOTALL)
#: What may stand between two turns, or before the first: whitespace and BOS tokens.
_BETWEEN = re.compile(r"(?:\s|<\|begin_of_text\|>|<｜begin▁of▁sentence｜>|<bos>|<s>)*")
_ROLES = {"model": "assistant", "User": "user", "Assistant": "assistant",
          "developer": "system"}


def conversation_text(value: Any) -> str:
    """A prompt or completion as text: a string as it is, a message (a ``{"role",
    "content"}`` mapping, content a string or a list of ``{"type": "text", "text"}``
    parts) as its content, a list of messages as described in the module docstring.

    Returns:
        The text (empty if there is none).
    """
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        return _content(value.get("content"))
    if isinstance(value, Sequence):
        messages = [m for m in value if isinstance(m, Mapping)]
        if len(messages) == 1:
            return _content(messages[0].get("content"))
        return "\n\n".join(f"{m.get('role', 'user')}: {_content(m.get('content'))}"
                           for m in messages)
    return "" if value is None else str(value)


def read_chat_template(prompt: str) -> list[Message] | None:
    """The messages a chat template rendered into ``prompt``, or ``None`` when it holds
    none of the templates this module knows. The generation prompt's empty assistant
    turn (thinking tags alone count as empty) is left out."""
    if "<" not in prompt and "[INST]" not in prompt:
        return None
    for turn in _TURNS:
        matches = list(turn.finditer(prompt))
        if not matches or not _rendered(prompt, matches):
            continue
        messages: list[Message] = []
        before = _clean(_BEGIN.sub("", prompt[:matches[0].start()]))
        if before:  # DeepSeek writes the system prompt before the first turn
            messages.append({"role": "system", "content": before})
        for match in matches:
            messages.extend(_messages(match))
        if messages and messages[-1]["role"] == "assistant" \
                and not _THINKING.sub("", messages[-1]["content"]).strip():
            messages.pop()
        return [m for m in messages if m["content"] or m["role"] != "system"]
    return None


def prompt_view(prompt: str) -> str:
    """What the judge is shown of a prompt: a rendered chat template as its conversation
    (:func:`conversation_text`), anything else (and a template with no text in it) as it
    is."""
    messages = read_chat_template(prompt)
    shown = conversation_text(messages) if messages is not None else ""
    return shown if shown.strip() else prompt


def _rendered(prompt: str, matches: list[re.Match[str]]) -> bool:
    """Whether the turns found make up the whole prompt, as a template renders it: the
    prompt starts with the first turn (after BOS tokens; DeepSeek's system prompt may come
    first, after its BOS) and nothing but whitespace lies between turns. A prompt that
    only mentions a template's marker ("what does <|im_start|> mean?") is no rendering."""
    head = prompt[:matches[0].start()]
    if _BETWEEN.fullmatch(head) is None and not (
            prompt.startswith("<｜begin▁of▁sentence｜>") and "｜>" in matches[0][0]):
        return False
    return all(_BETWEEN.fullmatch(prompt, a.end(), b.start()) is not None
               for a, b in zip(matches, matches[1:], strict=False))


def _messages(match: re.Match[str]) -> list[Message]:
    groups = match.groupdict()
    if "answer" in groups:  # [INST] ... [/INST] answer
        user = groups["content"]
        out: list[Message] = []
        system = _LLAMA2_SYSTEM.search(user)
        if system is not None:
            out.append({"role": "system", "content": _clean(system["system"])})
            user = user[:system.start()] + user[system.end():]
        out.append({"role": "user", "content": _clean(user)})
        out.append({"role": "assistant", "content": _clean(groups["answer"])})
        return out
    role = groups["role"]
    return [{"role": _ROLES.get(role, role), "content": _clean(groups["content"])}]


def _clean(text: str) -> str:
    return _BEGIN.sub("", text).strip()


def _content(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        return "".join(part if isinstance(part, str) else str(part.get("text", ""))
                       for part in content if isinstance(part, str | Mapping))
    return ""
