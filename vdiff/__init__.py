"""vdiff: likelihood-based diffusion models in JAX/Flax.

Modules (one concept each): `schedules` (noise schedules), `vdm` (VDM negative ELBO), `diffenc` (DiffEnc
encoders and loss), `varmin` (variance-minimising schedule gradients), `cdm` (Classification Diffusion
Models), `samplers` (DDPM, DDIM, VDM ancestral, probability flow, guidance), `likelihood` (encoding,
dequantisation, bits/dim, ODE log-likelihood), `nets` (flax modules), `data`, `parallel`, `models`, `train`.
"""

from vdiff import cdm
from vdiff import diffenc
from vdiff import likelihood
from vdiff import samplers
from vdiff import schedules
from vdiff import varmin
from vdiff import vdm
from vdiff.likelihood import nats_to_bpd
from vdiff.schedules import Schedule

__version__ = "0.1.0"
