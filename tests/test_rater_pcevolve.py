"""The PCEvolve rater (-r PCEvolve): prototype-contrastive votes with public prototypes, per-sample
L2 sensitivity exactly 1, through the site's train handler and the config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from clients import client_app
from clients.wire import to_content
from coautogen_fl import protocol as P
from coautogen_fl.config import ConfigError, config_from_run_config, flatten, load_config, to_dict
from coautogen_fl.data import load_pool_and_test
from coautogen_fl.embedding import build_embedder
from coautogen_fl.privacy import noise_multiplier_for_epsilon
from coautogen_fl.rater import RATERS, build_rater, contrastive_votes, vote_histogram
from coautogen_fl.secure_votes import SecureVoteEncoding
from simulations.cli import overrides_from_args, parse_args


def random_case(rng: np.random.Generator):
    """Random private data and candidates; some classes may lack candidates or voters."""
    dim = int(rng.integers(1, 30))
    num_classes = int(rng.integers(1, 6))
    n_private = int(rng.integers(1, 50))
    n_candidates = int(rng.integers(1, 30))
    private = rng.normal(size=(n_private, dim))
    private_labels = rng.integers(0, num_classes, n_private)
    candidates = rng.normal(size=(n_candidates, dim)).astype(rng.choice([np.float64, np.float32, np.float16]))
    candidate_labels = rng.integers(0, num_classes, n_candidates)
    return private, private_labels, candidates, candidate_labels


# ---------------------------------------------------------------------------------- sensitivity
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 2, 5])
def test_one_sample_moves_the_votes_by_norm_exactly_one(seed, k):
    """Add/remove adjacency: removing or adding any one private sample moves the vote vector by
    L2 norm exactly 1 (0 when its class has no candidate)."""
    rng = np.random.default_rng(1000 * seed + k)
    nonzero = 0
    for _ in range(25):
        private, labels, candidates, candidate_labels = random_case(rng)
        full = contrastive_votes(private, labels, candidates, candidate_labels, k)
        assert full.dtype == np.float64 and full.shape == candidate_labels.shape and np.all(full >= 0)
        for j in rng.choice(len(labels), size=min(4, len(labels)), replace=False):
            keep = np.arange(len(labels)) != j
            without = contrastive_votes(private[keep], labels[keep], candidates, candidate_labels, k)
            change = float(np.linalg.norm(full - without))
            if np.any(candidate_labels == labels[j]):
                assert change == pytest.approx(1.0, abs=1e-9)
                nonzero += 1
            else:
                assert change == 0.0
        extra = rng.normal(size=(1, private.shape[1]))
        extra_label = rng.integers(0, max(labels.max(), candidate_labels.max()) + 1, 1)
        added = contrastive_votes(
            np.concatenate([private, extra]), np.concatenate([labels, extra_label]), candidates, candidate_labels, k
        )
        change = float(np.linalg.norm(added - full))
        assert change == (pytest.approx(1.0, abs=1e-9) if np.any(candidate_labels == extra_label[0]) else 0.0)
    assert nonzero > 20  # exercised on real votes, not just empty classes


def test_another_samples_vote_never_changes_when_one_is_added():
    """Votes are per sample: each sample's own vote (voting alone) is the same whatever other
    samples are in the batch, and the batch's votes are the sum of the single votes."""
    rng = np.random.default_rng(7)
    for _ in range(20):
        private, labels, candidates, candidate_labels = random_case(rng)
        k = int(rng.integers(1, 4))
        alone = [
            contrastive_votes(private[i : i + 1], labels[i : i + 1], candidates, candidate_labels, k)
            for i in range(len(labels))
        ]
        extra = rng.normal(size=(1, private.shape[1]))
        extra_label = candidate_labels[:1]  # a class that has candidates: it does vote
        bigger = np.concatenate([private, extra])
        bigger_labels = np.concatenate([labels, extra_label])
        with_extra = contrastive_votes(bigger, bigger_labels, candidates, candidate_labels, k)
        extra_alone = contrastive_votes(extra, extra_label, candidates, candidate_labels, k)
        np.testing.assert_allclose(with_extra - extra_alone, np.sum(alone, axis=0), atol=1e-12)
        np.testing.assert_allclose(
            contrastive_votes(private, labels, candidates, candidate_labels, k), np.sum(alone, axis=0), atol=1e-12
        )


def test_sensitivity_holds_at_exact_ties():
    """Two own-class candidates mirrored around a voter, equally confident: removing another
    sample must not flip this sample's choice (row-independent distances)."""
    rng = np.random.default_rng(3)
    worst = 0.0
    for _ in range(100):
        dim = int(rng.integers(2, 100))
        n = int(rng.integers(2, 30))
        private = rng.normal(size=(n, dim))
        i = int(rng.integers(n))
        v = rng.normal(size=dim) * 0.5
        candidates = np.stack([private[i] + v, private[i] - v, rng.normal(size=dim) * 5 + 20])
        candidate_labels = np.array([0, 0, 1])
        labels = np.zeros(n, dtype=np.int64)
        full = contrastive_votes(private, labels, candidates, candidate_labels)
        keep = np.arange(n) != (i + 1) % n
        without = contrastive_votes(private[keep], labels[keep], candidates, candidate_labels)
        worst = max(worst, float(np.linalg.norm(full - without)))
    assert worst <= 1.0 + 1e-9


# ---------------------------------------------------------------------------------- behaviour
def test_the_contrastive_part_prefers_the_discriminative_candidate():
    """Class 0 candidates: A at (1, 0), right on class 1's prototype, and B at (-1.2, 0), far from
    class 1; class 1 candidates at (0.5, 0) and (1.5, 0) (prototype (1, 0)). A private class-0
    sample at (0, 0) is nearer to A (1.0 vs 1.44): PE votes A, PCEvolve votes B."""
    candidates = np.array([[1.0, 0.0], [-1.2, 0.0], [0.5, 0.0], [1.5, 0.0]])
    candidate_labels = np.array([0, 0, 1, 1])
    private, labels = np.array([[0.0, 0.0]]), np.array([0])
    np.testing.assert_array_equal(vote_histogram(private, labels, candidates, candidate_labels), [1, 0, 0, 0])
    np.testing.assert_array_equal(contrastive_votes(private, labels, candidates, candidate_labels), [0, 1, 0, 0])

    # the numbers: P0 = (-0.1, 0), P1 = (1, 0); s2 = (1.21 + 1.21 + 0.25 + 0.25) / 4 = 0.73
    s2 = 0.73
    q_a = 1 / (1 + np.exp(-(0.0 - 1.21) / s2))  # A: 1.21 from P0, 0 from P1
    q_b = 1 / (1 + np.exp(-(4.84 - 1.21) / s2))  # B: 1.21 from P0, 4.84 from P1
    u_a, u_b = -1.0 / s2 + np.log(q_a), -1.44 / s2 + np.log(q_b)
    assert q_a == pytest.approx(0.1601, abs=1e-4) and q_b == pytest.approx(0.9931, abs=1e-4)
    assert u_a == pytest.approx(-3.202, abs=1e-3) and u_b == pytest.approx(-1.979, abs=1e-3)
    assert u_b > u_a

    # with k = 2 both class-0 candidates get 1/sqrt 2, as with PE
    np.testing.assert_allclose(
        contrastive_votes(private, labels, candidates, candidate_labels, 2), [2**-0.5, 2**-0.5, 0, 0]
    )


def test_with_one_class_it_is_pe():
    """One class with candidates: every q_j = 1, so the utility is the distance alone (PE)."""
    rng = np.random.default_rng(11)
    private, candidates = rng.normal(size=(40, 6)), rng.normal(size=(8, 6))
    labels, candidate_labels = np.zeros(40, dtype=np.int64), np.zeros(8, dtype=np.int64)
    for k in (1, 3):
        np.testing.assert_array_equal(
            contrastive_votes(private, labels, candidates, candidate_labels, k),
            vote_histogram(private, labels, candidates, candidate_labels, k),
        )


def test_public_scale_falls_back_to_one_and_empty_inputs_vote_zeros():
    # one candidate per class: every candidate is its prototype, s2 = 0 -> 1.0; still votes
    candidates, candidate_labels = np.array([[0.0], [3.0]]), np.array([0, 1])
    votes = contrastive_votes(np.array([[2.9], [0.1]]), np.array([0, 1]), candidates, candidate_labels)
    np.testing.assert_array_equal(votes, [1.0, 1.0])
    assert np.all(contrastive_votes(np.zeros((0, 1)), np.zeros(0, int), candidates, candidate_labels) == 0)
    assert contrastive_votes(np.zeros((3, 1)), np.zeros(3, int), np.zeros((0, 1)), np.zeros(0, int)).shape == (0,)
    with pytest.raises(ValueError, match="k must be >= 1"):
        contrastive_votes(np.zeros((3, 1)), np.zeros(3, int), candidates, candidate_labels, k=0)


def test_registered_and_built_by_name():
    assert RATERS["PCEvolve"] is contrastive_votes
    rater = build_rater("PCEvolve", k=3)
    assert rater.sensitivity == 1.0 and rater.k == 3
    with pytest.raises(ValueError, match="choose one of PE, RF, PCEvolve"):
        build_rater("PCE")


def test_k1_votes_are_exact_integer_counts_under_secagg_encoding():
    """Non-negative, and counts for k = 1: SecAgg+'s exact encoding carries them unchanged."""
    rng = np.random.default_rng(4)
    private, labels = rng.normal(size=(30, 4)), rng.integers(0, 3, 30)
    candidates, candidate_labels = rng.normal(size=(9, 4)), np.repeat([0, 1, 2], 3)
    votes = contrastive_votes(private, labels, candidates, candidate_labels)
    encoding = SecureVoteEncoding.plan(1.0, 3, 1, "image", 1.0, False, 100, len(votes))
    assert encoding.exact
    np.testing.assert_array_equal(encoding.decode(encoding.encode(votes)), votes)


# ---------------------------------------------------------------------------------- config and CLI
def test_rater_names_are_case_insensitive_and_unknown_ones_refused():
    assert load_config(overrides=["feedback.rater=pcevolve"]).feedback.rater == "PCEvolve"
    assert load_config(overrides=["feedback.rater=PCEvolve"]).feedback.rater == "PCEvolve"
    assert load_config(overrides=["feedback.rater=rf"]).feedback.rater == "RF"
    for flag in ("PCEvolve", "pcevolve"):
        cfg = load_config(overrides=overrides_from_args(parse_args(["run", "-r", flag])))
        assert cfg.feedback.rater == "PCEvolve"
    with pytest.raises(ConfigError, match=r"feedback.rater='DPSGD' is not valid; choose one of PE, RF, PCEvolve"):
        load_config(overrides=["feedback.rater=DPSGD"])
    with pytest.raises(ConfigError, match="choose one of PE, RF, PCEvolve"):
        load_config(overrides=overrides_from_args(parse_args(["run", "-r", "nope"])))


def test_secagg_accepts_pcevolve_but_not_rf():
    assert load_config(overrides=["privacy.mode=secagg", "feedback.rater=PCEvolve"]).feedback.rater == "PCEvolve"
    with pytest.raises(ConfigError, match="-r RF"):
        load_config(overrides=["privacy.mode=secagg", "feedback.rater=rf"])


# ---------------------------------------------------------------------------------- the site's train handler
RUN_ID, NODE_ID, EPSILON, DELTA, ROUNDS = 778, 32, 1.0, 1e-5, 2


@pytest.fixture
def isolated(monkeypatch):
    monkeypatch.setattr(client_app, "_SITES", {})
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", RUN_ID)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)


def make_context(state_dir: Path, *overrides: str, **node_extra) -> Context:
    cfg = load_config(
        overrides=[
            f"feedback.rounds={ROUNDS}",
            "feedback.candidates_per_label=3",
            "feedback.volume_per_label=5",
            "downstream.epochs=1",
            "federation.num_hospitals=3",
            *overrides,
        ]
    )
    node_config = {
        "partition-id": 0,
        "num-partitions": 3,
        "state-dir": str(state_dir),
        "site-epsilon": EPSILON,
        "site-delta": DELTA,
        **node_extra,
    }
    return Context(
        run_id=RUN_ID,
        node_id=NODE_ID,
        node_config=node_config,
        state=RecordDict(),
        run_config={**flatten(to_dict(cfg)), "config-file": ""},
    )


def candidates(context: Context):
    cfg = config_from_run_config(context.run_config)
    pool, _ = load_pool_and_test(cfg.data)
    rng = np.random.default_rng(5)
    index = np.concatenate([rng.choice(np.flatnonzero(pool.labels == c), 3, replace=False) for c in range(10)])
    return build_embedder(cfg.embedder).embed(pool.images[index]).astype(np.float16), pool.labels[index].astype(
        np.int64
    )


def vote(context: Context, rater: str, embeddings, labels, mode: str, k: int = 2) -> Message:
    sigma = noise_multiplier_for_epsilon(EPSILON, DELTA, ROUNDS)
    request = P.VoteRequest(1, rater, k, sigma, mode, "image", embeddings, labels)
    reply = client_app.train(
        Message(content=to_content(request.to_parts()), dst_node_id=NODE_ID, message_type=MessageType.TRAIN), context
    )
    assert not reply.has_error(), reply.error.reason
    return reply


def ledger_entries(context: Context) -> list[dict]:
    entries = json.loads((Path(context.node_config["state-dir"]) / "privacy_ledger.json").read_text())["entries"]
    return [{key: value for key, value in e.items() if key != "timestamp"} for e in entries]


def test_the_site_votes_with_pcevolve_and_is_charged_like_for_pe(tmp_path, isolated):
    pe_site, pc_site = make_context(tmp_path / "pe"), make_context(tmp_path / "pc")
    embeddings, labels = candidates(pe_site)
    pe, pc = vote(pe_site, "PE", embeddings, labels, "local"), vote(pc_site, "PCEvolve", embeddings, labels, "local")
    votes = pc.content.array_records[P.VOTES][P.VOTES].numpy()
    assert votes.dtype == np.float64 and votes.shape == (len(labels),) and np.all(np.isfinite(votes))
    assert (
        pc.content.metric_records[P.METRICS][P.EPSILON_SPENT]
        == pe.content.metric_records[P.METRICS][P.EPSILON_SPENT]
        > 0
    )
    assert ledger_entries(pc_site) == ledger_entries(pe_site) and len(ledger_entries(pc_site)) == 1

    # trusted central mode: the clean votes, exactly the rater's (the noise is the server's)
    client_app._SITES.clear()
    central = make_context(tmp_path / "central", "privacy.mode=central", **{"trust-server": "true"})
    clean = vote(central, "PCEvolve", embeddings, labels, "central").content.array_records[P.VOTES][P.VOTES].numpy()
    site = client_app.get_site(central)
    expected = contrastive_votes(site.embeddings, site.data.train.labels, embeddings.astype(np.float32), labels, 2)
    np.testing.assert_array_equal(clean, expected)
    assert clean.sum() == pytest.approx(len(site.data.train) * np.sqrt(2))  # every private sample votes, norm 1
    assert len(ledger_entries(central)) == 1
