"""Looking inside an SAE: the latents' top-activating examples, density and histograms
(:mod:`.examples`), and the logit lens of their decoder directions (:mod:`.logit_lens`)."""

from .logit_lens import logit_lens, unembedding
from .records import PAD_TOKEN, LatentExamples, LogitLens, check_examples_shape, token_strings

__all__ = ["LatentExamples", "LogitLens", "PAD_TOKEN", "check_examples_shape", "logit_lens", "token_strings",
           "unembedding"]
