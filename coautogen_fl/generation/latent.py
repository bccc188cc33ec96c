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
from coautogen_fl.generation.latent_distribution import LatentDistribution, check_fit_arguments
from coautogen_fl.generation.latent_loading import (  # noqa: F401  (re-exported)
    CLASS_ATTRIBUTES,
    GENOTYPE_KEYS,
    LATENT_ATTRIBUTES,
    OPERATIONS,
    _module_int,
    load_latent_module,
    takes_labels,
)
from coautogen_fl.generation.schedule import check_degree
from coautogen_fl.hub import check_device, first_line

# -- the generator ------------------------------------------------------------------------------


class LatentGenerator(CandidateMaker):
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

    # -- running G ---------------------------------------------------------------------------

    def _probe(self) -> None:
        """One forward pass on zeros: a wrong latent size, label handling or output shape fails
        here, at start-up, with the config key to fix."""
        z = np.zeros((2, self.latent_dim), dtype=np.float32)
        labels = np.zeros(2, dtype=np.int64)
        try:
            out = self._forward(z, labels)
        except Exception as exc:
            shape = f"z of shape (2, {self.latent_dim})" + (" and int64 labels" if self.conditional else "")
            raise GeneratorLoadError(
                f"generator '{self.source or type(self.module).__name__}' failed on {shape}: "
                f"{first_line(exc, with_type=True)}; "
                "check generator.latent_dim, and that G's forward takes class labels as its second argument "
                "exactly when it is class-conditional"
            ) from exc
        self._check_output(out, 2)

    def _check_output(self, out: Any, n: int) -> None:
        import torch

        ok = (
            isinstance(out, torch.Tensor)
            and ((out.ndim == 4 and out.shape[1] in (1, 3)) or out.ndim == 3)
            and out.shape[0] == n
        )
        if not ok:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise GeneratorLoadError(
                f"generator '{self.source or type(self.module).__name__}' returned {shape} for {n} latents; a latent "
                "generator must return images (N, C, H, W) with C 1 or 3"
            )

    def _forward(self, z: np.ndarray, labels: np.ndarray) -> Any:
        """G on float32 z (N, D) and int64 labels (N,); the raw output tensor."""
        import torch

        zt = torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32)).to(self.device)
        with torch.no_grad():
            if self.conditional:
                yt = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)).to(self.device)
                return self.module(zt, yt)
            return self.module(zt)

    def _to_images(self, out: Any) -> np.ndarray:
        """G's output (N, C, H, W) in ``output_range`` -> float32 (N, S, S) or (N, S, S, 3) in [0, 1]."""
        import torch.nn.functional as F

        x = out.detach().float()
        if x.ndim == 3:
            x = x[:, None]
        low, high = self.output_range
        x = ((x - low) / (high - low)).clamp_(0.0, 1.0)
        if x.shape[1] == 3 and self.channels == 1:
            x = x.mean(dim=1, keepdim=True)
        elif x.shape[1] == 1 and self.channels == 3:
            x = x.repeat(1, 3, 1, 1)
        size = self.image_size
        if tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp_(
                0.0, 1.0
            )
        array = x.cpu().numpy().astype(np.float32, copy=False)
        array = array[:, 0] if self.channels == 1 else np.moveaxis(array, 1, -1)
        return np.ascontiguousarray(array)

    def _render_batch(self, z: np.ndarray, labels: np.ndarray, batch: int) -> np.ndarray:
        """Images of up to ``batch`` latents, run as one forward pass of exactly ``batch`` rows
        (zero-padded): on a given machine the pixels then depend only on each row's z, label,
        position and the batch shape, which the genotype records."""
        n = z.shape[0]
        zp = np.zeros((batch, self.latent_dim), dtype=np.float32)
        yp = np.zeros(batch, dtype=np.int64)
        zp[:n], yp[:n] = z, labels
        out = self._forward(zp, yp)
        self._check_output(out, batch)
        return self._to_images(out)[:n]

    def _render(self, z: np.ndarray, labels: np.ndarray) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
        """Images of all rows of z in forward passes of ``batch_size``; also (batch, slot) per row."""
        starts = range(0, z.shape[0], self.batch_size)
        if self.progress and z.shape[0]:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="latent generator", unit="batch")
        images: list[np.ndarray] = []
        places: list[tuple[int, int]] = []
        for start in starts:
            stop = min(start + self.batch_size, z.shape[0])
            images.extend(self._render_batch(z[start:stop], labels[start:stop], self.batch_size))
            places.extend((self.batch_size, i) for i in range(stop - start))
        return images, places

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

    # -- learning from votes -----------------------------------------------------------------

    def _voted_by_class(self, voted: Sequence[Candidate]) -> dict[int, list[int]]:
        """Indices of candidates with a z, by label."""
        groups: dict[int, list[int]] = {}
        for i, candidate in enumerate(voted):
            if self._z_of(candidate) is None:
                continue
            label = self._check_label(candidate.label, f"label of candidate {candidate.candidate_id}")
            groups.setdefault(label, []).append(i)
        return groups

    @property
    def mean(self) -> np.ndarray:
        """Per-class sampling means of z, (num_classes, latent_dim)."""
        return self.distribution.mean

    @property
    def std(self) -> np.ndarray:
        """Per-class sampling stds of z, (num_classes, latent_dim)."""
        return self.distribution.std

    @property
    def directions(self) -> dict[int, np.ndarray]:
        """Per-class unit attribute directions learned from the votes."""
        return self.distribution.directions

    def observe_votes(self, voted: Sequence[Candidate]) -> None:
        """Learn per class an attribute direction in z from voted candidates.

        For each class among ``voted`` (candidates with ``votes`` set and a "z"), the direction is
        the unit vector of mean z of the top-voted quarter minus mean z of the bottom-voted
        quarter. A class with fewer than 4 such candidates, or equal means, gets no direction;
        classes absent from ``voted`` keep theirs. Used by ``vary``'s "direction" operation.
        """
        usable = [c for c in voted if c.votes is not None]
        for label, members in self._voted_by_class(usable).items():
            z = np.stack([self._z_of(usable[i]) for i in members]).astype(np.float64)
            self.distribution.observe(label, z, np.array([float(usable[i].votes) for i in members]))

    def fit(
        self, candidates: Sequence[Candidate], weights: np.ndarray, mix: float = 0.8, min_spread: float = 0.08
    ) -> None:
        """Move each class's sampling Gaussian toward its vote-weighted z's (distribution evolution).

        Per class: the weighted mean and std (per dimension) of the candidates' z's, blended as
        ``mix * new + (1 - mix) * old``, the std floored at ``min_spread`` (in units of the prior
        std 1). A class whose weights sum to zero keeps its distribution. Then ``observe_votes``.

        Parameters
        ----------
        candidates : Sequence[Candidate]
            The voted candidates (latent genotypes; others are skipped).
        weights : np.ndarray
            One non-negative weight per candidate (see ``distribution.vote_weights``).
        mix : float, default 0.8
            Weight of the new moments, in [0, 1].
        min_spread : float, default 0.08
            Lower bound of every std, >= 0.
        """
        weights, mix = check_fit_arguments(weights, len(candidates), mix, min_spread)
        for label, members in self._voted_by_class(candidates).items():
            z = np.stack([self._z_of(candidates[i]) for i in members]).astype(np.float64)
            self.distribution.refit(label, z, weights[members], mix, min_spread)
        self.observe_votes(candidates)

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable summary of the sampling distributions (for metrics and the run record)."""
        return self.distribution.describe()


__all__ = [
    "GENOTYPE_KEYS",
    "LATENT_ATTRIBUTES",
    "OPERATIONS",
    "GeneratorLoadError",
    "LatentGenerator",
    "load_latent_module",
    "takes_labels",
]
