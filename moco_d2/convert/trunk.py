"""The trunk its authors evaluate, found in the checkpoint of any major self-supervised release
by the rules of :mod:`.layouts` (where the state_dict is, which prefixes to strip, which trunk
the authors' evaluation takes). Heads, queues and BN counters are dropped on purpose, second
trunks dropped and named; two trunks and no rule for them are refused: ``--trunk`` picks one."""

import argparse
import dataclasses
import re
from typing import Any

import torch

from moco_d2.convert import layouts
from moco_d2.errors import UserError
from moco_d2.io import load_file

MOCO = "moco"
TORCHVISION = "torchvision"
LINCLS = "lincls"

# Parts of an encoder that are not the trunk: the head (MoCo projection, ImageNet or lincls
# classifier) and BN's batch counter, which no consumer of the trunk needs.
_NOT_TRUNK = re.compile(r"fc\..*|.*\.num_batches_tracked")
# A Detectron2 ResNet (converted weights, a train_net checkpoint).
_DETECTRON2 = re.compile(r"(?:.*\.)?(?:stem\.conv1|res[2-5]\.\d+\.conv1)\.weight")
_IMAGENET_CLASSES = 1000
_TRUNK_FLAG = (
    "pick one with --trunk PREFIX (tools/convert-to-d2.py, tools/lincls.py; give train_net "
    "the converted file)"
)


@dataclasses.dataclass
class Trunk:
    """The trunk of a weights file and what the file was."""

    kind: str  # MOCO, TORCHVISION or LINCLS
    format: str  # human-readable layout, printed by the tools
    tensors: dict[str, torch.Tensor]  # torchvision name → tensor; may be incomplete
    dropped: list[str]  # names (as in the file) left out on purpose
    arch: str | None = None  # the ``arch`` the file records, if any
    sources: dict[str, str] = dataclasses.field(default_factory=dict)  # torchvision → file name
    second: list[str] = dataclasses.field(default_factory=list)  # other trunks, not taken
    input_norm: str | None = None  # a key of layouts.INPUT_NORMS, when the layout says


def is_moco_checkpoint(obj: Any) -> bool:
    """A pretraining checkpoint: its state_dict holds a MoCo query encoder."""
    state = obj.get("state_dict") if isinstance(obj, dict) else None
    return isinstance(state, dict) and any(
        isinstance(k, str) and re.match(r"(module\.)?encoder_q\.", k) for k in state
    )


def _is_tensor_dict(value: Any) -> bool:
    return (
        isinstance(value, dict)
        and bool(value)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())
    )


def _entry(obj: Any, keys: tuple[str, ...]) -> Any:
    for key in keys:
        if not isinstance(obj, dict) or key not in obj:
            return None
        obj = obj[key]
    return obj


def _detectron2(path: str) -> UserError:
    return UserError(
        f"{path} holds Detectron2 weights (a converted .pkl or a train_net checkpoint), "
        "not a pretraining checkpoint or a torchvision state_dict"
    )


def _container(obj: Any, path: str, choice: str | None) -> tuple[str, ...]:
    """The keys that lead to the state_dict in ``obj`` (the entry ``choice`` names, if it
    names one); () when ``obj`` is one itself."""
    if isinstance(obj, dict) and choice is not None and isinstance(obj.get(choice), dict):
        return (choice,)
    for keys in layouts.CONTAINERS:
        value = _entry(obj, keys)
        if isinstance(value, dict):
            if keys == ("model",) and not all(isinstance(v, torch.Tensor) for v in value.values()):
                raise _detectron2(path)
            return keys
    return ()


def _state(obj: Any, path: str, where: tuple[str, ...]) -> dict[str, torch.Tensor]:
    state = _entry(obj, where) if where else obj
    if not isinstance(state, dict) or not state:
        raise UserError(f"{path} holds a {type(obj).__name__} with no state_dict, not a checkpoint")
    for name, value in state.items():
        if not (isinstance(name, str) and isinstance(value, torch.Tensor)):
            context = f"its {'.'.join(where)}" if where else "it has no 'state_dict', and its entry"
            raise UserError(
                f"{path} is not a checkpoint of tensors: {context} {name!r} is of "
                f"type {type(value).__name__}"
            )
    return state


def _siblings(obj: Any, where: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
    """The other dicts of tensors beside the state_dict taken (DINO's student, timm's EMA
    weights, VISSL's heads), by their dotted entry name."""
    if not where:
        return {}
    parent = _entry(obj, where[:-1]) if len(where) > 1 else obj
    return {
        ".".join((*where[:-1], str(key))): value
        for key, value in parent.items()
        if key != where[-1] and _is_tensor_dict(value)
    }


def _wrapper(names: list[str]) -> str:
    """The wrappers (DDP's ``module.``, torch.compile's ``_orig_mod.``) that prefix every name."""
    wrapper = ""
    while True:
        for prefix in layouts.WRAPPERS:
            if all(name.startswith(wrapper + prefix) for name in names):
                wrapper += prefix
                break
        else:
            return wrapper


def _under(name: str, prefix: str) -> bool:
    return layouts.group_of(name) == "" if prefix == "" else name.startswith(prefix + ".")


def _shown(wrapper: str, prefix: str) -> str:
    """A trunk prefix as the file spells it, as --trunk takes it."""
    return (wrapper + prefix) if prefix else (wrapper.rstrip(".") or "''")


def _choose(found: dict[str, str], path: str, wrapper: str) -> str | None:
    """The group (first name component) whose trunk the authors evaluate, by the rules of
    :mod:`layouts`; None when no group holds a trunk."""
    primary = [group for group in layouts.PRIMARY if group in found]
    aliases: tuple[str, ...] = ()
    chosen: str | None
    if "backbone" in primary:
        chosen, aliases = "backbone", layouts.BACKBONE_ALIASES
    elif len(primary) == 1:
        chosen = primary[0]
    else:
        chosen = "" if not primary and "" in found else None
    unruled = [
        group
        for group in found
        if group != chosen and group not in aliases and not layouts.is_second(group)
    ]
    if found and (chosen is None or unruled):
        listed = ", ".join(_shown(wrapper, prefix) for prefix in found.values())
        raise UserError(
            f"{path} holds ResNet trunks under {listed}, and no rule says which one its "
            f"authors evaluate: {_TRUNK_FLAG}"
        )
    return chosen


def _flagged(
    choice: str, names: dict[str, str], wrapper: str, path: str, candidates: list[str]
) -> str:
    """The full prefix of the trunk that ``--trunk`` names, found inside it if nested."""
    prefix = choice.rstrip(".")
    if (prefix + ".").startswith(wrapper):
        prefix = (prefix + ".")[len(wrapper) :].rstrip(".")
    inside = [name[len(prefix) + 1 :] if prefix else name for name in names if _under(name, prefix)]
    if not inside:
        raise UserError(
            f"--trunk {choice}: {path} has no entry or name prefix {choice} (its trunks: "
            f"{', '.join(candidates) or 'none found'})"
        )
    inner = layouts.trunk_prefix(inside)
    return ".".join(p for p in (prefix, inner) if p)


def _check_simclr_v2(state: dict[str, torch.Tensor], names: dict[str, str], path: str) -> None:
    stem = state.get(names.get("net.0.0.weight", ""))
    variant = layouts.simclr_v2_variant(names, stem.shape[0] if stem is not None else 64)
    if variant:
        raise UserError(
            f"{path} holds a SimCLR v2 network {variant}, not a ResNet-50: of the SimCLR v2 "
            "releases only r50_1x_sk0 has the ResNet-50 layout"
        )


def _bare_layout(state: dict, names: dict[str, str], simclr: bool, sequential: bool) -> str:
    if simclr:
        return "SimCLR v2 ResNet as SimCLRv2-Pytorch converts it"
    if sequential:
        return "nn.Sequential(*resnet.children()) state_dict (indices 0, 1, 4-7)"
    fc = state.get(names.get("fc.weight", ""))
    if fc is not None and fc.ndim == 2 and fc.shape[0] == _IMAGENET_CLASSES:
        return "torchvision ResNet state_dict with an ImageNet classifier"
    return "bare query-encoder state_dict"


def _layout(where: tuple[str, ...], wrapper: str, taken: str | None, bare: str) -> str:
    """How the tools describe the layout read: the entry, the wrappers and the prefix."""
    container = "checkpoint, " + ".".join(where) if where else ""
    if taken == "encoder_q":
        return f"MoCo {container or 'model state_dict'} with {wrapper}encoder_q.*"
    if taken:
        return f"{container or 'state_dict'} with {wrapper}{taken}.*"
    where_text = f" in a checkpoint's {'.'.join(where)}" if where else ""
    return bare + where_text + (f" with {wrapper}* names" if wrapper else "")


def _sort(
    names: dict[str, str],
    taken: str | None,
    sequential: bool,
    keep_unruled: bool,
    found: dict[str, str],
) -> tuple[dict[str, str], list[str]]:
    """(torchvision name → name in the file, names dropped) for the names of a state_dict
    whose trunk is under ``taken`` (None: no trunk found, all names as they are). Names no
    rule knows are kept unless ``--trunk`` chose, for the completeness checks to refuse."""
    sources: dict[str, str] = {}
    dropped = []
    cut = len(taken) + 1 if taken else 0
    for name, key in names.items():
        group = layouts.group_of(name)
        if taken is None or _under(name, taken):
            torchvision_name = name[cut:]
            if sequential:
                torchvision_name = layouts.sequential_name(torchvision_name)
            if _NOT_TRUNK.fullmatch(torchvision_name):
                dropped.append(key)
            else:
                sources[torchvision_name] = key
        elif (
            not keep_unruled
            or group in found
            or group == ""  # bare names beside the trunk taken: never mixed into it
            or layouts.is_head(group)
            or _NOT_TRUNK.fullmatch(name)
        ):
            dropped.append(key)
        else:
            sources[name] = key
    return sources, dropped


def find_trunk(obj: Any, path: str, choice: str | None = None) -> Trunk:
    """The trunk in a loaded file ``obj`` and a description of what the file was: the trunk
    its authors evaluate, or the one ``choice`` (``--trunk``) names: an entry of the
    checkpoint or a name prefix."""
    where = _container(obj, path, choice)
    state = _state(obj, path, where)
    wrapper = _wrapper(list(state))
    names = {key[len(wrapper) :]: key for key in state}
    if any(_DETECTRON2.fullmatch(name) for name in names):
        raise _detectron2(path)
    simclr = layouts.is_simclr_v2(names)
    if simclr:
        _check_simclr_v2(state, names, path)
        names = {layouts.simclr_v2_name(name): key for name, key in names.items()}
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(layouts.group_of(name), []).append(name)
    found = {
        g: p for g, members in groups.items() if (p := layouts.trunk_prefix(members)) is not None
    }
    siblings = _siblings(obj, where)
    second = [
        entry for entry, tensors in siblings.items() if layouts.trunk_prefix(tensors) is not None
    ]
    flagged = choice is not None and where != (choice,)
    if choice is not None and flagged:
        candidates = [_shown(wrapper, p) for p in found.values()] + second
        taken: str | None = _flagged(choice, names, wrapper, path, candidates)
    else:
        chosen = _choose(found, path, wrapper)
        taken = None if chosen is None else found[chosen]
    second = [_shown(wrapper, p) for p in found.values() if p != taken] + second
    cut = len(taken) + 1 if taken else 0
    stripped = {name[cut:] for name in names if taken is None or _under(name, taken)}
    sequential = "0.weight" in stripped and "conv1.weight" not in stripped
    sources, dropped = _sort(names, taken, sequential, keep_unruled=not flagged, found=found)
    dropped += [f"{entry}/{name}" for entry, tensors in siblings.items() for name in tensors]
    lincls = bool(where) and "best_acc1" in obj
    kind = LINCLS if lincls else MOCO if taken == "encoder_q" else TORCHVISION
    if lincls:
        layout = "lincls checkpoint (linear classifier on a frozen trunk)"
    else:
        layout = _layout(where, wrapper, taken, _bare_layout(state, names, simclr, sequential))
        layout += " (nn.Sequential indices 0, 1, 4-7)" if sequential and taken else ""
    if not sources:
        raise UserError(f"{path} ({layout}) has no trunk weights, only a head")
    plain = not taken and set(groups) <= {""} and not siblings and not sequential
    return Trunk(
        kind=kind,
        format=layout,
        tensors={name: state[key] for name, key in sources.items()},
        dropped=sorted(dropped),
        arch=obj.get("arch") if where and isinstance(obj.get("arch"), str) else None,
        sources=sources,
        second=second,
        input_norm=layouts.RGB01 if simclr else None if lincls or plain else layouts.IMAGENET,
    )


def read_trunk(path: str, choice: str | None = None) -> Trunk:
    """Load ``path`` safely and find its trunk (see :func:`find_trunk`)."""
    return find_trunk(load_file(path), path, choice)


TRUNK_HELP = (
    "the trunk to take from a file that holds several and no rule says which: a name prefix "
    "(e.g. momentum_encoder) or a checkpoint entry (e.g. state_dict_ema, student); the error "
    "lists the candidates"
)
INPUT_NORM_HELP = (
    "the input normalisation the weights expect, when their layout does not say it: rgb01 (RGB "
    "in [0, 1], no mean/std: TF-converted SimCLR v1) or imagenet"
)


def add_trunk_arguments(parser: argparse.ArgumentParser) -> None:
    """``--trunk`` and ``--input-norm``, for the tools that read a pretrained file."""
    parser.add_argument("--trunk", metavar="PREFIX", help=TRUNK_HELP)
    parser.add_argument("--input-norm", choices=sorted(layouts.INPUT_NORMS), help=INPUT_NORM_HELP)


def state_dict_error(error: Exception) -> str:
    """``load_state_dict``'s multi-line error in one line: its first line and the details
    (missing, unexpected, size mismatches) that follow it."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    head, details = lines[0].rstrip(":. "), " ".join(lines[1:])
    return f"{head}: {details}" if details else head
