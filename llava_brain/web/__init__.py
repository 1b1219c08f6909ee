"""The web demo (tools/web_demo.py): `DemoBackend` computes with the project's pieces, `build_app` wires a gradio page
to it. gradio is imported by `llava_brain.web.app` only, so the backend loads without it."""

from llava_brain.web.backend import PRESETS, DemoBackend, DemoPaths, preset_question

__all__ = ["PRESETS", "DemoBackend", "DemoPaths", "preset_question"]
