import numpy as np
import pytest
import torch
from PIL import Image

from facegen_cli.attributes import DEFAULT_ATTRIBUTES, AttributeRequest, celeba_column, flag_names
from facegen_cli.cache import encode_dataset, load_cache
from facegen_cli.data import read_dataset
from facegen_cli.images import load_image
from facegen_cli.errors import FacegenError

CELEBA_COLUMNS = ("5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips Big_Nose "
                  "Black_Hair Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee "
                  "Gray_Hair Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard "
                  "Oval_Face Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair "
                  "Wavy_Hair Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace Wearing_Necktie "
                  "Young").split()


def write_celeba(root, rows, partition=None):
    """rows: {filename: {column: +1}}; unspecified columns are -1. Images are 178x218 like CelebA's."""
    (root / "img_align_celeba").mkdir(parents=True)
    lines = [str(len(rows)), " ".join(CELEBA_COLUMNS)]
    for name, positives in rows.items():
        values = ["1" if c in positives else "-1" for c in CELEBA_COLUMNS]
        lines.append(f"{name} " + " ".join(values))
        Image.new("RGB", (178, 218), (100, 150, 200)).save(root / "img_align_celeba" / name)
    (root / "list_attr_celeba.txt").write_text("\n".join(lines) + "\n")
    if partition:
        (root / "list_eval_partition.txt").write_text("".join(f"{n} {p}\n" for n, p in partition.items()))
    return root


def test_celeba_columns_and_flags():
    assert celeba_column("beard") == ("No_Beard", True)
    assert celeba_column("black_hair") == ("Black_Hair", False)
    assert celeba_column("Gray Hair") == ("Gray_Hair", False) and celeba_column("rosy-cheeks") == ("Rosy_Cheeks", False)
    assert flag_names("male") == ("--male", "--female")
    assert flag_names("wearing_hat") == ("--wearing-hat", "--no-wearing-hat")


def test_request_vector_and_unknown_names():
    y = AttributeRequest(DEFAULT_ATTRIBUTES, ["male", "beard"], ["smiling"]).condition()[0]
    assert y[DEFAULT_ATTRIBUTES.index("male")] == 1 and y[DEFAULT_ATTRIBUTES.index("smiling")] == -1
    assert int(y.abs().sum()) == 3
    with pytest.raises(FacegenError, match="unknown attribute 'beards'.*male, young"):
        AttributeRequest(DEFAULT_ATTRIBUTES, ["beards"])
    with pytest.raises(FacegenError, match="both"):
        AttributeRequest(DEFAULT_ATTRIBUTES, ["male"], ["male"])


def test_celeba_layout_parses_with_inverted_beard_and_partition(tmp_path):
    root = write_celeba(tmp_path / "celeba", {
        "000001.jpg": {"Male", "No_Beard", "Smiling"},
        "000002.jpg": {"Male", "Eyeglasses"},
        "000003.jpg": {"Young", "No_Beard"},
    }, partition={"000001.jpg": 0, "000002.jpg": 0, "000003.jpg": 2})
    data = read_dataset(root)
    assert data.attributes == DEFAULT_ATTRIBUTES and len(data.paths) == 3
    col = {name: i for i, name in enumerate(DEFAULT_ATTRIBUTES)}
    assert data.labels[0, col["male"]] == 1 and data.labels[0, col["beard"]] == -1
    assert data.labels[1, col["beard"]] == 1 and data.labels[1, col["eyeglasses"]] == 1
    assert data.labels[2, col["young"]] == 1 and data.labels[2, col["male"]] == -1
    train = read_dataset(root, split="train")
    assert [p.name for p in train.paths] == ["000001.jpg", "000002.jpg"]
    assert load_image(train.paths[0], 128).shape == (128, 128, 3)


def test_csv_layout_keeps_its_own_vocabulary(tiny_data):
    data = read_dataset(tiny_data)
    assert data.attributes == DEFAULT_ATTRIBUTES and data.labels.shape == (24, 12)
    assert set(data.labels.unique().tolist()) <= {-1, 0, 1}


@pytest.mark.parametrize("content, message", [
    (None, "no such data folder"),
    ("", "no list_attr_celeba.txt"),
    ("filename,male\n", "lists no images"),
    ("name,male\na.png,1\n", "'filename' column"),
    ("filename,male\na.png,2\n", "1, -1 or 0"),
])
def test_bad_data_sets_are_refused(tmp_path, content, message):
    root = tmp_path / "data"
    if content is not None:
        root.mkdir()
        if content:
            (root / "attributes.csv").write_text(content)
    with pytest.raises(FacegenError, match=message):
        read_dataset(root)


def messages_of(caplog):
    return [record.getMessage() for record in caplog.records]


def test_encode_skips_corrupt_images_counts_them_and_refuses_another_vae(tmp_path, tiny_vae_dir, caplog):
    from conftest import make_tiny_vae, write_labelled_folder

    root = write_labelled_folder(tmp_path / "data", 5)
    (root / "img_0002.png").write_bytes(b"not an image")
    caplog.set_level("INFO", logger="facegen_cli")
    meta = encode_dataset(root, tiny_vae_dir, tmp_path / "cache", workers=0)
    assert meta.num_images == 4 and meta.num_unreadable == 1
    assert any("img_0002.png" in w for w in messages_of(caplog))
    latents, labels, meta = load_cache(tmp_path / "cache")
    assert latents.shape == (4, 4, 16, 16) and labels.shape == (4, 12)
    assert np.allclose(meta.latent_mean, latents.double().mean(dim=(0, 2, 3)).numpy(), atol=1e-3)

    # Running again resumes (nothing to do) and gives the same cache.
    again = encode_dataset(root, tiny_vae_dir, tmp_path / "cache", workers=0)
    assert again.latent_mean == meta.latent_mean

    other = make_tiny_vae()
    with __import__("torch").no_grad():
        other.encoder.conv_in.weight.mul_(2)
    other.save_pretrained(tmp_path / "other-vae")
    with pytest.raises(FacegenError, match="refusing to mix"):
        encode_dataset(root, tmp_path / "other-vae", tmp_path / "cache", workers=0)


def test_a_damaged_shard_is_reported_by_train_and_encoded_anew_by_encode(tmp_path, tiny_vae_dir, caplog):
    from conftest import write_labelled_folder

    root = write_labelled_folder(tmp_path / "data", 5)
    meta = encode_dataset(root, tiny_vae_dir, tmp_path / "cache", workers=0)
    latents, _, _ = load_cache(tmp_path / "cache")
    shard = tmp_path / "cache" / "shard-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])  # cut short
    with pytest.raises(FacegenError, match="shard-00000.safetensors is damaged.*facegen encode"):
        load_cache(tmp_path / "cache")
    caplog.set_level("INFO", logger="facegen_cli")
    again = encode_dataset(root, tiny_vae_dir, tmp_path / "cache", workers=0)
    assert any("shard-00000.safetensors is damaged" in m for m in messages_of(caplog))
    assert again.latent_mean == meta.latent_mean
    assert __import__("torch").equal(load_cache(tmp_path / "cache")[0], latents)


def test_encode_of_only_unreadable_images_fails(tmp_path, tiny_vae_dir):
    root = tmp_path / "data"
    root.mkdir()
    (root / "a.png").write_bytes(b"junk")
    (root / "attributes.csv").write_text("filename,male\na.png,1\n")
    with pytest.raises(FacegenError, match="none of the 1 images"):
        encode_dataset(root, tiny_vae_dir, tmp_path / "cache", workers=0)


def test_sixteen_bit_grey_photos_are_read_as_their_grey_levels_not_white(tmp_path):
    from facegen_cli.images import load_image, to_rgb

    ramp = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")  # a 16-bit greyscale PNG
    with Image.open(tmp_path / "deep.png") as image:
        assert image.mode.startswith("I")
        rgb = np.asarray(to_rgb(image))
    assert rgb.shape == (64, 64, 3) and rgb.min() == 0 and rgb.max() == 255
    assert np.allclose(rgb[..., 0], np.rint(ramp / 257), atol=1)
    assert 100 < load_image(tmp_path / "deep.png", 32).mean() < 155


@pytest.mark.parametrize("count, columns, padding", [(5, 3, 2), (4, 2, 0), (1, 8, 2), (12, 4, 1)])
def test_image_grid_lays_faces_out_as_torchvisions_make_grid_does(count, columns, padding):
    from torchvision.utils import make_grid

    from facegen_cli.images import image_grid

    images = np.random.default_rng(count).integers(0, 256, (count, 6, 5, 3), dtype=np.uint8)
    grid = image_grid(images, columns, padding)
    if count > 1:  # make_grid returns a lone image unpadded
        expected = make_grid(torch.from_numpy(images).permute(0, 3, 1, 2), nrow=columns, padding=padding)
        assert np.array_equal(grid, expected.permute(1, 2, 0).numpy())
    assert np.array_equal(grid[padding:padding + 6, padding:padding + 5], images[0])


def test_a_csv_column_with_a_space_makes_a_label_file_that_reads_back(tmp_path):
    """`data align` writes CelebA's layout, whose columns are separated by spaces."""
    from facegen_cli.align import read_labels
    from facegen_cli.layout import ATTRIBUTE_FILE, read_attribute_file, write_layout

    (tmp_path / "labels.csv").write_text("filename,Gray Hair,male\na.jpg,1,-1\nb.jpg,-1,1\n")
    columns, labels = read_labels(tmp_path / "labels.csv")
    assert columns == ["Gray_Hair", "Male"]
    write_layout(tmp_path, columns, [(name, values, 0, None) for name, values in labels.items()])
    table = read_attribute_file(tmp_path / ATTRIBUTE_FILE)
    assert table.columns == columns and table.values.tolist() == [[1, -1], [-1, 1]]
