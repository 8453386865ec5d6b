"""DiT (Peebles & Xie 2023): class-conditional diffusion-transformer samples in the
autoencoder's latent space with classifier-free guidance, decoded; ``per_class`` of every
class, hard labels (:func:`cellflow.latent.generate_latent`)."""

from __future__ import annotations

import pandas as pd

from cellflow.generation.common import GenerationJob
from cellflow.latent import generate_latent, load_dit


def run(job: GenerationJob) -> pd.DataFrame:
    return generate_latent(job, "dit", load_dit)
