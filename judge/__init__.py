"""The judge domain, pure and without I/O: what the judge is asked and how its answer is read.

Modules:
    prompts         the built-in prompt texts (v1)
    rubrics         rubrics as data, and the rule that picks one per item
    rollout_view    what the judge is shown of a rollout (the final answer, capped)
    judge_request   the request body each judge model takes, and what endpoints refuse
    judge_core      a judge call without its I/O: request, reply, verdict
    verdicts        reading a written score; the judge errors of an HTTP answer
    logprob_scores  the score a judge meant, from its logprobs, whatever its tokenizer
    group_prompts   a GRPO group judged together (listwise, pairwise)
    messages        the text of chat messages, for token estimates

It imports only the contract (``rewardq.broker``); the producer, the workers and the
gateway import it.
"""
