"""Text generation with a Brain-LLaVA: the question of each task, batched greedy / sampled decoding, controls.

Tasks and their questions (the SFT data's prompts, so the model is asked what it was trained on; one fixed prompt
per task, `prompt_index` picks which, default the first):
- brief_description: `data/instructions/brief_description.txt` (the paper's 14 prompts, Tab. 3);
- detail_description: `data/prompts/detail_description_questions.txt` (LLaVA's detailed-description questions);
- complex_reasoning: the SFT questions are written per image by GPT, so a fixed generic question stands in
  (`COMPLEX_REASONING_QUESTIONS`);
- instruction_reconstruction: "Provide the corresponding Stable Diffusion prompts for the image." (Tab. 5);
- concept_localization: `Locating the concept of "<concept>"` (Tab. 6) with a concept the caller names.

Each question becomes the first user turn `[image part, text]` of the model's chat template, with the generation
prompt. Batches are left-padded (`padding_side="left"`) so every row's last prompt token sits at the same position
and `model.generate` (KV cache on) continues each row as it would alone. Sampling is seeded per batch
(`batch_seed`), so a resumed run draws what an uninterrupted one drew.

Shuffled-fMRI control (`shuffled_pairing`): every question keeps its sample id but is asked about the fMRI of
another test image of the same subject, a seeded derangement (`controls.derangement`): no sample keeps its own.
Its seed is offset (`SHUFFLE_FMRI_SEED_OFFSET`) so that it is not the derangement eval_captions.py draws for its
shuffled references with the same seed: that one would pair each shuffled answer with the very image whose fMRI
it read, and the control's own shuffled row would score like real fMRI.

`ChatSession`: a multi-turn conversation about one sample (tools/chat.py), the fMRI in the first user turn only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from llava_brain.evaluation.controls import derangement
from llava_brain.sft import CONCEPT_FIELD, INSTRUCTIONS_DIR, read_instructions
from llava_brain.subjects import Sample

TASKS = ("brief_description", "detail_description", "complex_reasoning", "instruction_reconstruction",
         "concept_localization")  # fmt: skip
DEFAULT_TASK = "brief_description"
PROMPTS_DIR = INSTRUCTIONS_DIR.parent / "prompts"
COMPLEX_REASONING_QUESTIONS = (
    "What is happening in this image, and what might happen next?",
    "What can you infer about the time, place or occasion of this scene?",
)
_PROMPT_FILES = {
    "brief_description": INSTRUCTIONS_DIR / "brief_description.txt",
    "detail_description": PROMPTS_DIR / "detail_description_questions.txt",
    "instruction_reconstruction": INSTRUCTIONS_DIR / "instruction_reconstruction.txt",
    "concept_localization": INSTRUCTIONS_DIR / "concept_localization.txt",
}


def task_prompts(task: str) -> list[str]:
    """Every question of `task` (its prompt list, in file order)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if task == "complex_reasoning":
        return list(COMPLEX_REASONING_QUESTIONS)
    return read_instructions(_PROMPT_FILES[task])


def task_question(task: str, prompt_index: int = 0, concept: str | None = None) -> str:
    """The question asked for `task`: its `prompt_index`-th prompt; concept_localization fills in `concept`."""
    prompts = task_prompts(task)
    if not 0 <= prompt_index < len(prompts):
        raise ValueError(f"task {task} has {len(prompts)} prompts; prompt index {prompt_index} does not exist")
    question = prompts[prompt_index]
    if CONCEPT_FIELD in question:
        if not concept:
            raise ValueError(f"task {task} needs a concept (the object to locate)")
        question = question.replace(CONCEPT_FIELD, concept)
    return question


def first_turn(question: str, sample=None) -> dict:
    """The first user message: the fMRI (an image part; `sample` names it for apply_chat_template) + the question."""
    image = {"type": "image"} if sample is None else {"type": "image", "image": _reference(sample)}
    return {"role": "user", "content": [image, {"type": "text", "text": question}]}


def chat_prompt(processor, question: str) -> str:
    """The prompt text of one question about one fMRI sample, ending with the assistant's generation prompt."""
    return processor.apply_chat_template([first_turn(question)], add_generation_prompt=True)


def _reference(sample) -> str:
    return sample.reference if isinstance(sample, Sample) else str(sample)


SHUFFLE_FMRI_SEED_OFFSET = 7919  # keeps --shuffle-fmri's derangement apart from eval_captions.py's (seed 0, 1, ...)


def shuffled_pairing(samples: Sequence, seed: int = 0) -> list:
    """`samples` re-paired by a seeded derangement: entry i is the fMRI asked about in place of samples[i]."""
    perm = derangement(len(samples), SHUFFLE_FMRI_SEED_OFFSET + int(seed))
    return [samples[int(j)] for j in perm]


def batch_seed(seed: int, batch: int) -> int:
    """The torch seed of batch number `batch` (sampling stays reproducible batch by batch, so across resumes)."""
    return (int(seed) * 1_000_003 + int(batch)) % (2**63)


def generation_kwargs(max_new_tokens: int, do_sample: bool, temperature: float = 1.0, top_p: float = 1.0) -> dict:
    """`model.generate` settings: greedy, or sampling at `temperature` with nucleus `top_p`; KV cache on."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    kwargs = {"max_new_tokens": int(max_new_tokens), "do_sample": bool(do_sample), "use_cache": True}
    if do_sample:
        if temperature <= 0 or not 0 < top_p <= 1:
            raise ValueError(f"sampling needs temperature > 0 and 0 < top_p <= 1; got {temperature}, {top_p}")
        kwargs.update(temperature=float(temperature), top_p=float(top_p))
    else:  # the model's generation config may carry sampling defaults: greedy ignores them explicitly
        kwargs.update(temperature=None, top_p=None, top_k=None)
    return kwargs


def generate_texts(model, processor, prompts: Sequence[str], fmri: Sequence, dataset_root: str | Path, *,
                   seed: int | None = None, **generate_kwargs) -> list[str]:  # fmt: skip
    """Generated answers (decoded, special tokens dropped, stripped) for one batch.

    prompts: chat-template texts, one `<image>` each; fmri: the sample references (or Samples) those images are,
    in the same order; seed: torch seed set for this batch (sampling), the caller's RNG left as it was.
    generate_kwargs: `generation_kwargs(...)`.
    """
    inputs = processor(text=list(prompts), samples=list(fmri), dataset_root=dataset_root, padding=True,
                       padding_side="left", return_tensors="pt")  # fmt: skip
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    inputs = {k: v.to(device) for k, v in inputs.items()}
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        if seed is not None:
            torch.manual_seed(seed)
        ids = model.generate(**inputs, **generate_kwargs)
    new = ids[:, inputs["input_ids"].shape[1] :]
    return [text.strip() for text in processor.batch_decode(new, skip_special_tokens=True)]


def append_batch(store, record: dict) -> None:
    """Append one finished batch to a resumable store (`llava_brain.io.JsonlStore`); a named step, so a test can
    kill a run at a chosen batch."""
    store.append(record)


class ChatSession:
    """A multi-turn conversation about one fMRI sample: the sample is an image part of the first user turn only,
    later turns are text; each answer is generated over the whole conversation so far (greedy by default).

    model, processor: a Brain-LLaVA (`load_brain_llava`); sample: a reference (`subj01/te/12`) read from
    dataset_root; generate_kwargs: `generation_kwargs(...)`; seed: torch seed of each answer when sampling (answer
    number k draws with `batch_seed(seed, k)`, so a transcript is reproducible).
    """

    def __init__(self, model, processor, sample: str, dataset_root: str | Path, *, seed: int = 0,
                 **generate_kwargs):  # fmt: skip
        self.model, self.processor, self.dataset_root = model, processor, dataset_root
        self.seed, self.generate_kwargs = seed, generate_kwargs or generation_kwargs(64, False)
        self.messages: list[dict] = []
        self.set_sample(sample)

    def set_sample(self, sample: str) -> None:
        """Talk about another sample (the conversation starts over). A bad reference raises (ValueError for a
        malformed one, BadInputError for a row or file the root does not have) and leaves the session as it was."""
        reference = _reference(sample)
        self.processor.prepare_volumes([reference], self.dataset_root)  # checks it before anything changes
        self.sample = reference
        self.reset()

    def reset(self) -> None:
        self.messages = []

    def prompt(self, question: str) -> str:
        """The chat-template text of the conversation plus `question`, ending with the generation prompt."""
        if not self.messages:
            turn = first_turn(question, self.sample)
        else:
            turn = {"role": "user", "content": [{"type": "text", "text": question}]}
        return self.processor.apply_chat_template([*self.messages, turn], add_generation_prompt=True)

    def ask(self, question: str, streamer=None) -> str:
        """The answer to `question` (also streamed to `streamer`, a transformers TextStreamer, as generated)."""
        text = self.prompt(question)
        extra = {} if streamer is None else {"streamer": streamer}
        seed = batch_seed(self.seed, len(self.messages) // 2)
        answer = generate_texts(self.model, self.processor, [text], [self.sample], self.dataset_root, seed=seed,
                                **self.generate_kwargs, **extra)[0]  # fmt: skip
        if not self.messages:
            self.messages.append(first_turn(question, self.sample))
        else:
            self.messages.append({"role": "user", "content": [{"type": "text", "text": question}]})
        self.messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return answer

    def transcript(self) -> dict:
        """{"sample", "turns": [{"role", "text"}]}: the conversation as plain JSON."""
        turns = [{"role": m["role"], "text": next(p["text"] for p in m["content"] if p["type"] == "text")}
                 for m in self.messages]  # fmt: skip
        return {"sample": self.sample, "turns": turns}


def stream_answer(session: ChatSession, question: str, timeout: float | None = 600.0):
    """Yield (answer so far, messages) while `session` answers `question`; the last item is ask()'s finished
    answer with the session's messages (the turn appended). Generation runs in a worker thread that feeds a
    transformers TextIteratorStreamer; an error in it is raised here, after the stream ends. `timeout`: seconds
    to wait for the next piece of text before giving up (queue.Empty)."""
    import threading

    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(session.processor.tokenizer, skip_prompt=True, skip_special_tokens=True,
                                    timeout=timeout)  # fmt: skip
    result: dict = {}

    def work() -> None:
        try:
            result["answer"] = session.ask(question, streamer=streamer)
        except BaseException as err:  # handed to the caller's thread below
            result["error"] = err
            streamer.end()  # the consumer's loop ends instead of waiting for text that never comes

    worker = threading.Thread(target=work, name="brain-llava-answer", daemon=True)
    worker.start()
    text = ""
    for piece in streamer:
        text += piece
        yield text, list(session.messages)
    worker.join()
    if "error" in result:
        raise result["error"]
    yield result["answer"], list(session.messages)
