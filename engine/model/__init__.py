"""The model: presets, folders in Stable Diffusion layout, data, frozen-encoder caches, noise
schedules and sampling."""
from freezeasguard.engine.backends import quiet_import_warnings

quiet_import_warnings()
