"""The worker side: Celery task, diffusers pipelines, device profiles, the model maker.

Importing it quiets Hugging Face's import-time notices and progress bars (a worker's log is for
jobs); set the variables yourself to see them.
"""

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
