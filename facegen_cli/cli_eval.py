"""`facegen eval`: the evaluation report and the attribute classifier that measures it. Thin over the
library, as cli.py is."""

from pathlib import Path
from typing import List, Optional

import typer

from .edit_request import EditRequest, edit_sample
from .errors import FacegenError
from .terminal import Device, Model, Precision, finite, load_pipeline, log, progress_bar, reports_errors

eval_app = typer.Typer(help="Measure models: the attribute classifier and the evaluation report.",
                       no_args_is_help=True)


@eval_app.callback(invoke_without_command=True)
@reports_errors
def eval_report(
    ctx: typer.Context,
    model: Model = None,
    classifier: Optional[Path] = typer.Option(None, help="Attribute classifier folder (facegen eval train-classifier; "
                                                   "default: the model folder's classifier/, as the demo has)."),
    out: Path = typer.Option(Path("eval-report"), "--out", "-o", help="Report folder."),
    faces: int = typer.Option(32, "--faces", "-k", min=1, help="Faces per condition (seeds 0..K-1)."),
    guidance: List[float] = typer.Option([1.0, 3.0, 5.0], callback=finite,
                                         help="Guidance scales to measure (repeatable)."),
    combinations: int = typer.Option(8, min=0, help="Random requests of 2-4 attributes to measure."),
    data: Optional[Path] = typer.Option(None, help="Labelled image folder: its test split is the real side of "
                                                     "the Fréchet distance, its train split's labels give the "
                                                     "free-flip ceiling."),
    steps: Optional[int] = typer.Option(None, min=1, help="Sampling steps (default: the model's)."),
    inception_fid: bool = typer.Option(True, help="With --data, also the standard Inception FID (needs "
                                                  "`pip install -e '.\\[fid]'` and the Inception weights)."),
    inception_weights: Optional[Path] = typer.Option(None, help="Local copy of torch-fidelity's Inception weights "
                                                                "(offline machines; default: download)."),
    free_faces: int = typer.Option(200, min=0, help="With --data, also this many faces with nothing asked, drawn "
                                                     "from the label prior and left free (0: none)."),
    identity: bool = typer.Option(False, "--identity", help="Also measure the faces with nothing asked in dlib's "
                                                            "face-recognition embedding (the identity extra)."),
    device: Device = "auto",
    precision: Precision = "auto",
):
    """Measure a model's attribute control and leakage; writes OUT/report.json, report.md and grids."""
    if ctx.invoked_subcommand is not None:
        return
    import functools

    from .classifier import load_classifier
    from .evaluate import evaluate_model, inception_fid_to, load_held_out_faces

    pipe = load_pipeline(model, device, precision)
    classifier = classifier or pipe.classifier_path  # a model folder may carry the classifier it was measured with
    if classifier is None:
        raise FacegenError(f"{pipe.path} carries no classifier: give --classifier "
                           "(train one with `facegen eval train-classifier --data D`)")
    attribute_classifier, classifier_report = load_classifier(classifier, pipe.device)
    held_out = load_held_out_faces(data, pipe.attributes, pipe.info.image_size) if data is not None else None
    fid_to = functools.partial(inception_fid_to, weights=inception_weights) if inception_fid else None
    with progress_bar() as progress:
        evaluate_model(pipe, attribute_classifier, classifier_report, out, num_seeds=faces, guidances=guidance,
                       settings=pipe.settings(steps=steps), held_out=held_out, combinations=combinations,
                       fid_to=fid_to, free_faces=free_faces, identity=identity, progress=progress)
    print(out / "report.md")


@eval_app.command("train-classifier")
@reports_errors
def eval_train_classifier(
    data: Path = typer.Option(..., help="Labelled image folder (train split to fit, test split to measure)."),
    out: Path = typer.Option(Path("classifier"), "--out", "-o", help="Folder to write the classifier to."),
    epochs: int = typer.Option(12, min=1),
    batch_size: int = typer.Option(64, min=1),
    image_size: int = typer.Option(64, min=16, help="The classifier reads faces at this size."),
    widths: str = typer.Option("16,32,64,128", help="Channels of its four stages (real photos: 32,64,128,256)."),
    balanced: bool = typer.Option(False, "--balanced", help="Weigh each attribute's positives by its rarity "
                                                            "(for real data such as CelebA, where some are 2%)."),
    test_data: List[Path] = typer.Option([], help="Another labelled folder whose test split it is measured on "
                                                  "too (repeatable)."),
    precision: Precision = "fp32",
    resume: bool = typer.Option(False, "--resume", help="Continue from OUT/checkpoints (an interrupted run)."),
):
    """Train the attribute classifier that measures generated and edited faces; prints its folder."""
    from .classifier import ClassifierTrainConfig, train_classifier

    try:
        stage_widths = tuple(int(w) for w in widths.split(","))
    except ValueError:
        raise FacegenError(f"--widths {widths!r}: give four channel counts such as 32,64,128,256") from None
    config = ClassifierTrainConfig(epochs=epochs, batch_size=batch_size, image_size=image_size, widths=stage_widths,
                                   balanced=balanced, precision=precision)
    with progress_bar() as progress:
        scores, own_balanced = train_classifier(data, out, config, also_test=test_data, resume=resume,
                                                progress=progress)
    for folder, accuracies in scores.items():
        log(f"held-out accuracy on {folder}" + (" (balanced accuracy)" if folder == str(data) else "") + ":")
        for name, value in accuracies.items():
            extra = f"  ({100 * own_balanced[name]:5.1f}%)" if folder == str(data) else ""
            log(f"{name:>12}  {100 * value:5.1f}%{extra}")
    print(out)


@eval_app.command("edits")
@reports_errors
def eval_edits(
    photos: List[Path] = typer.Argument(..., help="Photos or folders of photos (the largest face of each)."),
    out: Path = typer.Option(Path("edit-report"), "--out", "-o", help="Report folder."),
    kind: List[str] = typer.Option([], "--kind", help="Edit kinds to measure (repeatable; default: the local "
                                                      "and whole-face kinds)."),
    limit: Optional[int] = typer.Option(None, min=1, help="At most this many photos."),
    trajectory: str = typer.Option(EditRequest.trajectory, help="flowedit, inversion, rf-inversion or noise, as facegen edit takes."),
    upscale: bool = typer.Option(EditRequest.upscale, "--upscale/--no-upscale",
                                 help="Super-resolve new content, as facegen edit does."),
    zoom: bool = typer.Option(EditRequest.zoom, "--zoom/--no-zoom", help="Zoomed views, as facegen edit takes."),
    strength: Optional[float] = typer.Option(None, min=0.05, max=1.0, help="Strength (default: edit's)."),
    guidance: Optional[float] = typer.Option(None, callback=finite, help="Guidance (default: edit's)."),
    model: Model = None,
    device: Device = "auto",
    precision: Precision = "fp32",
):
    """Measure edits on photos at their own resolution (texture, dlib identity, attribute shown, pixels
    outside the mask) beside the no-op floor; writes OUT/report.md, report.json and crops."""
    from .edit import without_masks
    from .files import collect_inputs
    from .photo_eval import LOCAL_KINDS, WHOLE_FACE_KINDS, measure_photo_edits

    files, problems = collect_inputs([str(p) for p in photos])
    for problem in problems:
        log(problem)
    paths = sorted(path for path, _ in without_masks(files)[0])[:limit]
    if not paths:
        raise FacegenError("no photos in the inputs given")
    pipe = load_pipeline(model, device, precision)
    request = EditRequest(sample=edit_sample(pipe.sample), guidance=guidance, strength=strength, trajectory=trajectory,
                          upscale=upscale, zoom=zoom)
    with progress_bar() as progress:
        measure_photo_edits(pipe, pipe.load_classifier(), paths, out, kinds=tuple(kind) or LOCAL_KINDS + WHOLE_FACE_KINDS,
                            request=request, progress=progress)
    print(out / "report.md")
