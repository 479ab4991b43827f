"""The harness's own inference engine, an lm-eval model named "benchharness".

Importing this package registers the model with lm-eval's registry (in this process): from
the command line, `benchharness lm-eval run --model benchharness --model_args pretrained=PATH,...`
does that and hands the rest to lm-eval (lm-eval itself discovers no plugins).
"""

from benchharness.engine.head import UnsupportedModelError
from benchharness.engine.lm import BenchEngineLM, EngineStats

__all__ = ["BenchEngineLM", "EngineStats", "UnsupportedModelError"]
