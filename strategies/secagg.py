"""The server's side of a secure round (``privacy.mode=secagg``): Flower's SecAgg+ workflow.

In flwr 1.41 SecAgg+ lives in the legacy workflow: ``SecAggPlusWorkflow`` asks a legacy
``Strategy`` for FitIns (``configure_fit``) and hands it the unmasked aggregate
(``aggregate_fit``). :class:`SecureRound` runs that workflow for one vote round (or one secure
DP-SGD round of ``-tt real`` / ``mix``, :mod:`strategies.training`) with
:class:`_VoteCollector`, a legacy strategy that only carries this round's request in and
the revealed sum out, and a private LegacyContext, so nothing of the legacy machinery reaches
:class:`strategies.strategy.CoAutoGenStrategy`. The workflow's parameters make its quantisation
the identity on the sites' integers (see :mod:`coautogen_fl.secure_votes`), so the "weighted
mean" it reveals times the number of inputs is the exact integer sum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common import FitIns, FitRes, Parameters, Scalar, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import ClientManager, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid

from coautogen_fl import protocol as P
from coautogen_fl.config import RunConfig
from coautogen_fl.secure_votes import MODULUS, SecAggShape, SecureVoteEncoding

from .sites import RoundFailed

if TYPE_CHECKING:
    from .strategy import CoAutoGenStrategy


class _VoteCollector(LegacyStrategy):
    """A legacy strategy for one secure vote round: the same FitIns to every sampled node, and
    the revealed aggregate kept for the caller. Nothing else of the legacy API is used."""

    def __init__(self, proxies: list[ClientProxy], fitins: FitIns) -> None:
        self.proxies, self.fitins = proxies, fitins
        self.mean: list[np.ndarray] | None = None
        self.results: list[tuple[ClientProxy, FitRes]] = []

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        return [(proxy, self.fitins) for proxy in self.proxies]

    def aggregate_fit(
        self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list[Any]
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        self.results = results  # the workflow's failures carry no node id: collect() names who is missing
        self.mean = parameters_to_ndarrays(results[0][1].parameters) if results else None
        return None, {}

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: ClientManager) -> list:
        return []

    def aggregate_evaluate(
        self, server_round: int, results: list, failures: list
    ) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        return None


class IntegerEncoding(Protocol):
    """What a secure round needs of its integer encoding (votes or gradient sums)."""

    @property
    def bound(self) -> int: ...

    def check_modulus(self, sites: int) -> None: ...


@dataclass
class RevealedSum:
    """The exact integer sum one SecAgg+ round revealed, and the public bookkeeping of each
    site in it (node id -> bookkeeping, None where it was malformed)."""

    integers: np.ndarray
    bookkeeping: dict[int, dict[str, Any] | None]


@dataclass(frozen=True)
class SecureRound:
    """One round through SecAgg+: a vote round, or a secure DP-SGD round of ``-tt real`` / ``mix``.

    Parameters
    ----------
    shape : SecAggShape
        SecAgg+'s neighbourhoods and reconstruction threshold.
    encoding : IntegerEncoding
        The round's integer encoding (its clipping range ``bound``, the modulus check).
    timeout : float
        Seconds each of the four stages waits for replies.
    """

    shape: SecAggShape
    encoding: IntegerEncoding
    timeout: float

    def workflow(self) -> SecAggPlusWorkflow:
        """SecAgg+ with the round's neighbourhoods and threshold, and a quantisation that is the
        identity on integers in [-B, B] (weight 1 per site)."""
        bound = self.encoding.bound
        everyone = self.shape.neighbours >= self.shape.sampled
        return SecAggPlusWorkflow(
            num_shares=1.0 if everyone else self.shape.neighbours,  # 1.0: every sampled site
            reconstruction_threshold=self.shape.reconstruction,
            max_weight=1.0,
            clipping_range=float(bound),
            quantization_range=2 * bound,
            modulus_range=MODULUS,
            timeout=self.timeout,
        )

    def run(self, grid: Grid, nodes: list[int], request: P.VoteRequest | P.TrainRequest) -> RevealedSum | None:
        """Run the four stages with ``nodes``; the revealed integer sum, or None when fewer than
        the threshold survived (SecAgg+ then reveals nothing)."""
        self.encoding.check_modulus(len(nodes))
        arrays, config = request.to_legacy()
        run_id = grid.run.run_id
        collector = _VoteCollector(
            [GridClientProxy(n, grid, run_id) for n in nodes], FitIns(ndarrays_to_parameters(arrays), config)
        )
        context = LegacyContext(
            Context(run_id, 0, {}, RecordDict(), {}), strategy=collector, client_manager=SimpleClientManager()
        )
        context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
            {WorkflowKey.CURRENT_ROUND: int(request.round)}
        )
        context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
        self.workflow()(grid, context)
        if collector.mean is None:
            return None
        inputs = len(collector.results)
        # The workflow divides the exact integer sum by the number of inputs: undo it.
        integer_sum = np.rint(collector.mean[0].astype(np.float64) * inputs)
        bookkeeping = {proxy.node_id: _bookkeeping_or_none(res.metrics) for proxy, res in collector.results}
        return RevealedSum(integer_sum, bookkeeping)


def _bookkeeping_or_none(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """A site's public bookkeeping, or None when it is malformed (its votes are in the sum anyway)."""
    try:
        return P.legacy_bookkeeping(metrics)
    except P.ReplyError:
        return None


class SecureVotes:
    """The secagg vote rounds of a :class:`strategies.strategy.CoAutoGenStrategy`: ``configure``
    runs a round's four SecAgg+ stages (Flower's round loop then sends nothing more), and
    ``collect`` hands its revealed sum to ``aggregate_train``.

    Parameters
    ----------
    noise_multiplier : float
        ``s``: the planned noise of the sum, in units of the votes' sensitivity.
    sensitivity : float
        L2 sensitivity of one site's votes (vote units).
    capped : bool
        Whether a per-label cap (-rvpl) lets an added image push another out (twice the changes).
    """

    def __init__(self, cfg: RunConfig, noise_multiplier: float, sensitivity: float, capped: bool) -> None:
        self.cfg, self.noise_multiplier, self.sensitivity, self.capped = cfg, noise_multiplier, sensitivity, capped
        self.shape: SecAggShape | None = None
        self.encoding: SecureVoteEncoding | None = None
        self.revealed: RevealedSum | None = None

    def plan(self, sampled: int, coordinates: int) -> SecureVoteEncoding:
        """The shape and encoding of a round with ``sampled`` sites and ``coordinates`` candidates."""
        p, f = self.cfg.privacy, self.cfg.feedback
        self.shape = SecAggShape.plan(sampled, p.secagg_threshold)
        self.encoding = SecureVoteEncoding.plan(
            self.noise_multiplier,
            self.shape.sites_in_sum,
            f.k,
            p.unit,
            self.sensitivity,
            self.capped,
            p.secagg_vote_cap,
            coordinates,
        )
        return self.encoding

    def configure(self, grid: Grid, nodes: list[int], request: P.VoteRequest) -> None:
        """Run the round's SecAgg+ stages with ``nodes``; the sum waits for :meth:`collect`."""
        assert self.shape is not None and self.encoding is not None, "plan() the round first"
        self.revealed = SecureRound(self.shape, self.encoding, self.cfg.federation.timeout_s).run(grid, nodes, request)

    def collect(self, strategy: "CoAutoGenStrategy", server_round: int) -> tuple[np.ndarray, int, float]:
        """(summed votes, sites in the sum, noise std of the sum); every asked site that is not
        in the sum is recorded. Raises RoundFailed when SecAgg+ revealed nothing."""
        revealed, self.revealed = self.revealed, None
        assert self.shape is not None and self.encoding is not None, "plan() the round first"
        integers, sites = account_revealed(strategy, server_round, revealed, self.shape, "votes")
        return self.encoding.decode(integers), sites, self.encoding.sum_noise_std(sites)


def account_revealed(
    strategy: "CoAutoGenStrategy", server_round: int, revealed: RevealedSum | None, shape: SecAggShape, what: str
) -> tuple[np.ndarray, int]:
    """(the revealed integer sum, sites in it): every asked site not in the sum is recorded as
    dropped, every site in it as answered with its public bookkeeping. Raises RoundFailed when
    SecAgg+ revealed nothing (``what`` names the masked input in the log: votes or gradients)."""
    asked = strategy.sampled.get(server_round, [])
    in_sum = revealed.bookkeeping if revealed is not None else {}
    for node in asked:
        if node not in in_sum:
            strategy.note_failure(server_round, node, "not in the secure sum (refused, failed or lost during SecAgg+)")
    if revealed is None:
        raise RoundFailed(
            f"round {server_round}: secure aggregation aborted: "
            f"too few of the {len(asked)} sites completed SecAgg+ "
            f"(each needs {shape.reconstruction} live sites among its SecAgg+ neighbours; "
            "privacy.secagg_threshold), so nothing was revealed; the sites "
            "that were charged keep the charge. summary.json names each site"
        )
    for node, book in in_sum.items():
        if book is None:
            strategy.note_failure(
                server_round, node, f"malformed public bookkeeping (its masked {what} are in the sum)"
            )
        else:
            strategy.note_answer(node, book)
    return revealed.integers, len(in_sum)
