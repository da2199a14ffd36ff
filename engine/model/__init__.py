"""The model: presets, folders in Stable Diffusion layout, data, frozen-encoder caches, noise
schedules and sampling."""
