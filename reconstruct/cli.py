"""The `reconstruct` command: arguments, help and exit codes; the work is done elsewhere."""
from __future__ import annotations

import argparse
import gc
import logging
import sys
import tempfile
from pathlib import Path

from . import distributed
from .config import (DTYPES, GRANULARITIES, RETRAIN_DEFAULT_LR, RETRAIN_OFFLOAD, RETRAIN_PARAMS, TARGETS,
                     RetrainConfig, RunConfig, default_device)
from .corrections import choices as correction_choices
from .failures import EXIT_FAILED, report_failure
from .model_card import command_line
from .pruning import METHODS
from .timing import process_age_seconds

DEFAULTS = RunConfig(model="", out="")


def _add_prune_arguments(parser: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    what = parser.add_argument_group("what to prune")
    what.add_argument("model", help="checkpoint directory or Hugging Face hub id (safetensors weights)")
    what.add_argument("--out", required=True, help="output checkpoint directory (written as OUT.partial "
                      "until complete)")
    what.add_argument("--method", choices=list(METHODS), default=d.method, help="pruning method (default: %(default)s)")
    what.add_argument("--sparsity", type=float, default=None,
                      help="fraction of each layer's weights set to zero, in [0, 1) (default: 0.5, or what "
                      "--pattern implies)")
    what.add_argument("--pattern", default=None, metavar="N:M",
                      help="semi-structured sparsity: N weights kept of every M consecutive inputs, e.g. 2:4")
    what.add_argument("--layers", nargs="+", default=None, metavar="REGEX",
                      help="prune only linears whose name inside a block matches one of these regular "
                      "expressions, e.g. 'mlp' or 'q_proj|k_proj' (default: every linear in every block)")

    what.add_argument("--masks-from", default=None, metavar="PRUNED",
                      help="repair a checkpoint pruned elsewhere: take its pruned weights and zeros (any format "
                      "retrain reads) and fit the correction against MODEL, the dense model it came from")

    data = parser.add_argument_group("calibration data")
    data.add_argument("--calib", default=d.calib,
                      help="c4 | wikitext2 | a local .txt/.jsonl/.parquet file (default: %(default)s)")
    data.add_argument("--text-field", default=d.text_field, help="text field of .jsonl/.parquet files (default: %(default)s)")
    data.add_argument("--nsamples", type=int, default=d.nsamples, help="calibration windows (default: %(default)s)")
    data.add_argument("--seqlen", type=int, default=d.seqlen, help="tokens per window (default: %(default)s)")
    data.add_argument("--seed", type=int, default=d.seed,
                      help="seeds window sampling and correction initialisation (default: %(default)s)")
    data.add_argument("--tokenizer", default=None, help="tokenizer directory or hub id (default: the model's)")
    data.add_argument("--cache-dir", default=None, help="token cache (default: ~/.cache/reconstruct/tokens)")

    fit = parser.add_argument_group("correction (PERP reconstruction)")
    fit.add_argument("--correction", default=d.correction, choices=correction_choices(),
                     help="what is fitted after pruning each block; 'none' prunes only (default: %(default)s)")
    fit.add_argument("--rank", type=int, default=d.rank, help="LoRA rank r (default: %(default)s)")
    fit.add_argument("--alpha", type=float, default=d.alpha,
                     help="LoRA alpha; scale s = alpha/r (default: 2·rank, so s = 2 whatever the rank)")
    fit.add_argument("--steps", type=int, default=d.steps, help="optimisation steps per unit (default: %(default)s)")
    fit.add_argument("--lr", type=float, default=d.lr, help="AdamW learning rate (default: %(default)s)")
    fit.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay (default: %(default)s)")
    fit.add_argument("--warmup", type=float, default=d.warmup,
                     help="fraction of steps with linear warm-up, then linear decay (default: %(default)s)")
    fit.add_argument("--fit-batch-size", type=int, default=d.fit_batch_size,
                     help="calibration windows per optimisation step (default: %(default)s)")
    fit.add_argument("--check-every", type=int, default=d.check_every, metavar="STEPS",
                     help="measure the held-out error every STEPS steps, keep the best state and stop early "
                     "after --patience checks without improvement; 0 = off (default: %(default)s)")
    fit.add_argument("--patience", type=int, default=d.patience,
                     help="held-out checks without improvement before fitting stops (default: %(default)s)")
    fit.add_argument("--granularity", choices=GRANULARITIES, default=d.granularity,
                     help="fit per block, per sublayer (attention, MLP) or per linear (default: %(default)s)")
    fit.add_argument("--target", choices=TARGETS, default=d.target,
                     help="dense: the dense model's own activations; sparse-inputs: the dense block on the "
                     "pruned model's inputs (PERP); mix: the midpoint of those two; none: dense inputs and "
                     "targets, no error propagation (default: dense for --granularity block, sparse-inputs "
                     "for sublayer and linear)")
    fit.add_argument("--heldout", type=float, default=d.heldout,
                     help="fraction of windows held out to check that a correction helps (default: %(default)s)")

    run = parser.add_argument_group("resources")
    run.add_argument("--device", default=default_device(), help="cuda, cuda:1 or cpu (default: %(default)s)")
    run.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                     help="weights' dtype for computing and saving (default: the checkpoint's)")
    run.add_argument("--batch-size", type=int, default=d.batch_size,
                     help="windows per forward pass; halved automatically on CUDA out-of-memory. On the CPU "
                     "1 gives the lowest host memory (a window's activations at a time), at some speed "
                     "(default: %(default)s)")
    run.add_argument("--offload-activations", choices=["auto", "ram", "disk"], default=d.offload_activations,
                     help="keep calibration activations in RAM, in memory-mapped files, or decide by "
                     "--activation-budget-gb (default: %(default)s)")
    run.add_argument("--activation-budget-gb", type=float, default=None,
                     help="host RAM allowed for activations before they go to disk (default: half the free RAM)")
    run.add_argument("--error-windows", type=int, default=d.error_windows, metavar="N",
                     help="calibration windows the per-layer output errors of report.json are measured on; "
                     "each costs about a replay of that window; 0 skips the measurement (default: %(default)s)")
    run.add_argument("--prefetch", choices=["auto", "on", "off"], default=d.prefetch,
                     help="read the next block's weights in a background thread while the current one "
                     "computes; it holds one more block in host memory, so auto means on for an "
                     "accelerator, off on the CPU (default: %(default)s)")
    _add_output_directory_arguments(run)


def _add_output_directory_arguments(group) -> None:
    """--overwrite and --resume, the same for both commands that write a model."""
    group.add_argument("--overwrite", action="store_true", help="replace a non-empty --out directory")
    group.add_argument("--resume", action="store_true",
                       help="continue an interrupted run from OUT.partial (same settings required)")


def _add_retrain_arguments(parser: argparse.ArgumentParser) -> None:
    d = RetrainConfig(model="", out="")
    what = parser.add_argument_group("what to retrain")
    what.add_argument("model", help="a pruned checkpoint (directory or hub id): our prune output, Wanda's or "
                      "SparseGPT's .bin, llm-compressor's dense or legacy sparse-bitmask output")
    what.add_argument("--out", required=True, help="output checkpoint directory (written as OUT.partial "
                      "until complete)")
    what.add_argument("--params", choices=RETRAIN_PARAMS, default=d.params,
                      help="what trains: biases, norms, MaskLoRA, ScaleLoRA, LoRA-Prune (a baseline whose "
                      "merge is masked) or full (every kept weight); pruned weights stay exactly zero "
                      "(default: %(default)s)")
    what.add_argument("--allow-dense", action="store_true",
                      help="retrain a checkpoint whose linears have no zeros (otherwise an error)")

    data = parser.add_argument_group("training data")
    data.add_argument("--data", default=d.data,
                      help="c4 | wikitext2 | a local .txt/.jsonl/.parquet file, packed into windows "
                      "(default: %(default)s)")
    data.add_argument("--text-field", default=d.text_field, help="text field of .jsonl/.parquet (default: %(default)s)")
    data.add_argument("--seqlen", type=int, default=d.seqlen, help="tokens per window (default: %(default)s)")
    data.add_argument("--seed", type=int, default=d.seed, help="seeds data order and initialisation (default: %(default)s)")
    data.add_argument("--tokenizer", default=None, help="tokenizer directory or hub id (default: the model's)")
    data.add_argument("--cache-dir", default=None, help="token cache (default: ~/.cache/reconstruct/tokens)")

    loop = parser.add_argument_group("optimisation")
    loop.add_argument("--steps", type=int, default=d.steps, help="optimisation steps (default: %(default)s)")
    loop.add_argument("--batch-size", type=int, default=d.batch_size,
                      help="windows per optimisation step (default: %(default)s)")
    loop.add_argument("--grad-accum", type=int, default=None,
                      help="split each batch into this many forward/backward passes; the result is the "
                      "same, up to float rounding (default: chosen by the memory plan: the fewest passes "
                      "that fit --max-memory)")
    loop.add_argument("--lr", type=float, default=None,
                      help="AdamW learning rate (default: " + ", ".join(f"{k} {v:g}" for k, v in
                                                                        RETRAIN_DEFAULT_LR.items()) + ")")
    loop.add_argument("--weight-decay", type=float, default=d.weight_decay, help="(default: %(default)s)")
    loop.add_argument("--warmup", type=float, default=d.warmup,
                      help="fraction of steps with linear warm-up, then linear decay (default: %(default)s)")
    loop.add_argument("--rank", type=int, default=d.rank,
                      help="LoRA rank r (default: %(default)s; prune's 64 was chosen by a sweep of per-block "
                      "repair, docs/benchmarks.md, which retraining has not had)")
    loop.add_argument("--alpha", type=float, default=d.alpha,
                      help="LoRA alpha; scale s = alpha/r "
                      "(default: 2·rank, so s = 2 whatever the rank, as in prune; "
                      "32 at the default rank)")
    loop.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None,
                      help="recompute activations in the backward pass: less memory, "
                      "about a third slower "
                      "(default: on only if the memory plan needs it to fit --max-memory)")
    loop.add_argument("--eval-every", type=int, default=d.eval_every,
                      help="held-out loss every this many steps (default: %(default)s)")
    loop.add_argument("--eval-windows", type=int, default=d.eval_windows,
                      help="validation windows, from documents never trained on (default: %(default)s)")

    teacher = parser.add_argument_group("distillation")
    teacher.add_argument("--teacher", default=None, help="dense model: add KL(teacher || student) on the logits")
    teacher.add_argument("--distill", type=float, default=d.distill, help="weight of the KL term (default: %(default)s)")
    teacher.add_argument("--teacher-device", default=None,
                         help="where the teacher runs (default: the student's device)")

    run = parser.add_argument_group("resources")
    run.add_argument("--device", default=default_device(), help="cuda, cuda:1 or cpu (default: %(default)s)")
    run.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                     help="frozen weights' dtype (default: the checkpoint's); trainable ones are fp32")
    run.add_argument("--fsdp", action="store_true",
                     help="under torchrun: shard the weights across the processes (FSDP2) instead of a whole "
                     "copy on each device, for a model that does not fit one; slower (docs/distributed.md)")
    run.add_argument("--max-memory", type=float, default=None, metavar="GB",
                     help="memory per process the run must fit (10%% of it is kept for the allocator); "
                     "the memory plan chooses --grad-accum and --gradient-checkpointing, where not given, "
                     "to fit it (default: the device's free memory; on the CPU, the host's available memory)")
    run.add_argument("--offload", choices=RETRAIN_OFFLOAD, default=d.offload,
                     help="cpu: keep the parameters, gradients and optimiser in host memory and move each block "
                     "to the device only for its forward and backward (FSDP2's CPU offload; under torchrun the "
                     "model is also sharded, as with --fsdp): a model larger than the device, slower "
                     "(default: %(default)s)")
    run.add_argument("--plan", action="store_true",
                     help="print the memory plan (what each item of the run needs, the peak, the settings "
                     "chosen) and exit, without reading any weight")
    run.add_argument("--save-every", type=int, default=d.save_every,
                     help="save a resumable training state every this many steps; 0: never (default: %(default)s)")
    _add_output_directory_arguments(run)


def _add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="checkpoint directory or hub id")
    parser.add_argument("--data", default="wikitext2",
                        help="comma-separated perplexity sources: wikitext2, c4, or local .txt/.jsonl/.parquet "
                        "paths (default: %(default)s); 'none' for zero-shot only")
    parser.add_argument("--seqlen", type=int, default=2048, help="window length (default: %(default)s)")
    parser.add_argument("--tasks", default=None,
                        help="comma-separated lm-evaluation-harness tasks, e.g. boolq,rte,hellaswag,winogrande,"
                        "arc_easy,arc_challenge,openbookqa (needs `pip install reconstruct[eval]`)")
    parser.add_argument("--include-path", default=None, help="directory of extra lm-eval task YAML files")
    parser.add_argument("--limit", type=float, default=None, help="lm-eval: examples per task (for quick checks)")
    parser.add_argument("--batch-size", type=int, default=1, help="windows per forward pass (default: %(default)s)")
    parser.add_argument("--device", default=default_device(), help="(default: %(default)s)")
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the checkpoint's)")
    parser.add_argument("--text-field", default="text", help="text field of .jsonl/.parquet (default: %(default)s)")
    parser.add_argument("--cache-dir", default=None, help="token cache (default: ~/.cache/reconstruct/tokens)")
    parser.add_argument("--output-json", default=None, help="also write the results here")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The command line's parser. Of the commands that live in their own module (`_EXTRA_COMMANDS`),
    only `command`'s is imported (for its arguments): the sweep's imports the evaluation and YAML
    code, which a prune never uses. The others are listed with their help only."""
    parser = argparse.ArgumentParser(prog="reconstruct", description="Prune a causal language model one block "
                                     "at a time and repair it with sparsity-preserving corrections.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each step")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_prune_arguments(commands.add_parser("prune", help="prune (and repair) a model into a new checkpoint"))
    _add_retrain_arguments(commands.add_parser(
        "retrain", help="retrain a pruned model globally (next-token loss, a tiny trainable subset), zeros kept"))
    _add_eval_arguments(commands.add_parser("eval", help="perplexity (papers' protocols) and zero-shot accuracy"))
    demo = commands.add_parser("demo", help="build a tiny model offline, prune and repair it (layer-wise, then "
                               "globally), and compare perplexities (a smoke test of the whole pipeline)")
    demo.add_argument("--out", default=None, help="where to put the demo's files (default: a temporary directory)")
    for name, (module, description) in _available_extra_commands().items():
        extra = commands.add_parser(name, help=description)
        if name == command:
            _import(module).add_arguments(extra)
    return parser


# Commands that live in their own module: name -> (module, help). Each module has add_arguments(parser)
# and main(args) -> int.
_EXTRA_COMMANDS = {
    "sweep": ("reconstruct.sweep", "run a grid of prune + eval cells from a YAML file, resumably"),
    "compare": ("reconstruct.compare", "per-layer sparsity and error of several runs side by side"),
}


def command_of(argv: list[str]) -> str | None:
    """The command `argv` names: its first word that is not an option (the only option before the
    command, -v/--verbose, takes no value)."""
    return next((word for word in argv if not word.startswith("-")), None)


def _import(module: str):
    import importlib

    return importlib.import_module(module)


def _available_extra_commands():
    import importlib.util

    return {name: spec for name, spec in _EXTRA_COMMANDS.items() if importlib.util.find_spec(spec[0])}


def _settings(args, config_class) -> dict:
    """The command line's values for the fields of `config_class` (RunConfig, RetrainConfig), except
    the model and output that are passed on their own."""
    return {k: v for k, v in vars(args).items() if k in config_class.field_names() and k not in ("model", "out")}


def run_prune(args, startup_s: float = 0.0) -> int:
    from .api import prune

    report = prune(args.model, args.out, startup_s=startup_s, invocation=args.invocation,
                   **_settings(args, RunConfig))
    if not distributed.is_main():  # under torchrun, rank 0 speaks for all
        return 0
    totals = report["totals"]
    print(f"wrote {args.out}: sparsity {totals['pruned_sparsity']:.4f}, {totals['wall_time_s']:.1f} s, "
          f"peak host memory {totals['peak_host_rss_bytes'] / 2**30:.2f} GiB"
          + (f", reverted blocks {totals['reverted_blocks']}" if totals["reverted_blocks"] else ""))
    return 0


def run_retrain(args) -> int:
    from .api import plan_retrain, retrain

    if args.plan:
        from .plan import DoesNotFitError

        try:
            plan = plan_retrain(args.model, args.out, **_settings(args, RetrainConfig))
        except DoesNotFitError as error:  # the smallest plan, then the error and what would fit
            print(error.smallest.render() + "\n")
            raise
        if distributed.is_main():
            print(plan.render())
        return 0
    report = retrain(args.model, args.out, invocation=args.invocation, **_settings(args, RetrainConfig))
    if not distributed.is_main():  # under torchrun, rank 0 speaks for all
        return 0
    totals = report["totals"]
    print(f"wrote {args.out}: {report['params']} ({report['trainable_params']:,} trainable parameters, "
          f"{100 * report['trainable_fraction']:.3f}%), held-out loss {report['heldout_before']:.4f} -> "
          f"{report['heldout_after']:.4f} ({'merged' if report['merged'] else 'NOT merged: worse'}), "
          f"sparsity {totals['sparsity_after']:.4f}, {totals['wall_time_s']:.1f} s")
    return 0


def run_eval(args) -> int:
    from .eval import evaluate

    data = [] if args.data in ("none", "") else [s for s in args.data.split(",") if s]
    tasks = [t for t in args.tasks.split(",") if t] if args.tasks else None
    evaluate(args.model, data=data, seqlen=args.seqlen, tasks=tasks, batch_size=args.batch_size,
             device=args.device, dtype=args.dtype, text_field=args.text_field, cache_dir=args.cache_dir,
             output_json=args.output_json, include_path=args.include_path, limit=args.limit)
    return 0


def run_demo(args) -> int:
    from .api import prune, retrain
    from .eval import evaluate
    from .tiny import save_tiny_model, write_sample_text

    root = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="reconstruct-demo-"))
    root.mkdir(parents=True, exist_ok=True)
    model = save_tiny_model(root / "tiny-llama", "llama", hidden_size=64, intermediate_size=128)
    text = write_sample_text(root / "sample.txt", repeats=10)
    print(f"demo: tiny LLaMA in {model}, calibration text {text}")
    report = prune(str(model), str(root / "pruned"), method="wanda", sparsity=0.5, correction="masklora",
                   calib=str(text), nsamples=16, seqlen=64, steps=50, device="cpu", overwrite=True)
    for block in report["blocks"]:
        print(f"  block {block['index']}: held-out output error {block['heldout_before']:.4f} -> "
              f"{block['heldout_after']:.4f} ({'merged' if block['merged'] else 'reverted'})")
    # The other repair: the pruned model retrained globally (next-token loss, MaskLoRA), zeros kept.
    retrained = retrain(str(root / "pruned"), str(root / "retrained"), params="masklora", data=str(text),
                        steps=30, batch_size=4, seqlen=64, eval_windows=2, save_every=0, device="cpu",
                        overwrite=True)
    print(f"  retrain: held-out loss {retrained['heldout_before']:.4f} -> {retrained['heldout_after']:.4f} "
          f"({'merged' if retrained['merged'] else 'not merged'}), sparsity {retrained['totals']['sparsity_after']:.4f}")
    print("demo: the perplexities below are a smoke test, not a measure of quality: a random tiny model, "
          "scored on the text it was calibrated and retrained on (so the retrained model can beat the dense one)")
    evaluate(str(model), data=[str(text)], seqlen=64, device="cpu")
    evaluate(str(root / "pruned"), data=[str(text)], seqlen=64, device="cpu")
    evaluate(str(root / "retrained"), data=[str(text)], seqlen=64, device="cpu")
    print(f"demo: pruned and retrained checkpoints, with report.json, in {root / 'pruned'} and {root / 'retrained'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`argv` None: this process is the command (`reconstruct …`, `python -m reconstruct …`), and a
    prune's report counts the process's start-up and imports in its wall time."""
    parser = build_parser(command_of(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(argv)
    args.invocation = command_line(sys.argv[1:] if argv is None else argv)  # for the report and model card
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    startup_s = process_age_seconds() if argv is None else 0.0
    handlers = {"prune": lambda a: run_prune(a, startup_s), "retrain": run_retrain, "eval": run_eval,
                "demo": run_demo}
    try:
        if args.command in handlers:
            return handlers[args.command](args)
        return _import(_EXTRA_COMMANDS[args.command][0]).main(args)
    except KeyboardInterrupt:
        resumable = args.command in ("prune", "retrain")
        print("interrupted" + (": rerun the same command with --resume to continue" if resumable else ""),
              file=sys.stderr)
        return 130
    except distributed.DistributedError as error:  # another rank failed, or the ranks disagree
        if args.verbose:
            logging.exception("details")
        print(f"reconstruct {args.command}: error: {error}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as error:  # noqa: BLE001 -- bad input, the machine, or a bug: failures.py says which
        return report_failure(args.command, error, args.verbose)
    finally:
        if argv is None:
            # The process ends next. Its last garbage collection would walk every object torch and
            # transformers made (1.2-1.5 s measured after the imports alone) to free memory that
            # the exit returns anyway; frozen objects are skipped by it.
            gc.freeze()


if __name__ == "__main__":
    sys.exit(main())
