"""Whether the Hugging Face hub can be used now, asked once instead of through retries.

Without a network, `datasets.load_dataset` retries every request five times with back-off (about
30 s) and logs a warning for each try before it gives up. One request tells the same: if it gets
no answer, the dataset is looked up in the local `datasets` cache only (offline mode), which
either finds it at once or fails at once.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator


def offline_reason() -> str | None:
    """Why the hub cannot be used now, or None when it answers.

    Offline mode (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE) is the reason when set; otherwise one HEAD
    request to the hub's endpoint, through huggingface_hub's own HTTP client (so that its proxy and
    certificate settings apply), with its metadata timeout (HF_HUB_ETAG_TIMEOUT, 10 s by default).
    Any HTTP status is an answer: only a request that gets none means the hub is unreachable.
    """
    import datasets.config
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if _datasets_offline(datasets.config) or constants.HF_HUB_OFFLINE:
        return "offline mode is on (HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set)"
    try:
        get_session().head(datasets.config.HF_ENDPOINT, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except Exception as exc:  # noqa: BLE001 -- whatever stops the request, the hub is not there
        return f"the hub at {datasets.config.HF_ENDPOINT} cannot be reached ({type(exc).__name__}: {exc})"
    return None


@contextlib.contextmanager
def offline_mode() -> Iterator[None]:
    """Offline mode for the duration of the block, as HF_HUB_OFFLINE=1 would have set it.

    Both libraries read the variable once, at import, into the module attributes set here; they
    consult those attributes on every request, so setting them has the variable's effect.
    """
    import datasets.config
    from huggingface_hub import constants

    # datasets consults HF_HUB_OFFLINE; versions before it was added consulted HF_DATASETS_OFFLINE.
    names = [name for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if hasattr(datasets.config, name)]
    saved = [getattr(datasets.config, name) for name in names], constants.HF_HUB_OFFLINE
    for name in names:
        setattr(datasets.config, name, True)
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for name, value in zip(names, saved[0]):
            setattr(datasets.config, name, value)
        constants.HF_HUB_OFFLINE = saved[1]


def _datasets_offline(config) -> bool:
    return bool(getattr(config, "HF_HUB_OFFLINE", False) or getattr(config, "HF_DATASETS_OFFLINE", False))
