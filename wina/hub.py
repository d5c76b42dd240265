"""The Hugging Face hub: whether to use it, and whether it answers.

Model ids, hub datasets (calibration text, lm-eval tasks without local data) come from the hub. When
the user set ``HF_HUB_OFFLINE=1`` (or the datasets/transformers equivalents) nothing is fetched.
Otherwise one short connection test (:func:`reachable`, at most ``WINA_HUB_TIMEOUT`` seconds,
default 3) runs before the first hub access, so that a machine without network gets one clear
error at once instead of the libraries' minute of retries; it is skipped when the hub is reached
through a proxy the test cannot see (``HTTPS_PROXY`` set).
"""
from __future__ import annotations

import os
import socket
from functools import lru_cache
from urllib.parse import urlparse

OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def offline() -> bool:
    """Whether the user asked the Hugging Face libraries to stay offline."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in OFFLINE_VARS)


def endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


@lru_cache(maxsize=1)
def reachable() -> bool:
    """True if a TCP connection to the hub's endpoint opens within the timeout (cached per process)."""
    if os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy"):
        return True
    url = urlparse(endpoint())
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme != "http" else 80)
    try:
        timeout = float(os.environ.get("WINA_HUB_TIMEOUT", "3"))
    except ValueError:
        timeout = 3.0
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def usable() -> bool:
    """Whether hub files may be fetched now: not offline, and the hub answers."""
    return not offline() and reachable()


def cached(repo_id: str, filename: str = "config.json") -> bool:
    """Whether the local Hugging Face cache holds ``filename`` of the model ``repo_id`` (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache
        return isinstance(try_to_load_from_cache(repo_id, filename), str)
    except Exception:       # an id the library refuses, an unreadable cache: not usable offline either
        return False


def model_availability(repo_id: str) -> str:
    """One line for a dry run: where a hub model would come from, and whether it can here."""
    if cached(repo_id):
        return "in the local Hugging Face cache"
    if offline():
        return ("NOT AVAILABLE here (not in the local Hugging Face cache, and HF_HUB_OFFLINE is set: "
                "download it on a machine with network, or give a local model folder)")
    if not reachable():
        return (f"NOT AVAILABLE here (not in the local Hugging Face cache, and {endpoint()} does not answer: "
                "download it where there is network, or give a local model folder)")
    return "not in the local Hugging Face cache: downloaded from the hub when run"
