"""linattn.testing: the tolerance rule's second rounding draw (module docstring)."""
import torch

from linattn import testing

# Two bfloat16 roundings that cancel in a sum: 1 + 2^-12 rounds down by 2^-12 and 1 - 2^-12
# up by as much, so the rounded inputs' sum is the exact one and the first draw's error is 0.
D = 2.0 ** -12
PAIRS = torch.tensor([1 + D, 1 - D] * 8, dtype=torch.float64)


def _sum(q):
    return q.double().sum(0, keepdim=True), None


def _off_by(err):
    def fn(q):
        return q.double().sum(0, keepdim=True).float() + err, None
    return fn


def test_twin_keeps_the_rounding_errors_magnitudes():
    x = torch.randn(1000, dtype=torch.float64)
    r = x.to(torch.bfloat16)
    twin = testing.rounded_twin({"q": x, "n": 3}, {"q": r, "n": 3}, seed=5)
    assert twin["n"] == 3
    assert torch.equal((twin["q"] - x).abs(), (r.double() - x).abs())
    same = (twin["q"] - x) == (r.double() - x)
    assert same.any() and not same.all()


def test_a_near_zero_draw_does_not_set_the_bound():
    """An error of 2^-13 against a first draw of 0 would fail on the 1e-6 x magnitude slack
    alone; the second draw (the same 2^-12 errors with random signs, 16 of them summed) sets
    the bound."""
    inputs = {"q": PAIRS}
    _, _, first = testing.compare_to_oracle(_off_by(D / 2), _sum, inputs, dtype=torch.bfloat16)
    assert first[0].ok and first[0].bound >= testing.OUT_FACTOR * 2 * D
    # a passing tensor keeps the first draw's bound, which 2^-13 exceeds
    _, _, exact = testing.compare_to_oracle(_off_by(0.0), _sum, inputs, dtype=torch.bfloat16)
    assert exact[0].ok and exact[0].bound < D / 2


def test_the_second_draw_does_not_hide_a_larger_error():
    """Errors beyond the factor times both draws still fail."""
    _, _, checks = testing.compare_to_oracle(_off_by(64 * D), _sum, {"q": PAIRS},
                                             dtype=torch.bfloat16)
    assert not checks[0].ok and "error" in checks[0].message
