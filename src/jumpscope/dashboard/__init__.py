"""A static HTML dashboard of SAE latents that opens from the file system (no server): an index of
every latent (density, max activation, peak tokens, logit lens; sortable, searchable) and one page
per latent (activation histogram, logit lens, top and sampled examples with highlighted tokens)."""

from .site import SHARD_SIZE, write_dashboard, write_explanations

__all__ = ["SHARD_SIZE", "write_dashboard", "write_explanations"]
