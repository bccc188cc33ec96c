"""Latent generator: any torch module G(z) or G(z, class), e.g. a (conditional) GAN's generator.

Loading (:func:`load_latent_module`) takes one file in one of three formats: a TorchScript archive,
a state dict plus a factory that builds the module, or (only when trusted) a whole pickled module.
:class:`LatentGenerator` samples latent vectors z per class, varies them (perturb, interpolate,
step along a vote-learned attribute direction) and learns a per-class Gaussian over z from the
votes (``fit``, for ``feedback.evolve=distribution``). A candidate's genotype holds its z (and
label), so :meth:`LatentGenerator.regenerate` re-creates its pixels exactly.

Unconditional G: a candidate of class ``label`` is a sample that does not know its class. The
label is still attached, and the private votes decide which of them look like the class: the
distribution fit then learns a separate region of latent space per class, which turns an
unconditional G into a conditional sampler over the rounds.

``torch`` is imported inside the functions; importing it costs a second.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

import numpy as np

from coautogen_fl.generation.base import Candidate, CandidateMaker, GeneratorLoadError, check_int, check_output_spec
from coautogen_fl.generation.latent_distribution import LatentDistribution, LatentVoteLearner
from coautogen_fl.generation.latent_loading import (  # noqa: F401  (re-exported)
    CLASS_ATTRIBUTES,
    GENOTYPE_KEYS,
    LATENT_ATTRIBUTES,
    OPERATIONS,
    _module_int,
    load_latent_module,
    takes_labels,
)
from coautogen_fl.generation.latent_render import LatentRenderer
from coautogen_fl.generation.schedule import check_degree
from coautogen_fl.hub import check_device

# -- the generator ------------------------------------------------------------------------------


class LatentGenerator(LatentRenderer, LatentVoteLearner, CandidateMaker):
    """A latent-variable generator G(z) or G(z, class); implements the ``Generator`` protocol.

    Parameters
    ----------
    module : torch.nn.Module
        G, e.g. from :func:`load_latent_module`; called as ``G(z)`` or ``G(z, labels)`` with z
        float32 (N, latent_dim) and labels int64 (N,), returning (N, C, H, W) (or (N, H, W))
        with C 1 or 3, values in ``output_range``.
    class_names : Sequence[str]
        One non-blank name per class; a conditional G's label ``i`` is ``class_names[i]``.
    image_size : int, default 28
        Output side length; G's images are resized (bilinear, antialiased).
    channels : int, default 1
        1 gives (H, W) images (the channel mean of an RGB G), 3 gives (H, W, 3).
    device : str, default "cpu"
        torch device z and labels are put on (the module should already be there).
    seed : int, default 0
        Seeds the one numpy Generator every draw comes from: same seed, same calls, same candidates.
    latent_dim : int, default 0
        Size of z; 0 reads the module attribute ``latent_dim``, ``z_dim`` or ``nz``.
    conditional : bool or None, default None
        Whether G takes labels; None detects it from the forward signature (see :func:`takes_labels`).
    output_range : (float, float), default (-1.0, 1.0)
        The value range of G's output (tanh GANs: (-1, 1); sigmoid: (0, 1)); mapped to [0, 1] and clipped.
    perturb_scale : float, default 1.0
        Std of a "perturb" step at degree 1, in units of the prior std of z (1).
    batch_size : int, default 64
        Rows per forward pass. Every pass has exactly this many rows (padded with zeros), so a
        candidate's pixels do not depend on what else was in its batch.
    source : str, default ""
        The model's name or path, recorded in every genotype as "model".
    progress : bool, default False
        Show a tqdm bar over batches.
    operations : sequence of str, default all of ``OPERATIONS``
        The operations ``vary`` may use; "perturb" is the fallback when none of them fits a parent.

    Attributes
    ----------
    mean, std : np.ndarray
        (num_classes, latent_dim) float64: the per-class Gaussian ``random`` samples z from
        (0 and 1 until ``fit``).
    directions : dict[int, np.ndarray]
        Per class, the unit attribute direction learned by ``observe_votes`` (low- to high-voted).
    """

    ID_PREFIX = "latent"

    def __init__(
        self,
        module: Any,
        class_names: Sequence[str],
        image_size: int = 28,
        channels: int = 1,
        device: str = "cpu",
        seed: int = 0,
        latent_dim: int = 0,
        conditional: bool | None = None,
        output_range: tuple[float, float] = (-1.0, 1.0),
        perturb_scale: float = 1.0,
        batch_size: int = 64,
        source: str = "",
        progress: bool = False,
        operations: Sequence[str] = OPERATIONS,
    ) -> None:
        names = check_output_spec(class_names, image_size, channels)
        check_int("latent_dim", latent_dim, 0)
        check_int("batch_size", batch_size, 1)
        try:
            low, high = (float(v) for v in output_range)
        except (TypeError, ValueError):
            raise ValueError(f"output_range must be two numbers (low, high), got {output_range!r}") from None
        if not (math.isfinite(low) and math.isfinite(high) and high > low):
            raise ValueError(f"output_range must be finite with high > low, got {output_range!r}")
        if (
            isinstance(perturb_scale, bool)
            or not isinstance(perturb_scale, numbers.Real)
            or not (math.isfinite(perturb_scale) and perturb_scale >= 0)
        ):
            raise ValueError(f"perturb_scale must be a finite number >= 0, got {perturb_scale!r}")
        unknown = [op for op in operations if op not in OPERATIONS]
        if unknown or not operations:
            raise ValueError(f"operations must be a non-empty subset of {OPERATIONS}, got {list(operations)!r}")
        if conditional is not None and not isinstance(conditional, bool):
            raise ValueError(f"conditional must be true, false or None (detect), got {conditional!r}")
        check_device(device, GeneratorLoadError)

        dim = int(latent_dim) or _module_int(module, LATENT_ATTRIBUTES)
        if not dim:
            raise GeneratorLoadError(
                f"the latent size of generator '{source or type(module).__name__}' is unknown: the module has no "
                f"attribute {' / '.join(LATENT_ATTRIBUTES)} (traced TorchScript keeps none); set generator.latent_dim"
            )
        self.module = module
        self.class_names = names
        self.image_size = int(image_size)
        self.channels = int(channels)
        self.device = device
        self.seed = seed
        self.latent_dim = int(dim)
        self.conditional = takes_labels(module) if conditional is None else bool(conditional)
        self.output_range = (low, high)
        self.perturb_scale = float(perturb_scale)
        self.batch_size = int(batch_size)
        self.source = str(source)
        self.progress = bool(progress)
        self.operations = tuple(operations)
        known = _module_int(module, CLASS_ATTRIBUTES)
        if self.conditional and known is not None and len(names) > known:
            raise GeneratorLoadError(
                f"generator '{source or type(module).__name__}' knows {known} classes but the run has "
                f"{len(names)} class names; use a generator trained on the run's classes"
            )
        self._probe()
        k = len(names)
        #: What the votes taught: per-class Gaussians over z and attribute directions.
        self.distribution = LatentDistribution(k, self.latent_dim)
        self._rng = np.random.default_rng(seed)

    # -- genotypes ---------------------------------------------------------------------------

    def _z_of(self, candidate: Candidate) -> np.ndarray | None:
        """The candidate's z as float32, None when its genotype has none; raises on a wrong size."""
        genotype = candidate.genotype if isinstance(candidate.genotype, dict) else {}
        if "z" not in genotype:
            return None
        try:
            z = np.asarray(genotype["z"], dtype=np.float32)
        except (TypeError, ValueError):
            z = np.zeros(0, dtype=np.float32)
        if z.shape != (self.latent_dim,) or not np.all(np.isfinite(z)):
            raise ValueError(
                f"candidate {candidate.candidate_id} has a 'z' that is not {self.latent_dim} finite numbers: it was "
                f"not made by this latent generator (latent_dim {self.latent_dim})"
            )
        return z

    def _require_z(self, candidate: Candidate) -> np.ndarray:
        z = self._z_of(candidate)
        if z is None:
            raise ValueError(
                f"candidate {candidate.candidate_id} has no latent genotype (a 'z' of {self.latent_dim} numbers): vary "
                "only candidates made by a LatentGenerator"
            )
        return z

    _make = CandidateMaker._candidate

    def _emit(
        self, labels: list[int], zs: np.ndarray, genotypes: list[dict[str, Any]], parents: Sequence[Candidate] | None
    ) -> list[Candidate]:
        """Render all z's, complete their genotypes (z, batch, slot) and wrap them into candidates."""
        images, places = self._render(zs, np.asarray(labels, dtype=np.int64))
        out = []
        for i, (genotype, image, (batch, slot)) in enumerate(zip(genotypes, images, places)):
            genotype["z"] = [float(v) for v in zs[i]]  # float32 -> float is exact, so is JSON
            genotype["batch"], genotype["slot"] = batch, slot
            parent = None if parents is None else parents[i]
            out.append(
                self._make(
                    labels[i],
                    genotype,
                    image,
                    None if parent is None else parent.candidate_id,
                    0 if parent is None else parent.round + 1,
                )
            )
        return out

    # -- protocol ----------------------------------------------------------------------------

    def random(self, label: int, n: int) -> list[Candidate]:
        """Draw ``n`` fresh candidates of class ``label``: z ~ N(mean[label], std[label]).

        An unconditional G ignores the label; the candidates still carry it and the votes decide
        which of them belong to the class (see the module docstring).

        Returns
        -------
        list[Candidate]
            Candidates with ``parent_id=None``, ``round=0`` and genotype ``{"model", "op":
            "sample", "z", "label", "batch", "slot"}``.
        """
        label = self._check_label(label, "label")
        n = check_int("n", n, 0)
        if n == 0:
            return []
        zs = self.distribution.sample(label, n, self._rng)
        genotypes = [{"model": self.source, "op": "sample", "label": label} for _ in range(n)]
        return self._emit([label] * n, zs, genotypes, None)

    def vary(self, candidates: Sequence[Candidate], degree: float) -> list[Candidate]:
        """One child per parent, by one operation each, chosen uniformly with the generator's rng
        among those possible for that parent:

        - "perturb": ``z + degree * perturb_scale * N(0, I)`` (always possible; the fallback).
        - "interpolate": ``z + t * (z_other - z)``, ``t = degree * U(0, 1)``, toward another parent
          (a different candidate) of the same label in this call.
        - "direction": ``z + degree * perturb_scale * ||N(0, I)|| * d``, a step as long as a
          perturbation along the class's attribute direction d (see ``observe_votes``).

        Parameters
        ----------
        candidates : Sequence[Candidate]
            Parents with latent genotypes from this generator.
        degree : float
            Variation strength, in [0, 1] (0 keeps z).

        Returns
        -------
        list[Candidate]
            Children in parent order with the parent's label, ``parent_id`` set and ``round =
            parent.round + 1``; the genotype records "op", "parents" (the ids involved), the
            step ("sigma"; "t"; "step" and "direction") and the child's "z".
        """
        degree = check_degree(degree)
        parents = list(candidates)
        labels = [self._check_label(p.label, f"label of candidate {p.candidate_id}") for p in parents]
        zs = [self._require_z(p) for p in parents]
        rng = self._rng
        children = np.empty((len(parents), self.latent_dim), dtype=np.float32)
        genotypes: list[dict[str, Any]] = []
        same_label: dict[int, list[int]] = {}
        for j, label in enumerate(labels):
            same_label.setdefault(label, []).append(j)
        for i, parent in enumerate(parents):
            label, z = labels[i], zs[i].astype(np.float64)
            partners = [j for j in same_label[label] if parents[j].candidate_id != parent.candidate_id]
            possible = [
                op
                for op in self.operations
                if op == "perturb"
                or (op == "interpolate" and partners)
                or (op == "direction" and label in self.directions)
            ]
            possible = possible or ["perturb"]
            op = possible[int(rng.integers(len(possible)))]
            genotype: dict[str, Any] = {
                "model": self.source,
                "op": op,
                "label": label,
                "parents": [parent.candidate_id],
            }
            if op == "perturb":
                sigma = degree * self.perturb_scale
                child = z + sigma * rng.standard_normal(self.latent_dim)
                genotype["sigma"] = float(sigma)
            elif op == "interpolate":
                j = partners[int(rng.integers(len(partners)))]
                t = degree * float(rng.uniform(0.0, 1.0))
                child = z + t * (zs[j].astype(np.float64) - z)
                genotype["parents"].append(parents[j].candidate_id)
                genotype["t"] = float(t)
            else:
                direction = self.directions[label]
                step = degree * self.perturb_scale * float(np.linalg.norm(rng.standard_normal(self.latent_dim)))
                child = z + step * direction
                genotype["step"] = float(step)
                genotype["direction"] = [float(v) for v in direction]
            children[i] = child.astype(np.float32)
            genotypes.append(genotype)
        return self._emit(labels, children, genotypes, parents)

    def regenerate(self, genotype: dict[str, Any]) -> np.ndarray:
        """Re-create a candidate's pixels exactly from its genotype's z and label.

        The z is rendered at the same row of a forward pass of the same size as when it was made
        ("batch", "slot"), so the pixels come back bit for bit on the same machine and device
        (on CUDA, as far as its kernels are deterministic).

        Returns
        -------
        np.ndarray
            float32 in [0, 1], (image_size, image_size) or (image_size, image_size, 3).
        """
        if not isinstance(genotype, dict) or "z" not in genotype or "label" not in genotype:
            raise ValueError(f"genotype lacks 'z' or 'label': not a latent genotype (keys {list(GENOTYPE_KEYS)})")
        if genotype.get("model", self.source) != self.source:
            raise ValueError(f"genotype was made by model '{genotype['model']}', this generator runs '{self.source}'")
        label = self._check_label(genotype["label"], "genotype label")
        z = self._require_z(Candidate("genotype", label, np.zeros(0), genotype))
        batch = check_int("genotype batch", genotype.get("batch", self.batch_size), 1)
        slot = check_int("genotype slot", genotype.get("slot", 0), 0, batch - 1)
        zs = np.zeros((slot + 1, self.latent_dim), dtype=np.float32)
        zs[slot] = z
        labels = np.zeros(slot + 1, dtype=np.int64)
        labels[slot] = label
        return self._render_batch(zs, labels, batch)[slot]


__all__ = [
    "GENOTYPE_KEYS",
    "LATENT_ATTRIBUTES",
    "OPERATIONS",
    "GeneratorLoadError",
    "LatentGenerator",
    "load_latent_module",
    "takes_labels",
]
