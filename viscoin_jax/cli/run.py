"""`viscoin-jax run`: the whole pipeline from one config, stage by stage, resumable.

    viscoin-jax run --config demo --workdir runs/demo      # or --config configs/demo.py, a path

Stages (each a sub-config of `config.stages`, trained by the trainer its `trainer` field names, in
`WORKDIR/<stage>`): classifier (ResNet), iresnet, autoencoder, stylegan2, viscoin, then `explain` on
held-out images, written to `WORKDIR/report/` (with one table of every counterfactual method in
`report/index.html` and `summary.json`). A stage whose run has reached its last step and finished its
evaluation (`WORKDIR/<stage>/DONE`) is skipped, so an interrupted pipeline picks up where it
stopped (an unfinished stage resumes from its own latest checkpoint). A stage stopped by SIGTERM or
a preemption notice saves its checkpoint, gets no DONE, and the pipeline exits with status 75
(`training.loop.EXIT_PREEMPTED`) without starting the next stage. Later stages read earlier
ones through `*_workdir` fields filled in here (`viscoin.classifier_workdir`, ...).

Any key of the config can be overridden on the command line, as in `viscoin-jax train`:
`--config.KEY=VALUE`, where KEY is a dotted path into the pipeline's config, e.g.

    viscoin-jax run --config demo --workdir runs/demo --config.stages.viscoin.train.num_steps=600 \\
        --config.stages.stylegan2.fid.num_samples=0 --config.explain.enabled=False

The log names each stage as `stage k/N` and estimates the time the run has left from the steps
still to train and the seconds per step measured so far (from the end of the first stage on);
`--log-level DEBUG` adds each stage's hyper-parameters (also in `WORKDIR/<stage>/config.txt`) and
Orbax's file operations.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from ..training.config import CONFIG_JSON, load_config, parse_override_args, record_config
from ..training.distributed import ProcessZeroFailed, maybe_initialize_distributed, on_process_zero, process_zero
from ..phases import format_seconds
from ..training.monitor import RunProgress, run_progress
from ..training.registry import trainer_module
from .explain import _variant, explain
from .log_setup import LEVELS, setup_logging
from .train import config_help, report_user_error, user_errors

# The trainers, the training loop and the reports (Flax, Orbax) are imported when a stage runs, not
# when the command line is parsed: `viscoin-jax --help` and the other commands start fast, and no
# library installs its log handler before `main` sets up logging.

log = logging.getLogger("viscoin_jax.run")

DONE = "DONE"
# stage field -> stage whose workdir it receives
LINKS = {"classifier_workdir": "classifier", "generator_workdir": "stylegan2"}


def stage_done(workdir: Path) -> bool:
    return (workdir / DONE).is_file()


def run_stage(name: str, config: Any, workdir: Path) -> dict:
    t0 = time.perf_counter()
    out = trainer_module(config.trainer).train(config, str(workdir))
    result = out[0] if isinstance(out, tuple) and out else out
    if getattr(result, "preempted", False):  # a trainer that returned instead of raising
        result.raise_if_preempted()
    metrics = out[1] if isinstance(out, tuple) and len(out) > 1 and isinstance(out[1], dict) else {}
    summary = {"stage": name, "seconds": round(time.perf_counter() - t0, 1), "metrics": metrics}
    if process_zero():
        (workdir / DONE).write_text(json.dumps(summary, indent=1, default=float))
    return summary


# The demo's headline numbers (issue 14's table): name -> (explained stage, key in its metrics.json)
HEADLINE = {
    "G_ema samples whose blob colour is between the two stains": (
        "viscoin", "G samples whose blob colour is in between the stains"),
    "G_ema samples f assigns to the rarer class": ("viscoin", "G samples f assigns to the rarer class"),
    "VisCoIN FF median, tau 0.1": ("viscoin", "FF median (tau 0.1)"),
    "VisCoIN FF median, tau 0.2": ("viscoin", "FF median (tau 0.2)"),
    "VisCoIN FF median, tau 0.4": ("viscoin", "FF median (tau 0.4)"),
    "top concept removed: only causal factors change": ("viscoin", "top concepts changing only causal factors"),
    "latent-direction counterfactual validity": ("viscoin", "latent counterfactual validity"),
    "latent-direction counterfactuals: only causal factors change": (
        "viscoin", "latent counterfactuals changing only causal factors"),
    "i-ResNet counterfactuals changing a causal factor": (
        "iresnet", "i-ResNet counterfactuals changing a causal factor"),
    "i-ResNet counterfactual validity after re-encoding": ("iresnet", "i-ResNet counterfactual validity"),
    "autoencoder counterfactual validity": ("classifier", "autoencoder counterfactual validity"),
    "autoencoder counterfactuals: only causal factors change": (
        "classifier", "autoencoder counterfactuals changing only causal factors"),
    "best attribution deletion AUC": ("classifier", "best attribution deletion AUC"),
    "random attribution deletion AUC": ("classifier", "random attribution deletion AUC"),
}


def headline(explained: dict) -> dict:
    """HEADLINE's numbers from the explanations' metrics (None where a stage or method did not run)."""
    return {name: explained.get(stage, {}).get("metrics", {}).get(key) for name, (stage, key) in HEADLINE.items()}


def check_stages(config: Any) -> None:
    """Checks what a late stage needs that an early one cannot give (the VisCoIN stage's LPIPS
    weights, or the explicit permission to use the labelled fallback; the explanations' settings),
    before any training."""
    from ..trainers.viscoin import check_perceptual

    if config.explain.enabled:
        try:
            explanation_settings(config)
        except ValueError as e:
            raise ValueError(f"config.explain: {e}") from None
        check_explained_classes(config)
    for name in config.stage_order:
        stage = config.stages.get(name)
        if stage is not None and stage.get("trainer") == "viscoin":
            try:
                check_perceptual(stage)
            except (ValueError, FileNotFoundError) as e:
                raise type(e)(f"stage {name!r}: {e}".replace("config.loss.", f"config.stages.{name}.loss.")) from None


def check_explained_classes(config: Any) -> None:
    """Synthetic images to explain must hold no class the stages' models lack (explain refuses them too,
    but only after every stage has trained)."""
    images = str(config.explain.get("images", ""))
    variant = _variant(images)
    if variant is None:
        return  # a folder, an npz or the run's data set: its labels are checked when explain loads them
    from ..data.synthetic import get_variant

    try:
        classes = get_variant(variant).num_classes
    except ValueError as e:
        raise ValueError(f"config.explain.images: {e}") from None
    for name in config.stage_order:
        model = config.stages[name].get("model") if name in config.stages else None
        if model is not None and model.get("num_classes") is not None and classes > int(model.num_classes):
            raise ValueError(f"config.explain.images {images!r} holds {classes} classes, but stage {name!r} has "
                             f"{int(model.num_classes)} (config.stages.{name}.model.num_classes)")


def stage_steps(config: Any) -> list[tuple[str, int]]:
    """(name, config.train.num_steps) of each stage in `config.stage_order`."""
    out = []
    for name in config.stage_order:
        if name not in config.stages:
            raise ValueError(f"config.stage_order names {name!r}, which is not in config.stages")
        out.append((name, int(config.stages[name].train.num_steps)))
    return out


def run_pipeline(config: Any, workdir: str | Path) -> dict:
    """Runs every stage of `config.stages` in order, then the explanations; returns a summary.

    Under several processes every process trains the stages; process 0 alone explains (the others
    wait for it) and writes the pipeline's files (config, DONE markers, summary, report)."""
    workdir = Path(workdir)
    check_stages(config)  # a config that cannot finish fails before the first stage trains
    workdir.mkdir(parents=True, exist_ok=True)
    # a rerun with another config keeps the first config.json (finished stages were trained with it)
    if process_zero():
        record_config(config, workdir, resuming=(workdir / CONFIG_JSON).is_file())
    summary = {}
    order = list(config.stage_order)
    progress = RunProgress(stage_steps(config), later=["explain"] if config.explain.enabled else [])
    with run_progress(progress):
        _run_stages(config, workdir, order, progress, summary)
        if config.explain.enabled:
            progress.begin(len(order))
            log.info("%s: explanations of %s", progress.label(),
                     ", ".join(s for s in ("classifier", "iresnet", "viscoin") if s in order))
            summary.update(on_process_zero(lambda: explanation_summary(config, workdir), "the explanations",
                                           user_errors=user_errors()) or {})
            log.info("%s: done in %s", progress.label(), format_seconds(progress.end()))
    if not process_zero():
        return summary
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    if summary.get("explain"):  # again, now with what `results` reads from the finished run
        from .results import collect, readings

        write_index(workdir / "report", summary["explain"], notes=readings(collect(workdir)),
                    comparison=summary.get("counterfactual_comparison"))
    log.info("pipeline finished: %s", workdir / "summary.json")
    return summary


def explanation_summary(config: Any, workdir: Path) -> dict:
    """The pipeline's explanation stage: {"explain", "headline"[, "counterfactual_comparison"]}."""
    out = {"explain": run_explanations(config, workdir)}
    out["headline"] = headline(out["explain"])
    comparison = compare_counterfactuals(workdir / "report", out["explain"], config.explain.images)
    if comparison:
        out["counterfactual_comparison"] = comparison
    return out


def _run_stages(config: Any, workdir: Path, order: list, progress: Any, summary: dict) -> None:
    for index, name in enumerate(order):
        stage_cfg = config.stages[name]
        stage_dir = workdir / name
        with stage_cfg.unlocked():
            for field, source in LINKS.items():
                if field in stage_cfg and not stage_cfg[field]:
                    if source not in order:
                        raise ValueError(f"stage {name!r} needs stage {source!r} ({field})")
                    stage_cfg[field] = str(workdir / source)
        if stage_done(stage_dir):
            log.info("%s: complete, skipped (%s)", progress.label(index), stage_dir / DONE)
            summary[name] = json.loads((stage_dir / DONE).read_text())
            continue
        log.info("%s: training %d steps in %s; %s", progress.label(index), progress.stages[index][1],
                 stage_dir, progress.eta_text(before=index))
        progress.begin(index)
        summary[name] = run_stage(name, stage_cfg, stage_dir)
        seconds = progress.end()
        log.info("%s: done in %s; %s", progress.label(index), format_seconds(seconds),
                 progress.eta_text(before=index + 1))


def explanation_settings(config: Any):
    """(LatentSettings, ConceptSettings) of `config.explain`; a bad value raises ValueError."""
    from ..explain.latent_report import LatentSettings
    from ..explain.viscoin_report import ConceptSettings

    e = config.explain
    latent = LatentSettings(projection_steps=int(e.projection_steps), direction_samples=int(e.direction_samples),
                            confidence=float(e.get("latent_confidence", LatentSettings.confidence)))
    return latent, ConceptSettings(num_training_images=int(e.num_training_images))


def run_explanations(config: Any, workdir: Path) -> dict:
    """`explain` on each trained stage's checkpoint (report/<stage>/), and report/index.html linking them."""
    e = config.explain
    latent, concepts = explanation_settings(config)
    # the autoencoder stage, where the pipeline trains one, gives every explained f its counterfactuals
    autoencoder = str(workdir / "autoencoder") if "autoencoder" in config.stage_order else None
    out = {}
    for stage, methods in (("classifier", list(e.classifier_methods)), ("iresnet", list(e.iresnet_methods)),
                           ("viscoin", list(e.viscoin_methods))):
        if stage not in config.stage_order or not methods:
            continue
        if autoencoder is None and "autoencoder_counterfactual" in methods:
            methods.remove("autoencoder_counterfactual")
        stage_out = workdir / "report" / stage
        path = explain(str(workdir / stage), e.images, methods, str(stage_out), count=int(e.count),
                       latent_settings=latent, concept_settings=concepts, autoencoder=autoencoder)
        out[stage] = {"report": str(path), "metrics": json.loads((stage_out / "metrics.json").read_text())}
    if out:
        write_index(workdir / "report", out, comparison=compare_counterfactuals(workdir / "report", out, e.images))
    return out


def compare_counterfactuals(report_dir: Path, reports: dict, images: str) -> dict | None:
    """{"header", "rows"}: every counterfactual method the stages' reports saved, on the same held-out
    images (explain.counterfactual_comparison), or None when no report holds one."""
    from ..explain.counterfactual_comparison import comparison_rows, counterfactual_sets

    sets = counterfactual_sets([report_dir / stage for stage in reports])
    if not sets:
        return None
    header, rows = comparison_rows(sets, _variant(images))
    return {"header": header, "rows": rows}


def write_index(report_dir: Path, reports: dict, notes=(), comparison: dict | None = None) -> Path:
    """report/index.html: a summary (each stage's headline numbers with their direction and meaning,
    `notes` such as the Reading paragraphs of `viscoin-jax results`, thumbnails of each stage's key
    figures, a link to its report), the table of every counterfactual method (`compare_counterfactuals`),
    then every stage's full metrics."""
    import numpy as np
    from PIL import Image

    from ..explain.headline import describe, headline_rows
    from ..explain.report import Report

    index = Report("viscoin-jax pipeline: explanations")
    rows, links, thumbs = [], [], []
    for name, (stage, key) in HEADLINE.items():
        value = reports.get(stage, {}).get("metrics", {}).get(key)
        if isinstance(value, (int, float)) and value == value:
            direction, meaning = describe(key) or ("", "")
            rows.append({"name": name, "value": value, "direction": direction, "meaning": meaning})
    for stage, item in reports.items():
        rel = Path(item["report"]).relative_to(report_dir).as_posix()
        links.append((f"{stage} report", rel))
        known = {r["name"] for r in rows}
        rows += [dict(r, name=f"{stage}: {r['name']}") for r in headline_rows(item["metrics"], max_rows=4)
                 if f"{stage}: {r['name']}" not in known]
        for png in sorted((Path(item["report"]).parent / "key_images").glob("*.png")):
            thumbs.append((f"{stage}: {png.stem.replace('_', ' ')}", np.asarray(Image.open(png).convert("RGB")), rel))
    index.set_summary(f"Explanations of the pipeline's trained stages ({', '.join(reports)}); each report opens "
                      "offline from this folder. The numbers below lead each report; the full tables follow.",
                      rows, notes=list(notes), links=links, thumbnails=thumbs)
    if comparison:
        index.add_table(comparison["rows"], comparison["header"],
                        title="Every counterfactual method on the same held-out images (validity as judged by the "
                              "classifier each method explains)")
    for stage, item in reports.items():
        index.add_metrics(item["metrics"], title=f"{stage}: all metrics")
    return index.write(report_dir, name="index.html")


def main(args: argparse.Namespace) -> int:
    setup_logging(getattr(args, "log_level", "INFO"))
    overrides = list(getattr(args, "unknown", []) or [])
    try:
        parse_override_args(overrides)
        config = load_config(args.config, overrides)
        check_stages(config)
    except (ValueError, FileNotFoundError) as e:
        print(f"viscoin-jax run: error: {e}", file=sys.stderr)
        return 2
    from ..training.loop import Preempted
    maybe_initialize_distributed()
    try:
        run_pipeline(config, args.workdir)
    except Preempted as e:  # the stage's checkpoint is saved and it has no DONE: a rerun resumes it
        print(f"viscoin-jax run: {e}", file=sys.stderr)
        return e.exit_code
    except user_errors() as e:  # config, data, paths: one line, exit status 2
        return report_user_error("viscoin-jax run", e)
    except ProcessZeroFailed as e:  # another process: the explanations failed on process 0
        print(f"viscoin-jax run: error: {e}", file=sys.stderr)
        return 2 if e.user_error else 1
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("run", help="run the whole pipeline (classifiers, StyleGAN2, VisCoIN, "
                              "explanations) from one config", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, metavar="NAME|FILE.py[:VARIANT]", help=config_help())
    p.add_argument("--workdir", required=True, help="one folder per stage, report/ and summary.json go here")
    p.add_argument("--log-level", default="INFO", choices=LEVELS,
                   help="DEBUG adds each stage's hyper-parameters and Orbax's file operations")
    # `--config.KEY=VALUE` overrides arrive as unknown arguments (see viscoin_jax.cli); the usage
    # line names them, since argparse lists only the options it knows
    p.usage = ("%(prog)s --config NAME|FILE.py[:VARIANT] --workdir WORKDIR [--log-level LEVEL]\n"
               "       [--compilation-cache DIR | --no-compilation-cache] [--config.KEY=VALUE ...]")
    p.set_defaults(func=main, allow_unknown=True)
