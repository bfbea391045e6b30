"""`pipeline.train.fit.retry_port_races`: a worker group that lost the rendezvous-port race starts again; nothing
else is retried."""

from __future__ import annotations

import pytest

from pipeline.train import fit


def _starter(failures: list[Exception]):
    attempts: list[int] = []

    def start(attempt: int) -> None:
        attempts.append(attempt)
        if failures:
            raise failures.pop(0)

    return start, attempts


def test_a_lost_port_race_starts_the_worker_group_again(monkeypatch, caplog):
    monkeypatch.setattr(fit.time, "sleep", lambda s: None)
    race = RuntimeError("DistNetworkError: The server socket has failed to listen ... name: EADDRINUSE, message: "
                        "address already in use")
    start, attempts = _starter([race, race])
    fit.retry_port_races(start, "train_x", retries=3)
    assert attempts == [0, 1, 2]
    assert sum("lost a port race" in r.message for r in caplog.records) == 2


def test_other_failures_and_exhausted_retries_are_raised():
    start, attempts = _starter([ValueError("bad config")])
    with pytest.raises(ValueError, match="bad config"):
        fit.retry_port_races(start, "train_x", retries=3)
    assert attempts == [0]
    race = RuntimeError("address already in use")
    start, attempts = _starter([race, race, race])
    with pytest.raises(RuntimeError, match="address already in use"):
        fit.retry_port_races(start, "train_x", retries=1)
    assert attempts == [0, 1]
