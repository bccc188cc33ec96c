"""Fixtures shared by test modules and requested by name (so they are not imported into them)."""

from __future__ import annotations

import pytest


@pytest.fixture
def strategy(tmp_path):
    """A CoAutoGenStrategy from strategy_helpers' small config (the Message-level strategy tests)."""
    # Imported here: collecting the other test modules does not need the strategy stack.
    from strategy_helpers import small_strategy

    return small_strategy(tmp_path)
