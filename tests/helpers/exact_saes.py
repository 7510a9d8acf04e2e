"""SAEs whose reconstruction is known exactly, for splicing and downstream-measure tests."""

import torch

from jumpscope.sae.jumprelu import jumprelu_from_weights


def exact_sae(d):
    """x = ReLU(x) - ReLU(-x): a JumpReLU SAE (threshold 0) that reconstructs perfectly."""
    eye = torch.eye(d)
    return jumprelu_from_weights(torch.cat([eye, -eye], 1), torch.cat([eye, -eye], 0), torch.zeros(2 * d),
                                 torch.zeros(d), torch.zeros(2 * d))


def zero_sae(d):
    sae = exact_sae(d)
    with torch.no_grad():
        sae.W_dec.zero_()
    return sae
