"""Next-token losses computed the plain way, from the model's whole logits: an independent
reference for the library's chunked measures."""

import torch


@torch.no_grad()
def next_token_losses(model, input_ids, train_mask, attention_mask):
    """Cross-entropy of each scored prediction (a flat tensor): the prediction at position t of
    token t + 1, where both are ordinary tokens (train_mask) and t + 1 is not padding."""
    module = getattr(model, "model", model) if not hasattr(model, "forward") else model
    logits = module(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    scored = train_mask[:, :-1] & train_mask[:, 1:] & attention_mask[:, 1:].bool()
    logprobs = logits[:, :-1][scored].log_softmax(-1)
    return -logprobs.gather(1, input_ids[:, 1:][scored][:, None])[:, 0]
