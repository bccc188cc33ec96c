"""Differential privacy for vote histograms: accounting, the Gaussian mechanism, site ledgers.

Importing this package does not import torch/opacus; only :class:`OpacusAccountant` does.
"""

from .accountant import (
    ACCOUNTANT_NAMES,
    Accountant,
    GaussianAccountant,
    OpacusAccountant,
    PrivacyError,
    PrivacyWarning,
    delta_for_mu,
    epsilon_for_mu,
    epsilon_for_noise,
    epsilon_for_releases,
    gdp_mu,
    make_accountant,
    mu_for_epsilon,
    noise_multiplier_for_epsilon,
    validate_epsilon_delta,
)
from .ledger import BudgetExceededError, LedgerCorruptError, LedgerEntry, PrivacyLedger
from .mechanism import NOISE_MODES, GaussianMechanism, aggregate_noise_std

__all__ = [
    "ACCOUNTANT_NAMES",
    "Accountant",
    "BudgetExceededError",
    "GaussianAccountant",
    "GaussianMechanism",
    "LedgerCorruptError",
    "LedgerEntry",
    "NOISE_MODES",
    "OpacusAccountant",
    "PrivacyError",
    "PrivacyLedger",
    "PrivacyWarning",
    "aggregate_noise_std",
    "delta_for_mu",
    "epsilon_for_mu",
    "epsilon_for_noise",
    "epsilon_for_releases",
    "gdp_mu",
    "make_accountant",
    "mu_for_epsilon",
    "noise_multiplier_for_epsilon",
    "validate_epsilon_delta",
]
