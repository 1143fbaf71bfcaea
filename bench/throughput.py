"""Throughput: N prompts through genq (one mlx worker) against the same N sent straight to the same
`mlx_lm.server`, at the same concurrency.

"The same server" is literal: the direct requests go to the worker's own server process, so both
sides share its flags, its warm state and its machine. Each level runs both sides in alternating
order for a few rounds, so drift in the machine's load hits both alike; every prompt is distinct,
so neither side gains from the server's prompt cache.
"""

from __future__ import annotations

from typing import Any

import httpx

from bench.common import Lab, closed_loop, direct_completion, prompts
from bench.report import Options, Report, num, pick
from jobcontract.models import GenerationRequest
from producer.client import Client

NAME = "throughput"
TARGET_RATIO = 0.95


def run(options: Options) -> Report:
    size = options.size
    levels: list[int] = pick(size, [1, 8], [1, 8, 32], [1, 8, 32])
    jobs: dict[int, int] = pick(size, {1: 4, 8: 16}, {1: 24, 8: 96, 32: 192}, {1: 100, 8: 400, 32: 800})
    max_tokens: int = pick(size, 16, 64, 64)
    rounds: int = pick(size, 1, 2, 3)
    report = Report(NAME, "Throughput: genq vs the same mlx_lm.server called directly", options)
    report.params = {
        "concurrency": levels,
        "jobs_per_round": jobs,
        "rounds": rounds,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "worker": {"processes": 1, "concurrency": max(levels)},
        "direct_client": "httpx, one non-streaming POST /v1/completions per prompt, to the worker's own server",
        "genq_client": "producer.Client.generate (submit, then block on the job's event stream) per prompt",
    }
    with Lab(options, NAME) as lab:
        settings = lab.settings(routes_file=lab.routes("mlx", [lab.mlx_route()]))
        worker = lab.start_worker(settings, concurrency=max(levels))
        [url] = worker.server_urls()
        model = str(lab.mlx_model)
        limits = httpx.Limits(max_connections=max(levels) + 4, max_keepalive_connections=max(levels) + 4)
        with Client(settings) as client, httpx.Client(limits=limits) as http:

            def direct(prompt: str) -> int:
                return direct_completion(http, url, model, prompt, max_tokens)[1]

            def via_genq(prompt: str) -> int:
                request = GenerationRequest(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0.0)
                result = client.generate(request, timeout=600)
                if not result.ok:
                    raise RuntimeError(f"job {result.job_id} {result.state.value}: {result.error}")
                return result.usage.completion_tokens

            sides = {"direct": direct, "genq": via_genq}
            for side, call in sides.items():  # warm both paths: first requests pay for compilation
                closed_loop(max(levels), prompts(2 * max(levels), f"warm-{side}"), call)
            levels_out: list[dict[str, Any]] = []
            for level in levels:
                rounds_out: list[dict[str, Any]] = []
                for r in range(rounds):
                    order = list(sides) if r % 2 == 0 else list(reversed(sides))
                    entry: dict[str, Any] = {"round": r, "order": order}
                    for side in order:
                        tokens, wall = closed_loop(level, prompts(jobs[level], f"{side}-{level}-{r}"), sides[side])
                        entry[side] = {"jobs": len(tokens), "tokens": sum(tokens), "wall_s": wall}
                    rounds_out.append(entry)
                levels_out.append(_level_summary(level, rounds_out))
    report.results = {"levels": levels_out}
    rows = []
    for summary in levels_out:
        d, g = summary["direct"], summary["genq"]
        rows.append(
            [
                str(summary["concurrency"]),
                num(d["tokens_per_s"], 0),
                num(g["tokens_per_s"], 0),
                num(summary["ratio"], 3),
                ", ".join(num(x, 3) for x in summary["round_ratios"]),
                num(d["jobs_per_s"], 1),
                num(g["jobs_per_s"], 1),
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
        ["concurrency", "direct tok/s", "genq tok/s", "genq/direct", "per round", "direct jobs/s", "genq jobs/s"],
        rows,
    )
    report.notes.append(
        "Both sides share the machine with the benchmark's own client threads; on genq's side Redis and the "
        "worker process also run on the same cores as the server."
    )
    return report


def _level_summary(level: int, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"concurrency": level, "rounds": rounds}
    for side in ("direct", "genq"):
        jobs = sum(r[side]["jobs"] for r in rounds)
        tokens = sum(r[side]["tokens"] for r in rounds)
        wall = sum(r[side]["wall_s"] for r in rounds)
        out[side] = {
            "jobs": jobs,
            "tokens": tokens,
            "wall_s": wall,
            "tokens_per_s": tokens / wall,
            "jobs_per_s": jobs / wall,
        }
    out["ratio"] = out["genq"]["tokens_per_s"] / out["direct"]["tokens_per_s"]
    out["round_ratios"] = [
        (r["genq"]["tokens"] / r["genq"]["wall_s"]) / (r["direct"]["tokens"] / r["direct"]["wall_s"]) for r in rounds
    ]
    return out
