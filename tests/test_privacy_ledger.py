"""The site's persistent privacy ledger: accumulation, refusal, persistence, corruption."""

import json
import os

import pytest

from coautogen_fl.privacy import (
    BudgetExceededError,
    LedgerCorruptError,
    PrivacyError,
    PrivacyLedger,
    epsilon_for_noise,
    noise_multiplier_for_epsilon,
)

DELTA = 1e-5


def _only_ledger_left(directory, name="ledger.json"):
    """No temporary file is left: only the ledger and its (empty, persistent) lock file."""
    assert sorted(os.listdir(directory)) in ([name], [name, name + ".lock"])


def test_empty_ledger_creates_no_file(tmp_path):
    ledger = PrivacyLedger(tmp_path / "state" / "ledger.json", 1.0, DELTA)
    assert ledger.spent_epsilon() == 0.0
    assert ledger.entries == [] and ledger.rounds_charged == 0
    assert not (tmp_path / "state").exists()


def test_charge_accumulates_and_persists(tmp_path):
    path = tmp_path / "state" / "ledger.json"
    ledger = PrivacyLedger(path, 5.0, DELTA)
    first = ledger.charge(4.0, round=1, run_id="run-a")
    assert first == pytest.approx(epsilon_for_noise([4.0], DELTA), rel=1e-12)
    assert ledger.epsilon_after(6.0) == pytest.approx(epsilon_for_noise([4.0, 6.0], DELTA))
    second = ledger.charge(6.0, round=2, run_id="run-a")
    assert second == pytest.approx(epsilon_for_noise([4.0, 6.0], DELTA), rel=1e-12)
    assert second > first

    reopened = PrivacyLedger(path, 5.0, DELTA)
    assert reopened.spent_epsilon() == pytest.approx(second, rel=1e-12)
    assert reopened.rounds_charged == 2
    assert [(e.noise_multiplier, e.round, e.run_id) for e in reopened.entries] == [
        (4.0, 1, "run-a"),
        (6.0, 2, "run-a"),
    ]
    assert all(e.timestamp for e in reopened.entries)
    # A new run on the same site keeps spending from the same budget.
    third = reopened.charge(4.0, round=1, run_id="run-b")
    assert third == pytest.approx(epsilon_for_noise([4.0, 6.0, 4.0], DELTA), rel=1e-12)
    _only_ledger_left(path.parent)


def test_refusal_writes_nothing(tmp_path):
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger(path, 1.0, DELTA)
    spent = ledger.charge(10.0, round=1)
    before = path.read_bytes()
    with pytest.raises(BudgetExceededError, match=r"budget 1\b.*already spent") as info:
        ledger.charge(1.0, round=2, run_id="greedy")
    err = info.value
    assert err.budget == 1.0 and err.spent == pytest.approx(spent)
    assert err.requested == pytest.approx(epsilon_for_noise([10.0, 1.0], DELTA))
    assert path.read_bytes() == before
    assert ledger.rounds_charged == 1 and ledger.spent_epsilon() == pytest.approx(spent)
    _only_ledger_left(tmp_path)


def test_first_charge_over_budget_creates_no_file(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.json", 0.5, DELTA)
    with pytest.raises(BudgetExceededError):
        ledger.charge(0.5, round=1)
    assert "ledger.json" not in os.listdir(tmp_path)  # only the empty lock file may exist


@pytest.mark.parametrize("epsilon, rounds", [(1.0, 10), (4.0, 25), (0.3, 3)])
def test_calibrated_schedule_lands_on_budget(tmp_path, epsilon, rounds):
    path = tmp_path / "ledger.json"
    sigma = noise_multiplier_for_epsilon(epsilon, DELTA, rounds)
    ledger = PrivacyLedger(path, epsilon, DELTA)
    for t in range(rounds):
        spent = ledger.charge(sigma, round=t + 1, run_id="calibrated")
    assert spent == pytest.approx(epsilon, rel=1e-6)
    with pytest.raises(BudgetExceededError):
        ledger.charge(sigma, round=rounds + 1, run_id="calibrated")
    # Even a tiny extra release (huge noise) is refused once the budget is exhausted.
    with pytest.raises(BudgetExceededError):
        PrivacyLedger(path, epsilon, DELTA).charge(sigma * 100, round=rounds + 1)
    assert PrivacyLedger(path, epsilon, DELTA).rounds_charged == rounds
    _only_ledger_left(tmp_path)


def test_delta_mismatch_is_refused(tmp_path):
    path = tmp_path / "ledger.json"
    PrivacyLedger(path, 1.0, DELTA).charge(5.0, round=1)
    with pytest.raises(PrivacyError, match=r"created with delta=1e-05.*new state dir"):
        PrivacyLedger(path, 1.0, 1e-6)


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "",
        "[]",
        json.dumps({"delta": 1e-5}),
        json.dumps({"delta": 1e-5, "entries": [{"noise_multiplier": -1.0, "round": 1}]}),
        json.dumps({"delta": 1e-5, "entries": [{"round": 1, "run_id": "", "timestamp": ""}]}),
    ],
)
def test_corrupt_file_raises_naming_path(tmp_path, content):
    path = tmp_path / "ledger.json"
    path.write_text(content)
    with pytest.raises(LedgerCorruptError, match="ledger.json.*corrupt") as info:
        PrivacyLedger(path, 1.0, DELTA)
    assert str(path) in str(info.value)
    assert path.read_text() == content  # never silently reset


def test_invalid_arguments(tmp_path):
    with pytest.raises(PrivacyError, match="privacy.epsilon"):
        PrivacyLedger(tmp_path / "l.json", 0.0, DELTA)
    with pytest.raises(PrivacyError, match="privacy.delta"):
        PrivacyLedger(tmp_path / "l.json", 1.0, 1.0)
    ledger = PrivacyLedger(tmp_path / "l.json", 1.0, DELTA)
    with pytest.raises(PrivacyError, match="noise_multiplier"):
        ledger.charge(0.0, round=1)
    with pytest.raises(PrivacyError, match="round"):
        ledger.charge(5.0, round=-1)
    assert os.listdir(tmp_path) == []


def test_failed_write_leaves_no_temp_file_and_no_charge(tmp_path, monkeypatch):
    path = tmp_path / "ledger.json"
    ledger = PrivacyLedger(path, 5.0, DELTA)
    ledger.charge(4.0, round=1)
    before = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        ledger.charge(4.0, round=2)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert ledger.rounds_charged == 1  # memory never claims a charge the file lacks
    _only_ledger_left(tmp_path)


def test_two_ledger_objects_on_one_file_never_lose_a_charge(tmp_path):
    """Two processes serving the same site (e.g. simulation workers) each hold a ledger object;
    the file, re-read under a lock, is the record, so no charge is overwritten by a stale copy."""
    from coautogen_fl.privacy import epsilon_for_noise, noise_multiplier_for_epsilon

    path = tmp_path / "ledger.json"
    sigma = noise_multiplier_for_epsilon(1.0, 1e-5, 4)
    first, second = PrivacyLedger(path, 1.0, 1e-5), PrivacyLedger(path, 1.0, 1e-5)
    first.charge(sigma, round=1)
    second.charge(sigma, round=2)  # built before the first charge: must see it
    spent = first.charge(sigma, round=3)
    assert spent == pytest.approx(epsilon_for_noise([sigma] * 3, 1e-5), rel=1e-9)
    assert len(PrivacyLedger(path, 1.0, 1e-5).entries) == 3
    second.charge(sigma, round=4)
    with pytest.raises(BudgetExceededError):
        first.charge(sigma, round=5)
