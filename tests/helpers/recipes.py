"""SAEs on the Adam recipe, for tests that compare two computations of the same training (sparse
and dense kernels, one process and several, a resumed run): sign descent turns float rounding
differences in a near-zero gradient entry into whole steps, so those comparisons need Adam."""

from jumpscope.sae import build, config_class


def adam_build(arch: str, **fields):
    """``build(arch, **fields)`` on the architecture's 'adam' preset where it has one."""
    cls = config_class(arch)
    if "adam" in cls.presets:
        return build(cls.preset("adam", **fields))
    return build(arch, **fields)
