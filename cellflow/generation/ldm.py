"""LDM (Rombach et al. 2022): class-conditional latent diffusion samples with classifier-free
guidance, decoded by the dataset's autoencoder; ``per_class`` of every class, hard labels
(:func:`cellflow.latent.generate_latent`)."""

from __future__ import annotations

import pandas as pd

from cellflow.generation.common import GenerationJob
from cellflow.latent import generate_latent, load_ldm


def run(job: GenerationJob) -> pd.DataFrame:
    return generate_latent(job, "ldm", load_ldm)
