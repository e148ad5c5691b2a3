"""The built-in judge prompt texts (v1); ``rewardq.judge.rubrics`` makes them the default rubrics.

A template version is part of the cache key (``JudgeSpec.prompt_version``): change the
wording, bump the version, and old cache entries stop matching.

Every user message carries its sections between ``<<<NAME>>>`` / ``<<<END NAME>>>``
markers, and its first line names the rubric and version (``rewardq-judge v1
correctness``), so the reply parser and the local judge server can read it back.
"""

from __future__ import annotations

SCALE_MIN = 1.0
SCALE_MAX = 10.0

SYSTEM_V1 = (
    "You are a strict, consistent grader of answers produced by another model. "
    "Reply with a single JSON object and nothing else."
)

CORRECTNESS_V1 = """rewardq-judge v1 correctness
Decide whether the RESPONSE reaches the same final answer as the REFERENCE answer to the
PROMPT. Ignore style and length; judge only the final answer.
Score 10 if the final answer matches the reference, 1 if it does not or if there is none.
Reply with JSON only: {{"score": <integer 1-10>, "reason": "<one short sentence>"}}

<<<PROMPT>>>
{prompt}
<<<END PROMPT>>>
<<<REFERENCE>>>
{reference}
<<<END REFERENCE>>>
<<<RESPONSE>>>
{response}
<<<END RESPONSE>>>"""

QUALITY_V1 = """rewardq-judge v1 quality
Rate the RESPONSE to the PROMPT for helpfulness, correctness, clarity and concision on a
scale from 1 (useless) to 10 (excellent).
Reply with JSON only: {{"score": <integer 1-10>, "reason": "<one short sentence>"}}

<<<PROMPT>>>
{prompt}
<<<END PROMPT>>>
<<<RESPONSE>>>
{response}
<<<END RESPONSE>>>"""

#: The built-in template versions (``JudgeSpec.prompt_version``); see ``rewardq.judge.rubrics``.
VERSIONS = ("v1",)
