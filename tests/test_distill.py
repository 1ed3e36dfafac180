import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from facegen_cli import guidance
from facegen_cli.cli import app
from facegen_cli.config import SampleConfig
from facegen_cli.distill import (DistillConfig, distill, guided_requests, shortcut_times, student_of,
                                 teacher_guided)
from facegen_cli.edit_request import edit_sample
from facegen_cli.errors import FacegenError
from facegen_cli.model import LatentDiT
from facegen_cli.pipeline import FacegenPipeline

TINY = DistillConfig(max_steps=4, batch_size=8, cooldown_steps=0, checkpoint_every=2, log_every=1, precision="fp32")


def tiny_dit(**extra):
    torch.manual_seed(0)
    dit = LatentDiT(attributes=("a", "b", "c"), latent_size=8, hidden_size=32, depth=2, num_heads=2, mlp_size=64,
                    **extra)
    for p in dit.parameters():  # a trained model's weights: nothing zero, so that every input matters
        torch.nn.init.normal_(p, std=0.05)
    return dit.eval()


@pytest.fixture(scope="module")
def distilled_run(tmp_path_factory, tiny_run):
    out = tmp_path_factory.mktemp("distilled")
    distill(tiny_run / "model", tiny_run / "latents", out, cfg=TINY)
    return out


def test_a_student_starts_as_its_teachers_plain_model_and_ignores_nothing_it_is_told():
    teacher = tiny_dit()
    student = student_of(teacher).eval()
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([[1.0, 0, -1], [0, 0, 0], [1, 1, 1]])
    with torch.no_grad():
        assert torch.equal(student(x, t, y), teacher(x, t, y))
        # the new embeddings start at zero: told a guidance and a step, it still gives the plain velocity ...
        told = dict(guidance=(torch.tensor([[3.0, 1.5]] * 3), y != 0), step=torch.full((3,), 0.25))
        assert torch.allclose(student(x, t, y, **told), teacher(x, t, y), atol=1e-6)
        for p in list(student.guidance_embedder.parameters()) + list(student.step_embedder.parameters()):
            torch.nn.init.normal_(p, std=0.05)
        # ... and once trained, every one of them moves it
        base = student(x, t, y, **told)
        for other in (dict(told, guidance=(torch.tensor([[5.0, 1.5]] * 3), y != 0)),
                      dict(told, guidance=(torch.tensor([[3.0, 1.0]] * 3), y != 0)),
                      dict(told, guidance=(told["guidance"][0], torch.zeros(3, 3, dtype=torch.bool))),
                      dict(told, step=torch.full((3,), 0.5))):
            assert not torch.allclose(student(x, t, y, **other), base)
        assert torch.equal(student(x, t, y), teacher(x, t, y))  # the plain call never sees them
    with pytest.raises(ValueError, match="together"):
        student(x, t, y, guidance=told["guidance"])
    with pytest.raises(ValueError, match="distilled is False"):
        teacher(x, t, y, **told)


def test_the_guidance_embedding_reads_which_way_each_asked_and_drawn_attribute_points():
    from facegen_cli.model import GuidanceEmbedder

    embedder = GuidanceEmbedder(3, 16)
    for p in embedder.parameters():
        torch.nn.init.normal_(p, std=0.3)
    scales = torch.tensor([[3.0, 1.5]])
    y, asked = torch.tensor([[1.0, -1.0, 0.0]]), torch.tensor([[True, False, False]])
    with torch.no_grad():
        base = embedder(scales, asked, y)
        assert not torch.allclose(embedder(scales, asked, torch.tensor([[-1.0, -1.0, 0.0]])), base)  # the asked flipped
        assert not torch.allclose(embedder(scales, asked, torch.tensor([[1.0, 1.0, 0.0]])), base)  # the drawn flipped


def test_a_students_guidance_gain_calibrates_the_asked_scale_alone():
    student = student_of(tiny_dit()).eval()
    for p in student.guidance_embedder.parameters():
        torch.nn.init.normal_(p, std=0.05)
    calibrated = LatentDiT(**{**student.config, "guidance_gain": 1.25}).eval()
    calibrated.load_state_dict(student.state_dict())
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([[1.0, 0, -1], [0, 1, 0]])
    step, asked = torch.full((2,), 0.25), y != 0
    with torch.no_grad():
        told = calibrated(x, t, y, guidance=(torch.tensor([[3.0, 1.5]] * 2), asked), step=step)
        assert torch.allclose(told, student(x, t, y, guidance=(torch.tensor([[3.5, 1.5]] * 2), asked), step=step))
        assert torch.equal(calibrated(x, t, y), student(x, t, y))  # the plain call is untouched
    assert student_of(calibrated).config.guidance_gain == 1.0  # distilled further, it trains uncalibrated


def test_a_student_of_a_model_saved_before_distillation_existed_loads_back_distilled(tmp_path):
    tiny_dit().save_pretrained(tmp_path / "old")
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    del config["distilled"]  # as the models saved before it were
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    teacher = LatentDiT.from_pretrained(tmp_path / "old")
    assert "distilled" in teacher.config.get("_use_default_values", [])  # diffusers fills in the default
    student = student_of(teacher)
    student.save_pretrained(tmp_path / "dit")
    again = LatentDiT.from_pretrained(tmp_path / "dit")
    assert again.distilled and again.state_dict().keys() == student.state_dict().keys()


def test_the_teachers_guided_target_is_what_generate_samples():
    teacher = tiny_dit()
    x, t = torch.randn(4, 4, 8, 8), torch.rand(1).expand(4)
    y = torch.tensor([[1.0, -1, 1], [1, 0, 0], [0, 0, 0], [-1, 1, 0]])
    drawn = torch.tensor([[0.0, -1, 1], [0, 0, 0], [0, 0, 0], [-1, 0, 0]])  # row 1: all asked; row 2: nothing
    with torch.no_grad():
        target = teacher_guided(teacher, x, t, y, drawn, torch.tensor([[3.0, 1.5]] * 4))
        expected = guidance.composed(teacher, y, drawn, torch.zeros_like(y), 3.0, 1.5)(x, t[:1])
        assert torch.allclose(target, expected, atol=1e-5)
        # everything asked (no prior): classifier-free guidance from all-free at the asked scale
        cfg = guidance.classifier_free(teacher, y[1:2], torch.zeros(1, 3), 3.0)(x[1:2], t[:1])
        assert torch.allclose(target[1:2], cfg, atol=1e-5)


def test_guided_requests_split_each_condition_into_asked_and_drawn():
    labels = torch.where(torch.rand(4000, 3, generator=torch.Generator().manual_seed(0)) < 0.5, 1.0, -1.0)
    y, drawn, asked, scales = guided_requests(labels, torch.Generator().manual_seed(1), TINY)
    assert ((y == 0) | (y == labels)).all()  # attributes are only set free
    assert torch.equal(torch.where(asked, y, drawn), y) and not (asked & (y == 0)).any()
    assert ((drawn == 0) | ~asked).all() and ((drawn == 0) == (asked | (y == 0))).all()
    sizes = asked.sum(1)
    assert all((sizes == k).any() for k in range(4))  # requests of every size
    # as eval's control asks (one attribute alone, the rest free), as generate asks with the label prior
    # (nothing free), and held flips (one asked, all the others drawn): each on a good share of the rows
    assert ((sizes == 1) & (drawn == 0).all(1)).float().mean() > 0.08
    assert ((y != 0).all(1) & (sizes <= 4)).float().mean() > 0.3
    assert ((sizes == 1) & (y != 0).all(1)).float().mean() > 0.05
    assert (scales[:, 0] >= 1).all() and (scales[:, 0] <= 6).all() and (scales[:, 1] <= 2).all()


def test_guided_requests_ask_a_rare_value_alone_on_most_of_the_rows_that_have_it():
    generator = torch.Generator().manual_seed(0)
    rare = torch.rand(20000, generator=generator) < 0.05  # a mustache: 5% of the faces, beside 7 common attributes
    labels = torch.cat([torch.where(rare, 1.0, -1.0)[:, None],
                        torch.where(torch.rand(20000, 7, generator=generator) < 0.5, 1.0, -1.0)], dim=1)
    frequencies = (labels > 0).float().mean(0)

    def asked_alone(cfg, frequencies):
        """Of the faces with the mustache and of those without, the share whose row asks for that alone."""
        y, drawn, asked, _ = guided_requests(labels, torch.Generator().manual_seed(1), cfg, frequencies)
        single = (asked.sum(1) == 1) & (drawn == 0).all(1) & asked[:, 0]
        return single[rare].float().mean().item(), single[~rare].float().mean().item()

    most = 1 / 3 * TINY.single_share  # the rows that ask one attribute alone, the rest free
    mustache, beardless = asked_alone(TINY, frequencies)
    assert mustache > 0.5 * most and beardless < 0.2 * most
    uniform = asked_alone(dataclasses.replace(TINY, rarity_power=0.0), frequencies)
    assert uniform == pytest.approx((most / 8, most / 8), abs=0.01) and mustache > 3 * uniform[0]
    assert asked_alone(TINY, None) == uniform  # no frequencies: uniformly
    with pytest.raises(FacegenError, match="single_share"):
        DistillConfig(single_share=1.5)


def test_shortcut_steps_stay_on_their_grid_and_learn_from_half_steps():
    t, d, half = shortcut_times(5000, 6, torch.Generator().manual_seed(0), "cpu")
    assert set(d.unique().tolist()) == {0.5 ** k for k in range(6)}
    assert (t > 0).all() and (t <= 1).all() and (t - d >= -1e-7).all()
    assert torch.allclose(t / d, (t / d).round())  # t is a multiple of d: the grids a sampler of 1/d steps walks
    assert torch.equal(half, torch.where(d == 1 / 32, 0.0, d / 2))  # the smallest step from the velocity itself
    assert (t == 1).any() and ((d == 1) & (t == 1)).any()


def test_a_distillation_exports_a_student_that_samples_in_few_steps_and_resumes_bit_for_bit(
        tmp_path, tiny_run, distilled_run):
    pipe = FacegenPipeline.load(distilled_run / "model")
    teacher = FacegenPipeline.load(tiny_run / "model")
    assert pipe.student.distilled and pipe.sample.distilled and pipe.sample.steps == TINY.few_steps
    assert not pipe.dit.distilled and pipe.info.init_from == teacher.info.init_from  # the folder's DiT is the teacher
    assert all(torch.allclose(a, b.half().float()) for a, b in zip(pipe.dit.state_dict().values(),
                                                                     teacher.dit.state_dict().values()))
    assert pipe.info.distilled_from.fingerprint and pipe.info.distilled_steps == TINY.max_steps
    assert pipe.info.latent_mean == teacher.info.latent_mean and pipe.fingerprint != teacher.fingerprint
    log = [json.loads(line) for line in (distilled_run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(r["loss"] >= 0 for r in log)
    # the student moved away from the teacher where it was told a guidance and a step, and only there
    weights = load_file(distilled_run / "checkpoints/step-000004/model.safetensors")
    assert any(weights[k].abs().sum() > 0 for k in weights if k.startswith(("guidance_embedder.mlp.2",
                                                                            "step_embedder.mlp.2")))
    distill(tiny_run / "model", tiny_run / "latents", tmp_path / "split", cfg=dataclasses.replace(TINY, max_steps=2))
    distill(tiny_run / "model", tiny_run / "latents", tmp_path / "split", cfg=TINY, resume=True)
    again = load_file(tmp_path / "split/checkpoints/step-000004/model.safetensors")
    assert all(torch.equal(weights[k], again[k]) for k in weights)
    with pytest.raises(FacegenError, match="already holds checkpoints"):
        distill(tiny_run / "model", tiny_run / "latents", tmp_path / "split", cfg=TINY)


def test_a_model_folder_checks_its_student(tmp_path, tiny_run, distilled_run):
    import shutil

    shutil.copytree(distilled_run / "model", tmp_path / "no-student")
    shutil.rmtree(tmp_path / "no-student" / "student")
    with pytest.raises(FacegenError, match="no student/ model"):
        FacegenPipeline.load(tmp_path / "no-student")
    pipe = FacegenPipeline.load(distilled_run / "model")
    pipe.replaced(student=tiny_dit(distilled=True)).write(tmp_path / "other-shape")
    with pytest.raises(FacegenError, match="shape or attributes"):
        FacegenPipeline.load(tmp_path / "other-shape")
    pipe.replaced(student=pipe.dit).write(tmp_path / "plain-student")
    with pytest.raises(FacegenError, match="not a distilled DiT"):
        FacegenPipeline.load(tmp_path / "plain-student")
    pipe.replaced(dit=pipe.student, student=None, info=FacegenPipeline.load(tiny_run / "model").info).write(
        tmp_path / "student-as-dit")
    with pytest.raises(FacegenError, match="already distilled"):
        distill(tmp_path / "student-as-dit", tiny_run / "latents", tmp_path / "again", cfg=TINY)


def test_a_distillation_goes_on_from_an_earlier_student_of_the_same_teacher(tmp_path, tiny_run, distilled_run):
    earlier = FacegenPipeline.load(distilled_run / "model", precision="fp32")
    cfg = dataclasses.replace(TINY, max_steps=2, learning_rate=0.0, warmup_steps=0)  # no step moves the weights
    later = FacegenPipeline.load(distill(tiny_run / "model", tiny_run / "latents", tmp_path / "on", cfg=cfg,
                                         init_student=distilled_run / "model"), precision="fp32")
    assert all(torch.equal(a, b) for a, b in zip(earlier.student.state_dict().values(),
                                                 later.student.state_dict().values()))
    assert later.info.distilled_steps == earlier.info.distilled_steps + 2
    assert later.info.distilled_from == earlier.info.distilled_from  # still the teacher's student
    with pytest.raises(FacegenError, match="not a distilled model"):
        distill(tiny_run / "model", tiny_run / "latents", tmp_path / "no", cfg=cfg, init_student=tiny_run / "model")
    teacher = FacegenPipeline.load(tiny_run / "model")
    with torch.no_grad():
        for p in teacher.dit.parameters():
            p.add_(0.01)
    teacher.write(tmp_path / "other")  # the same shape, other weights
    with pytest.raises(FacegenError, match="not distilled from this teacher"):
        distill(tmp_path / "other", tiny_run / "latents", tmp_path / "no2", cfg=cfg,
                init_student=distilled_run / "model")


def test_a_students_face_is_its_seeds_alone_and_steps_call_it_once_each(distilled_run):
    pipe = FacegenPipeline.load(distilled_run / "model")
    calls = []
    pipe.student.register_forward_hook(lambda module, args, kwargs, out: calls.append((len(args[0]), kwargs)),
                                       with_kwargs=True)
    y = torch.zeros(len(pipe.attributes))
    y[0] = 1
    conditions, drawn = pipe.draw_free(y, [0, 1, 2])
    together = pipe.generate(conditions, [0, 1, 2], drawn=drawn)
    assert len(calls) == TINY.few_steps and all(n == 3 for n, _ in calls)  # one call of the batch per step
    assert all(float(kwargs["step"][0]) == 1 / TINY.few_steps for _, kwargs in calls)
    alone = pipe.generate(conditions[1:2], [1], drawn=drawn[1:2])
    assert torch.allclose(together[1:2], alone, atol=1e-4)
    with pytest.raises(FacegenError, match="all-free reference"):
        pipe.generate(y, [0], reference=-y)
    calls.clear()
    plain = pipe.settings(distilled=False)
    assert pipe.generate(y, [0], plain).shape == together[:1].shape and not calls  # the teacher's many steps
    with pytest.raises(FacegenError, match="not distilled"):
        FacegenPipeline.load(distilled_run / "model").replaced(student=None).generate(y, [0])


def test_edits_and_undistilled_sampling_take_the_many_step_path():
    few = SampleConfig(steps=4, method="euler", distilled=True)
    assert few.undistilled() == SampleConfig(steps=13, method="heun", distilled=False)  # the teacher's 25 calls
    assert edit_sample(few) == SampleConfig(steps=25, method="euler", distilled=False)
    heun = SampleConfig(steps=13, method="heun")
    assert heun.undistilled() is heun and edit_sample(heun).steps == 25
    with pytest.raises(FacegenError, match="distilled must be"):
        SampleConfig(distilled="yes")


def test_the_cli_distils_and_generates_with_or_without_the_students_few_steps(tmp_path, tiny_run, distilled_run):
    from typer.testing import CliRunner

    runner = CliRunner()
    result = runner.invoke(app, ["generate", "--model", str(distilled_run / "model"), "-n", "2", "--seed", "3",
                                 "--out", str(tmp_path / "few"), "--precision", "fp32"])
    assert result.exit_code == 0, result.output
    assert len(result.stdout.split()) == 2 and "distilled=True" in result.output
    result = runner.invoke(app, ["generate", "--model", str(distilled_run / "model"), "-n", "1", "--no-distilled",
                                 "--out", str(tmp_path / "many"), "--precision", "fp32"])
    assert result.exit_code == 0 and "steps=13" in result.output and "distilled=False" in result.output
    result = runner.invoke(app, ["generate", "--model", str(tiny_run / "model"), "-n", "1", "--distilled",
                                 "--out", str(tmp_path / "no")])
    assert result.exit_code != 0 and "not distilled" in result.output
    result = runner.invoke(app, ["distill", "--model", str(tiny_run / "model"), "--data", str(tiny_run / "latents"),
                                 "--out", str(tmp_path / "run"), "--steps", "1", "--batch-size", "4",
                                 "--precision", "fp32"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(tmp_path / "run" / "model")
    assert FacegenPipeline.load(tmp_path / "run" / "model").sample.distilled
