"""SpotServe's evaluation setting for the spot simulator (GPT-20B on 4 x T4 nodes)."""
from jaxserve.configs.spotserve_gpt20b import get_config  # noqa: F401  (the packaged config; jaxserve/configs/)
