"""``privacy.mode=secagg`` with ``-tt real`` / ``mix``: each DP-SGD round is one pooled full-batch step
whose integer gradient sum goes through Flower's SecAgg+ (run in-process, as in tests/test_secagg.py),
each site adding a discrete-Gaussian share of the noise (:mod:`coautogen_fl.secure_gradients`)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType
from flwr.common import FitIns, bytes_to_ndarray, ndarrays_to_parameters
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.task_identity import TaskIdentity
from scipy import stats

from clients import client_app
from clients.secagg import SecAggSetup, secure_request
from clients.site import Site
from coautogen_fl import protocol as P
from coautogen_fl.config import ConfigError, load_config
from coautogen_fl.downstream import build_classifier, load_numpy_state_dict
from coautogen_fl.dpsgd import clipped_gradient_sum
from coautogen_fl.privacy import PrivacyError, PrivacyLedger, epsilon_for_releases
from coautogen_fl.privacy.distributed import noise_for_epsilon_secagg
from coautogen_fl.privacy.release_store import ReleaseMismatchError
from coautogen_fl.secure_gradients import SecureGradientEncoding, flatten, unflatten
from coautogen_fl.secure_votes import MODULUS, SecAggShape, secagg_vote_releases
from strategies.privacy_plan import expected_sites, vote_encoding_args
from strategies.server_app import build_strategy

from strategy_helpers import (
    NODES,
    SecureGrid,
    declared_fields,
    sent_fields,
    small_config,
    task_identity,  # noqa: F401  (pytest fixture, used by name)
)

#: These sites set their own terms (a deployment's node config): they count on every site.
TRUST_ALL = {"secagg-trust-sites": 100}
REAL = ["privacy.mode=secagg", "feedback.task_type=real"]
#: The SITE_REPLY_FIELDS kind of each SecAgg+ stage's reply.
STAGE_KINDS = {
    Stage.SETUP: "secagg-setup",
    Stage.SHARE_KEYS: "secagg-share-keys",
    Stage.COLLECT_MASKED_VECTORS: "secagg-collect",
    Stage.UNMASK: "secagg-unmask",
}


def cnn_parameters() -> int:
    return sum(p.numel() for p in build_classifier("cnn", 10, 1, 28).parameters())


def l2(vector) -> float:
    return float(np.linalg.norm(np.asarray(vector, dtype=np.float64)))


# --------------------------------------------------------------------------------------------
# 1. The encoding
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "coordinates, clip",
    [(20490, 1.0), (4, 200 / 1024), (1, 1000.0), (1000, 0.3), (77, 3.7), (123457, 0.05), (2, 1.0)],
)
def test_the_scale_is_the_smallest_power_of_two_within_the_rounding_headroom(coordinates, clip):
    encoding = SecureGradientEncoding(1.0, 2, clip, coordinates, 64.0)
    scale = encoding.scale
    assert scale >= 1 and scale & (scale - 1) == 0
    assert math.sqrt(coordinates) <= scale * clip / 100
    if scale > 1:
        assert not math.sqrt(coordinates) <= (scale // 2) * clip / 100  # half the scale is not enough
    assert encoding.integer_sensitivity == pytest.approx(scale * clip + math.sqrt(coordinates))


def test_the_scale_at_an_exact_power_of_two_and_at_one():
    # sqrt(4) * 100 / C = 1024 exactly: 1024 is enough, 512 is not.
    assert SecureGradientEncoding(1.0, 2, 200 / 1024, 4, 64.0).scale == 1024
    assert SecureGradientEncoding(1.0, 2, 1000.0, 1, 64.0).scale == 1  # need 0.1: no scaling at all


def random_gradients(rng, shapes, spread):
    return {name: (rng.standard_normal(shape) * spread).astype(np.float32) for name, shape in shapes.items()}


SHAPES = {"conv.weight": (4, 1, 3, 3), "conv.bias": (4,), "fc.weight": (10, 12), "fc.bias": (10,)}


def test_one_example_moves_the_integer_sum_by_at_most_the_integer_sensitivity():
    rng = np.random.default_rng(7)
    clip, cap = 0.5, 2.0  # the cap (1.0 in gradient units) is hit by many coordinates below
    d = sum(int(np.prod(s)) for s in SHAPES.values())
    encoding = SecureGradientEncoding(3.0, 2, clip, d, cap)
    worst, capped = 0.0, 0
    for trial in range(300):
        a = random_gradients(rng, SHAPES, spread=[0.01, 0.3, 2.0][trial % 3])
        example = flatten(random_gradients(rng, SHAPES, 1.0))
        example *= clip * rng.uniform(0.2, 1.0) / l2(example)  # one clipped example's gradient, <= C
        sign = 1 if trial % 2 else -1
        b = unflatten(flatten(a) + sign * example, a)
        assert l2(flatten(b) - flatten(a)) <= clip * (1 + 1e-5)
        diff = encoding.encode(a) - encoding.encode(b)
        capped += int(np.sum(np.abs(encoding.encode(a)) == round(cap * clip * encoding.scale)))
        worst = max(worst, l2(diff))
        assert l2(diff) <= encoding.integer_sensitivity
    assert capped > 100  # coordinates at the cap were part of the check
    assert worst > 0.5 * encoding.scale * clip  # and the moves were not trivially small


def test_rounding_can_push_an_integer_sum_past_scale_times_clip_but_not_past_the_sensitivity():
    """Every coordinate sitting just below a rounding boundary in one sum and just above it in the
    other: the clean move is C along one coordinate, the integer move is sqrt((scale C + 1)^2 + d - 1)."""
    d, clip = 400, 1.0
    encoding = SecureGradientEncoding(3.0, 2, clip, d, 64.0)
    scale = encoding.scale
    base = (np.arange(d) % 7 + 0.5 - 1e-3) / scale  # just below k + 1/2 after scaling
    shift = np.full(d, 2e-3 / scale)
    shift[0] = 0.0
    step = np.zeros(d)
    step[0] = clip - l2(shift)  # the whole move stays within C
    a, b = {"w": base}, {"w": base + shift + step}
    assert l2(b["w"] - a["w"]) <= clip + 1e-9
    moved = l2(encoding.encode(b) - encoding.encode(a))
    assert moved > scale * clip  # the rounding term of the sensitivity is needed ...
    assert moved <= encoding.integer_sensitivity  # ... and enough


def test_encode_clips_every_coordinate_at_the_public_cap():
    clip, cap = 0.25, 3.0
    encoding = SecureGradientEncoding(2.0, 2, clip, 6, cap)
    limit = cap * clip * encoding.scale
    ints = encoding.encode({"a": np.array([1e9, -1e9, 0.74, -0.76]), "b": np.array([0.75, 1e-9])})
    np.testing.assert_array_equal(ints, np.rint([limit, -limit, 0.74 * encoding.scale, -limit, limit, 0.0]))
    assert ints.dtype == np.int64 and np.abs(ints).max() <= encoding.clean_cap
    decoded = encoding.decode(ints)
    assert decoded[2] == pytest.approx(0.74, abs=0.5 / encoding.scale)
    with pytest.raises(ValueError, match="a gradient sum of 5 values for a model of 6 parameters"):
        encoding.encode({"a": np.zeros(5)})


def test_flatten_and_unflatten_round_trip_in_sorted_name_order():
    rng = np.random.default_rng(1)
    arrays = random_gradients(rng, {"z.bias": (3,), "a.weight": (2, 3, 1), "m": (4, 2)}, 1.0)
    flat = flatten(arrays)
    assert flat.dtype == np.float64 and flat.shape == (3 + 6 + 8,)
    np.testing.assert_array_equal(flat[:6], arrays["a.weight"].ravel())  # sorted: a.weight, m, z.bias
    np.testing.assert_array_equal(flat[6:14], arrays["m"].ravel())
    back = unflatten(flat, arrays)
    assert list(back) == sorted(arrays)
    for name, array in arrays.items():
        assert back[name].shape == array.shape and back[name].dtype == np.float32
        np.testing.assert_array_equal(back[name], array)
    with pytest.raises(ValueError, match="does not fill a model of 17 parameters"):
        unflatten(np.zeros(18), arrays)
    with pytest.raises(ValueError):
        unflatten(np.zeros(16), arrays)


def test_check_modulus_refuses_a_sum_that_could_wrap():
    d = cnn_parameters()
    assert 19_000 < d < 22_000
    encoding = SecureGradientEncoding(30.0, 6, 1.0, d, 64.0)
    bound = encoding.bound
    assert bound > encoding.clean_cap == math.ceil(encoding.scale * 64)
    encoding.check_modulus(10)  # the defaults at ten sites: far from wrapping
    most = (MODULUS - 1) // (2 * bound)  # the most sites with sites x 2B < 2^32
    assert 10 < most < 1000
    encoding.check_modulus(most)
    with pytest.raises(PrivacyError, match="secagg_gradient_cap"):
        encoding.check_modulus(most + 1)
    assert (most + 1) * 2 * bound >= MODULUS


def test_a_site_adding_all_the_noise_itself_stays_within_the_bound():
    """The bound is the clean cap plus the slack of one summand's share (the widest a site adds)."""
    encoding = SecureGradientEncoding(30.0, 6, 1.0, 1000, 64.0)
    std = math.sqrt(encoding.share_variance(1))
    assert encoding.share_variance(1) == pytest.approx(6 * encoding.share_variance(6))
    assert encoding.bound - encoding.clean_cap > 9 * std  # 2^-64 over 1000 coordinates: ~ 9.6 std
    assert encoding.bound - encoding.clean_cap < 11 * std


# --------------------------------------------------------------------------------------------
# 2. The noise plan
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task_type", ["real", "mix"])
def test_the_plan_composes_every_sites_ledger_to_just_within_epsilon(tmp_path, task_type):
    cfg = small_config("privacy.mode=secagg", f"feedback.task_type={task_type}")
    strategy = build_strategy(cfg, tmp_path / "run")
    p, d = cfg.privacy, cfg.downstream
    summands = SecAggShape.plan(expected_sites(cfg), p.secagg_threshold).sites_in_sum
    assert summands == 2  # 3 sites, 60 % of them
    evaluations = 1 if p.evaluation == "noised" else 0
    if task_type == "mix":
        args = vote_encoding_args(cfg, 10)
        prior = secagg_vote_releases(strategy.noise_multiplier, cfg.feedback.rounds, evaluations, summands, args)
        assert [r[3] for r in prior] == ["ddg"] * cfg.feedback.rounds + ["gaussian"] * evaluations
    else:
        prior = [(strategy.noise_multiplier, 1.0, 1, "gaussian")] * evaluations
    # The votes and the evaluation get (1 - training share) of epsilon (real 0.1, mix 0.5) ...
    rest = {"real": 0.1, "mix": 0.5}[task_type] * p.epsilon
    assert rest * 0.99 <= epsilon_for_releases(prior, p.delta) <= rest * (1 + 1e-6)
    # ... and the secure DP-SGD sums (one full-batch step each) the rest, as every ledger composes them.
    steps = d.dp_rounds * d.dp_local_steps
    training = strategy.training
    assert training.secure and training.rounds == steps and training.first_round == strategy.rounds + 1
    charge = SecureGradientEncoding(
        training.noise_multiplier, summands, d.dp_max_grad_norm, cnn_parameters(), p.secagg_gradient_cap
    ).charge_multiplier(summands)
    assert charge == pytest.approx(training.noise_multiplier, rel=1e-6)  # wide shares: the continuous Gaussian
    total = epsilon_for_releases([*prior, *[(charge, 1.0, 1, "ddg")] * steps], p.delta)
    assert 0.99 * p.epsilon <= total <= p.epsilon * (1 + 1e-6)
    # A little less noise on the training sums would overspend: the plan is tight.
    tighter = SecureGradientEncoding(
        training.noise_multiplier * 0.98, summands, d.dp_max_grad_norm, cnn_parameters(), p.secagg_gradient_cap
    ).charge_multiplier(summands)
    assert epsilon_for_releases([*prior, *[(tighter, 1.0, 1, "ddg")] * steps], p.delta) > p.epsilon


def test_a_prior_that_spends_the_budget_leaves_nothing_to_plan():
    args = dict(epsilon=1.0, delta=1e-5, rounds=50, sensitivity=16525.0, summands=2, dim=20490, gaussian_releases=0)
    without = noise_for_epsilon_secagg(**args)
    some = [(5.0, 1.0, 1, "gaussian")]
    with_prior = noise_for_epsilon_secagg(**args, prior=some)
    assert with_prior > without  # what the prior spent is not spent again
    with pytest.raises(PrivacyError, match="raise privacy.epsilon or lower privacy.training_share"):
        noise_for_epsilon_secagg(**args, prior=[(0.5, 1.0, 1, "gaussian")])
    assert epsilon_for_releases([(0.5, 1.0, 1, "gaussian")], 1e-5) >= 1.0  # the refused prior alone spends it


# --------------------------------------------------------------------------------------------
# 3. A secure DP-SGD round through SecAgg+, in-process
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def secure_training_round(tmp_path_factory):
    """Round 1 of a -tt real secagg strategy (SGD, so the step can be checked exactly), through
    Flower's SecAgg+ and the real ClientApp; with the integers each site handed to SecAgg+ and
    each site's clean encoded sum."""
    tmp_path = tmp_path_factory.mktemp("secure-training")
    seen: dict[str, dict] = {"sent": {}, "clean": []}
    step, encode = Site._secure_gradient_step, SecureGradientEncoding.encode

    def sent(self, request, setup, run_id=""):
        reply, integers = step(self, request, setup, run_id)
        seen["sent"][self.partition_id] = np.asarray(integers)
        return reply, integers

    def clean(self, gradient_sum):
        ints = encode(self, gradient_sum)
        seen["clean"].append(ints)
        return ints

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TaskIdentity, "_task_id", 1)
        mp.setattr(TaskIdentity, "_run_id", 4242)
        mp.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)
        mp.setattr(client_app, "_SITES", {})
        mp.setattr(Site, "_secure_gradient_step", sent)
        mp.setattr(SecureGradientEncoding, "encode", clean)
        cfg = small_config(*REAL, "downstream.dp_optimizer=sgd")
        strategy = build_strategy(cfg, tmp_path / "run")
        assert strategy.rounds == 0 and strategy.training.first_round == 1  # -tt real: no vote rounds
        grid = SecureGrid(cfg, tmp_path, **TRUST_ALL)
        server_round = strategy.training.first_round
        strategy.training.weights = strategy.training._start(strategy)
        before = {k: v.copy() for k, v in strategy.training.weights.items()}
        messages = strategy.training.configure(strategy, server_round, grid)
        revealed = strategy.training._revealed
        encoding = strategy.training.encoding(strategy)
        request = strategy.training.request(strategy, server_round)
        sites = dict(client_app._SITES)
        result = strategy.training.aggregate(strategy, server_round, [])
    yield dict(
        cfg=cfg,
        strategy=strategy,
        grid=grid,
        tmp_path=tmp_path,
        server_round=server_round,
        messages=messages,
        revealed=revealed,
        encoding=encoding,
        request=dataclasses.replace(request, weights=before),
        sites=sites,
        before=before,
        result=result,
        **seen,
    )


def test_a_secure_round_sends_no_flower_messages_and_reveals_the_exact_sum(secure_training_round):
    r = secure_training_round
    assert r["messages"] == []  # SecAgg+'s four stages ran inside configure
    revealed = r["revealed"]
    assert revealed is not None and sorted(revealed.bookkeeping) == NODES
    assert sorted(r["sent"]) == [0, 1, 2]
    assert revealed.integers.shape == (cnn_parameters(),)
    np.testing.assert_array_equal(revealed.integers, sum(r["sent"].values()))
    assert r["request"].secagg_summands == 2 and r["request"].sample_rate == 1.0 and r["request"].steps == 1


def test_each_site_encodes_its_whole_clipped_gradient_sum(secure_training_round):
    """Sample rate 1: the clean integers a site encodes are its every example's clipped gradient, summed."""
    r = secure_training_round
    encoding, request = r["encoding"], r["request"]
    site = next(s for s in r["sites"].values() if s.partition_id == 0)
    model = build_classifier(request.model, request.num_classes, request.channels, request.image_size)
    load_numpy_state_dict(model, request.weights)
    sums = clipped_gradient_sum(model, site.data.train.images, site.data.train.labels, 1.0, request.max_grad_norm)
    expected = encode_plain(encoding, sums)
    assert len(r["clean"]) == 3
    assert min(np.abs(clean - expected).max() for clean in r["clean"]) <= 1  # float order may flip a rounding
    assert len(site.data.train) > 1 and np.abs(expected).sum() > 0


def encode_plain(encoding, sums):
    limit = encoding.coordinate_cap * encoding.max_grad_norm
    return np.rint(np.clip(flatten(sums), -limit, limit) * encoding.scale).astype(np.int64)


def test_the_noise_in_the_revealed_sum_is_three_shares_sized_for_two_sites(secure_training_round):
    r = secure_training_round
    encoding = r["encoding"]
    residual = (r["revealed"].integers - sum(r["clean"])).astype(np.float64)
    share = math.sqrt(encoding.share_variance(2))
    assert encoding.share_variance(2) == pytest.approx(
        (encoding.noise_multiplier * encoding.integer_sensitivity) ** 2 / 2
    )
    assert abs(residual.mean()) < 5 * share * math.sqrt(3) / math.sqrt(residual.size)
    assert residual.std() == pytest.approx(share * math.sqrt(3), rel=0.03)  # 20k coordinates: ~0.5 % error
    assert residual.std() / encoding.scale == pytest.approx(encoding.sum_noise_std(3), rel=0.03)


def test_each_site_is_charged_once_before_it_sent_and_the_server_sees_its_spend(secure_training_round):
    r = secure_training_round
    cfg, strategy, encoding = r["cfg"], r["strategy"], r["encoding"]
    for pid in range(3):
        ledger = PrivacyLedger(r["tmp_path"] / f"site{pid}" / "privacy_ledger.json", cfg.privacy.epsilon, 1e-5)
        assert len(ledger.entries) == 1
        (entry,) = ledger.entries
        assert (entry.kind, entry.sample_rate, entry.steps, entry.round) == ("ddg", 1.0, 1, r["server_round"])
        assert entry.run_id == (strategy.run_key or "4242")  # no run key: the Flower run id
        assert entry.noise_multiplier == pytest.approx(encoding.charge_multiplier(2), rel=1e-12)
        spent = ledger.spent_epsilon()
        assert 0 < spent < cfg.privacy.epsilon
        record = next(s for s in strategy.sites.values() if s.partition_id == pid)
        assert record.epsilon_spent == pytest.approx(spent) and record.rounds_answered == 1


def test_the_server_steps_on_the_decoded_sum_and_checkpoints_it(secure_training_round):
    r = secure_training_round
    strategy, encoding, before = r["strategy"], r["encoding"], r["before"]
    after = strategy.training.weights
    gradient = unflatten(encoding.decode(r["revealed"].integers), before)
    lr = np.float32(r["cfg"].downstream.dp_lr)
    assert any(not np.array_equal(before[k], after[k]) for k in before)
    for name in before:  # SGD: w <- w - lr x (the revealed noised sum, in gradient units)
        np.testing.assert_allclose(after[name], before[name] - lr * gradient[name], rtol=1e-5, atol=1e-6)
    checkpoint = r["tmp_path"] / "run" / "training" / f"round-{r['server_round']:04d}.npz"
    assert checkpoint.is_file()
    with np.load(checkpoint) as saved:
        assert sorted(saved.files) == sorted(after)
        for name in after:
            np.testing.assert_array_equal(saved[name], after[name])
    history = strategy.training.history[-1]
    assert history["updates_received"] == 3 and history["phase"] == "dpsgd"
    arrays, metrics = r["result"]
    assert arrays is None and metrics["updates_received"] == 3  # not the last round: nothing handed on


def test_each_masked_vector_is_uniform_and_every_field_sent_is_declared(secure_training_round):
    r = secure_training_round
    replies = r["grid"].replies
    assert {stage for _, stage, _ in replies} == set(STAGE_KINDS)
    for node, stage, reply in replies:
        assert not reply.has_error(), (node, stage)
        assert sent_fields(reply) <= declared_fields(STAGE_KINDS[stage]), (node, stage)
    collected = [(node, reply) for node, stage, reply in replies if stage == Stage.COLLECT_MASKED_VECTORS]
    assert sorted(node for node, _ in collected) == NODES
    for _, reply in collected:
        masked = bytes_to_ndarray(reply.content.config_records[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS][1])
        assert masked.shape == (cnn_parameters(),)
        assert stats.kstest(masked.astype(np.float64) / MODULUS, "uniform").pvalue > 1e-4
        assert not reply.content.array_records[P.FITRES_ARRAYS]  # the clear integers were removed
        assert sent_fields(reply) == declared_fields("secagg-collect")  # the bookkeeping in full, nothing more
        metrics = reply.content.config_records[P.FITRES_METRICS]  # the legacy FitRes keeps its metrics here
        assert metrics[P.NOISE_MULTIPLIER] == pytest.approx(r["encoding"].noise_multiplier)
    own = r["sent"][0].astype(np.float64) + r["encoding"].bound  # the site's own integers: far from uniform
    assert stats.kstest(own / MODULUS, "uniform").pvalue < 1e-6


# --------------------------------------------------------------------------------------------
# 4. Refusals and replays at the site
# --------------------------------------------------------------------------------------------


@pytest.fixture
def secure_site(tmp_path, monkeypatch):
    """(a site of a -tt real secagg run, round 1's secure request, a SecAgg+ setup that carries it)."""
    monkeypatch.setattr(client_app, "_SITES", {})
    cfg = small_config(*REAL)
    strategy = build_strategy(cfg, tmp_path / "run")
    training = strategy.training
    training.weights = training._start(strategy)
    training._shape = SecAggShape.plan(3, cfg.privacy.secagg_threshold)
    request = training.request(strategy, 1)
    bound = training.encoding(strategy).bound
    setup = SecAggSetup(3, 3, 2, float(bound), 2 * bound, MODULUS, 1.0)
    grid = SecureGrid(cfg, tmp_path, **TRUST_ALL)
    context = grid.contexts[NODES[0]]
    site = Site(cfg, context.node_config, 4242)
    return site, request, setup, cfg, context


def assert_uncharged(site):
    assert site.ledger.entries == [] and site.ledger.spent_epsilon() == 0.0
    assert not site.ledger.path.exists()
    assert not list(site.releases.folder.rglob("*.json"))  # nothing stored to replay either


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(sample_rate=0.25), "sample rate 0.25"),
        (dict(privacy_mode="central"), "privacy-mode 'central'"),
        (dict(steps=2), "2 steps"),
        (dict(secagg_summands=1), "1 sites in the sum"),
        (dict(secagg_gradient_cap=0.0), "gradient cap 0.0"),
    ],
)
def test_a_request_that_is_not_a_full_batch_secure_sum_is_refused_before_any_charge(secure_site, change, match):
    site, request, setup, _, _ = secure_site
    with pytest.raises(PrivacyError, match=match):
        site.secure_gradient_step(dataclasses.replace(request, **change), setup, run_id="4242")
    assert_uncharged(site)


def test_a_setup_that_would_clip_the_integers_is_refused_before_any_charge(secure_site):
    site, request, setup, _, _ = secure_site
    with pytest.raises(P.SiteRefusal, match="does not carry"):
        site.secure_gradient_step(request, dataclasses.replace(setup, clipping_range=setup.clipping_range / 2))
    assert_uncharged(site)


def test_a_secure_request_outside_secagg_is_refused_before_any_charge(secure_site):
    """Sent as a plain train.dpsgd message (no SecAgg+ around it), a secure request is not answered."""
    site, request, _, _, _ = secure_site
    with pytest.raises(PrivacyError, match="only inside Flower's SecAgg"):
        site.train_dp(request, run_id="4242")
    assert_uncharged(site)


def test_the_train_handler_answers_a_refused_secure_request_with_an_error_code(secure_site, monkeypatch):
    """Through the ClientApp's train handler, with the mod's setup in the node state: a request at
    sample rate 0.25 is an error reply (no text), and nothing is charged."""
    site, request, setup, _, context = secure_site
    monkeypatch.setattr(SecAggSetup, "from_context", classmethod(lambda cls, ctx: setup))
    arrays, config = dataclasses.replace(request, sample_rate=0.25).to_legacy()
    content = compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters(arrays), config), keep_input=True)
    content.config_records[P.SECAGG_CONFIGS] = ConfigRecord()
    msg = Message(content=content, dst_node_id=NODES[0], message_type=MessageType.TRAIN)
    reply = client_app.train(msg, context)
    assert reply.has_error() and reply.error.code == P.ERROR_BAD_REQUEST
    assert reply.error.reason == P.ERROR_REASONS[P.ERROR_BAD_REQUEST]
    assert client_app.get_site(context).ledger.entries == []


def test_a_replayed_request_gets_the_same_integers_without_a_second_charge(secure_site):
    site, request, setup, cfg, context = secure_site
    first, integers = site.secure_gradient_step(request, setup, run_id="4242")
    assert len(site.ledger.entries) == 1 and site.ledger.entries[0].kind == "ddg"
    spent = site.ledger.spent_epsilon()
    assert spent > 0 and first.epsilon_spent == pytest.approx(spent)
    again, replayed = site.secure_gradient_step(request, setup, run_id="4242")
    np.testing.assert_array_equal(replayed, integers)
    assert len(site.ledger.entries) == 1 and again.epsilon_spent == pytest.approx(spent)
    # A restarted site (same state dir) replays it too, from disk.
    restarted = Site(cfg, context.node_config, 4242)
    _, from_disk = restarted.secure_gradient_step(request, setup, run_id="4242")
    np.testing.assert_array_equal(from_disk, integers)
    assert len(restarted.ledger.entries) == 1
    # Another request for the same round is refused: one release per round.
    other = dataclasses.replace(request, weights={k: v + 1 for k, v in request.weights.items()})
    with pytest.raises(ReleaseMismatchError):
        restarted.secure_gradient_step(other, setup, run_id="4242")
    assert len(restarted.ledger.entries) == 1


# --------------------------------------------------------------------------------------------
# 5. The legacy FitIns that carries a training request
# --------------------------------------------------------------------------------------------


def legacy_request():
    rng = np.random.default_rng(3)
    return P.TrainRequest(
        round=7,
        model="cnn",
        num_classes=10,
        channels=1,
        image_size=28,
        noise_multiplier=28.856,
        sample_rate=1.0,
        steps=1,
        max_grad_norm=0.75,
        lr=0.01,
        optimizer="sgd",
        weights={
            "fc.weight": rng.standard_normal((10, 4)).astype(np.float32),
            "conv.bias": rng.standard_normal(3).astype(np.float32),
            "count": np.arange(5, dtype=np.int64),
        },
        run_key="run-abc",
        privacy_mode="secagg",
        secagg_summands=6,
        secagg_gradient_cap=48.5,
    )


def assert_same_request(back, request):
    for field in dataclasses.fields(P.TrainRequest):
        if field.name != "weights":
            assert getattr(back, field.name) == getattr(request, field.name), field.name
    assert sorted(back.weights) == sorted(request.weights)
    for name, array in request.weights.items():
        assert back.weights[name].dtype == array.dtype
        np.testing.assert_array_equal(back.weights[name], array)
    assert back.fingerprint() == request.fingerprint()  # a replay through SecAgg+ matches the stored release


def test_a_training_request_round_trips_through_a_legacy_fitins():
    request = legacy_request()
    arrays, config = request.to_legacy()
    assert config[P.REQUEST_KIND] == P.TRAIN_DPSGD and config[P.WEIGHT_NAMES] == "conv.bias,count,fc.weight"
    assert_same_request(P.TrainRequest.from_legacy(arrays, config), request)
    # ... and through Flower's own FitIns encoding, the way the SecAgg+ workflow carries it.
    content = compat.fitins_to_recorddict(FitIns(ndarrays_to_parameters(arrays), config), keep_input=True)
    msg = Message(content=content, dst_node_id=NODES[0], message_type=MessageType.TRAIN)
    back = secure_request(msg)
    assert isinstance(back, P.TrainRequest)
    assert_same_request(back, request)


def test_a_legacy_fitins_naming_the_wrong_number_of_parameters_is_refused():
    arrays, config = legacy_request().to_legacy()
    for names in ("conv.bias,count", "conv.bias,count,fc.weight,extra", "", "conv.bias,,fc.weight"):
        with pytest.raises(P.ReplyError, match="secure training request names"):
            P.TrainRequest.from_legacy(arrays, {**config, P.WEIGHT_NAMES: names})
    without = {k: v for k, v in config.items() if k != P.WEIGHT_NAMES}
    with pytest.raises(P.ReplyError):
        P.TrainRequest.from_legacy(arrays, without)
    comma = dataclasses.replace(legacy_request(), weights={"a,b": np.zeros(2, dtype=np.float32)})
    with pytest.raises(ValueError, match="comma-separated"):
        comma.to_legacy()


# --------------------------------------------------------------------------------------------
# 6. The config
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task_type", ["real", "mix"])
def test_secagg_with_dpsgd_task_types_validates(task_type):
    cfg = load_config(overrides=["privacy.mode=secagg", f"feedback.task_type={task_type}"])
    assert cfg.privacy.mode == "secagg" and cfg.privacy.secagg_gradient_cap == 64.0
    assert small_config("privacy.mode=secagg", f"feedback.task_type={task_type}").feedback.task_type == task_type


@pytest.mark.parametrize("cap", ["0", "-1", "nan"])
def test_a_gradient_cap_that_is_not_positive_is_refused(cap):
    with pytest.raises(ConfigError, match="privacy.secagg_gradient_cap must be > 0"):
        load_config(overrides=["privacy.mode=secagg", "feedback.task_type=mix", f"privacy.secagg_gradient_cap={cap}"])
