"""The tiny Stable-Diffusion-shaped model of the small world, built from diffusers/transformers classes.

Everything is a standard component, so the saved folder is an ordinary ``StableDiffusionPipeline``
folder that ``StableDiffusionPipeline.from_pretrained`` and loratool's trainer load:

* tokenizer: a ``CLIPTokenizer`` over a whole-word vocabulary (every letter too, so any word
  tokenizes; every world word is one token, from BPE merges written here; the longest caption is
  10 tokens of the 16);
* text_encoder: a 2-layer, 64-wide ``CLIPTextModel``;
* vae: a one-level ``AutoencoderKL`` (no downsampling, 4 latent channels): nearly pixel space,
  learned in a few seconds;
* unet: a two-level ``UNet2DConditionModel`` with cross-attention, 32x32 latents;
* scheduler: DDPM betas as SD1.x ("scaled_linear", 1000 steps), saved as a DDIM scheduler.
"""

from __future__ import annotations

import json
from pathlib import Path

from world import WORDS

MAX_LENGTH = 16
SPECIAL = ("<|startoftext|>", "<|endoftext|>")


def bpe(word: str, merges: list[tuple[str, str]]) -> list[str]:
    """CLIP's byte-pair encoding of one lower-case word with ``merges`` (lowest rank merges first)."""
    rank = {m: i for i, m in enumerate(merges)}
    pieces = [*word[:-1], word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = [(rank.get((a, b), len(rank)), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:], strict=False))]
        best, i = min(pairs)
        if best == len(rank):
            break
        pieces[i:i + 2] = [pieces[i] + pieces[i + 1]]
    return pieces


def vocab_and_merges(words=WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-style BPE vocabulary in which every word of ``words`` is ONE token (every letter is one too).

    Each word gets a left-to-right chain of merges. A merge ranked early for one word can pre-empt
    another word's chain ("ma" of "magenta" inside "small"), so the words are re-encoded with the
    merges so far and, where one still falls apart, merges joining its pieces are appended, until every
    word is whole. (The first tiny-sd was trained with a tokenizer that stopped after one pass and split
    "small" and "triangle", which pushed full captions past 16 tokens.)
    """
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = [*SPECIAL, *letters, *(c + "</w>" for c in letters)]
    merges: list[tuple[str, str]] = []
    for _ in range(10):
        broken = 0
        for word in words:
            pieces = bpe(word, merges)
            if len(pieces) == 1:
                continue
            broken += 1
            joined = pieces[0]
            for piece in pieces[1:]:
                if (joined, piece) not in merges:
                    merges.append((joined, piece))
                joined += piece
                if joined not in tokens:
                    tokens.append(joined)
        if not broken:
            return {t: i for i, t in enumerate(tokens)}, merges
    raise RuntimeError("BPE merges for the world's words did not converge")


def write_tokenizer(folder: Path) -> None:
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, indent=0))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"),
                        pad_token=SPECIAL[1], model_max_length=MAX_LENGTH)
    tok.save_pretrained(str(folder))


def build_models(vocab_size: int):
    """Freshly initialised (text_encoder, vae, unet)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    te = CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=MAX_LENGTH, projection_dim=64,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",), block_out_channels=(32,), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=32,
    )
    unet = UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
        attention_head_dim=8, norm_num_groups=16,
    )
    return te, vae, unet


def schedulers():
    from diffusers import DDIMScheduler, DDPMScheduler

    kw = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    return DDPMScheduler(**kw), DDIMScheduler(**kw, clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def save_pipeline(folder: Path, te, vae, unet, tokenizer_dir: Path) -> None:
    """Write a StableDiffusionPipeline folder, weights in fp16 (each file stays small)."""
    import torch
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=te, tokenizer=CLIPTokenizer.from_pretrained(str(tokenizer_dir)), unet=unet,
        scheduler=schedulers()[1], safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.to(torch.float16)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    for name in ("vocab.json", "merges.txt"):  # for older transformers that want the slow files
        (folder / "tokenizer" / name).write_bytes((tokenizer_dir / name).read_bytes())
