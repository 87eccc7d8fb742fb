"""Configuration presets. Each module defines `get_config() -> ml_collections.ConfigDict`.

The presets live inside the package (not a top-level `configs/`) so that an installed
`jaxdp` finds them by name: `--config tiny_cpu` is the same as `--config path/to/tiny_cpu.py`.
"""
