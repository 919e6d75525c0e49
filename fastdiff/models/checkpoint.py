"""Reading checkpoint files into zoo models, with one short error that names the file.

``read_state_dict(path)`` reads ``.safetensors`` or a torch pickle and unwraps training checkpoints;
``load_state_dict(model, state, source)`` compares keys and shapes before loading. A missing, empty,
truncated or corrupt file, or the weights of another architecture, raise :class:`CheckpointError` (a
ValueError; :class:`CheckpointNotFoundError` is also a FileNotFoundError) whose message names the file and
gives counts and the first few missing / unexpected / mis-shaped keys, instead of torch's dump of every key.
"""

from __future__ import annotations

import os
import re

import torch
from torch import Tensor, nn

__all__ = ["CheckpointError", "CheckpointNotFoundError", "read_state_dict", "load_state_dict"]

SHOWN = 5  # keys listed per kind of mismatch
_WRAPPERS = ("ema", "model", "state_dict")  # training checkpoints around the state dict


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or whose weights do not fit the model."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint file does not exist."""


def _first_line(e: BaseException, limit: int = 160) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _looks_like_safetensors(head: bytes) -> bool:
    # 8-byte little-endian header length, then the JSON header
    return len(head) >= 9 and head[8:9] == b"{"


def read_state_dict(path, what: str = "checkpoint") -> dict[str, Tensor]:
    """A checkpoint file as a state dict of tensors: ``.safetensors`` (also recognised by its content),
    or a torch pickle (``.pt``, ``.pth``, ``.bin``, ``.ckpt``) holding the state dict itself or a
    training checkpoint around it (``{"ema": ...}``, ``{"model": ...}``, ``{"state_dict": ...}``); the
    DataParallel prefix ``module.`` is dropped. Raises :class:`CheckpointError` naming ``path``."""
    if not isinstance(path, (str, os.PathLike)):
        raise CheckpointError(f"{what} must be a file path, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointNotFoundError(f"{what} {path!r} does not exist")
    if not os.path.isfile(path):
        raise CheckpointError(f"{what} {path!r} is not a file")
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f"{what} {path!r} is empty (0 bytes)")
    with open(path, "rb") as f:
        head = f.read(16)
    if path.endswith(".safetensors") or _looks_like_safetensors(head):
        from safetensors.torch import load_file

        try:
            state = load_file(path)
        except Exception as e:
            raise CheckpointError(f"{what} {path!r} ({size} bytes) is not a readable safetensors file "
                                  f"(truncated or corrupt): {_first_line(e)}") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
            if found:  # a pickle of classes that weights_only refuses to run
                raise CheckpointError(f"{what} {path!r} holds Python objects other than tensors ({found.group(1)}), "
                                      "which torch.load(weights_only=True) does not run; save its state dict "
                                      "(or convert it to .safetensors)") from None
            if "WeightsUnpickler error" in str(e):  # not a pickle at all
                reason = str(e).split("WeightsUnpickler error:")[1].strip().splitlines()[0]
                raise CheckpointError(f"{what} {path!r} ({size} bytes) is not a readable torch checkpoint "
                                      f"(truncated or corrupt): {reason}") from None
            raise CheckpointError(f"{what} {path!r} ({size} bytes) is not a readable torch checkpoint "
                                  f"(truncated or corrupt): {_first_line(e)}") from None
    for key in _WRAPPERS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{what} {path!r} holds no state dict of tensors (found "
                              f"{'an empty dict' if isinstance(state, dict) else type(state).__name__})")
    others = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if others:
        raise CheckpointError(f"{what} {path!r} holds no state dict of tensors: {len(others)} entries are not "
                              f"tensors ({', '.join(map(repr, others[:SHOWN]))}"
                              f"{', ...' if len(others) > SHOWN else ''})")
    if all(isinstance(k, str) and k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _describe(n_model: int, n_file: int, missing: list, unexpected: list, shaped: list) -> str:
    """Counts and the first few keys of each kind of mismatch; ``shaped``: (key, file shape, model shape)."""
    def listing(items, show=str, sep=", "):
        return sep.join(show(k) for k in items[:SHOWN]) + (f" and {len(items) - SHOWN} more" if len(items) > SHOWN
                                                            else "")

    plural = lambda k: "s" * (len(k) != 1)
    parts = [f"{n_model} keys in the model, {n_file} in the file"]
    if missing:
        parts.append(f"{len(missing)} missing key{plural(missing)}: {listing(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key{plural(unexpected)}: {listing(unexpected)}")
    if shaped:
        show = lambda item: f"{item[0]} {item[1]} in the file vs {item[2]} in the model"
        parts.append(f"{len(shaped)} mis-shaped key{plural(shaped)}: {listing(shaped, show, '; ')}")
    return ". ".join(parts) + "."


_SIZE_MISMATCH = re.compile(r"size mismatch for ([^:\s]+): copying a param with shape torch\.Size\(\[([^\]]*)\]\) "
                            r"from checkpoint, the shape in current model is torch\.Size\(\[([^\]]*)\]\)")


def load_state_dict(model: nn.Module, state: dict, source: str = "the state dict", strict: bool = True,
                    what: str = "checkpoint") -> nn.Module:
    """``model.load_state_dict(state, strict)`` with one short error: a state dict that does not fit
    raises :class:`CheckpointError` naming ``source`` (the file) and the model class, with counts and the
    first few missing / unexpected / mis-shaped keys. Shapes are compared before anything is copied;
    keys are compared after the model's own renaming hooks (e.g. diffusers' older attention names), so
    on a key mismatch the model may hold part of the weights: load into a fresh model."""
    own = model.state_dict()
    shaped = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    fail = lambda detail: CheckpointError(f"{what} {source!r} does not fit {type(model).__name__} (another "
                                          f"architecture or configuration?): {detail}")
    if shaped:  # names as written (the model's renaming hooks have not run): a guide next to the shapes
        missing = [k for k in own if k not in state] if strict else []
        unexpected = [k for k in state if k not in own] if strict else []
        raise fail(_describe(len(own), len(state), missing, unexpected, shaped))
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a mismatch found only after the model's renaming hooks
        shaped = [(k, f"({a})", f"({b})") for k, a, b in _SIZE_MISMATCH.findall(str(e))]
        detail = _describe(len(own), len(state), [], [], shaped) if shaped else _first_line(e)
        raise fail(detail) from None
    if strict and (result.missing_keys or result.unexpected_keys):
        raise fail(_describe(len(own), len(state), list(result.missing_keys), list(result.unexpected_keys), []))
    return model
