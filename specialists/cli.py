"""The ``specialists`` command line: it parses arguments and wires the steps; nothing imports it.

(Over 400 lines on purpose: each subcommand's flags stand beside its handler, one section per
command, so that the whole interface reads in one file.)

Every subcommand turns a :class:`SpecialistsError` (bad input a user can fix) into one line on
stderr and exit status 2; an unexpected error prints one line too, with the full traceback only
under ``--debug``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ._version import __version__
from .errors import SpecialistsError
from .run import RunDir

# The steps' modules are imported by the subcommand that needs them, so that `--help` and a
# mistyped command answer without loading torch and timm.

log = logging.getLogger("specialists")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars, warnings only")


# Commands that write a run hold its lock from start to end (specialists/lock.py); `predict` holds
# it while it loads. The run is `RUN`, else `--out`; the ones that may start a new run say so.
LOCKED = {
    "generalist": "create",
    "cluster": "",
    "train": "",
    "evaluate": "",
    "calibrate": "",
    "controls": "",
    "distill": "",
    "export": "load",
    "run": "create",
    "demo": "create",
    "predict": "load",
}


def _no_wait(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-wait",
        action="store_true",
        help="if another command is writing the run, stop with one line instead of waiting",
    )


def _run_lock(args: argparse.Namespace, root: str, **how):
    """The lock of the run ``root`` for this command: waiting says so on stderr, ``--no-wait``
    stops instead. Never a lock file in a folder that is not a run, unless the command makes one."""
    from .lock import run_lock

    if not how.get("create"):
        RunDir.of(root).require_generalist()
    return run_lock(
        root,
        f"specialists {args.command}",
        wait=not args.no_wait,
        say=lambda line: print(line, file=sys.stderr),
        **how,
    )


def _reading(args: argparse.Namespace):
    """The run lock `predict` and `export` hold while they load the models (one state of the
    run), then let go: a long prediction does not hold up a writer, and a specialist loaded later
    must be the file read now (Ensemble.load)."""
    return _run_lock(args, args.run, reader=True)


def _locked(args: argparse.Namespace):
    """The run lock the command holds from start to end (a null context where none)."""
    import contextlib

    how = LOCKED.get(args.command)
    if how is None or how == "load" or getattr(args, "print_config", False):
        return contextlib.nullcontext()
    if how == "create":
        return _run_lock(args, args.out, create=True)
    return _run_lock(args, args.run)


# ---------------------------------------------------------------------------------------------
# generalist


def _generalist_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data",
        help="data source: embedded (default), embedded:k=v,..., folder:PATH or PATH, "
        "cifar10:ROOT, cifar100:ROOT, mnist:ROOT, omniglot:DIR, fashion-mnist:DIR",
    )
    p.add_argument("--model", help="timm model name (default test_efficientnet)")
    p.add_argument("--out", required=True, help="run directory to write")
    p.add_argument(
        "--config",
        help="YAML file: any of the options below, or an experiment file (its section for this "
        "step); flags win",
    )
    p.add_argument(
        "--checkpoint",
        help="start from a local checkpoint: a .safetensors file, torch format (loaded "
        "weights-only), or a folder with model.safetensors and timm's config.json; input "
        "channels are adapted and the classifier is new when the class count differs",
    )
    p.add_argument(
        "--reset-head",
        action="store_true",
        default=None,
        help="with --checkpoint: a new classifier even when the class count is the same",
    )
    p.add_argument(
        "--normalize",
        choices=["auto", "data", "checkpoint"],
        help="mean and std: the checkpoint's config.json when it has them (auto, default), "
        "or the data's",
    )
    p.add_argument(
        "--epochs", type=int, help="maximum epochs (default 10; raise it for a converged baseline)"
    )
    p.add_argument(
        "--patience",
        type=int,
        help="early stopping: epochs without a better validation accuracy (default 4)",
    )
    p.add_argument("--batch-size", type=int, help="default 128")
    p.add_argument("--optimizer", choices=["adamw", "sgd"], help="default adamw")
    p.add_argument("--lr", type=float, help="peak learning rate (default 3e-3)")
    p.add_argument("--weight-decay", type=float, help="default 0.05")
    p.add_argument("--warmup-epochs", type=float, help="linear warm-up, then cosine (default 1)")
    p.add_argument("--label-smoothing", type=float, help="default 0")
    p.add_argument(
        "--input-size", type=int, help="model input size (default: the data's own; folders: 64)"
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        help="share of train/ carved as validation when there is no val/",
    )
    p.add_argument("--seed", type=int, help="default 0")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:1...")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], help="mixed precision on CUDA")
    p.add_argument("--threads", type=int, help="CPU threads (default: all available cores)")
    p.add_argument(
        "--force", action="store_true", help="retrain even if RUN already has a generalist"
    )


def _generalist(args: argparse.Namespace) -> int:
    from .train.generalist import train_generalist

    cfg = _step_config(args, "generalist")
    if args.print_config:
        return _print_config(cfg)
    record = train_generalist(cfg, args.out, progress=not args.quiet, force=args.force)
    m = record.metrics
    print(
        f"generalist {record.architecture}: {record.n_classes} classes, best epoch {m['best_epoch']} of {m['epochs_run']}, "
        f"val accuracy {m['val_accuracy']:.4f}, test accuracy {m['test_accuracy']:.4f}, {m['train_seconds']:.0f} s"
    )
    print(f"written to {args.out}")
    return 0


# ---------------------------------------------------------------------------------------------
# cluster


def _cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="run directory with a trained generalist")
    p.add_argument(
        "--config",
        help="YAML file: any of the options below, or an experiment file (its section for this "
        "step); flags win",
    )
    p.add_argument(
        "--matrix",
        choices=["covariance", "confusion"],
        help="covariance of the predictions (default, label-free) or the confusion matrix",
    )
    p.add_argument(
        "--method",
        choices=["kmeans", "spectral"],
        help="faiss k-means (default) or spectral clustering",
    )
    p.add_argument(
        "--mode",
        choices=["disjoint", "overlapping"],
        help="disjoint groups (default) or overlapping fixed-size groups",
    )
    p.add_argument(
        "--n-groups",
        type=int,
        help="number of groups (default: chosen from the measured confusion)",
    )
    p.add_argument("--group-size", type=int, help="overlapping mode: classes per group")
    p.add_argument(
        "--min-size",
        type=int,
        help="disjoint mode: smallest group (default: enough classes for --min-group-images)",
    )
    p.add_argument(
        "--min-group-images",
        type=int,
        help="training images a specialist needs at least (default 1000; sets the smallest group)",
    )
    p.add_argument("--max-size", type=int, help="disjoint mode: largest group")
    p.add_argument("--top-m", type=int, help="keep only the M groups holding the most confusion")
    p.add_argument("--n-init", type=int, help="k-means restarts, best objective kept (default 5)")
    p.add_argument("--seed", type=int, help="k-means seed (default 0)")
    p.add_argument(
        "--statistics",
        choices=["auto", "dense", "sparse"],
        help="auto (default): the dense K x K covariance where it fits in memory, else sparse "
        "statistics of each prediction's top --top-k classes (printed, with the reason)",
    )
    p.add_argument(
        "--top-k", type=int, help="sparse statistics: classes kept per prediction (default 10)"
    )


def _cluster(args: argparse.Namespace) -> int:
    from .grouping import cluster_run, summarize_clusters

    cfg = _step_config(args, "cluster")
    if args.print_config:
        return _print_config(cfg)
    report = cluster_run(args.run, cfg)
    print(summarize_clusters(report))
    run = RunDir.of(args.run)
    print(f"written to {run.clusters} and {run.clusters_png}")
    return 0


# ---------------------------------------------------------------------------------------------
# train (specialists)


def _launcher_args(p: argparse.ArgumentParser) -> None:
    """Options of the parallel launcher, shared by `train`, `controls` and `distill`."""
    p.add_argument(
        "--workers", type=int, help="parallel jobs (default: one per GPU, else one per CPU core)"
    )
    p.add_argument(
        "--backend",
        choices=["local", "ray"],
        default="local",
        help="local processes (default) or a Ray cluster",
    )
    p.add_argument(
        "--ray-address", help="Ray cluster address (default: start a local Ray instance)"
    )
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    p.add_argument(
        "--gpus-per-job",
        type=float,
        metavar="F",
        help="share of a GPU each job takes, so that small jobs share one (0.25: four per GPU; "
        "default: a whole GPU each where there are GPUs)",
    )


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="run directory with a generalist and clusters.json")
    _launcher_args(p)
    p.add_argument("--only", help="comma-separated specialist ids to train, e.g. 0,3,7")
    p.add_argument(
        "--config",
        help="YAML file: any of the options below, or an experiment file (its section for this "
        "step); flags win",
    )
    p.add_argument(
        "--epochs",
        type=int,
        help="epochs per specialist: one cosine schedule, the best validation epoch kept (default 12)",
    )
    p.add_argument(
        "--examples-per-epoch",
        type=int,
        help="default: the group's training examples / enrich fraction, at least 25 batches",
    )
    p.add_argument(
        "--patience",
        type=int,
        help="stop after N epochs without a better validation score (default: off)",
    )
    p.add_argument(
        "--enrich-fraction",
        type=float,
        help="share of each batch drawn from the group (default 0.5)",
    )
    p.add_argument("--batch-size", type=int, help="default 128")
    p.add_argument("--lr", type=float, help="peak learning rate (default 1e-3)")
    p.add_argument(
        "--soft-weight", type=float, help="weight of the generalist's soft targets (default 0: off)"
    )
    p.add_argument("--temperature", type=float, help="soft-target temperature (default 3)")
    p.add_argument(
        "--trainable",
        choices=["all", "last", "head"],
        help="all (default); last: only the last stage and the head",
    )
    p.add_argument(
        "--head-init",
        choices=["copy", "random"],
        help="random: a fresh head (default); copy: the generalist's rows, dustbin fitted to its outside mass",
    )
    p.add_argument(
        "--correction",
        choices=["gated", "natural", "none"],
        help="dustbin prior correction (default gated)",
    )
    p.add_argument(
        "--specialist-model",
        dest="model",
        metavar="NAME",
        help="timm architecture of the specialists (default: the generalist's; another one starts "
        "fresh or from --specialist-checkpoint)",
    )
    p.add_argument(
        "--specialist-input-size",
        dest="input_size",
        type=int,
        metavar="S",
        help="input size of the specialists, at least the generalist's (default: the generalist's); "
        "their images are made at S px from the originals",
    )
    p.add_argument(
        "--specialist-checkpoint",
        dest="checkpoint",
        metavar="PATH",
        help="local weights (safetensors or a torch state dict) to start the specialists from; "
        "their head is new",
    )
    p.add_argument("--seed", type=int, help="default 0")


def _train(args: argparse.Namespace) -> int:
    from .train.pipeline import train_specialists

    cfg = _step_config(args, "train")
    if args.print_config:
        return _print_config(cfg)
    only = None
    if args.only:
        try:
            only = [int(x) for x in args.only.split(",") if x.strip()]
        except ValueError as e:
            raise SpecialistsError(f"--only {args.only}: expected comma-separated integers") from e
    if args.workers is not None and args.workers < 1:
        raise SpecialistsError(f"--workers {args.workers}: must be >= 1")
    results = train_specialists(
        args.run,
        cfg,
        workers=args.workers,
        backend=args.backend,
        only=only,
        device=args.device,
        ray_address=args.ray_address,
        gpus_per_job=args.gpus_per_job,
        progress=not args.quiet,
    )
    ok = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    skipped = sum(r.skipped for r in ok)
    better = sum(
        r.record.metrics["in_group_acc"] > r.record.metrics["generalist_in_group_acc"] for r in ok
    )
    print(
        f"{len(ok)} of {len(results)} specialists ready ({skipped} already done); "
        f"{better} beat the generalist inside their group on validation"
    )
    for r in failed:
        print(f"  specialist {r.job.id}: FAILED: {r.error}", file=sys.stderr)
    if failed:
        print("rerun the same command to retry the failed ones", file=sys.stderr)
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------
# evaluate and predict


COMPILE_HELP = (
    "run each model under torch.compile: compiling takes tens of seconds per model once, "
    "then batches run faster (about 1.8x for test_efficientnet on a CPU)"
)


AMP_CHOICES = ["auto", "bf16", "fp16", "off"]
AMP_HELP = "mixed precision on CUDA: auto (bf16 where supported, the default), bf16, fp16, off"


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "run", metavar="RUN", help="run directory with a generalist, clusters and specialists"
    )
    p.add_argument("--data", help="data source (default: the one the generalist was trained on)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"], help="default test")
    p.add_argument(
        "--top-n",
        type=int,
        help="consult the specialists of the generalist's top-n classes "
        "(default: the width calibrated on validation, else 1)",
    )
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    p.add_argument(
        "--cache-size", type=int, help="specialists kept in memory at once (default: all)"
    )
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    p.add_argument("--amp", default="auto", choices=AMP_CHOICES, help=AMP_HELP)


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluate import evaluate_run, format_metrics

    m = evaluate_run(
        args.run,
        data=args.data,
        split=args.split,
        top_n=args.top_n,
        device=args.device,
        cache_size=args.cache_size,
        compile=args.compile,
        amp=args.amp,
    )
    print(format_metrics(m))
    run = RunDir.of(args.run)
    figures = f"{run.coverage_png}" + (f" and {run.cascade_png}" if "cascade" in m else "")
    print(f"written to {run.metrics}, {figures}")
    return 0


def _predict_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "run", metavar="RUN", help="run directory, or a folder written by `specialists export`"
    )
    p.add_argument(
        "images", metavar="PATH", nargs="+", help="image files and folders (searched recursively)"
    )
    p.add_argument(
        "--output",
        "-o",
        metavar="FILE",
        help="write one row per image to FILE.csv or FILE.jsonl (default: print them)",
    )
    p.add_argument("--top-k", type=int, default=5, help="classes per image (default 5)")
    p.add_argument(
        "--top-n",
        type=int,
        help="gating: specialists of the generalist's top-n classes (default: calibrated, else 1)",
    )
    p.add_argument(
        "--model",
        choices=["ensemble", "student", "generalist"],
        default="ensemble",
        help="what answers: the ensemble (default), the distilled student, or the generalist",
    )
    p.add_argument("--batch-size", type=int, default=256, help="images per batch (default 256)")
    p.add_argument(
        "--workers",
        type=int,
        help="threads decoding images (default: SPECIALISTS_DECODE_WORKERS, else the CPUs, at most 8)",
    )
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    p.add_argument("--amp", default="auto", choices=AMP_CHOICES, help=AMP_HELP)


def _predictor(args: argparse.Namespace, exported: bool):
    """What answers `predict`: (predict(images) -> (probs, consulted), input size, channels,
    class names, the data record)."""
    from .artifacts import generalist_record, load_generalist, load_student
    from .models import predict_proba, resolve_device
    from .transforms import make_transforms

    if args.model == "ensemble":
        from .ensemble import Ensemble

        opts = {"top_n": args.top_n, "compile": args.compile, "amp": args.amp}
        if exported:
            ens = Ensemble.from_pretrained(args.run, args.device, **opts)
        else:
            ens = Ensemble.load(args.run, args.device, **opts)

        def predict(images):
            out = ens.run_batch(images)
            return out.q, out.consulted

        rec = ens.record
        return predict, ens.input_size, rec.in_chans, rec.class_names, rec.data
    if exported:
        raise SpecialistsError(f"{args.run}: an exported folder holds the ensemble only")
    run = RunDir.of(args.run)
    device = resolve_device(args.device)
    if args.model == "student":
        grec = generalist_record(run)
        model, _, transform = load_student(run, device)
    else:
        model, grec = load_generalist(run, device)
        transform = make_transforms(grec)[1]
    if args.compile:
        import torch

        model = torch.compile(model, dynamic=True)

    def predict(images):
        probs = predict_proba(model, images, transform=transform, device=device, amp=args.amp)
        return probs, [[] for _ in probs]

    return predict, grec.input_size, grec.in_chans, grec.class_names, grec.data


def _predict(args: argparse.Namespace) -> int:
    import contextlib

    from .export import is_export
    from .predict import list_images, predict_files

    files = list_images(args.images)
    if not files:
        raise SpecialistsError(f"no image files in {' '.join(args.images)}")
    exported = is_export(args.run)
    with contextlib.nullcontext() if exported else _reading(args):
        predict, size, channels, names, data = _predictor(args, exported)
    summary = predict_files(
        predict,
        files,
        size=size,
        channels=channels,
        class_names=names,
        # as the training images were: an image folder's own mode (runs from before the option
        # squashed); other sources were square already, and a photo keeps its aspect ratio
        resize=(data.get("options") or {}).get(
            "resize", "squash" if data.get("kind") == "folder" else "crop"
        ),
        top_k=args.top_k,
        batch_size=args.batch_size,
        output=args.output,
        workers=args.workers,
        progress=not args.quiet,
        warn=lambda line: print(line, file=sys.stderr),
        label=None if args.model == "ensemble" else args.model,
    )
    if summary.failures:
        print(
            f"{len(summary.failures)} of {len(files)} file(s) unreadable and skipped "
            f"(each named above), e.g. {summary.failures[0][0]}",
            file=sys.stderr,
        )
    if args.output:
        print(f"{summary.n_images} image(s) predicted, written to {args.output}")
    return 0


# ---------------------------------------------------------------------------------------------
# export


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="run directory with a trained ensemble")
    p.add_argument(
        "out", metavar="OUT", help="folder to write (loads with Ensemble.from_pretrained)"
    )
    p.add_argument(
        "--onnx",
        action="store_true",
        help="also write each member as ONNX, checked with onnxruntime against PyTorch",
    )
    p.add_argument("--force", action="store_true", help="replace OUT if it is an exported ensemble")


def _export(args: argparse.Namespace) -> int:
    from .ensemble import Ensemble

    with _reading(args):
        ens = Ensemble.load(args.run, "cpu")
    # the files are copied after the lock is let go: each is checked against its checksum
    meta = ens.export(args.out, onnx=args.onnx, force=args.force)
    size = sum(f.stat().st_size for f in Path(args.out).rglob("*") if f.is_file())
    print(
        f"exported the generalist and {len(meta['specialists'])} specialist(s) "
        f"({ens.combination.describe()}) to {args.out} ({size / 2**20:.1f} MiB)"
    )
    for r in meta.get("onnx", {}).values():
        print(f"  {r['file']}: onnxruntime agrees with PyTorch to {r['max_abs_diff']:.1e}")
    print(f"load it with: Ensemble.from_pretrained({str(args.out)!r})")
    return 0


# ---------------------------------------------------------------------------------------------
# controls


def _controls_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="run directory with trained specialists")
    _launcher_args(p)
    p.add_argument("--top-n", type=int, help="gating for the evaluation (default: calibrated)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random groups and the copies")


def _controls(args: argparse.Namespace) -> int:
    from .evaluate import format_metrics
    from .train.controls import evaluate_controls, run_controls

    results = run_controls(
        args.run,
        workers=args.workers,
        backend=args.backend,
        device=args.device,
        ray_address=args.ray_address,
        gpus_per_job=args.gpus_per_job,
        seed=args.seed,
        progress=not args.quiet,
    )
    failed = [r for r in results if not r.ok]
    for r in failed:
        print(f"  control job {r.job.out}/{r.job.id}: FAILED: {r.error}", file=sys.stderr)
    if failed:
        print("rerun the same command to retry the failed ones", file=sys.stderr)
        return 1
    m = evaluate_controls(args.run, top_n=args.top_n, device=args.device)
    print(format_metrics(m))
    return 0


# ---------------------------------------------------------------------------------------------
# distill


def _distill_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="run directory with a calibrated ensemble")
    _launcher_args(p)
    p.add_argument(
        "--config",
        help="YAML file: any of the options below, or an experiment file (its section for this "
        "step); flags win",
    )
    p.add_argument("--model", help="the student's timm model (default: the generalist's)")
    p.add_argument(
        "--init",
        help="generalist (its weights, the default for its architecture), random, or a "
        "checkpoint of the student's architecture",
    )
    p.add_argument(
        "--teacher",
        dest="teacher_mode",
        choices=["online", "cached"],
        help="cached: the ensemble's outputs on the un-augmented images, computed once (default); "
        "online: it scores the student's own augmented batch",
    )
    p.add_argument(
        "--teacher-top-n",
        type=int,
        help="the teacher's gating width: 1 (default) consults only the specialists of the "
        "generalist's top class, the sharpest target; 0 keeps the calibrated width",
    )
    p.add_argument("--temperature", type=float, help="T of the soft targets (default 2)")
    p.add_argument(
        "--alpha", type=float, help="weight of the soft term, 1 - alpha on the labels (default 0.9)"
    )
    p.add_argument("--epochs", type=int, help="passes over the training images (default 50)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 3e-3)")
    p.add_argument("--batch-size", type=int, help="default 128")
    p.add_argument(
        "--transfer",
        help="images without labels to learn from the teacher alone: a folder of images or any "
        "data source (its labels ignored)",
    )
    p.add_argument(
        "--controls",
        action="store_true",
        help="also distil the generalist alone (self-distillation) and, where the run has it, "
        "the random-groups ensemble",
    )
    p.add_argument("--seed", type=int, help="default 0")


def _distill(args: argparse.Namespace) -> int:
    from .train.distill import run_distill

    cfg = _step_config(args, "distill")
    if args.print_config:
        return _print_config(cfg)
    results = run_distill(
        args.run,
        cfg,
        controls=args.controls,
        workers=args.workers,
        backend=args.backend,
        device=args.device,
        ray_address=args.ray_address,
        gpus_per_job=args.gpus_per_job,
        progress=not args.quiet,
    )
    failed = [r for r in results if not r.ok]
    for r in results:
        if r.ok and (r.skipped or args.quiet):  # otherwise the launcher printed it as it ended
            print(r.record.describe() + (" (already done)" if r.skipped else ""))
    for r in failed:
        print(f"  student {r.job.out}: FAILED: {r.error}", file=sys.stderr)
    if failed:
        print("rerun the same command to resume the failed ones", file=sys.stderr)
        return 1
    for r in results:
        m = r.record.metrics
        if r.record.teacher == "ensemble" and m["val_acc"] < m["generalist_val_acc"]:
            print(
                f"warning: the student is below its generalist on validation "
                f"({100 * m['val_acc']:.2f}% against {100 * m['generalist_val_acc']:.2f}%); "
                "a sharper target may do better: --teacher-top-n 1 (the default), then "
                "--temperature 1",
                file=sys.stderr,
            )
    print(f"`specialists evaluate {args.run}` adds the student's row to the metrics")
    return 0


# ---------------------------------------------------------------------------------------------
# demo


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out", default="runs/demo", help="run directory (default runs/demo); rerun to resume"
    )
    p.add_argument(
        "--workers", type=int, help="parallel specialist jobs (default: one per core or GPU)"
    )
    p.add_argument(
        "--controls",
        action="store_true",
        help="also train and report the controls (about three times the specialists' time more)",
    )


def _demo(args: argparse.Namespace) -> int:
    from .evaluate import format_metrics
    from .train.controls import evaluate_controls, run_controls
    from .train.pipeline import run_demo

    start = time.perf_counter()
    m = run_demo(args.out, workers=args.workers, progress=not args.quiet)
    if args.controls:
        print("[+] controls: random groups, extra-compute generalist, plain ensemble")
        results = run_controls(args.out, workers=args.workers, progress=not args.quiet)
        failed = [r for r in results if not r.ok]
        if failed:
            raise SpecialistsError(
                f"control job {failed[0].job.out}/{failed[0].job.id} failed: {failed[0].error} (rerun to retry)"
            )
        m = evaluate_controls(args.out)
    print()
    print(format_metrics(m))
    print(
        f"\ndemo finished in {time.perf_counter() - start:.0f} s; everything is in {args.out}/ "
        f"(metrics.json, coverage.png, clusters.png, ...)"
    )
    return 0


# ---------------------------------------------------------------------------------------------
# data


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data", default="embedded", help="data source (see `specialists generalist --help`)"
    )
    p.add_argument("--grid", help="write a PNG grid of samples (one row per class) here")
    p.add_argument("--classes", type=int, default=20, help="classes in the grid (default 20)")
    p.add_argument(
        "--per-class", type=int, default=8, help="samples per class in the grid (default 8)"
    )
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="of the embedded data and the validation carve (default 0)",
    )


def _data(args: argparse.Namespace) -> int:
    import numpy as np

    from .data import split_warning
    from .preview import save_sample_grid
    from .sources import load_data, parse_source

    bundle = load_data(parse_source(args.data, seed=args.seed))
    counts = np.bincount(bundle.train.labels, minlength=bundle.n_classes)
    print(
        f"{bundle.source.describe()}: {bundle.n_classes} classes, {bundle.channels} channel(s), {bundle.image_size}x{bundle.image_size}"
    )
    print(
        f"  train {len(bundle.train)}, val {len(bundle.val)}, test {len(bundle.test)} images; "
        f"{counts.min()}-{counts.max()} train images per class"
    )
    if bundle.coarse is not None:
        print(f"  known coarse groups: {int(bundle.coarse.max()) + 1}")
    if bundle.train.groups is not None and bundle.val.groups is not None:
        print(
            f"  validation carved by source: {len(np.unique(bundle.train.groups))} sources in "
            f"train, {len(np.unique(bundle.val.groups))} in val, none in both"
        )
    warning = split_warning(bundle)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    if args.grid:
        save_sample_grid(bundle, args.grid, n_classes=args.classes, per_class=args.per_class)
        print(f"  sample grid written to {args.grid}")
    return 0


# ---------------------------------------------------------------------------------------------
# calibrate


def _calibrate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="run directory with trained specialists")
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    p.add_argument(
        "--alpha",
        type=float,
        default=0.05,  # calibrate.ALPHA (a test holds them equal); the parser stays light
        help="keep the specialists only if the combination chosen on one half of validation beats "
        "the generalist on the other half at this level (exact binomial test; default 0.05; "
        "1: always keep them)",
    )
    p.add_argument(
        "--min-throughput-ratio",
        type=float,
        metavar="R",
        help="a cascade: inputs the generalist is sure of skip the specialists, the threshold "
        "chosen for the best validation accuracy at R times the generalist's images/s or more "
        "(e.g. 0.8; default: no cascade)",
    )


def _calibrate(args: argparse.Namespace) -> int:
    from .calibrate import calibrate_run

    comb = calibrate_run(
        args.run,
        args.device,
        say=print,
        progress=not args.quiet,
        alpha=args.alpha,
        min_throughput_ratio=args.min_throughput_ratio,
    )
    path = RunDir.of(args.run).combination
    print(f"written to {path} ({len(comb.chosen_on['grid'])} settings scored)")
    return 0


# ---------------------------------------------------------------------------------------------
# run: the whole pipeline from one experiment file


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "config",
        metavar="CONFIG",
        help="experiment file: `data` and the sections generalist, cluster, specialists, "
        "distill (each optional; distill runs only when present)",
    )
    p.add_argument("--out", required=True, help="run directory (rerun to resume)")
    _launcher_args(p)
    p.add_argument(
        "--print-config",
        action="store_true",
        help="print every step's configuration (YAML, with the defaults), and stop",
    )


def _run(args: argparse.Namespace) -> int:
    from dataclasses import asdict, replace

    import yaml

    from .config import is_experiment, load_config_file, merge_config
    from .evaluate import evaluate_run, format_metrics
    from .grouping import cluster_run, summarize_clusters
    from .train.distill import run_distill
    from .train.generalist import train_generalist
    from .train.pipeline import train_specialists

    raw = load_config_file(args.config)
    if not is_experiment(raw):
        raise SpecialistsError(
            f"{args.config}: not an experiment file (expected sections among {', '.join(CONFIGS)})"
        )
    cfgs = {}
    for command, (section, _, _) in CONFIGS.items():
        values = load_config_file(args.config, section)
        cfgs[command] = merge_config(
            _config_class(command), values, {}, f"{args.config} ({section})"
        )
    if args.print_config:
        doc = {CONFIGS[c][0]: asdict(cfg) for c, cfg in cfgs.items()}
        if "distill" not in raw:
            del doc["distill"]
        print(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True), end="")
        return 0
    if args.workers is not None and args.workers < 1:
        raise SpecialistsError(f"--workers {args.workers}: must be >= 1")
    run = RunDir.of(args.out)
    launcher = dict(
        workers=args.workers,
        backend=args.backend,
        device=args.device,
        ray_address=args.ray_address,
        gpus_per_job=args.gpus_per_job,
        progress=not args.quiet,
    )
    gcfg = cfgs["generalist"]
    if args.device != "auto":  # the flag wins over the file for every step
        gcfg = replace(gcfg, device=args.device)
    if run.generalist_record.is_file():
        done = load_config_file(run.config) if run.config.is_file() else {}
        # where it ran does not change what it is; a setting the run predates had its default
        where = {"device", "threads", "amp", "eval_batch_size"}
        defaults = asdict(type(gcfg)())
        changed = sorted(
            k for k, v in asdict(gcfg).items() if k not in where and done.get(k, defaults[k]) != v
        )
        if changed:
            k = changed[0]
            raise SpecialistsError(
                f"{run.root}: its generalist was trained with {k}={done.get(k, defaults[k])!r}, the experiment "
                f"says {asdict(gcfg)[k]!r}; use another --out (or `specialists generalist --force`)"
            )
        print(f"1/5 generalist: already trained in {run.root}")
    else:
        record = train_generalist(gcfg, run.root, progress=not args.quiet)
        m = record.metrics
        print(
            f"1/5 generalist {record.architecture}: test accuracy "
            f"{100 * m['test_accuracy']:.2f}% (best epoch {m['best_epoch']} of {m['epochs_run']})"
        )
    report = cluster_run(run.root, cfgs["cluster"])
    print("2/5 " + summarize_clusters(report).splitlines()[0])
    results = train_specialists(run.root, cfgs["train"], **launcher)
    failed = [r for r in results if not r.ok]
    if failed:
        for r in failed:
            print(f"  specialist {r.job.out}: FAILED: {r.error}", file=sys.stderr)
        print("rerun the same command to resume the failed ones", file=sys.stderr)
        return 1
    print(f"3/5 specialists: {len(results)} ready")
    if "distill" in raw:
        results = run_distill(run.root, cfgs["distill"], **launcher)
        failed = [r for r in results if not r.ok]
        if failed:
            for r in failed:
                print(f"  student {r.job.out}: FAILED: {r.error}", file=sys.stderr)
            return 1
        print(f"4/5 distilled: {results[0].record.describe()}")
    else:
        print("4/5 distillation: not asked for (no distill section)")
    metrics = evaluate_run(run.root, device=args.device)
    print("5/5 evaluation on the test split")
    print(format_metrics(metrics))
    print(f"written to {run.metrics}; the run directory is {run.root}")
    return 0


# ---------------------------------------------------------------------------------------------
# configuration: flags derived from the dataclasses

# command -> (its section in an experiment file, module, configuration class)
CONFIGS = {
    "generalist": ("generalist", "specialists.train.generalist", "GeneralistConfig"),
    "cluster": ("cluster", "specialists.grouping", "ClusterConfig"),
    "train": ("specialists", "specialists.train.specialist", "SpecialistConfig"),
    "distill": ("distill", "specialists.train.distill", "DistillConfig"),
}


def _config_class(command: str) -> type:
    import importlib

    _, module, name = CONFIGS[command]
    return getattr(importlib.import_module(module), name)


def _step_config(args: argparse.Namespace, command: str):
    """The step's configuration: defaults < the config file (its section) < the flags given."""
    from .config import load_config_file, merge_config

    cls = _config_class(command)
    section = CONFIGS[command][0]
    file_values = load_config_file(args.config, section) if args.config else {}
    overrides = {k: getattr(args, k, None) for k in cls.__dataclass_fields__}
    return merge_config(cls, file_values, overrides, args.config or "command line")


def _print_config(cfg) -> int:
    from .config import config_yaml

    print(config_yaml(cfg), end="")
    return 0


COMMANDS: dict[
    str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
] = {
    "generalist": ("train the generalist over all classes", _generalist_args, _generalist),
    "cluster": ("group the classes the generalist confuses", _cluster_args, _cluster),
    "train": ("train one specialist per group, in parallel", _train_args, _train),
    "evaluate": (
        "evaluate the ensemble against its generalist (the paper's metrics)",
        _evaluate_args,
        _evaluate,
    ),
    "calibrate": (
        "choose how the ensemble combines, on validation (train does this at its end)",
        _calibrate_args,
        _calibrate,
    ),
    "predict": ("classify image files and folders (to CSV or JSON lines)", _predict_args, _predict),
    "controls": (
        "train and evaluate the controls: random groups, extra compute, plain ensemble",
        _controls_args,
        _controls,
    ),
    "distill": (
        "distil the calibrated ensemble into one student model",
        _distill_args,
        _distill,
    ),
    "export": ("write a self-contained ensemble folder (and ONNX)", _export_args, _export),
    "run": ("the whole pipeline from one experiment file", _run_args, _run),
    "demo": ("run the whole pipeline on the embedded data", _demo_args, _demo),
    "data": ("describe a data source and draw a grid of samples", _data_args, _data),
}


def build_parser(config_flags: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; the commands in ``config_flags`` (default: all) get a flag for every field
    of their configuration class, which imports the training modules (torch), so ``main``
    asks only for the command it runs."""
    parser = argparse.ArgumentParser(
        prog="specialists",
        description="Specialist-ensemble image classification: generalist -> confusion clusters -> "
        "specialists -> KL combiner.",
    )
    parser.add_argument("--version", action="version", version=f"specialists {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help, add_arguments, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help, description=help)
        add_arguments(p)
        if name in CONFIGS:
            p.add_argument(
                "--print-config",
                action="store_true",
                help="print the configuration these flags and files make (YAML), and stop",
            )
            if config_flags is None or name in config_flags:
                from .config import add_config_flags

                add_config_flags(p, _config_class(name))
        if name in LOCKED:
            _no_wait(p)
        _common(p)
        p.set_defaults(_handler=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(config_flags=[a for a in argv if a in CONFIGS][:1])
    args = parser.parse_args(argv)
    if not getattr(args, "_handler", None):
        parser.print_help()
        return 2
    logging.getLogger("faiss").setLevel(logging.WARNING)  # its loader narrates CPU feature probing
    logging.getLogger("timm").setLevel(logging.WARNING)  # it narrates loading a checkpoint
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(message)s",
        stream=sys.stderr,
    )
    try:
        with _locked(args):
            code = args._handler(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler below
        return code
    except SpecialistsError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into a reader that stopped early (`| head`)
        # Point stdout at devnull so the interpreter's final flush does not fail a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as e:  # a bug or an unforeseen environment problem: still one line
        if args.debug:
            raise
        first = str(e).splitlines()[0] if str(e) else ""
        print(
            f"error: {type(e).__name__}: {first} (rerun with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
