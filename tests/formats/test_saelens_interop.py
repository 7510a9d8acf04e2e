"""Interoperability with the real SAELens package: each test runs only where ``sae_lens`` is
installed (it is not a jumpscope dependency) and is skipped elsewhere. Checked against SAELens
6.54.12 and 5.11.0 (the 6.x-class tests skip on 5.x, as do transcoders, which 5.x lacks)."""

from __future__ import annotations

import pytest
import torch

from jumpscope.formats import load_saelens, save_saelens

from test_saelens import CASES, D_IN, D_SAE, SITE, inputs, make


def saelens_major(sae_lens) -> int:
    return int(sae_lens.__version__.split(".")[0])


@pytest.mark.parametrize("case", sorted(CASES))
def test_real_saelens_loads_what_we_write(tmp_path, case):
    """Runs only where SAELens is installed: SAE.load_from_disk on our folder encodes like ours."""
    sae_lens = pytest.importorskip("sae_lens")
    if case.endswith("transcoder") and saelens_major(sae_lens) < 6:
        pytest.skip("SAELens < 6 has no transcoders")
    sae = make(case)
    save_saelens(sae, tmp_path)
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path))
    x = inputs()
    torch.testing.assert_close(theirs.encode(x), sae.encode(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(theirs.decode(theirs.encode(x)), sae(x), rtol=1e-5, atol=1e-6)


SAELENS_WRITERS = {  # case: (SAELens class path, config class, config fields)
    "standard": ("StandardSAE", "StandardSAEConfig", {}),
    "standard_uncentred": ("StandardSAE", "StandardSAEConfig", {"apply_b_dec_to_input": False}),
    "jumprelu": ("JumpReLUSAE", "JumpReLUSAEConfig", {}),
    "gated": ("GatedSAE", "GatedSAEConfig", {}),
    "topk": ("TopKSAE", "TopKSAEConfig", {"k": 3}),
    "topk_rescaled": ("TopKSAE", "TopKSAEConfig", {"k": 3, "rescale_acts_by_decoder_norm": True}),
    "transcoder": ("saes.transcoder.Transcoder", "TranscoderConfig", {"d_out": 5, "apply_b_dec_to_input": False}),
    "jumprelu_transcoder": ("saes.transcoder.JumpReLUTranscoder", "JumpReLUTranscoderConfig",
                            {"d_out": 5, "apply_b_dec_to_input": False}),
}


@pytest.mark.parametrize("case", sorted(SAELENS_WRITERS))
def test_we_load_what_real_saelens_writes(tmp_path, case):
    """Runs only where SAELens is installed: its save_model folder loads into an equal SAE."""
    sae_lens = pytest.importorskip("sae_lens")
    if saelens_major(sae_lens) < 6:
        pytest.skip("written with the SAELens 6 classes")
    class_path, config_name, fields = SAELENS_WRITERS[case]
    cls = sae_lens
    for part in class_path.split("."):
        cls = getattr(cls, part)
    theirs = cls(getattr(sae_lens, config_name)(d_in=D_IN, d_sae=D_SAE, **fields))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for key, tensor in theirs.named_parameters():
            tensor.copy_(torch.rand(tensor.shape, generator=g) * 0.3 + 0.05 if key == "threshold"
                         else torch.randn(tensor.shape, generator=g) * 0.5)
    theirs.cfg.metadata.hook_name = SITE
    theirs.save_model(str(tmp_path))
    ours = load_saelens(tmp_path)
    assert ours.cfg.site == SITE
    x = inputs()
    torch.testing.assert_close(ours.encode(x), theirs.encode(x), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours(x), theirs.decode(theirs.encode(x)), rtol=1e-5, atol=1e-6)


def test_we_load_real_saelens_batchtopk(tmp_path):
    """Runs only where SAELens is installed: a BatchTopK training checkpoint and its inference
    (JumpReLU) save both load into SAEs equal to SAELens's inference SAE."""
    sae_lens = pytest.importorskip("sae_lens")
    if saelens_major(sae_lens) < 6:
        pytest.skip("written with the SAELens 6 classes")
    theirs = sae_lens.BatchTopKTrainingSAE(sae_lens.BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=3))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for tensor in theirs.parameters():
            tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.5)
        theirs.topk_threshold = torch.tensor(0.3, dtype=torch.float64)
    theirs.save_model(str(tmp_path / "train"))
    theirs.save_inference_model(str(tmp_path / "inference"))
    reference = sae_lens.SAE.load_from_disk(str(tmp_path / "inference"))
    x = inputs()
    for folder in ("train", "inference"):
        ours = load_saelens(tmp_path / folder)
        torch.testing.assert_close(ours.encode(x), reference.encode(x), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours(x), reference(x), rtol=1e-5, atol=1e-6)
