"""Rubrics as data: a TOML file of judge templates, chosen per item, checked at load, keyed
into the cache, and the same on both sides of the broker (issue 13, item 1)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from rubric_texts import MATH_RUBRIC, STYLE_RUBRIC

from rewardq.broker.errors import ConfigError, InvalidItemError
from rewardq.broker.keys import judge_fingerprint
from rewardq.broker.schemas import ResultStatus, ScoreItem
from rewardq.broker.settings import Settings
from rewardq.judge.judge_core import judge_spec
from rewardq.judge.rubrics import RubricBook, builtin_rubrics, load_rubrics
from rewardq.judge.verdicts import normalize
from rewardq.judge_server.dispatch import grade_messages
from rewardq.producer.client import RewardClient
from rewardq.stack import JudgeProcess

ROOT = Path(__file__).resolve().parent.parent
_SCRIPT = Path(sys.executable).with_name("rewardq")
RQ = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "rewardq.cli"]

RUBRICS = f"""\
# Two rubrics for two data sources; "style" is the default.
default = "style"

{MATH_RUBRIC}
{STYLE_RUBRIC}"""


def write(tmp_path: Path, text: str, name: str = "rubrics.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def items(n: int, tag: str) -> list[ScoreItem]:
    """Half gsm8k items (with a reference), half chat items; distinct responses."""
    out = []
    for i in range(n):
        if i % 2 == 0:
            out.append(ScoreItem(id=f"{tag}-{i}", prompt=f"What is {i} + {i}?",
                                 response=f"{tag} math {i}: the answer is {2 * i + i % 4 // 2}.",
                                 reference=str(2 * i), data_source="gsm8k"))
        else:
            out.append(ScoreItem(id=f"{tag}-{i}", prompt=f"Say hello {i} times.",
                                 response=f"{tag} chat {i}: " + "hello " * (i % 7 + 1),
                                 data_source="chat"))
    return out


def expected_score(book: RubricBook, item: ScoreItem) -> float:
    """What the local judge's rule gives for the messages ``item``'s rubric builds."""
    rubric = book.rubrics[book.select(item)]
    return normalize(float(grade_messages(rubric.messages(item))), rubric.scale)


# ----------------------------------------------------------------------------- loading

def test_a_rubrics_file_picks_a_rubric_per_item(tmp_path: Path) -> None:
    book = load_rubrics(write(tmp_path, RUBRICS))
    math, chat = items(2, "pick")
    assert (book.select(math), book.select(chat)) == ("math", "style")
    other = ScoreItem(id="o", prompt="p", response="r", data_source="unlisted")
    assert book.select(other) == "style"  # the default
    explicit = ScoreItem(id="e", prompt="p", response="r", reference="4", data_source="chat",
                         rubric="math")
    assert book.select(explicit) == "math"  # the item's own choice wins
    assert book.rubrics["style"].scale == (0, 5)
    assert book.rubrics["style"].messages(chat)[0] == {"role": "system",
                                                       "content": "You grade writing style."}
    assert [i.rubric for i in book.assign([math, chat, other])] == ["math", "style", "style"]


def test_items_that_cannot_use_their_rubric_are_refused_before_sending(tmp_path: Path) -> None:
    book = load_rubrics(write(tmp_path, RUBRICS))
    with pytest.raises(InvalidItemError) as caught:
        book.assign([ScoreItem(id="no-ref", prompt="p", response="r", data_source="gsm8k"),
                     ScoreItem(id="ghost", prompt="p", response="r", rubric="nope")])
    message = str(caught.value)
    assert "no-ref" in message and "needs a reference" in message
    assert "ghost" in message and "unknown rubric 'nope'" in message


@pytest.mark.parametrize(("change", "line", "rubric", "words"), [
    (('scale = [0, 5]', 'scale = [5, 0]'), 21, "style", "'scale' must be"),
    (('{response}\n<<<END RESPONSE>>>\nReply with JSON only: {{"score": <integer 0-5>}}',
      '<<<END RESPONSE>>>\nReply with JSON only: {{"score": <integer 0-5>}}'), 23, "style",
     "never shows the judge the {response}"),
    (("{prompt}\n<<<END PROMPT>>>", "{question}\n<<<END PROMPT>>>"), 6, "math",
     "unknown field {question}"),
    (('data_sources = ["chat"]', 'data_sources = ["gsm8k"]'), 20, "style",
     "already listed by rubric 'math'"),
    (('scale = [0, 5]', 'scale = [0, 5]\ntemperature = 0.3'), 22, "style",
     "unknown key 'temperature'"),
    (('system = "You grade', 'score_mode = "vibes"\nsystem = "You grade'), 22, "style",
     "'score_mode' must be"),
    (('default = "style"', 'default = "styles"'), 2, None, "'default' must name"),
])
def test_a_malformed_file_fails_naming_file_rubric_and_line(
        tmp_path: Path, change: tuple[str, str], line: int, rubric: str | None,
        words: str) -> None:
    assert change[0] in RUBRICS
    path = write(tmp_path, RUBRICS.replace(change[0], change[1], 1))
    with pytest.raises(ConfigError) as caught:
        load_rubrics(path)
    message = str(caught.value)
    assert message.startswith(f"{path}:{line}: "), message
    assert words in message
    if rubric is not None:
        assert f"rubric {rubric!r}" in message


def test_toml_syntax_errors_and_missing_files_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"not valid TOML: .*line 4"):
        load_rubrics(write(tmp_path, RUBRICS.replace("[rubrics.math]", "[rubrics.math")))
    with pytest.raises(ConfigError, match="cannot read the rubrics file"):
        load_rubrics(tmp_path / "absent.toml")


# --------------------------------------------------------------------------- cache keys

def test_editing_one_rubric_changes_the_cache_keys_of_its_items_only(
        tmp_path: Path, settings: Settings) -> None:
    before = load_rubrics(write(tmp_path, RUBRICS, "before.toml"))
    after = load_rubrics(write(tmp_path, RUBRICS.replace(
        "Rate the style", "Rate the tone and style"), "after.toml"))
    batch = items(10, "key")
    keys_before = [judge_fingerprint(judge_spec(settings, before), i)
                   for i in before.assign(batch)]
    keys_after = [judge_fingerprint(judge_spec(settings, after), i) for i in after.assign(batch)]
    for item, old, new in zip(batch, keys_before, keys_after, strict=True):
        if item.data_source == "chat":
            assert old != new, item.id  # the edited rubric: fresh verdicts
        else:
            assert old == new, item.id  # the other rubric's cache entries still serve
    # built-in rubrics keep the keys they always had (no digest in the spec)
    assert judge_spec(settings, builtin_rubrics()).rubrics == {}


# ------------------------------------------------------------------------------ fleet

def test_the_fleet_judges_each_item_with_its_rubric(
        tmp_path: Path, settings: Settings, workers, judge: JudgeProcess) -> None:
    path = write(tmp_path, RUBRICS)
    book = load_rubrics(path)
    run = settings.model_copy(update={"rubrics_file": path, "chunk_size": 8})
    workers(2, rubrics_file=path)
    batch = items(40, "fleet")
    with RewardClient(run) as client:
        results = client.submit(batch, step=1).result(timeout=120)

    seen = {r["user"].split("<<<RESPONSE>>>\n")[1].split("\n<<<END")[0]: r["title"]
            for r in judge.requests()}
    assert len(seen) == len(batch)  # one call per item
    for item, result in zip(batch, results, strict=True):
        want_title = "math rubric v1" if item.data_source == "gsm8k" else "style rubric v1"
        assert seen[item.response.strip()] == want_title, item.id  # the view trims
        assert result.status is ResultStatus.OK, result
        assert result.score == pytest.approx(expected_score(book, item), abs=1e-9), item.id


def test_a_worker_with_another_rubric_version_refuses_the_items(
        tmp_path: Path, settings: Settings, workers, judge: JudgeProcess) -> None:
    mine = write(tmp_path, RUBRICS, "producer.toml")
    theirs = write(tmp_path, RUBRICS.replace("Rate the style", "Rate the tone"), "worker.toml")
    workers(1, rubrics_file=theirs)
    batch = items(6, "mismatch")
    with RewardClient(settings.model_copy(update={"rubrics_file": mine})) as client:
        results = client.submit(batch, step=1).result(timeout=120)

    for item, result in zip(batch, results, strict=True):
        if item.data_source == "chat":  # the rubric that differs: not judged
            assert result.status is ResultStatus.FAILED, result
            assert "rubric 'style' differs between the producer" in (result.error or "")
        else:
            assert result.status is ResultStatus.OK, result
    assert all(r["title"] != "style rubric v1" for r in judge.requests())


# -------------------------------------------------------------------------------- CLI

def test_rubrics_check_validates_a_file(tmp_path: Path) -> None:
    good = write(tmp_path, RUBRICS)
    ok = subprocess.run([*RQ, "rubrics", "check", str(good)],
                        capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    assert "2 rubric(s)" in ok.stdout and "math" in ok.stdout and "gsm8k" in ok.stdout
    bad = write(tmp_path, RUBRICS.replace("scale = [0, 5]", "scale = [0]"), "bad.toml")
    failed = subprocess.run([*RQ, "rubrics", "check", str(bad)],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert failed.returncode == 2
    assert f"{bad}:21: rubric 'style': 'scale' must be" in failed.stderr
    assert "Traceback" not in failed.stderr
