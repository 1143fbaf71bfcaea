"""Throughput: N prompts through genq (one mlx worker) against the same N sent straight to the same
`mlx_lm.server`, at the same concurrency.

"The same server" is literal: the direct requests go to the worker's own server process, so both
sides share its flags, its warm state and its machine. Each level runs both sides in alternating
order for a few rounds, so drift in the machine's load hits both alike; every prompt is distinct,
so neither side gains from the server's prompt cache.
"""

from __future__ import annotations

from typing import Any

from bench.common import DirectClient, Lab, closed_loop, prompts
from bench.report import Options, Report, num, pick
from jobcontract.models import GenerationRequest
from producer.client import Client

NAME = "throughput"
TARGET_RATIO = 0.95


def run(options: Options) -> Report:
    size = options.size
    levels: list[int] = pick(size, [1, 8], [1, 8, 32], [1, 8, 32])
    jobs: dict[int, int] = pick(size, {1: 4, 8: 16}, {1: 16, 8: 64, 32: 128}, {1: 100, 8: 400, 32: 800})
    max_tokens: int = pick(size, 16, 64, 64)
    rounds: int = pick(size, 1, 3, 6)
    report = Report(NAME, "Throughput: genq vs the same mlx_lm.server called directly", options)
    report.params = {
        "concurrency": levels,
        "jobs_per_round": jobs,
        "rounds": rounds,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "worker": {"processes": 1, "concurrency": max(levels)},
        "direct_client": "httpx, one POST /v1/completions per prompt to the worker's own server: plain, and "
        "streamed with usage (as a genq worker asks for it)",
        "genq_client": "producer.Client.generate (submit, then block on the job's event stream) per prompt",
    }
    with Lab(options, NAME) as lab:
        # Three tries on the server, as the direct client gets: mlx_lm.server drops connections under bursts.
        settings = lab.settings(routes_file=lab.routes("mlx", [lab.mlx_route(max_attempts=3)]))
        worker = lab.start_worker(settings, concurrency=max(levels))
        [url] = worker.server_urls()
        model = str(lab.mlx_model)
        with Client(settings) as client, DirectClient(url, model, connections=max(levels) + 4) as http:

            def direct(prompt: str) -> int:
                return http.complete(prompt, max_tokens)[1]

            def direct_streamed(prompt: str) -> int:
                return http.complete(prompt, max_tokens, stream=True)[1]

            failed: list[str] = []  # a failed job counts, with no tokens: the caller would have to resubmit it

            def via_genq(prompt: str) -> int:
                request = GenerationRequest(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0.0)
                result = client.generate(request, timeout=600)
                if not result.ok:
                    failed.append(f"{result.job_id}: {result.error.message if result.error else result.state.value}")
                    return 0
                return result.usage.completion_tokens

            sides = {"direct": direct, "genq": via_genq, "direct_streamed": direct_streamed}
            for side, call in sides.items():  # warm both paths: first requests pay for compilation
                closed_loop(max(levels), prompts(2 * max(levels), f"warm-{side}"), call)
            levels_out: list[dict[str, Any]] = []
            for level in levels:
                rounds_out: list[dict[str, Any]] = []
                for r in range(rounds):
                    names = list(sides)
                    order = names[r % len(names) :] + names[: r % len(names)]  # each side leads in turn
                    entry: dict[str, Any] = {"round": r, "order": order}
                    for side in order:
                        failed_before = len(failed)
                        tokens, wall = closed_loop(level, prompts(jobs[level], f"{side}-{level}-{r}"), sides[side])
                        entry[side] = {"jobs": len(tokens), "tokens": sum(tokens), "wall_s": wall}
                        entry[side]["failed"] = len(failed) - failed_before
                    rounds_out.append(entry)
                levels_out.append(_level_summary(level, rounds_out))
            direct_retries = http.retries
    report.results = {"levels": levels_out, "direct_retries": direct_retries, "genq_failed": failed}
    rows = []
    for summary in levels_out:
        d, g, s = summary["direct"], summary["genq"], summary["direct_streamed"]
        rows.append(
            [
                str(summary["concurrency"]),
                num(d["tokens_per_s"], 0),
                num(s["tokens_per_s"], 0),
                num(g["tokens_per_s"], 0),
                num(summary["ratio"], 3),
                ", ".join(num(x, 3) for x in summary["round_ratios"]),
                num(summary["ratio_to_streamed"], 3),
                num(d["jobs_per_s"], 1),
                num(g["jobs_per_s"], 1),
                str(g["failed"]),
            ]
        )
        report.target(
            f"genq/direct tokens/s at concurrency {summary['concurrency']}",
            f">= {TARGET_RATIO}",
            summary["ratio"],
            "",
            lambda v: v >= TARGET_RATIO,
        )
    report.table(
        f"Tokens/s and jobs/s, {max_tokens} tokens per job, pooled over {rounds} round(s)",
        [
            "concurrency",
            "direct tok/s",
            "direct streamed tok/s",
            "genq tok/s",
            "genq/direct",
            "per round",
            "genq/direct streamed",
            "direct jobs/s",
            "genq jobs/s",
            "genq jobs failed",
        ],
        rows,
    )
    if failed:
        report.notes.append(
            f"{len(failed)} genq job(s) failed after their attempts and count with no tokens; first: {failed[0]}"
        )
    if direct_retries:
        report.notes.append(f"The direct client retried {direct_retries} request(s) on a dropped connection.")
    report.notes.append(
        "genq's worker always streams from its server (to see the first token and every gap between tokens): "
        "'direct streamed' is that same call made directly, so genq/direct streamed is the queue's share alone."
    )
    report.notes.append(
        "Both sides share the machine with the benchmark's own client threads; on genq's side Redis and the "
        "worker process also run on the same cores as the server."
    )
    return report


def _level_summary(level: int, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"concurrency": level, "rounds": rounds}
    for side in ("direct", "genq", "direct_streamed"):
        jobs = sum(r[side]["jobs"] for r in rounds)
        tokens = sum(r[side]["tokens"] for r in rounds)
        wall = sum(r[side]["wall_s"] for r in rounds)
        out[side] = {
            "jobs": jobs,
            "tokens": tokens,
            "wall_s": wall,
            "tokens_per_s": tokens / wall,
            "jobs_per_s": jobs / wall,
            "failed": sum(r[side]["failed"] for r in rounds),
        }
    out["ratio"] = out["genq"]["tokens_per_s"] / out["direct"]["tokens_per_s"]
    out["ratio_to_streamed"] = out["genq"]["tokens_per_s"] / out["direct_streamed"]["tokens_per_s"]
    out["round_ratios"] = [
        (r["genq"]["tokens"] / r["genq"]["wall_s"]) / (r["direct"]["tokens"] / r["direct"]["wall_s"]) for r in rounds
    ]
    return out
