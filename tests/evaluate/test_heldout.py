import numpy as np
import pytest

from controlnet.evaluate.heldout import HELDOUT_SEED, evaluate_generator, heldout_set
from controlnet.world.dataset import make_pair, sample_seed


def test_heldout_set_is_the_world_dataset_with_its_seed():
    held = heldout_set("scribble", 4, 32)
    assert len(held) == 4 and held.task == "scribble"
    for i in range(4):
        source, target, prompt = make_pair("scribble", sample_seed(HELDOUT_SEED, i), 32)
        assert np.array_equal(held.conditions[i], source) and np.array_equal(held.ground_truth[i], target)
        assert held.prompts[i] == prompt
    training = [make_pair("scribble", sample_seed(0, i), 32)[2] for i in range(4)]
    assert not all(a == b for a, b in zip(training, held.prompts, strict=True))


def test_evaluate_generator_perfect_and_blind_generators():
    held = heldout_set("fill", 6)
    truth = {p: t for p, t in zip(held.prompts, held.ground_truth, strict=True)}

    def perfect(prompts, conditions):
        return [truth[p] for p in prompts]

    def blind(prompts):  # knows the prompt, not the outline: right colours, shape 20 px off
        return [np.roll(truth[p], 20, axis=1) for p in prompts]

    report = evaluate_generator(held, perfect, blind)
    disk = report.rows[0]
    assert disk.model == pytest.approx(disk.ceiling) and disk.floor < disk.ceiling - 0.3
    with pytest.raises(ValueError, match="generate"):
        evaluate_generator(held, lambda p, c: [], blind)


def test_heldout_set_validates():
    with pytest.raises(ValueError, match="task"):
        heldout_set("hed", 2)
    with pytest.raises(ValueError, match="n=0"):
        heldout_set("fill", 0)
