"""Measuring a model with the attribute classifier: control and leakage (disentanglement).

Every attribute is asked for alone, +1 and -1, with the same seeds. Then
  control[i, s]  = fraction of faces asked for attribute i with sign s that the classifier reads so;
  leakage[i, j]  = fraction of seeds whose reading of attribute j differs between +i and -i.
The diagonal of `leakage` is the flip rate of the attribute itself (high is good); off the
diagonal, any change is leakage (low is good). The classifier's own held-out accuracy bounds
both numbers and is reported beside them.
"""

from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import make_grid

from .data import to_uint8
from .files import atomic_path, save_image, write_json

SIGNS = (1, -1)


def single_attribute_requests(num_attributes):
    """Requests (2A, A): +e_0, -e_0, +e_1, -e_1, ... (each attribute alone, for and against)."""
    eye = torch.eye(num_attributes)
    return torch.stack([sign * eye[i] for i in range(num_attributes) for sign in SIGNS])


def read_single_attribute_faces(generate, classify, num_attributes, seeds, on_condition=None):
    """Readings (A, 2, K, A) in {-1, +1}: attribute i asked with sign SIGNS[s], seed k, attribute j read.

    generate(y, seeds) -> images in [-1, 1]; classify(images) -> (K, A) readings.
    Also returns the images (A, 2, K, 3, H, W) as uint8-ready floats for grids.
    """
    readings, images = [], []
    for y in single_attribute_requests(num_attributes):
        faces = generate(y, seeds)
        images.append(faces)
        readings.append(classify(faces))
        if on_condition:
            on_condition()
    shape = (num_attributes, len(SIGNS), len(seeds))
    return torch.stack(readings).view(*shape, -1), torch.stack(images).view(*shape, *images[0].shape[1:])


def control_rates(readings):
    """(A, 2): fraction of faces read as asked, per attribute and sign."""
    asked = torch.tensor(SIGNS).view(1, -1, 1)
    diagonal = torch.stack([readings[i, :, :, i] for i in range(readings.shape[0])])  # (A, 2, K)
    return (diagonal == asked).float().mean(-1)


def leakage_matrix(readings):
    """(A, A): how often attribute j's reading changes when attribute i flips from +1 to -1, same seed."""
    return (readings[:, 0] != readings[:, 1]).float().mean(1)


def off_diagonal_mean(matrix):
    """Mean over i != j, per row (A,)."""
    off = ~torch.eye(matrix.shape[0], dtype=torch.bool)
    return (matrix * off).sum(1) / off.sum(1)


def attribute_grid(images, columns=8):
    """One attribute's faces (2, K, 3, H, W) in [-1, 1] -> uint8 (H', W', 3): row 1 asked for, row 2 against."""
    faces = images[:, :columns].reshape(-1, *images.shape[2:])
    grid = make_grid(torch.from_numpy(to_uint8(faces)).permute(0, 3, 1, 2), nrow=min(columns, images.shape[1]))
    return grid.permute(1, 2, 0).numpy()


def evaluate_model(pipe, classifier, classifier_report, out, num_seeds=32, guidances=(3.0,), steps=None,
                   first_seed=0, progress=None):
    """Control and leakage of `pipe` at each guidance, read by `classifier`; writes OUT/report.json,
    OUT/report.md and OUT/grids/<attribute>-g<guidance>.png. Returns the report dict."""
    out = Path(out)
    attributes = pipe.attributes
    if classifier.attributes != attributes:
        raise ValueError(f"the classifier reads {classifier.attributes}, the model asks {attributes}")
    seeds = list(range(first_seed, first_seed + num_seeds))
    task = progress.add_task("evaluating", total=len(guidances) * 2 * len(attributes)) if progress else None
    report = {"model": pipe.info.get("preset"), "seeds": [seeds[0], seeds[-1]], "faces_per_condition": num_seeds,
              "classifier_test_accuracy": classifier_report.get("test_accuracy", {}), "guidance": {}}
    for guidance in guidances:
        readings, images = read_single_attribute_faces(
            lambda y, s: pipe.generate(y, s, steps=steps, guidance=guidance), classifier.predict,
            len(attributes), seeds, on_condition=(lambda: progress.advance(task)) if progress else None)
        control, leakage = control_rates(readings), leakage_matrix(readings)
        agreement = 1 - off_diagonal_mean(leakage)
        report["guidance"][str(guidance)] = {
            "control": {a: {"for": round(control[i, 0].item(), 4), "against": round(control[i, 1].item(), 4)}
                        for i, a in enumerate(attributes)},
            "others_agree_when_flipped": dict(zip(attributes, [round(v, 4) for v in agreement.tolist()])),
            "leakage_matrix": [[round(v, 4) for v in row] for row in leakage.tolist()],
            "leakage_off_diagonal_mean": round(off_diagonal_mean(leakage).mean().item(), 4),
        }
        for i, name in enumerate(attributes):
            save_image(Image.fromarray(attribute_grid(images[i])), out / "grids" / f"{name}-g{guidance:g}.png",
                       {"facegen": {"attribute": name, "guidance": guidance, "rows": "for, against"}})
    write_json(out / "report.json", report)
    with atomic_path(out / "report.md") as tmp:
        Path(tmp).write_text(report_markdown(report, attributes))
    return report


def report_markdown(report, attributes):
    lines = [f"# facegen evaluation: {report['model']}", "",
             f"{report['faces_per_condition']} faces per condition (seeds {report['seeds'][0]}..{report['seeds'][1]}); "
             "each attribute asked for alone (+1) and against (-1), the other attributes left free.", "",
             "Control: the fraction of faces the attribute classifier reads as asked. Others agree: the fraction of "
             "the other attributes' readings that stay the same between the +1 and -1 face of one seed.", ""]
    for guidance, result in report["guidance"].items():
        lines += [f"## Guidance {guidance}", "",
                  "| attribute | control +1 | control -1 | others agree | classifier accuracy |",
                  "|---|---|---|---|---|"]
        for name in attributes:
            c = result["control"][name]
            accuracy = report["classifier_test_accuracy"].get(name)
            lines.append(f"| {name} | {100 * c['for']:.1f}% | {100 * c['against']:.1f}% | "
                         f"{100 * result['others_agree_when_flipped'][name]:.1f}% | "
                         + (f"{100 * accuracy:.1f}%" if accuracy is not None else "n/a") + " |")
        lines += ["", f"Leakage (off-diagonal mean of the flip matrix): {100 * result['leakage_off_diagonal_mean']:.2f}%",
                  ""]
    return "\n".join(lines) + "\n"
