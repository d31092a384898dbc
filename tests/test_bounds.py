"""The shared numerical bounds (``helpers.bounds``) hold to their derivations: none is
tighter than what it derives from float32's rounding and the length of the sums, and
none is wider than a small factor of it, so a bound cannot be tuned to one machine's
results in either direction without this test failing."""

import math

import jax.numpy as jnp
import pytest
from helpers import bounds
from tiny import TINY


@pytest.mark.parametrize(
    "dtype, u",
    [
        (jnp.float32, bounds.U32),
        (jnp.bfloat16, bounds.U_BF16),
        (jnp.float8_e4m3fn, bounds.U_E4M3),
        (jnp.float8_e5m2, bounds.U_E5M2),
    ],
)
def test_unit_roundoffs_are_the_formats(dtype, u):
    """u = eps / 2: half the spacing of the format's numbers just above 1."""
    assert u == float(jnp.finfo(dtype).eps) / 2


def test_float32_bound_covers_a_reordered_sum_and_no_more():
    """F32 covers sqrt(n) u for the longest sums (n = SUM_TERMS), within a factor 2."""
    derived = math.sqrt(bounds.SUM_TERMS) * bounds.U32
    assert derived <= bounds.F32 <= 2 * derived


def test_update_and_float8_bounds_follow_from_their_parts():
    assert bounds.UPDATE == 2 * bounds.F32
    assert bounds.FP8_GRADIENT == 2 * bounds.U_E5M2 / bounds.TOKENS
    tiny = dict(item.split("=") for item in TINY)
    assert int(tiny["train.global_batch"]) * int(tiny["data.seq_len"]) == bounds.TOKENS
    # LINEAR_ADAM's eps is at least 1, the largest a clipped gradient's element can be.
    settings = dict(item.split("=") for item in bounds.LINEAR_ADAM)
    assert float(settings["optim.eps"]) >= 1
    assert float(settings["optim.lr"]) == bounds.LINEAR_LR
