import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import facegen_cli
from facegen_cli.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def assert_clean_error(result, message):
    assert result.exit_code != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stdout == ""


def test_train_then_generate_through_the_cli(tmp_path, tiny_data, tiny_vae_dir):
    result = run("train", "--data", tiny_data, "--vae", tiny_vae_dir, "--preset", "tiny", "--out", tmp_path / "run",
                 "--steps", 4)
    assert result.exit_code == 0, result.stderr
    model = tmp_path / "run" / "model"
    assert result.stdout.strip() == str(model)

    result = run("generate", "--model", model, "--male", "--no-beard", "-n", 3, "--seed", 5, "--steps", 2,
                 "--out", tmp_path / "faces", "--grid")
    assert result.exit_code == 0, result.stderr
    paths = result.stdout.split()
    assert len(paths) == 4 and paths[-1].endswith("grid-0000000005.png")
    with Image.open(paths[0]) as image:
        assert image.size == (128, 128)
        meta = json.loads(image.text["facegen"])
        parameters = image.text["parameters"].splitlines()  # what A1111's and ComfyUI's readers show
    assert meta["seed"] == 5 and meta["steps"] == 2
    assert meta["version"] == facegen_cli.__version__ and len(meta["fingerprint"]) == 16
    assert parameters[0] == "male" and parameters[1] == "Negative prompt: beard"
    assert f"Seed: 5, Size: 128x128, Model hash: {meta['fingerprint']}, Model: {model}" in parameters[2]
    assert parameters[2].startswith(f"Steps: 2, Sampler: Euler, CFG scale: {meta['guidance']:g}, ")
    assert meta["attributes"]["male"] == 1 and meta["attributes"]["beard"] == -1 and meta["attributes"]["bald"] == 0
    with Image.open(paths[-1]) as grid:
        assert grid.size == (256, 256)  # 3 faces on a 2x2 grid

    # The same command gives the same pixels; a face alone matches it in a batch up to float rounding
    # (in fp32; bf16 kernels round differently at other batch sizes: a few levels at most, under one on average).
    same = run("generate", "--model", model, "--male", "--no-beard", "-n", 3, "--seed", 5, "--steps", 2,
               "--out", tmp_path / "same")
    assert np.array_equal(np.asarray(Image.open(same.stdout.split()[0])), np.asarray(Image.open(paths[0])))
    assert json.loads(Image.open(same.stdout.split()[0]).text["facegen"])["fingerprint"] == meta["fingerprint"]
    for precision, largest in (("fp32", 1), ("bf16", 16)):
        faces = [np.asarray(Image.open(run("generate", "--model", model, "--male", "--no-beard", "-n", n, "--seed", 5,
                                           "--steps", 2, "--precision", precision, "--out",
                                           tmp_path / f"{precision}-{n}").stdout.split()[0])).astype(int)
                 for n in (1, 3)]
        assert np.abs(faces[0] - faces[1]).max() <= largest and np.abs(faces[0] - faces[1]).mean() < 1
    assert json.loads(Image.open(tmp_path / "bf16-1" / "face-0000000005.png").text["facegen"])["precision"] == "bf16"


def test_generate_draws_the_free_attributes_from_the_models_label_prior(tmp_path, tiny_model_dir, tiny_data):
    """Training keeps the data's label combinations beside the model; generate guides each face to its request
    with the rest drawn from them (the PNG says which were asked and what was drawn), --no-prior leaves them
    free, a combination no training face had stays free with a warning, export --labels replaces them."""
    from facegen_cli.attributes import DEFAULT_ATTRIBUTES, flag_names
    from facegen_cli.data import read_dataset
    from facegen_cli.label_prior import LabelPrior, prior_of_data

    prior = LabelPrior.load(tiny_model_dir / "labels.json", DEFAULT_ATTRIBUTES)
    assert prior.counts.sum() == len(read_dataset(tiny_data, "train").labels)
    common = ("--model", tiny_model_dir, "--male", "-n", 3, "--seed", 5, "--steps", 2)
    drawn, free = (run("generate", *common, *flags, "--out", tmp_path / name)
                   for flags, name in (((), "drawn"), (("--no-prior",), "free")))
    assert drawn.exit_code == 0 and free.exit_code == 0, drawn.stderr + free.stderr
    metas = [[json.loads(Image.open(path).text["facegen"]) for path in result.stdout.split()] for result in (drawn, free)]
    for meta in metas[0]:
        assert meta["attributes"]["male"] == 1 and meta["attributes"]["bald"] == 0  # asked, and left free
        assert meta["drawn"]["male"] == 1 and all(v != 0 for v in meta["drawn"].values())
        assert [meta["drawn"][a] for a in DEFAULT_ATTRIBUTES] in prior.combinations.tolist()
    assert len({json.dumps(meta["drawn"]) for meta in metas[0]}) > 1 and "drawn" not in metas[1][0]
    first = [np.asarray(Image.open(result.stdout.split()[0])).astype(int) for result in (drawn, free)]
    assert np.abs(first[0] - first[1]).max() > 0

    against_all = [flag_names(a)[1] for a in DEFAULT_ATTRIBUTES]  # a combination the 24 faces never had
    assert [-1] * len(DEFAULT_ATTRIBUTES) not in prior.combinations.tolist()
    result = run("generate", "--model", tiny_model_dir, *against_all, "-n", 1, "--seed", 5, "--steps", 2,
                 "--out", tmp_path / "unseen")
    assert result.exit_code == 0 and "no training face had" in result.stderr
    assert "drawn" not in json.loads(Image.open(result.stdout.strip()).text["facegen"])

    half = tmp_path / "relabelled"
    assert run("export", tiny_model_dir, "--out", half, "--labels", tiny_data).exit_code == 0
    exported = LabelPrior.load(half / "labels.json", DEFAULT_ATTRIBUTES)
    assert torch.equal(exported.counts, prior_of_data(tiny_data, DEFAULT_ATTRIBUTES).counts)


def test_generate_names_unknown_attributes(tiny_model_dir, tmp_path):
    result = run("generate", "--model", tiny_model_dir, "--with", "beards", "--out", tmp_path)
    assert_clean_error(result, "unknown attribute 'beards'; this model knows: male, young")
    result = run("generate", "--model", tiny_model_dir, "--beards", "--out", tmp_path)
    assert result.exit_code == 2 and "No such option: --beards" in result.stderr


@pytest.mark.parametrize("n", [0, -3, 10**12])
def test_generate_refuses_counts_out_of_range(tiny_model_dir, tmp_path, n):
    assert_clean_error(run("generate", "--model", tiny_model_dir, "-n", n, "--out", tmp_path / "o"), "-n must be")
    assert not (tmp_path / "o").exists()


def test_generate_refuses_missing_and_foreign_models(tmp_path, tiny_model_dir):
    assert_clean_error(run("generate", "--model", tmp_path / "nope", "--out", tmp_path / "o"), "no such model folder")
    (tmp_path / "empty").mkdir()
    assert_clean_error(run("generate", "--model", tmp_path / "empty", "--out", tmp_path / "o"), "not a facegen model")

    # The weights of one preset under the config of another.
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    config = json.loads((other / "dit/config.json").read_text())
    config.update(hidden_size=128, mlp_size=512)
    (other / "dit/config.json").write_text(json.dumps(config))
    assert_clean_error(run("generate", "--model", other, "--out", tmp_path / "o"), "checkpoint does not load")
    assert not (tmp_path / "o").exists()


def test_train_refuses_empty_and_missing_data(tmp_path, tiny_vae_dir):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "attributes.csv").write_text("filename,male\n")
    assert_clean_error(run("train", "--data", empty, "--vae", tiny_vae_dir, "--preset", "tiny", "--out",
                           tmp_path / "run"), "lists no images")
    assert_clean_error(run("train", "--data", tmp_path / "missing", "--preset", "tiny", "--out", tmp_path / "r"),
                       "no such data folder")
    assert_clean_error(run("train", "--data", empty, "--preset", "dit-xxl", "--out", tmp_path / "r"),
                       "unknown preset 'dit-xxl'")


def test_train_refuses_a_missing_vae(tmp_path, tiny_data):
    assert_clean_error(run("train", "--data", tiny_data, "--vae", tmp_path, "--preset", "tiny", "--out",
                           tmp_path / "run"), "not a diffusers AutoencoderKL folder")


def test_encode_reports_corrupt_images_and_writes_a_cache(tmp_path, tiny_vae_dir):
    from conftest import write_labelled_folder

    root = write_labelled_folder(tmp_path / "data", 4)
    (root / "img_0001.png").write_bytes(b"\x89PNG broken")
    result = run("encode", root, "--vae", tiny_vae_dir, "--out", tmp_path / "cache", "--workers", 0)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "cache")
    assert "img_0001.png" in result.stderr and "1 unreadable images skipped" in result.stderr

    train = run("train", "--data", tmp_path / "cache", "--preset", "tiny", "--out", tmp_path / "run", "--steps", 2,
                "--cooldown-steps", 1)
    assert train.exit_code == 0, train.stderr
    assert "on 3 latents" in train.stderr and "decaying to 0 over the last 1)" in train.stderr

    tuned = run("train", "--data", tmp_path / "cache", "--preset", "tiny", "--out", tmp_path / "tuned", "--steps", 1,
                "--init-from", tmp_path / "run/model")
    assert tuned.exit_code == 0, tuned.stderr
    assert f"starting from {tmp_path / 'run/model'} (trained 2 steps)" in tuned.stderr
    assert json.loads((tmp_path / "tuned/model/facegen.json").read_text())["trained_steps"] == 3
    assert_clean_error(run("train", "--data", tmp_path / "cache", "--preset", "tiny", "--out", tmp_path / "x",
                           "--precision", "fp8"), "unknown precision 'fp8'")


def test_a_latent_cache_whose_vae_moved_trains_with_vae_naming_its_new_place(tmp_path, tiny_vae_dir):
    from conftest import write_labelled_folder

    root = write_labelled_folder(tmp_path / "data", 3)
    shutil.copytree(tiny_vae_dir, tmp_path / "vae")
    assert run("encode", root, "--vae", tmp_path / "vae", "--out", tmp_path / "cache", "--workers", 0).exit_code == 0
    (tmp_path / "vae").rename(tmp_path / "vae-moved")
    arguments = ["train", "--data", tmp_path / "cache", "--preset", "tiny", "--steps", 1]
    assert_clean_error(run(*arguments, "--out", tmp_path / "lost"), "which is no longer there; give where it is now "
                                                                    "with --vae")
    moved = run(*arguments, "--out", tmp_path / "run", "--vae", tmp_path / "vae-moved")
    assert moved.exit_code == 0, moved.stderr
    assert (tmp_path / "run" / "model" / "facegen.json").is_file()
    other = tmp_path / "other-vae"
    shutil.copytree(tiny_vae_dir, other)
    from facegen_cli.vae import load_vae

    vae = load_vae(other)
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(0.1)
    vae.save_pretrained(other)
    assert_clean_error(run(*arguments, "--out", tmp_path / "wrong", "--vae", other), "was encoded with the VAE")


def test_two_runs_into_one_folder_never_replace_each_others_faces(tmp_path, tiny_model_dir):
    """Two processes at once, the same seeds into one folder: each face file is one run's, and a run
    lists only the files that hold its own faces; one that could not write all of them says so in its
    exit code."""
    command = [sys.executable, "-m", "facegen_cli.cli", "generate", "--model", str(tiny_model_dir), "-n", "6",
               "--steps", "1", "--batch-size", "1", "--out", str(tmp_path / "faces")]
    runs = [subprocess.Popen(command + [flag], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for flag in ("--male", "--female")]
    results = [(child.communicate(timeout=300), child.returncode) for child in runs]
    listed = [set(out.split()) for (out, _), _ in results]
    assert not listed[0] & listed[1] and listed[0] | listed[1] == {str(p) for p in (tmp_path / "faces").iterdir()}
    for paths, male in zip(listed, (1, -1)):
        for path in paths:
            assert json.loads(Image.open(path).text["facegen"])["attributes"]["male"] == male
    for paths, ((_, err), code) in zip(listed, results):
        assert (code == 0) == (len(paths) == 6), err


def test_presets_lists_parameter_counts():
    result = run("presets")
    assert result.exit_code == 0
    rows = dict(line.split("\t")[:2] for line in result.stdout.strip().splitlines())
    assert rows["dit-l-face128"] == "286.8M" and rows["tiny"] == "0.2M"


def test_export_half_halves_the_size_and_generates_the_same_faces(tiny_model_dir, tmp_path):
    from facegen_cli.attributes import DEFAULT_ATTRIBUTES
    from facegen_cli.classifier import AttributeClassifier, load_classifier, save_classifier

    save_classifier(AttributeClassifier(attributes=DEFAULT_ATTRIBUTES), tmp_path / "clf", {"test_accuracy": {}})
    result = run("export", tiny_model_dir, "--out", tmp_path / "half", "--half", "--classifier", tmp_path / "clf")
    assert result.exit_code == 0, result.stderr
    assert "kept in float32" not in result.stderr  # diffusers' false alarm on casting, kept out (files.py)
    assert load_classifier(tmp_path / "half" / "classifier")[0].attributes == DEFAULT_ATTRIBUTES
    size = lambda folder: sum(p.stat().st_size for p in folder.rglob("*.safetensors") if p.parent.name != "classifier")
    assert size(tmp_path / "half") < 0.55 * size(tiny_model_dir)
    faces = [run("generate", "--model", m, "-n", 1, "--seed", 3, "--steps", 3, "--out", tmp_path / name).stdout.strip()
             for m, name in ((tiny_model_dir, "full"), (tmp_path / "half", "halved"))]
    difference = np.asarray(Image.open(faces[0])).astype(int) - np.asarray(Image.open(faces[1]))
    assert np.abs(difference).mean() < 2


def test_export_never_deletes_what_it_did_not_make(tiny_model_dir, tmp_path):
    """A folder of other files is refused whatever the flags; a model folder is replaced only with --overwrite;
    the model itself is refused; a missing classifier fails before anything is written."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert_clean_error(run("export", tiny_model_dir, "--out", mine, "--overwrite"), "not a facegen model")
    assert (mine / "notes.txt").read_text() == "keep me" and len(list(mine.iterdir())) == 1
    assert_clean_error(run("export", tiny_model_dir, "--out", tiny_model_dir, "--overwrite"), "is the model being exported")
    assert (tiny_model_dir / "facegen.json").is_file()
    copy = tmp_path / "copy"
    assert run("export", tiny_model_dir, "--out", copy).exit_code == 0
    assert_clean_error(run("export", tiny_model_dir, "--out", copy), "holds a facegen model; --overwrite replaces it")
    assert run("export", tiny_model_dir, "--out", copy, "--overwrite").exit_code == 0
    assert_clean_error(run("export", tiny_model_dir, "--out", tmp_path / "new", "--classifier", tmp_path / "none"),
                       "not an attribute classifier folder")
    assert not (tmp_path / "new").exists()


def test_train_precision_is_chosen_per_run(tmp_path, tiny_run):
    # accelerate fixes the mixed precision once per process, so this runs the real entry point.
    result = subprocess.run([sys.executable, "-m", "facegen_cli.cli", "train", "--data", str(tiny_run / "latents"),
                             "--preset", "tiny", "--out", str(tmp_path / "run"), "--steps", "1",
                             "--precision", "bf16"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "precision bf16" in result.stderr and result.stdout.strip() == str(tmp_path / "run/model")


def test_the_cli_answers_help_without_importing_torch():
    import subprocess
    import sys

    code = ("import sys, facegen_cli.cli; heavy = {'torch', 'numpy', 'PIL', 'torchvision'} & set(sys.modules); "
            "print(sorted(heavy))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_guidance_that_is_not_a_finite_number_is_refused_before_any_work(value, tmp_path):
    for command in (["generate", "--out", str(tmp_path)], ["edit", str(tmp_path), "--add", "beard"], ["eval"]):
        result = runner.invoke(app, [*command, "--guidance", value])
        assert result.exit_code == 2 and "must be a finite number" in result.stderr, (command, result.stderr)
    assert not any(tmp_path.iterdir())


def test_inputs_that_share_a_name_keep_their_folders_so_no_output_overwrites_another(tmp_path):
    import io

    from facegen_cli.files import collect_inputs

    for folder in ("c/a", "c/b", "c/b/deeper"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "face.jpg").write_bytes(b"x")
    (tmp_path / "c" / "a" / "other.jpg").write_bytes(b"x")
    paths = [tmp_path / f for f in ("c/a/face.jpg", "c/b/face.jpg", "c/b/deeper/face.jpg", "c/a/other.jpg")]
    files, problems = collect_inputs(["-"], stdin=io.StringIO("".join(f"{p}\n" for p in paths)))
    assert problems == []
    assert [str(relative) for _, relative in files] == ["a/face.jpg", "b/face.jpg", "b/deeper/face.jpg", "other.jpg"]
    assert [path for path, _ in files] == paths


def test_an_output_folder_that_is_a_file_gives_one_line_not_a_traceback(tmp_path, tiny_model_dir):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    result = runner.invoke(app, ["generate", "--model", str(tiny_model_dir), "-n", "1", "--steps", "1",
                                 "--out", str(blocker / "faces")])
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error:") and "is a file, not a folder" in result.stderr  # before any work
    assert blocker.read_text() == "x"


def test_save_mask_with_in_place_is_refused(tmp_path, tiny_model_dir):
    result = runner.invoke(app, ["edit", str(tmp_path), "--add", "beard", "--in-place", "--save-mask",
                                 "--model", str(tiny_model_dir)])
    assert result.exit_code == 1 and "--save-mask with --in-place" in result.stderr


@pytest.mark.parametrize("seed", ["-1", "18446744073709551616"])
def test_seeds_out_of_range_are_usage_errors(seed, tmp_path):
    result = runner.invoke(app, ["generate", "--seed", seed, "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--seed" in result.stderr and "Traceback" not in result.stderr


def test_existing_outputs_are_kept_unless_overwrite_is_given(tmp_path, tiny_model_dir):
    args = ["generate", "--model", str(tiny_model_dir), "-n", "2", "--seed", "5", "--steps", "1",
            "--out", str(tmp_path / "faces")]
    assert runner.invoke(app, args).exit_code == 0
    first = (tmp_path / "faces" / "face-0000000005.png").read_bytes()
    again = runner.invoke(app, args)
    assert again.exit_code == 1 and "face-0000000005.png and 1 more exist; --overwrite" in again.stderr
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0
    assert (tmp_path / "faces" / "face-0000000005.png").read_bytes() == first  # same seed, same face


def test_an_empty_folder_or_stdin_is_an_error_not_success(tmp_path, tiny_model_dir):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    linked = runner.invoke(app, ["edit", str(tmp_path / "empty"), "--add", "beard", "--model", str(tiny_model_dir),
                                 "--out", str(tmp_path / "o")])
    assert linked.exit_code == 1 and "gone.png: a broken link" in linked.stderr
    (tmp_path / "empty" / "gone.png").unlink()
    for args in (["edit", str(tmp_path / "empty"), "--add", "beard", "--model", str(tiny_model_dir)],
                 ["edit", "-", "--add", "beard", "--model", str(tiny_model_dir)]):
        result = runner.invoke(app, [*args, "--out", str(tmp_path / "o")], input="")
        assert result.exit_code == 1 and "no photos in the inputs" in result.stderr


@pytest.mark.parametrize("change", [{"latent_std": [1.0, 0.0, 1.0, 1.0]}, {"latent_mean": None},
                                    {"latent_std": [float("nan")] * 4}])
def test_a_damaged_model_description_gives_one_line(tmp_path, tiny_model_dir, change):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    info = json.loads((model / "facegen.json").read_text())
    for key, value in change.items():
        if value is None:
            del info[key]
        else:
            info[key] = value
    (model / "facegen.json").write_text(json.dumps(info))
    result = runner.invoke(app, ["generate", "--model", str(model), "-n", "1", "--out", str(tmp_path / "o")])
    assert result.exit_code == 1 and "facegen.json" in result.stderr and "Traceback" not in result.stderr
    (model / "facegen.json").write_text("{ not json")
    assert "not readable JSON" in runner.invoke(app, ["generate", "--model", str(model), "--out",
                                                      str(tmp_path / "o")]).stderr


def test_asking_for_and_against_one_attribute_is_refused(tmp_path):
    result = runner.invoke(app, ["generate", "--male", "--female", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--male and --female both given" in result.stderr
    assert not any(tmp_path.iterdir())


def test_a_bug_shows_its_traceback_and_says_it_is_a_bug(tmp_path, monkeypatch):
    from facegen_cli import config

    def broken(name):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(config, "load_preset", broken)
    monkeypatch.setattr("facegen_cli.cli.load_preset", broken)
    result = runner.invoke(app, ["presets"])
    assert result.exit_code == 2 and "ZeroDivisionError" in result.stderr and "this is a bug in facegen" in result.stderr


def test_new_outputs_get_the_usual_permissions_not_the_temporary_files_0600(tmp_path, tiny_model_dir):
    import os

    from facegen_cli.files import NEW_DIR_MODE, NEW_FILE_MODE, save_tensors, write_json

    result = runner.invoke(app, ["generate", "--model", str(tiny_model_dir), "-n", "1", "--steps", "1",
                                 "--out", str(tmp_path)])
    assert result.exit_code == 0, result.stderr
    mode = os.stat(result.stdout.split()[0]).st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == NEW_FILE_MODE == 0o666 & ~umask
    # every atomic write, not only images: reports, exported models and their files
    write_json(tmp_path / "report.json", {})
    assert os.stat(tmp_path / "report.json").st_mode & 0o777 == NEW_FILE_MODE
    assert run("export", tiny_model_dir, "--out", tmp_path / "exported").exit_code == 0
    assert (tmp_path / "exported").stat().st_mode & 0o777 == NEW_DIR_MODE
    assert all(f.stat().st_mode & 0o777 == NEW_FILE_MODE for f in (tmp_path / "exported").rglob("*") if f.is_file())
    save_tensors({"x": torch.zeros(1)}, tmp_path / "x.safetensors")
    assert os.stat(tmp_path / "x.safetensors").st_mode & 0o777 == NEW_FILE_MODE


def test_an_image_that_does_not_read_back_whole_fails_and_the_old_file_stays(tmp_path, monkeypatch):
    """A full disk can leave an encoder's output short without an error from it: the written file is decoded
    before it takes the name, so the output fails in one line and the file that was there is kept."""
    from PIL import Image

    from facegen_cli.errors import FacegenError
    from facegen_cli.files import save_image

    target = tmp_path / "photo.jpg"
    Image.new("RGB", (64, 48), (10, 200, 30)).save(target)
    before = target.read_bytes()
    real_save = Image.Image.save

    def short_save(self, fp, *args, **kwargs):  # what a full disk leaves: the first bytes of the JPEG
        real_save(self, fp, *args, **kwargs)
        fp.seek(600)
        fp.truncate()

    monkeypatch.setattr(Image.Image, "save", short_save)
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8))
    with pytest.raises(FacegenError, match="cannot write .*photo.jpg: the file written does not read back whole"):
        save_image(noisy, target)
    assert target.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["photo.jpg"]
    monkeypatch.setattr(Image.Image, "save", real_save)
    save_image(noisy, target)
    assert Image.open(target).size == (64, 48)


def test_generate_writes_each_batch_as_it_is_made_and_an_interrupt_keeps_them(tmp_path, tiny_model_dir, monkeypatch):
    from facegen_cli import sampling

    real_sample, calls = sampling.sample, []

    def interrupted_second_batch(*args, **kwargs):
        calls.append(len(list((tmp_path / "out").glob("face-*.png"))))  # what is on disk when a batch starts
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(sampling, "sample", interrupted_second_batch)
    result = run("generate", "--model", tiny_model_dir, "-n", 6, "--batch-size", 2, "--steps", 1, "--seed", 0,
                 "--out", tmp_path / "out")
    assert result.exit_code != 0 and calls == [0, 2]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["face-0000000000.png", "face-0000000001.png"]
    assert result.stdout.split() == [str(tmp_path / "out" / f"face-000000000{i}.png") for i in range(2)]


def test_a_name_another_run_took_meanwhile_is_not_replaced(tmp_path):
    """The existence check and the write are one step: a file that appears between them (another run's) is
    kept and this output fails as existing; inputs that share a name at two depths keep distinct outputs."""
    from PIL import Image

    from facegen_cli.files import OutputExists, atomic_path, collect_inputs, save_image

    target = tmp_path / "face.png"
    with pytest.raises(OutputExists):
        with atomic_path(target, exclusive=True) as tmp:
            Image.new("RGB", (4, 4)).save(tmp, format="PNG")
            target.write_bytes(b"the other run's face")  # appears while this one writes
    assert target.read_bytes() == b"the other run's face" and [p.name for p in tmp_path.iterdir()] == ["face.png"]
    with pytest.raises(OutputExists):
        save_image(Image.new("RGB", (4, 4)), target, exclusive=True)
    save_image(Image.new("RGB", (4, 4)), target)  # without exclusive (--overwrite): replaced
    assert Image.open(target).size == (4, 4)

    for folder in ("clash/a", "clash/b", "clash2/a"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "face.jpg").write_bytes(b"x")
    files, _ = collect_inputs([tmp_path / "clash/a/face.jpg", tmp_path / "clash/b/face.jpg", tmp_path / "clash2"],
                              recursive=True)
    relatives = [str(relative) for _, relative in files]
    assert len(set(relatives)) == 3, relatives


def test_export_carries_an_autoguidance_guide_that_generate_uses(tmp_path, tiny_model_dir):
    """export --guide puts a weaker model in OUT/guide and the weight in facegen.json; generate then guides the
    drawn attributes away from it (--autoguidance 0: as before); a face is the same alone or in a batch."""
    from facegen_cli.pipeline import FacegenPipeline
    from test_model import perturbed

    weaker = FacegenPipeline.load(tiny_model_dir)
    weaker.replaced(dit=perturbed(weaker.dit)).save(tmp_path / "guide")
    guided = tmp_path / "guided"
    result = run("export", tiny_model_dir, "--out", guided, "--guide", tmp_path / "guide", "--autoguidance", 2)
    assert result.exit_code == 0, result.stderr
    assert (guided / "guide" / "config.json").is_file()
    assert json.loads((guided / "facegen.json").read_text())["sample"]["autoguidance"] == 2

    def faces(model, name, *flags, seed=5, n=3):
        result = run("generate", "--model", model, "-n", n, "--seed", seed, "--steps", 3, *flags, "--out", tmp_path / name)
        assert result.exit_code == 0, result.stderr
        return [np.asarray(Image.open(path)).astype(int) for path in result.stdout.split()], result.stdout.split()

    auto, paths = faces(guided, "auto")
    assert json.loads(Image.open(paths[0]).text["facegen"])["autoguidance"] == 2
    off, _ = faces(guided, "off", "--autoguidance", 0)
    plain, _ = faces(tiny_model_dir, "plain")
    assert all(np.array_equal(a, b) for a, b in zip(off, plain))
    assert all(np.abs(a - b).max() > 0 for a, b in zip(auto, off))
    alone, _ = faces(guided, "alone", "--precision", "fp32", seed=6, n=1)
    batch, _ = faces(guided, "batch", "--precision", "fp32")
    assert np.abs(alone[0] - batch[1]).max() <= 1  # float rounding at other batch sizes, as without a guide

    assert_clean_error(run("generate", "--model", tiny_model_dir, "--autoguidance", 2, "--out", tmp_path / "x"),
                       "carries no autoguidance guide")
    shutil.rmtree(guided / "guide")
    assert_clean_error(run("generate", "--model", guided, "--out", tmp_path / "y"), "has no guide/ model")
    config = dict(weaker.dit.config)
    other = type(weaker.dit)(**{**{k: config[k] for k in weaker.dit.config if not k.startswith("_")},
                               "attributes": list(weaker.attributes[::-1])})
    weaker.replaced(dit=other, prior=None).save(tmp_path / "other-guide")
    assert_clean_error(run("export", tiny_model_dir, "--out", tmp_path / "z", "--guide", tmp_path / "other-guide",
                           "--autoguidance", 2), "the guide's attributes are not the model's")


def test_the_stochastic_sampler_draws_from_each_faces_own_seed(tmp_path, tiny_model_dir):
    """--sampler stochastic --eta: fresh noise at every step from the face's seed, recorded in its PNG; a face is
    the same alone or in a batch, and the same again; --eta 0 is Euler."""
    def faces(name, *flags, seed=5, n=3):
        result = run("generate", "--model", tiny_model_dir, "-n", n, "--seed", seed, "--steps", 3, "--precision",
                     "fp32", *flags, "--out", tmp_path / name)
        assert result.exit_code == 0, result.stderr
        paths = result.stdout.split()
        return [np.asarray(Image.open(path)).astype(int) for path in paths], paths

    batch, paths = faces("batch", "--sampler", "stochastic", "--eta", 0.9)
    meta = json.loads(Image.open(paths[0]).text["facegen"])
    assert meta["method"] == "stochastic" and meta["eta"] == 0.9
    alone, _ = faces("alone", "--sampler", "stochastic", "--eta", 0.9, seed=6, n=1)
    assert np.abs(alone[0] - batch[1]).max() <= 1
    again, _ = faces("again", "--sampler", "stochastic", "--eta", 0.9)
    assert all(np.array_equal(a, b) for a, b in zip(batch, again))
    euler, _ = faces("euler", "--sampler", "euler")
    assert any(np.abs(a - b).max() > 2 for a, b in zip(batch, euler))
    no_fresh_noise, _ = faces("eta0", "--sampler", "stochastic", "--eta", 0)
    assert all(np.abs(a - b).max() <= 1 for a, b in zip(no_fresh_noise, euler))
    assert_clean_error(run("generate", "--model", tiny_model_dir, "--eta", 2, "--out", tmp_path / "x"), "eta")
