"""Reasoning models: the thinking switch, stop strings that end the answer and not the thinking,
reasoning blocks stripped before scoring, per-suite generation room, and the protocol they leave.

The model is a real 1-layer Llama whose weights are set so that greedy decoding follows a script:
its attention and MLP outputs are zero, so the last hidden state is the current token's embedding
(one-hot), and the output layer maps each token to the next one of the script. A template with
Qwen3's `enable_thinking` switch either opens a reasoning block or closes an empty one.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from benchharness.cli import main
from benchharness.engine import BenchEngineLM
from benchharness.engine.reasoning import Markers, opens_block, stops_answer, strip_reasoning
from conftest import read_jsonl, run_folders, write_experiment

WORDS = ["<unk>", "<s>", "</s>", "Q", "Answer:", "<think>", "</think>", "hmm", "STOP", "ok", "42", "STOPS", "tail", "x1", "x2"]
# What the model writes after each word (greedy): a thought holding a stop string, then the answer
# followed by another stop string. After "Q" it writes "x1 x2 ..." (no reasoning at all).
SCRIPT = {"Answer:": "<think>", "<think>": "hmm", "hmm": "STOP", "STOP": "ok", "ok": "</think>", "</think>": "42",
          "42": "STOPS", "STOPS": "tail", "tail": "</s>", "Q": "x1", "x1": "x2", "x2": "x1"}
TEMPLATE = ("{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}"
            "{% if enable_thinking is defined and enable_thinking is false %} <think> </think>{% else %} <think>{% endif %}{% endif %}")


def scripted_model(folder: Path | None = None) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>")
    tokenizer.chat_template = TEMPLATE
    size = len(WORDS)
    hidden = size + size % 2  # RoPE needs an even head size
    config = LlamaConfig(vocab_size=size, hidden_size=hidden, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                         num_key_value_heads=1, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(size, hidden))
        layer = model.model.layers[0]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
        head = torch.zeros(size, hidden)
        for word, following in SCRIPT.items():
            head[vocab[following], vocab[word]] = 10.0
        model.lm_head.weight.copy_(head)
    model.generation_config.eos_token_id = 2
    if folder is not None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return model.eval(), tokenizer


def _generate(lm, prompt: str, until: list[str], max_gen_toks: int = 20) -> str:
    request = Instance("generate_until", {}, (prompt, {"until": until, "do_sample": False, "max_gen_toks": max_gen_toks}), 0)
    return lm.generate_until([request], disable_tqdm=True)[0]


def test_reasoning_text_rules() -> None:
    markers = Markers()
    assert opens_block("Q <think>", markers) and not opens_block("Q <think> </think>", markers) and not opens_block("Q", markers)
    assert strip_reasoning(" hmm STOP ok </think> 42", True, markers) == ("42", False)
    assert strip_reasoning("<think> hmm </think> 42 </think> 7", False, markers) == ("7", False)  # the last block ends the reasoning
    assert strip_reasoning(" hmm STOP", True, markers) == ("", True)  # never closed: no answer, not the thoughts
    assert strip_reasoning(" plain answer", False, markers) == (" plain answer", False)  # no block: untouched
    assert not stops_answer(" hmm STOP", True, markers, ("STOP",))
    assert stops_answer(" hmm STOP ok </think> 42 STOPS", True, markers, ("STOP",))
    assert stops_answer(" x STOP", False, markers, ("STOP",)) and stops_answer(" hmm STOP", True, None, ("STOP",))


def test_stop_strings_end_the_answer_not_the_thinking() -> None:
    model, tokenizer = scripted_model()
    chat = [{"role": "user", "content": "Answer:"}]
    plain = BenchEngineLM(model=model, tokenizer=tokenizer, batch_size=2, device="cpu")
    thinking = BenchEngineLM(model=model, tokenizer=tokenizer, batch_size=2, device="cpu", think_end_token="</think>")
    prompt = thinking.apply_chat_template(chat)
    assert prompt.endswith("<think>") and opens_block(prompt, Markers())
    # Without markers the stop string inside the thoughts ends the generation: the answer is lost.
    assert _generate(plain, prompt, ["STOP"]).split() == ["hmm"]
    # With them the model thinks past it, and the scorer sees only the answer, cut at its stop string.
    assert _generate(thinking, prompt, ["STOP"]).split() == ["42"]
    assert thinking.stats.reasoning_unfinished == 0
    # A block that never closes (the token limit came first) leaves no answer.
    assert _generate(thinking, prompt, ["STOP"], max_gen_toks=3) == ""
    assert thinking.stats.reasoning_unfinished == 1
    # A generation without any block is left as it is.
    assert _generate(thinking, "Q", ["x2"], max_gen_toks=5).split() == ["x1"]


def test_thinking_switch_matches_lm_eval_hf() -> None:
    model, tokenizer = scripted_model()
    chat = [{"role": "user", "content": "Answer:"}]
    engine = BenchEngineLM(model=model, tokenizer=tokenizer, batch_size=2, device="cpu", think_end_token="</think>", enable_thinking=False)
    hf = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2, think_end_token="</think>", enable_thinking=False)
    prompt = engine.apply_chat_template(chat)
    assert prompt == hf.apply_chat_template(chat) and prompt.endswith("</think>") and not opens_block(prompt, Markers())
    ours, theirs = _generate(engine, prompt, ["STOP"]), _generate(hf, prompt, ["STOP"])
    assert ours == theirs and ours.split() == ["42"]


REASONING_TASK = """
task: think_math
dataset_path: json
dataset_kwargs: {{data_files: {{test: "{data}"}}}}
test_split: test
output_type: generate_until
doc_to_text: "{{{{q}}}}"
doc_to_target: "{{{{a}}}}"
generation_kwargs: {{until: ["STOP"], do_sample: false, max_gen_toks: 4}}
metric_list: [{{metric: exact_match, aggregation: mean, higher_is_better: true, regexes_to_ignore: [" "]}}]
"""


@pytest.mark.parametrize("thinking", [None, False])
def test_run_gives_reasoning_models_room_and_records_the_protocol(tmp_path: Path, thinking: bool | None) -> None:
    model_dir = tmp_path / "scripted"
    scripted_model(model_dir)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = tmp_path / "think.jsonl"
    data.write_text("".join(json.dumps({"q": "Answer:", "a": "42"}) + "\n" for _ in range(2)))
    (tasks / "think.yaml").write_text(textwrap.dedent(REASONING_TASK.format(data=data)))
    catalog = f"""
    models:
      - name: thinker
        origin: CN
        organisation: test
        family: scripted
        params: 1K
        license: Apache-2.0
        instruct: true
        reasoning: true
        sources:
          - local: {model_dir}
    """
    body = f"""
    name: reasoning
    models: [thinker]
    suites: [think_math]
    chat_template: true
    include_paths: [{tasks}]
    reasoning: {{thinking: {'null' if thinking is None else 'false'}, max_gen_toks: 12}}
    inference: {{dtype: float32, device: cpu, batch_size: 2}}
    parity: {{requests: 0}}
    output_dir: runs
    speed: null
    """
    config = write_experiment(tmp_path, body, catalog)
    assert main(["--cache", str(tmp_path / "cache"), "run", str(config)]) == 0
    (run,) = run_folders(config.parent / "runs")
    manifest = json.loads((run / "manifest.json").read_text())
    info = manifest["models"]["thinker"]["thinking"]
    assert info == {"reasoning_model": True, "switch": True, "enable_thinking": thinking, "markers": ["<think>", "</think>"]}
    kwargs = manifest["tasks"]["think_math"]["generation_kwargs"]
    samples = read_jsonl(run / "samples/thinker/think_math.jsonl")
    if thinking is None:
        # The task's own 4 tokens would end inside the thoughts; reasoning.max_gen_toks gives room.
        assert kwargs["max_gen_toks"] == 12
        assert [s["response"].split() for s in samples] == [["42"], ["42"]]
        assert samples[0]["prompt"].endswith("<think>")
    else:
        # Thinking off: the task keeps its own limit, and the template closes an empty block.
        assert kwargs["max_gen_toks"] == 4
        assert samples[0]["prompt"].endswith("</think>")
        assert [s["response"].split() for s in samples] == [["42"], ["42"]]
    rows = [line.split(",") for line in (run / "scores.csv").read_text().splitlines()]
    header, row = rows[0], rows[1]
    assert float(row[header.index("value")]) == 1.0
    protocol = (run / "scores.csv").read_text().splitlines()[1]
    words = "thinking off" if thinking is False else "greedy, up to 12 tokens"
    assert words in protocol and "chat template" in protocol


def test_suite_max_gen_toks_for_every_model(tmp_path: Path) -> None:
    from benchharness.config.experiment import load_experiment
    from benchharness.run.runner import generation_limit

    model_dir = tmp_path / "scripted"
    scripted_model(model_dir)
    catalog = f"""
    models:
      - {{name: thinker, origin: CN, organisation: t, family: s, params: 1K, license: x, reasoning: true, sources: [{{local: {model_dir}}}]}}
      - {{name: plain, origin: EU, organisation: t, family: s, params: 1K, license: x, sources: [{{local: {model_dir}}}]}}
    """
    body = """
    name: limits
    models: [thinker, plain]
    suites: [{name: gsm8k, max_gen_toks: 300, reasoning_max_gen_toks: 2000}, humaneval]
    """
    experiment = load_experiment(write_experiment(tmp_path, body, catalog))
    thinker, plain = experiment.models
    gsm8k, humaneval = experiment.suites
    assert generation_limit(experiment, thinker, gsm8k) == 2000 and generation_limit(experiment, plain, gsm8k) == 300
    assert generation_limit(experiment, thinker, humaneval) == 4096 and generation_limit(experiment, plain, humaneval) is None
    off = experiment.model_copy(update={"reasoning": experiment.reasoning.model_copy(update={"thinking": False})})
    assert generation_limit(off, thinker, gsm8k) == 300
    # The settings decide results: they are in the config hash.
    assert experiment.config_hash() != off.config_hash()
