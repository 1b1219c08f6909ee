"""The web demo's page (gradio Blocks): components wired to `DemoBackend`, nothing computed here.

Layout: subject and sample pickers (and a random pick), the stimulus (ground truth, hideable for a blind guess),
the low-level and the unCLIP reconstruction, the brief caption; a chat about the sample with Brain-LLaVA
(streamed, multi-turn, the paper's instruction presets); a concept box that draws the concept's map.

Each browser tab is its own gradio session: the conversation lives in a `gr.State` (the model-format messages of
`ChatSession`), so two tabs never share a history. Picking another sample empties it. Events queue per model
(`concurrency_id` "llm", "decoder", "vit3d", one call at a time each), so a reconstruction running for one tab
does not hold up another tab's chat. API names (gradio_client): /pick, /describe, /reconstruct, /chat, /locate.
"""

from __future__ import annotations

import gradio as gr

from llava_brain.web.backend import PRESETS, DemoBackend, preset_question

TITLE = "Brain-LLaVA: talk to a brain recording"
IMAGE_HEIGHT = 320  # pixels on the page; the tiny models' 64-pixel images are scaled up (CSS below), pixelated
CSS = """
#stimulus img, #lowlevel img, #recon img { width: 100%; height: 100%; object-fit: contain; }
#lowlevel img, #recon img { image-rendering: pixelated; }
"""
INTRO = (
    "Pick a subject and one of their test images. The model never sees the image: it reads the fMRI recorded "
    "while the subject looked at it (the repeat-averaged trials). The stimulus is shown as ground truth; hide it "
    "to guess blind."
)


def build_app(backend: DemoBackend) -> gr.Blocks:
    subjects = backend.subjects()
    first = backend.sample_choices(subjects[0])

    def pick(reference: str):
        """New sample: stimulus and low-level image; the conversation starts over."""
        return backend.stimulus(reference), backend.low_level(reference), [], []

    def describe(reference: str) -> str:
        return backend.caption(reference)

    # gradio injects the progress tracker through this default (its documented way)
    def reconstruct(reference: str, caption: str, progress=gr.Progress()):  # noqa: B008
        progress(0, desc="denoising")
        return backend.reconstruct(reference, caption, on_step=lambda k, n: progress(k / n, desc="denoising"))

    def chat(reference: str, question: str, messages: list, shown: list):
        question = question.strip()
        if not question:
            raise gr.Error("type a question first")
        shown = [*shown, {"role": "user", "content": question}, {"role": "assistant", "content": ""}]
        for answer, new_messages in backend.chat(reference, messages, question):
            shown[-1] = {"role": "assistant", "content": answer}
            yield "", new_messages, shown

    def locate(reference: str, concept: str):
        try:
            image, summary = backend.concept_map(reference, concept)
        except ValueError as err:
            raise gr.Error(str(err)) from err
        shares = sorted(summary["roi_share"].items(), key=lambda kv: -kv[1])
        rows = "\n".join(f"| {roi} | {share:.0%} |" for roi, share in shares)
        text = (f"CLIP similarity of the prediction with *{concept.strip()}*: {summary['score']:.3f}\n\n"
                f"| ROI (streams) | share of the map |\n|---|---|\n{rows}")  # fmt: skip
        return image, text

    def first_sample(subject_label: str):
        choices = backend.sample_choices(subject_label)
        return gr.update(choices=choices, value=choices[0][1])

    def use_preset(label: str, concept: str) -> str:
        try:
            return preset_question(label, concept)
        except ValueError as err:
            raise gr.Error(f"{err} (type it in the concept box)") from err

    with gr.Blocks(title=TITLE, analytics_enabled=False) as page:
        gr.Markdown(f"# {TITLE}\n{INTRO}")
        messages = gr.State([])  # the ChatSession messages of this tab's conversation
        with gr.Row():
            subject = gr.Dropdown(subjects, value=subjects[0], label="Subject", elem_id="subject")
            sample = gr.Dropdown(first, value=first[0][1], label="Test sample", elem_id="sample")
            shuffle = gr.Button("Random sample", elem_id="random")
            hide = gr.Checkbox(False, label="Hide the stimulus (blind guess)", elem_id="hide")
        with gr.Row():
            stimulus = gr.Image(label="Ground truth: the image the subject saw", type="pil", format="png",
                                elem_id="stimulus", height=IMAGE_HEIGHT, interactive=False)  # fmt: skip
            low = gr.Image(label="Low-level reconstruction (predicted VAE)", elem_id="lowlevel",
                           height=IMAGE_HEIGHT, format="png", interactive=False)  # fmt: skip
            recon = gr.Image(label="unCLIP (predicted CLIP + VAE, caption)", elem_id="recon",
                             height=IMAGE_HEIGHT, format="png", interactive=False)  # fmt: skip
        caption = gr.Textbox(label="Brain-LLaVA's caption (the decoder's prompt)", interactive=False,
                             elem_id="caption")  # fmt: skip
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Chat about this recording", elem_id="chatbot", height=360)
                with gr.Row():
                    question = gr.Textbox(placeholder="Ask about what the subject saw", show_label=False,
                                          elem_id="question", scale=4)  # fmt: skip
                    send = gr.Button("Send", variant="primary", elem_id="send", scale=1)
                with gr.Row():
                    preset = gr.Dropdown(list(PRESETS), value=next(iter(PRESETS)), label="Instruction preset",
                                         elem_id="preset")  # fmt: skip
                    fill = gr.Button("Use preset", elem_id="use-preset")
            with gr.Column(scale=2):
                concept = gr.Textbox(label="Concept to locate", placeholder="e.g. red", elem_id="concept")
                locate_button = gr.Button("Locate in the brain", elem_id="locate")
                concept_image = gr.Image(label="Concept map (axial slices over the mean volume)",
                                         elem_id="concept-map", format="png", interactive=False)  # fmt: skip
                concept_text = gr.Markdown(elem_id="concept-summary")

        chat_inputs, chat_outputs = [sample, question, messages, chatbot], [question, messages, chatbot]
        picked = sample.change(pick, sample, [stimulus, low, chatbot, messages], api_name="pick",
                               concurrency_id="vit3d")  # fmt: skip
        described = picked.then(describe, sample, caption, api_name="describe", concurrency_id="llm")
        described.then(reconstruct, [sample, caption], recon, api_name="reconstruct", concurrency_id="decoder")
        subject.change(first_sample, subject, sample, api_visibility="private")
        shuffle.click(backend.random_sample, subject, sample, api_visibility="private")
        hide.change(lambda hidden: gr.update(visible=not hidden), hide, stimulus, api_visibility="private")
        send.click(chat, chat_inputs, chat_outputs, api_name="chat", concurrency_id="llm")
        question.submit(chat, chat_inputs, chat_outputs, api_visibility="private", concurrency_id="llm")
        chatbot.clear(lambda: [], None, messages, api_visibility="private")  # the chatbot's own Clear button
        fill.click(use_preset, [preset, concept], question, api_visibility="private")
        locate_button.click(locate, [sample, concept], [concept_image, concept_text], api_name="locate",
                            concurrency_id="vit3d")  # fmt: skip
        opened = page.load(pick, sample, [stimulus, low, chatbot, messages], api_visibility="private",
                           concurrency_id="vit3d")  # fmt: skip
        opened.then(describe, sample, caption, api_visibility="private", concurrency_id="llm").then(
            reconstruct, [sample, caption], recon, api_visibility="private", concurrency_id="decoder"
        )
    return page


def theme() -> gr.themes.Base:
    """gradio's default look with the system's fonts: the default theme fetches Google Fonts, which an offline
    machine (or a cluster node) cannot reach."""
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "monospace"])  # fmt: skip


__all__ = ["build_app", "theme"]
