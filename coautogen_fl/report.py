"""The run report: ``report.html`` in a run directory, one self-contained file that opens offline.

Built from the run directory's files only (summary.json, metrics.jsonl, rounds/, synthetic/,
sites/*/privacy_ledger.json, flower.log), so ``coautogen report RUN_DIR`` can rebuild it any time.
Every picture is a ``data:`` URI; there is no script and no external reference. Each section has a
stable id (:data:`SECTIONS`). A missing or unreadable file leaves its section saying so: the report
of a failed, crashed or Gen run shows what exists, and :func:`write_report` never raises on it.

Size bounds, so that large runs keep a small file (about 1 MB for the embedded default): image
grids show at most :data:`MAX_ROUNDS_SHOWN` voted pools (first, last, evenly spaced between) and
the final dataset, at most :data:`MAX_CLASSES_SHOWN` classes and :data:`IMAGES_PER_CLASS` images
per class each, as thumbnails of at most ``report_figures.THUMB_PX`` pixels on a side. Vote
histograms are drawn for the same rounds.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import report_figures as fig
from .atomic import write_text_atomic
from .report_files import _class_names, _read_json, _read_jsonl, _round_folders
from .report_html import STYLE, _e, _img, _note, _num, _table

REPORT_FILE = "report.html"
#: Section id -> heading, in page order. The ids are stable: tests and links rely on them.
SECTIONS = {
    "overview": "Run overview",
    "grids": "Voted pools per class and round",
    "final": "Final synthetic dataset",
    "votes": "Vote histograms per round",
    "curves": "Accuracy and privacy spend",
    "ledger": "Per-site privacy ledger",
    "quality": "Synthetic data quality",
}
IMAGES_PER_CLASS = 12
MAX_ROUNDS_SHOWN = 8
MAX_CLASSES_SHOWN = 20
REAL_ONLY = (
    "Task type real: the model is trained on the sites' private data by DP-SGD alone; there is no synthetic data."
)
#: Lines of flower.log shown when a run left no summary.json (it crashed or was killed).
LOG_TAIL_LINES = 30


# ---------------------------------------------------------------------------- sections
def _overview(run_dir: Path, summary: dict | None) -> str:
    if summary is None:
        tail = ""
        try:
            lines = (run_dir / "flower.log").read_text(encoding="utf-8", errors="replace").splitlines()
            clean = [re.sub(r"\x1b\[[0-9;]*m", "", line) for line in lines[-LOG_TAIL_LINES:]]
            tail = f"<h3>Last lines of flower.log</h3><pre>{_e(chr(10).join(clean))}</pre>"
        except OSError:
            pass
        return (
            '<p><span class="status unknown">no summary</span></p>'
            + _note(
                "This run wrote no summary.json: it crashed, was killed, or is still running. "
                "The sections below show the files it left."
            )
            + tail
        )
    status = str(summary.get("status", "unknown"))
    parts = [
        f'<p><span class="status {_e(status if status in ("completed", "failed") else "unknown")}">'
        f"{_e(status)}</span></p>"
    ]
    if summary.get("reason"):
        parts.append(f'<p class="reason" id="failure-reason"><b>Why the run stopped:</b> {_e(summary["reason"])}</p>')
    keys = [
        ("framework", "framework"),
        ("task_type", "task type"),
        ("rater", "rater"),
        ("generator", "generator"),
        ("embedder", "embedder"),
        ("epsilon", "epsilon (budget per site)"),
        ("delta", "delta"),
        ("privacy_mode", "privacy mode"),
        ("privacy_unit", "privacy unit"),
        ("noise_multiplier", "noise multiplier"),
        ("rounds", "voting rounds"),
        ("num_hospitals", "sites that took part"),
        ("num_hospitals_planned", "sites planned"),
        ("num_synthetic", "synthetic images"),
        ("accuracy_real_test", "accuracy, central real test split"),
        ("accuracy_federated", "accuracy, federated (sites' test splits)"),
        ("epsilon_spent_max", "epsilon spent (max)"),
        ("wall_time_s", "wall time (s)"),
    ]
    rows = [
        [f"<th>{_e(label)}</th>", f'<td class="num">{_num(summary.get(key))}</td>']
        for key, label in keys
        if key in summary
    ]
    dropped = summary.get("dropped_replies") or []
    rows.append(["<th>dropped or refused replies</th>", f'<td class="num">{len(dropped)}</td>'])
    parts.append("<table><tbody>" + "".join(f"<tr>{''.join(r)}</tr>" for r in rows) + "</tbody></table>")
    return "".join(parts)


def _pool_grid(folder: Path, entries: list[dict], element_id: str, by_votes: bool) -> str:
    """One row per class: a strip of at most IMAGES_PER_CLASS images. Voted pools are ordered by
    votes (best left) and sampled evenly across that order, so the strip spans best to worst."""
    names = _class_names(entries)
    rows, attrs = [], []
    for label, name in list(names.items())[:MAX_CLASSES_SHOWN]:
        members = [e for e in entries if e.get("label") == label]
        if by_votes:
            members.sort(key=lambda e: -(e.get("votes") or 0.0))
        shown = [members[i] for i in fig.evenly_spaced(len(members), IMAGES_PER_CLASS)]
        strip = fig.image_strip([folder / str(e.get("file", "")) for e in shown])
        cell = _img(strip[0], f"class {name}", css="strip") if strip else "<i>no readable image</i>"
        row = [f"<th>{_e(name)}</th>", f'<td class="num">{len(members)}</td>']
        if by_votes:
            votes = [e["votes"] for e in members if isinstance(e.get("votes"), (int, float))]
            row.append(f"<td>{_e(f'{max(votes):.3g} to {min(votes):.3g}' if votes else '–')}</td>")
        rows.append([*row, f"<td>{cell}</td>"])
        attrs.append(f' data-class="{_e(name)}"')
    header = ["class", "images"] + (["votes (best to worst)"] if by_votes else []) + ["sample"]
    more = (
        _note(f"The first {MAX_CLASSES_SHOWN} of {len(names)} classes are shown.")
        if len(names) > MAX_CLASSES_SHOWN
        else ""
    )
    return f'<div id="{_e(element_id)}">{_table(header, rows, attrs)}{more}</div>'


def _grids(run_dir: Path, summary: dict | None) -> str:
    folders = _round_folders(run_dir)
    if not folders:
        if (summary or {}).get("task_type") == "real":
            return _note(REAL_ONLY)
        if summary and summary.get("framework") not in (None, "Feedback", "Filter"):
            return _note(
                f"The {summary['framework']} framework draws the final dataset without voting rounds: no voted pools."
            )
        return _note("No voted pool is stored (rounds/ is empty or missing): the run finished no voting round.")
    rounds = list(folders)
    shown = [rounds[i] for i in fig.evenly_spaced(len(rounds), MAX_ROUNDS_SHOWN)]
    parts = [
        f'<p class="muted">Each row: up to {IMAGES_PER_CLASS} candidates of a class, ordered by their summed noised '
        "votes (best left), sampled evenly from best to worst.</p>"
    ]
    if len(shown) < len(rounds):
        parts.append(_note(f"Rounds {', '.join(map(str, shown))} of {len(rounds)} are shown."))
    for r in shown:
        parts.append(
            f"<h3>Round {r}</h3>"
            + _pool_grid(folders[r], _read_jsonl(folders[r] / "index.jsonl"), f"pool-round-{r:03d}", True)
        )
    return "".join(parts)


def _final(run_dir: Path, summary: dict | None) -> str:
    entries = _read_jsonl(run_dir / "synthetic" / "index.jsonl")
    if not entries and (summary or {}).get("task_type") == "real":
        return _note(REAL_ONLY)
    if not entries:
        why = ": the run stopped before it was drawn" if (summary or {}).get("status") != "completed" else ""
        return _note(f"No final dataset is stored (synthetic/ is empty or missing){why}.")
    note = (
        f'<p class="muted">{len(entries)} images in synthetic/; '
        f"up to {IMAGES_PER_CLASS} per class shown, spread over the class.</p>"
    )
    return note + _pool_grid(run_dir / "synthetic", entries, "final-grid", False)


def _votes(run_dir: Path, metrics: dict[int, dict]) -> str:
    folders = _round_folders(run_dir)
    if not folders:
        return _note("No voting round was stored, so there are no votes to show.")
    rounds = list(folders)
    images = []
    for r in (rounds[i] for i in fig.evenly_spaced(len(rounds), MAX_ROUNDS_SHOWN)):
        votes = [
            e["votes"] for e in _read_jsonl(folders[r] / "index.jsonl") if isinstance(e.get("votes"), (int, float))
        ]
        if votes:
            std = metrics.get(r, {}).get("aggregate_noise_std")
            uri = fig.vote_histogram(
                votes, std if isinstance(std, (int, float)) else None, f"round {r}: {len(votes)} candidates"
            )
            images.append(_img(uri, f"vote histogram of round {r}", f"votes-round-{r:03d}"))
    return (
        '<p class="muted">The sum over sites of each candidate\'s noised votes. Between the dashed lines the noise '
        "dominates a single candidate's votes; "
        "the distribution refit sums over the whole pool, which averages it away.</p>"
        f'<div class="figs">{"".join(images)}</div>'
    )


#: Per-round table columns: (label, keys tried in order). Vote rounds and the DP-SGD rounds of
#: ``-tt real`` / ``-tt mix`` name the same things differently.
ROUND_COLUMNS = [
    ("phase", ("phase",)),
    ("valid replies", ("votes_received", "updates_received")),
    ("dropped", ("dropped",)),
    ("noise", ("aggregate_noise_std", "dp_noise_multiplier")),
    ("kept", ("kept",)),
    ("accuracy, central test", ("accuracy_real_test",)),
    ("epsilon spent (max)", ("epsilon_spent_max",)),
    ("time (s)", ("round_time_s",)),
]


def _first(record: dict, keys: tuple[str, ...]) -> Any:
    return next((record[k] for k in keys if record.get(k) is not None), None)


def _curves(summary: dict | None, metrics: dict[int, dict]) -> str:
    figures, parts = [], []
    sites = (summary or {}).get("sites") or {}
    names = list(sites) or sorted({n for m in metrics.values() for n in (m.get("epsilon_spent") or {})}, key=str)
    steps = [str(r) for r in metrics] + (["end"] if sites else [])
    spends = {
        n: [(m.get("epsilon_spent") or {}).get(n) for m in metrics.values()]
        + ([sites[n].get("epsilon_spent")] if sites else [])
        for n in names
    }
    dpsgd = [i for i, m in enumerate(metrics.values()) if m.get("phase") == "dpsgd"]
    if names and steps:
        budget = (summary or {}).get("epsilon")
        mixed = dpsgd[0] if dpsgd and dpsgd[0] > 0 else None  # -tt mix: votes first, then DP-SGD
        uri = fig.spend_curve(spends, steps, budget if isinstance(budget, (int, float)) else None, mixed)
        figures.append(_img(uri, "epsilon spent per site", "spend-curve"))
    else:
        parts.append(_note("No site reported a spend (no metrics.jsonl and no sites in summary.json)."))
    per_round = {
        r: m["accuracy_real_test"] for r, m in metrics.items() if isinstance(m.get("accuracy_real_test"), (int, float))
    }
    if per_round:  # the DP-SGD rounds of -tt real / mix evaluate the global model every round
        figures.append(
            _img(fig.accuracy_curve(list(per_round), list(per_round.values())), "accuracy per round", "accuracy-curve")
        )
    labels = {"accuracy_real_test": "central real test split", "accuracy_federated": "federated (sites' test splits)"}
    accuracies = {label: (summary or {}).get(k) for k, label in labels.items()}
    accuracies = {k: v for k, v in accuracies.items() if isinstance(v, (int, float))}
    if accuracies:
        figures.append(_img(fig.accuracy_bars(accuracies), "final accuracies", "accuracy-bars"))
    else:
        parts.append(
            _note("No accuracy was measured: the run stopped before the downstream model was trained and evaluated.")
        )
    if metrics:
        columns = [
            (label, keys) for label, keys in ROUND_COLUMNS if any(_first(m, keys) is not None for m in metrics.values())
        ]
        rows = [
            [f'<td class="num">{r}</td>'] + [f'<td class="num">{_num(_first(m, keys))}</td>' for _, keys in columns]
            for r, m in metrics.items()
        ]
        parts.append("<h3>Per round</h3>" + _table(["round"] + [label for label, _ in columns], rows))
    return f'<div class="figs">{"".join(figures)}</div>' + "".join(parts)


def _ledger_file(run_dir: Path, site: dict) -> dict | None:
    """A simulated site's own ledger (sites/site-<partition>/privacy_ledger.json), if here."""
    pid = site.get("partition_id")
    return _read_json(run_dir / "sites" / f"site-{pid}" / "privacy_ledger.json") if isinstance(pid, int) else None


def _ledger(run_dir: Path, summary: dict | None) -> str:
    sites = (summary or {}).get("sites") or {}
    if not sites:
        return _note("summary.json names no site (it is missing, or no site was asked).")
    rows, attrs = [], []
    for name, s in sites.items():
        own = _ledger_file(run_dir, s) or {}
        delta = own.get("delta", (summary or {}).get("delta"))
        entries = own.get("entries")
        budget = "an unreported budget" if s.get("epsilon_budget") is None else _num(s.get("epsilon_budget"))
        issues = [f"refused: {x}" for x in s.get("refusals") or []] + [f"failed: {x}" for x in s.get("failures") or []]
        rows.append(
            [
                f"<td>{_e(name)}</td>",
                f"<td>{_e(s.get('status', '?'))}</td>",
                f'<td class="num">{_num(s.get("epsilon_spent"))} of {budget}</td>',
                f'<td class="num">{_num(delta)}</td>',
                f'<td class="num">{_num(s.get("rounds_answered"))}</td>',
                f'<td class="num">{len(entries) if isinstance(entries, list) else "–"}</td>',
                f"<td>{'<br>'.join(_e(x) for x in issues) or '–'}</td>",
            ]
        )
        attrs.append(f' class="site-row" data-site="{_e(name)}"')
    header = [
        "site",
        "status",
        "epsilon spent of budget",
        "delta",
        "rounds answered",
        "ledger releases",
        "refusals / failures",
    ]
    return (
        '<p class="muted">As the sites reported them; "ledger releases" counts the entries of a simulated site\'s own '
        "ledger file (sites/site-N/privacy_ledger.json), where this run directory holds it.</p>"
        + _table(header, rows, attrs)
    )


def _quality(summary: dict | None) -> str:
    quality = (summary or {}).get("quality")
    if summary is None:
        return _note("Not measured: there is no summary.json.")
    if not isinstance(quality, dict):
        if summary.get("task_type") == "real":
            return _note(REAL_ONLY)
        if summary.get("status") == "completed":
            return _note(
                "Not measured: summary.json has no quality entry (a run without a synthetic dataset, "
                "or one from before the measure)."
            )
        return _note("Not measured: the run stopped before the final dataset was drawn.")
    if not quality.get("available"):
        return _note(f"Not measured: {quality.get('reason', 'no reason recorded')}.")
    k = quality.get("k")
    cols = ("frechet_distance", "precision", "recall", "num_real", "num_synthetic")
    header = ["", "Fréchet distance", "precision", "recall", "real images", "synthetic images"]
    rows = [
        [f"<th>{_e(n)}</th>"] + [f'<td class="num">{_num(m.get(c))}</td>' for c in cols]
        for n, m in [("all classes", quality.get("overall") or {}), *(quality.get("per_class") or {}).items()]
    ]
    return (
        f'<p class="muted">The final dataset against the central real test split, in the run\'s embedder space '
        f"({_e((summary or {}).get('embedder', '?'))}). Fréchet distance: between Gaussians fitted to the two sets "
        "(the distance behind FID; 0 is identical, comparable only between runs with the same embedder). Precision: "
        "the share of synthetic images inside the real data's k-NN manifold (realism); recall: the share of real "
        f"images inside the synthetic data's (coverage); k = {_e(k)} (Kynkäänniemi et al. 2019). At most "
        f"{_e(quality.get('max_per_class'))} images per class and set are measured.</p>"
        + f'<div id="quality-table">{_table(header, rows)}</div>'
    )


# ---------------------------------------------------------------------------- the page
def _section(section_id: str, body: Callable[[], str]) -> str:
    """A section; one whose files are corrupt says so instead of failing the whole report."""
    try:
        content = body()
    except Exception as exc:  # the report is a view: a bad file must not cost the other sections
        content = _note(f"This section could not be built: {type(exc).__name__}: {exc}")
    return f'<section id="{section_id}"><h2>{_e(SECTIONS[section_id])}</h2>{content}</section>'


def build_report(run_dir: str | Path) -> str:
    """The report's HTML for the run in ``run_dir`` (see the module docstring)."""
    run_dir = Path(run_dir)
    summary = _read_json(run_dir / "summary.json")
    summary = summary if isinstance(summary, dict) else None
    metrics = {int(m["round"]): m for m in _read_jsonl(run_dir / "metrics.jsonl") if isinstance(m.get("round"), int)}
    builders: dict[str, Callable[[], str]] = {
        "overview": lambda: _overview(run_dir, summary),
        "grids": lambda: _grids(run_dir, summary),
        "final": lambda: _final(run_dir, summary),
        "votes": lambda: _votes(run_dir, metrics),
        "curves": lambda: _curves(summary, metrics),
        "ledger": lambda: _ledger(run_dir, summary),
        "quality": lambda: _quality(summary),
    }
    nav = "".join(f'<a href="#{sid}">{_e(title)}</a>' for sid, title in SECTIONS.items())
    sections = "".join(_section(sid, builders[sid]) for sid in SECTIONS)
    title = f"coautogen-fl run report: {run_dir.name}"
    generated = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
        f"<style>{STYLE}</style></head><body><h1>{_e(title)}</h1>"
        f'<p class="muted">{_e(run_dir)} · built {_e(generated)} by <code>coautogen report</code> '
        "from the files of the run directory</p>"
        f"<nav>{nav}</nav>{sections}</body></html>\n"
    )


def write_report(run_dir: str | Path) -> Path:
    """Build ``run_dir/report.html`` (atomically) from the run directory's files; returns its path.

    Parameters
    ----------
    run_dir : str or Path
        A run directory of ``coautogen run`` or ``flwr run``; it must exist. Missing optional
        files (every one of them) leave their sections saying what is missing.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run directory at {run_dir}")
    return write_text_atomic(run_dir / REPORT_FILE, build_report(run_dir))
