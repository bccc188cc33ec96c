"""The ServerApp: read the run config, build the run, drive the strategy, write the summary."""

from __future__ import annotations

import time
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from coautogen_fl.active import ActiveLoop
from coautogen_fl.checkpoint import Checkpoint, CheckpointError, check_resumable
from coautogen_fl.config import RunConfig, config_from_run_config, flatten, load_config, save_config, to_dict
from coautogen_fl.data import load_pool_and_test
from coautogen_fl.device import resolve_device
from coautogen_fl.downstream import predict_probabilities, pretrained_weights
from coautogen_fl.embedding import build_embedder
from coautogen_fl.evolution import Evolution
from coautogen_fl.frameworks import FRAMEWORKS
from coautogen_fl.generation import build_generator
from coautogen_fl.generation.pipeline import build_upscaler, save_prompt_pool
from coautogen_fl.generation.schedule import DegreeSchedule
from coautogen_fl.privacy import noise_multiplier_for_epsilon, validate_epsilon_delta
from coautogen_fl.report import write_report
from coautogen_fl.rundir import resolve_run_dir
from coautogen_fl.store import SyntheticStore
from coautogen_fl.tracking import RunTracker, site_lines

from .outcome import FinalStage
from .privacy_plan import model_parameters, secagg_noise, secagg_training_plan, training_plan
from .resume import restore, rounds_left
from .strategy import VOTING_FRAMEWORKS, CoAutoGenStrategy, RoundFailed, SiteRecord
from .training import TrainingRounds

app = ServerApp()


def build_strategy(cfg: RunConfig, run_dir: Path) -> CoAutoGenStrategy:
    """Everything the server needs, from the config alone."""
    device = resolve_device(cfg.device, cfg.device_id)
    pool, real_test = load_pool_and_test(cfg.data)
    validate_epsilon_delta(cfg.privacy.epsilon, cfg.privacy.delta, num_private=max(1, len(pool)))
    check_downstream_weights(cfg)
    class_names = pool.class_names
    g = cfg.generator
    embedder = build_embedder(cfg.embedder, device)
    generator = build_generator(cfg, class_names, device, embedder)
    schedule = DegreeSchedule(g.degree_start, g.degree_end, g.degree_step)
    t = cfg.tracking
    tracker = RunTracker(run_dir, t.wandb_mode, t.wandb_project, t.wandb_entity, run_dir.name, to_dict(cfg))
    upscale_final = cfg.postprocess.upscaler and cfg.postprocess.upscale_on == "final"
    final = FinalStage(
        cfg,
        class_names,
        SyntheticStore(run_dir, class_names),
        tracker,
        real_test,
        device,
        upscaler=build_upscaler(cfg, device) if upscale_final else None,
        embedder=embedder,
    )
    active = (
        active_loop(cfg, generator, len(class_names), final, device)
        if FRAMEWORKS[cfg.feedback.framework].evolve == "active"
        else None
    )
    evolution = Evolution(generator, embedder, len(class_names), cfg.feedback, schedule, g.seed, active)
    feedback = cfg.feedback.framework in VOTING_FRAMEWORKS
    # Every release a site makes is planned: the voting rounds, plus the evaluation when noised.
    votes = feedback and cfg.feedback.task_type != "real"
    releases = (cfg.feedback.rounds if votes else 0) + (1 if cfg.privacy.evaluation == "noised" else 0)
    evaluations = releases - (cfg.feedback.rounds if votes else 0)
    if cfg.feedback.task_type == "syn" and cfg.privacy.mode == "secagg" and votes:
        sigma = secagg_noise(cfg, len(class_names), evaluations)
        return CoAutoGenStrategy(cfg, evolution, final, sigma, cfg.federation.max_site_images)
    if cfg.feedback.task_type == "syn":
        sigma = noise_multiplier_for_epsilon(cfg.privacy.epsilon, cfg.privacy.delta, releases) if releases else 0.0
        return CoAutoGenStrategy(cfg, evolution, final, sigma, cfg.federation.max_site_images)
    # -tt real/mix: one epsilon for the votes, the noised evaluation and DP-SGD
    if cfg.privacy.mode == "secagg":
        plan = secagg_training_plan(cfg, len(class_names), evaluations, model_parameters(final))
    else:
        plan = training_plan(cfg, releases)
    strategy = CoAutoGenStrategy(cfg, evolution, final, plan.gaussian, cfg.federation.max_site_images)
    strategy.training = TrainingRounds(cfg, plan.training, strategy.rounds + 1, run_dir)
    return strategy


def active_loop(cfg: RunConfig, generator: Any, num_classes: int, final: FinalStage, device: str) -> ActiveLoop:
    """-f Active's loop: each round's model is the downstream model (``FinalStage.train_model``),
    trained for feedback.active_epochs."""
    f = cfg.feedback

    def train(images: np.ndarray, labels: np.ndarray) -> Any:
        return final.train_model(images, labels, f.active_epochs)

    def predict(model: Any, images: np.ndarray) -> np.ndarray:
        return predict_probabilities(model, images, device=device)

    return ActiveLoop(
        generator, num_classes, train, predict, f.active_steer, f.active_oversample, f.mix_ratio, cfg.generator.seed
    )


def check_downstream_weights(cfg: RunConfig) -> None:
    """-cmp: find the ImageNet weights before any site is charged (a run that spends privacy and
    then cannot train is the worst failure); the cnn has none, so there the flag does nothing."""
    if cfg.downstream.pretrained and cfg.downstream.model != "resnet18":
        log(
            WARNING,
            "downstream.pretrained (-cmp) applies to -cmodel resnet18; the %s has no ImageNet weights and "
            "starts from random ones",
            cfg.downstream.model,
        )
    pretrained_weights(cfg.downstream.pretrained, cfg.downstream.model, cfg.downstream.weights)


def resume_strategy(cfg: RunConfig, run_dir: Path) -> CoAutoGenStrategy:
    """The strategy of the run in ``run_dir``, brought to its last checkpoint.

    The run config must be the run's own ``config.yaml`` (plus ``tracking.resume=true``): the
    replay is only exact under the same seeds, pool sizes and noise plan.
    """
    if not cfg.tracking.run_dir:
        raise CheckpointError("tracking.resume=true needs tracking.run_dir: the run directory to continue")
    saved = load_config(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else None
    if saved is None:
        raise CheckpointError(f"nothing to resume in {run_dir}: no config.yaml (was it a coautogen-fl run directory?)")
    check_resumable(run_dir)
    given, own = flatten(to_dict(cfg)), flatten(to_dict(saved))
    differ = sorted(k for k in set(given) | set(own) if k != "tracking.resume" and given.get(k) != own.get(k))
    if differ:
        raise CheckpointError(
            f"the run config differs from {run_dir / 'config.yaml'} in {', '.join(differ)}: "
            f'resume with config-file="{run_dir / "config.yaml"}" tracking.resume=true and nothing else'
        )
    strategy = build_strategy(saved, run_dir)
    restore(strategy, Checkpoint.load(run_dir))
    return strategy


def site_entry(site: SiteRecord) -> dict[str, Any]:
    """One site in summary.json: who it is, what became of each request, its own budget and spend."""
    return {
        "partition_id": site.partition_id if site.partition_id >= 0 else None,
        "site_name": site.label or None,
        "node_id": site.node_id,
        "status": site.status,
        "rounds_answered": site.rounds_answered,
        "epsilon_budget": site.epsilon_budget,
        "epsilon_spent": site.epsilon_spent,
        "refusals": site.refusals,
        "failures": site.failures,
    }


def run_summary(
    cfg: RunConfig, strategy: CoAutoGenStrategy, run_dir: Path, wall_time_s: float, failure: str | None = None
) -> dict[str, Any]:
    """The summary.json of a run; ``failure`` is the one-line reason of a run that stopped."""
    ordered = sorted(strategy.sites.values(), key=lambda s: (s.partition_id < 0, s.partition_id, s.node_id))
    sites = {s.name: site_entry(s) for s in ordered}
    return {
        "status": "failed" if failure else "completed",
        "reason": failure,
        "framework": cfg.feedback.framework,
        "rater": cfg.feedback.rater,
        "generator": cfg.generator.name,
        "embedder": cfg.embedder.name,
        "epsilon": cfg.privacy.epsilon,
        "delta": cfg.privacy.delta,
        "privacy_mode": cfg.privacy.mode,
        "privacy_unit": cfg.privacy.unit,
        "privacy_evaluation": cfg.privacy.evaluation,
        "noise_multiplier": strategy.noise_multiplier,
        "epsilon_spent_max": max((s["epsilon_spent"] for s in sites.values()), default=0.0),
        "sites": sites,
        "rounds": strategy.rounds if strategy.is_feedback else 0,
        "num_hospitals": sum(1 for s in ordered if s.rounds_answered),  # sites that took part
        "num_hospitals_planned": strategy.planned_sites or cfg.federation.num_hospitals,
        "num_synthetic": strategy.final.num_synthetic,
        "accuracy_real_test": strategy.final.accuracy_real_test,
        "accuracy_federated": strategy.federated_accuracy,
        # The final dataset against the central real test split (coautogen_fl/quality.py);
        # None when the run stopped before it had one.
        "quality": strategy.final.quality,
        "task_type": cfg.feedback.task_type,
        "training": strategy.training.summary() if strategy.training is not None else None,  # -tt real/mix
        "dropped_replies": strategy.dropped,
        "wall_time_s": wall_time_s,
        "run_dir": str(run_dir),
    }


def write_run_report(run_dir: Path) -> None:
    """``report.html`` from the run directory's files (coautogen_fl/report.py). It is a view of
    what is already written, so a problem with it is logged and never fails the run."""
    try:
        log(INFO, "run report written to %s", write_report(run_dir))
    except Exception as exc:
        log(WARNING, "the run report could not be written: %s: %s", type(exc).__name__, exc)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the Gen or Feedback framework configured by the run config."""
    started = time.time()
    cfg = config_from_run_config(context.run_config)
    run_dir = resolve_run_dir(cfg, context.run_id)
    if cfg.tracking.resume:
        strategy = resume_strategy(cfg, run_dir)
        num_rounds = rounds_left(strategy)
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg.tracking.run_dir = str(run_dir)  # pinned, so that the saved config can resume this run
        save_config(cfg, run_dir / "config.yaml")
        strategy = build_strategy(cfg, run_dir)
        strategy.run_key, num_rounds = str(context.run_id), strategy.total_rounds
    log(INFO, "coautogen-fl run directory: %s", run_dir)
    failure = None
    try:
        strategy.start(grid=grid, initial_arrays=ArrayRecord(), num_rounds=num_rounds, timeout=cfg.federation.timeout_s)
    except RoundFailed as exc:
        failure = str(exc)
        log(ERROR, "coautogen-fl run stopped: %s", failure)
    except BaseException:
        write_run_report(run_dir)  # a crash: the report shows what the run left, without a summary
        raise
    summary = run_summary(cfg, strategy, run_dir, time.time() - started, failure)
    if save_prompt_pool(strategy.evolution.generator, str(run_dir)):
        log(INFO, "prompt pool written to %s", run_dir / "prompts.json")
    strategy.final.tracker.write_summary(summary)
    strategy.final.tracker.finish()
    for line in site_lines(summary):
        log(INFO, line)
    log(
        INFO,
        "accuracy_real_test %s, accuracy_federated %s",
        summary["accuracy_real_test"],
        summary["accuracy_federated"],
    )
    log(INFO, "summary written to %s", run_dir / "summary.json")
    write_run_report(run_dir)
    if failure:
        # Flower marks the run failed; `coautogen run` prints the reason and exits non-zero.
        raise RoundFailed(failure)
