"""Evaluating a (pruned) model: perplexity and zero-shot accuracy, with the papers' protocols.

* `perplexity(model, tokens, seqlen)` -- the SparseGPT/Wanda protocol: the token stream is cut into
  non-overlapping windows of seqlen tokens, the tail shorter than seqlen is dropped, each window is
  scored on its own (no context carried over), and ppl = exp(mean next-token NLL over all predicted
  tokens, i.e. seqlen - 1 per window). Because all windows have the same length this equals the
  reference code's exp(sum of per-window mean losses x seqlen / (windows x seqlen)).
* `zero_shot(model_path, tasks)` -- lm-evaluation-harness (an optional extra) on the Hugging Face
  model, `acc` per task and their mean; the papers use boolq, rte, hellaswag, winogrande, arc_easy,
  arc_challenge and openbookqa with 0 shots (`PAPER_ZERO_SHOT_TASKS`).
* `evaluate(model, data, seqlen, tasks)` -- what ``reconstruct eval`` runs: load a checkpoint, compute
  perplexity on each data source (see `calib.evaluation` for the token streams), optionally run the
  zero-shot tasks, print a Markdown table, optionally write JSON.

Seqlen changes perplexity noticeably (LLaMA-2-7B dense: 5.12 at 4096, 5.47 at 2048): always report
the dense model at the same seqlen beside the pruned one. docs/evaluation.md has the details.
"""
from __future__ import annotations

import contextlib
import gc
import importlib
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from calib import eval_tokens, hub

from .progress import Progress, format_duration

logger = logging.getLogger(__name__)

PAPER_ZERO_SHOT_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge",
                         "openbookqa")
LM_EVAL_INSTALL_COMMAND = "pip install reconstruct[eval]"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "auto": "auto"}


class EvaluationError(ValueError):
    """The evaluation cannot run on the given input (model location, data, settings, tasks); the
    message says what to change."""


# --------------------------------------------------------------------------------------------------
# Perplexity


def perplexity(model, tokens: torch.LongTensor, seqlen: int, batch_size: int = 1,
               device: str | torch.device = "cpu", progress: str | None = None) -> float:
    """exp(mean next-token NLL) over non-overlapping seqlen windows of `tokens` [1, N], tail dropped.

    The model must already be on `device` (only the token windows are moved there). It is run in
    eval mode without gradients or KV cache; its previous train/eval mode is restored afterwards.
    `progress`: a description to show progress over the windows under (`reconstruct.progress`);
    None shows nothing.
    """
    windows = _perplexity_windows(tokens, seqlen)
    if batch_size <= 0:
        raise EvaluationError(f"batch_size must be positive, got {batch_size}")
    total_nll = 0.0  # a Python float is a double: no precision lost summing ~10^6 token losses
    predicted_tokens = 0
    was_training = model.training
    model.eval()
    try:
        shown = Progress(len(windows), progress or "", "window", enabled=progress is not None)
        with torch.no_grad(), shown:
            for batch in windows.split(batch_size):
                batch = batch.to(device)
                logits = model(input_ids=batch, use_cache=False).logits
                total_nll += _next_token_nll_sum(logits, batch)
                predicted_tokens += batch.shape[0] * (seqlen - 1)
                shown.update(batch.shape[0], f"ppl so far {math.exp(total_nll / predicted_tokens):.4g}")
    finally:
        model.train(was_training)
    return math.exp(total_nll / predicted_tokens)


def _perplexity_windows(tokens: torch.LongTensor, seqlen: int) -> torch.LongTensor:
    """`tokens` [1, N] as [N // seqlen, seqlen] windows; the last N % seqlen tokens are dropped."""
    if tokens.dim() != 2 or tokens.shape[0] != 1:
        raise EvaluationError(f"tokens must have shape [1, N], got {list(tokens.shape)}")
    if seqlen < 2:
        raise EvaluationError(f"seqlen must be at least 2 (a window predicts seqlen - 1 tokens), got {seqlen}")
    num_windows = tokens.shape[1] // seqlen
    if num_windows == 0:
        raise EvaluationError(f"the evaluation text has {tokens.shape[1]} tokens, fewer than one window "
                              f"of seqlen={seqlen}; lower --seqlen or give more text")
    return tokens[0, :num_windows * seqlen].reshape(num_windows, seqlen)


def _next_token_nll_sum(logits: torch.Tensor, input_ids: torch.LongTensor) -> float:
    """Sum over positions of -log p(token t+1 | tokens <= t); the loss in float32 even for fp16 models."""
    predictions = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    return F.cross_entropy(predictions.reshape(-1, predictions.shape[-1]), targets.reshape(-1),
                           reduction="sum").item()


# --------------------------------------------------------------------------------------------------
# Zero-shot accuracy (lm-evaluation-harness)


def zero_shot(model_path: str, tasks: list[str], batch_size: int | str = 1, device: str = "cpu",
              limit: int | float | None = None, include_path: str | os.PathLike | None = None,
              num_fewshot: int = 0, dtype: str | None = None) -> dict:
    """`acc` of each lm-evaluation-harness task, and their mean, for the checkpoint at `model_path`.

    Runs ``lm_eval.simple_evaluate`` with its ``hf`` model. `limit` evaluates only the first
    examples of each task (for smoke tests; published numbers use all). `include_path` is a directory
    of extra task YAMLs, searched in addition to lm-eval's own tasks.

    Returns {"acc": {task: acc}, "acc_stderr": {task: stderr}, "mean_acc": mean, "num_fewshot": ...,
    "limit": ..., "lm_eval_version": ...}.
    """
    lm_eval = _import_lm_eval()
    from lm_eval.tasks import TaskManager

    tasks = [tasks] if isinstance(tasks, str) else list(tasks)  # one name, not its characters
    if not tasks:
        raise EvaluationError("no zero-shot tasks given; name at least one, e.g. "
                              f"--tasks {','.join(PAPER_ZERO_SHOT_TASKS)}")
    model_args = {"pretrained": str(model_path)}
    if dtype is not None:
        model_args["dtype"] = dtype
    # A TaskManager only when needed: building one indexes all of lm-eval's task YAMLs (seconds).
    task_manager = TaskManager(include_path=str(include_path)) if include_path is not None else None
    output = lm_eval.simple_evaluate(model="hf", model_args=model_args, tasks=tasks,
                                     num_fewshot=num_fewshot, batch_size=batch_size, device=device,
                                     limit=limit, task_manager=task_manager, log_samples=False)
    accuracy = {task: _task_metric(output["results"], task, "acc") for task in tasks}
    stderr = {task: _task_metric(output["results"], task, "acc_stderr", required=False) for task in tasks}
    return {"acc": accuracy, "acc_stderr": stderr, "mean_acc": sum(accuracy.values()) / len(accuracy),
            "num_fewshot": num_fewshot, "limit": limit, "lm_eval_version": _version_of("lm_eval")}


def _import_lm_eval():
    try:
        return importlib.import_module("lm_eval")
    except ModuleNotFoundError as exc:
        if exc.name != "lm_eval":
            raise  # lm-eval is there but one of its own imports is broken: show that
        raise ImportError(
            "zero-shot evaluation needs lm-evaluation-harness, an optional extra of reconstruct; "
            f"install it with: {LM_EVAL_INSTALL_COMMAND}"
        ) from exc


def _task_metric(results: dict, task: str, metric: str, required: bool = True) -> float | None:
    """`metric` of `task` from lm-eval's results, whose keys are "<metric>,<filter>" (filter "none")."""
    task_results = results.get(task)
    if task_results is None:
        raise EvaluationError(f"lm-eval returned no results for task {task!r} (got: {sorted(results)})")
    value = task_results.get(f"{metric},none")
    if value is None and required:
        available = sorted(key.split(",")[0] for key in task_results if "," in key)
        raise EvaluationError(f"task {task!r} reports no {metric!r} (its metrics: {available}); "
                              f"only tasks with an accuracy metric can be averaged")
    # lm-eval writes "N/A" for a stderr it could not compute.
    return float(value) if isinstance(value, (int, float)) else None


def _version_of(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


# --------------------------------------------------------------------------------------------------
# The `reconstruct eval` command


def evaluate(model: str, data: list[str] | tuple[str, ...] | str = ("wikitext2",), seqlen: int = 2048,
             tasks: list[str] | None = None, batch_size: int = 1, device: str = "cpu",
             dtype: str | None = None, text_field: str = "text",
             cache_dir: str | os.PathLike | None = None, output_json: str | os.PathLike | None = None,
             include_path: str | os.PathLike | None = None,
             limit: int | float | None = None) -> dict:
    """Perplexity of checkpoint `model` on each source in `data`, and zero-shot `tasks` if given.

    `model` is a local checkpoint directory or a hub id; `data` holds sources as understood by
    `calib.eval_tokens` ("wikitext2", "c4" or a local .txt/.jsonl/.parquet path; a single string
    is one source). `dtype` is float32, float16, bfloat16 or auto (None: transformers' default).
    Prints a Markdown table, writes the results as JSON to `output_json` if given, and returns them.
    """
    sources = [data] if isinstance(data, str) else list(data)
    _check_model_location(model)
    torch_dtype = _torch_dtype(dtype)
    results: dict = {"model": model, "seqlen": seqlen, "dtype": dtype, "perplexity": {},
                     "eval_windows": {}, "zero_shot": None}
    if sources:
        # All token streams first: bad data fails in seconds, before a large model is loaded.
        tokenizer = load_tokenizer(model)
        token_streams = {source: eval_tokens(source, tokenizer, seqlen, text_field=text_field,
                                             cache_dir=cache_dir)
                         for source in sources}
        language_model = load_model(model, torch_dtype, device)
        results["dtype"] = str(language_model.dtype).removeprefix("torch.")
        _warn_if_beyond_context(language_model, seqlen)
        for number, (source, tokens) in enumerate(token_streams.items(), start=1):
            of_all = f" ({number}/{len(token_streams)})" if len(token_streams) > 1 else ""
            results["perplexity"][source] = perplexity(language_model, tokens, seqlen, batch_size, device,
                                                       progress=f"eval {source}{of_all}")
            results["eval_windows"][source] = tokens.shape[1] // seqlen
        # lm-eval loads its own copy of the model: free ours first so that only one is in memory.
        del language_model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if tasks:
        # lm-eval runs the tasks' requests together, with its own progress bar over them: these
        # lines say what that bar is about, and how long it took.
        started = time.monotonic()
        print(f"eval zero-shot: {len(tasks)} task(s) with lm-eval: {', '.join(tasks)}", file=sys.stderr,
              flush=True)
        results["zero_shot"] = zero_shot(model, tasks, batch_size=batch_size, device=device,
                                         limit=limit, include_path=include_path, dtype=dtype)
        print(f"eval zero-shot: done in {format_duration(time.monotonic() - started)}", file=sys.stderr,
              flush=True)
    print(markdown_table(results), end="\n\n")
    if output_json is not None:
        _write_json(results, Path(output_json))
    return results


def load_tokenizer(model: str):
    """The tokenizer of a local checkpoint directory or a hub id."""
    from transformers import AutoTokenizer

    _check_model_location(model)
    with _hub_failure_advice(model):
        return AutoTokenizer.from_pretrained(model)


def load_model(model: str, dtype: torch.dtype | str | None, device: str):
    """A causal LM in eval mode on `device`, from a local checkpoint directory or a hub id."""
    from transformers import AutoModelForCausalLM

    _check_model_location(model)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    with _hub_failure_advice(model):
        return AutoModelForCausalLM.from_pretrained(model, device_map=device, **kwargs).eval()


@contextlib.contextmanager
def _hub_failure_advice(model: str):
    """Turn a failure to fetch `model` from the hub into advice to use a local directory. Without
    the hub, only the local cache is looked in (`calib.hub`): at once, instead of after retries."""
    local = Path(model).expanduser().is_dir()
    unavailable = None if local else hub.offline_reason()
    try:
        with hub.offline_mode() if unavailable else contextlib.nullcontext():
            yield
    except OSError as exc:
        if local:
            raise  # a local checkpoint with a problem: transformers' message says which
        why = f"{unavailable}, and it is not in the local cache" if unavailable else str(exc)
        raise EvaluationError(f"could not load model {model!r} from the Hugging Face hub ({why}); pass the "
                              f"path of a local checkpoint directory instead") from exc


def _check_model_location(model: str) -> None:
    """Fail early and clearly when `model` is meant as a local path but is not a directory."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise EvaluationError(f"model {model!r} is a file; pass the directory that holds the "
                                  f"checkpoint (config.json, *.safetensors, tokenizer files)")
        if not (path / "config.json").is_file():
            raise EvaluationError(f"model directory {model!r} has no config.json; pass the directory of a "
                                  f"Hugging Face checkpoint (config.json, *.safetensors, tokenizer files)")
        return
    # A hub id is "name" or "owner/name"; anything absolute, relative-looking or deeper is a path.
    looks_like_path = model.startswith(("/", ".", "~")) or model.count("/") > 1 or "\\" in model
    if looks_like_path:
        raise EvaluationError(f"model directory {model!r} does not exist; pass an existing "
                              f"checkpoint directory or a hub id such as meta-llama/Llama-2-7b-hf")


def _torch_dtype(dtype: str | None) -> torch.dtype | str | None:
    if dtype is None:
        return None
    if dtype not in DTYPES:
        raise EvaluationError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def _warn_if_beyond_context(model, seqlen: int) -> None:
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and seqlen > context:
        logger.warning("seqlen=%d is longer than the model's context (max_position_embeddings=%d): "
                       "its perplexity is not comparable with published numbers", seqlen, context)


def markdown_table(results: dict) -> str:
    """The results of `evaluate` as a two-column Markdown table."""
    rows = [f"| {source} ppl (seqlen {results['seqlen']}) | {value:.4f} |"
            for source, value in results["perplexity"].items()]
    zero_shot_results = results.get("zero_shot")
    if zero_shot_results:
        rows += [f"| {task} acc | {value:.4f} |" for task, value in zero_shot_results["acc"].items()]
        rows.append(f"| mean acc ({len(zero_shot_results['acc'])} tasks) | "
                    f"{zero_shot_results['mean_acc']:.4f} |")
    header = [f"{results['model']} ({results['dtype'] or 'default dtype'})", "", "| metric | value |",
              "|---|---|"]
    return "\n".join(header + rows)


def _write_json(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    logger.info("evaluation results written to %s", path)
