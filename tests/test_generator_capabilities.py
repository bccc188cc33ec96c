"""Optional generator capabilities are named Protocols (coautogen_fl/generation/base.py), checked
once when the evolution is built, also through the post-processing wrapper."""

from __future__ import annotations

from coautogen_fl.config import load_config
from coautogen_fl.embedding import build_embedder
from coautogen_fl.generation import build_generator
from coautogen_fl.generation.base import GeneratorCapabilities


class Plain:
    def random(self, label, n):
        return []

    def vary(self, candidates, degree):
        return []


class Watching(Plain):
    def observe_votes(self, voted):
        self.seen = list(voted)


def test_a_plain_generator_has_no_extras_and_an_observer_is_recognised():
    assert GeneratorCapabilities.of(Plain()) == GeneratorCapabilities(False, False, False, False, False)
    assert GeneratorCapabilities.of(Watching()).observes_votes


def test_the_glyph_generator_refits_also_behind_the_post_processing_wrapper():
    cfg = load_config(overrides=["postprocess.domain=true"])
    embedder = build_embedder(cfg.embedder)
    wrapped = build_generator(cfg, [str(i) for i in range(10)], "cpu", embedder)
    caps = GeneratorCapabilities.of(wrapped)
    assert caps.refit and caps.filtering and not caps.prompted and not caps.token_limited
