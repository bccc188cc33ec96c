"""Issue 9, data-folder checks at the site: a deployed site's ImageFolder (node config
``data-path``) through the real ClientApp, and the simulation preflight.

- unreadable files are skipped and counted, all of them listed in one record of the site's own
  log, once per process; ``data.on_bad_image=error`` refuses, naming every file, locally only;
- an empty class and a class with fewer than 2 images are warned about in the site's log and
  in the preflight, and the site still votes (a refusal over one image would leak it);
- a site whose ``data-path`` is not set, not found or empty fails at start-up (Flower's
  lifespan hook, before the first message is handled) with one log line naming ``data-path``,
  and answers with ``ERROR_DATA_PATH`` and its generic line: no path, no simulation advice.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity
from PIL import Image

from clients import client_app
from clients import site as site_module
from clients.wire import from_content, to_content
from coautogen_fl import protocol as P
from coautogen_fl.config import config_from_run_config, flatten, load_config, to_dict
from coautogen_fl.embedding import build_embedder
from coautogen_fl.privacy import noise_multiplier_for_epsilon
from coautogen_fl.rater import vote_histogram

from strategy_helpers import declared_fields, sent_fields

RUN_ID = 4242
NODE_ID = 17
CLASSES = ("a", "b", "c", "d")
SMALL = [
    "feedback.rounds=2",
    "feedback.candidates_per_label=3",
    "feedback.volume_per_label=5",
    "federation.num_hospitals=3",
]


@pytest.fixture(autouse=True)
def isolated(monkeypatch):
    """A fresh process for every test: no cached site, nothing logged yet; the server's task
    identity for the request Messages built here."""
    monkeypatch.setattr(client_app, "_SITES", {})
    monkeypatch.setattr(client_app, "_START_FAILURES", {})
    monkeypatch.setattr(site_module, "_REPORTED_FOLDERS", set())
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
    monkeypatch.setattr(TaskIdentity, "_run_id", RUN_ID)
    monkeypatch.setattr(TaskIdentity, "_node_id", SUPERLINK_NODE_ID)


def write_image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(path)


def write_site(root: Path, counts: dict[str, int], seed: int = 0) -> Path:
    """An ImageFolder with ``counts[c]`` readable images in class folder ``c`` (0: an empty folder)."""
    for c, n in counts.items():
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            write_image(root / c / f"{i}.png", seed * 1000 + CLASSES.index(c) * 100 + i)
    return root


def run_config(*overrides: str) -> dict:
    return {**flatten(to_dict(load_config(overrides=[*SMALL, *overrides]))), "config-file": ""}


def deployed(tmp_path: Path, overrides=(), **node) -> Context:
    node_config = {"partition-id": 1, "state-dir": str(tmp_path / "state"), "site-epsilon": 1.0, **node}
    return Context(
        run_id=RUN_ID, node_id=NODE_ID, node_config=node_config, state=RecordDict(), run_config=run_config(*overrides)
    )


def train_request(context: Context, folder: Path, per_class: int = 2) -> Message:
    """Candidates: real-looking images of every class (fresh seeds), embedded as the server does."""
    cfg = config_from_run_config(context.run_config)
    paths, labels = [], []
    for label, _ in enumerate(CLASSES):
        for i in range(per_class):
            paths.append(folder.parent / "candidates" / f"{label}-{i}.png")
            write_image(paths[-1], 77_000 + label * 10 + i)
            labels.append(label)
    from coautogen_fl.data import _read_image

    images = np.stack([_read_image(p, cfg.data.image_size, cfg.data.channels) for p in paths])
    embeddings = build_embedder(cfg.embedder).embed(images).astype(np.float16)
    sigma = noise_multiplier_for_epsilon(1.0, 1e-5, 2)
    request = P.VoteRequest(1, "PE", 1, sigma, "local", "image", embeddings, np.array(labels, dtype=np.int64))
    return Message(content=to_content(request.to_parts()), dst_node_id=NODE_ID, message_type=MessageType.TRAIN)


def records(caplog, level=logging.WARNING) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "flwr" and r.levelno >= level]


def assert_declared_vote_reply(reply: Message) -> None:
    assert not reply.has_error(), reply.error.reason
    assert sent_fields(reply) == declared_fields("train")


# ------------------------------------------------------------------ unreadable files and small classes
def test_site_skips_unreadable_files_warns_once_and_votes(tmp_path, caplog):
    folder = write_site(tmp_path / "site", {"a": 6, "b": 1, "c": 0, "d": 5})
    bad = [folder / "a" / "broken.png", folder / "d" / "truncated.png"]
    bad[0].write_bytes(b"not an image")
    write_image(bad[1], 5)
    bad[1].write_bytes(bad[1].read_bytes()[:50])
    context = deployed(tmp_path, **{"data-path": str(folder)})
    request = train_request(context, folder)

    with caplog.at_level(logging.INFO, logger="flwr"):
        reply = client_app.app(request, context)  # through the lifespan hook, as Flower calls it
        again = client_app.app(train_request(context, folder), context)  # same process: site cached

    assert_declared_vote_reply(reply)
    assert_declared_vote_reply(again)
    warnings = records(caplog)
    assert len(warnings) == 1, warnings  # everything in one record, once per process
    text = warnings[0]
    assert "node config data-path" in text and "2 unreadable image file(s) skipped" in text
    assert all(str(p) in text for p in bad)
    assert "class 'b' holds 1 readable image" in text and "class 'c' holds no readable images" in text

    # The skipped files change nothing else: the site votes exactly as without them.
    site = client_app.get_site(context)
    assert len(site.data.train) + len(site.data.test) == 12
    for p in bad:
        p.unlink()
    client_app._SITES.clear()
    clean = client_app.get_site(context)
    np.testing.assert_array_equal(site.data.train.images, clean.data.train.images)
    np.testing.assert_array_equal(site.data.test.labels, clean.data.test.labels)


def test_a_small_class_does_not_change_whether_the_site_votes(tmp_path):
    """Adding the one image of a class that had none must not flip vote <-> error: both worlds vote
    and send the same declared fields; the clean votes differ by the one image (L2 1)."""
    replies, clean = {}, {}
    for world, counts in {
        "without": {"a": 4, "b": 0, "c": 3, "d": 3},
        "with": {"a": 4, "b": 1, "c": 3, "d": 3},
    }.items():
        folder = write_site(tmp_path / world / "site", counts)
        context = deployed(tmp_path, **{"data-path": str(folder)})  # one state dir: the same secret key
        request = train_request(context, folder)
        client_app._SITES.clear()
        (tmp_path / "state" / "privacy_ledger.json").unlink(missing_ok=True)
        replies[world] = client_app.app(request, context)
        site = client_app.get_site(context)
        parts = P.VoteRequest.from_parts(from_content(request.content))
        clean[world] = vote_histogram(
            site.embeddings, site.data.train.labels, parts.embeddings.astype(np.float32), parts.labels, 1
        )
        assert_declared_vote_reply(replies[world])
    assert set(replies["with"].content.metric_records[P.METRICS]) == set(
        replies["without"].content.metric_records[P.METRICS]
    )
    assert np.linalg.norm(clean["with"] - clean["without"]) <= 1.0 + 1e-12


def test_on_bad_image_error_refuses_and_names_the_files_only_locally(tmp_path, caplog):
    folder = write_site(tmp_path / "site", {"a": 3, "b": 3, "c": 3, "d": 3})
    bad = [folder / "b" / "x.png", folder / "c" / "y.jpg"]
    for p in bad:
        p.write_bytes(b"junk")
    context = deployed(tmp_path, ["data.on_bad_image=error"], **{"data-path": str(folder)})
    with caplog.at_level(logging.WARNING, logger="flwr"):
        reply = client_app.app(train_request(context, folder), context)
    assert reply.has_error() and reply.error.code == P.ERROR_NO_DATA
    assert reply.error.reason == P.ERROR_REASONS[P.ERROR_NO_DATA]
    assert str(tmp_path) not in reply.error.reason
    text = "\n".join(records(caplog))
    assert all(str(p) in text for p in bad)  # every bad file, in one pass
    assert not (tmp_path / "state" / "privacy_ledger.json").exists()


# ------------------------------------------------------------------ data-path not set, not found, empty
@pytest.mark.parametrize(
    "case", ["not found", "empty folder", "class folders without images", "empty value", "not set"]
)
def test_a_site_without_a_data_folder_fails_at_start_up_naming_data_path(tmp_path, caplog, case):
    node: dict = {}
    if case == "not found":
        node["data-path"] = str(tmp_path / "no-such-folder")
    elif case == "empty folder":
        (tmp_path / "empty").mkdir()
        node["data-path"] = str(tmp_path / "empty")
    elif case == "class folders without images":
        write_site(tmp_path / "hollow", {"a": 0, "b": 0})
        (tmp_path / "hollow" / "a" / "readme.txt").write_text("no images here")
        node["data-path"] = str(tmp_path / "hollow")
    elif case == "empty value":
        node["data-path"] = ""
    context = deployed(tmp_path, **node)  # "not set": neither data-path nor num-partitions
    request = train_request(context, tmp_path / "server")

    with caplog.at_level(logging.INFO, logger="flwr"):
        reply = client_app.app(request, context)

    assert reply.has_error() and reply.error.code == P.ERROR_DATA_PATH, case
    assert reply.error.reason == P.ERROR_REASONS[P.ERROR_DATA_PATH]
    assert "data-path" in reply.error.reason and str(tmp_path) not in reply.error.reason
    assert reply.metadata.src_node_id == NODE_ID and reply.metadata.reply_to_message_id == request.metadata.message_id
    lines = records(caplog)
    assert len(lines) == 1, lines
    line = lines[0]
    assert "\n" not in line and "data-path" in line and "data.name" not in line and "-cdata" not in line
    assert "Traceback" not in line
    # Failed before the ledger or the secret key were touched.
    assert not (tmp_path / "state").exists()


def test_start_up_failure_also_without_the_lifespan_and_for_evaluation(tmp_path):
    context = deployed(tmp_path, **{"data-path": str(tmp_path / "missing")})
    reply = client_app.train(train_request(context, tmp_path / "server"), context)  # the handler alone
    assert reply.has_error() and reply.error.code == P.ERROR_DATA_PATH
    from coautogen_fl.downstream import build_classifier, state_dict_to_numpy

    request = P.EvaluationRequest(3, "cnn", 4, 1, 28, 1.0, state_dict_to_numpy(build_classifier("cnn", 4, 1, 28)))
    message = Message(content=to_content(request.to_parts()), dst_node_id=NODE_ID, message_type=MessageType.EVALUATE)
    reply = client_app.app(message, context)
    assert reply.has_error() and reply.error.code == P.ERROR_DATA_PATH
    assert client_app._START_FAILURES == {}  # kept only while its message is handled


def test_the_bundled_partition_still_needs_no_data_path(tmp_path):
    context = deployed(tmp_path, **{"num-partitions": 3})
    assert client_app.get_site(context).data.report is None


def test_new_error_code_is_declared_and_not_a_refusal():
    assert P.ERROR_DATA_PATH in P.ERROR_REASONS and P.ERROR_DATA_PATH not in P.REFUSAL_CODES
    assert len(set(P.ERROR_REASONS)) == len(P.ERROR_REASONS)


# ------------------------------------------------------------------ simulation preflight
def test_preflight_prints_the_folder_check_and_small_classes_per_site(tmp_path):
    from simulations.cli import preflight

    folder = write_site(tmp_path / "data", {"a": 12, "b": 12, "c": 0, "d": 1})
    (folder / "a" / "broken.png").write_bytes(b"junk")
    (folder / "b" / "gone.jpg").write_bytes(b"")
    cfg = load_config(overrides=[f"data.name={folder}", "federation.num_hospitals=2", "data.image_size=16"])
    out = io.StringIO()
    preflight(cfg, out=out)
    text = out.getvalue()
    assert f"data check of data.name={folder}" in text
    assert str(folder / "a" / "broken.png") in text and str(folder / "b" / "gone.jpg") in text
    assert "class 'c' holds no readable images" in text and "class 'd' holds 1 readable image" in text
    assert "2 of 2 simulated sites hold fewer than 2 images of a class" in text and "'c' 0" in text

    from simulations.cli import PreflightError

    strict = load_config(overrides=[f"data.name={folder}", "federation.num_hospitals=2", "data.on_bad_image=error"])
    with pytest.raises(PreflightError, match="cannot read 2 image file"):
        preflight(strict, out=io.StringIO())


def test_preflight_is_quiet_on_the_default_digits():
    from simulations.cli import preflight

    out = io.StringIO()
    preflight(load_config(), out=out)
    assert out.getvalue() == ""
