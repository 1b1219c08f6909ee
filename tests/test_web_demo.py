"""tools/web_demo.py on mini_chain's models (the demo's chain, small): the server started on a free loopback port
and driven through its API with gradio_client (the streamed answers equal tools/chat.py's greedy answers, the
reconstruction is the decoder's), then in headless Chromium through Playwright (a sample picked, a message sent,
the answer and the images seen, a screenshot saved), and two browser contexts whose histories stay apart.

The browser tests need Debian's `chromium` (.ci/run installs it); where it is absent they are skipped, saying so.
WEB_DEMO_SCREENSHOT=<file.png> also copies the screenshot there (how docs/figures/web_demo.png was made).
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llava_brain.layout import DatasetRoot

from conftest import load_script
from mini_chain import brain_llava, mini_chain
from stage_checks import error_line

QUESTIONS = ["Describe the image concisely.", "What else is in it?"]
MAX_NEW_TOKENS = 12
EVENT_TIMEOUT_MS = 300_000  # an upper bound for one page event on a loaded machine, not a pause
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    chain, llava = mini_chain(tmp_path_factory), brain_llava(tmp_path_factory)
    saved = {k: os.environ.get(k) for k in ("GRADIO_TEMP_DIR", "GRADIO_ANALYTICS_ENABLED")}
    os.environ["GRADIO_TEMP_DIR"] = str(tmp_path_factory.mktemp("gradio"))
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    web = load_script("tools/web_demo.py")
    folders = ["--model", llava["model"], "--vision-tower", chain["vit3d"], "--decoder", chain["tiny"] / "unclip",
               "--clip-text", chain["tiny"] / "clip_text", "--dataset-root", chain["root"]]  # fmt: skip
    argv = [*folders, "--steps", "4", "--max-new-tokens", MAX_NEW_TOKENS, "--device", "cpu", "--quiet"]
    args = web.build_parser().parse_args([str(a) for a in [*argv, "--port", free_port()]])
    backend = web.load_backend(args)
    page, url = web.launch(args, backend, block=False)
    choices = backend.sample_choices(backend.subjects()[0])
    yield {"web": web, "backend": backend, "url": url, "root": chain["root"], "model": llava["model"],
           "predictions": chain["predictions"], "folders": [str(a) for a in folders], "choices": choices}  # fmt: skip
    page.close()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def chat_py_answers(demo, tmp_path: Path, capsys, sample: str, questions: list[str]) -> list[str]:
    """tools/chat.py's greedy answers to `questions` about `sample`, one conversation."""
    file = tmp_path / "questions.txt"
    file.write_text("\n".join(questions) + "\n")
    capsys.readouterr()
    code = load_script("tools/chat.py").main(["--model", str(demo["model"]), "--dataset-root", str(demo["root"]),
                                              "--sample", sample, "--questions", str(file), "--max-new-tokens",
                                              str(MAX_NEW_TOKENS), "--device", "cpu"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    return [line.removeprefix("ASSISTANT: ").strip() for line in out.splitlines() if line.startswith("ASSISTANT: ")]


def text_of(message: dict) -> str:
    """The text of a gradio Chatbot message (content as a string or a list of parts)."""
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


def test_api_streams_the_greedy_answers_of_chat_py(demo, tmp_path, capsys):
    from gradio_client import Client

    sample = demo["choices"][1][1]
    client = Client(demo["url"], verbose=False)
    client.predict(sample, api_name="/pick")
    shown, answers = [], []
    for question in QUESTIONS:
        job = client.submit(sample, question, shown, api_name="/chat")
        partials = [text_of(output[1][-1]) for output in job if output and output[1]]
        box, shown = job.result()
        answer = text_of(shown[-1])
        assert box == "" and [m["role"] for m in shown][-2:] == ["user", "assistant"]
        assert text_of(shown[-2]) == question
        assert answer and " " in answer
        streamed = [p for p in dict.fromkeys(p.strip() for p in partials) if p]
        assert len(streamed) >= 2, f"the answer arrived in one piece, not streamed: {partials}"
        assert all(answer.startswith(p) for p in streamed), (streamed, answer)
        answers.append(answer)
    assert answers == chat_py_answers(demo, tmp_path, capsys, sample, QUESTIONS)
    client.predict(sample, api_name="/pick")  # another pick starts over: the first answer comes again
    job = client.submit(sample, QUESTIONS[1], [], api_name="/chat")
    assert text_of(job.result()[1][-1]) == chat_py_answers(demo, tmp_path, capsys, sample, QUESTIONS[1:])[0]


def test_api_images_caption_and_concept_map(demo):
    from gradio_client import Client

    backend, sample = demo["backend"], demo["choices"][2][1]
    client = Client(demo["url"], verbose=False)
    stimulus, low, chat = client.predict(sample, api_name="/pick")
    assert chat == []
    nsd_id = backend.sample(sample).nsd_id
    expected = np.asarray(Image.open(DatasetRoot(demo["root"]).image(nsd_id)).convert("RGB"))
    assert np.array_equal(np.asarray(Image.open(stimulus).convert("RGB")), expected)
    assert np.array_equal(np.asarray(Image.open(low).convert("RGB")), backend.low_level(sample))
    caption = client.predict(sample, api_name="/describe")
    assert caption and caption == backend.caption(sample)
    recon = np.asarray(Image.open(client.predict(sample, caption, api_name="/reconstruct")).convert("RGB"))
    assert recon.ndim == 3 and recon.shape[2] == 3 and recon.std() > 0
    assert np.array_equal(recon, backend.reconstruct(sample, caption))
    picture, summary = client.predict(sample, "red", api_name="/locate")
    assert Image.open(picture).size[0] > 0 and "share of the map" in summary and "red" in summary


def test_a_running_reconstruction_does_not_hold_up_another_tabs_chat(demo, monkeypatch):
    """Tab A's reconstruction waits on an event the test sets only after tab B's chat has finished: if the queue
    put the chat behind the reconstruction, B's answer would never come (the timeout is only an upper bound)."""
    from gradio_client import Client

    backend, sample = demo["backend"], demo["choices"][0][1]
    started, release = threading.Event(), threading.Event()
    decode = backend.reconstruct

    def held(*args, **kwargs):
        started.set()
        assert release.wait(EVENT_TIMEOUT_MS / 1000), "the test never released the reconstruction"
        return decode(*args, **kwargs)

    monkeypatch.setattr(backend, "reconstruct", held)
    tab_a, tab_b = Client(demo["url"], verbose=False), Client(demo["url"], verbose=False)
    try:
        job_a = tab_a.submit(sample, "a prompt", api_name="/reconstruct")
        assert started.wait(EVENT_TIMEOUT_MS / 1000)
        answer = tab_b.submit(sample, QUESTIONS[0], [], api_name="/chat").result(timeout=EVENT_TIMEOUT_MS / 1000)
        assert not job_a.done() and text_of(answer[1][-1]) == backend.session(sample).ask(QUESTIONS[0])
    finally:
        release.set()
    assert Image.open(job_a.result(timeout=EVENT_TIMEOUT_MS / 1000)).size[0] > 0


def test_the_pages_images_are_the_decoders_from_the_prediction_files(demo):
    """Independent of the backend's own ViT3D pass: fmri2embeds.py's prediction file for the sample, through
    llava_brain.recon with embeds2images' per-image seed, gives the page's low-level and unCLIP images (up to the
    last bit of a batched vs a single ViT3D forward pass, so a pixel may differ by one level)."""
    from llava_brain.evaluation.predictions import Predictions, folder_name
    from llava_brain.recon import decode, sample_seed, vae_images

    backend, sample = demo["backend"], demo["choices"][4][1]
    subject = backend.sample(sample).subject
    pred = Predictions.load(demo["predictions"] / folder_name(subject, "avg"))
    row = pred.samples.index(sample)
    low = vae_images(backend.pipe.vae, pred.vae[row : row + 1])[0]
    seeds = [sample_seed(0, int(pred.nsd_ids[row]))]
    recon = decode(backend.pipe, pred.clip[row : row + 1], pred.vae[row : row + 1], ["a prompt"], seeds,
                   backend.settings)[0]  # fmt: skip
    for page, expected in ((backend.low_level(sample), low), (backend.reconstruct(sample, "a prompt"), recon)):
        difference = np.abs(page.astype(int) - expected.astype(int))
        assert difference.max() <= 1 and difference.mean() < 0.05, (difference.max(), difference.mean())


@pytest.mark.parametrize("which", ["--model", "--decoder", "--dataset-root"])
def test_a_missing_folder_is_one_line_before_any_server(demo, tmp_path, capsys, which):
    folders = list(demo["folders"])
    folders[folders.index(which) + 1] = str(tmp_path / "missing")
    assert demo["web"].main([*folders, "--port", str(free_port()), "--quiet"]) == 2
    assert str(tmp_path / "missing") in error_line(capsys)


def test_a_decoder_folder_without_the_pipeline_is_refused(demo, tmp_path, capsys):
    folders = list(demo["folders"])
    (tmp_path / "not_a_pipeline").mkdir()
    folders[folders.index("--decoder") + 1] = str(tmp_path / "not_a_pipeline")
    assert demo["web"].main([*folders, "--quiet"]) == 2
    assert "model_index.json" in error_line(capsys)


def test_presets_are_the_paper_tasks():
    from llava_brain.evaluation import generation as gen
    from llava_brain.web import PRESETS, preset_question

    assert preset_question("Brief caption") == gen.task_question("brief_description")
    assert "red" in preset_question('Locating the concept of "..."', "red")
    with pytest.raises(ValueError):
        preset_question("Unknown")
    assert set(PRESETS.values()) >= {"brief_description", "detail_description", "complex_reasoning"}


# The browser --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("no Chromium installed (Debian: apt-get install -y chromium chromium-driver; .ci/run does)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (requirements-dev)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS, headless=True)
        yield browser
        browser.close()


def open_page(browser, url: str):
    context = browser.new_context(viewport={"width": 1400, "height": 1100})
    page = context.new_page()
    page.set_default_timeout(EVENT_TIMEOUT_MS)
    page.goto(url)
    page.wait_for_selector("#recon img")  # the page's first sample is described and reconstructed
    return context, page


def ask(page, question: str) -> None:
    page.fill("#question textarea", question)
    page.click("#send")


def wait_for_answers(page, answers: list[str]) -> None:
    """Until the chat shows exactly these assistant answers (the last one streamed in full)."""
    page.wait_for_function(
        """(expected) => {
            const bots = [...document.querySelectorAll('#chatbot [data-testid="bot"]')];
            return bots.length === expected.length && bots.every((b, i) => b.innerText.trim() === expected[i]);
        }""",
        arg=answers,
    )


def user_turns(page) -> list[str]:
    return [t.strip() for t in page.locator('#chatbot [data-testid="user"]').all_inner_texts()]


def test_browser_picks_a_sample_chats_and_shows_the_images(demo, browser, tmp_path):
    backend = demo["backend"]
    label, sample = demo["choices"][3]
    context, page = open_page(browser, demo["url"])
    first_recon = page.get_attribute("#recon img", "src")
    page.click("#sample input")
    page.locator("[role=option]", has_text=label).first.click()
    assert page.input_value("#sample input") == label
    page.wait_for_function("(old) => document.querySelector('#recon img')?.src !== old", arg=first_recon)
    assert page.input_value("#caption textarea") == backend.caption(sample)
    ask(page, QUESTIONS[0])
    wait_for_answers(page, [backend.session(sample).ask(QUESTIONS[0])])
    assert user_turns(page) == [QUESTIONS[0]]
    page.fill("#concept textarea", "circle")
    page.click("#locate")
    page.wait_for_selector("#concept-map img")
    assert "share of the map" in page.inner_text("#concept-summary")
    for box in ("#stimulus", "#lowlevel", "#recon", "#concept-map"):
        assert page.eval_on_selector(f"{box} img", "img => img.complete && img.naturalWidth > 0"), box
    shot = tmp_path / "web_demo.png"
    page.screenshot(path=str(shot), full_page=True)
    assert Image.open(shot).size[0] >= 1000
    if os.environ.get("WEB_DEMO_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["WEB_DEMO_SCREENSHOT"])
    page.check("#hide input")  # the blind guess: the stimulus goes away
    page.wait_for_selector("#stimulus", state="hidden")
    context.close()


def test_two_browser_contexts_keep_separate_histories(demo, browser):
    backend, sample = demo["backend"], demo["choices"][0][1]  # both pages open on the first sample
    (ctx_a, a), (ctx_b, b) = open_page(browser, demo["url"]), open_page(browser, demo["url"])
    ask(a, QUESTIONS[0])
    ask(b, QUESTIONS[1])  # queued while a's answer may still be streaming
    first_a, first_b = backend.session(sample).ask(QUESTIONS[0]), backend.session(sample).ask(QUESTIONS[1])
    wait_for_answers(a, [first_a])
    wait_for_answers(b, [first_b])
    ask(a, QUESTIONS[1])
    session = backend.session(sample)  # a's conversation, by hand: its second answer reads a's first turn only
    session.ask(QUESTIONS[0])
    wait_for_answers(a, [first_a, session.ask(QUESTIONS[1])])
    assert user_turns(a) == [QUESTIONS[0], QUESTIONS[1]]
    assert user_turns(b) == [QUESTIONS[1]]
    ctx_a.close()
    ctx_b.close()
