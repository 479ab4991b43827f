"""`BenchEngineLM`: the engine as an lm-eval model (registered as "benchharness").

Tokenization follows lm-eval's HFLM exactly (its `tok_encode`, `_encode_pair` via
TemplateLM, empty-context prefix token, left truncation, generation encoding and
post-processing), so every lm-eval task gives the same requests and the same
scores as `--model hf`; only the computation differs (see batching, scoring,
continuous, generation, autobatch).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import psutil
import torch
import transformers
from lm_eval import utils as lm_utils
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    _add_special_kwargs,
    configure_pad_token,
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
    resolve_max_length,
)
from tqdm import tqdm

from benchharness.engine.cascade import cascade_reason
from benchharness.engine.autobatch import BudgetChoice, find_token_budget
from benchharness.engine.batching import (
    PackedRow,
    TokenRequest,
    concatenate_rows,
    minimum_tokens,
    pack_rows,
    plan_batches,
    prefix_groups,
    strip_prefix,
)
from benchharness.engine.continuous import DecodeCounts, Prompt, SlotPlan, admission_threshold, generate, plan_slots
from benchharness.engine.masks import windows_unmasked
from benchharness.engine.prompt_lookup import LookupPlan, plan_lookup
from benchharness.engine.decode_settings import GenerationSettingError, decode_settings, merged_generation_config
from benchharness.engine.generation import DecodeSettings
from benchharness.engine.cpu_kernels import CpuKernels
from benchharness.engine.head import SplitModel, split_model
from benchharness.engine.path_check import check_engine_path
from benchharness.engine.reasoning import Markers, opens_block, strip_reasoning
from benchharness.engine.scoring import HeadQueue, PrefixState, run_body, run_prefix
from benchharness.engine.model_costs import weight_bytes

logger = logging.getLogger(__name__)

_DEFAULT_MAX_GEN_TOKS = 256
_DEFAULT_MAX_ROWS = 64
_MIN_ROW_SPLIT_TOKENS = 2048
# Contexts sharing fewer leading tokens than this are not worth a prefix group.
_MIN_SHARED_PREFIX = 16
_DEFAULT_PREFILL_CHUNK = 1024  # prompt tokens per prefill forward without a token budget
# Prompt-lookup drafts (prompt_lookup.py): up to 4 draft tokens per row, while rows x (1 + draft)
# stays within 24 tokens a step. On these CPUs a step of 24 tokens costs under twice one of a
# single token (the weights are read once either way); past that, drafts the model rejects cost
# more than the steps they save (benchmarks/continuous_vs_static.py --modes continuous,no-lookup).
_DEFAULT_LOOKUP_TOKENS = 4
_DEFAULT_LOOKUP_STEP_TOKENS = 24


@dataclass
class EngineStats:
    """Work done since construction (or the last `reset_stats`), for efficiency figures."""

    score_requests: int = 0
    score_forwards: int = 0
    score_prefixes: int = 0  # shared prefixes run once for a group of rows
    score_rows: int = 0
    score_padded_tokens: int = 0  # tokens the body computed, padding included
    score_row_tokens: int = 0  # tokens in the packed rows
    score_output_rows: int = 0  # rows through the output layer
    score_min_tokens: int = 0  # the fewest tokens the requests need (each distinct token prefix once)
    generate_requests: int = 0
    generate_batches: int = 0  # prefill batches admitted into the decoding slots
    generate_prefixes: int = 0  # shared prompt prefixes run once for a group of prompts
    prefill_tokens: int = 0
    decode_steps: int = 0
    decode_rows: int = 0  # running rows summed over decode steps
    kv_slot_reads: int = 0  # rows x cache slots summed over decode steps (keys and values read)
    max_running_rows: int = 0
    decode_seconds: float = 0.0  # wall time of the decode steps, prefills excluded
    draft_steps: int = 0  # decode steps that ran prompt-lookup drafts
    draft_tokens: int = 0  # draft tokens run
    accepted_drafts: int = 0  # draft tokens kept as output (the model chose them itself)
    generated_tokens: int = 0
    reasoning_unfinished: int = 0  # generations whose reasoning block never closed (scored as no answer)


@register_model("benchharness")
class BenchEngineLM(TemplateLM):
    """lm-eval model over an already loaded transformers causal LM and its tokenizer."""

    def __init__(
        self,
        model: transformers.PreTrainedModel,
        tokenizer: transformers.PreTrainedTokenizerBase,
        batch_size: int | str = "auto",
        max_batch_tokens: int | str | None = None,
        device: str | None = None,
        max_batch_size: int | None = None,
        max_length: int | None = None,
        max_gen_toks: int = _DEFAULT_MAX_GEN_TOKS,
        add_bos_token: bool | None = None,
        prefix_token_id: int | None = None,
        seed: int = 1234,
        max_row_tokens: int | None = None,
        share_prefixes: bool = True,
        continuous_batching: bool = True,
        cascade_prefixes: bool | str = True,
        cpu_kernels: bool = True,
        small_row_kernel: bool | str = True,
        check_model: bool = True,
        kv_cache_bytes: int | None = None,
        prompt_lookup_tokens: int | str = _DEFAULT_LOOKUP_TOKENS,
        lookup_step_tokens: int | str = _DEFAULT_LOOKUP_STEP_TOKENS,
        enable_thinking: bool | str | None = None,
        think_end_token: str | None = None,
        think_start_token: str = "<think>",
        **unused: Any,
    ) -> None:
        super().__init__()
        if unused:
            logger.warning("benchharness engine: ignoring arguments %s", sorted(unused))
        model_device = next(model.parameters()).device
        # No device given: the one the model is on (as lm-eval's hf model does with a model object).
        self._device = model_device if device is None else torch.device(device)
        if model_device.type != self._device.type:
            raise ValueError(
                f"the model is on {model_device} but the engine was asked for device={device!r}; "
                "load the model onto that device first (or pass the device it is on)."
            )
        model.eval()
        self._model = model
        self._split: SplitModel = split_model(
            model,
            check=check_model,
            cpu_kernels=_as_bool("cpu_kernels", cpu_kernels),
            small_rows=_as_bool("small_row_kernel", small_row_kernel),
        )
        self.tokenizer = configure_pad_token(tokenizer, model_config=model.config)
        self._max_length = max_length
        # The engine's own path (tree masks, positions, a prefix cache, past the window) against
        # the model's plain forward: a model whose code does not take them is refused here.
        self.path_check: dict[str, float | int] | None = None
        if check_model:
            self.path_check = check_engine_path(
                self._split, self.max_length, self.tokenizer.pad_token_id or 0,
                remote_code=not type(model).__module__.startswith("transformers."),
            )
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        self._max_gen_toks = int(max_gen_toks)
        self.seed = int(seed)
        # The chat template's thinking switch (Qwen3's `enable_thinking`; None: the template's default),
        # and the reasoning markers: stop strings end the answer, not the thinking, and the scorer
        # sees the answer only (reasoning.py). Same argument names as lm-eval's hf model.
        self.enable_thinking = None if enable_thinking is None else _as_bool("enable_thinking", enable_thinking)
        self.reasoning = Markers(think_start_token, think_end_token) if think_end_token else None

        self._auto = str(batch_size).startswith("auto")
        self._max_rows: int | None = (
            int(max_batch_size) if max_batch_size else (_DEFAULT_MAX_ROWS if self._auto else None)
        )
        if not self._auto:
            self._max_rows = int(batch_size)
            if self._max_rows < 1:
                raise ValueError(f"batch_size must be 'auto' or a positive integer, got {batch_size!r}")
        # The token budget: given, or (`batch_size: auto`) fixed on CPU so that batches never depend
        # on the machine's load; "probe" asks for the CPU timing probe instead (autobatch.py).
        self._probe_budget = str(max_batch_tokens).lower() == "probe"
        self._max_batch_tokens = int(max_batch_tokens) if max_batch_tokens and not self._probe_budget else None
        self._max_row_tokens = int(max_row_tokens) if max_row_tokens else None
        self._share_prefixes = _as_bool("share_prefixes", share_prefixes)
        # false: a decoding batch runs to its end before the next is admitted (static batches), as a reference
        self._continuous = _as_bool("continuous_batching", continuous_batching)
        # false: each decoding row keeps its own copy of a shared prefix (cascade.py), as a reference
        self._cascade = _as_bool("cascade_prefixes", cascade_prefixes)
        self._budget: BudgetChoice | None = None
        if self._max_batch_tokens is not None:
            self._budget = BudgetChoice(token_budget=self._max_batch_tokens, method="given")
        self._oom_splits = 0
        self.stats = EngineStats()
        self._kv_budget = int(kv_cache_bytes) if kv_cache_bytes else None
        self._lookup_tokens = _non_negative("prompt_lookup_tokens", prompt_lookup_tokens)
        self._lookup_step_tokens = _non_negative("lookup_step_tokens", lookup_step_tokens)
        self.generation_plan: SlotPlan | None = None
        self.lookup_plan: LookupPlan | None = None
        self.cascade_note: str | None = None  # how generation held shared prefixes ('' : once, cascade.py)
        self.last_decode_counts: DecodeCounts | None = None
        # lm-eval's evaluator reads `batch_sizes` for its results config.
        self.batch_sizes: dict[int, int] = {}

    # ------------------------------------------------------------ construction from lm-eval's CLI
    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> BenchEngineLM:
        """`lm_eval --model benchharness --model_args pretrained=PATH,dtype=float32,device=cpu,batch_size=auto`."""
        args = lm_utils.simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls.from_pretrained(**(args | extra))

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> BenchEngineLM:
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls.from_pretrained(**(dict(arg_dict) | extra))

    @classmethod
    def from_pretrained(
        cls,
        pretrained: str,
        dtype: str = "float32",
        device: str = "cpu",
        attn_implementation: str = "sdpa",
        tokenizer: str | None = None,
        **kwargs: Any,
    ) -> BenchEngineLM:
        """Load a local transformers folder (or hub id) and wrap it."""
        torch_dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
        model = transformers.AutoModelForCausalLM.from_pretrained(
            pretrained, dtype=torch_dtype, attn_implementation=attn_implementation
        ).to(device)
        tok = transformers.AutoTokenizer.from_pretrained(tokenizer or pretrained)
        return cls(model=model, tokenizer=tok, device=device, **kwargs)

    # ------------------------------------------------------------ properties lm-eval and the harness use
    @property
    def model(self) -> transformers.PreTrainedModel:
        return self._model

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def kernels(self) -> CpuKernels:
        """The CPU kernels the engine runs its model with (cpu_kernels.py), packed weights included."""
        return self._split.kernels

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # As HFLM: custom > BOS > EOS; used as the context of empty-context requests.
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        if self._max_length:
            return self._max_length
        return resolve_max_length(self._model.config, self.tokenizer)

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    @property
    def batch_info(self) -> dict:
        """What batch size / token budget is used and how it was chosen (for the run manifest)."""
        return {
            "engine": "benchharness",
            "batch_size": "auto" if self._auto else self._max_rows,
            "max_rows": self._max_rows,
            "token_budget": self._budget.token_budget if self._budget else None,
            # given | cpu-fixed | cpu-overhead-fit (the timing probe, on request) | cuda-oom-backoff
            "budget_method": self._budget.method if self._budget else ("none" if not (self._auto or self._probe_budget) else "not-yet-probed"),
            "budget_probes": list(self._budget.probes) if self._budget else [],
            "oom_splits": self._oom_splits,
            "device": str(self._device),
            "dtype": str(self._split.dtype).replace("torch.", ""),
            "attn_implementation": getattr(self._split.text_config, "_attn_implementation", None),
            "cpu_kernels": self._split.kernels.description,
            "path_check": self.path_check,
            "kv_budget_bytes": self.kv_budget_bytes(),
            "generation": self.generation_plan.to_dict() if self.generation_plan else None,
            "prompt_lookup": self.lookup_plan.to_dict() if self.lookup_plan else None,
            "shared_prefix_attention": (
                None if self.cascade_note is None else ("cascade" if not self.cascade_note else f"copied per row: {self.cascade_note}")
            ),
        }

    def reset_stats(self) -> None:
        self.stats = EngineStats()

    def get_model_info(self) -> dict:
        return {
            "model_num_parameters": sum(p.numel() for p in self._model.parameters()),
            "model_dtype": str(self._split.dtype),
            "engine_batch_info": self.batch_info,
        }

    # ------------------------------------------------------------ tokenization (HFLM semantics)
    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None, **kwargs: Any
    ) -> list[int]:
        """HFLM.tok_encode: tokenizer default or add_bos_token, no special tokens if the text starts with BOS."""
        special = _add_special_kwargs(add_special_tokens, self.add_bos_token)
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False
        encoding = self.tokenizer.encode(string, **special)
        if left_truncate_len:
            encoding = encoding[-left_truncate_len:]
        return encoding

    def _encode_prompt(self, string: str, left_truncate_len: int) -> list[int]:
        """HFLM.tok_batch_encode for one string (its add_special_tokens rule, left truncation)."""
        special: dict[str, bool] = {}
        if has_bos_prefix(string, getattr(self.tokenizer, "bos_token", None)):
            special = {"add_special_tokens": False}
        elif self.add_bos_token is not None:
            special = {"add_special_tokens": self.add_bos_token}
        ids = self.tokenizer(string, **special)["input_ids"]
        if left_truncate_len and len(ids) > left_truncate_len:
            logger.warning("left truncation of a prompt from %d to %d tokens", len(ids), left_truncate_len)
            ids = ids[-left_truncate_len:]
        return ids

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        switch = {} if self.enable_thinking is None else {"enable_thinking": self.enable_thinking}
        return self.tokenizer.apply_chat_template(
            chat_history,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
            **switch,
        )

    # ------------------------------------------------------------ batch budget
    def token_budget(self) -> int | None:
        """Tokens per forward (None: no budget, rows are capped by the batch size). With
        `batch_size: auto` it is chosen on first use: fixed on CPU, found by out-of-memory backoff
        on CUDA; with `max_batch_tokens=probe`, by the CPU timing probe."""
        if self._budget is None and (self._auto or self._probe_budget):
            self._budget = find_token_budget(self._split, self.max_length, probe=self._probe_budget)
            logger.info("benchharness engine: token budget %d (%s)", self._budget.token_budget, self._budget.method)
            self.batch_sizes[0] = self._budget.token_budget
        return self._budget.token_budget if self._budget else None

    # ------------------------------------------------------------ loglikelihood
    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
        disable_tqdm: bool = False,
        **kwargs: Any,
    ) -> list[tuple[float, bool]]:
        token_requests = [
            TokenRequest(index=i, context=tuple(context), continuation=tuple(continuation))
            for i, (_, context, continuation) in enumerate(requests)
        ]
        results = self.score_token_requests(token_requests, disable_tqdm=disable_tqdm)
        answers = [results[i] for i in range(len(requests))]
        for (request_str, _, _), answer in zip(requests, answers, strict=True):
            if request_str is not None:
                self.cache_hook.add_partial("loglikelihood", request_str, answer)
        return answers

    def score_token_requests(
        self, requests: Sequence[TokenRequest], disable_tqdm: bool = True
    ) -> dict[int, tuple[float, bool]]:
        """Score tokenized requests: {request index: (sum of log-probs, is greedy)}."""
        if not requests:
            return {}
        budget = self.token_budget()
        # A context group is split over rows (repeating the context) only when its tree is far
        # beyond the budget: splitting wastes context tokens, a long row only costs attention.
        max_row_tokens = self._max_row_tokens
        if max_row_tokens is None and budget is not None:
            max_row_tokens = max(4 * budget, _MIN_ROW_SPLIT_TOKENS)
        rows = pack_rows(requests, self.max_length, max_row_tokens=max_row_tokens)
        max_lanes = None if self._auto else self._max_rows
        if self._share_prefixes:
            groups, alone = prefix_groups(
                [row.tokens[: row.context_length] for row in rows],
                [len(row) for row in rows],
                _MIN_SHARED_PREFIX,
                min_group_tokens=budget or 0,
            )
        else:
            groups, alone = [], list(range(len(rows)))
        # (shared prefix or None, its rows, their batches)
        work: list[tuple[tuple[int, ...] | None, list[PackedRow], list[list[list[int]]]]] = []
        if alone:
            alone_rows = [rows[i] for i in alone]
            work.append((None, alone_rows, plan_batches(alone_rows, token_budget=budget, max_lanes=max_lanes)))
        for group in groups:
            suffixes = [strip_prefix(rows[i], len(group.prefix)) for i in group.rows]
            # On CUDA the budget bounds memory, and every lane holds its own copy of the prefix's
            # keys and values; on CPU it bounds compute, which the prefix does not add to.
            overhead = len(group.prefix) if self._device.type == "cuda" else 0
            batches = plan_batches(suffixes, token_budget=budget, max_lanes=max_lanes, lane_overhead=overhead)
            work.append((group.prefix, suffixes, batches))

        results: dict[int, tuple[float, bool]] = {}
        queue = HeadQueue(self._split)
        progress = tqdm(
            total=sum(len(batches) for _, _, batches in work), disable=disable_tqdm, desc="benchharness loglikelihood"
        )
        for prefix_tokens, group_rows, batches in work:
            prefix = None
            if prefix_tokens is not None:
                prefix = run_prefix(self._split, prefix_tokens)
                self.stats.score_prefixes += 1
                self.stats.score_padded_tokens += prefix.length
                self.stats.score_row_tokens += prefix.length
            for batch in batches:
                lanes = [concatenate_rows([group_rows[i] for i in lane]) for lane in batch]
                self._body_with_backoff(lanes, queue, prefix)
                if queue.full:
                    queue.flush(results)
                progress.update(1)
        progress.close()
        queue.flush(results)
        self.stats.score_requests += len(requests)
        self.stats.score_min_tokens += minimum_tokens(requests, self.max_length)
        return results

    def _body_with_backoff(self, rows: list[PackedRow], queue: HeadQueue, prefix: PrefixState | None) -> None:
        """Run a batch through the body into the output-layer queue; on GPU out-of-memory,
        split it in two and try again."""
        try:
            body = run_body(self._split, rows, self.tokenizer.pad_token_id or 0, prefix)
        except torch.OutOfMemoryError:
            if len(rows) == 1:
                raise
            self._oom_splits += 1
            if self._device.type == "cuda":
                torch.cuda.empty_cache()
            half = len(rows) // 2
            self._body_with_backoff(rows[:half], queue, prefix)
            self._body_with_backoff(rows[half:], queue, prefix)
            return
        queue.add(body)
        counts = body.counts
        self.stats.score_forwards += 1
        self.stats.score_rows += counts.rows
        self.stats.score_padded_tokens += counts.padded_tokens
        self.stats.score_row_tokens += counts.row_tokens
        self.stats.score_output_rows += counts.scored_nodes

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Perplexity: HFLM's disjoint rolling windows, all scored in one packed pass."""
        token_requests: list[TokenRequest] = []
        owner: list[int] = []
        for request_index, (string,) in enumerate(req.args for req in requests):
            windows = map(
                lm_utils.make_disjoint_window,
                lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            )
            for context, continuation in windows:
                token_requests.append(
                    TokenRequest(index=len(token_requests), context=tuple(context), continuation=tuple(continuation))
                )
                owner.append(request_index)
        results = self.score_token_requests(token_requests, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for window_index, request_index in enumerate(owner):
            totals[request_index] += results[window_index][0]
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------ generation
    def _eos_token_ids(self) -> frozenset[int]:
        """The ids transformers.generate stops on: the generation config's, else the tokenizer's. (The
        tokenizer's EOS, when the config names others, ends a generation too, as its text is one of
        lm-eval's stop strings: `reference.stop_token_ids` is both, where a recorded hf output ends.)"""
        config = getattr(self._model, "generation_config", None)
        eos = getattr(config, "eos_token_id", None) if config is not None else None
        if eos is None:
            eos = self.tokenizer.eos_token_id
        if eos is None:
            return frozenset()
        return frozenset([eos] if isinstance(eos, int) else eos)

    def _decode_settings(self, gen_kwargs: dict) -> tuple[DecodeSettings, list[str], int]:
        """Settings as HFLM + transformers.generate would use them (refusing what the engine does
        not apply), the stop sequences, and the tokens lm-eval reserves for the output."""
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        eos_text = self.tokenizer.decode(self.eot_token_id, skip_special_tokens=False)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
        max_gen_toks = int(kwargs.pop("max_gen_toks"))
        if "max_length" in kwargs:
            # HFLM hands it to generate as the total length, counted from its padded batch width:
            # outputs would depend on which prompts share a batch.
            raise GenerationSettingError(
                f"the task's generation kwargs set max_length={kwargs['max_length']!r}, which lm-eval's hf model "
                "uses as prompt + output length of its padded batch. Fix: set max_gen_toks instead, or run with `engine: hf`."
            )
        seed = int(kwargs.pop("seed", self.seed))
        # As HFLM._model_generate: greedy drops the temperature.
        if kwargs.get("do_sample") is False and float(kwargs.get("temperature", 0.0) or 0.0) == 0.0:
            kwargs.pop("temperature", None)
        merged = merged_generation_config(getattr(self._model, "generation_config", None), kwargs)
        settings = decode_settings(
            merged, max_gen_toks, tuple(s for s in until if s), self._eos_token_ids(), seed, type(self._model).__name__,
        )
        return replace(settings, reasoning=self.reasoning), until, max_gen_toks

    def _starts_open(self, context: str) -> bool:
        return self.reasoning is not None and opens_block(context, self.reasoning)

    def _generation_groups(
        self, prompts: dict[int, list[int]], max_new: int
    ) -> list[tuple[tuple[int, ...] | None, list[int]]]:
        """Prompts grouped by a shared prefix to run once (None: prompts run whole).

        A group must fill at least half a decoding batch (or hold every prompt), since
        decoding costs about as much per step for a few rows as for a full batch. Models
        with sliding-window layers whose masks the engine cannot build (masks.windows_unmasked)
        share only when no sequence can outgrow the window: transformers measures the window
        in cache slots, and the padding that sits between the prefix and a prompt's rest
        would shift them; the engine's own masks count it in tokens.
        """
        indices = list(prompts)
        if not self._share_prefixes:
            return [(None, indices)]
        min_members = min(len(indices), max(2, (self._max_rows or _DEFAULT_MAX_ROWS) // 2))
        groups, alone = prefix_groups(
            [prompts[i] for i in indices], [1] * len(indices), _MIN_SHARED_PREFIX, min_group_tokens=min_members
        )
        longest = max(len(p) for p in prompts.values())
        if windows_unmasked(self._split) and longest + max_new > (self._split.sliding_window or 0):
            return [(None, indices)]
        work: list[tuple[tuple[int, ...] | None, list[int]]] = []
        if alone:
            work.append((None, [indices[k] for k in alone]))
        work.extend((group.prefix, [indices[k] for k in group.rows]) for group in groups)
        return work

    def kv_budget_bytes(self) -> int:
        """Memory the decoding slots' keys and values may take: a quarter of the machine's RAM on
        CPU, half of what the GPU holds besides the weights on CUDA. From totals, not from what is
        free now, so the slot count (and which rows share a step) does not depend on other jobs."""
        if self._kv_budget is not None:
            return self._kv_budget
        if self._device.type == "cuda":
            total = torch.cuda.get_device_properties(self._device).total_memory
            return max(0, int((0.9 * total - weight_bytes(self._model)) * 0.5))
        return int(psutil.virtual_memory().total * 0.25)

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        outputs = self.generate_token_ids(requests, disable_tqdm=disable_tqdm)
        texts = []
        stops: dict[str, list[str]] = {}  # per distinct generation kwargs
        for req, new_tokens in zip(requests, outputs, strict=True):
            key = json.dumps(req.args[1], sort_keys=True, default=str)
            if key not in stops:
                stops[key] = self._decode_settings(req.args[1])[1]
            until = stops[key]
            text = self.tokenizer.decode(new_tokens, skip_special_tokens=True)
            if self.reasoning is not None:
                # Reasoning first, so the stop strings cut the answer, not the thoughts (as lm-eval's hf).
                text, unfinished = strip_reasoning(text, self._starts_open(req.args[0]), self.reasoning)
                self.stats.reasoning_unfinished += int(unfinished)
            text = postprocess_generated_text(generation=text, stop=until, think_end_token=None)
            texts.append(text)
            self.cache_hook.add_partial("generate_until", req.args, text)
        return texts

    def generate_token_ids(self, requests: list[Instance], disable_tqdm: bool = True) -> list[list[int]]:
        """The new tokens of each generate_until request (a final EOS included), before decoding:
        what the parity rule for half-precision generation compares (engine/parity.py)."""
        outputs: list[list[int] | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for index, req in enumerate(requests):
            key = json.dumps(req.args[1], sort_keys=True, default=str)
            groups.setdefault(key, []).append(index)

        pbar = tqdm(total=len(requests), disable=disable_tqdm, desc="benchharness generate_until")
        for indices in groups.values():
            settings, _, max_gen_toks = self._decode_settings(requests[indices[0]].args[1])
            max_ctx_len = self.max_length - max_gen_toks
            if max_ctx_len <= 0:
                raise ValueError(
                    f"max_gen_toks={max_gen_toks} leaves no room for a prompt "
                    f"within the model's maximum length {self.max_length}"
                )
            prompts = {i: self._encode_prompt(requests[i].args[0], max_ctx_len) for i in indices}
            queue: list[Prompt] = []
            for prefix_tokens, members in self._generation_groups(prompts, settings.max_new_tokens):
                prefix = None
                if prefix_tokens is not None:
                    prefix = run_prefix(self._split, prefix_tokens)
                    self.stats.generate_prefixes += 1
                    self.stats.prefill_tokens += prefix.length
                # Longest first: the long answers of long prompts start early, and prefills pad little.
                queue.extend(Prompt(i, tuple(prompts[i]), prefix, starts_open=self._starts_open(requests[i].args[0]))
                             for i in sorted(members, key=lambda i: -len(prompts[i])))
            cascades = False
            if any(p.prefix is not None for p in queue):
                self.cascade_note = cascade_reason(self._split) if self._cascade else "cascade_prefixes=false"
                cascades = not self.cascade_note
            # A row's cache holds its prompt (its rest only, where the prefix is held once) and its output.
            longest = max(len(p.tokens) - (p.prefix.length if cascades and p.prefix is not None else 0) for p in queue)
            plan = plan_slots(
                self._split, self._max_rows or _DEFAULT_MAX_ROWS, longest, settings.max_new_tokens, self.kv_budget_bytes()
            )
            if not self._continuous and plan.refill:
                plan = replace(plan, refill=False, reason="continuous_batching=false")
            self.generation_plan = plan
            lookup = plan_lookup(settings, self._lookup_tokens, self._lookup_step_tokens, windows_unmasked(self._split))
            self.lookup_plan = lookup
            found, counts = generate(
                self._split,
                queue,
                settings,
                plan,
                pad_token_id=self.tokenizer.pad_token_id or 0,
                decode=lambda ids: self.tokenizer.decode(ids, skip_special_tokens=False),
                chunk_tokens=self.token_budget() or _DEFAULT_PREFILL_CHUNK,
                admit_at_least=admission_threshold(plan.slots),
                on_finish=lambda _index, _tokens: pbar.update(1),
                lookup=lookup,
                cascades=cascades,
            )
            for i, new_tokens in found.items():
                outputs[i] = new_tokens
            self.stats.generate_batches += counts.admissions
            self.stats.prefill_tokens += counts.prefill_tokens
            self.stats.decode_steps += counts.decode_steps
            self.stats.decode_rows += counts.decode_rows
            self.stats.kv_slot_reads += counts.kv_slot_reads
            self.stats.decode_seconds += counts.decode_seconds
            self.stats.draft_steps += counts.draft_steps
            self.stats.draft_tokens += counts.draft_tokens
            self.stats.accepted_drafts += counts.accepted_drafts
            self.stats.max_running_rows = max(self.stats.max_running_rows, counts.max_running)
            self.stats.generated_tokens += counts.generated_tokens
            self.last_decode_counts = counts
        pbar.close()
        self.stats.generate_requests += len(requests)
        return [o if o is not None else [] for o in outputs]


def _non_negative(name: str, value: int | str) -> int:
    """A count given as an int, or as text in lm-eval's `--model_args name=4`."""
    try:
        count = int(value)
    except (TypeError, ValueError):
        count = -1
    if count < 0:
        raise ValueError(f"{name} must be a whole number >= 0, got {value!r}")
    return count


def _as_bool(name: str, value: bool | str) -> bool:
    """A flag given as a bool, or as text in lm-eval's `--model_args name=true`."""
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no"):
        return False
    raise ValueError(f"{name} must be true or false, got {value!r}")


def stats_as_dict(stats: EngineStats) -> dict[str, int | float]:
    return asdict(stats)
