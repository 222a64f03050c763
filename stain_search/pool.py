"""Image history buffer for the discriminators (Shrivastava et al., 2017).

"Learning from Simulated and Unsupervised Images through Adversarial
Training" updates D with a history of generated images rather than only the
latest ones, so D does not forget what G produced earlier and G cannot
chase a D that only remembers the last batch. CycleGAN (Zhu et al., 2017)
keeps 50 past images per direction; this is the reference's
``util/image_pool.py`` with its randomness made reproducible:

- until the pool is full, each new image is stored and returned as is;
- then, per image, with probability ½ a random stored image is returned and
  the new one takes its place; otherwise the new image is returned.

The draws come from the pool's own ``torch.Generator``, and
:meth:`ImagePool.state_dict` holds the stored images (on CPU) and the
generator's state, so a resumed run sees exactly the images it would have.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from stain_search.errors import ConfigError


class ImagePool:
    """Returns a mix of new and past generated images; ``size=0`` passes through.

    Outputs are always detached: they feed D's update only. ``generator``, if
    given, must be a CPU generator (the draws are tiny; the images may live on
    any device).
    """

    def __init__(self, size: int = 50, *, seed: int | None = None,
                 generator: torch.Generator | None = None) -> None:
        if size < 0:
            raise ValueError(f"ImagePool size must not be negative, got {size}")
        self.size = size
        if generator is None:
            # Without a seed, derive one from torch's: torch.manual_seed then
            # fixes the pool too, without drawing from (and so shifting) the
            # global random stream.
            generator = torch.Generator().manual_seed(
                torch.initial_seed() if seed is None else seed)
        self.generator = generator
        self.images: list[Tensor] = []  # each # (C, H, W), detached

    def __len__(self) -> int:
        return len(self.images)

    def query(self, images: Tensor) -> Tensor:
        """Images # (B, C, H, W) in, as many out: each new or, once full, 50% past."""
        if self.size == 0:
            return images.detach()
        out = []
        for image in images.detach():
            if len(self.images) < self.size:
                self.images.append(image.clone())
                out.append(image)
            elif torch.rand((), generator=self.generator) < 0.5:
                slot = int(torch.randint(self.size, (), generator=self.generator))
                past = self.images[slot]
                self.images[slot] = image.clone()
                out.append(past.to(device=images.device, dtype=images.dtype))
            else:
                out.append(image)
        return torch.stack(out)

    def state_dict(self) -> dict[str, Any]:
        """Stored images on CPU and the generator's state (``weights_only``-safe)."""
        return {"size": self.size,
                "images": [image.cpu() for image in self.images],
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["size"] != self.size:
            raise ConfigError(f"`train.pool_size` is {self.size} but the checkpoint's image "
                              f"pool holds up to {state['size']}; resume with the same "
                              f"`train.pool_size` or start a new run")
        self.images = [image.clone() for image in state["images"]]
        self.generator.set_state(state["generator"])
