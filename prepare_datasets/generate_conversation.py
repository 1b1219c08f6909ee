"""LLaVA-style instruction data about the NSD images -> <root>/nsd/nsd_gpt_conversation/<type>.jsonl.

As LLaVA did for COCO, an LLM that never sees the image gets its captions (COCO's 5 human ones,
BLIP-2's) and object boxes (COCO, DETR) and writes, "as if seeing the image", a multi-turn
conversation, a detailed description (answering a question drawn from a fixed list) or a
complex-reasoning Q&A (prompts: data/prompts/; context, protocol, templates and the API client:
the package llava_brain/instructions/). Backends: `openai` (the paper: gpt-3.5-turbo-0125; the key comes from
$OPENAI_API_KEY only) and `template` (offline, free, deterministic, built from the same context).

One JSON line per finished image, appended as it finishes, so a kill loses only requests in
flight and a rerun asks only for the missing images; at the end (or on a clean stop) the file is
rewritten sorted by nsdId, so it does not depend on completion order:
  {"nsd_id": 42, "prompt_type": "conversation",
   "conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}, ...],
   "backend": "openai", "model": "gpt-3.5-turbo-0125"}   (template backend: "model": "template-v1")
Provenance goes to <type>.jsonl.run.json beside it, after every run that ends on its own (also on
Ctrl-C or a budget stop): the settings that shape the records (prompt type, backend, model, seed),
the fingerprints of the prompt files, the images selected and done, and this run's and all runs'
API requests, retries, tokens and estimated cost. A rerun with the same settings and prompts asks
only for the images missing from the file (nothing if none is); other settings or prompts are
refused until --overwrite, which discards the stored records. The annotation files are fingerprinted
in the manifest too but not compared: adding subjects rewrites them, and the records of the images
already done stay valid.

Exit codes: 0 every selected image has a record; 1 fatal API error (HTTP 401/403/404: wrong key,
no access, unknown model or URL) or a crash; 2 bad input (a missing file, $OPENAI_API_KEY unset,
an output folder that cannot be written, the file holds records made with other settings, another
run writes the same file);
3 stopped by --max-requests / --max-tokens-budget (rerun to continue); 4 some images failed after
--max-retries (rerun to retry them); 130 interrupted by Ctrl-C (what finished is kept).

Full scale (OpenAI API, the images of every prepared subject):
  OPENAI_API_KEY=... python prepare_datasets/generate_conversation.py --dataset-root /data/brain \\
      --prompt-type conversation --backend openai --model gpt-3.5-turbo-0125 --concurrency 16
Tiny (offline, free, seconds):
  python prepare_datasets/generate_conversation.py --dataset-root demo_out/root \\
      --prompt-type detail_description --backend template --limit 8
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from llava_brain import cli
from llava_brain.errors import EXIT_BAD_INPUT, BadInputError, exits_on_bad_input
from llava_brain.instructions import (
    PROMPT_TYPES,
    PROMPTS_DIR,
    TEMPLATE_MODEL,
    ApiStats,
    Budget,
    ImageContext,
    Prompts,
    RequestSettings,
    RetryPolicy,
    captioned_images,
    load_contexts,
    load_prompts,
    make_record,
    prompt_files,
    request_conversation,
    template_conversation,
)
from llava_brain.io import JsonlStore, StageRun, fingerprint, require_writable
from llava_brain.layout import DatasetRoot
from llava_brain.subjects import ALL, images_of, resolve_prepared

log = logging.getLogger("generate_conversation")

API_KEY_ENV = "OPENAI_API_KEY"
EXIT_FATAL_API, EXIT_BUDGET, EXIT_FAILED, EXIT_INTERRUPTED = 1, 3, 4, 130
# API counts that add up over the runs that built one file (the manifest's "api_all_runs").
API_TOTALS = ("requests", "retries", "prompt_tokens", "completion_tokens", "estimated_cost_usd")


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, add_help=add_help, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # Data
    cli.add_dataset_root(
        p,
        "prepared dataset root; reads nsd/nsd_coco_captions.json (required), nsd_captions.json, "
        "nsd_instances.json, nsd_coco_instances.json (optional)",
    )
    p.add_argument("--prompt-type", choices=PROMPT_TYPES, required=True, help="which instruction data to generate")
    which = p.add_mutually_exclusive_group()
    cli.add_subject(
        p,
        default=None,
        group=which,
        help="the train+test images of these prepared subjects (nsd/fmris/subjXX/nsd_fmri2image.json), "
        "or 'all' = every prepared subject (default)",
    )
    which.add_argument(
        "--all-images", action="store_true", help="every image of nsd_coco_captions.json instead of --subject"
    )
    p.add_argument("--limit", type=int, default=None, help="only the first N selected images by nsdId (smoke runs)")
    # Generation
    p.add_argument("--backend", choices=["openai", "template"], default="openai", help="who writes the answers")
    p.add_argument("--model", default="gpt-3.5-turbo-0125", help="chat model of the openai backend (template: ignored)")
    p.add_argument("--base-url", default=None, help="OpenAI-compatible API root, e.g. http://host:8000/v1 "
                   "(default: the openai client's, i.e. $OPENAI_BASE_URL or api.openai.com)")  # fmt: skip
    p.add_argument(
        "--prompts-dir", type=Path, default=PROMPTS_DIR, help="folder of the system prompts and question lists"
    )
    p.add_argument("--seed", type=int, default=0, help="seeds question draws and templates (per image) and the API")
    # Requests
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight at once")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds one request may take before it is retried")
    p.add_argument("--max-retries", type=int, default=6, help="retries per image after its first request")
    p.add_argument("--backoff-base", type=float, default=1.0, help="seconds; retry k waits U(0, base * 2^k) "
                   "unless the server sends Retry-After")  # fmt: skip
    p.add_argument("--backoff-max", type=float, default=60.0, help="longest wait between retries, in seconds")
    # Budget
    p.add_argument("--max-requests", type=int, default=None, help="stop after sending N requests, retries "
                   "included (default: no cap); exit code 3")  # fmt: skip
    p.add_argument("--max-tokens-budget", type=int, default=None, help="send no request once N prompt+completion "
                   "tokens are used (in-flight ones may overshoot; default: no cap); exit code 3")  # fmt: skip
    p.add_argument("--price-per-1k-input", type=float, default=0.0005, help="USD per 1000 prompt tokens, for the "
                   "cost estimate (default: gpt-3.5-turbo-0125)")  # fmt: skip
    p.add_argument("--price-per-1k-output", type=float, default=0.0015, help="USD per 1000 completion tokens")
    # Output
    cli.add_overwrite(p, "discard the stored records and start over (needed when settings or prompts changed)")
    cli.add_quiet(p)
    return p


class Progress:
    """A log line every 10% of the images or every 30 s, whichever comes first."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.done = total, enabled, 0
        self.start = self.last = time.perf_counter()
        self.step_size = max(1, total // 10)

    def step(self) -> None:
        self.done += 1
        now = time.perf_counter()
        if self.enabled and (self.done % self.step_size == 0 or now - self.last > 30 or self.done == self.total):
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            log.info("%d/%d images (%.1f/s)", self.done, self.total, rate)


@contextlib.contextmanager
def exclusive(path: Path, lock: Path) -> Iterator[None]:
    """Hold `lock` so that two runs never append to the same file `path` (duplicates)."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BadInputError(path, "is being written by another run (its lock is held); wait for it") from None
        yield


def stored_ids(store: JsonlStore, prompt_type: str, backend: str, model: str) -> set[int]:
    """nsdIds already in the store; BadInputError if it holds other settings' records or an image twice."""
    done: set[int] = set()
    for record in store:
        found = (record.get("prompt_type"), record.get("backend"), record.get("model"))
        if found != (prompt_type, backend, model):
            raise BadInputError(
                store.path,
                f"holds records of prompt type/backend/model {found}, this run writes {(prompt_type, backend, model)}; "
                "pass --overwrite to start over",
            )
        if record.get("nsd_id") in done:
            raise BadInputError(store.path, f"holds nsdId {record['nsd_id']} twice; pass --overwrite to start over")
        done.add(record["nsd_id"])
    return done


async def run_openai(
    args,
    contexts: list[ImageContext],
    prompts: Prompts,
    store: JsonlStore,
    api_key: str,
    budget: Budget,
    progress: Progress,
) -> None:
    from openai import AsyncOpenAI  # imported here: the template backend needs no client

    policy = RetryPolicy(args.max_retries, args.backoff_base, args.backoff_max)
    settings = RequestSettings(args.model, args.prompt_type, args.timeout, args.seed, policy)
    # Retries are ours (backoff with jitter, Retry-After, malformed replies), so the client must not add its own.
    client = AsyncOpenAI(api_key=api_key, base_url=args.base_url, max_retries=0, timeout=args.timeout)
    pending = iter(contexts)

    async def worker() -> None:
        for ctx in pending:  # one iterator shared by the workers: each image is taken exactly once
            if budget.stopped:
                return
            turns = await request_conversation(client, ctx, prompts, settings, budget, api_key)
            if turns is not None:
                store.append(make_record(ctx.nsd_id, args.prompt_type, turns, "openai", args.model))
                progress.step()

    try:
        await asyncio.gather(*(worker() for _ in range(min(args.concurrency, len(contexts)))))
    finally:
        await client.close()


def run_template(args, contexts: list[ImageContext], prompts: Prompts, store: JsonlStore, progress: Progress) -> None:
    for ctx in contexts:
        turns = template_conversation(ctx, args.prompt_type, args.seed, prompts.detail_questions)
        store.append(make_record(ctx.nsd_id, args.prompt_type, turns, "template", TEMPLATE_MODEL))
        progress.step()


def log_api_summary(args, stats: ApiStats, seconds: float) -> dict:
    cost = stats.cost(args.price_per_1k_input, args.price_per_1k_output)
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(stats.retry_reasons.items())) or "none"
    log.info(
        "API: %d requests in %.1f s (%.1f/s), %d retries (causes: %s), %d images failed; tokens: %d prompt + %d "
        "completion; estimated cost $%.4f (at $%g / $%g per 1k input / output tokens)",
        stats.requests, seconds, stats.requests / max(seconds, 1e-9), stats.retries, reasons, len(stats.failures),
        stats.prompt_tokens, stats.completion_tokens, cost, args.price_per_1k_input, args.price_per_1k_output,
    )  # fmt: skip
    for nsd_id, error in stats.failures[:5]:
        log.warning("failed nsdId %d: %s", nsd_id, error)
    return {
        "requests": stats.requests,
        "retries": stats.retries,
        "retry_causes": dict(stats.retry_reasons),
        "failed_nsd_ids": sorted(i for i, _ in stats.failures),
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.completion_tokens,
        "estimated_cost_usd": round(cost, 6),
    }


def add_api(before: object, now: dict | None) -> dict | None:
    """API counts summed over the runs that built one file (`before`: the previous manifest's)."""
    if now is None:
        return before if isinstance(before, dict) else None
    before = before if isinstance(before, dict) else {}
    return {k: round(before.get(k, 0) + now[k], 6) if isinstance(now[k], float) else before.get(k, 0) + now[k]
            for k in API_TOTALS}  # fmt: skip


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Sanity checks of the flags, in one place (parser.error exits with 2 and the usage)."""
    positive = {"--concurrency": args.concurrency, "--timeout": args.timeout, "--limit": args.limit,
                "--max-requests": args.max_requests, "--max-tokens-budget": args.max_tokens_budget}  # fmt: skip
    for flag, value in positive.items():
        if value is not None and value <= 0:
            parser.error(f"{flag} must be > 0, got {value}")
    non_negative = {"--max-retries": args.max_retries, "--backoff-base": args.backoff_base,
                    "--backoff-max": args.backoff_max, "--price-per-1k-input": args.price_per_1k_input,
                    "--price-per-1k-output": args.price_per_1k_output}  # fmt: skip
    for flag, value in non_negative.items():
        if value < 0:
            parser.error(f"{flag} must be >= 0, got {value}")


def select_images(layout: DatasetRoot, args: argparse.Namespace) -> list[int]:
    """Sorted nsdIds of the run: every captioned image, or the train+test images of the subjects."""
    if args.all_images:
        nsd_ids = captioned_images(layout)
    else:
        args.subject = args.subject or resolve_prepared(layout, [ALL])  # resolved: the manifest says which
        nsd_ids = images_of(layout, args.subject)
    return nsd_ids[: args.limit] if args.limit else nsd_ids


@exits_on_bad_input
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = cli.parse_args(parser, argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # The HTTP stack logs every request at INFO (httpx, or httpx2 in newer openai releases).
    for noisy in ("httpx", "httpx2", "httpcore", "httpcore2", "openai"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    check_args(parser, args)
    api_key = None
    if args.backend == "openai":
        api_key = os.environ.get(API_KEY_ENV, "").strip()
        if not api_key:
            print(f"error: ${API_KEY_ENV} is not set; export it (or use --backend template)", file=sys.stderr)
            return EXIT_BAD_INPUT

    layout = DatasetRoot(args.dataset_root)
    output = layout.gpt_conversation(args.prompt_type)
    require_writable(output, "dataset root")
    nsd_ids = select_images(layout, args)
    prompts = load_prompts(args.prompt_type, args.prompts_dir)
    model = args.model if args.backend == "openai" else TEMPLATE_MODEL
    # What shapes a record; the run's selection does not (records are per image, and a rerun may add images).
    settings = {"prompt_type": args.prompt_type, "backend": args.backend, "model": model, "seed": args.seed}
    run = StageRun(output, settings=settings, inputs=prompt_files(args.prompt_type, args.prompts_dir))

    with exclusive(output, layout.gpt_conversation_lock(args.prompt_type)):
        if args.overwrite:
            # Both go before any new record, so that a kill never leaves old provenance over new records.
            run.begin()
            output.unlink(missing_ok=True)
        store = JsonlStore(output)  # also removes what a compaction killed mid-write left
        if store.dropped_torn_line:
            log.info("dropped the torn last line of %s (a killed run)", output)
        done = stored_ids(store, args.prompt_type, args.backend, model)
        previous = run.previous()
        if not run.needed(complete=set(nsd_ids) <= done):
            log.info("%s holds all %d selected images (same settings and prompts); nothing to do", output,
                     len(nsd_ids))  # fmt: skip
            return 0
        todo = [i for i in nsd_ids if i not in done]
        contexts, sources = load_contexts(layout, todo)
        log.info("%s, backend %s (%s): %d images selected, %d already in %s, %d to do",
                 args.prompt_type, args.backend, model, len(nsd_ids), len(nsd_ids) - len(todo), output,
                 len(todo))  # fmt: skip
        progress = Progress(len(contexts), not args.quiet)
        budget = Budget(ApiStats(), args.max_requests, args.max_tokens_budget) if args.backend == "openai" else None
        start, interrupted = time.perf_counter(), False
        try:
            if budget is not None and contexts:
                asyncio.run(run_openai(args, contexts, prompts, store, api_key, budget, progress))
            elif contexts:
                run_template(args, contexts, prompts, store, progress)
        except KeyboardInterrupt:
            interrupted = True  # requests in flight are abandoned; what finished is kept for the rerun
        finally:
            store.compact(key=lambda record: record["nsd_id"])  # sorted: independent of completion order
        seconds = time.perf_counter() - start
        api = log_api_summary(args, budget.stats, seconds) if budget else None
        missing = sorted(set(nsd_ids) - {r["nsd_id"] for r in store})
        stop_reason = "interrupted" if interrupted else budget.stop_reason if budget else None
        run.finish(
            args,
            subjects=None if args.all_images else args.subject,
            context_files={str(p.relative_to(layout.root)): fingerprint(p) for p in sources.used()},
            selected_images=len(nsd_ids),
            written_images=progress.done,
            missing_images=len(missing),
            stop_reason=stop_reason,
            api=api,
            api_all_runs=add_api((previous or {}).get("api_all_runs"), api),
        )

    log.info("wrote %d records in %.1f s; %s holds %d of the %d selected images", progress.done, seconds, output,
             len(nsd_ids) - len(missing), len(nsd_ids))  # fmt: skip
    if interrupted:
        log.warning("interrupted; %d images left undone (rerun to continue)", len(missing))
        return EXIT_INTERRUPTED
    if budget and budget.stop_reason:
        code = EXIT_FATAL_API if budget.fatal else EXIT_BUDGET
        action = "fix it and rerun" if budget.fatal else "rerun to continue"
        log.warning("stopped early: %s; %d images left undone (%s)", budget.stop_reason, len(missing), action)
        return code
    if missing:
        log.warning("%d images failed after --max-retries %d; rerun to retry them", len(missing), args.max_retries)
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
