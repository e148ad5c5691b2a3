"""The local judge: an OpenAI-compatible chat-completions server that grades by rule.

No machine here reaches a real LLM API, so the demo, the tests and the benchmarks judge
against this server. It is a real HTTP server (aiohttp) that the ``openai`` SDK talks
to unchanged; it grades the prompts ``rewardq.judge.prompts`` builds deterministically,
so a test can predict every score, and it injects the trouble a hosted API causes
(latency, 429s with ``Retry-After``, 5xx, hangs, scoreless replies, a per-minute quota)
while counting what it saw, so a test can prove what the workers did.

Modules:
    grading     pure grading of one item: ``final_answer``, ``expected_raw_score``
    group_grading  pure grading of a group prompt (listwise, pairwise)
    dispatch    which grader answers a request: ``grade_request``, ``grade_messages``
    config      ``JudgeConfig``, the runtime knobs
    protocol    the chat-completions wire format
    profiles    the kinds of judge it plays (OpenAI reasoning models, thinking models
                on vLLM/SGLang with and without a reasoning parser, digit tokenizers)
    digit_logprobs  logprobs of a tokenizer that writes numbers digit by digit
    faults      seeded fault and latency draws
    rate_limit  the sliding-minute ``rpm_limit`` window
    stats       the ``GET /stats`` counters
    app         the aiohttp application (``build_app``)
    server      ``serve`` / ``run`` / ``BackgroundJudgeServer``
    __main__    ``python -m rewardq.judge_server``

Nothing is imported here, so ``rewardq.judge_server.grading`` loads without aiohttp.
"""
