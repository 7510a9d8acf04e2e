"""An independent Jacobian of a Jacobian SAE pair, for tests: torch.autograd.functional.jacobian
token by token, sharing no code with jumpscope.jacobian.jacobian_active."""

import torch


def autograd_jacobian(pair, x_raw, point, in_scale=1.0, out_scale=1.0):
    """J [N, k, k] token by token with torch.autograd.functional.jacobian of the composed function
    (input latents -> decoder -> MLP -> output encoder), at the true input or at the input SAE's
    reconstruction: independent of jacobian_active."""
    Js = []
    for row in x_raw:
        x = row / in_scale
        in_active = pair.pre_activation(x[None]).topk(pair.cfg.k, dim=-1).indices[0]
        base = row if point == "input" else pair.decode(pair.encode(x[None]))[0] * in_scale
        out_active = pair.output.pre_activation((pair.mlp(base[None]) / out_scale)).topk(pair.cfg.k, dim=-1).indices[0]

        def latents_out(s):
            moved = base + in_scale * (s @ pair.W_dec[in_active])
            return (pair.mlp(moved[None])[0] / out_scale) @ pair.output.W_enc[:, out_active]

        Js.append(torch.autograd.functional.jacobian(latents_out, torch.zeros(pair.cfg.k)))
    return torch.stack(Js)
