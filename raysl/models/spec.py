"""What an encoder spec (`encoder.json`) or a whole-model config (`model.json`) may ask timm to build.

Both files come from the registry or a checkpoint, where anyone who can register a model version can write them,
and their backbone arguments reach `timm.create_model`. timm can fetch files from a URL or the Hugging Face Hub
(`pretrained=True`, `pretrained_cfg_overlay={"url": …}`, `hf-hub:` names) or unpickle a local checkpoint
(`checkpoint_path`). So the architecture must be a plain name from `timm.list_models()`, the extra arguments come
from an allow-list of shape and regularisation settings, and their values are JSON scalars or short number lists.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache
from typing import Any

#: Extra `timm.create_model` arguments an encoder may carry: sizes, depths, pooling and regularisation. Nothing
#: here names a file, a URL, a hub repository or a callable.
ALLOWED_KWARGS = frozenset({
    # regularisation
    "drop_rate", "drop_path_rate", "attn_drop_rate", "proj_drop_rate", "pos_drop_rate", "patch_drop_rate",
    "drop_block_rate",
    # pooling and tokens (ViTs)
    "global_pool", "fc_norm", "class_token", "no_embed_class", "reg_tokens", "pre_norm", "final_norm",
    "dynamic_img_size", "dynamic_img_pad",
    # transformer shape
    "depth", "embed_dim", "num_heads", "mlp_ratio", "qkv_bias", "qk_norm", "init_values",
    # CNN shape
    "in_chans", "output_stride", "stem_width", "stem_type", "layers", "depths", "dims", "ls_init_value",
    "avg_down",
})
#: Arguments that fetch or load weights from outside the registered files, or that raysl sets itself.
REFUSED_KWARGS = {
    "pretrained": "fetches weights", "pretrained_cfg": "names where weights come from",
    "pretrained_cfg_overlay": "names where weights come from", "pretrained_strict": "belongs to pretrained loading",
    "checkpoint_path": "loads (unpickles) a local file", "cache_dir": "belongs to downloads",
    "num_classes": "raysl sets it (0: no classifier)", "img_size": "set image_size instead",
    "patch_size": "set patch_size instead",
}
_NAME = re.compile(r"[a-z0-9_]+")
_STRING_VALUE = re.compile(r"[A-Za-z0-9_.\-]{0,32}")
_MAX_NUMBER = 65536  # far above any real width or depth; stops a spec from asking for an absurd network
_MAX_LIST = 16


@lru_cache(maxsize=1)
def timm_models() -> frozenset[str]:
    import timm

    return frozenset(timm.list_models())


def check_backbone_name(name: object, field: str = "backbone") -> str:
    """`name` if it is a plain timm architecture (in `timm.list_models()`); a ValueError naming `field` if not."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{field}: expected a timm model name (a string), got {name!r}")
    if not _NAME.fullmatch(name):
        raise ValueError(f"{field}: {name!r} is not a plain timm model name: hub and local references (hf-hub:, "
                         "hf_hub:, local-dir:, timm/…), paths and pretrained tags are refused — only names from "
                         "timm.list_models(), such as 'resnet18' or 'vit_small_patch16_224'")
    if name not in timm_models():
        raise ValueError(f"{field}: {name!r} is not a timm model; allowed: names from timm.list_models(), "
                         "such as 'resnet18' or 'vit_small_patch16_224'")
    return name


def _check_number(value: object, field: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{field}: expected a number, got {value!r}")
    if not math.isfinite(value) or abs(value) > _MAX_NUMBER:
        raise ValueError(f"{field}: {value!r} is out of range (a finite number up to {_MAX_NUMBER})")


def _check_value(value: object, field: str) -> None:
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, (int, float)):
        _check_number(value, field)
    elif isinstance(value, str):
        if not _STRING_VALUE.fullmatch(value):
            raise ValueError(f"{field}: {value!r} is not allowed; strings are short names (letters, digits, _ . -)")
    elif isinstance(value, list):
        if len(value) > _MAX_LIST:
            raise ValueError(f"{field}: a list of at most {_MAX_LIST} numbers, got {len(value)} items")
        for i, item in enumerate(value):
            _check_number(item, f"{field}[{i}]")
    else:
        raise ValueError(f"{field}: {type(value).__name__} is not allowed; values are numbers, strings, booleans, "
                         "null or short lists of numbers")


def check_backbone_kwargs(kwargs: object, field: str = "backbone_kwargs") -> dict[str, Any]:
    """`kwargs` if every key is in ALLOWED_KWARGS and every value a JSON scalar or a short list of numbers."""
    if not isinstance(kwargs, dict):
        raise ValueError(f"{field}: expected a mapping of timm arguments, got {type(kwargs).__name__}")
    for key, value in kwargs.items():
        if key in REFUSED_KWARGS:
            raise ValueError(f"{field}.{key}: refused ({REFUSED_KWARGS[key]}); encoders are built from their "
                             f"registered weights only. Allowed: {sorted(ALLOWED_KWARGS)}")
        if key not in ALLOWED_KWARGS:
            raise ValueError(f"{field}.{key}: not an allowed timm argument; allowed: {sorted(ALLOWED_KWARGS)}")
        _check_value(value, f"{field}.{key}")
    return kwargs


def _check_int(value: object, field: str, low: int, high: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{field}: expected an integer from {low} to {high}, got {value!r}")


def check_architecture(section: dict[str, Any], where: str) -> None:
    """The fields that decide what timm builds: backbone, cifar_stem, image_size, patch_size, backbone_kwargs."""
    check_backbone_name(section.get("backbone"), f"{where}backbone")
    if not isinstance(section.get("cifar_stem", False), bool):
        raise ValueError(f"{where}cifar_stem: expected true or false, got {section['cifar_stem']!r}")
    _check_int(section.get("image_size"), f"{where}image_size", 8, 4096)
    _check_int(section.get("patch_size"), f"{where}patch_size", 1, 4096, optional=True)
    check_backbone_kwargs(section.get("backbone_kwargs", {}), f"{where}backbone_kwargs")


def check_encoder_spec(spec: object, source: str = "encoder.json") -> dict[str, Any]:
    """`spec` if it describes an encoder raysl may build (see the module docstring); a ValueError naming the field
    and what is allowed if not. Other keys (method, lineage tags, …) are metadata and pass through."""
    if not isinstance(spec, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(spec).__name__}")
    check_architecture(spec, f"{source}: ")
    for key in ("mean", "std"):
        values = spec.get(key)
        if not isinstance(values, list) or len(values) != 3:
            raise ValueError(f"{source}: {key}: expected 3 numbers (one per RGB channel), got {values!r}")
        for i, v in enumerate(values):
            _check_number(v, f"{source}: {key}[{i}]")
    return spec


#: The sections `model.json` holds (see methods.base.export_config); anything else is refused.
MODEL_TREE_SECTIONS = frozenset({"method", "model", "data"})


def check_model_tree(tree: object, source: str = "model.json") -> dict[str, Any]:
    """A whole-model config: only the exported sections, and a model section that passes `check_architecture`.
    The method's own fields are checked by the method layer (methods.export), which knows them."""
    if not isinstance(tree, dict):
        raise ValueError(f"{source}: expected a JSON object, got {type(tree).__name__}")
    extra = sorted(set(tree) - MODEL_TREE_SECTIONS)
    if extra:
        raise ValueError(f"{source}: sections {extra} are not allowed; allowed: {sorted(MODEL_TREE_SECTIONS)}")
    model = tree.get("model")
    if not isinstance(model, dict):
        raise ValueError(f"{source}: model: expected a JSON object, got {model!r}")
    check_architecture(model, f"{source}: model.")
    return tree
