"""Control and Fréchet distances of several models on more seeds than `facegen eval`'s docs run, as JSON.

    python scripts/compare_models.py facegen_cli/faces runs/faces-ft/model --data data/celeba-aligned \
        --faces 64 --guidance 3 --out compare.json

Per model, at one guidance: each attribute asked alone, for and against, on seeds 100..100+K-1 (not the
eval's 0..K-1), read by the model folder's classifier; the Fréchet distance (classifier features) of those
faces to the held-out faces, as `facegen eval` reports it; and that of faces drawn with the first 512
held-out faces' own labels (all 12 asked), which does not grow with how strongly single attributes show;
and `--combinations` random requests of 2-4 attributes (`facegen eval`'s, the same seeds): the share of
faces that show all that was asked.
"""

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from facegen_cli.classifier import load_classifier
from facegen_cli.evaluate import (combination_control, combination_requests, condition_diversity, control_rates,
                                  frechet_distance, load_held_out_faces, read_single_attribute_faces)
from facegen_cli.images import to_tensor
from facegen_cli.pipeline import FacegenPipeline


def measure(model, data, num_faces, guidance, combinations, labelled=512):
    pipe = FacegenPipeline.load(model, "cpu", "fp32")
    classifier, _ = load_classifier(pipe.classifier_path, pipe.device)
    held_out = load_held_out_faces(data, pipe.attributes, pipe.info.image_size)
    settings = dataclasses.replace(pipe.settings(), guidance=guidance)
    with torch.inference_mode():
        real_features = classifier.read(to_tensor(held_out.images))[1]
        seeds = list(range(100, 100 + num_faces))
        readings, features, _ = read_single_attribute_faces(lambda y, s: pipe.generate(y, s, settings),
                                                            classifier.read, len(pipe.attributes), seeds)
        combos = combination_requests(pipe.attributes, combinations)
        combo_readings = torch.stack([classifier.predict(pipe.generate(y, seeds, settings)) for y in combos])
        own_labels = held_out.labels[:labelled].float()
        drawn = pipe.generate(own_labels, list(range(1000, 1000 + len(own_labels))), settings)
        labelled_features = classifier.read(drawn)[1]
    control = control_rates(readings)
    return {"control_for": dict(zip(pipe.attributes, control[:, 0].tolist())),
            "control_against": dict(zip(pipe.attributes, control[:, 1].tolist())),
            "frechet_single_attribute": frechet_distance(real_features, features.flatten(0, 2)),
            "frechet_own_labels": frechet_distance(real_features, labelled_features),
            "diversity": condition_diversity(features),
            "combinations_all_shown": combination_control(combo_readings, combos)[0]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--faces", type=int, default=64)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--combinations", type=int, default=16)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    results = {}
    for model in args.models:
        results[model] = r = measure(model, args.data, args.faces, args.guidance, args.combinations)
        print(model, " ".join(f"{a}:{100 * v:.0f}" for a, v in r["control_for"].items()),
              f"FD single {r['frechet_single_attribute']:.2f} own labels {r['frechet_own_labels']:.2f} "
              f"diversity {r['diversity']:.2f} combinations {100 * r['combinations_all_shown']:.0f}%", flush=True)
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
