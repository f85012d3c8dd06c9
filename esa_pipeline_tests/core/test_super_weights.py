"""confirm_super_weights(): a planted super weight is confirmed against matched controls, a decoy is not."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from esa_pipeline.core.evaluation.perplexity import perplexity
from esa_pipeline.core.importance.super_weights import CAUSAL_COLUMNS, confirm_super_weights, matched_controls
from esa_pipeline.core.models.adapters import adapter_for
from esa_pipeline.core.models.registry import load_model

PLANTED, DECOY = (3, 7), (5, 11)


@pytest.fixture(scope="module")
def planted():
    """tiny-llama with one huge down-projection weight, scored on text it generates itself.

    By construction the planted weight drives the model's predictions on that text (greedy, printable
    ASCII, which the byte tokenizer encodes back to the same ids), so zeroing it must hurt far more than
    zeroing any weight of matched magnitude rank; the decoy is an ordinary weight.
    """
    lm = load_model("tiny-llama", device="cpu")
    model = lm.model
    adapter = adapter_for(model)
    weight = adapter.slices("ffn.down", 1)[0].get(model)  # [H, I]
    with torch.no_grad():
        weight[PLANTED] = weight.abs().max() * 2000
    ids = list(b"The cat")
    with torch.inference_mode():
        for _ in range(150):
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            printable = torch.full_like(logits, -float("inf"))
            printable[32:127] = 0
            ids.append(int((logits + printable).argmax()))
    base = perplexity(lm, [bytes(ids).decode("ascii")], window=64)
    name = adapter.slices("ffn.down", 1)[0].param_name
    candidates = pd.DataFrame([
        {"model": "tiny-llama", "layer": 1, "param_name": name, "row": r, "col": c,
         "weight_value": float(weight[r, c]), "activation_in": 1.0, "activation_out": 1.0, "spike_ratio": 1.0}
        for r, c in (PLANTED, DECOY)
    ])  # fmt: skip
    return lm, adapter, base, candidates, weight


def test_planted_super_weight_is_confirmed_and_the_decoy_stays_a_candidate(planted) -> None:
    lm, adapter, base, candidates, weight = planted
    before = weight.clone()
    result = confirm_super_weights(lm, base, candidates, adapter=adapter, n_controls=10)
    assert list(result.columns) == CAUSAL_COLUMNS and len(result) == 2
    assert torch.equal(weight, before)  # every zeroing restored exactly
    real, decoy = result.iloc[0], result.iloc[1]
    assert real["status"] == "confirmed" and real["confirmed"] and real["control_p"] == pytest.approx(1 / 11)
    assert real["zero_delta_nll"] > 10 * real["control_max"] and real["zero_delta_nll"] > 0.01
    assert decoy["status"] == "candidate" and not decoy["confirmed"] and decoy["control_p"] > 1 / 11
    assert len(decoy["control_delta_nlls"].split(";")) == 10 == decoy["n_controls"]


def test_controls_are_matched_in_magnitude_rank_and_exclude_the_candidate() -> None:
    weight = torch.arange(1.0, 101.0).reshape(10, 10)  # |W| rank of flat index i is 99 - i
    controls = matched_controls(weight, target=50, n_controls=10, seed=0)
    assert len(set(controls)) == 10 and 50 not in controls
    assert all(40 <= i <= 60 for i in controls)  # within 10 ranks either side
    top = matched_controls(weight, target=99, n_controls=10, seed=0)  # the largest: controls are the next 20
    assert all(i >= 78 for i in top) and 99 not in top
    assert matched_controls(weight, target=50, n_controls=10, seed=0) == controls  # seeded


def test_fewer_than_ten_controls_are_refused(planted) -> None:
    lm, adapter, base, candidates, _ = planted
    with pytest.raises(ValueError, match="n_controls must be >= 10"):
        confirm_super_weights(lm, base, candidates, adapter=adapter, n_controls=5)


@pytest.mark.parametrize(("effect", "confirmed"), [(-0.001, False), (0.0, False), (float("nan"), False),
                                                   (0.002, True)])  # fmt: skip
def test_a_weight_whose_zeroing_does_not_hurt_is_never_confirmed(planted, monkeypatch, effect, confirmed) -> None:
    # Synthetic effects: every control's ΔNLL is -0.01, the candidate's is `effect`. Zeroing it improved the loss
    # (-0.001, less than the controls did) and was stored "confirmed" super weight; a super weight is one whose
    # removal hurts (Yu et al. 2024), so the effect must also be > 0.
    import esa_pipeline.core.evaluation.paired as paired

    lm, adapter, base, candidates, weight = planted
    decoy = candidates.iloc[[1]]
    target = int(decoy["row"].iloc[0]) * weight.shape[1] + int(decoy["col"].iloc[0])

    class Fake:
        def __init__(self, delta_nll: float) -> None:
            self.delta_nll = delta_nll

    def fake_evaluate(lm, base, p, *, scores, **kwargs):
        return Fake(effect if int(scores[0].reshape(-1).argmax()) == target else -0.01)

    monkeypatch.setattr(paired, "evaluate_against", fake_evaluate)
    row = confirm_super_weights(lm, base, decoy, adapter=adapter, n_controls=10).iloc[0]
    assert bool(row["confirmed"]) is confirmed
    assert row["status"] == ("confirmed" if confirmed else "candidate")
    # the permutation p compares with the controls only (a NaN effect exceeds none of them)
    assert row["control_p"] == pytest.approx(1.0 if effect != effect else 1 / 11)
