"""Stage 5, engine: answering lm-eval's requests; the harness's own inference engine, an lm-eval model named "benchharness".

Takes: a loaded model and tokenizer. Gives: an lm-eval model (`lm.py`; lm-eval's own `hf`
model with a memory-bounded batch in `reference.py`), the costs of a model per token
(`model_costs.py`) and the CPU kernels it uses (`onednn.py`).
Imports: config, models, suites, scorers.

Importing this package registers the model with lm-eval's registry (in this process): from
the command line, `benchharness lm-eval run --model benchharness --model_args pretrained=PATH,...`
does that and hands the rest to lm-eval (lm-eval itself discovers no plugins).
"""

from benchharness.engine.head import UnsupportedModelError
from benchharness.engine.lm import BenchEngineLM, EngineStats

__all__ = ["BenchEngineLM", "EngineStats", "UnsupportedModelError"]
