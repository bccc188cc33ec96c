"""Build a tiny random-weight CLIP model + processor in code and save it to a folder.

Used by the CLIP embedder/filter tests: nothing is downloaded, and the saved folder goes through
the same ``from_pretrained(local_files_only=True)`` path as a real model. Not a test module.
"""

from __future__ import annotations

from pathlib import Path

from tiny_diffusers import write_tiny_tokenizer

#: Side length the tiny model's vision tower and image processor work at.
TINY_CLIP_IMAGE_SIZE = 32

#: Dimension of the tiny model's joint image-text feature space.
TINY_CLIP_PROJECTION_DIM = 16


def build_tiny_clip(folder: str | Path, seed: int = 0) -> Path:
    """Save a tiny random-weight ``CLIPModel`` and its ``CLIPProcessor`` to ``folder``.

    Parameters
    ----------
    folder : str or Path
        Target directory (created); it ends up in transformers' ``save_pretrained`` layout.
    seed : int, default 0
        torch seed for the random weights.

    Returns
    -------
    Path
        The folder, loadable with ``CLIPModel.from_pretrained(folder)`` and
        ``CLIPProcessor.from_pretrained(folder)``.
    """
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder = Path(folder)
    tokenizer = CLIPTokenizer.from_pretrained(
        str(write_tiny_tokenizer(folder.parent / f"{folder.name}-tokenizer")), model_max_length=77
    )
    text_config = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.eos_token_id,
        "vocab_size": len(tokenizer),
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "max_position_embeddings": 77,
    }
    vision_config = {
        "image_size": TINY_CLIP_IMAGE_SIZE,
        "patch_size": 8,
        "hidden_size": 32,
        "intermediate_size": 37,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
    }
    config = CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=TINY_CLIP_PROJECTION_DIM)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": TINY_CLIP_IMAGE_SIZE},
        crop_size={"height": TINY_CLIP_IMAGE_SIZE, "width": TINY_CLIP_IMAGE_SIZE},
    )
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))
    return folder
