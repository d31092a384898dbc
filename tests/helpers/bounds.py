"""The numerical bounds the tests hold results to, each derived from what the compared
numbers may legitimately differ by, never from what one machine happened to produce.

Two mesh layouts (or a kernel and its reference) compute the same function with float32
sums taken in other orders: a reduction split over other devices, a matmul blocked
otherwise, a CPU whose kernels vectorize differently. What such a reordering can change
follows from float32's unit roundoff and the length of the sums; what a training step
then does with it depends on how the optimizer treats a small change of its gradient.

- **Losses and gradients** are well conditioned: sums whose rounding is bounded by
  :data:`F32` of their tensor's scale.
- **Parameters after AdamW steps are not**: Adam divides each element's step by that
  element's gradient scale, so an element whose gradient is near its rounding (a tiny
  or exactly-zero gradient) takes a step of up to the learning rate whatever its
  rounding; across machines that showed as 5e-5 of a tensor's scale. The layout tests
  therefore train with :data:`LINEAR_ADAM` and compare each tensor's *update*
  (parameters after minus before) at :data:`UPDATE`.
- **float8** rounds to 3 or 4 significant bits, so a float32 reordering can tip one
  value across a float8 rounding boundary: :data:`FP8_GRADIENT`.

``tests/test_bounds.py`` checks each constant against its derivation, so that a bound
cannot be tightened below what it derives or quietly widened past it.
"""

import numpy as np

U32 = 2.0**-24  # float32's unit roundoff
U_BF16 = 2.0**-8  # bfloat16: 8 significant bits
U_E4M3 = 2.0**-4  # float8 e4m3: 4 significant bits (activations and weights)
U_E5M2 = 2.0**-3  # float8 e5m2: 3 significant bits (gradients)

# The longest float32 sums in the tests' tiny models (a weight's gradient over the
# batch's tokens, a matmul over the width, the loss over tokens and vocabulary) have at
# most 2**14 terms. Two orders of such a sum differ by about sqrt(n) * u of its
# magnitude (roundings of independent sign: Higham & Mary, "A new approach to
# probabilistic rounding error analysis", 2019): 2**7 * 2**-24 = 7.6e-6.
SUM_TERMS = 2**14
F32 = 1e-5

# AdamW with eps = 1: gradients are clipped to a global norm of 1, so every element's
# sqrt(v) <= 1 <= eps and the step m / (sqrt(v) + eps) is within a factor 2 of linear in
# the gradient: a change of the gradient by d moves the step by at most 2 d / eps. The
# update then carries the gradients' relative rounding (F32) at most doubled, and a
# learning rate of 0.3 makes the two effective steps (warmup 1) move the weights by a few
# percent, far above float32's rounding of the weights themselves.
LINEAR_LR = 0.3
LINEAR_ADAM = ("optim.eps=1", f"optim.lr={LINEAR_LR}")
UPDATE = 2 * F32


def update_error(end, reference_end, start, steps: int, bound: float) -> tuple[float, float]:
    """(the relative error of the update ``end - start`` against ``reference_end - start``,
    what it may be): ``bound`` plus what storing the weights in float32 adds, since each
    step rounds the new weights to u of their magnitude in both runs. That addition is
    small for a matrix (updates of a few percent) and large for a norm scale (near 1,
    moved by 1e-4)."""
    start = np.asarray(start, np.float64)
    update, reference = np.asarray(end, np.float64) - start, np.asarray(reference_end) - start
    stored = 2 * steps * U32 * float(np.max(np.abs(reference_end)))
    scale = float(np.max(np.abs(reference)))
    if scale == 0:  # no update at all: judged absolutely
        return float(np.max(np.abs(update))), stored
    return relative_error(update, reference), bound + stored / scale


# One float8 value tipped across a rounding boundary changes by one float8 step, 2 u of
# its magnitude (e5m2's for a gradient operand, the wider one). A weight's gradient sums
# that token's term with the other tokens' (TOKENS: the tests' 8 rows x 16 positions), so
# with terms of comparable size it moves by 2 u / TOKENS of the gradient's scale, and
# LINEAR_ADAM's update with it. A wrong scale or a missing reduction moves every element
# by float8's own rounding (2**-4) or more.
TOKENS = 8 * 16
FP8_GRADIENT = 2 * U_E5M2 / TOKENS


def relative_error(a, b) -> float:
    """max |a - b| / max |b| in float64: reordered float32 sums are judged against the
    scale of their tensor, not element by element (a near-zero element's rounding is
    relative to the tensor's sums, not to itself)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = np.max(np.abs(b))
    return float(np.max(np.abs(a - b)) / scale) if scale else float(np.max(np.abs(a)))
