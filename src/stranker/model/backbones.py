"""Image backbones: the registry of named models, where their weights come from, and how they load.

Weights are looked for in this order: a local ``weights=`` file; the Hugging Face cache (offline,
``HF_HUB_CACHE`` / ``HF_HOME``; torch hub's cache for the timm weights the entry names, published by
URL only); a download when allowed (never under ``HF_HUB_OFFLINE=1``). ``'hf-hub:ORG/NAME@REV'``
reads revision ``REV`` (a branch, tag or commit) and the source records the commit the files came
from. Pretrained weights that were asked for and cannot be had raise :class:`WeightsNotFoundError`;
random weights only with ``pretrained=False``; a weights file with NaN or infinite values is refused.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

logger = logging.getLogger("stranker")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
MIN_MATCHED = 0.5  # a weights file must fill at least this fraction of the backbone's values


class WeightsNotFoundError(FileNotFoundError):
    """Pretrained weights were asked for and are neither given, cached, nor downloadable."""


@dataclass(frozen=True)
class Backbone:
    """One named backbone: its weights' repository, timm architecture and how it was trained."""

    name: str
    repo: str | None  # Hugging Face repository holding the weights
    arch: str  # timm architecture
    kwargs: dict[str, Any] = field(default_factory=dict)  # timm arguments (layers by name)
    input_px: int = 224  # side of the images it was trained on
    mpp: float | None = 0.5  # µm per pixel of those images
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    dim: int | None = None  # feature size
    gated: bool = False  # the repository asks to accept a licence before downloading
    pool: str = "default"  # 'default': the model's output; 'cls+mean': class token + mean patch token
    frozen: bool = True  # frozen by default in sr.tl.fit (foundation models); fine-tuned otherwise
    note: str = ""
    revision: str | None = None  # the repository's branch, tag or commit ('hf-hub:ORG/NAME@REV'); None: main

    @property
    def patch_um(self) -> float | None:
        """Physical side of the patches it expects, in micrometres."""
        return None if self.mpp is None else self.input_px * self.mpp


_VITG_REG4 = dict(img_size=224, init_values=1e-5, num_classes=0, global_pool="token", dynamic_img_size=False)
_HOPTIMUS = dict(mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517))

# Arguments as published on each model card (checked against the cards' `timm.create_model` calls).
REGISTRY: dict[str, Backbone] = {b.name: b for b in (
    Backbone("uni", "MahmoodLab/UNI", "vit_large_patch16_224",
             dict(img_size=224, patch_size=16, init_values=1e-5, num_classes=0, dynamic_img_size=True),
             dim=1024, gated=True, note="ViT-L/16, Mass-100K (Chen et al. 2024)"),
    Backbone("uni2-h", "MahmoodLab/UNI2-h", "vit_giant_patch14_224",
             dict(img_size=224, patch_size=14, depth=24, num_heads=24, init_values=1e-5, embed_dim=1536,
                  mlp_ratio=2.66667 * 2, num_classes=0, no_embed_class=True, mlp_layer="SwiGLUPacked",
                  act_layer="silu", reg_tokens=8, dynamic_img_size=True),
             dim=1536, gated=True, note="ViT-H/14, 8 registers"),
    Backbone("h-optimus-0", "bioptimus/H-optimus-0", "vit_giant_patch14_reg4_dinov2", _VITG_REG4,
             dim=1536, gated=True, **_HOPTIMUS, note="ViT-g/14, 4 registers; Apache-2.0"),
    Backbone("h-optimus-1", "bioptimus/H-optimus-1", "vit_giant_patch14_reg4_dinov2", _VITG_REG4,
             dim=1536, gated=True, **_HOPTIMUS, note="ViT-g/14, 4 registers"),
    Backbone("virchow2", "paige-ai/Virchow2", "vit_huge_patch14_224",
             dict(img_size=224, init_values=1e-5, num_classes=0, reg_tokens=4, mlp_ratio=5.3375,
                  global_pool="", dynamic_img_size=True, mlp_layer="SwiGLUPacked", act_layer="silu"),
             dim=2560, gated=True, pool="cls+mean",
             note="ViT-H/14; class token + mean patch token; trained at mixed magnifications (5x-40x), "
                  "224 px at 0.5 µm/px (20x) by default"),
    Backbone("gigapath", "prov-gigapath/prov-gigapath", "vit_giant_patch14_dinov2",
             dict(img_size=224, in_chans=3, patch_size=16, embed_dim=1536, depth=40, num_heads=24,
                  init_values=1e-5, mlp_ratio=5.33334, num_classes=0),
             dim=1536, gated=True, note="Prov-GigaPath tile encoder, ViT-g/16"),
    Backbone("phikon", "1aurent/vit_base_patch16_224.owkin_pancancer", "vit_base_patch16_224",
             dict(num_classes=0), dim=768, gated=False,
             note="Phikon (Owkin, iBOT ViT-B/16) in timm format; ungated, under Owkin's non-commercial "
                  "licence (phikon-v2 is a transformers model)"),
    Backbone("resnet50", "timm/resnet50.tv_in1k", "resnet50", {}, mpp=0.5, dim=2048, frozen=False,
             note="ImageNet (torchvision weights; BLEEP); µm/px: HEST-Bench's 224 px at 0.5 µm/px"),
    Backbone("densenet121", "timm/densenet121.tv_in1k", "densenet121", {}, mpp=0.5, dim=1024, frozen=False,
             note="ImageNet (torchvision weights; mclSTExp); µm/px as resnet50"),
)}


def _key(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def hub_repo(name: str) -> str | None:
    """``'ORG/NAME'`` of a ``'hf-hub:ORG/NAME[@REV]'`` (or ``'hf_hub:'``) backbone name, else ``None``."""
    m = re.fullmatch(r"hf[-_]hub:(.+/.+)", name.strip())
    return m.group(1).split("@")[0] if m else None


def hub_revision(name: str) -> str | None:
    """``'REV'`` of a ``'hf-hub:ORG/NAME@REV'`` backbone name (a branch, tag or commit), else ``None``."""
    m = re.fullmatch(r"hf[-_]hub:(.+/.+)", name.strip())
    if m is None or "@" not in m.group(1):
        return None
    rev = m.group(1).split("@", 1)[1]
    if not rev:
        raise ValueError(f"{name!r} ends with '@' but names no revision: write 'hf-hub:ORG/NAME@REV' (a "
                         "branch, tag or commit), or leave out '@' for the main branch.")
    return rev


def lookup(name: str) -> Backbone | None:
    """Return the registry entry of ``name`` (a registry name, or ``hf-hub:`` one of its repositories).

    ``'hf-hub:ORG/NAME@REV'`` of a registry repository returns its entry at revision ``REV``.
    """
    if not isinstance(name, str):
        return None
    repo = hub_repo(name)
    if repo is not None:
        entry = next((b for b in REGISTRY.values() if b.repo and b.repo.lower() == repo.lower()), None)
        rev = hub_revision(name)
        return entry if entry is None or rev is None else replace(entry, revision=rev)
    return REGISTRY.get(_key(name))


def named(name: str, download: bool = False) -> Backbone | None:
    """Return the entry of a registry name or of an ``hf-hub:`` id (sizes from its config), else ``None``."""
    entry = lookup(name)
    if entry is None and isinstance(name, str) and hub_repo(name) is not None:
        entry = resolve(name, download)
    return entry


# ------------------------------------------------------------------------------ the Hugging Face cache
def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` forbids the network (read now, and as huggingface_hub read it)."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or _truthy(os.environ.get("HF_HUB_OFFLINE"))


def hub_cache() -> str | None:
    """Return the hub cache folder set now (``HF_HUB_CACHE``, else ``HF_HOME/hub``); ``None``: the default."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return os.path.expanduser(os.environ[var])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return None


def _cache_text() -> str:
    from huggingface_hub import constants

    return hub_cache() or constants.HF_HUB_CACHE


def hub_commands() -> tuple[str, str]:
    """Return the login and download commands of the installed huggingface_hub (``hf`` from 0.34 on)."""
    import huggingface_hub

    major_minor = tuple(int(v) for v in re.findall(r"\d+", huggingface_hub.__version__)[:2])
    if major_minor >= (0, 34):
        return "hf auth login", "hf download"
    return "huggingface-cli login", "huggingface-cli download"


def _remedy(repo: str, gated: bool | None, revision: str | None = None) -> str:
    """How to get the files of ``repo``: a licence and a login only where the repository is gated.

    ``gated``: ``True`` (the registry says it asks for a licence), ``False`` (it does not: no login
    needed) or ``None`` (unknown: an ``hf-hub:`` repository outside the registry).
    """
    login, download = hub_commands()
    fetch = f"`{download} {repo}" + (f" --revision {revision}`" if revision else "`")
    if gated:
        first = (f"accept its licence on https://huggingface.co/{repo}, log in with `{login}` (a token with "
                 f"read access), then download them once with {fetch}")
    elif gated is None:
        first = (f"download them once with {fetch} (if the repository is gated, first accept its licence on "
                 f"https://huggingface.co/{repo} and log in with `{login}`)")
    else:
        first = f"download them once with {fetch} (the repository is not gated: no login needed)"
    return (
        f"To get them: {first}, or let stranker download them (`sr.settings.allow_download = True`, "
        f"no HF_HUB_OFFLINE); or copy them into the cache ({_cache_text()}); or pass `weights=` a local "
        f"file. `pretrained=False` trains from random weights."
    )


def commit_of(path: str | Path) -> str | None:
    """Return the commit of a file in the hub cache (``.../snapshots/<commit>/<file>``), else ``None``."""
    path = Path(path)
    return path.parent.name if path.parent.parent.name == "snapshots" else None


def hub_file(repo: str, filenames: tuple[str, ...], download: bool, *, what: str,
             gated: bool | None = None, revision: str | None = None) -> str:
    """Local path of the first of ``filenames`` in ``repo``: from the cache, else downloaded if allowed.

    ``revision``: a branch, tag or commit of the repository (``None``: its main branch). A hub that
    cannot be reached is said so, with the remedies, not taken for files it does not hold.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache = hub_cache()
    at = f" at revision {revision!r}" if revision else ""
    are = "are" if what.endswith("s") else "is"
    for fname in filenames:
        try:
            return hf_hub_download(repo, fname, cache_dir=cache, revision=revision, local_files_only=True)
        except (LocalEntryNotFoundError, EntryNotFoundError, FileNotFoundError):
            continue
    if not download or hub_offline():
        why = "HF_HUB_OFFLINE is set" if hub_offline() else "downloads are off (sr.settings.allow_download)"
        raise WeightsNotFoundError(
            f"The {what} of Hugging Face repository {repo!r}{at} {are} not in the cache and {why}. "
            + _remedy(repo, gated, revision)
        )
    for fname in filenames:
        try:
            return hf_hub_download(repo, fname, cache_dir=cache, revision=revision)
        except (GatedRepoError, RepositoryNotFoundError) as err:
            raise WeightsNotFoundError(
                f"Hugging Face refused the {what} of {repo!r} (gated, private or missing: "
                f"{type(err).__name__}). " + _remedy(repo, True, revision)
            ) from None
        except RevisionNotFoundError:
            raise WeightsNotFoundError(
                f"Hugging Face repository {repo!r} has no revision {revision!r} (a branch, tag or commit): "
                f"check the name after '@'."
            ) from None
        except LocalEntryNotFoundError as err:  # raised when the hub cannot be reached (no network, proxy)
            cause = err.__cause__ or err.__context__
            detail = f"{type(cause).__name__}: {cause}" if cause is not None else str(err).splitlines()[0]
            raise WeightsNotFoundError(
                f"The {what} of {repo!r}{at} {are} not in the cache, and the Hugging Face hub could not be "
                f"reached to download them ({detail}): check the network (or its proxy, HTTPS_PROXY). "
                + _remedy(repo, gated, revision)
            ) from None
        except EntryNotFoundError:  # the repository holds no such file: try the next name
            continue
        except Exception as err:  # timeouts, ...
            raise WeightsNotFoundError(
                f"Could not download the {what} of {repo!r}{at} ({type(err).__name__}: {err}). "
                + _remedy(repo, gated, revision)
            ) from None
    raise WeightsNotFoundError(
        f"Repository {repo!r}{at} holds none of {list(filenames)}: it is not a model whose {what} "
        f"stranker reads. Pass `weights=` a local file, or another `backbone=`."
    )


# ------------------------------------------------------------------------------ resolving a name
def resolve(name: str, download: bool = False) -> Backbone:
    """Return the :class:`Backbone` of a registry name, an ``hf-hub:ORG/NAME[@REV]`` id or a timm model name.

    A timm name may carry a pretrained tag (``'resnet18.tv_in1k'``); an unknown tag is refused with
    the model's tags.
    """
    import timm

    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"`backbone` must be a timm model name, 'hf-hub:ORG/NAME' or one of "
                         f"{sorted(REGISTRY)}, got {name!r}.")
    entry = lookup(name)
    if entry is not None:
        return entry
    repo = hub_repo(name)
    if repo is not None:  # a timm model on the hub: its config.json says which architecture
        revision = hub_revision(name)
        with open(hub_file(repo, ("config.json",), download, what="configuration", revision=revision)) as fh:
            cfg = json.load(fh)
        if "architecture" not in cfg:
            raise ValueError(f"{repo!r} is not a timm model (its config.json has no 'architecture'); "
                             "stranker loads timm models.")
        pre = cfg.get("pretrained_cfg", cfg)
        kwargs = dict(cfg.get("model_args", {}))
        kwargs.setdefault("num_classes", 0)
        size = pre.get("input_size", (3, 224, 224))
        return Backbone(name.strip(), repo, cfg["architecture"], kwargs, input_px=int(size[-1]), mpp=None,
                        mean=tuple(pre.get("mean", IMAGENET_MEAN)), std=tuple(pre.get("std", IMAGENET_STD)),
                        gated=None, frozen=False, note="config.json of the hub repository",  # type: ignore[arg-type]
                        revision=revision)
    arch = name.strip()
    if not timm.is_model(arch.split(".")[0]):
        raise ValueError(f"Unknown timm backbone {name!r}: not a timm model (see `timm.list_models()`, e.g. "
                         f"'resnet18'), not 'hf-hub:ORG/NAME', nor one of {sorted(REGISTRY)} "
                         "(`sr.tl.backbones()`).")
    try:
        pre = timm.models.get_pretrained_cfg(arch)
    except RuntimeError:  # timm: "Invalid pretrained tag (...) for ..."
        base, tag = arch.split(".", 1)
        tags = [t.split(".", 1)[1] for t in timm.list_pretrained(f"{base}.*")]
        raise ValueError(
            f"timm has no pretrained tag {tag!r} for {base!r}: its tags are {tags or 'none'}. Pass one of "
            f"them ('{base}.{tags[0] if tags else 'TAG'}'), or {base!r} for its default weights."
        ) from None
    hub_id = getattr(pre, "hf_hub_id", None) if pre is not None else None
    size = getattr(pre, "input_size", (3, 224, 224)) if pre is not None else (3, 224, 224)
    return Backbone(arch, hub_id.split("@")[0] if hub_id else None, arch, {"num_classes": 0},
                    input_px=int(size[-1]), mpp=None,
                    mean=tuple(getattr(pre, "mean", IMAGENET_MEAN)),
                    std=tuple(getattr(pre, "std", IMAGENET_STD)), gated=False, frozen=False, note="timm")


def find_weights(
    spec: Backbone, weights: str | None, pretrained: bool, download: bool
) -> tuple[str | None, str]:
    """Return the path of the weights of ``spec`` and their source (``None, 'random'`` when not pretrained).

    The source of weights from the hub names the commit they came from (``'hf:ORG/NAME@COMMIT'``);
    weights of a ``timm/`` repository missing from the hub cache may come from torch hub's cache,
    only those of the tag the repository names. Raises :class:`WeightsNotFoundError` when pretrained
    weights were asked for and cannot be had.
    """
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"`weights` file {str(path)!r} does not exist.")
        return str(path), f"file:{path.name}"
    if not pretrained:
        return None, "random"
    if spec.repo is None:
        path = _torch_hub_file(spec.arch)
        if path is not None:
            return path, f"torch-hub-cache:{Path(path).name}"
        raise WeightsNotFoundError(
            f"timm publishes no pretrained weights for {spec.arch!r} on the Hugging Face hub, and none are "
            f"in torch hub's cache. Pass `weights=` a local file, or `pretrained=False` for random weights."
        )
    try:
        path = hub_file(spec.repo, _WEIGHT_FILES, download, what="weights", gated=spec.gated,
                        revision=spec.revision)
    except WeightsNotFoundError:
        # timm's weights of the tag the entry names (``timm/resnet50.tv_in1k``), never another tag's
        timm_tag = spec.repo[len("timm/"):] if spec.repo.startswith("timm/") else None
        cached = _torch_hub_file(timm_tag) if timm_tag and spec.revision is None else None
        if cached is None:
            raise
        return cached, f"torch-hub-cache:{Path(cached).name}"
    commit = commit_of(path)
    return path, f"hf:{spec.repo}" + (f"@{commit}" if commit else "")


def _torch_hub_file(arch: str) -> str | None:
    """Timm weights of ``arch`` published by URL, when already in torch hub's cache.

    ``arch`` names the weights: a model with its pretrained tag (``'resnet50.tv_in1k'``), or without
    one for timm's default tag.
    """
    import timm

    pre = timm.models.get_pretrained_cfg(arch)
    url = getattr(pre, "url", None) if pre is not None else None
    if url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
        if path.is_file():
            return str(path)
    return None


# ------------------------------------------------------------------------------ building and loading
class ClassMeanTokens(nn.Module):
    """A ViT whose feature is its class token beside the mean of its patch tokens (Virchow)."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit
        self.num_features = 2 * vit.num_features
        self.pretrained_cfg = vit.pretrained_cfg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(b, 3, h, w)`` -> ``(b, 2 * width)``."""
        t = self.vit.forward_features(x)
        return torch.cat([t[:, 0], t[:, self.vit.num_prefix_tokens:].mean(1)], dim=1)


def build(spec: Backbone) -> nn.Module:
    """Build the architecture of ``spec`` with random weights and its normalisation in ``pretrained_cfg``."""
    import timm

    kwargs = dict(spec.kwargs)
    if isinstance(kwargs.get("mlp_layer"), str):
        kwargs["mlp_layer"] = getattr(timm.layers, kwargs["mlp_layer"])
    kwargs.setdefault("num_classes", 0)
    overlay = dict(mean=tuple(spec.mean), std=tuple(spec.std), input_size=(3, spec.input_px, spec.input_px))
    net = timm.create_model(spec.arch, pretrained=False, pretrained_cfg_overlay=overlay, **kwargs)
    return ClassMeanTokens(net) if spec.pool == "cls+mean" else net


def input_size_problem(spec: Backbone, size: int) -> str | None:
    """Say why ``spec`` cannot take ``size`` px images (a ViT with a fixed patch grid), else ``None``.

    The one check of ``image_size`` against a backbone, made by :func:`stranker.tl.fit` and
    :func:`stranker.pp.embed_patches` before any data is read: the architecture is built on the
    meta device (no memory, no weights) and asked whether its patch embedding takes other sizes.
    """
    try:
        with torch.device("meta"):
            net = build(spec)
    except Exception:  # an architecture that cannot be built so: it is built, and checked, when loaded
        return None
    inner = getattr(net, "vit", net)
    embed = getattr(inner, "patch_embed", None)
    if embed is None or not getattr(embed, "strict_img_size", False):
        return None
    if getattr(inner, "dynamic_img_size", False):
        return None
    fixed = tuple(int(v) for v in embed.img_size)
    if fixed == (size, size):
        return None
    side = f"{fixed[0]}" if fixed[0] == fixed[1] else f"{fixed[0]} x {fixed[1]}"
    return (f"{spec.name!r} takes {side} px images only; got `image_size={size}`. Pass "
            f"`image_size={fixed[0]}` or leave it unset (a named backbone sets its own input size).")


def pixel_stats(net: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the (1, 3, 1, 1) mean and std a backbone expects (its ``pretrained_cfg``; else ImageNet's)."""
    cfg = getattr(net, "pretrained_cfg", {}) or {}
    mean = torch.tensor(cfg.get("mean", IMAGENET_MEAN), dtype=torch.float32)
    std = torch.tensor(cfg.get("std", IMAGENET_STD), dtype=torch.float32)
    return mean.view(1, 3, 1, 1), std.view(1, 3, 1, 1)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read the tensors of a ``.safetensors`` file or a torch checkpoint (``weights_only``: no code runs)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(
                f"{str(path)!r} is not a readable torch state dict ({type(err).__name__})."
            ) from None
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{str(path)!r} holds a {type(state).__name__}, not a state dict of tensors.")
    out = {}
    for k, v in state.items():
        if isinstance(v, torch.Tensor):
            out[k[len("module."):] if k.startswith("module.") else k] = v
    return out


def load_weights(net: nn.Module, state: dict[str, torch.Tensor], label: str, name: str) -> None:
    """Copy ``state`` into ``net``; refuse below :data:`MIN_MATCHED` of its values, warn on any gap.

    A file holding NaN or infinite values is refused.

    A classifier left in the file (``head.*``, ``fc.*``) is ignored: the backbones have none.
    """
    own = net.state_dict()
    bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(
            f"{label} holds NaN or infinite values in {len(bad)} tensor(s) ({', '.join(bad[:4])}): it is "
            f"damaged or the weights of a model that diverged. Download it again, or pass another file."
        )
    matched = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    shape = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in matched and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    total = sum(v.numel() for k, v in own.items() if not k.endswith("num_batches_tracked"))
    frac = sum(own[k].numel() for k in matched if not k.endswith("num_batches_tracked")) / max(total, 1)

    def some(keys: list[str]) -> str:
        return ", ".join(keys[:4]) + (f" (+{len(keys) - 4})" if len(keys) > 4 else "") if keys else "none"

    detail = (f"missing: {some(missing)}; unexpected: {some(unexpected)}; "
              f"of another shape: {some(shape)}")
    if frac < MIN_MATCHED:
        raise ValueError(
            f"{label} fills only {frac:.0%} of the values of backbone {name!r} ({len(matched)} of {len(own)} "
            f"tensors; {detail}). Is it the weights of this architecture? Pass the matching `backbone=`."
        )
    net.load_state_dict(matched, strict=False)
    if missing or shape:
        logger.warning(f"{label} leaves {len(missing)} tensors of backbone {name!r} at random initialisation "
                       f"({frac:.1%} of its values loaded; {detail}).")


def create_backbone(name: str, weights: str | None = None, pretrained: bool = True,
                    download: bool = False) -> tuple[nn.Module, str]:
    """Return a backbone without classifier (``(b, 3, h, w)`` -> ``(b, d)``) and where its weights came from.

    Parameters
    ----------
    name
        A registry name (``'uni'``, see :data:`REGISTRY`), ``'hf-hub:ORG/NAME'`` (``'hf-hub:ORG/NAME@REV'``:
        revision ``REV``, a branch, tag or commit) or a timm model name (with a pretrained tag or not).
    weights
        A local state dict (``.safetensors``, ``.pth``, ``.bin``); wins over everything else.
    pretrained
        ``False``: random initialisation (only then).
    download
        Download weights missing from the cache (never under ``HF_HUB_OFFLINE``).

    Returns
    -------
    The module (its ``pretrained_cfg`` holds the normalisation) and the source: ``'file:NAME'``,
    ``'hf:ORG/NAME@COMMIT'``, ``'torch-hub-cache:NAME'`` or ``'random'``.
    """
    spec = resolve(name, download)
    path, source = find_weights(spec, weights, pretrained, download)
    net = build(spec)
    if path is not None:
        target = net.vit if isinstance(net, ClassMeanTokens) else net
        label = f"`weights` file {Path(path).name!r}" if weights is not None else f"The weights of {source}"
        load_weights(target, read_state_dict(path), label, name)
    return net, source


# ------------------------------------------------------------------------------ freezing
def _blocks(net: nn.Module) -> list[nn.Module]:
    inner = getattr(net, "vit", net)
    if hasattr(inner, "blocks"):
        return list(inner.blocks)
    if hasattr(inner, "stages"):
        return list(inner.stages)
    layers = [getattr(inner, f"layer{i}") for i in range(1, 5) if hasattr(inner, f"layer{i}")]
    if layers:
        return layers
    if hasattr(inner, "features"):  # densenet
        return [m for n, m in inner.features.named_children() if n.startswith("denseblock")]
    raise ValueError(f"`freeze='last:N'` needs blocks or stages; {type(inner).__name__} has neither: "
                     "pass freeze=True or False.")


def apply_freeze(net: nn.Module, freeze: bool | str) -> bool:
    """Freeze ``net`` (``True``), nothing (``False``) or all but its last N blocks (``'last:N'``).

    Returns whether the whole backbone is frozen.
    """
    if freeze is False:
        return False
    net.requires_grad_(False)
    if freeze is True:
        return True
    m = re.fullmatch(r"last:(\d+)", str(freeze))
    if m is None:
        raise ValueError(f"`freeze` must be True, False or 'last:N' (N blocks trained), got {freeze!r}.")
    n = int(m.group(1))
    for block in _blocks(net)[len(_blocks(net)) - n:] if n else []:
        block.requires_grad_(True)
    inner = getattr(net, "vit", net)
    for attr in ("norm", "fc_norm"):  # the norm after the last block belongs to it
        mod = getattr(inner, attr, None)
        if n and isinstance(mod, nn.Module):
            mod.requires_grad_(True)
    return n == 0
