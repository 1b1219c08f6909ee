"""Talk to a brain recording in the browser: a gradio page over Brain-LLaVA, the ViT3D and the Stable unCLIP decoder.

Pick a subject and one of their test images (or a random one). The page shows the stimulus the subject saw
(ground truth, hideable for a blind guess), the low-level reconstruction (the predicted VAE latent through the
decoder's VAE), Brain-LLaVA's brief caption and the unCLIP reconstruction from the predicted CLIP and VAE
embeddings with that caption as the prompt (the settings of `embeds2images.py --decoder unclip`, same seed per
image, so the same picture). A chat panel holds a streamed multi-turn conversation about the sample, with the
paper's instruction presets; a concept box draws a concept's Grad-CAM map (locate_concepts.py's method) as
axial slices. Picking another sample starts the conversation over. Each browser tab has its own conversation;
the queue runs one call at a time per model (LLM, decoder, ViT3D), so a reconstruction never holds up a chat.

Every model loads once, before the server starts; a missing or wrong folder stops it with one line (exit 2).
The server binds --host 127.0.0.1 (this machine only) unless told otherwise; --share asks gradio for a public
link (it needs internet access). API (gradio_client): /pick, /describe, /reconstruct, /chat, /locate.

Full scale (one GPU; the models of the README's recipe):
  python tools/web_demo.py --model /data/brain/runs/brain_llava/stage2/final \\
      --vision-tower /data/brain/runs/vit3d --decoder stabilityai/stable-diffusion-2-1-unclip-small \\
      --clip-text openai/clip-vit-large-patch14 --dataset-root /data/brain --device cuda --precision fp16 --steps 50
Tiny (after `make demo`; what `make web` runs):
  python tools/web_demo.py --demo-dir demo_out --steps 8
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from llava_brain import cli
from llava_brain.errors import exits_on_bad_input
from llava_brain.train.accel import DTYPES

# Brain-LLaVA's tasks whose answers can be the decoder's prompt (generation.task_question's names).
PROMPT_TASKS = ("brief_description", "detail_description", "instruction_reconstruction")

# The demo's outputs (scripts/demo.sh), relative to --demo-dir: the defaults of the model flags.
DEMO_FOLDERS = {
    "model": "root/runs/brain_llava/stage2/final",
    "vision_tower": "root/runs/vit3d",
    "decoder": "tiny_models/unclip",
    "clip_text": "tiny_models/clip_text",
    "dataset_root": "root",
}


def build_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, add_help=add_help,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--demo-dir", type=Path, default=Path("demo_out"),
                   help="make demo's output folder: the default of every folder below (default demo_out)")  # fmt: skip
    p.add_argument("--model", type=Path, default=None,
                   help="Brain-LLaVA folder (llava_brain.train's --output_dir/final; default "
                   f"<demo-dir>/{DEMO_FOLDERS['model']})")  # fmt: skip
    p.add_argument("--vision-tower", type=Path, default=None,
                   help="pretrain_vit3d.py --out folder whose CLIP and VAE heads give the decoder's inputs and the "
                   f"concept maps (default <demo-dir>/{DEMO_FOLDERS['vision_tower']})")  # fmt: skip
    p.add_argument("--decoder", default=None,
                   help="StableUnCLIPImg2ImgPipeline folder or hub id (full scale: stabilityai/"
                   f"stable-diffusion-2-1-unclip-small; default <demo-dir>/{DEMO_FOLDERS['decoder']})")  # fmt: skip
    p.add_argument("--clip-text", default=None,
                   help="CLIPTextModelWithProjection folder or hub id of the CLIP the ViT3D predicts (the concept "
                   "embeddings; full scale openai/clip-vit-large-patch14; default "
                   f"<demo-dir>/{DEMO_FOLDERS['clip_text']})")  # fmt: skip
    p.add_argument("--dataset-root", type=Path, default=None,
                   help=f"prepared dataset root (default <demo-dir>/{DEMO_FOLDERS['dataset_root']})")  # fmt: skip
    decoder = p.add_argument_group("reconstruction (as embeds2images.py --decoder unclip)")
    cli.add_unclip_settings(decoder)
    decoder.add_argument("--prompt-task", default="brief_description", choices=PROMPT_TASKS,
                         help="Brain-LLaVA's task whose answer is shown as the caption and used as the decoder's "
                         "prompt (default brief_description; the paper's: instruction_reconstruction)")  # fmt: skip
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens per answer at most (default 128)")
    p.add_argument("--seed", type=int, default=0, help="seed of the reconstructions' noise (default 0)")
    cli.add_device(p)
    cli.add_precision(p, help="weights' precision (fp16/bf16 on GPUs; default fp32)")
    server = p.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0: all)")  # fmt: skip
    server.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    server.add_argument("--share", action="store_true", help="also open a public gradio.live link (needs internet)")
    cli.add_quiet(p)
    return p


def demo_paths(args: argparse.Namespace):
    """The DemoPaths of the flags, each unset one under --demo-dir."""
    from llava_brain.web.backend import DemoPaths

    def folder(name: str):
        given = getattr(args, name)
        return given if given is not None else args.demo_dir / DEMO_FOLDERS[name]

    return DemoPaths(model=Path(folder("model")), vision_tower=Path(folder("vision_tower")),
                     decoder=str(folder("decoder")), clip_text=str(folder("clip_text")),
                     dataset_root=Path(folder("dataset_root")))  # fmt: skip


def load_backend(args: argparse.Namespace):
    """Load the models once; DemoBackend checks every folder first (one line on the first bad one)."""
    from llava_brain.web.backend import DemoBackend

    paths = demo_paths(args)
    if args.quiet:
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()
    settings = cli.unclip_settings(args)

    def report(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr)

    return DemoBackend(paths, device=cli.resolve_device(args.device), dtype=DTYPES[args.precision],
                       settings=settings, prompt_task=args.prompt_task, max_new_tokens=args.max_new_tokens,
                       seed=args.seed, progress=report)  # fmt: skip


def launch(args: argparse.Namespace, backend, *, block: bool = True):
    """Start the server; returns (page, local URL). block=False returns at once (tests), the server runs on in
    a thread until `page.close()`."""
    from llava_brain.web.app import CSS, build_app, theme

    page = build_app(backend)
    page.queue(default_concurrency_limit=1)
    _, url, share_url = page.launch(server_name=args.host, server_port=args.port, share=args.share,
                                    prevent_thread_lock=True, ssr_mode=False, theme=theme(), css=CSS,
                                    show_error=True, quiet=True)  # fmt: skip
    if block or not args.quiet:
        print(f"serving on {url}" + (f" and {share_url}" if share_url else "") + " (Ctrl+C stops it)",
              file=sys.stderr)  # fmt: skip
    if block:
        page.block_thread()  # until Ctrl+C, which closes the server
    return page, url


@exits_on_bad_input
def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no usage reports from an offline machine
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 < args.port < 65536:
        parser.error(f"--port must be in 1..65535, got {args.port}")
    try:
        cli.unclip_settings(args).check()
    except ValueError as err:
        parser.error(str(err))
    launch(args, load_backend(args), block=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
