"""Input checks shared by the ops: each raises a ValueError naming the problem before any kernel launches."""

import weakref

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_ndim(t: torch.Tensor, ndim: int, name: str, layout: str = "") -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        hint = f" {layout}" if layout else ""
        raise ValueError(f"{name} must have {ndim} dimensions{hint}, got shape {tuple(t.shape)}")


def check_float_dtype(t: torch.Tensor, name: str, allowed=FLOAT_DTYPES) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise ValueError(f"{name} must be one of {names}, got {str(t.dtype).replace('torch.', '')}")


def check_integer_dtype(t: torch.Tensor, name: str) -> None:
    if t.dtype == torch.bool or t.dtype.is_floating_point or t.dtype.is_complex:
        raise ValueError(f"{name} must be an integer tensor (int64), got {str(t.dtype).replace('torch.', '')}")


def check_same_device(**tensors: torch.Tensor) -> None:
    """All named tensors (None entries skipped) live on one device."""
    present = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in present.values()}
    if len(devices) > 1:
        where = ", ".join(f"{name} on {t.device}" for name, t in present.items())
        raise ValueError(f"tensors must be on the same device: {where}")


def check_ignore_index(ignore_index) -> None:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")


def check_not_meta(**tensors: torch.Tensor) -> None:
    """No named tensor (None entries skipped) is on the meta device: ops that read label values need real data."""
    for name, t in tensors.items():
        if t is not None and t.is_meta:
            raise ValueError(f"{name} is a meta tensor, which holds no values: this op reads the labels' values "
                             f"(their range check and the token layout), so it needs tensors on the CPU or a GPU")


def check_labels_in_range(labels: torch.Tensor, vocab: int, ignore_index: int, name: str = "labels") -> None:
    """Every label is `ignore_index` or in `[0, vocab)`.

    One small reduction over `labels`; on CUDA its `.item()` synchronizes with the device once per call.
    """
    check_not_meta(**{name: labels})
    if labels.numel() == 0:
        return
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        first = bad.nonzero()[0].tolist()
        value = labels[tuple(first)].item()
        raise ValueError(f"{name}{first} = {value} is outside [0, {vocab}) and is not ignore_index ({ignore_index})")


def check_logits_labels(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, labels_in_range=True) -> None:
    """`logits [R, T, V]` float32/bfloat16/float16 and `labels [R, T]` integer on the same device, and (unless
    `labels_in_range=False`: an op that reads them checks them itself) labels in range."""
    check_ndim(logits, 3, "logits", "[R, T, V]")
    check_ndim(labels, 2, "labels", "[R, T]")
    check_float_dtype(logits, "logits")
    check_integer_dtype(labels, "labels")
    check_ignore_index(ignore_index)
    check_same_device(logits=logits, labels=labels)
    check_not_meta(logits=logits, labels=labels)
    if tuple(labels.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match logits [R, T] = {tuple(logits.shape[:2])}")
    if logits.shape[2] == 0:
        raise ValueError("logits has an empty vocabulary dimension (V = 0)")
    if labels_in_range:
        check_labels_in_range(labels, logits.shape[2], ignore_index)


# The offsets last found valid, as (weak reference, version counter, total): the packed HF path checks them before
# the backbone (its position ids come from them) and the engine checks what it is handed, and the second check of
# the same unchanged tensor costs no device sync.
_valid_cu_seqlens = (None, -1, -1)


def _version(t: torch.Tensor) -> int | None:
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter
        return None


def _offsets_facts(cu: torch.Tensor) -> list[int]:
    """`[first offset, any decrease, last offset]` of int64 offsets, in one device sync."""
    return torch.stack([cu[0], (cu[1:] < cu[:-1]).any().long(), cu[-1]]).tolist()


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> None:
    """`cu_seqlens [R + 1]`: integer offsets of packed sequences, from 0 to `total` tokens, non-decreasing. The
    values are read once per tensor: an unchanged tensor found valid for the same `total` is not read again."""
    global _valid_cu_seqlens
    check_ndim(cu_seqlens, 1, "cu_seqlens", "[R + 1]")
    check_integer_dtype(cu_seqlens, "cu_seqlens")
    if cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must hold at least 2 offsets (one sequence), got {cu_seqlens.numel()}")
    ref, version, checked_total = _valid_cu_seqlens
    current = _version(cu_seqlens)
    if ref is not None and ref() is cu_seqlens and current is not None and (version, checked_total) == (current, total):
        return
    cu = cu_seqlens.long()
    first, decreasing, last = _offsets_facts(cu)
    if first != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {first}")
    if decreasing:
        raise ValueError(f"cu_seqlens must be non-decreasing, got {cu.tolist()[:16]}")
    if last != total:
        raise ValueError(f"cu_seqlens must end at the number of packed tokens N = {total}, got {last}")
    _valid_cu_seqlens = (weakref.ref(cu_seqlens), _version(cu_seqlens), total)
