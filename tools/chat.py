"""Chat with a Brain-LLaVA about one fMRI sample: multi-turn, answers streamed token by token as generated.

The sample (--sample subj01/te/12: one trial; subj01/te/3+9+12: the average of those rows) is read from
--dataset-root and given to the model as the image of the first user turn; later turns are text. Type a
question at the `USER:` prompt, or a command:
  /reset        start the conversation over (same sample)
  /sample REF   talk about another sample (starts over)
  /save FILE    write the transcript as JSON ({"model", "sample", "turns": [{"role", "text"}]}, atomically)
  /quit         leave (so does end of input)
--questions FILE runs the lines of FILE (questions and commands, blank lines skipped) without a prompt and prints
the transcript. Greedy by default; --do-sample with --temperature / --top-p draws with --seed.

Full scale:
  python tools/chat.py --model /data/brain/runs/brain_llava/stage2/final --dataset-root /data/brain \\
      --sample subj01/te/3+9+12 --precision bf16
Tiny (demo root):
  python tools/chat.py --model demo_out/root/runs/brain_llava/stage2/final --dataset-root demo_out/root \\
      --sample subj01/te/12
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import TextStreamer
from transformers.utils import logging as transformers_logging

from llava_brain import cli
from llava_brain.errors import BadInputError, exits_on_bad_input
from llava_brain.evaluation import generation as gen
from llava_brain.io import write_json
from llava_brain.model.brain_llava import load_brain_llava

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
COMMANDS = ("/reset", "/sample", "/save", "/quit")


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__, add_help=add_help, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", type=Path, required=True, help="a Brain-LLaVA folder (llava_brain.train's output)")
    cli.add_dataset_root(p, "prepared dataset root (fmris/subjXX/whole/nsd_betas_<split>.npy)")
    p.add_argument("--sample", required=True, help="the fMRI sample: subjXX/<tr|te>/<row>[+<row>...]")
    p.add_argument(
        "--questions",
        type=Path,
        default=None,
        help="run these lines (questions and /commands) non-interactively and print the transcript",
    )
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens per answer at most (default 128)")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0: all tokens)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled answers (default 0)")
    cli.add_device(p)
    cli.add_precision(p, help="weights' precision (fp16/bf16 on GPUs; default fp32)")
    return p


def run_line(session: gen.ChatSession, line: str, model_dir: Path, streamer) -> bool:
    """Handle one input line (a question or a command); False when the chat should end."""
    command, _, rest = line.partition(" ")
    rest = rest.strip()
    if command == "/quit":
        return False
    if command == "/reset":
        session.reset()
        print("(conversation reset)")
    elif command == "/sample":
        try:
            session.set_sample(rest)
            print(f"(now talking about {session.sample})")
        except (ValueError, BadInputError) as err:
            print(f"error: {err}", file=sys.stderr)
    elif command == "/save":
        if not rest:
            print("error: /save needs a file name", file=sys.stderr)
        else:
            write_json(Path(rest), {"model": str(model_dir), **session.transcript()})
            print(f"(transcript saved to {rest})")
    elif command.startswith("/"):
        print(f"error: unknown command {command}; commands: {' '.join(COMMANDS)}", file=sys.stderr)
    else:
        print("ASSISTANT: ", end="", flush=True)
        session.ask(line, streamer=streamer)  # the streamer prints the tokens and the final newline
    return True


def lines_of(args) -> list[str] | None:
    if args.questions is None:
        return None
    if not args.questions.is_file():
        raise BadInputError(args.questions, "missing; expected a text file, one question or /command a line")
    return [line.strip() for line in args.questions.read_text(encoding="utf-8").splitlines() if line.strip()]


@exits_on_bad_input
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = cli.parse_args(parser, argv)
    try:
        kwargs = gen.generation_kwargs(args.max_new_tokens, args.do_sample, args.temperature, args.top_p)
    except ValueError as err:
        parser.exit(2, f"error: {err}\n")
    scripted = lines_of(args)
    # The terminal holds the conversation: no weight-loading bars in it (and an error stays one line).
    transformers_logging.disable_progress_bar()
    model, processor = load_brain_llava(args.model, torch_dtype=DTYPES[args.precision],
                                        device=cli.resolve_device(args.device))  # fmt: skip
    try:
        session = gen.ChatSession(model, processor, args.sample, args.dataset_root, seed=args.seed, **kwargs)
    except ValueError as err:
        parser.exit(2, f"error: --sample: {err}\n")
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    print(f"(talking about {session.sample}; commands: {' '.join(COMMANDS)})")
    model_dir = args.model.resolve()
    if scripted is not None:
        for line in scripted:
            print(f"USER: {line}")
            if not run_line(session, line, model_dir, streamer):
                break
        return 0
    while True:
        try:
            line = input("USER: ").strip()
        except EOFError:
            print()
            break
        if line and not run_line(session, line, model_dir, streamer):
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
