"""Training images: reading and checking a folder, captions, class-image generation, batches.

With a caption extension (kohya's ``caption_extension``, e.g. ``.txt``), an image whose sidecar file
``<stem><ext>`` exists is trained with that caption; the others use the run's instance or class prompt.
Images are resized (shorter side to the resolution, Lanczos) and centre-cropped, then scaled to
[-1, 1]. A batch with prior preservation is the instance examples followed by as many class
examples, so one forward pass serves both losses.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from loratool.errors import LoraToolError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
ACCEPTED_MODES = ("RGB", "RGBA", "L", "LA", "P")


def image_files(folder: str | Path, what: str = "image folder", allow_empty: bool = False) -> list[Path]:
    """The image files of a folder, sorted; clear errors for a missing, unreadable or empty folder."""
    folder = Path(folder)
    if not folder.exists():
        raise LoraToolError(f"{what} does not exist", folder)
    if not folder.is_dir():
        raise LoraToolError(f"{what} is not a folder", folder)
    try:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    except OSError as e:
        raise LoraToolError(f"{what} cannot be read ({e.strerror})", folder) from None
    if not files and not allow_empty:
        raise LoraToolError(f"{what} holds no images ({', '.join(IMAGE_SUFFIXES)})", folder)
    return files


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """One image as ``[3, res, res]`` in [-1, 1]; errors name the file and the problem."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            mode, size = im.mode, im.size
            if mode not in ACCEPTED_MODES:
                raise LoraToolError(f"image mode {mode} is not supported (use RGB, RGBA, L or P)", path)
            if min(size) < resolution:
                raise LoraToolError(f"image is {size[0]}x{size[1]}, smaller than --resolution {resolution}", path)
            if mode in ("RGBA", "LA", "P"):
                rgba = im.convert("RGBA")
                rgb = Image.new("RGB", rgba.size, (255, 255, 255))
                rgb.paste(rgba, mask=rgba.getchannel("A"))
            else:
                rgb = im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise LoraToolError(f"not a readable image ({type(e).__name__})", path) from None
    w, h = rgb.size
    s = resolution / min(w, h)
    nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
    if (nw, nh) != (w, h):
        rgb = rgb.resize((nw, nh), Image.Resampling.LANCZOS)
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    rgb = rgb.crop((left, top, left + resolution, top + resolution))
    t = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(resolution, resolution, 3)
    return t.permute(2, 0, 1).float() / 127.5 - 1.0


def load_folder(folder: str | Path, resolution: int, what: str = "image folder") -> torch.Tensor:
    return torch.stack([load_image(p, resolution) for p in image_files(folder, what)])


def read_caption(image: Path, extension: str) -> str | None:
    """The caption in ``image``'s sidecar file, or None when there is none; an unusable file is an error."""
    path = image.with_suffix(extension)
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        raise LoraToolError("caption file is not UTF-8 text", path) from None
    except OSError as e:
        raise LoraToolError(f"caption file cannot be read ({e.strerror})", path) from None
    if not text:
        raise LoraToolError("caption file is empty", path)
    return " ".join(text.split())


def load_captioned(folder: str | Path, resolution: int, what: str, prompt: str,
                   caption_extension: str | None, pixels: bool = True) -> tuple[torch.Tensor, list[str]]:
    """A folder's images and one prompt for each: its sidecar caption, else ``prompt``.

    ``pixels=False`` reads no image: the tensor is an empty one of the right shape on the meta device."""
    files = image_files(folder, what)
    captions = [read_caption(p, caption_extension) if caption_extension else None for p in files]
    if pixels:
        images = torch.stack([load_image(p, resolution) for p in files])
    else:
        images = torch.empty(len(files), 3, resolution, resolution, device="meta")
    return images, [c or prompt for c in captions]


def save_image(img: torch.Tensor, path) -> None:
    """Save ``[3, H, W]`` in [0, 1] as PNG to a path or an open binary file."""
    from PIL import Image

    arr = (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).contiguous().numpy()
    Image.fromarray(arr, "RGB").save(path, format="PNG")


def generate_class_images(pipe, folder: Path, prompt: str, wanted: int, resolution: int, seed: int,
                          batch: int = 16, steps: int = 25, guidance: float = 5.0) -> int:
    """Fill ``folder`` up to ``wanted`` images of ``prompt`` made by the base pipeline; returns how many."""
    from loratool.io.output import Outputs

    folder.mkdir(parents=True, exist_ok=True)
    outputs = Outputs()  # new files beside the user's own class images: never over one of them
    have = len(image_files(folder, "class image folder", allow_empty=True))
    missing = max(0, wanted - have)
    made = 0
    while made < missing:
        n = min(batch, missing - made)
        gens = [torch.Generator(pipe.device).manual_seed(seed + have + made + i) for i in range(n)]
        with torch.no_grad():
            imgs = pipe([prompt] * n, height=resolution, width=resolution, num_inference_steps=steps,
                        guidance_scale=guidance, generator=gens, output_type="pt").images
        for img in imgs.float().cpu():
            digest = hashlib.sha1(img.numpy().tobytes()).hexdigest()[:12]
            with outputs.file(folder / f"{have + made:05d}-{digest}.png") as fh:
                save_image(img, fh)
            made += 1
    return missing


@dataclass
class Examples:
    """Pixel tensors and their prompts (one for all, or one per image); ``n_instance`` rows of a batch are
    instances, the rest class."""

    instance: torch.Tensor
    instance_prompt: str | list[str]
    klass: torch.Tensor | None = None
    class_prompt: str | list[str] | None = None

    @staticmethod
    def _prompts(prompt: str | list[str], idx: torch.Tensor) -> list[str]:
        return [prompt] * len(idx) if isinstance(prompt, str) else [prompt[i] for i in idx.tolist()]

    @property
    def n_instance(self) -> int:
        return len(self.instance)

    def draw(self, size: int, gen: torch.Generator) -> torch.Tensor:
        """Image numbers of one batch, drawn with ``gen``: ``size`` instance images, then ``size`` class
        images if any (numbered after the instance images, as in :meth:`prompt_table`)."""
        idx = torch.randint(0, len(self.instance), (size,), generator=gen)
        if self.klass is None:
            return idx
        return torch.cat([idx, len(self.instance) + torch.randint(0, len(self.klass), (size,), generator=gen)])

    def pixels(self, images: torch.Tensor) -> torch.Tensor:
        """The pixels of image numbers (instance images first, then class images)."""
        inst = images < len(self.instance)
        if bool(inst.all()):
            return self.instance[images]
        out = torch.empty(len(images), *self.instance.shape[1:], device=self.instance.device)
        out[inst] = self.instance[images[inst]]
        out[~inst] = self.klass[images[~inst] - len(self.instance)]
        return out

    def prompt_table(self) -> tuple[list[str], torch.Tensor]:
        """(the distinct prompts, in first-use order; each image's prompt number)."""
        per_image = self._prompts(self.instance_prompt, torch.arange(len(self.instance)))
        if self.klass is not None:
            per_image += self._prompts(self.class_prompt, torch.arange(len(self.klass)))
        numbers: dict[str, int] = {}
        for p in per_image:
            numbers.setdefault(p, len(numbers))
        return list(numbers), torch.tensor([numbers[p] for p in per_image])

    def batch(self, size: int, gen: torch.Generator) -> tuple[torch.Tensor, list[str], int]:
        """``size`` instance examples (drawn with ``gen``), then ``size`` class ones if any."""
        images = self.draw(size, gen)
        prompts, number = self.prompt_table()
        return self.pixels(images), [prompts[i] for i in number[images].tolist()], size

    def prompt_counts(self, part: str) -> dict[str, int]:
        """How many images of ``part`` ("instance" or "class") are trained with each prompt."""
        prompt, pixels = (self.instance_prompt, self.instance) if part == "instance" else (self.class_prompt, self.klass)
        if pixels is None:
            return {}
        counts: dict[str, int] = {}
        for p in [prompt] * len(pixels) if isinstance(prompt, str) else prompt:
            counts[p] = counts.get(p, 0) + 1
        return counts
