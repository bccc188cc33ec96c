"""``privacy.mode=secagg``: vote rounds through Flower's SecAgg+ with distributed discrete noise.

Everything here runs Flower's real SecAgg+ workflow (server) and ``secaggplus_mod`` (sites)
in-process: :class:`strategy_helpers.SecureGrid` hands each Message, copied, to the real
ClientApp with its mods, and can make a site drop out at a given stage.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import ArrayRecord
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from scipy import stats

from clients import client_app
from clients.secagg import SecAggSetup
from clients.site import Site
from coautogen_fl import protocol as P
from coautogen_fl.config import ConfigError, load_config
from coautogen_fl.privacy import PrivacyLedger
from coautogen_fl.secure_votes import MODULUS, SecAggShape, SecureVoteEncoding
from strategies.secagg import SecureRound
from strategies.server_app import build_strategy

from strategy_helpers import (
    SecureGrid,
    small_config,
    task_identity,  # noqa: F401  (pytest fixture, used by name)
)

FIVE = [21, 22, 23, 24, 25]
#: These sites set their own terms (a deployment's node config): they count on every site.
TRUST_ALL = {"secagg-trust-sites": 100}


@pytest.fixture(autouse=True)
def fresh_sites(monkeypatch):
    monkeypatch.setattr(client_app, "_SITES", {})


@pytest.fixture
def spy(monkeypatch):
    """Each site's clean votes and the integer votes it hands to SecAgg+, by partition id."""
    seen: dict[str, dict[int, np.ndarray]] = {"clean": {}, "sent": {}}
    clean_votes, secure_vote = Site._clean_votes, Site._secure_vote

    def clean(self, request):
        votes = clean_votes(self, request)
        seen["clean"][self.partition_id] = votes
        return votes

    def sent(self, request, setup, run_id=""):
        reply = secure_vote(self, request, setup, run_id)
        seen["sent"][self.partition_id] = np.asarray(reply.votes)
        return reply

    monkeypatch.setattr(Site, "_clean_votes", clean)
    monkeypatch.setattr(Site, "_secure_vote", sent)
    return seen


def secure_round(tmp_path, nodes, *overrides, lost=None):
    """One vote round of a fresh secagg strategy through SecAgg+; (strategy, grid, revealed sum)."""
    cfg = small_config("privacy.mode=secagg", f"federation.num_hospitals={len(nodes)}", *overrides)
    strategy = build_strategy(cfg, tmp_path / "run")
    strategy.evolution.start()
    embeddings, labels = strategy.evolution.payload()
    secure = strategy.secure
    secure.plan(len(nodes), len(labels))
    grid = SecureGrid(cfg, tmp_path, nodes, lost=lost, **TRUST_ALL)
    revealed = SecureRound(secure.shape, secure.encoding, 10).run(
        grid, nodes, strategy.vote_request(1, embeddings, labels)
    )
    return strategy, grid, revealed


def test_protocol_spells_flowers_secagg_record():
    assert P.SECAGG_CONFIGS == RECORD_KEY_CONFIGS


def test_only_the_sum_is_revealed_and_each_site_sends_a_masked_vector(tmp_path, spy):
    strategy, grid, revealed = secure_round(tmp_path, FIVE)
    assert revealed is not None and sorted(revealed.bookkeeping) == FIVE
    encoding = strategy.secure.encoding
    # The server recovers exactly the sum of the integers the five sites handed to SecAgg+ ...
    np.testing.assert_array_equal(revealed.integers, sum(spy["sent"].values()))
    # ... while what each site sent is its integers under masks: uniform on [0, 2^32).
    collected = [r for _, stage, r in grid.replies if stage == Stage.COLLECT_MASKED_VECTORS]
    assert len(collected) == 5
    for reply in collected:
        masked = bytes_to_ndarray(reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS][1])
        assert masked.shape == (len(strategy.evolution.pool),)
        assert stats.kstest(masked.astype(np.float64) / MODULUS, "uniform").pvalue > 1e-4
        assert not reply.content.array_records[P.FITRES_ARRAYS]  # the clear arrays were removed
    # The site's own integers are far from uniform: the test above has teeth.
    own = spy["sent"][0].astype(np.float64) + encoding.bound
    assert stats.kstest(own / MODULUS, "uniform").pvalue < 1e-6


def test_one_of_five_sites_dropping_mid_round_still_completes(tmp_path, spy):
    lost = {25: {Stage.COLLECT_MASKED_VECTORS, Stage.UNMASK}}  # gone after sharing its keys
    strategy, _, revealed = secure_round(tmp_path, FIVE, lost=lost)
    assert revealed is not None and sorted(revealed.bookkeeping) == FIVE[:4]
    survivors = [spy["sent"][pid] for pid in range(4)]
    np.testing.assert_array_equal(revealed.integers, sum(survivors))


def test_sparse_neighbourhoods_beyond_the_largest_window(tmp_path, spy, monkeypatch):
    """12 sites, windows of 5: SecAgg+ shares keys within each window only, and the sum still
    holds every site; the sites size their noise for the 2 x 3 = 6 any revealed sum holds."""
    import coautogen_fl.secure_votes as secure_votes

    monkeypatch.setattr(secure_votes, "MAX_NEIGHBOURS", 5)
    nodes = list(range(51, 63))
    strategy, grid, revealed = secure_round(tmp_path, nodes, lost={62: {Stage.COLLECT_MASKED_VECTORS, Stage.UNMASK}})
    shape = strategy.secure.shape
    assert (shape.neighbours, shape.reconstruction, shape.sites_in_sum) == (5, 3, 6)
    assert revealed is not None and sorted(revealed.bookkeeping) == nodes[:-1]
    np.testing.assert_array_equal(revealed.integers, sum(spy["sent"].values()))
    shares = [r for _, stage, r in grid.replies if stage == Stage.SHARE_KEYS]
    assert all(len(r.content.config_records[RECORD_KEY_CONFIGS][Key.DESTINATION_LIST]) == 4 for r in shares)


def test_a_site_lost_while_unmasking_is_still_in_the_sum(tmp_path, spy):
    strategy, _, revealed = secure_round(tmp_path, FIVE, lost={24: {Stage.UNMASK}})
    assert revealed is not None and len(revealed.bookkeeping) == 5
    np.testing.assert_array_equal(revealed.integers, sum(spy["sent"].values()))


def test_dropouts_below_the_threshold_reveal_nothing_and_the_charges_stand(tmp_path, spy):
    lost = {n: {Stage.COLLECT_MASKED_VECTORS, Stage.UNMASK} for n in FIVE[2:]}  # 2 of 5 left, threshold 3
    strategy, _, revealed = secure_round(tmp_path, FIVE, lost=lost)
    assert strategy.secure.encoding.summands == strategy.secure.shape.reconstruction == 3
    assert revealed is None
    cfg = strategy.cfg
    for pid in range(5):
        ledger = PrivacyLedger(tmp_path / f"site{pid}" / "privacy_ledger.json", cfg.privacy.epsilon, cfg.privacy.delta)
        assert len(ledger.entries) == (1 if pid < 2 else 0)  # charged before the masked input left
        assert all(e.kind == "ddg" for e in ledger.entries)
    with pytest.raises(Exception, match="secure aggregation aborted"):
        strategy.sampled[1] = FIVE
        strategy.secure.revealed = None
        strategy.aggregate_train(1, [])


def test_secagg_noise_equals_central_noise_when_every_site_counts(tmp_path, spy):
    """With threshold = all sites, the revealed sum carries the central amount of noise: the
    residual against the clean sum has the std central mode adds (s x sensitivity)."""
    nodes = list(range(31, 41))
    strategy, _, revealed = secure_round(
        tmp_path, nodes, "privacy.secagg_threshold=1.0", "feedback.candidates_per_label=30", "feedback.k=1"
    )
    encoding = strategy.secure.encoding
    assert encoding.summands == 10 and encoding.exact
    clean = sum(encoding.encode(v) for v in spy["clean"].values()) / encoding.scale
    residual = strategy.secure.encoding.decode(revealed.integers) - clean
    central_std = strategy.noise_multiplier * strategy.sensitivity
    assert encoding.sum_noise_std(10) == pytest.approx(central_std)
    assert abs(residual.mean()) < 5 * central_std / math.sqrt(residual.size)
    assert residual.std() == pytest.approx(central_std, rel=0.15)  # 300 coordinates: about 4 % sampling error


def test_a_whole_secagg_run_charges_ddg_releases_within_budget(tmp_path):
    cfg = small_config("privacy.mode=secagg")
    strategy = build_strategy(cfg, tmp_path / "run")
    grid = SecureGrid(cfg, tmp_path, **TRUST_ALL)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=strategy.rounds, timeout=10)
    assert strategy.final.accuracy_real_test is not None
    for pid in range(3):
        ledger = PrivacyLedger(tmp_path / f"site{pid}" / "privacy_ledger.json", cfg.privacy.epsilon, cfg.privacy.delta)
        assert [e.kind for e in ledger.entries] == ["ddg", "ddg", "gaussian"]  # two secure sums, the evaluation
        assert 0.99 * cfg.privacy.epsilon <= ledger.spent_epsilon() <= cfg.privacy.epsilon * (1 + 1e-6)
    assert all(site.rounds_answered == 2 for site in strategy.sites.values())


def test_a_site_trusting_fewer_sites_adds_more_noise_and_is_charged_for_it(tmp_path, spy):
    cfg = small_config("privacy.mode=secagg", "federation.num_hospitals=5")
    strategy = build_strategy(cfg, tmp_path / "run")
    strategy.evolution.start()
    embeddings, labels = strategy.evolution.payload()
    encoding = strategy.secure.plan(5, len(labels))
    trusting_one = encoding.share_variance(1)
    assert trusting_one == pytest.approx(encoding.share_variance(encoding.summands) * encoding.summands)
    assert encoding.charge_multiplier(1) == pytest.approx(strategy.noise_multiplier, rel=1e-6)


def test_a_setup_that_would_clip_or_round_the_votes_is_refused():
    encoding = SecureVoteEncoding.plan(5.0, 3, 1, "image", 1.0, False, 1024, 30)
    bound = encoding.bound
    SecAggSetup(5, 5, 3, float(bound), 2 * bound, MODULUS, 1.0).check(encoding)
    for bad in [
        SecAggSetup(5, 5, 3, float(bound - 1), 2 * bound, MODULUS, 1.0),  # would clip
        SecAggSetup(5, 5, 3, float(bound), 2**22, MODULUS, 1.0),  # would round stochastically
        SecAggSetup(5, 5, 3, float(bound), 2 * bound, MODULUS, 1000.0),
    ]:
        with pytest.raises(P.SiteRefusal, match="does not carry this site's integers exactly"):
            bad.check(encoding)


def test_the_encoding_never_wraps_and_scales_counts_until_a_share_is_wide():
    encoding = SecureVoteEncoding.plan(11.8, 600, 1, "image", 1.0, False, 1024, 500)
    assert encoding.exact and encoding.share_variance(600) >= 16.0 and encoding.scale & (encoding.scale - 1) == 0
    encoding.check_modulus(1000)
    with pytest.raises(Exception, match="secagg_vote_cap"):
        SecureVoteEncoding.plan(11.8, 600, 1, "image", 1.0, False, 2**20, 500).check_modulus(1000)
    rounded = SecureVoteEncoding.plan(3.0, 3, 5, "image", 1.0, False, 64, 30)
    assert not rounded.exact and rounded.integer_sensitivity == pytest.approx(64 + math.sqrt(5))
    votes = np.array([0.0, 1 / math.sqrt(5), 3 / math.sqrt(5), 100.0])
    np.testing.assert_array_equal(rounded.encode(votes), [0, 29, 86, 64 * 64])  # the cap clips the last


def test_threshold_and_config_refusals():
    assert SecAggShape.plan(5, 0.6) == SecAggShape(5, 5, 3) and SecAggShape.plan(2, 0.1).sites_in_sum == 2
    assert SecAggShape.plan(10, 1.0).sites_in_sum == 10
    # Beyond 25 sites each shares keys with a window of 25; every window keeps 15 alive, and the
    # ring holds 1000 // 25 = 40 disjoint windows: any revealed sum holds >= 600 sites.
    big = SecAggShape.plan(1000, 0.6)
    assert (big.neighbours, big.reconstruction, big.sites_in_sum) == (25, 15, 600)
    assert SecAggShape.plan(100, 1.0).reconstruction == 24  # Flower: threshold < num_shares
    with pytest.raises(Exception, match="at least 2 sites"):
        SecAggShape.plan(1, 0.6)
    with pytest.raises(ConfigError, match="SecAgg"):
        load_config(overrides=["privacy.mode=secagg", "feedback.framework=Active"])
    with pytest.raises(ConfigError, match="secagg_threshold"):
        load_config(overrides=["privacy.mode=secagg", "privacy.secagg_threshold=0"])


def test_a_sites_own_node_config_caps_the_sites_it_counts_on():
    from clients.terms import SiteTerms, SiteTermsError

    cfg = load_config(overrides=["privacy.mode=secagg"])
    own = {"partition-id": 0, "num-partitions": 3, "site-epsilon": 1.0}
    assert SiteTerms.from_node_config(own, cfg, 1, 0).secagg_summands(7) == 1  # default: all the noise itself
    assert SiteTerms.from_node_config({**own, "secagg-trust-sites": "4"}, cfg, 1, 0).secagg_summands(7) == 4
    assert SiteTerms.from_node_config({**own, "secagg-trust-sites": 9}, cfg, 1, 0).secagg_summands(7) == 7
    simulated = SiteTerms.from_node_config({"partition-id": 0, "num-partitions": 3}, cfg, 1, 0)
    assert simulated.secagg_summands(7) == 7  # one operator runs every site: the round's threshold
    for bad in ("0", "two"):
        with pytest.raises(SiteTermsError, match="secagg-trust-sites"):
            SiteTerms.from_node_config({**own, "secagg-trust-sites": bad}, cfg, 1, 0)
