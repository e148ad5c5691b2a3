"""``rewardq.judge.conversation``: a prompt as the judge is shown it.

Rendered prompts come from ``transformers``' own ``apply_chat_template`` (Jinja, as every
trainer renders them) with templates written after the models' published ones: the
structure each model family's tokens give a prompt, generation prompt included.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rewardq.broker.schemas import ScoreItem
from rewardq.broker.settings import Settings
from rewardq.judge.conversation import conversation_text, prompt_view, read_chat_template
from rewardq.judge.judge_core import judge_spec
from rewardq.judge.rollout_view import view_items
from rewardq.judge.rubrics import builtin_rubrics

try:
    from tests.tokenizer_factory import build_tokenizer
except ImportError:  # pytest put tests/ itself, not the repository root, on sys.path
    from tokenizer_factory import build_tokenizer  # type: ignore[no-redef]

#: Chat templates, by family: what their tokens make of a conversation.
TEMPLATES = {
    "chatml": (  # Qwen2/2.5, and the many models trained on ChatML
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] "
        "+ '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"),
    "qwen3_no_thinking": (  # Qwen3 with enable_thinking=False: an empty thinking block
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] "
        "+ '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n<think>\n\n</think>\n\n' }}"
        "{% endif %}"),
    "llama3": (
        "{{ '<|begin_of_text|>' }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] "
        "+ '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
        "{% endif %}"),
    "deepseek_r1": (  # the system prompt before the first turn; <think> opened at the end
        "{{ '<｜begin▁of▁sentence｜>' }}{% for m in messages %}"
        "{% if m['role'] == 'system' %}{{ m['content'] }}"
        "{% elif m['role'] == 'user' %}{{ '<｜User｜>' + m['content'] }}"
        "{% else %}{{ '<｜Assistant｜>' + m['content'] + '<｜end▁of▁sentence｜>' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<｜Assistant｜><think>\n' }}{% endif %}"),
    "gemma": (
        "{{ '<bos>' }}{% for m in messages %}{{ '<start_of_turn>' + ('model' if m['role'] "
        "== 'assistant' else m['role']) + '\n' + m['content'] | trim + '<end_of_turn>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"),
    "phi3": (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"),
    "mistral": (
        "{{ '<s>' }}{% for m in messages %}{% if m['role'] == 'user' %}"
        "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}{{ m['content'] + '</s>' }}"
        "{% endif %}{% endfor %}"),
    "gpt_oss": (
        "{% for m in messages %}{{ '<|start|>' + m['role'] + '<|message|>' + m['content'] "
        "+ '<|end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|start|>assistant' }}"
        "{% endif %}"),
}
#: Families whose template has no system role.
NO_SYSTEM = {"gemma", "mistral"}


def render(family: str, messages: list[dict[str, str]]) -> str:
    tokenizer = build_tokenizer()
    tokenizer.chat_template = TEMPLATES[family]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert isinstance(text, str)
    return text


@pytest.mark.parametrize("family", sorted(TEMPLATES))
def test_a_rendered_single_question_is_shown_as_the_question(family: str) -> None:
    question = "What is 12 plus 30? Put the answer in \\boxed{}."
    rendered = render(family, [{"role": "user", "content": question}])
    assert rendered != question
    assert read_chat_template(rendered) == [{"role": "user", "content": question}]
    assert prompt_view(rendered) == question


@pytest.mark.parametrize("family", sorted(set(TEMPLATES) - NO_SYSTEM))
def test_a_system_prompt_and_earlier_turns_are_kept_as_role_blocks(family: str) -> None:
    messages = [{"role": "system", "content": "You are a careful math tutor."},
                {"role": "user", "content": "What is 2 plus 2?"},
                {"role": "assistant", "content": "It is 4."},
                {"role": "user", "content": "And times 3?"}]
    shown = prompt_view(render(family, messages))
    assert shown == conversation_text(messages)
    assert shown.startswith("system: You are a careful math tutor.\n\nuser: What is 2")
    assert "<|" not in shown and "<｜" not in shown


@given(st.lists(st.text(alphabet=st.characters(codec="utf-8", exclude_characters="<>[]"),
                        min_size=1).map(str.strip).filter(bool), min_size=1, max_size=4))
def test_chatml_reads_back_the_messages_it_rendered(contents: list[str]) -> None:
    roles = ["user", "assistant"]
    messages = [{"role": roles[i % 2], "content": text} for i, text in enumerate(contents)]
    rendered = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
                       for m in messages) + "<|im_start|>assistant\n"
    assert read_chat_template(rendered) == messages


@pytest.mark.parametrize("prompt", [
    "What is 2 plus 3?",
    "Compare a < b and b > c: which is larger?",
    "Explain the HTML tag <div> and the list [1, 2].",
    "",
    # prompts that mention a template's markers are no rendering of one
    "Explain what <|im_start|>user means in ChatML.",
    "In Mistral prompts, [INST] starts an instruction and [/INST] ends it. Why?",
    "What does <|user|> do in Phi-3?",
    "Parse <|start|>user<|message|>hi<|end|> as harmony.",
    "Explain the <｜User｜> token of DeepSeek.",
])
def test_a_prompt_in_no_template_is_shown_as_it_is(prompt: str) -> None:
    assert read_chat_template(prompt) is None
    assert prompt_view(prompt) == prompt


@pytest.mark.parametrize("prompt", ["<|im_start|>assistant\n", "<start_of_turn>model\n",
                                    "[INST][/INST]"])
def test_a_template_with_no_text_in_it_is_shown_as_it_is(prompt: str) -> None:
    """An empty view would be no prompt at all: the item would be invalid."""
    assert prompt_view(prompt) == prompt


@pytest.mark.parametrize(("rendered", "shown"), [
    # Phi-4: ChatML with <|im_sep|> after the role
    ("<|im_start|>system<|im_sep|>Be brief.<|im_end|><|im_start|>user<|im_sep|>What is 2+2?"
     "<|im_end|><|im_start|>assistant<|im_sep|>", "system: Be brief.\n\nuser: What is 2+2?"),
    # DeepSeek V3.1 in non-thinking mode: the generation prompt closes the thinking
    ("<｜begin▁of▁sentence｜><｜User｜>What is 2+2?<｜Assistant｜></think>", "What is 2+2?"),
    # gpt-oss: a tool call and its result
    ("<|start|>user<|message|>Weather?<|end|><|start|>assistant<|channel|>commentary "
     "to=functions.get_weather <|constrain|>json<|message|>{}<|call|>"
     "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>sunny"
     "<|end|><|start|>assistant", "user: Weather?\n\nassistant: {}\n\nfunctions: sunny"),
])
def test_variants_of_the_templates(rendered: str, shown: str) -> None:
    assert prompt_view(rendered) == shown


def test_the_judge_items_carry_the_prompts_view_and_the_thinking_it_opened_counts() -> None:
    """``view_items``: the prompt's markup goes, and a rollout that starts inside the
    ``<think>`` the template opened still needs its closing tag."""
    rendered = render("deepseek_r1", [{"role": "user", "content": "What is 2 plus 3?"}])
    book = builtin_rubrics()
    items = book.assign([
        ScoreItem(id="closed", prompt=rendered, response="2 and 3.</think>It is 5."),
        ScoreItem(id="cut", prompt=rendered, response="2 and 3, hmm"),
        ScoreItem(id="plain", prompt="What is 2 plus 3?", response="5")])
    views = view_items(items, judge_spec(Settings()), book)
    closed, cut, plain = views
    assert isinstance(closed, ScoreItem)
    assert (closed.prompt, closed.response) == ("What is 2 plus 3?", "It is 5.")
    assert not isinstance(cut, ScoreItem) and cut.status == "no_answer"
    assert plain is items[2]  # nothing to change: the same item


def test_conversation_text_reads_trls_formats() -> None:
    assert conversation_text("plain") == "plain"
    assert conversation_text([{"role": "assistant", "content": "only"}]) == "only"
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"},
                                          {"type": "text", "text": "b"}]}]
    assert conversation_text(parts) == "ab"
    assert conversation_text([{"role": "system", "content": "s"},
                              {"role": "user", "content": "u"}]) == "system: s\n\nuser: u"
    assert conversation_text(None) == ""
