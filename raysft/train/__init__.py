"""Training on a Ray Train worker: model, trainer, checkpoints, metrics."""

import logging

# bitsandbytes (imported through peft) warns at import, on every worker, that its optional CPU
# kernels package is absent; QLoRA on CPU works without it. Errors still show.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
