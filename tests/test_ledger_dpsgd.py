"""The site ledger with DP-SGD releases (-tt real / mix): one ledger, one composed total
(opacus PRV over votes and DP-SGD rounds), exact GDP unchanged while only votes are in it, and
old ledger files read as before."""

from __future__ import annotations

import json

import pytest

from coautogen_fl.privacy import (
    BudgetExceededError,
    LedgerCorruptError,
    PrivacyLedger,
    epsilon_for_noise,
    epsilon_for_releases,
)
from coautogen_fl.privacy.split import plan_noise, training_share

DELTA = 1e-5


def test_votes_only_ledger_is_exact_gdp_and_keeps_its_file_format(tmp_path):
    ledger = PrivacyLedger(tmp_path / "l.json", 1.0, DELTA)
    for r in (1, 2):
        ledger.charge(7.0, round=r, run_id="a")
    assert ledger.spent_epsilon() == epsilon_for_noise([7.0, 7.0], DELTA)  # bit for bit
    entries = json.loads((tmp_path / "l.json").read_text())["entries"]
    assert [sorted(e) for e in entries] == [["noise_multiplier", "round", "run_id", "timestamp"]] * 2


def test_an_old_ledger_file_loads_and_composes_with_dpsgd(tmp_path):
    old = {
        "version": 1,
        "delta": DELTA,
        "epsilon_budget": 2.0,
        "entries": [{"noise_multiplier": 6.0, "round": 1, "run_id": "old", "timestamp": "2026-01-01T00:00:00+00:00"}],
    }
    (tmp_path / "l.json").write_text(json.dumps(old))
    ledger = PrivacyLedger(tmp_path / "l.json", 2.0, DELTA)
    assert ledger.entries[0].sample_rate == 1.0 and ledger.entries[0].steps == 1
    total = ledger.charge(5.0, round=2, run_id="new", sample_rate=0.25, steps=10)
    assert total == pytest.approx(epsilon_for_releases([(6.0, 1.0, 1), (5.0, 0.25, 10)], DELTA), rel=1e-12)
    # PRV over both, more than either alone, far less than their sum would be if the vote cost
    # were added in a loose way: the composition is one accountant.
    alone = epsilon_for_releases([(5.0, 0.25, 10)], DELTA)
    assert max(alone, epsilon_for_noise([6.0], DELTA)) < total < alone + epsilon_for_noise([6.0], DELTA)
    saved = json.loads((tmp_path / "l.json").read_text())["entries"][1]
    assert (saved["sample_rate"], saved["steps"]) == (0.25, 10)


def test_composition_does_not_depend_on_the_charge_order():
    a = epsilon_for_releases([(6.0, 1.0, 1), (5.0, 0.25, 10), (6.0, 1.0, 1)], DELTA)
    b = epsilon_for_releases([(5.0, 0.25, 10), (6.0, 1.0, 1), (6.0, 1.0, 1)], DELTA)
    assert a == b


@pytest.mark.parametrize("task_type,votes", [("real", 0), ("mix", 2)])
def test_votes_plus_dpsgd_rounds_never_exceed_the_budget(tmp_path, task_type, votes):
    """The server's plan, charged release by release in a site's ledger, ends within the budget;
    one more release is refused and leaves the file byte-identical."""
    epsilon, rounds, steps, rate = 1.0, 3, 4, 0.5
    plan = plan_noise(epsilon, DELTA, votes + 1, training_share(task_type, 0.0), rate, steps, rounds)
    ledger = PrivacyLedger(tmp_path / "l.json", epsilon, DELTA)
    r = 0
    for r in range(1, votes + 1):
        assert ledger.charge(plan.gaussian, round=r, run_id="x") <= epsilon
    for r in range(votes + 1, votes + rounds + 1):
        assert ledger.charge(plan.training, round=r, run_id="x", sample_rate=rate, steps=steps) <= epsilon
    spent = ledger.charge(plan.gaussian, round=r + 1, run_id="x")  # the noised evaluation
    assert 0.99 * epsilon <= spent <= epsilon * (1 + 1e-6)
    assert spent == plan.epsilon
    before = (tmp_path / "l.json").read_bytes()
    with pytest.raises(BudgetExceededError) as refused:
        ledger.charge(plan.training, round=r + 2, run_id="x", sample_rate=rate, steps=steps)
    assert refused.value.requested > epsilon and refused.value.spent == pytest.approx(spent)
    assert (tmp_path / "l.json").read_bytes() == before
    assert len(PrivacyLedger(tmp_path / "l.json", epsilon, DELTA).entries) == votes + rounds + 1


def test_the_split_gives_the_gaussian_releases_their_share():
    plan = plan_noise(1.0, DELTA, 3, 0.5, 0.5, 4, 3)
    assert epsilon_for_noise([plan.gaussian] * 3, DELTA) == pytest.approx(0.5, rel=1e-6)
    assert (
        training_share("real", 0.0) == 0.9 and training_share("mix", 0.0) == 0.5 and training_share("mix", 0.7) == 0.7
    )
    assert training_share("syn", 0.7) == 0.0


def test_a_corrupt_dpsgd_entry_is_refused(tmp_path):
    bad = {
        "version": 1,
        "delta": DELTA,
        "epsilon_budget": 1.0,
        "entries": [
            {"noise_multiplier": 6.0, "round": 1, "run_id": "x", "timestamp": "t", "sample_rate": 0.0, "steps": 3}
        ],
    }
    (tmp_path / "l.json").write_text(json.dumps(bad))
    with pytest.raises(LedgerCorruptError, match="entry 0"):
        PrivacyLedger(tmp_path / "l.json", 1.0, DELTA)


@pytest.mark.parametrize(
    "history", [((6.9, 0.25, 50), (30.7, 1.0, 1)), ((4.2, 0.5, 4), (30.7, 1.0, 1)), ((1.0, 0.1, 100),)]
)
def test_the_integer_order_domain_gives_opacus_prv_epsilon(history):
    """The ledger's PRV sizes its domain with integer Renyi orders only (faster); the epsilon is
    opacus' own PRV epsilon, to far below PRV's 0.01 error."""
    from opacus.accountants import PRVAccountant

    stock = PRVAccountant()
    stock.history = list(history)
    assert epsilon_for_releases(list(history), DELTA) == pytest.approx(stock.get_epsilon(DELTA), abs=1e-4)


def test_the_two_accountants_cross_check():
    """Votes only: the exact GDP total and opacus' PRV agree within PRV's documented 1-2 %; with
    DP-SGD, RDP (looser) is above PRV and within 15 % of it."""
    from opacus.accountants import RDPAccountant

    votes = [(7.0, 1.0, 1)] * 3
    exact = epsilon_for_releases(votes, DELTA)
    from coautogen_fl.privacy.accountant import _prv_epsilon

    assert exact <= _prv_epsilon(((7.0, 1.0, 3),), DELTA) <= exact * 1.02
    mixed = [(7.0, 1.0, 1), (6.9, 0.25, 50)]
    rdp = RDPAccountant()
    rdp.history = [(7.0, 1.0, 1), (6.9, 0.25, 50)]
    prv = epsilon_for_releases(mixed, DELTA)
    assert prv < rdp.get_epsilon(DELTA) <= prv * 1.15
