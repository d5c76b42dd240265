"""The library's own exception types: every user-facing failure is a WinaError with one clear line."""


class WinaError(Exception):
    """Base class: the message is meant to be shown to a user as one line."""


class UnsupportedArchitecture(WinaError):
    pass


class ModelLoadError(WinaError):
    pass


class InvalidArgument(WinaError):
    pass


class TransformError(WinaError):
    pass


class PlanError(WinaError):
    pass


class DataError(WinaError):
    pass


class Cancelled(WinaError):
    """Raised inside a long step when its cancel token was triggered."""


OFFLINE_HINT = ("to work offline, pass a local folder or .gguf file (or smollm2-135m, the embedded "
                "model), give evaluation data with --data-dir / $WINA_DATA, and set HF_HUB_OFFLINE=1 "
                "to use what the Hugging Face cache already holds")

_NETWORK_NAMES = ("ConnectionError", "ConnectTimeout", "ReadTimeout", "Timeout", "MaxRetryError",
                  "NameResolutionError", "NewConnectionError", "OfflineModeIsEnabled", "ConnectError",
                  "gaierror", "LocalEntryNotFoundError")


def _names(exc: BaseException) -> set:
    return {c.__name__ for c in type(exc).__mro__}


def is_network_error(exc: BaseException) -> bool:
    """A failure to reach a server (the Hugging Face hub), through any of the libraries' types."""
    seen = 0
    while exc is not None and seen < 8:
        if _names(exc) & set(_NETWORK_NAMES):
            return True
        text = str(exc)
        if "Couldn't reach" in text or "offline mode" in text.lower() or "couldn't connect" in text.lower():
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def network_error(what: str, exc: BaseException, cls=None) -> "WinaError":
    """One line for a hub miss: what was wanted, why, how to run offline."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
    return (cls or DataError)(f"cannot fetch {what} from the Hugging Face hub ({first}); {OFFLINE_HINT}")


def os_reason(exc: OSError) -> "str | None":
    """What an environment fault of the file system means, in words, without the file's name
    ("permission denied", "no space left on the device; free some space or write elsewhere"), or
    None for an error number this list does not know. The one translation: :func:`user_error` and
    :func:`wina.files.check_writable` name the file around it, once."""
    import errno
    msg = {errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
           errno.EROFS: "read-only file system", errno.ENOSPC: "no space left on the device",
           errno.EDQUOT: "disk quota exceeded", errno.ENOENT: "no such file or folder",
           errno.ENOTDIR: "a part of the path is a file, not a folder",
           errno.EISDIR: "is a folder, not a file", errno.EEXIST: "already exists",
           errno.EIO: "input/output error", errno.ENAMETOOLONG: "file name too long"}.get(exc.errno)
    if msg is not None and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        msg += "; free some space or write elsewhere"
    return msg


def user_error(exc: BaseException, context: str = "") -> "WinaError | None":
    """The project's one-line error for an environment fault (permissions, disk full, read-only file
    system, truncated or corrupt files, text that is not UTF-8, the network), or None for a bug.

    ``context`` names what was being done ("writing runs/x.json") when the exception does not."""
    if isinstance(exc, WinaError):
        return exc
    where = f" ({context})" if context else ""
    if is_network_error(exc):
        return network_error(context or "a file", exc)
    if isinstance(exc, UnicodeDecodeError):
        return DataError(f"not UTF-8 text{where}: byte {exc.start} cannot be decoded ({exc.reason})")
    if isinstance(exc, OSError) and exc.errno is not None:
        path = exc.filename or context or "a file"
        msg = os_reason(exc)
        if msg is not None:
            return DataError(f"{path}: {msg}")
    names = _names(exc)
    text = str(exc)
    if "SafetensorError" in names or "SafetensorsParsingError" in names or "HeaderTooLarge" in text \
            or "MetadataIncompleteBuffer" in text or "incomplete metadata" in text.lower():
        return DataError(f"a weights file is truncated or corrupt{where}: {text.splitlines()[0][:160] if text else ''}"
                         "; delete it (and the model's cache folder, see $WINA_CACHE) and retry")
    if "UnpicklingError" in names or "Weights only load failed" in text:
        return DataError(f"refusing to unpickle a file that is not plain tensors{where}; "
                         "only safetensors and weights-only torch files are read")
    if "EOFError" in names or "BadGzipFile" in names or "JSONDecodeError" in names:
        return DataError(f"a file is truncated or not in the expected format{where}: "
                         f"{(text.splitlines() or [type(exc).__name__])[0][:160]}")
    return None
