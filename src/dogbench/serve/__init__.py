"""``dogbench serve RUN_DIR``: a Gradio page over a finished run's models, loaded once, answering uploaded photos.

``demo``: the part without a web server (screen an upload, answer it with every model through the one inference
path, say whether they agree and, for the run's own test photos, whether they are right). ``page``: the Gradio
layout, its events and ``serve``, which launches it.
"""

from dogbench.serve.demo import Answer, Demo, Example, ModelAnswer, ServeConfig, ServeError
from dogbench.serve.page import build_app, page_values, serve

__all__ = ["Answer", "Demo", "Example", "ModelAnswer", "ServeConfig", "ServeError", "build_app", "page_values",
           "serve"]
