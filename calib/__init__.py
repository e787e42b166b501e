"""Calibration and evaluation data, with the papers' protocols named and reproducible.

* `calibration_windows(source, tokenizer, nsamples, seqlen, seed)` -> LongTensor [nsamples, seqlen]:
  the windows that pruning statistics and corrections are fitted on (`calib.calibration`).
* `training_windows(source, tokenizer, ntrain, nvalidation, seqlen, seed)` -> (LongTensor [ntrain,
  seqlen], LongTensor [nvalidation, seqlen]): packed windows for global retraining and a disjoint
  validation slice (`calib.training`).
* `eval_tokens(source, tokenizer, seqlen)` -> LongTensor [1, N]: held-out text for perplexity
  (`calib.evaluation`).

A source is ``"c4"``, ``"wikitext2"`` (hub datasets, the papers' protocols) or the path of a local
``.txt``, ``.jsonl`` or ``.parquet`` file (`calib.sources`). Tokenised data is cached on disk
(`calib.cache`). Every bad input raises `CalibrationError`, whose message says what to change.
docs/evaluation.md describes the protocols in full.
"""
from calib.calibration import calibration_windows
from calib.errors import CalibrationError
from calib.evaluation import eval_tokens
from calib.training import training_windows

__all__ = ["CalibrationError", "calibration_windows", "eval_tokens", "training_windows"]
