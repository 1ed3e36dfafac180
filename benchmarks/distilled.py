"""A distilled student beside its teacher, same seeds, one run: sampling time per face and the Fréchet
distances of 200 faces with nothing asked (and of `--male --beard`) to held-out real faces, in the attribute
classifier's features and in dlib's face-recognition embedding (the identity extra).

    python benchmarks/distilled.py --teacher faces --student RUN/model --data data/celeba-aligned \
        --steps 1 2 4 8 --out report.json

Times are per face, 16 faces a batch, on this machine's threads, the median of --repeats runs after a warm-up:
a whole `generate`, less the decoding of as many latents timed alone.
"""

import argparse
import dataclasses
import json
import statistics
import time

import numpy as np
import torch

from facegen_cli.evaluate import (control_rates, frechet_distance, load_held_out_faces, rates_by_sign,
                                  read_single_attribute_faces)
from facegen_cli.identity import FaceEmbedder, aligned_embeddings
from facegen_cli.images import to_tensor, to_uint8
from facegen_cli.pipeline import FacegenPipeline


def sample_seconds(pipe, settings, condition, repeats):
    """(seconds per face to sample the latents, and to decode them), 16 faces a batch: a whole generate, less
    the decoding of as many latents timed alone (it does not depend on what they hold)."""
    seeds = list(range(16))
    conditions, drawn = pipe.draw_free(condition, seeds)
    latents = pipe.noise(pipe.generators(seeds)).to(pipe.device)
    whole, decoding = [], []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        pipe.generate(conditions, seeds, settings, drawn=drawn)
        middle = time.perf_counter()
        with torch.inference_mode():
            pipe.decode(latents)
        end = time.perf_counter()
        whole.append((middle - start) / 16)
        decoding.append((end - middle) / 16)
    decode_s = statistics.median(decoding[1:])
    return statistics.median(whole[1:]) - decode_s, decode_s


def control(pipe, classifier, settings, seeds):
    """{attribute: {"for": rate, "against": rate}}: each attribute asked alone, the others free."""
    readings = read_single_attribute_faces(lambda y, s: pipe.generate(y, s, settings), classifier.read,
                                           len(pipe.attributes), seeds)[0]
    return rates_by_sign(control_rates(readings), pipe.attributes)


@torch.inference_mode()
def plain_velocity_error(teacher, student, held_out):
    """How far the student's plain conditional velocity is from the teacher's (edits call the teacher's, which
    the model folder keeps as its DiT, because this is too far for them): mean squared
    difference over the teacher's mean square, on 256 held-out faces noised to random times, each with half of
    its own labels asked (the rest free)."""
    generator = torch.Generator().manual_seed(0)
    x0 = torch.cat([teacher.encode(to_tensor(held_out.images[i:i + 32]).to(teacher.device)).float()
                    for i in range(0, 256, 32)])
    noise = torch.randn(x0.shape, generator=generator)
    t = torch.rand(len(x0), generator=generator)
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
    labels = held_out.labels[:len(x0)].float()
    y = labels * (torch.rand(labels.shape, generator=generator) < 0.5)
    v_teacher, v_student = teacher.dit(x_t, t, y).float(), student.student(x_t, t, y).float()
    return round(float(((v_student - v_teacher) ** 2).mean() / (v_teacher ** 2).mean()), 5)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="faces")
    parser.add_argument("--student", required=True)
    parser.add_argument("--data", required=True, help="Labelled folder whose test split is the real side.")
    parser.add_argument("--steps", type=int, nargs="+", default=[4])
    parser.add_argument("--faces", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--control-faces", type=int, default=0, help="Faces per condition for control (0: skip).")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--out")
    args = parser.parse_args()

    teacher = FacegenPipeline.load(args.teacher, precision=args.precision)
    student = FacegenPipeline.load(args.student, precision=args.precision)
    classifier = teacher.load_classifier()
    embedder = FaceEmbedder()
    held_out = load_held_out_faces(args.data, teacher.attributes, teacher.info.image_size)
    real = held_out.images
    n = args.faces
    reference, boxes = aligned_embeddings(embedder, real[n:])
    typical = tuple(np.median(boxes, axis=0))
    reference_features = classifier.embed(to_tensor(real[n:])).cpu()
    floor = {"classifier": frechet_distance(classifier.embed(to_tensor(real[:n])).cpu(), reference_features),
             "dlib": frechet_distance(torch.from_numpy(aligned_embeddings(embedder, real[:n], fallback=typical)[0]),
                                      torch.from_numpy(reference))}

    def figures(faces):
        return {"classifier": round(float(frechet_distance(classifier.embed(to_tensor(faces)).cpu(),
                                                           reference_features)), 3),
                "dlib": round(float(frechet_distance(torch.from_numpy(aligned_embeddings(
                    embedder, faces, fallback=typical)[0]), torch.from_numpy(reference))), 4)}

    male_beard = torch.zeros(len(teacher.attributes))
    male_beard[[teacher.attributes.index("male"), teacher.attributes.index("beard")]] = 1
    nothing = torch.zeros(len(teacher.attributes))
    seeds = list(range(n))
    conditions, drawn = teacher.draw_free(nothing, seeds)
    runs = {"teacher": (teacher, teacher.sample)}
    runs.update({f"student {k} steps": (student, dataclasses.replace(student.sample, steps=k)) for k in args.steps})
    report = {"floor (real vs real)": {k: round(float(v), 4) for k, v in floor.items()},
              "plain velocity, relative error": plain_velocity_error(teacher, student, held_out)}
    print(json.dumps(report), flush=True)
    for name, (pipe, settings) in runs.items():
        faces = to_uint8(pipe.generate(conditions, seeds, settings, drawn=drawn))
        latent_s, decode_s = sample_seconds(pipe, settings, male_beard, args.repeats)
        report[name] = {"nothing asked": figures(faces), "latents s/face (male, beard)": round(latent_s, 4),
                        "decode s/face": round(decode_s, 4), "settings": dataclasses.asdict(settings)}
        print(name, json.dumps(report[name]), flush=True)
    teacher_s = report["teacher"]["latents s/face (male, beard)"] + report["teacher"]["decode s/face"]
    for name in runs:
        row = report[name]
        row["time vs teacher"] = round((row["latents s/face (male, beard)"] + row["decode s/face"]) / teacher_s, 3)
        row["latents time vs teacher"] = round(row["latents s/face (male, beard)"]
                                               / report["teacher"]["latents s/face (male, beard)"], 3)
    if args.control_faces:
        seeds = list(range(args.control_faces))
        rates = {"teacher": control(teacher, classifier, teacher.sample, seeds),
                 "student": control(student, classifier, student.sample, seeds)}
        report["control"] = {"faces per condition": args.control_faces, **rates,
                             "student minus teacher (points)": {
                                 a: {sign: round(100 * (rates["student"][a][sign] - rates["teacher"][a][sign]), 1)
                                     for sign in ("for", "against")} for a in teacher.attributes}}
    print(json.dumps(report, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
