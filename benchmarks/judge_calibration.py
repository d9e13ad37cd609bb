"""Judge calibration on real data: does the SQL judge accept gold and reject wrong SQL?

For every example it judges (see `benchmarks/perturb.py`):

- gold vs itself (must be 100% correct) and the sqlglot round trip of gold (also must be);
- four systematic perturbations of gold (changed literal, dropped WHERE, swapped aggregate,
  wrong column), each of which should be judged wrong.

Datasets: Spider dev on its real SQLite databases -- judged twice, on the real database alone
(classic single-database execution accuracy) and as the judge does by default, on the real
database plus test-suite variants (`evaluation.db_variants`) -- and sql-create-context with
test-suite style synthetic databases (``synthetic_db``). Local data is read from
``../shared/data`` beside the checkout (or ``$TEXT2SQL_DATA``); pass ``--spider-dir`` /
``--sql-create-context`` to point elsewhere. Synthetic databases are cached under the project
cache (``$TEXT2SQL_CACHE``, default ``~/.cache/text2sql``).

Run::

    python benchmarks/judge_calibration.py                     # both datasets, all rows
    python benchmarks/judge_calibration.py --limit 100 --out calib.json
    python benchmarks/judge_calibration.py --datasets spider
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    # Run as a script from anywhere: make the repository's packages importable.
    sys.path.insert(0, str(REPO_ROOT))

from benchmarks.perturb import PERTURBATIONS, CalibrationReport, KindStats, calibrate  # noqa: E402
from dataset_utils.errors import UserError  # noqa: E402
from dataset_utils.records import Example  # noqa: E402
from dataset_utils.settings import shared_data_dir  # noqa: E402
from evaluation.db_variants import DEFAULT_SUITE_SIZE  # noqa: E402

DATASETS = ("spider", "sql-create-context")


def _load(name: str, args: argparse.Namespace) -> list[Example]:
    from dataset_utils.sources import SourceSpec, load_source

    base = shared_data_dir()
    if name == "spider":
        path = args.spider_dir or (base / "spider_dev" if base else None)
        spec = SourceSpec(
            format="spider", path=str(path) if path else None, split="dev", limit=args.limit
        )
    else:
        path = args.sql_create_context or (
            base / "sql-create-context" / "sample.jsonl" if base else None
        )
        spec = SourceSpec(
            format="sql-create-context", path=str(path) if path else None, limit=args.limit
        )
    if path is None or not Path(path).exists():
        raise UserError(
            f"no local data for {name} (looked at {path}); pass --spider-dir / "
            "--sql-create-context or set TEXT2SQL_DATA"
        )
    return load_source(spec).examples


def _row(label: str, s: KindStats) -> str:
    return (
        f"| {label:<22} | {s.applied:>7} | {s.not_applicable:>6} | {s.judgeable:>9} | "
        f"{s.judged_wrong:>5} | {s.wrong_by_error:>8} | {s.accepted:>8} | "
        f"{100 * s.wrong_rate:>7.1f}% |"
    )


def format_table(name: str, method: str, rep: CalibrationReport) -> str:
    lines = [
        f"### {name} ({rep.n_examples} examples, {method}, {rep.seconds:.1f}s)",
        "",
        f"gold vs gold: {rep.gold.accepted}/{rep.gold.judgeable} judged correct "
        f"({100 * rep.gold.accepted_rate:.1f}%); unjudgeable (gold fails): {rep.unjudgeable}",
        f"controls (must be correct): sqlglot round trip {rep.roundtrip.accepted}/"
        f"{rep.roundtrip.judgeable}; equivalent rewrite {rep.equivalent.accepted}/"
        f"{rep.equivalent.judgeable}",
        "",
        "| perturbation           | applied | n/a    | judgeable | wrong | by error | accepted"
        " | % wrong  |",
        "|------------------------|---------|--------|-----------|-------|----------|----------"
        "|----------|",
    ]
    for kind, s in rep.kinds.items():
        lines.append(_row(kind, s))
    lines.append(_row("OVERALL", rep.overall))
    overall = rep.overall
    lines += [
        "",
        f"false-acceptance rate: {100 * overall.accepted_rate:.1f}% "
        f"({overall.accepted}/{overall.judgeable}); 'by error' = the perturbed SQL failed to run",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=(
            "Calibrate the SQL judge: gold vs gold must be 100% correct; perturbed gold "
            f"({', '.join(PERTURBATIONS)}) should be judged wrong."
        )
    )
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument(
        "--spider-dir",
        type=Path,
        default=None,
        help="Spider folder with dev.jsonl and database/ (default: shared data)",
    )
    parser.add_argument(
        "--sql-create-context",
        type=Path,
        default=None,
        help="sql-create-context JSONL file (default: shared data sample)",
    )
    parser.add_argument("--limit", type=int, default=None, help="first N rows of each dataset")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds per statement")
    parser.add_argument("--n-dbs", type=int, default=4, help="synthetic databases per example")
    parser.add_argument(
        "--suite-size",
        type=int,
        default=DEFAULT_SUITE_SIZE,
        help="test-suite variants per real database (0: real database only)",
    )
    parser.add_argument("--seed", type=int, default=0, help="synthetic database seed")
    parser.add_argument("--out", type=Path, default=None, help="write the full report as JSON")
    args = parser.parse_args(argv)
    try:
        start = time.perf_counter()
        results: dict[str, dict[str, object]] = {}
        for name in args.datasets:
            examples = _load(name, args)
            if name == "spider":
                # The real database alone (classic execution accuracy), then the default
                # judge: real database + test-suite variants (evaluation.db_variants).
                runs = [
                    ("real_db only", 0),
                    (f"real_db + {args.suite_size} suite variants", args.suite_size),
                ]
                if args.suite_size <= 0:
                    runs = runs[:1]
            else:
                runs = [(f"synthetic_db x{args.n_dbs}", 0)]
            for method, suite in runs:
                rep = calibrate(
                    examples,
                    timeout_s=args.timeout,
                    n_dbs=args.n_dbs,
                    suite_size=suite,
                    seed=args.seed,
                )
                print(format_table(name, method, rep))
                print()
                results[f"{name} [{method}]"] = {"dataset": name, "method": method, **rep.to_dict()}
        total = time.perf_counter() - start
        print(f"total runtime: {total:.1f}s")
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            payload = {"seconds": round(total, 2), "datasets": results}
            args.out.write_text(json.dumps(payload, indent=2, ensure_ascii=False))
            print(f"wrote {args.out}")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
