"""Message-level tests of the ClientApp handlers ``clients.client_app.train`` / ``evaluate``.

The handlers are called directly with a TRAIN / EVALUATE Message shaped like the strategy's
and a Context built here (the node config a simulation SuperNode gets, plus a state dir).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from clients import client_app
from clients.site import Site
from clients.wire import to_content
from coautogen_fl import protocol as P
from coautogen_fl.config import config_from_run_config, flatten, load_config, to_dict
from coautogen_fl.data import load_pool_and_test
from coautogen_fl.downstream import build_classifier, state_dict_to_numpy
from coautogen_fl.embedding import build_embedder
from coautogen_fl.privacy import LedgerCorruptError, PrivacyLedger, epsilon_for_noise, noise_multiplier_for_epsilon
from coautogen_fl.rater import vote_histogram

from strategy_helpers import declared_fields, sent_fields

RUN_ID = 777
NODE_ID = 31
ROUNDS = 2
EPSILON = 1.0
DELTA = 1e-5
PER_LABEL = 3
NUM_CLASSES = 10
SMALL = [
    f"feedback.rounds={ROUNDS}",
    "feedback.candidates_per_label=3",
    "feedback.volume_per_label=5",
    "downstream.epochs=1",
    "federation.num_hospitals=3",
]


@pytest.fixture(autouse=True)
def isolated(monkeypatch):
    """A fresh per-process site cache for every test, and the server's task identity for
    the request Messages we build (replies take theirs from the request)."""
    monkeypatch.setattr(client_app, "_SITES", {})
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", RUN_ID)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)


def run_config(*overrides: str) -> dict:
    cfg = load_config(overrides=[*SMALL, *overrides])
    return {**flatten(to_dict(cfg)), "config-file": ""}


def make_context(tmp_path, partition_id=0, overrides=(), **node_extra) -> Context:
    """A site that sets its own terms in its node config (budget, delta, state dir)."""
    node_config = {
        "partition-id": partition_id,
        "num-partitions": 3,
        "state-dir": str(tmp_path / f"site{partition_id}"),
        "site-epsilon": EPSILON,
        "site-delta": DELTA,
        **node_extra,
    }
    return Context(
        run_id=RUN_ID, node_id=NODE_ID, node_config=node_config, state=RecordDict(), run_config=run_config(*overrides)
    )


def ledger_path(context: Context):
    from pathlib import Path

    return Path(context.node_config["state-dir"]) / "privacy_ledger.json"


def candidates(context: Context):
    """A pool of ``PER_LABEL`` real-looking candidates per class, embedded like the server does."""
    cfg = config_from_run_config(context.run_config)
    pool, _ = load_pool_and_test(cfg.data)
    rng = np.random.default_rng(5)
    index = np.concatenate(
        [rng.choice(np.flatnonzero(pool.labels == c), PER_LABEL, replace=False) for c in range(NUM_CLASSES)]
    )
    embeddings = build_embedder(cfg.embedder).embed(pool.images[index]).astype(np.float16)
    return embeddings, pool.labels[index].astype(np.int64)


def sigma_for_run(epsilon=EPSILON, rounds=ROUNDS) -> float:
    return noise_multiplier_for_epsilon(epsilon, DELTA, rounds)


def train_request(embeddings, labels, server_round=1, sigma=None, mode="local", unit="image", k=1) -> Message:
    sigma = float(sigma_for_run() if sigma is None else sigma)
    request = P.VoteRequest(server_round, "PE", k, sigma, mode, unit, embeddings, labels)
    return Message(content=to_content(request.to_parts()), dst_node_id=NODE_ID, message_type=MessageType.TRAIN)


def votes_of(reply: Message) -> np.ndarray:
    assert not reply.has_error(), reply.error.reason
    return reply.content.array_records[P.VOTES][P.VOTES].numpy()


def clean_votes(context, embeddings, labels, k=1) -> np.ndarray:
    site = client_app.get_site(context)
    return vote_histogram(site.embeddings, site.data.train.labels, embeddings.astype(np.float32), labels, k)


# ---------------------------------------------------------------------------------- train
def test_train_reply_has_votes_and_metrics(tmp_path):
    context = make_context(tmp_path, partition_id=1)
    embeddings, labels = candidates(context)
    request = train_request(embeddings, labels)
    reply = client_app.train(request, context)

    assert isinstance(reply, Message) and not reply.has_error()
    assert reply.metadata.src_node_id == NODE_ID and reply.metadata.dst_node_id == SUPERLINK_NODE_ID
    assert reply.metadata.message_type == MessageType.TRAIN
    assert reply.metadata.reply_to_message_id == request.metadata.message_id
    votes = votes_of(reply)
    assert votes.dtype == np.float64 and votes.shape == (len(labels),) and np.all(np.isfinite(votes))
    metrics = reply.content.metric_records[P.METRICS]
    assert P.NUM_EXAMPLES not in metrics  # the site's size never leaves it
    assert metrics[P.PARTITION_ID] == 1
    assert metrics[P.EPSILON_BUDGET] == EPSILON
    assert metrics[P.EPSILON_SPENT] == pytest.approx(epsilon_for_noise([sigma_for_run()], DELTA), rel=1e-9)
    assert metrics[P.NOISE_MULTIPLIER] == pytest.approx(sigma_for_run())
    # Nothing else leaves the site: one vote vector and aggregate metrics.
    assert set(reply.content.array_records) == {P.VOTES} and set(reply.content.array_records[P.VOTES]) == {P.VOTES}
    assert set(reply.content.metric_records) == {P.METRICS}
    assert sent_fields(reply) == declared_fields("train")
    assert reply.content.config_records[P.SITE][P.SITE_LABEL] == ""  # no site-name in its node config


def test_local_mode_votes_are_noised(tmp_path):
    context = make_context(tmp_path)
    embeddings, labels = candidates(context)
    sigma = sigma_for_run()
    noised = votes_of(client_app.train(train_request(embeddings, labels, sigma=sigma), context))
    clean = clean_votes(context, embeddings, labels)
    assert clean.sum() == len(client_app.get_site(context).data.train)  # every private sample votes once
    assert not np.allclose(noised, clean)
    np.testing.assert_array_equal(noised * 16, np.round(noised * 16))  # snapped to the public grid
    residual = noised - clean
    assert 0.4 * sigma < residual.std() < 1.8 * sigma  # N(0, sigma^2), 30 draws
    assert abs(residual.mean()) < 5 * sigma / np.sqrt(len(residual))
    # OS-entropy noise: the next release is noised afresh.
    again = votes_of(client_app.train(train_request(embeddings, labels, server_round=2, sigma=sigma), context))
    assert not np.allclose(again, noised)


def test_central_mode_votes_are_the_clean_histogram(tmp_path):
    context = make_context(tmp_path, overrides=["privacy.mode=central"], **{"trust-server": "true"})
    embeddings, labels = candidates(context)
    reply = client_app.train(train_request(embeddings, labels, mode="central"), context)
    np.testing.assert_array_equal(votes_of(reply), clean_votes(context, embeddings, labels))
    # Still charged: the server's noise protects these votes.
    assert reply.content.metric_records[P.METRICS][P.EPSILON_SPENT] > 0
    assert len(json.loads(ledger_path(context).read_text())["entries"]) == 1


def test_central_mode_with_k_and_site_unit(tmp_path):
    context = make_context(
        tmp_path, overrides=["privacy.mode=central", "privacy.unit=site"], **{"trust-server": "true"}
    )
    embeddings, labels = candidates(context)
    votes = votes_of(client_app.train(train_request(embeddings, labels, mode="central", unit="site", k=2), context))
    clean = clean_votes(context, embeddings, labels, k=2)
    np.testing.assert_allclose(votes, clean / np.linalg.norm(clean))
    assert np.linalg.norm(votes) == pytest.approx(1.0)


def test_budget_is_spent_exactly_then_refused(tmp_path):
    context = make_context(tmp_path)
    embeddings, labels = candidates(context)
    spent = []
    for server_round in range(1, ROUNDS + 1):
        reply = client_app.train(train_request(embeddings, labels, server_round=server_round), context)
        spent.append(reply.content.metric_records[P.METRICS][P.EPSILON_SPENT])
    assert spent[0] < spent[-1]
    assert spent[-1] == pytest.approx(EPSILON, abs=1e-6)
    assert spent[-1] <= EPSILON * (1 + 1e-6)

    before = ledger_path(context).read_bytes()
    refusal = client_app.train(train_request(embeddings, labels, server_round=ROUNDS + 1), context)
    assert refusal.has_error() and not refusal.has_content()
    assert refusal.error.code == P.ERROR_BUDGET_EXCEEDED
    assert refusal.error.reason == P.ERROR_REASONS[P.ERROR_BUDGET_EXCEEDED]  # a generic line, no numbers
    assert refusal.metadata.src_node_id == NODE_ID
    assert ledger_path(context).read_bytes() == before  # the refused round left no trace
    assert len(json.loads(before)["entries"]) == ROUNDS
    # A repeated round (a resumed run) gets the very release it got before, at no charge ...
    first = client_app.train(train_request(embeddings, labels, server_round=1), context)
    again = client_app.train(train_request(embeddings, labels, server_round=1), context)
    np.testing.assert_array_equal(votes_of(first), votes_of(again))
    assert ledger_path(context).read_bytes() == before
    # ... and the same round about other candidates is refused: it would be a second release.
    other = client_app.train(train_request(embeddings[::-1].copy(), labels[::-1].copy(), server_round=1), context)
    assert other.has_error() and other.error.code == P.ERROR_NOT_ALLOWED
    assert ledger_path(context).read_bytes() == before


def test_server_cannot_lower_the_noise_past_the_budget(tmp_path):
    """A request whose noise would overshoot the site's budget is refused outright."""
    context = make_context(tmp_path)
    embeddings, labels = candidates(context)
    reply = client_app.train(train_request(embeddings, labels, sigma=sigma_for_run() / 10), context)
    assert reply.has_error() and reply.error.code == P.ERROR_BUDGET_EXCEEDED
    assert not ledger_path(context).exists()


def test_site_epsilon_in_node_config_is_enforced(tmp_path):
    sigma = sigma_for_run()
    first = epsilon_for_noise([sigma], DELTA)
    assert first < EPSILON
    # A site budget between one and two rounds' spend: round 2 is refused although the
    # server calibrated for the run's epsilon.
    context = make_context(tmp_path, **{"site-epsilon": first * 1.01})
    embeddings, labels = candidates(context)
    assert client_app.get_site(context).ledger.epsilon_budget == pytest.approx(first * 1.01)
    ok = client_app.train(train_request(embeddings, labels, server_round=1), context)
    assert ok.content.metric_records[P.METRICS][P.EPSILON_SPENT] == pytest.approx(first)
    refused = client_app.train(train_request(embeddings, labels, server_round=2), context)
    assert refused.has_error() and refused.error.code == P.ERROR_BUDGET_EXCEEDED

    # A budget below one round's cost: the very first request is refused, nothing is written.
    tiny = make_context(tmp_path, partition_id=2, **{"site-epsilon": first / 2})
    reply = client_app.train(train_request(embeddings, labels, server_round=1), tiny)
    assert reply.has_error() and reply.error.code == P.ERROR_BUDGET_EXCEEDED
    assert not ledger_path(tiny).exists()


def test_ledger_survives_a_fresh_process(tmp_path):
    context = make_context(tmp_path)
    embeddings, labels = candidates(context)
    first = client_app.train(train_request(embeddings, labels, server_round=1), context)
    spent_first = first.content.metric_records[P.METRICS][P.EPSILON_SPENT]

    client_app._SITES.clear()  # a restarted SuperNode process: no cached site
    site = client_app.get_site(context)
    assert site.ledger.rounds_charged == 1
    assert site.ledger.spent_epsilon() == pytest.approx(spent_first, rel=1e-12)
    second = client_app.train(train_request(embeddings, labels, server_round=2), context)
    assert second.content.metric_records[P.METRICS][P.EPSILON_SPENT] == pytest.approx(EPSILON, abs=1e-6)

    client_app._SITES.clear()
    refused = client_app.train(train_request(embeddings, labels, server_round=3), context)
    assert refused.has_error() and refused.error.code == P.ERROR_BUDGET_EXCEEDED
    # Even a new run id (the cache key) reads the same ledger in the same state dir.
    other_run = Context(
        run_id=RUN_ID + 1,
        node_id=NODE_ID,
        node_config=dict(context.node_config),
        state=RecordDict(),
        run_config=dict(context.run_config),
    )
    refused = client_app.train(train_request(embeddings, labels, server_round=1), other_run)
    assert refused.has_error() and refused.error.code == P.ERROR_BUDGET_EXCEEDED
    ledger = PrivacyLedger(ledger_path(context), EPSILON, DELTA)
    assert [e.round for e in ledger.entries] == [1, 2] and {e.run_id for e in ledger.entries} == {str(RUN_ID)}


def test_site_is_cached_per_run_and_node(tmp_path):
    a = make_context(tmp_path, partition_id=0)
    b = make_context(tmp_path, partition_id=1)
    site_a = client_app.get_site(a)
    assert client_app.get_site(a) is site_a
    assert client_app.get_site(b) is not site_a and client_app.get_site(b).partition_id == 1
    assert len(client_app._SITES) == 2


@pytest.mark.parametrize(
    "breakage",
    [
        "wrong embedding dimension",
        "no candidates record",
        "no config record",
        "config lacks rater",
        "unknown rater",
        "zero noise multiplier",
        "negative noise multiplier",
    ],
)
def test_bad_requests_yield_error_replies(tmp_path, breakage):
    context = make_context(tmp_path)
    embeddings, labels = candidates(context)
    request = train_request(embeddings, labels)
    if breakage == "wrong embedding dimension":
        request = train_request(embeddings[:, :10].copy(), labels)
    elif breakage == "no candidates record":
        del request.content.array_records[P.CANDIDATES]
    elif breakage == "no config record":
        del request.content.config_records[P.CONFIG]
    elif breakage == "config lacks rater":
        del request.content.config_records[P.CONFIG]["rater"]
    elif breakage == "unknown rater":
        request.content.config_records[P.CONFIG]["rater"] = "nope"
    elif breakage == "zero noise multiplier":
        request = train_request(embeddings, labels, sigma=0.0)
    elif breakage == "negative noise multiplier":
        request = train_request(embeddings, labels, sigma=-1.0)

    reply = client_app.train(request, context)  # never raises

    assert reply.has_error() and reply.error.code == P.ERROR_BAD_REQUEST, breakage
    assert reply.metadata.src_node_id == NODE_ID
    assert not ledger_path(context).exists()  # nothing released, nothing charged
    assert reply.error.reason == P.ERROR_REASONS[P.ERROR_BAD_REQUEST]  # the details stay in the site log


@pytest.mark.parametrize("mode", ["Local", "none", ""])
def test_unknown_privacy_mode_is_refused(tmp_path, mode):
    context = make_context(tmp_path)
    embeddings, labels = candidates(context)
    reply = client_app.train(train_request(embeddings, labels, mode=mode), context)
    assert reply.has_error() and reply.error.code == P.ERROR_BAD_REQUEST


def test_partition_outside_the_federation_is_a_no_data_error(tmp_path):
    context = make_context(tmp_path, partition_id=5)  # num-partitions is 3
    embeddings, labels = candidates(context)
    reply = client_app.train(train_request(embeddings, labels), context)
    assert reply.has_error() and reply.error.code == P.ERROR_NO_DATA
    assert reply.error.reason == P.ERROR_REASONS[P.ERROR_NO_DATA]


def test_corrupt_ledger_is_never_reset(tmp_path):
    context = make_context(tmp_path)
    embeddings, labels = candidates(context)
    path = ledger_path(context)
    path.parent.mkdir(parents=True)
    path.write_text("{ not json")
    try:
        reply = client_app.train(train_request(embeddings, labels), context)
    except LedgerCorruptError:
        pass  # Flower turns a raising ClientApp into an error reply; never a release
    else:
        assert reply.has_error()
    assert path.read_text() == "{ not json"


# ---------------------------------------------------------------------------------- evaluate
def evaluate_request(model_arrays: dict, image_size=28, sigma: float = 0.0, server_round: int = ROUNDS + 1) -> Message:
    request = P.EvaluationRequest(server_round, "cnn", NUM_CLASSES, 1, image_size, sigma, model_arrays)
    return Message(content=to_content(request.to_parts()), dst_node_id=NODE_ID, message_type=MessageType.EVALUATE)


def test_clear_evaluation_needs_the_sites_consent(tmp_path):
    """A request for a clear release (noise 0) is refused unless the site's own node config
    allows it: the server cannot turn evaluation into an unlimited, uncharged query."""
    context = make_context(tmp_path, partition_id=2)
    model = state_dict_to_numpy(build_classifier("cnn", NUM_CLASSES, 1, 28))
    for _ in range(3):
        reply = client_app.evaluate(evaluate_request(model), context)
        assert reply.has_error() and reply.error.code == P.ERROR_NOT_ALLOWED
    assert not ledger_path(context).exists()


def test_evaluate_returns_accuracy_and_the_test_count(tmp_path):
    context = make_context(tmp_path, partition_id=2, **{"allow-clear-evaluation": "true"})
    model = build_classifier("cnn", NUM_CLASSES, 1, 28)
    reply = client_app.evaluate(evaluate_request(state_dict_to_numpy(model)), context)
    assert not reply.has_error(), reply.error.reason
    assert reply.metadata.message_type == MessageType.EVALUATE and reply.metadata.src_node_id == NODE_ID
    metrics = reply.content.metric_records[P.METRICS]
    site = client_app.get_site(context)
    assert 0.0 <= metrics[P.ACCURACY] <= 1.0
    assert metrics[P.NUM_EXAMPLES] == len(site.data.test) > 0
    assert metrics[P.PARTITION_ID] == 2
    assert not reply.content.array_records  # the model does not come back
    assert not ledger_path(context).exists()  # evaluation is not charged to the vote budget


def test_noised_evaluation_releases_noised_counts_and_charges_the_ledger(tmp_path):
    """privacy.evaluation=noised: the site plans T votes + 1 evaluation at one sigma, so the
    whole run spends exactly the budget and a second evaluation is refused."""
    context = make_context(tmp_path, partition_id=2)
    sigma = noise_multiplier_for_epsilon(EPSILON, DELTA, ROUNDS + 1)
    ledger = PrivacyLedger(ledger_path(context), EPSILON, DELTA)
    for r in range(1, ROUNDS + 1):
        ledger.charge(sigma, round=r)
    model = state_dict_to_numpy(build_classifier("cnn", NUM_CLASSES, 1, 28))
    reply = client_app.evaluate(evaluate_request(model, sigma=sigma), context)
    assert not reply.has_error(), reply.error.reason
    metrics = reply.content.metric_records[P.METRICS]
    site = client_app.get_site(context)
    assert P.ACCURACY not in metrics  # no exact accuracy leaves the site
    assert metrics[P.NUM_EXAMPLES] != len(site.data.test)  # noised count (a float)
    assert abs(metrics[P.NUM_EXAMPLES] - len(site.data.test)) < 8 * sigma * np.sqrt(2)
    assert metrics[P.EPSILON_SPENT] == pytest.approx(EPSILON, abs=1e-6)
    assert len(PrivacyLedger(ledger_path(context), EPSILON, DELTA).entries) == ROUNDS + 1
    before = ledger_path(context).read_bytes()
    again = client_app.evaluate(evaluate_request(model, sigma=sigma, server_round=ROUNDS + 2), context)
    assert again.has_error() and again.error.code == P.ERROR_BUDGET_EXCEEDED
    assert ledger_path(context).read_bytes() == before


def test_evaluate_with_mismatched_arrays_is_an_error_reply(tmp_path):
    context = make_context(tmp_path)
    arrays = state_dict_to_numpy(build_classifier("cnn", NUM_CLASSES, 1, 28))
    arrays.pop(next(iter(arrays)))
    reply = client_app.evaluate(evaluate_request(arrays), context)
    assert reply.has_error() and reply.error.code == P.ERROR_BAD_REQUEST


def test_site_built_directly_matches_the_handler(tmp_path):
    """The ClientApp reads its settings only from node config and run config."""
    context = make_context(tmp_path, partition_id=1, **{"site-epsilon": 0.5})
    site = Site(config_from_run_config(context.run_config), context.node_config, context.run_id)
    cached = client_app.get_site(context)
    assert len(site.data.train) == len(cached.data.train) and site.partition_id == cached.partition_id == 1
    assert site.ledger.epsilon_budget == cached.ledger.epsilon_budget == 0.5
    assert site.ledger.path == ledger_path(context)


# ---------------------------------------------------------------------------------- data folder (issue 9)
def _digits_folder(root, context, per_class=6, small=None):
    """An ImageFolder of real digits, ``per_class`` images per class except ``small`` {class: n}."""
    from PIL import Image

    pool, _ = load_pool_and_test(config_from_run_config(context.run_config).data)
    for c in range(NUM_CLASSES):
        (root / str(c)).mkdir(parents=True)
        for i in np.flatnonzero(pool.labels == c)[: (small or {}).get(c, per_class)]:
            Image.fromarray((pool.images[i] * 255).astype(np.uint8)).save(root / str(c) / f"{i}.png")
    return root


def test_a_site_with_a_small_class_and_a_corrupt_file_still_votes(tmp_path, caplog):
    import logging

    context = make_context(tmp_path)
    folder = _digits_folder(tmp_path / "folder", context, small={3: 1, 7: 0})
    (folder / "5" / "broken.png").write_bytes(b"not a png")
    context = make_context(tmp_path, **{"data-path": str(folder)})
    embeddings, labels = candidates(context)
    with caplog.at_level(logging.WARNING, logger="flwr"):
        reply = client_app.train(train_request(embeddings, labels), context)
    votes_of(reply)  # votes, not an error
    reply.content.metric_records[P.METRICS]  # the metrics record is there (KeyError otherwise)
    assert sent_fields(reply) == declared_fields("train")
    warned = [r.getMessage() for r in caplog.records if r.name == "flwr" and r.levelno == logging.WARNING]
    assert len(warned) == 1 and "broken.png" in warned[0] and "class '3'" in warned[0] and "class '7'" in warned[0]
    assert len(client_app.get_site(context).data.train) + len(client_app.get_site(context).data.test) == 8 * 6 + 1


def test_a_missing_data_path_is_error_data_path_not_no_data(tmp_path):
    context = make_context(tmp_path, **{"data-path": str(tmp_path / "nowhere")})
    embeddings, labels = candidates(context)
    reply = client_app.train(train_request(embeddings, labels), context)
    assert reply.has_error() and reply.error.code == P.ERROR_DATA_PATH
    assert reply.error.reason == P.ERROR_REASONS[P.ERROR_DATA_PATH] and "nowhere" not in reply.error.reason
    assert not ledger_path(context).exists()
