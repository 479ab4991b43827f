"""The harness's own inference engine, an lm-eval model named "benchharness".

Importing this package registers the model with lm-eval, so
`lm_eval --model benchharness --model_args pretrained=PATH,...` works afterwards.
"""

from benchharness.engine.head import UnsupportedModelError
from benchharness.engine.lm import BenchEngineLM, EngineStats

__all__ = ["BenchEngineLM", "EngineStats", "UnsupportedModelError"]
