"""The CLI refuses bad arguments with exit status 2 and a message, before starting anything."""

from __future__ import annotations

import pytest

from idlefleet.cli.main import main

TRACE = ["--trace", "trace.jsonl"]  # an agent needs a state source; the file is never read
AGENT = ["agent", "--nats-url", "nats://x:1", "--vehicle-id", "car-1"]


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["up", "--agents", "0"], "positive integer"),
        (["up", "--port", "70000"], "port must be"),
        (["agent", "--nats-url", "nats://x:1", "--vehicle-id", "bad id", *TRACE], "vehicle id"),
        (["agent", "--nats-url", "http://x", "--vehicle-id", "car-1", *TRACE], "nats://"),
        (["agent", "--nats-url", "nats://x:1", "--vehicle-id", "c", "--tops", "-1"], "positive"),
        (["coordinator", "--nats-url", "nats://x:1", "--store", "mysql://x"], "store URL"),
        (["agent", "--nats-url", "nats://x:1", "--vehicle-id", "c"], "--trace --kuksa"),
        ([*AGENT, *TRACE, "--kuksa", "h:1"], "not allowed with"),
        ([*AGENT, "--kuksa", "no-port"], "HOST:PORT"),
        ([*AGENT, "--kuksa", "host:99999"], "HOST:PORT"),
        ([*AGENT, *TRACE, "--resume-after", "-1"], "number >= 0"),
        ([*AGENT, *TRACE, "--trace-speed", "0"], "positive"),
        ([*AGENT, "--trace", "/nonexistent/trace.jsonl"], "cannot read trace"),
        (["frobnicate"], "invalid choice"),
        (["coordinator", "--nats-url", "nats://a:1,,nats://b:2"], "empty (a stray comma?)"),
        (["coordinator", "--nats-url", "nats://a:1,nats://b"], "needs a host and a port"),
        (["coordinator", "--nats-url", "nats://a:1", "--claim-seconds", "0"], "positive"),
        (["agent", "--nats-url", "nats://a:1,redis://b:2", "--vehicle-id", "c", *TRACE], "nats://"),
        (["up", "--replicas", "2"], "needs a shared store"),
        (["up", "--nats-cluster", "2"], "cannot survive losing a node"),
        (["up", "--store", "mysql://x/y"], "store URL"),
        (["up", "--replicas", "0"], "positive integer"),
        ([*AGENT, *TRACE, "--precision", "int8"], "invalid choice"),
        (
            [*AGENT, *TRACE, "--precision", "fp16", "--models", "SmolLM2-135M-Instruct"],
            "only all-MiniLM-L6-v2 can run at precision 'fp16'",
        ),
    ],
)
def test_bad_arguments_exit_2_with_a_reason(
    argv: list[str], fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        code = main(argv)
        raise SystemExit(code)
    assert exited.value.code == 2
    assert fragment in capsys.readouterr().err
