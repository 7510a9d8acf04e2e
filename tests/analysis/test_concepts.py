"""Concept search (jumpscope.analysis.concepts): exact AUROC, a planted latent found with AUROC 1,
and padding and special tokens never counted."""


import pytest
import torch

from jumpscope.analysis.concepts import auroc, find_concept, score_texts
from jumpscope.data.tokens import framing
from jumpscope.models.harvest import Harvester
from jumpscope.models.loading import load_model
from jumpscope.sae import build
from planted_concepts import texts, token_detector
from tiny_causal_lm import write_tiny_causal_lm

PLANTED, D_SAE = 5, 16


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_model(str(write_tiny_causal_lm(tmp_path_factory.mktemp("concepts") / "model")))


def test_auroc_is_mann_whitney_with_ties_counting_half():
    g = torch.Generator().manual_seed(0)
    for n_pos, n_neg in ((7, 5), (2, 2), (30, 41)):
        pos = torch.randint(0, 4, (n_pos, 50), generator=g).float()  # few values: many ties
        neg = torch.randint(0, 4, (n_neg, 50), generator=g).float() * 0.8
        pos[:, :3], neg[:, :3] = 0, 0  # latents that never fire: exactly 0.5
        greater = (pos[:, None, :] > neg[None, :, :]).double().mean(dim=(0, 1))
        equal = (pos[:, None, :] == neg[None, :, :]).double().mean(dim=(0, 1))
        torch.testing.assert_close(auroc(pos, neg), greater + equal / 2, rtol=0, atol=1e-12)
        assert torch.equal(auroc(pos, neg)[:3], torch.full((3,), 0.5, dtype=torch.float64))
    continuous = torch.randn(20, 8, generator=g), torch.randn(9, 8, generator=g)
    brute = (continuous[0][:, None] > continuous[1][None]).double().mean(dim=(0, 1))
    torch.testing.assert_close(auroc(*continuous), brute, rtol=0, atol=1e-12)
    assert auroc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])).item() == 1.0
    assert auroc(torch.tensor([0.0, 1.0]), torch.tensor([2.0, 3.0])).item() == 0.0


def test_a_planted_latent_ranks_first_with_auroc_one(loaded):
    hello = loaded.tokenizer.convert_tokens_to_ids("\u2581hello")
    sae = token_detector(loaded, [hello], slots=(PLANTED,), d_sae=D_SAE)
    positive, negative = texts(12, True, seed=1), texts(12, False, seed=2)
    result = find_concept(loaded, sae, positive, negative, top=D_SAE, batch_size=5)
    first, rest = result.latents[0], result.latents[1:]
    assert (first.latent, first.rank, first.auroc, first.mean_negative) == (PLANTED, 1, 1.0, 0.0)
    assert first.fires_positive == 1.0 and first.fires_negative == 0.0 and first.diff > 0
    assert all(m.auroc < 1.0 for m in rest) and len(result.latents) == D_SAE
    assert [m.auroc for m in result.latents] == sorted((m.auroc for m in result.latents), reverse=True)
    example = first.examples[0]
    assert example["token"] == "hello" and "[[hello]]" in example["snippet"]
    assert example["full_text"] == positive[example["text"]] and len(first.examples) == 3
    data = result.to_dict()
    assert data["latents"][0]["latent"] == PLANTED and data["n_positive"] == 12 and "max over" in data["score"]
    assert "hello" in result.table().splitlines()[2]
    bare = find_concept(loaded.model, sae, positive, negative, tokenizer=loaded.tokenizer, top=1)
    assert bare.latents[0].latent == PLANTED  # an nn.Module with its tokenizer works too
    by_diff = find_concept(loaded, sae, positive, negative, top=3, sort="diff")
    assert [m.diff for m in by_diff.latents] == sorted((m.diff for m in by_diff.latents), reverse=True)


def test_padding_and_special_tokens_never_count(loaded):
    frame = framing(loaded.tokenizer)
    bos, pad = frame.first, frame.pad
    sae = token_detector(loaded, [bos, pad], slots=(0, 1), d_sae=D_SAE)
    batch = texts(3, False, seed=3) + ["abc"]  # different lengths: the short ones are padded
    scores = score_texts(loaded, loaded.tokenizer, sae, batch, batch_size=4)
    # the latents do fire at BOS and at padding: the scores ignore them
    width = max(map(len, scores.ids))
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in scores.ids])
    raw = sae.encode(Harvester(loaded.model, ["embed"]).activations(ids)["embed"])
    assert (raw[:, 0, 0] > 0).all() and (raw[-1, len(scores.ids[-1]):, 1] > 0).all()
    assert torch.equal(scores.max[:, :2], torch.zeros(4, 2)) and torch.equal(scores.mean[:, :2], torch.zeros(4, 2))


def test_batched_scores_equal_each_text_alone_over_its_ordinary_tokens(loaded):
    site = "layers.1.resid_post"
    sae = build("relu", d_in=loaded.model.config.hidden_size, d_sae=24, site=site, model=loaded.name)
    with torch.no_grad():
        sae.b_enc.fill_(-0.5)
    batch = texts(6, True, seed=4) + ["hello"]
    together = score_texts(loaded, loaded.tokenizer, sae, batch, batch_size=7)
    harvester, special = Harvester(loaded.model, [site]), set(loaded.tokenizer.all_special_ids)
    for i, ids in enumerate(together.ids):
        latents = sae.encode(harvester.activations(torch.tensor([ids]))[site][0])  # alone: no padding
        ordinary = torch.tensor([t not in special for t in ids])
        assert ids[0] == framing(loaded.tokenizer).first and not ordinary[0]
        torch.testing.assert_close(together.max[i], latents[ordinary].amax(0), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(together.mean[i], latents[ordinary].mean(0), rtol=1e-4, atol=1e-4)


def test_bad_inputs_are_one_line_errors(loaded):
    sae = token_detector(loaded, [loaded.tokenizer.convert_tokens_to_ids("\u2581hello")], slots=(PLANTED,), d_sae=D_SAE)
    with pytest.raises(ValueError, match="at least 2 positive texts, got 1"):
        find_concept(loaded, sae, ["hello"], ["abc", "bc"])
    with pytest.raises(ValueError, match="negative text 2 has no ordinary tokens"):
        find_concept(loaded, sae, ["hello", "hello abc"], ["abc", ""])
    with pytest.raises(ValueError, match="unknown sort"):
        find_concept(loaded, sae, ["hello", "hello abc"], ["abc", "bc"], sort="median")
    moved = build("relu", d_in=loaded.model.config.hidden_size, d_sae=4, site="layers.9.resid_post")
    with pytest.raises(ValueError, match="layers.9.resid_post: layer 9 out of range"):
        find_concept(loaded, moved, ["hello", "hello abc"], ["abc", "bc"])
