"""A Gradio demo of the timm model in this folder, written by `dogbench export --format space`.

The folder runs as a Hugging Face Space as it is (README.md's header names this file), or here with
`python app.py` on 127.0.0.1 (GRADIO_SERVER_NAME and GRADIO_SERVER_PORT change where). It needs timm, torch
and gradio, not dogbench: the classifier holds the run's head and calibration, config.json its preprocessing.
"""

import json
from pathlib import Path

import gradio as gr
import timm
import torch
from PIL import Image, ImageOps

HERE = Path(__file__).resolve().parent
CONFIG = json.loads((HERE / "config.json").read_text())
CLASSES = CONFIG["label_names"]
MODEL = timm.create_model(f"local-dir:{HERE}", pretrained=True).eval()
TRANSFORM = timm.data.create_transform(**timm.data.resolve_data_config(model=MODEL))
ABOUT = CONFIG.get("dogbench", {})
TOP_K = min(5, len(CLASSES))


def classify(image: Image.Image | None) -> dict[str, float]:
    """The most probable classes of one photo with their calibrated probabilities."""
    if image is None:
        raise gr.Error("Upload a photo first.")
    image = ImageOps.exif_transpose(image).convert("RGB")
    with torch.inference_mode():
        proba = MODEL(TRANSFORM(image).unsqueeze(0)).softmax(-1)[0]
    top = proba.topk(TOP_K)
    return {CLASSES[int(i)]: float(p) for p, i in zip(top.values, top.indices, strict=True)}


demo = gr.Interface(
    classify, gr.Image(type="pil", label="Photo"), gr.Label(num_top_classes=TOP_K, label="Breed"),
    title=ABOUT.get("title", "Image classifier"), description=ABOUT.get("summary", ""), flagging_mode="never",
    api_name="predict",
)

if __name__ == "__main__":
    demo.launch()
