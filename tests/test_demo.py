"""`reconstruct demo` (the README's first command) says that its perplexities are a smoke test."""
from __future__ import annotations

import reconstruct.api
import reconstruct.eval
from reconstruct.cli import main


def test_demo_says_its_numbers_are_a_smoke_test_before_it_shows_them(monkeypatch, tmp_path, capsys):
    # The pipeline itself is tested elsewhere: here only what the demo says around it.
    block = {"index": 0, "heldout_before": 2.0, "heldout_after": 1.0, "merged": True}
    monkeypatch.setattr(reconstruct.api, "prune", lambda *args, **kwargs: {"blocks": [block]})
    monkeypatch.setattr(reconstruct.api, "retrain", lambda *args, **kwargs: {
        "heldout_before": 2.0, "heldout_after": 1.5, "merged": True, "totals": {"sparsity_after": 0.5}})
    monkeypatch.setattr(reconstruct.eval, "evaluate", lambda model, **kwargs: print(f"| table of {model} |"))
    assert main(["demo", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    note = printed.index("demo: the perplexities below are a smoke test, not a measure of quality: a random "
                         "tiny model, scored on the text it was calibrated and retrained on (so the retrained "
                         "model can beat the dense one)")
    assert note < printed.index("| table of ")
