"""The ``rewardq`` console script as a user runs it, always as a real subprocess.

- every subcommand, nested ones included, answers ``--help`` (found by walking
  ``build_parser()``, so a new subcommand is covered without editing this file);
- every ``rewardq`` command line in README.md parses, and the long-running ones (the
  local judge, the embedded Redis) start from the README's exact line, serve, and stop;
- ``rewardq submit`` on a bad file says what is wrong, where, exits 2 with no
  traceback, and enqueues nothing (checked on the test's own Redis database).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import queue
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from rewardq.broker.app import QUEUE_JUDGE
from rewardq.broker.embedded import free_port
from rewardq.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
_SCRIPT = Path(sys.executable).with_name("rewardq")
#: How this test runs ``rewardq``: the installed console script, else the module.
RQ = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "rewardq.cli"]


def _run(argv: Sequence[str], *, redis_url: str | None = None,
         timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if redis_url is not None:
        env["REWARDQ_REDIS_URL"] = redis_url
    return subprocess.run([*RQ, *argv], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=timeout_s, check=False)


# ------------------------------------------------------------------- every subcommand

def subcommand_paths(parser: argparse.ArgumentParser,
                     prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every subcommand under ``parser``, as its words (``("failed", "list")``)."""
    paths: list[tuple[str, ...]] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths.append((*prefix, name))
                paths.extend(subcommand_paths(sub, (*prefix, name)))
    return paths


def test_subcommand_discovery_finds_the_nested_ones() -> None:
    paths = set(subcommand_paths(build_parser()))
    assert {("judge-server",), ("redis",), ("worker",), ("submit",), ("failed",),
            ("failed", "list"), ("failed", "show"), ("failed", "replay"),
            ("failed", "purge")} <= paths


def test_every_subcommand_answers_help_with_its_usage() -> None:
    paths = [(), *subcommand_paths(build_parser())]
    # All at once: each is a fresh interpreter importing the whole CLI.
    env = dict(os.environ)
    procs = {path: subprocess.Popen([*RQ, *path, "--help"], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
             for path in paths}
    failures = []
    for path, proc in procs.items():
        out, err = proc.communicate(timeout=180)
        usage = " ".join(("usage: rewardq", *path))
        if proc.returncode != 0 or not out.startswith(usage) or "Traceback" in err:
            failures.append(f"rewardq {' '.join(path)} --help: exit {proc.returncode}\n"
                            f"stdout: {out[:300]!r}\nstderr: {err[-800:]}")
    assert not failures, "\n\n".join(failures)


# ------------------------------------------------------------------- the README's lines

@dataclass(frozen=True)
class ReadmeCommand:
    """A ``rewardq`` command line from README.md, split as a shell would."""

    line: str
    env: dict[str, str]
    program: str
    args: list[str]

    @property
    def argv(self) -> list[str]:
        """What to run: the README's own program path when it exists here."""
        program = ROOT / self.program
        return [*([str(program)] if program.is_file() else RQ), *self.args]


def _as_command(line: str) -> ReadmeCommand | None:
    # Only lines that run rewardq (after any VAR=value) are parsed: other shell lines
    # (a curl whose JSON spans several lines) need not be whole commands.
    if not re.match(r"\s*([A-Z_][A-Z0-9_]*=\S*\s+)*(\S*/)?rewardq(\s|$)", line):
        return None
    tokens = shlex.split(line, comments=True)
    env: dict[str, str] = {}
    while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", tokens[0]):
        name, _, value = tokens.pop(0).partition("=")
        env[name] = value
    if not tokens or not (tokens[0] == "rewardq" or tokens[0].endswith("/rewardq")):
        return None
    return ReadmeCommand(line.strip(), env, tokens[0], tokens[1:])


def readme_commands() -> list[ReadmeCommand]:
    """``rewardq`` lines of the README's shell code blocks, and inline code spans that are
    whole ``rewardq ...`` commands (a synopsis with ``[optional]`` parts is not a command).

    Untagged blocks are program output (the benchmark table starts with "rewardq" too).
    """
    text = README.read_text(encoding="utf-8")
    commands = []
    fence = re.compile(r"^```([^\n]*)\n(.*?)^```", re.S | re.M)
    for language, block in fence.findall(text):
        if language.strip() not in ("bash", "sh", "shell", "console"):
            continue
        for line in block.replace("\\\n", " ").splitlines():
            command = _as_command(line)
            if command is not None:
                commands.append(command)
    for span in re.findall(r"`([^`]+)`", fence.sub("", text)):
        if re.match(r"(\S*/)?rewardq ", span) and "[" not in span:
            command = _as_command(span)
            if command is not None:
                commands.append(command)
    return commands


def _command_id(command: ReadmeCommand) -> str:
    return shlex.join([command.program, *command.args])


README_COMMANDS = readme_commands()


def test_the_readme_shows_the_commands_this_file_checks() -> None:
    lines = {c.line for c in README_COMMANDS}
    assert any(c.args[:1] == ["judge-server"] and "--help" not in c.args
               for c in README_COMMANDS), lines
    assert any(c.args[:1] == ["redis"] for c in README_COMMANDS), lines
    assert any(c.args[:1] == ["submit"] for c in README_COMMANDS), lines


@pytest.mark.parametrize("command", README_COMMANDS, ids=_command_id)
def test_every_readme_command_line_parses(command: ReadmeCommand,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    if "--help" in command.args or "-h" in command.args:
        with pytest.raises(SystemExit) as exited:
            parser.parse_args(command.args)
        assert exited.value.code == 0
        assert capsys.readouterr().out.startswith("usage: rewardq")
        return
    args = parser.parse_args(command.args)
    assert callable(args.func)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


@contextlib.contextmanager
def _started(argv: Sequence[str], env: dict[str, str], ready: re.Pattern[str],
             timeout_s: float = 60) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """Start ``argv``; yield it and the first group of ``ready`` once a line matches."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT, env={**os.environ, **env})
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"{shlex.join(argv)}: not ready in {timeout_s}s: {''.join(seen)}")
            if line is None:
                pytest.fail(f"{shlex.join(argv)} exited {proc.wait()}: {''.join(seen)}")
            seen.append(line)
            match = ready.search(line)
            if match:
                break
        yield proc, match.group(1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


LONG_RUNNING = [c for c in README_COMMANDS
                if c.args[:1] in (["judge-server"], ["redis"]) and "--help" not in c.args]


@pytest.mark.parametrize("command", LONG_RUNNING, ids=_command_id)
def test_readme_long_running_command_starts_serves_and_stops(command: ReadmeCommand) -> None:
    """The README's exact line; a ``--port`` is added only when the line names none and
    its default port is already taken on this machine (by something else)."""
    parsed = build_parser().parse_args(command.args)
    argv = command.argv
    port = parsed.port
    if "--port" not in command.args and _listening(port):
        port = free_port()
        argv = [*argv, "--port", str(port)]
    if command.args[0] == "judge-server":
        with _started(argv, command.env, re.compile(r"judge server listening on (\S+)")) \
                as (proc, url):
            assert url == f"http://127.0.0.1:{port}/v1"
            assert httpx.get(f"{url}/models", timeout=10).status_code == 200
            config = httpx.get(url.removesuffix("/v1") + "/admin/config", timeout=10).json()
            assert config["latency_ms"] == parsed.latency_ms
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
    else:
        with _started(argv, command.env, re.compile(r"embedded Redis listening on (\S+)")) \
                as (proc, url):
            assert url == f"redis://127.0.0.1:{port}/0"
            client = redis.Redis.from_url(url, socket_timeout=5)
            assert client.ping()
            client.close()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
    assert not _listening(port), f"{command.line} left something listening on {port}"


# ------------------------------------------------------------------- submit, bad input

GOOD_LINE = '{{"id": "item-{n}", "prompt": "What is {n} + 1?", "response": "{m}"}}\n'
GOOD = "".join(GOOD_LINE.format(n=n, m=n + 1) for n in range(99)).encode()
DEEP_METADATA = ('{"id": "deep", "prompt": "p", "response": "r", "metadata": '
                 + '{"a": ' * 900 + "1" + "}" * 900 + "}\n").encode()

#: Bad files: (what is written, what the error must say). The bad line is line 100, after
#: 99 good ones, so a client that sent chunks as it went would have sent some.
BAD_CONTENT = {
    "invalid-utf8": (b'{"id": "x", "prompt": "p", "response": "caf\xe9"}\n',
                     "line 100: not valid UTF-8"),
    "json-nested-100000-deep": (b"[" * 100_000 + b"]" * 100_000 + b"\n",
                                "line 100: JSON nested too deeply"),
    "metadata-too-deep-to-serialize": (DEEP_METADATA,
                                       "line 100 (id='deep'): field 'metadata'"),
    "not-json": (b"{'id': 1}\n", "line 100: not valid JSON"),
    "integer-beyond-python-limit": (b'{"id": "x", "prompt": "p", "response": "r", '
                                    b'"metadata": {"n": ' + b"9" * 5000 + b"}}\n",
                                    "line 100: cannot read this JSON"),
}


def _assert_refused(result: subprocess.CompletedProcess[str], *expected: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for text in expected:
        assert text in result.stderr, result.stderr
    assert result.stdout == ""


def _queued(redis_url: str) -> int:
    client = redis.Redis.from_url(redis_url)
    try:
        return int(client.llen(QUEUE_JUDGE))
    finally:
        client.close()


@pytest.mark.parametrize("case", sorted(BAD_CONTENT))
def test_submit_refuses_a_bad_file_naming_the_line_and_enqueues_nothing(
        case: str, redis_url: str, tmp_path: Path) -> None:
    content, expected = BAD_CONTENT[case]
    path = tmp_path / f"{case}.jsonl"
    path.write_bytes(GOOD + content)
    result = _run(["submit", str(path)], redis_url=redis_url)
    _assert_refused(result, f"error: {path}: ", expected)
    assert _queued(redis_url) == 0


@pytest.mark.parametrize("case", ["missing-file", "directory"])
def test_submit_refuses_a_path_it_cannot_read(case: str, redis_url: str,
                                              tmp_path: Path) -> None:
    path = tmp_path / "items.jsonl"
    if case == "directory":
        path.mkdir()
    result = _run(["submit", str(path)], redis_url=redis_url)
    reason = "Is a directory" if case == "directory" else "No such file or directory"
    _assert_refused(result, f"error: {path}: cannot read it: {reason}")
    assert _queued(redis_url) == 0


def test_submit_refuses_an_out_path_in_a_missing_directory_before_sending(
        redis_url: str, tmp_path: Path) -> None:
    path = tmp_path / "items.jsonl"
    path.write_bytes(GOOD)
    out = tmp_path / "no-such-dir" / "results.jsonl"
    result = _run(["submit", str(path), "--out", str(out)], redis_url=redis_url)
    _assert_refused(result, f"--out {out}: no directory")
    assert _queued(redis_url) == 0


def test_submit_of_a_good_file_does_enqueue(redis_url: str, tmp_path: Path) -> None:
    """The oracle of the tests above can fail: a good file, with no worker to take it,
    leaves its chunks in the queue those tests find empty."""
    path = tmp_path / "items.jsonl"
    path.write_bytes(GOOD)
    result = _run(["submit", str(path), "--timeout", "0.5"], redis_url=redis_url)
    assert result.returncode == 1, result.stderr
    assert "submitted 99 items" in result.stderr
    assert _queued(redis_url) >= 1


def test_submit_reports_progress_on_a_pipe_and_points_at_the_output_and_failures(
        settings, workers, judge, tmp_path: Path) -> None:
    """Not a terminal (a pipe): plain progress lines, then the output path; an item that
    fails for good is pointed at `rewardq failed list`."""
    import json as _json

    from scoring_data import make_items

    from rewardq.stack import settings_env

    workers(1)
    items = make_items(300, "progress")
    path, out = tmp_path / "items.jsonl", tmp_path / "results.jsonl"
    path.write_text("".join(_json.dumps(i) + "\n" for i in items))
    judge.configure(error_rate=1.0, error_kinds=["400"], seed=1)  # every call fails for good
    done = subprocess.run([*RQ, "submit", str(path), "--out", str(out), "--timeout", "120"],
                          capture_output=True, text=True, env=settings_env(settings),
                          cwd=ROOT, timeout=180, check=False)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.splitlines()
    progress = [line for line in lines if line.startswith("progress: ")]
    assert progress and progress[-1].startswith("progress: 300/300 items"), done.stderr
    assert f"results in {out}" in done.stderr
    assert "rewardq failed list" in done.stderr
    assert len(out.read_text().splitlines()) == 300


def test_an_invalid_setting_is_named_without_a_traceback_or_its_value() -> None:
    env = {**os.environ, "REWARDQ_CHUNK_SIZE": "lots-of-secret-sauce"}
    done = subprocess.run([*RQ, "failed", "list"], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=60, check=False)
    assert done.returncode == 2
    assert "REWARDQ_CHUNK_SIZE" in done.stderr and "Traceback" not in done.stderr
    assert "secret-sauce" not in done.stderr


def test_version_is_the_distributions() -> None:
    from importlib.metadata import version

    import rewardq

    for argv in ([sys.executable, "-m", "rewardq", "--version"],
                 [str(Path(sys.executable).parent / "rewardq"), "--version"]):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == f"rewardq {version('rewardq')}"
    assert rewardq.__version__ == version("rewardq")
