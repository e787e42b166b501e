#!/usr/bin/env python
"""Train small LLaMA- and OPT-style causal LMs offline, as a testbed for pruning benchmarks.

Randomly initialised models (see `reconstruct/tiny.py`) are fine for checking shapes, but a pruning
method can only be judged on a model that has learned something: its perplexity has to have room to
get worse. This script builds such models without any network access:

1. Text: documentation that ships with the Python installation itself (docstrings of the stdlib and
   of site-packages, plus *.md / *.rst / *.txt files), collected in a fixed order, filtered,
   deduplicated and capped. Split by document into OUT/train.txt (calibration) and OUT/test.txt
   (held-out perplexity). Documents are separated by one blank line and contain none themselves,
   so `text.split("\\n\\n")` recovers them.
2. Tokenizer: a byte-level BPE trained on train.txt, saved with each model.
3. Models: a LLaMA-style and an OPT-style model of a few million parameters, trained with AdamW and
   a warmup + cosine schedule on random windows of train.txt, saved in float32 as safetensors.
4. Evaluation: held-out perplexity on non-overlapping windows of test.txt, next to the perplexity of
   a unigram model and of the untrained network, written with the run's details to OUT/testbed.json.

The text depends on which packages are installed, so two machines give different (but each
deterministic) testbeds; testbed.json records a hash of the text to tell them apart.

    python scripts/make_testbed.py --threads 1                 # both models, ~15-20 min on a CPU
    python scripts/make_testbed.py --model llama --steps 50    # a quick one
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import os
import re
import site
import sys
import sysconfig
import time
import unicodedata
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

DEFAULT_OUT = Path("~/.cache/reconstruct/testbed").expanduser()

DOC_SUFFIXES = {".md", ".rst", ".txt"}
# Files that are text but not prose: licences, packaging metadata, lists of names.
SKIP_NAME = re.compile(
    r"licen[cs]e|copying|notice|authors|contributors|credits|record|requirements|entry_points"
    r"|top_level|dependency_links|sources|installer|requested|metadata|namespace_packages"
    r"|zip-safe|wheel|direct_url", re.IGNORECASE)
# Test suites carry fixtures (mail samples, encoding tables, source in odd encodings), not prose.
SKIP_DIRS = {"__pycache__", "test", "tests", "testing", "testdata", "test_data", "site-packages",
             "dist-packages", ".git"}
MAX_FILE_BYTES = 2_000_000   # larger "text" files are data dumps
MIN_DOC_CHARS = 300          # shorter documents are mostly one-liners ("Return self.")
MAX_DOC_CHARS = 50_000       # so that no single file dominates the corpus
MAX_PACKAGE_SHARE = 0.08     # likewise for a single package (awscli alone ships 25 MB of .rst)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]  # ids 0, 1, 2


# ---------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------

def source_roots() -> list[Path]:
    """The stdlib and the site-packages directories of this interpreter, without duplicates."""
    paths = sysconfig.get_paths()
    roots = [paths["stdlib"], paths["purelib"], paths["platlib"], *site.getsitepackages()]
    out: list[Path] = []
    for r in roots:
        p = Path(r).resolve()
        if p.is_dir() and p not in out:
            out.append(p)
    return out


def candidate_files(roots: list[Path]) -> list[tuple[str, str, Path]]:
    """(name, package key, path) of every .py and doc file, in sorted order.

    The name ("stdlib/..." or "site-packages/...") does not depend on where Python is installed;
    the key (top-level directory under its root) is what the per-package cap counts against.
    SKIP_DIRS contains "site-packages" so that walking the stdlib does not descend into it; the
    site-packages roots are walked on their own.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    files = []
    for root in roots:
        label = "stdlib" if root == stdlib else root.name
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
            rel = Path(dirpath).relative_to(root)
            for name in sorted(filenames):
                suffix = Path(name).suffix.lower()
                if suffix != ".py" and (suffix not in DOC_SUFFIXES or SKIP_NAME.search(name)):
                    continue
                key = rel.parts[0] if rel.parts else name
                key = re.sub(r"-[^-]*\.dist-info$", "", key)  # a package and its dist-info together
                files.append((f"{label}/{(rel / name).as_posix()}", f"{label}/{key}",
                              Path(dirpath) / name))
    return files


def read_text(path: Path) -> str | None:
    """The file as UTF-8 text, or None if it is large, binary or in another encoding."""
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            return None
        data = path.read_bytes()
    except OSError:
        return None
    if b"\x00" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def docstrings(source: str) -> list[str]:
    """Module, class and function docstrings in source order (parsed, never imported)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError):
        return []
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                found.append((getattr(node, "lineno", 0), doc))
    return [doc for _, doc in sorted(found, key=lambda x: x[0])]


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def clean(text: str) -> str:
    """Light normalisation: NFC, no control characters or tabs, no blank or data-like lines."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("", text.expandtabs(4))
    lines = []
    for line in text.split("\n"):
        line = line.rstrip()
        # Blank lines separate documents in the output files, so paragraphs lose theirs. Long
        # lines without spaces are base64 blobs, hashes or minified data.
        if not line.strip() or (len(line) > 200 and " " not in line.strip()):
            continue
        lines.append(line)
    text = "\n".join(lines)
    if len(text) > MAX_DOC_CHARS:
        text = text[:text.rfind("\n", 0, MAX_DOC_CHARS)]
    return text


def looks_like_prose(text: str) -> bool:
    """Mostly ASCII (skips encoding tables and non-English text) and mostly letters and spaces."""
    if len(text) < MIN_DOC_CHARS:
        return False
    ascii_share = sum(c.isascii() for c in text) / len(text)
    letter_share = sum(c.isalpha() or c == " " for c in text) / len(text)
    return ascii_share > 0.97 and letter_share > 0.6


def _norm_key(text: str) -> str:
    return hashlib.sha1(" ".join(text.split()).lower().encode()).hexdigest()


def _seeded_hash(seed: int, text: str) -> str:
    return hashlib.sha256(f"{seed}:{text}".encode()).hexdigest()


def collect_documents(max_chars: int, seed: int) -> list[str]:
    """Up to about max_chars of cleaned, deduplicated documents (one per source file).

    Files are visited in a seeded pseudo-random order, so that a small cap still yields a mix of
    packages rather than the alphabetically first ones. Each file's place in that order is a hash
    of the seed and its name alone, so installing or removing a package while (or between) runs
    only adds or drops that package's documents instead of reshuffling everything.
    """
    files = sorted(candidate_files(source_roots()), key=lambda f: _seeded_hash(seed, f[0]))
    per_package_cap = MAX_PACKAGE_SHARE * max_chars
    seen: set[str] = set()  # docstrings and documents already taken (vendored copies, templates)
    per_package: dict[str, int] = {}
    docs: list[str] = []
    total = 0
    bar = tqdm(total=max_chars, unit="char", unit_scale=True, desc="collect text",
               mininterval=1.0)
    for _, key, path in files:
        if total >= max_chars:
            break
        if per_package.get(key, 0) >= per_package_cap:
            continue
        raw = read_text(path)
        if raw is None:
            continue
        if path.suffix == ".py":
            parts = []
            for doc in docstrings(raw):
                h = _norm_key(doc)
                if h not in seen:
                    seen.add(h)
                    parts.append(doc)
            raw = "\n".join(parts)
        text = clean(raw)
        if not looks_like_prose(text):
            continue
        h = _norm_key(text)
        if h in seen:
            continue
        seen.add(h)
        docs.append(text)
        per_package[key] = per_package.get(key, 0) + len(text)
        total += len(text)
        bar.update(len(text))
    bar.close()
    print(f"collected {len(docs)} documents, {total / 1e6:.2f} M chars, from "
          f"{len(per_package)} packages (of {len(files)} candidate files)")
    return docs


def split_documents(docs: list[str], test_frac: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded split by document, so no held-out document has been seen in part during training.

    A document is held out when a seeded hash of its text falls below test_frac, so its side of the
    split does not depend on which other documents were collected.
    """
    def held_out(doc: str) -> bool:
        return int(_seeded_hash(seed, doc)[:16], 16) < test_frac * 16 ** 16

    train = [d for d in docs if not held_out(d)]
    test = [d for d in docs if held_out(d)]
    return train, test


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

def train_tokenizer(train_docs: list[str], vocab_size: int, model_max_length: int):
    """A byte-level BPE (as in GPT-2/OPT/LLaMA-3) on the training documents only."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2,
                                  special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(train_docs, trainer=trainer)
    # No post-processor: encoding adds no special tokens, so a text file and its token stream
    # correspond one to one (as in the usual WikiText-2 perplexity loop).
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", model_max_length=model_max_length)


def encode_file(tokenizer, text: str) -> torch.Tensor:
    # The raw `tokenizers` object: the same ids as tokenizer(text), without the warning about
    # sequences longer than model_max_length.
    return torch.tensor(tokenizer.backend_tokenizer.encode(text).ids, dtype=torch.long)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

def build_model(kind: str, args, vocab_size: int):
    from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig

    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if kind == "llama":
        # LLaMA-1/2 layout: RMSNorm, SwiGLU, rotary, no biases, full multi-head attention,
        # untied output head.
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=args.hidden_size,
                             intermediate_size=args.intermediate_size,
                             num_hidden_layers=args.layers, num_attention_heads=args.heads,
                             num_key_value_heads=args.heads, max_position_embeddings=args.seqlen,
                             rms_norm_eps=1e-5, tie_word_embeddings=False, **ids)
    elif kind == "opt":
        # OPT-125m layout: pre-LayerNorm, biases everywhere, learned positions, ReLU, tied head.
        # Dropout off: with one pass over a few MB it only slows learning.
        config = OPTConfig(vocab_size=vocab_size, hidden_size=args.hidden_size,
                           ffn_dim=args.ffn_dim, word_embed_proj_dim=args.hidden_size,
                           num_hidden_layers=args.layers, num_attention_heads=args.heads,
                           max_position_embeddings=args.seqlen, do_layer_norm_before=True,
                           activation_function="relu", enable_bias=True, dropout=0.0,
                           attention_dropout=0.0, tie_word_embeddings=True, **ids)
    else:
        raise ValueError(kind)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def n_params(model) -> int:
    # parameters() yields a tied weight once, so OPT's shared embedding/head counts once.
    return sum(p.numel() for p in model.parameters())


@torch.inference_mode()
def perplexity(model, ids: torch.Tensor, seqlen: int, batch_size: int) -> float:
    """exp(mean NLL) over non-overlapping windows of seqlen tokens (the tail is dropped).

    Every window is scored independently, so the first token of each has no context and is only
    input: seqlen - 1 predictions per window.
    """
    model.eval()
    n = ids.numel() // seqlen
    windows = ids[: n * seqlen].view(n, seqlen)
    nll, count = 0.0, 0
    for i in range(0, n, batch_size):
        batch = windows[i:i + batch_size]
        logits = model(input_ids=batch).logits[:, :-1].float()
        nll += F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1),
                               reduction="sum").item()
        count += batch[:, 1:].numel()
    return math.exp(nll / count)


def unigram_perplexity(train_ids: torch.Tensor, test_ids: torch.Tensor, vocab_size: int,
                       seqlen: int) -> float:
    """Add-one-smoothed token frequencies, scored on the same positions as the models."""
    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1.0
    logp = (counts / counts.sum()).log()
    n = test_ids.numel() // seqlen
    targets = test_ids[: n * seqlen].view(n, seqlen)[:, 1:]
    return math.exp(-logp[targets].mean().item())


def lr_lambda(warmup: int, total: int, min_ratio: float = 0.1):
    """Linear warmup, then cosine decay to min_ratio of the peak learning rate."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def train(model, train_ids: torch.Tensor, args, seed: int, desc: str) -> list[float]:
    """AdamW on random windows of the training stream; returns the loss of every step."""
    gen = torch.Generator().manual_seed(seed)
    # No weight decay on norms, biases (1-D) - the usual split.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(args.warmup, args.steps))
    offsets = torch.arange(args.seqlen)
    losses = []
    model.train()
    bar = tqdm(range(args.steps), desc=desc)
    for _ in bar:
        starts = torch.randint(0, train_ids.numel() - args.seqlen, (args.batch_size,),
                               generator=gen)
        batch = train_ids[starts[:, None] + offsets]
        loss = model(input_ids=batch, labels=batch).loss  # labels are shifted inside the model
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{sched.get_last_lr()[0]:.1e}")
    model.eval()
    return losses


def loss_curve(losses: list[float], points: int = 10) -> list[dict]:
    """Mean training loss over `points` equal segments of the run (single steps are noisy)."""
    size = max(1, len(losses) // points)
    out = []
    for i in range(0, len(losses), size):
        seg = losses[i:i + size]
        out.append({"steps": f"{i + 1}-{i + len(seg)}", "loss": round(sum(seg) / len(seg), 4)})
    return out


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory")
    p.add_argument("--model", choices=["llama", "opt", "both"], default="both")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch and the tokenizer trainer (default: torch's)")
    p.add_argument("--max-text-mb", type=float, default=4.0,
                   help="cap on collected text, millions of characters (train + test)")
    p.add_argument("--test-frac", type=float, default=0.05, help="share of documents held out")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--seqlen", type=int, default=256)
    g = p.add_argument_group("model size (shared by both families unless noted)")
    g.add_argument("--hidden-size", type=int, default=256)
    g.add_argument("--layers", type=int, default=4)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--intermediate-size", type=int, default=688, help="LLaMA SwiGLU width")
    g.add_argument("--ffn-dim", type=int, default=1024, help="OPT MLP width")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=400, help="optimizer steps per model")
    g.add_argument("--batch-size", type=int, default=16, help="windows of seqlen tokens per step")
    g.add_argument("--lr", type=float, default=2e-3)
    g.add_argument("--warmup", type=int, default=30)
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--eval-batch-size", type=int, default=16)
    args = p.parse_args(argv)
    if args.steps < 1 or not 0 < args.test_frac < 1:
        p.error("--steps must be at least 1 and --test-frac in (0, 1)")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        # Before the first parallel region of either library, or the setting is ignored.
        os.environ["RAYON_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
        torch.set_num_interop_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    from transformers import set_seed
    set_seed(args.seed)
    t_start = time.time()
    out = args.out.expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)

    docs = collect_documents(int(args.max_text_mb * 1e6), args.seed)
    train_docs, test_docs = split_documents(docs, args.test_frac, args.seed)
    if not train_docs or not test_docs:
        sys.exit(f"{len(docs)} documents are too few to split; raise --max-text-mb")
    train_text = "\n\n".join(train_docs) + "\n"
    test_text = "\n\n".join(test_docs) + "\n"
    (out / "train.txt").write_text(train_text, encoding="utf-8")
    (out / "test.txt").write_text(test_text, encoding="utf-8")

    t0 = time.time()
    tokenizer = train_tokenizer(train_docs, args.vocab_size, args.seqlen)
    vocab_size = len(tokenizer)
    train_ids = encode_file(tokenizer, train_text)
    test_ids = encode_file(tokenizer, test_text)
    print(f"tokenizer: vocab {vocab_size}, trained in {time.time() - t0:.1f}s; "
          f"train {len(train_docs)} docs / {len(train_text) / 1e6:.2f} M chars / "
          f"{train_ids.numel()} tokens; test {len(test_docs)} docs / "
          f"{len(test_text) / 1e6:.2f} M chars / {test_ids.numel()} tokens "
          f"({test_ids.numel() // args.seqlen} windows of {args.seqlen})")
    if test_ids.numel() < 2 * args.seqlen:
        sys.exit(f"test.txt has {test_ids.numel()} tokens, too few for windows of {args.seqlen}; "
                 "raise --max-text-mb or --test-frac")
    unigram = unigram_perplexity(train_ids, test_ids, vocab_size, args.seqlen)
    print(f"unigram baseline held-out ppl: {unigram:.2f}")

    text_sha = hashlib.sha256((train_text + "\0" + test_text).encode()).hexdigest()
    # Keep the entry of a model trained by an earlier run on the same text (e.g. --model opt
    # after --model llama); a different text makes the old numbers incomparable.
    report_path = out / "testbed.json"
    old = json.loads(report_path.read_text()) if report_path.exists() else {}
    models = old.get("models", {}) if old.get("text", {}).get("sha256") == text_sha else {}

    kinds = ["llama", "opt"] if args.model == "both" else [args.model]
    for kind in kinds:
        torch.manual_seed(args.seed)  # each model's init and data order independent of the other
        model = build_model(kind, args, vocab_size)
        params = n_params(model)
        untrained = perplexity(model, test_ids, args.seqlen, args.eval_batch_size)
        print(f"\n{kind}: {params / 1e6:.2f} M parameters; untrained held-out ppl {untrained:.1f}")
        t0 = time.time()
        losses = train(model, train_ids, args, args.seed, desc=f"train {kind}")
        train_time = time.time() - t0
        ppl = perplexity(model, test_ids, args.seqlen, args.eval_batch_size)
        curve = loss_curve(losses)
        print(f"{kind}: trained {args.steps} steps in {train_time:.0f}s; train loss "
              + " -> ".join(f"{c['loss']:.2f}" for c in curve))
        print(f"{kind}: held-out ppl {ppl:.2f} (unigram {unigram:.2f}, untrained {untrained:.1f})")
        path = out / kind
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        models[kind] = {
            "path": str(path), "model_type": model.config.model_type, "params": params,
            "hidden_size": args.hidden_size, "layers": args.layers, "heads": args.heads,
            "mlp_width": args.intermediate_size if kind == "llama" else args.ffn_dim,
            "steps": args.steps, "batch_size": args.batch_size, "seqlen": args.seqlen,
            "train_tokens_seen": args.steps * args.batch_size * args.seqlen, "lr": args.lr,
            "train_time_s": round(train_time, 1), "threads": torch.get_num_threads(),
            "loss_curve": curve, "final_train_loss": curve[-1]["loss"],
            "held_out_ppl": round(ppl, 3), "untrained_ppl": round(untrained, 3),
        }

    report = {
        "out": str(out), "seed": args.seed, "seqlen": args.seqlen,
        "text": {"train": str(out / "train.txt"), "test": str(out / "test.txt"),
                 "max_text_mb": args.max_text_mb, "train_docs": len(train_docs),
                 "test_docs": len(test_docs), "train_chars": len(train_text),
                 "test_chars": len(test_text), "train_tokens": train_ids.numel(),
                 "test_tokens": test_ids.numel(), "sha256": text_sha},
        "tokenizer": {"type": "byte-level BPE", "vocab_size": vocab_size},
        "baselines": {"unigram_ppl": round(unigram, 3), "uniform_ppl": vocab_size},
        "models": models,
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__},
        "total_time_s": round(time.time() - t_start, 1),
    }
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {report_path} ({report['total_time_s']:.0f}s in total)")
    return report


if __name__ == "__main__":
    main()
