"""`python -m jax_residual.study STUDY.toml [--worker I --workers N] [--plan] [--report]`.

Plans every run of the study, runs this worker's share (run j when j mod N == I; each worker
its own process, e.g. CUDA_VISIBLE_DEVICES=I), resuming whatever is finished or interrupted, and
writes the report once every run has a result (worker 0). Exit status: 0 done, 2 a bad study
file or setting (one line on stderr), 3 waiting for other workers (--poll-seconds 0).
"""

from __future__ import annotations

import sys

import jax

from jax_residual.command_line import OneLineParser
from jax_residual.study import plan as plans
from jax_residual.study import report, runner
from jax_residual.study.spec import load_study
from jax_residual.train.cli import DEFAULT_COMPILE_CACHE


def build_parser():
    parser = OneLineParser(prog="python -m jax_residual.study", description=__doc__.splitlines()[0])
    parser.add_argument("study", help="the study file (TOML; docs/study.md)")
    parser.add_argument("--worker", type=int, default=0, help="this worker's index I (default 0)")
    parser.add_argument("--workers", type=int, default=1, help="number of workers N (default 1)")
    parser.add_argument("--output-dir", help="replace the study file's output_dir")
    parser.add_argument("--seeds", type=int, nargs="+",
                        help="replace the study file's seeds (a replica on other seeds; with --output-dir)")
    parser.add_argument("--plan", action="store_true", help="print the plan and the progress, train nothing")
    parser.add_argument("--report", action="store_true", help="only write the report from the finished runs")
    parser.add_argument("--poll-seconds", type=float, default=60.0,
                        help="how often a worker that waits for the others looks again (0: exit, status 3)")
    parser.add_argument("--compile-cache", default=str(DEFAULT_COMPILE_CACHE),
                        help="persistent XLA compilation cache ('' disables it)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.workers < 1 or not 0 <= args.worker < args.workers:
        parser.error(f"need --workers >= 1 and 0 <= --worker < --workers, got {args.worker} and {args.workers}")
    if args.compile_cache:
        jax.config.update("jax_compilation_cache_dir", args.compile_cache)
    try:
        study = load_study(args.study, args.output_dir, args.seeds)
        slots = plans.plan_slots(study)
        if args.plan or args.report:
            chosen = runner.current_choice(study, slots)
            print(runner.describe_plan(study, slots))
            print(runner.progress(study, slots, args.workers).line())
            if args.plan:
                return 0
            if not (chosen and runner.complete(study, slots, chosen, "report")):
                raise ValueError("the study is not finished: run it first (the report needs every run's result)")
            results = runner.results_of(study, slots, chosen)
        else:
            outcome = runner.run_study(study, args.worker, args.workers, poll_seconds=args.poll_seconds)
            if args.worker != 0:
                print(f"worker {args.worker}: its share is done; worker 0 writes the report")
                return 0
            chosen, results = outcome["chosen"], outcome["results"]
        files = report.write_report(study, slots, chosen, results)
    except runner.Waiting as waiting:
        print(str(waiting), file=sys.stderr)
        return 3
    except (ValueError, OSError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    print((study.output_dir / "report" / "report.md").read_text())
    print("files: " + ", ".join(str(f) for f in files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
