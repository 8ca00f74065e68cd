"""``recstack train``, ``recstack evaluate`` and ``recstack publish-baseline``."""

from __future__ import annotations

import argparse
from pathlib import Path

from recstack.flags import add_flag, non_negative_int, positive_float, positive_int


def register(subparsers: argparse._SubParsersAction) -> None:
    train = subparsers.add_parser(
        "train",
        help="train, quantize and evaluate a ranker on event logs; publish it as a new model version",
        description=(
            "Train the two-path ranker on events strictly before --until, evaluate it (per path, fp32 and "
            "int8) and the baselines on the events after it, and publish a new version into --out "
            "(weights, config.json, metrics.json, report.md, training_curve.png, MANIFEST.sha256). "
            "Runs single-process or under torchrun (DDP over gloo)."
        ),
    )
    add_flag(
        train,
        "--events",
        nargs="+",
        required=True,
        metavar="PATH",
        help="JSON Lines or Parquet event logs (files or folders), or onlineretail | otto | synthetic | "
        "synthetic-storefront",
    )
    add_flag(
        train,
        "--until",
        metavar="RFC3339",
        help="train on events strictly before this instant; later events are the evaluation set "
        "(default: now, i.e. every event, no evaluation)",
    )
    add_flag(
        train, "--eval-until", metavar="RFC3339", help="ignore events at or after this instant for evaluation"
    )
    add_flag(
        train, "--out", type=Path, default=Path("artifacts/models"), help="models folder to publish into"
    )
    add_flag(train, "--epochs", type=positive_int, default=10, help="passes over the training contexts")
    add_flag(train, "--batch-size", type=positive_int, default=256, help="contexts per step (per process)")
    add_flag(train, "--lr", type=positive_float, default=6e-3, help="AdamW learning rate")
    add_flag(train, "--seed", type=non_negative_int, default=0, help="seed of every random choice")
    add_flag(train, "--embedding-dim", type=positive_int, default=64, help="item embedding width")
    add_flag(
        train,
        "--min-item-count",
        type=positive_int,
        default=2,
        help="items seen fewer times share the unknown-item row",
    )
    add_flag(
        train,
        "--init-from",
        type=Path,
        metavar="VERSION_DIR",
        help="warm start from this model version (item rows matched by item id)",
    )
    add_flag(
        train,
        "--threads",
        type=non_negative_int,
        default=0,
        help="torch threads per process (0: automatic, one; use torchrun for more cores)",
    )
    add_flag(
        train,
        "--synthetic-events",
        type=positive_int,
        default=100_000,
        help="events generated for --events synthetic | synthetic-storefront",
    )
    add_flag(train, "--no-bench", type=None, default=False, help="skip the latency measurement")
    add_flag(train, "--no-progress", type=None, default=False, help="no progress bar")
    train.set_defaults(handler=_train)

    ev = subparsers.add_parser(
        "evaluate",
        help="evaluate a model version and the baselines on a temporal split of event logs",
        description="HR@10 and NDCG@10 with full ranking, per path, fp32 and int8, against popularity, "
        "item-to-item co-occurrence and ALS trained on the same split.",
    )
    add_flag(
        ev,
        "--model",
        type=Path,
        default=Path("artifacts/models"),
        help="a model version folder, or a models folder (its newest version)",
    )
    add_flag(
        ev,
        "--events",
        nargs="+",
        required=True,
        metavar="PATH",
        help="JSON Lines or Parquet event logs, or onlineretail | otto | synthetic | synthetic-storefront",
    )
    add_flag(ev, "--until", metavar="RFC3339", help="the cut (default: where the model's training stopped)")
    add_flag(ev, "--eval-until", metavar="RFC3339", help="ignore events at or after this instant")
    add_flag(ev, "--threads", type=non_negative_int, default=0, help="torch threads (0: automatic)")
    add_flag(ev, "--json", type=None, default=False, help="print the full result as JSON instead of a table")
    ev.set_defaults(handler=_evaluate)
    _register_baseline(subparsers)


def _register_baseline(subparsers: argparse._SubParsersAction) -> None:
    base = subparsers.add_parser(
        "publish-baseline",
        help="publish a baseline (popularity only) as a model version the ranking server serves",
        description=(
            "Count item popularity in event logs (events weighted by intent: view 1, add_to_cart 3, "
            "purchase 5) and publish it into --models as a model version of its own (config.json kind "
            "popularity, vocab.json, catalogue.npz, MANIFEST.sha256). The ranking server loads and "
            "hot-reloads it like a trained version; it ranks every user's candidates by popularity. "
            "See docs/EXPERIMENTS.md."
        ),
    )
    base.add_argument("kind", choices=["popularity"], help="which baseline")
    add_flag(
        base, "--models", type=Path, default=Path("artifacts/models"), help="models folder to publish into"
    )
    add_flag(
        base,
        "--from",
        nargs="+",
        required=True,
        metavar="SOURCE",
        help="JSON Lines or Parquet event logs (files or folders), or onlineretail | otto | synthetic | "
        "synthetic-storefront",
    )
    add_flag(base, "--until", metavar="RFC3339", help="count only events strictly before this instant")
    add_flag(
        base,
        "--limit",
        type=positive_int,
        default=100_000,
        help="events generated for synthetic | synthetic-storefront",
    )
    add_flag(base, "--seed", type=non_negative_int, default=0, help="seed of a synthetic source")
    add_flag(base, "--version", metavar="NAME", help="version folder name (default: vYYYYMMDD-HHMMSS, now)")
    base.set_defaults(handler=_publish_baseline)


def _train(args: argparse.Namespace) -> int:
    from models.retrain import TrainJob, run_train
    from models.train import TrainConfig

    job = TrainJob(
        events=list(args.events),
        out=args.out,
        until=args.until,
        eval_until=args.eval_until,
        init_from=args.init_from,
        train=TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed),
        embedding_dim=args.embedding_dim,
        min_item_count=args.min_item_count,
        threads=args.threads,
        synthetic_events=args.synthetic_events,
        bench=not args.no_bench,
        progress=not args.no_progress,
    )
    folder = run_train(job)
    if folder is not None:
        print((folder / "report.md").read_text())
        print(f"published {folder}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from models.report import quality_markdown
    from models.retrain import dumps, run_evaluate

    result = run_evaluate(args.model, list(args.events), args.until, args.eval_until, args.threads)
    print(dumps(result) if args.json else quality_markdown(result))
    return 0


def _publish_baseline(args: argparse.Namespace) -> int:
    import json

    import pandas as pd

    from models.artifacts import _VERSION_RE
    from models.data import parse_until
    from models.popularity import publish_popularity
    from recstack import sources
    from recstack.errors import UserError

    if args.version is not None and not _VERSION_RE.match(args.version):
        raise UserError(f"--version: {args.version!r} is not a version name (vYYYYMMDD-HHMMSS[-N])")
    until_ms = parse_until(args.until) if args.until else None
    words = ("onlineretail", "otto", "synthetic", "synthetic-storefront")
    frames = []
    given = list(getattr(args, "from"))  # "from" is a keyword: no args.from
    for value in given:
        if value not in words and not Path(value).exists():
            raise UserError(f"--from: {value} is neither an event log nor one of {', '.join(words)}")
        limit = args.limit if value.startswith("synthetic") else None
        frames.append(sources.load_source(value, limit=limit, seed=args.seed))
    events = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    folder = publish_popularity(args.models, events, until_ms=until_ms, sources=given, version=args.version)
    counted = json.loads((folder / "config.json").read_text())["data"]["events"]
    print(f"published {folder} (popularity of {counted} events)")
    return 0
