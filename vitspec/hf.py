"""Hugging Face transformers models from a local folder: ``vitspec analyze hf:PATH``.

Needs the optional extra ``vitspec[hf]`` (transformers). The folder is what ``save_pretrained``
writes (``config.json``, weights) plus the image processor's ``preprocessor_config.json``, which
gives the preprocessing; nothing is downloaded. Attention is loaded eager, so the attention
weights exist.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from vitspec.errors import VitspecError
from vitspec.loading import LoadedModel

PREFIX = "hf:"


def is_hf(model) -> bool:
    """Whether ``model`` names a local Hugging Face folder (``hf:PATH``).

    Example:
        >>> is_hf("hf:models/vit"), is_hf("deit_small")
        (True, False)
    """
    return isinstance(model, str) and model.startswith(PREFIX)


def check_folder(spec: str) -> Path:
    """The folder of ``hf:PATH``; a one-line error when it holds no ``config.json``.

    Example:
        >>> check_folder("hf:/nonexistent/vit")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        vitspec.errors.VitspecError: hf:/nonexistent/vit: no model folder with a config.json ...
    """
    folder = Path(spec[len(PREFIX) :]).expanduser()
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise VitspecError(f"{spec}: no model folder with a config.json at {folder}")
    return folder


def load_folder(spec: str) -> tuple[LoadedModel, Callable]:
    """The model in the folder of ``hf:PATH`` (eager attention, eval mode) and the image
    transform of its image processor (PIL image -> ``[3, H, W]``)."""
    folder = check_folder(spec)
    try:
        import transformers
    except ImportError:
        raise VitspecError(
            f"{spec} needs transformers: pip install 'vitspec[hf]'", exit_code=2
        ) from None
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    archs = list(getattr(config, "architectures", None) or [])
    auto = (
        transformers.AutoModelForImageClassification
        if any(a.endswith("ForImageClassification") for a in archs)
        else transformers.AutoModel
    )
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as err:
        raise VitspecError(
            f"{spec}: no image processor config (preprocessor_config.json) in {folder}: {err}"
        ) from None
    model = auto.from_pretrained(folder, local_files_only=True, attn_implementation="eager")
    loaded = LoadedModel(
        model=model.eval(),
        name=folder.name,
        timm_name=archs[0] if archs else type(model).__name__,
        checkpoint=str(folder),
        provenance={
            "source": "transformers folder",
            "path": str(folder),
            "transformers": transformers.__version__,
        },
    )
    return loaded, lambda image: processor(images=image, return_tensors="pt")["pixel_values"][0]
