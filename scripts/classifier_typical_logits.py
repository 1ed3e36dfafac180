"""Measure a trained attribute classifier's typical_logits on a data set's held-out faces and keep them in its
config.json (what `facegen eval train-classifier` does for the classifiers it trains); the weights are left
as they are.

    python scripts/classifier_typical_logits.py facegen_cli/faces/classifier data/celeba-aligned

`facegen edit` keeps a face's lower guidance only where the classifier reads its change as surely as on
most real faces with it (edit.edit_until_shown); a classifier without them asks only for its own call.
"""

import argparse
import json
from pathlib import Path

from facegen_cli.classifier import held_out_split, load_classifier, typical_logits
from facegen_cli.files import atomic_path
from facegen_cli.images import to_tensor


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("classifier", type=Path, help="a classifier folder (MODEL/classifier)")
    parser.add_argument("data", type=Path, help="the labelled data folder it was trained on (its test split is read)")
    args = parser.parse_args()

    model, _ = load_classifier(args.classifier)
    images, labels = held_out_split(model, args.data)
    typical = typical_logits(model, to_tensor(images), labels)
    config_file = args.classifier / "config.json"
    config = json.loads(config_file.read_text())
    config["typical_logits"] = typical
    with atomic_path(config_file) as tmp:
        Path(tmp).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    print(json.dumps({"test_images": len(images), "data": args.data.name, **typical}, indent=2))


if __name__ == "__main__":
    main()
