import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from facegen_cli import flow
from facegen_cli.config import load_preset
from facegen_cli.errors import FacegenError
from facegen_cli.pipeline import FacegenPipeline
from facegen_cli.runs import batch_indices, scheduled_lr
from facegen_cli.train import (balanced_batch_indices, drop_labels, free_branch_weights, rare_boosts, sampling_weights,
                               train)
from facegen_cli.vae import load_vae, vae_fingerprint, weights_fingerprint


def messages_of(caplog):
    return [record.getMessage() for record in caplog.records]


def test_batches_cover_each_epoch_once():
    seen = torch.cat([batch_indices(20, 5, step, seed=0) for step in range(4)])
    assert sorted(seen.tolist()) == list(range(20))
    assert not torch.equal(batch_indices(20, 5, 0, seed=0), batch_indices(20, 5, 4, seed=0))  # reshuffled
    shares = [batch_indices(20, 8, 3, seed=0, rank=r, world_size=2) for r in range(2)]
    assert sorted(torch.cat(shares).tolist()) == sorted(batch_indices(20, 8, 3, seed=0).tolist())


def test_rare_attributes_are_drawn_at_least_at_the_rare_rate():
    generator = torch.Generator().manual_seed(0)
    labels = torch.where(torch.rand(20000, 3, generator=generator) < torch.tensor([0.5, 0.02, 0.05]), 1, -1)
    weights = sampling_weights(labels, rare_boosts(labels, 0.1))
    assert torch.equal(weights[(labels[:, 1:] < 0).all(1)], torch.ones(int((labels[:, 1:] < 0).all(1).sum())))
    drawn = torch.cat([balanced_batch_indices(weights, 256, step, seed=0) for step in range(200)])
    shown = (labels[drawn] > 0).float().mean(0)
    assert 0.08 < shown[1] < 0.12 and 0.08 < shown[2] < 0.13  # both rare ones lifted to about 10%
    assert 0.4 < shown[0] < 0.6  # the common one stays about where it was
    assert torch.equal(balanced_batch_indices(weights, 16, 7, seed=0), balanced_batch_indices(weights, 16, 7, seed=0))
    shares = [balanced_batch_indices(weights, 16, 7, seed=0, rank=r, world_size=2) for r in range(2)]
    assert sorted(torch.cat(shares).tolist()) == sorted(balanced_batch_indices(weights, 16, 7, seed=0).tolist())


def test_free_branch_weights_undo_the_oversampling_where_the_rare_attribute_is_free():
    generator = torch.Generator().manual_seed(0)
    labels = torch.where(torch.rand(20000, 3, generator=generator) < torch.tensor([0.5, 0.02, 0.05]), 1, -1)
    boosts = rare_boosts(labels, 0.1)
    weights = sampling_weights(labels, boosts)
    drawn = torch.cat([balanced_batch_indices(weights, 256, step, seed=0) for step in range(400)])
    y = drop_labels(labels[drawn], generator, 0.3, 0.1)
    loss_weights = free_branch_weights(y, weights[drawn], boosts)
    # Faces whose rare attributes are all kept keep their weight 1: the extra examples stay.
    assert torch.equal(loss_weights[(y[:, 1:] == labels[drawn][:, 1:]).all(1)], torch.ones(int(
        (y[:, 1:] == labels[drawn][:, 1:]).all(1).sum())))
    # Where attribute 1 is free, the weighted share of its positives is the data's (2%), not the drawn 10%.
    free = y[:, 1] == 0
    drawn_share = (labels[drawn][free, 1] > 0).float().mean()
    weighted_share = (loss_weights[free] * (labels[drawn][free, 1] > 0)).sum() / loss_weights[free].sum()
    assert drawn_share > 0.08 and 0.015 < weighted_share < 0.025
    # The same within a condition: male (attribute 0) asked, the rest free.
    asked = free & (y[:, 0] > 0)
    share = (loss_weights[asked] * (labels[drawn][asked, 1] > 0)).sum() / loss_weights[asked].sum()
    natural = (labels[labels[:, 0] > 0, 1] > 0).float().mean()
    assert abs(share - natural) < 0.006


def test_weighted_flow_loss_is_the_weighted_mean_of_the_examples_losses():
    model = lambda x, t, y: x * 0.5 + y.sum(1).view(-1, 1, 1, 1)  # noqa: E731
    x0, y = torch.randn(4, 4, 8, 8), torch.tensor([[1.0], [0.0], [-1.0], [1.0]])
    loss = lambda w: flow.flow_loss(model, x0, y, torch.Generator().manual_seed(0), 0.1, weights=w)[0]  # noqa: E731
    each = torch.stack([loss(torch.eye(4)[i]) for i in range(4)])  # same noise and times: the same generator
    assert len(set(each.tolist())) == 4
    assert torch.allclose(loss(None), each.mean())
    w = torch.tensor([0.5, 2.0, 1.0, 0.25])
    assert torch.allclose(loss(w), (w * each).sum() / w.sum())


def test_label_dropout_only_frees_attributes():
    labels = torch.randint(0, 2, (1000, 12)) * 2 - 1
    dropped = drop_labels(labels, torch.Generator().manual_seed(0), 0.3, 0.1)
    assert ((dropped == labels) | (dropped == 0)).all()
    assert 0.3 < (dropped == 0).float().mean() < 0.45  # 0.3 + 0.1 * 0.7
    assert 0.05 < (dropped == 0).all(dim=1).float().mean() < 0.15


def test_uniform_dropout_trains_requests_of_every_size():
    labels = torch.randint(0, 2, (26000, 12)) * 2 - 1
    asked = (drop_labels(labels, torch.Generator().manual_seed(0), 0.3, 0.0, uniform=True) != 0).sum(1)
    shares = torch.bincount(asked, minlength=13) / len(asked)
    assert (shares > 0.06).all() and (shares < 0.095).all()  # 0 to 12 asked: each about 1/13
    fixed = (drop_labels(labels, torch.Generator().manual_seed(0), 0.3, 0.0) != 0).sum(1)
    assert (fixed <= 2).float().mean() < 0.001  # what a fixed rate of 0.3 leaves for one or two asked


def test_learning_rate_warms_up_holds_and_cools_down_to_zero():
    constant = [scheduled_lr(step, 1e-3, warmup_steps=10, max_steps=100) for step in range(100)]
    assert constant[0] == pytest.approx(1e-4) and constant[9:] == [pytest.approx(1e-3)] * 91
    cooled = [scheduled_lr(step, 1e-3, warmup_steps=10, max_steps=100, cooldown_steps=20) for step in range(100)]
    assert cooled[:80] == constant[:80]  # the cooldown leaves the rest of the run alone
    assert cooled[80:] == [pytest.approx(1e-3 * (100 - s) / 20) for s in range(80, 100)]
    assert cooled[-1] == pytest.approx(1e-3 / 20)  # reaches 0 at max_steps itself


def test_resume_continues_bit_for_bit(tmp_path, tiny_run):
    cache = tiny_run / "latents"
    preset = load_preset("tiny")
    train(preset.with_train(max_steps=8), cache, tmp_path / "straight")
    train(preset.with_train(max_steps=4), cache, tmp_path / "split")
    train(preset.with_train(max_steps=8), cache, tmp_path / "split", resume=True)
    a = load_file(tmp_path / "straight/checkpoints/step-000008/model.safetensors")
    b = load_file(tmp_path / "split/checkpoints/step-000008/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ema_a = torch.load(tmp_path / "straight/checkpoints/step-000008/ema.pt", weights_only=True)
    ema_b = torch.load(tmp_path / "split/checkpoints/step-000008/ema.pt", weights_only=True)
    assert all(torch.equal(x, y) for x, y in zip(ema_a["shadow_params"], ema_b["shadow_params"]))
    # Training moved the weights away from the zero-initialised output layer.
    assert a["final_layer.linear.weight"].abs().sum() > 0


def test_checkpoints_read_back_what_was_written_and_keep_the_newest(tmp_path):
    from facegen_cli.runs import latest_checkpoint, newest_intact_checkpoint, save_checkpoint

    weights = {"net": {"w": torch.arange(6.0).view(2, 3).t()}}  # not contiguous: written all the same
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, weights, {"optimizer": {"lr": 0.1 * step}}, {"preset": "tiny"}, keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000002", "step-000003"]
    path, (state, networks, states) = newest_intact_checkpoint(tmp_path, ("net",), ("optimizer",))
    assert path == latest_checkpoint(tmp_path) and state == {"preset": "tiny", "step": 3}
    assert torch.equal(networks["net"]["w"], weights["net"]["w"]) and states["optimizer"] == {"lr": 0.1 * 3}


def test_resume_passes_over_a_damaged_latest_checkpoint_and_still_ends_bit_for_bit(tmp_path, tiny_run, caplog):
    cache = tiny_run / "latents"
    preset = load_preset("tiny")
    train(preset.with_train(max_steps=6), cache, tmp_path / "straight")
    run = tmp_path / "damaged"
    train(preset.with_train(max_steps=2), cache, run)
    train(preset.with_train(max_steps=4), cache, run, resume=True)
    (run / "checkpoints/step-000004/model.safetensors").write_bytes(b"cut short")
    caplog.set_level("INFO", logger="facegen_cli")
    train(preset.with_train(max_steps=6), cache, run, resume=True)
    messages = messages_of(caplog)
    assert any("step-000004 is damaged" in m for m in messages)
    assert any("resuming from" in m and "step-000002" in m for m in messages)
    a = load_file(tmp_path / "straight/checkpoints/step-000006/model.safetensors")
    b = load_file(run / "checkpoints/step-000006/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    for step in ("000004", "000006"):  # the two kept
        (run / f"checkpoints/step-{step}/ema.pt").write_bytes(b"")
    with pytest.raises(FacegenError, match="every checkpoint is damaged"):
        train(preset.with_train(max_steps=8), cache, run, resume=True)


def test_a_run_is_not_overwritten_and_resumes_only_with_its_preset(tmp_path, tiny_run):
    cache = tiny_run / "latents"
    train(load_preset("tiny").with_train(max_steps=2), cache, tmp_path / "run")
    with pytest.raises(FacegenError, match="--resume"):
        train(load_preset("tiny").with_train(max_steps=4), cache, tmp_path / "run")
    with pytest.raises(FacegenError, match="preset 'tiny'"):
        train(load_preset("dit-s").with_train(max_steps=4), cache, tmp_path / "run", resume=True)


def test_exported_model_carries_config_and_statistics(tiny_model_dir, tiny_run):
    info = json.loads((tiny_model_dir / "facegen.json").read_text())
    cache_meta = json.loads((tiny_run / "latents/cache.json").read_text())
    assert info["latent_mean"] == cache_meta["latent_mean"] and info["preset"] == "tiny"
    pipe = FacegenPipeline.load(tiny_model_dir)
    assert pipe.attributes == cache_meta["attributes"]
    images = pipe.generate(torch.zeros(12), seeds=[0, 1], settings=pipe.settings(steps=2))
    assert images.shape == (2, 3, 128, 128) and images.min() >= -1 and images.max() <= 1
    # Each face depends on its own seed only, not on what else is in the batch.
    assert torch.allclose(pipe.generate(torch.zeros(12), seeds=[1], settings=pipe.settings(steps=2))[0], images[1],
                          atol=1e-4)


def test_fine_tuning_starts_from_the_init_model_and_resumes_bit_for_bit(tmp_path, tiny_run, tiny_model_dir):
    cache = tiny_run / "latents"
    preset = load_preset("tiny")
    frozen = dataclasses.replace(preset, train=dataclasses.replace(preset.train, learning_rate=0.0))
    # With a learning rate of 0 the fine-tuned model is exactly the one it started from.
    model_dir = train(frozen.with_train(max_steps=2), cache, tmp_path / "frozen", init_from=tiny_model_dir)
    start, tuned = FacegenPipeline.load(tiny_model_dir), FacegenPipeline.load(model_dir)
    assert all(torch.equal(a, b) for a, b in zip(start.dit.state_dict().values(), tuned.dit.state_dict().values()))
    info = json.loads((model_dir / "facegen.json").read_text())
    assert info["trained_steps"] == 6 + 2 and info["init_from"]["name"] == f"{tiny_model_dir.parent.name}/model"
    assert info["init_from"]["fingerprint"] == weights_fingerprint(start.dit)  # by name and weights, not by path
    assert info["latent_mean"] == start.info.latent_mean

    # Where the VAE came from (its training run, a fine-tuned decoder) carries over from the init model.
    recorded = tmp_path / "recorded"
    shutil.copytree(tiny_model_dir, recorded)
    record = json.loads((recorded / "facegen.json").read_text())
    record.update(vae={"name": "vae", "fingerprint": "0123456789abcdef"},
                  decoder={"name": "decoder", "fingerprint": "fedcba9876543210"})
    (recorded / "facegen.json").write_text(json.dumps(record))
    info = json.loads((train(frozen.with_train(max_steps=1), cache, tmp_path / "carried", init_from=recorded)
                       / "facegen.json").read_text())
    assert (info["vae"]["name"], info["decoder"]["name"]) == ("vae", "decoder")

    train(preset.with_train(max_steps=4), cache, tmp_path / "straight", init_from=tiny_model_dir)
    train(preset.with_train(max_steps=2), cache, tmp_path / "split", init_from=recorded)
    train(preset.with_train(max_steps=4), cache, tmp_path / "split", resume=True)
    a = load_file(tmp_path / "straight/checkpoints/step-000004/model.safetensors")
    b = load_file(tmp_path / "split/checkpoints/step-000004/model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    resumed = json.loads((tmp_path / "split/model/facegen.json").read_text())
    assert resumed["trained_steps"] == 6 + 4 and resumed["decoder"]["fingerprint"] == "fedcba9876543210"
    assert not torch.equal(a["final_layer.linear.weight"], start.dit.state_dict()["final_layer.linear.weight"])


def test_fine_tuning_refuses_a_model_of_another_preset_or_vae(tmp_path, tiny_run, tiny_model_dir):
    cache = tiny_run / "latents"
    with pytest.raises(FacegenError, match="does not match this run.s preset and data: hidden_size 64 vs 384; depth 2 vs 12"):
        train(load_preset("dit-s").with_train(max_steps=1), cache, tmp_path / "a", init_from=tiny_model_dir)
    other_vae = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other_vae)
    vae = load_vae(other_vae / "vae")
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(0.1)
    vae.save_pretrained(other_vae / "vae")
    with pytest.raises(FacegenError, match="another VAE.*--other-vae"):
        train(load_preset("tiny").with_train(max_steps=1), cache, tmp_path / "b", init_from=other_vae)


def test_fine_tuning_on_another_autoencoders_latents_takes_their_statistics_and_vae(tmp_path, tiny_run,
                                                                                    tiny_model_dir):
    """--other-vae: the DiT's weights carry over from a model of another encoder; the new model normalises
    and decodes as the latents' own autoencoder does."""
    cache, other = tiny_run / "latents", tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    vae = load_vae(other / "vae")
    with torch.no_grad():
        vae.encoder.conv_in.bias.add_(0.1)
    vae.save_pretrained(other / "vae")
    with open(other / "facegen.json") as f:
        recorded = json.load(f)
    recorded["latent_mean"] = [m + 1.0 for m in recorded["latent_mean"]]
    (other / "facegen.json").write_text(json.dumps(recorded))
    with pytest.raises(FacegenError, match="give --init-from"):
        train(load_preset("tiny").with_train(max_steps=1), cache, tmp_path / "d", other_vae=True)
    model_dir = train(load_preset("tiny").with_train(max_steps=1), cache, tmp_path / "c", init_from=other,
                      other_vae=True)
    info, meta = json.loads((model_dir / "facegen.json").read_text()), json.loads((cache / "cache.json").read_text())
    assert info["latent_mean"] == meta["latent_mean"] != recorded["latent_mean"]
    assert info["vae"]["fingerprint"] == vae_fingerprint(load_vae(tiny_run / "model" / "vae"), encoder_only=True)
    assert info["init_from"]["fingerprint"] == weights_fingerprint(FacegenPipeline.load(other).dit)


def test_train_refuses_latents_whose_vae_has_changed_since_encoding(tmp_path, tiny_data):
    from conftest import make_tiny_vae
    from facegen_cli.cache import encode_dataset

    vae_dir = tmp_path / "vae"
    make_tiny_vae().save_pretrained(vae_dir)
    encode_dataset(tiny_data, str(vae_dir), tmp_path / "latents", image_size=128)
    changed = make_tiny_vae()
    with torch.no_grad():
        changed.decoder.conv_out.weight.add_(0.1)
    changed.save_pretrained(vae_dir)  # replaced in place after encoding
    with pytest.raises(FacegenError, match="has changed since the latents were encoded"):
        train(load_preset("tiny").with_train(max_steps=1), tmp_path / "latents", tmp_path / "run")
    assert not (tmp_path / "run" / "model").exists()


def test_two_processes_train_like_one_at_the_same_global_batch_and_resume(tmp_path, tiny_run):
    """`accelerate launch` with 2 processes on the CPU (gloo): one checkpoint, a resume, one log, and the
    loss curve of a single process at the same global batch (each process draws its own noise)."""
    import os
    import subprocess
    import sys

    cache = tiny_run / "latents"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def launch(*args):
        command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--main_process_port", "29517", "-m", "facegen_cli.cli", "train", "--data", str(cache),
                   "--preset", "tiny", "--out", str(tmp_path / "two"), *args]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)

    first = launch("--steps", "50")
    assert first.returncode == 0, first.stderr
    assert "x 2 processes" in first.stderr and first.stderr.count("training tiny") == 1
    assert first.stdout.split() == [str(tmp_path / "two" / "model")]  # printed once
    assert [p.name for p in (tmp_path / "two" / "checkpoints").iterdir()] == ["step-000050"]
    resumed = launch("--steps", "60", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr and "steps 50..60" in resumed.stderr

    train(load_preset("tiny").with_train(max_steps=60), cache, tmp_path / "one")
    curves = [[json.loads(line)["loss"] for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
              for run in ("one", "two")]
    assert len(curves[0]) == len(curves[1]) == 6  # every 10 steps, the resumed run's included
    assert curves[1][-1] < curves[1][0] - 0.3  # it learns
    assert all(abs(a - b) / a < 0.1 for a, b in zip(*curves))  # as one process does, within the noise


def test_a_run_can_read_the_latents_as_another_model_does(tmp_path, tiny_run, tiny_model_dir):
    """--latent-stats-from: the latents normalised with that model's statistics (a guide must read the inputs its
    model reads), kept across a resume; refused beside --init-from, which sets them already."""
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    info = json.loads((other / "facegen.json").read_text())
    info["latent_mean"] = [m + 0.5 for m in info["latent_mean"]]
    info["latent_std"] = [s * 2 for s in info["latent_std"]]
    (other / "facegen.json").write_text(json.dumps(info))
    preset = load_preset("tiny")
    train(preset.with_train(max_steps=2), tiny_run / "latents", tmp_path / "run", latent_stats_from=other)
    train(preset.with_train(max_steps=4), tiny_run / "latents", tmp_path / "run", resume=True)
    exported = json.loads((tmp_path / "run/model/facegen.json").read_text())
    assert exported["latent_mean"] == info["latent_mean"] and exported["latent_std"] == info["latent_std"]
    with pytest.raises(FacegenError, match="leave out --latent-stats-from"):
        train(preset.with_train(max_steps=2), tiny_run / "latents", tmp_path / "both", init_from=tiny_model_dir,
              latent_stats_from=other)
    from facegen_cli.pipeline import DEMO_MODEL

    with pytest.raises(FacegenError, match="encoder is not the one that encoded"):
        train(preset.with_train(max_steps=2), tiny_run / "latents", tmp_path / "demo", latent_stats_from=DEMO_MODEL)
