"""How close the engine's results must be to lm-eval's `hf` model's, by dtype (tests and the
runtime parity certificate use the same numbers).

fp32: both compute the same sums; only the order of float operations differs (batch shapes,
fused kernels): 1e-3 absolute, where measured differences are below 1e-4.
bf16 / fp16 (the CUDA defaults): lm-eval's `hf` model log-softmaxes and sums the continuation's
log-probabilities in the model dtype, the engine in fp32 (so the engine is the closer of the two
to the fp32 value), and different batch shapes round differently. The difference grows with the
size of the loglikelihood: relative bounds, set at about twice the largest difference measured on
tiny models of five architectures (bf16: 0.6% relative, fp16: 0.08%; tests/test_engine_architectures.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tolerance:
    """|engine - hf| of a loglikelihood may be at most `max_abs_loglik + relative * |hf's value|`."""

    max_abs_loglik: float
    relative: float = 0.0

    def bound(self, reference: float) -> float:
        return self.max_abs_loglik + self.relative * abs(reference)


TOLERANCE = {
    "float32": Tolerance(1e-3),
    "float64": Tolerance(1e-6),
    "bfloat16": Tolerance(0.05, 0.012),
    "float16": Tolerance(0.01, 0.002),
}
