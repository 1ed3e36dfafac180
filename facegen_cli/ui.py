"""`facegen ui`: a local web page (Gradio) to generate and edit faces, over the library calls the
commands make, so that the page and `facegen generate` give the same image for the same request and seed.

    generate_faces(...)  the Generate tab: the request, the PNGs (as `facegen generate` writes them) and the
                         equivalent command
    edit_photo(...)      the Edit tab: one uploaded photo through `edit.edit_photos`
    build_app(...)       the page; `facegen ui` serves it (serve) on loopback unless told otherwise

Gradio is an optional extra (`pip install -e ".[ui]"`): only this module imports it.
"""

import os
import secrets
import shlex
import signal
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .attributes import AttributeRequest, flag_names
from .config import SAMPLERS
from .edit_request import EditRequest, edit_sample
from .errors import FacegenError
from .files import NEW_DIR_MODE
from .images import UNREADABLE_IMAGE_ERRORS

CHOICES = ("for", "free", "against")


def import_gradio():
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local tool does not phone home
    try:
        import gradio
    except ImportError:
        raise FacegenError('facegen ui needs Gradio, an optional extra: pip install -e ".[ui]"') from None
    return gradio


@dataclass
class GenerateRequest:
    """What the Generate tab asks: per attribute for / free / against, and the sampling."""
    choices: dict  # attribute -> "for", "free" or "against"
    count: int
    seed: int
    steps: int
    guidance: float
    sampler: str
    upscale: bool = False

    @property
    def wanted(self):
        return [a for a, c in self.choices.items() if c == "for"]

    @property
    def unwanted(self):
        return [a for a, c in self.choices.items() if c == "against"]


def new_folder(out, kind):
    """A new folder below `out` for one request's results, named by kind and time, never one that exists."""
    Path(out).mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-", dir=out))
    folder.chmod(NEW_DIR_MODE)
    return folder


def equivalent_command(request, model_name):
    """The `facegen generate` command line that makes the same faces."""
    flags = [flag_names(a)[0] for a in request.wanted] + [flag_names(a)[1] for a in request.unwanted]
    words = ["facegen", "generate", *flags, "-n", str(request.count), "--seed", str(request.seed),
             "--steps", str(request.steps), "--guidance", f"{request.guidance:g}", "--sampler", request.sampler]
    if request.upscale:
        words += ["--upscale", "4"]
    return shlex.join(words + ["--model", model_name])


def generate_faces(pipe, request, out, model_name, on_progress=None):
    """Make the faces of a GenerateRequest into a new folder below `out`, exactly as `facegen generate`
    with the same request and seed would (same settings, batches and metadata). Returns (paths, command)."""
    from .gallery import FaceWriter, make_faces

    asked = AttributeRequest(pipe.attributes, request.wanted, request.unwanted)
    settings = pipe.settings(steps=request.steps, guidance=request.guidance, method=request.sampler)
    seeds = list(range(request.seed, request.seed + request.count))
    folder = new_folder(out, "generated")
    done = [0]

    def advance(count):
        done[0] += count
        if on_progress:
            on_progress(done[0] / request.count)

    writer = FaceWriter(pipe, asked, settings, folder, upscale=4 if request.upscale else None, model_name=model_name)
    paths = [path for batch in make_faces(pipe, asked, seeds, settings, writer, on_batch=advance) for path in batch]
    return paths, equivalent_command(request, model_name)


def faces_in_photo(finder, path):
    """Labels for the face picker: 'every face' and one entry per face found, left to right."""
    from .images import read_photo, to_rgb

    faces = finder(np.asarray(to_rgb(read_photo(path)[0])))
    return ["every face"] + [f"face {i} (from the left)" for i in range(len(faces))]


def edit_photo(pipe, classifier, photo, add, remove, strength, seed, face, out):
    """Edit one uploaded photo into `out` (the same calls as `facegen edit`); returns (the edited photo's
    path, the mask's path). A photo that cannot be edited raises FacegenError with the reason."""
    from .edit import edit_photos, mask_path

    if not add and not remove:
        raise FacegenError("nothing to change: tick an attribute to add or to remove")
    request = EditRequest(tuple(add), tuple(remove), strength, edit_sample(pipe.sample), seed=int(seed))
    request.attributes(pipe.attributes)  # refuses unknown names and contradictions
    photo = Path(photo)
    folder = new_folder(out, "edited")
    [result] = edit_photos(pipe, [(photo, Path(photo.name))], request, folder, classifier=classifier, face=face,
                           save_mask=True)
    if result.output is None:
        raise FacegenError(result.reason)
    return result.output, mask_path(result.output)


def build_app(pipe, classifier, out, model_name):
    """The page: a Generate tab and an Edit tab. Handlers report bad input as a message in the page."""
    gr = import_gradio()
    from .landmarks import FaceFinder

    defaults = pipe.sample
    finder = FaceFinder()

    def on_generate(*values, progress=gr.Progress()):
        *choices, count, seed, steps, guidance, sampler, upscale = values
        request = GenerateRequest(dict(zip(pipe.attributes, choices)), int(count), int(seed), int(steps),
                                  float(guidance), sampler, bool(upscale))
        try:
            paths, command = generate_faces(pipe, request, out, model_name,
                                            on_progress=lambda f: progress(f, desc="sampling"))
        except FacegenError as e:
            raise gr.Error(str(e)) from None
        files = [str(p) for p in paths]
        return files, files, command

    def on_upload(photo):
        if photo is None:
            return gr.Dropdown(choices=["every face"], value="every face")
        try:
            choices = faces_in_photo(finder, photo)
        except (FacegenError, *UNREADABLE_IMAGE_ERRORS) as e:
            raise gr.Error(f"cannot read this photo: {e}") from None
        if len(choices) == 1:
            gr.Warning("no face found in this photo")
        return gr.Dropdown(choices=choices, value="every face")

    def on_edit(photo, face, add, remove, strength, seed, progress=gr.Progress()):
        if photo is None:
            raise gr.Error("upload a photo first")
        progress(0.1, desc="editing")
        index = None if face in (None, "every face") else int(face.split()[1])
        try:
            edited, mask = edit_photo(pipe, classifier, photo, add, remove, strength or None, seed, index, out)
        except FacegenError as e:
            raise gr.Error(str(e)) from None
        return Image.open(photo), str(edited), str(mask), str(edited)

    with gr.Blocks(title="facegen") as app:
        gr.Markdown(f"# facegen\nModel: `{model_name}` — attributes asked **for**, **against** or left "
                    "**free** (the model draws them as its data would).")
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column(scale=2):
                    radios = [gr.Radio(list(CHOICES), value="free", label=name.replace("_", " "),
                                       elem_id=f"attr-{name}") for name in pipe.attributes]
                with gr.Column(scale=1):
                    count = gr.Slider(1, 64, value=8, step=1, label="faces", elem_id="count")
                    seed = gr.Number(value=0, precision=0, minimum=0, label="seed", elem_id="seed")
                    random_seed = gr.Button("random seed")
                    steps = gr.Slider(1, 100, value=defaults.steps, step=1, label="steps")
                    guidance = gr.Slider(1.0, 10.0, value=defaults.guidance, step=0.5, label="guidance")
                    sampler = gr.Radio(list(SAMPLERS), value=defaults.method, label="sampler")
                    upscale = gr.Checkbox(False, label="4x upscale (Real-ESRGAN)")
                    run = gr.Button("Generate", variant="primary", elem_id="generate")
            gallery = gr.Gallery(label="faces", columns=8, elem_id="gallery")
            files = gr.File(label="the PNGs, with their request in the metadata", file_count="multiple")
            command = gr.Textbox(label="the same faces from the command line", elem_id="command")
            random_seed.click(lambda: secrets.randbelow(2**31), outputs=seed)
            run.click(on_generate, [*radios, count, seed, steps, guidance, sampler, upscale],
                      [gallery, files, command])
        with gr.Tab("Edit"):
            with gr.Row():
                with gr.Column():
                    photo = gr.Image(type="filepath", label="photo", elem_id="photo")
                    face = gr.Dropdown(["every face"], value="every face", label="face to edit")
                    add = gr.CheckboxGroup(list(pipe.attributes), label="add", elem_id="add")
                    remove = gr.CheckboxGroup(list(pipe.attributes), label="remove", elem_id="remove")
                    strength = gr.Slider(0.0, 1.0, value=0.0, step=0.05,
                                         label="strength (0: automatic, 0.7-1.0 by the change)")
                    edit_seed = gr.Number(value=0, precision=0, minimum=0, label="seed")
                    edit = gr.Button("Edit", variant="primary", elem_id="edit")
            with gr.Row():
                before = gr.Image(label="before", interactive=False)
                after = gr.Image(label="after", interactive=False, elem_id="after")
                mask = gr.Image(label="mask", interactive=False)
            download = gr.File(label="the edited photo, full resolution")
            photo.change(on_upload, photo, face)
            edit.click(on_edit, [photo, face, add, remove, strength, edit_seed], [before, after, mask, download])
    app.queue(default_concurrency_limit=1)  # one model: a second request waits its turn
    return app


def serve(page, host, port, allowed):
    """Serve the page until Ctrl-C (or SIGTERM), then close it. Gradio's own waiting loop prints its shutdown
    line on stdout, where `facegen ui` writes only the URL; this one says nothing. The signal only sets an
    event: a KeyboardInterrupt raised inside Gradio's start-up or shutdown could leave its server threads
    running and the process never ending."""
    stop = threading.Event()
    handlers = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        page.launch(server_name=host, server_port=port, allowed_paths=allowed, share=False, quiet=True,
                    prevent_thread_lock=True)
        while page.is_running and not stop.wait(0.2):
            pass
    finally:
        page.close(verbose=False)
        for s, handler in handlers.items():
            signal.signal(s, handler)
