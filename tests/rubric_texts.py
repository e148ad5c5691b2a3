"""Rubric files (TOML) the tests write, as a user writes them: one math rubric with a
reference, one style rubric on its own scale."""

from __future__ import annotations


def _sections(*names: str) -> str:
    """The item sections of a rewardq prompt, e.g. ``<<<PROMPT>>>{prompt}<<<END PROMPT>>>``."""
    return "\n".join(f"<<<{name.upper()}>>>\n{{{name}}}\n<<<END {name.upper()}>>>"
                     for name in names)


#: A correctness rubric for gsm8k items; the local judge grades it like its own.
MATH_RUBRIC = f'''\
[rubrics.math]
data_sources = ["gsm8k"]
user = """math rubric v1
Does the RESPONSE reach the REFERENCE answer?
{_sections("prompt", "reference", "response")}
Reply with JSON only: {{{{"score": <integer 1-10>}}}}"""
'''

#: A style rubric for chat items, scored 0-5.
STYLE_RUBRIC = f'''\
[rubrics.style]
data_sources = ["chat"]
scale = [0, 5]
system = "You grade writing style."
user = """style rubric v1
Rate the style of the RESPONSE from 0 to 5.
{_sections("response")}
Reply with JSON only: {{{{"score": <integer 0-5>}}}}"""
'''
