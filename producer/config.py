"""``LengthPenaltyConfig``: the trainer-side settings of the length-penalty reward manager.

The field names and defaults are the ones the original verl ``LengthPenaltyRewardManager``
used, so an existing ``length_penalty_config`` block in a verl YAML keeps working; the
fields after ``max_concurrent_requests`` are rewardq's additions. The object is immutable
and rejects unknown keys, so a typo in a trainer config fails at start-up instead of being
silently ignored for a whole run.

The config never reads the environment (only entry points do): ``api_key=None`` means "the
sync path reads ``OPENAI_API_KEY``", and the key is never put on the broker.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator


class LengthPenaltyConfig(BaseModel):
    """Length penalty and judge settings of one trainer (verl ``length_penalty_config``).

    The reward of a sample is ``rule_score + reward_coefficient * judge_score -
    penalty_scale * penalty``, where ``penalty`` is the non-negative value returned by
    :func:`rewardq.producer.penalties.length_penalty`.

    Raises:
        pydantic.ValidationError: (a ``ValueError``) on an unknown key, a value out of
            range, ``outer_ratio <= peak_ratio``, or an incomplete ``"overlong"`` shape.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    enable: bool = Field(default=True, description="Apply the length penalty at all.")
    penalty_scale: float = Field(
        default=1.0, ge=0.0, description="Multiplier on the penalty when it is subtracted."
    )
    max_penalty: float = Field(
        default=1.0,
        ge=0.0,
        description="Group-median shape: the penalty at and beyond the outer band.",
    )
    peak_ratio: float = Field(
        default=0.3,
        ge=0.0,
        lt=1.0,
        description="Half-width of the zero-penalty band, as a fraction of the group median.",
    )
    outer_ratio: float = Field(
        default=0.5,
        ge=0.0,
        lt=1.0,
        description=(
            "Distance from the group median, as a fraction of it, where the penalty reaches "
            "max_penalty; must be greater than peak_ratio."
        ),
    )
    enable_openai_reward: bool = Field(default=True, description="Call the LLM judge at all.")
    api_key: SecretStr | None = Field(
        default=None,
        description=(
            "Judge API key for the sync path; None = from OPENAI_API_KEY for the sync path. "
            "Never sent through the broker: the async path's workers use their own key."
        ),
    )
    model_name: str | None = Field(
        default=None, description="Judge model; None = the service default."
    )
    reward_coefficient: float = Field(default=1.0, description="Multiplier on the judge score.")
    use_async_io: bool = Field(
        default=False,
        description=(
            "True: the distributed async path (Redis + worker fleet); "
            "False: the simple in-process sync path, for development and tests."
        ),
    )
    max_concurrent_requests: int = Field(
        default=10,
        ge=1,
        description="Judge requests in flight at once (per worker process in the fleet).",
    )

    judge_when: Literal["correct_only", "always"] = Field(
        default="correct_only",
        description=(
            "correct_only: judge only samples whose rule score is > 0 (the others get no "
            "judge term); always: judge every sample."
        ),
    )
    on_judge_failure: Literal["rule_only", "zero", "nan"] = Field(
        default="rule_only",
        description=(
            "What a sample whose judge call failed or timed out gets: rule_only = the "
            "reward without the judge term; zero = a reward of 0; nan = NaN, for trainers "
            "that mask NaN rewards out."
        ),
    )
    penalty_shape: Literal["group_median", "overlong"] = Field(
        default="group_median",
        description=(
            "group_median: the trapezoid around the median length of the sample's uid "
            "group; overlong: DAPO's soft overlong buffer (needs max_resp_len and "
            "overlong_buffer_len)."
        ),
    )
    overlong_buffer_len: int | None = Field(
        default=None,
        gt=0,
        description=(
            "Overlong shape: length of the buffer before max_resp_len over which the "
            "penalty grows linearly; must be <= max_resp_len."
        ),
    )
    overlong_penalty_factor: float = Field(
        default=1.0, ge=0.0, description="Overlong shape: penalty at L == max_resp_len."
    )
    max_resp_len: int | None = Field(
        default=None, gt=0, description="Overlong shape: the maximum response length in tokens."
    )
    judge_base_url: str | None = Field(
        default=None,
        description="Sync path: OpenAI-compatible base URL; None = the service default.",
    )
    judge_timeout_s: float = Field(
        default=60.0, gt=0.0, description="Sync path: timeout of one judge call, in seconds."
    )
    score_timeout_s: float = Field(
        default=600.0,
        gt=0.0,
        description="Async path: how long the trainer waits for the fleet's scores, in seconds.",
    )

    @model_validator(mode="after")
    def _check_bands_and_shape(self) -> Self:
        if self.outer_ratio <= self.peak_ratio:
            raise ValueError(
                f"outer_ratio ({self.outer_ratio}) must be greater than peak_ratio "
                f"({self.peak_ratio}): the penalty ramps from 0 at peak_ratio to "
                "max_penalty at outer_ratio"
            )
        if self.penalty_shape == "overlong":
            if self.max_resp_len is None or self.overlong_buffer_len is None:
                raise ValueError(
                    'penalty_shape="overlong" needs both max_resp_len and overlong_buffer_len '
                    f"(got max_resp_len={self.max_resp_len}, "
                    f"overlong_buffer_len={self.overlong_buffer_len})"
                )
            if self.overlong_buffer_len > self.max_resp_len:
                raise ValueError(
                    f"overlong_buffer_len ({self.overlong_buffer_len}) must be <= "
                    f"max_resp_len ({self.max_resp_len})"
                )
        return self

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any] | None) -> LengthPenaltyConfig:
        """Build the config from verl's ``length_penalty_config`` (a dict or ``DictConfig``).

        Args:
            d: a plain mapping or an OmegaConf ``DictConfig`` (converted with ``dict(d)``,
                which resolves interpolations on access); ``None`` gives the defaults.

        Returns:
            The validated config.

        Raises:
            pydantic.ValidationError: as for the constructor.
        """
        return cls.model_validate(dict(d) if d is not None else {})
