import pytest
import torch

from facegen_cli.errors import FacegenError
from facegen_cli.label_prior import LabelPrior, prior_of_data

ATTRIBUTES = ("male", "beard", "smiling")
# 6 women smiling or not, never bearded; 4 men, 3 of them bearded
LABELS = torch.tensor([[-1, -1, 1]] * 3 + [[-1, -1, -1]] * 3 + [[1, 1, 1]] * 2 + [[1, 1, -1]] + [[1, -1, -1]])


def test_free_attributes_are_drawn_from_the_faces_that_agree_with_the_asked_ones():
    prior = LabelPrior.from_labels(ATTRIBUTES, LABELS)
    assert prior.counts.sum() == 10 and len(prior.counts) == 5
    seeds = list(range(2000))
    men, drawn = prior.draw(torch.tensor([1.0, 0, 0]), seeds)
    assert drawn.all() and (men[:, 0] == 1).all() and (men != 0).all()
    assert (men[:, 1] == 1).float().mean() == pytest.approx(0.75, abs=0.04)  # 3 of the 4 men are bearded
    assert (men[:, 2] == 1).float().mean() == pytest.approx(0.5, abs=0.04)
    anyone, _ = prior.draw(torch.zeros(3), seeds)
    assert (anyone[:, 0] == 1).float().mean() == pytest.approx(0.4, abs=0.04)
    assert not ((anyone[:, 0] == -1) & (anyone[:, 1] == 1)).any()  # the joint, not independent coins
    # a face's draw is its seed's alone, whatever else is in the batch
    mixed = torch.tensor([[1.0, 0, 0], [0, 0, 0], [1.0, 0, 0]])
    alone = torch.cat([prior.draw(row, [s])[0] for row, s in zip(mixed, [5, 6, 7])])
    assert torch.equal(prior.draw(mixed, [5, 6, 7])[0], alone)


def test_a_combination_no_training_face_had_stays_free():
    prior = LabelPrior.from_labels(ATTRIBUTES, LABELS)
    conditions, drawn = prior.draw(torch.tensor([[-1.0, 1, 0], [1.0, 0, 0]]), [0, 1])
    assert drawn.tolist() == [False, True]
    assert conditions[0].tolist() == [-1.0, 1.0, 0.0]


def test_the_prior_round_trips_through_its_file_and_is_checked_against_the_model(tmp_path):
    prior = LabelPrior.from_labels(ATTRIBUTES, LABELS)
    prior.save(tmp_path / "labels.json")
    again = LabelPrior.load(tmp_path / "labels.json", ATTRIBUTES)
    assert torch.equal(again.combinations, prior.combinations) and torch.equal(again.counts, prior.counts)
    with pytest.raises(FacegenError, match="not the model's attributes"):
        LabelPrior.load(tmp_path / "labels.json", ("male", "young", "smiling"))
    (tmp_path / "bad.json").write_text('{"attributes": ["male"], "combinations": {"x": 1}}')
    with pytest.raises(FacegenError, match="not a label prior"):
        LabelPrior.load(tmp_path / "bad.json", ("male",))


def test_prior_of_data_reads_the_train_split_in_the_models_order(tiny_data):
    from facegen_cli.attributes import DEFAULT_ATTRIBUTES
    from facegen_cli.data import read_dataset

    order = list(reversed(DEFAULT_ATTRIBUTES))
    prior = prior_of_data(tiny_data, order)
    labels = read_dataset(tiny_data, "train").labels
    assert prior.attributes == tuple(order) and prior.counts.sum() == len(labels)
    first = labels[0, [DEFAULT_ATTRIBUTES.index(a) for a in order]].to(torch.int8)
    assert any(torch.equal(first, row) for row in prior.combinations)
    with pytest.raises(FacegenError, match="no 'gray_hair'"):
        prior_of_data(tiny_data, ["gray_hair"])
